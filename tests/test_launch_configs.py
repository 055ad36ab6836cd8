"""Everything in launch/ parses: accelerate configs (accelerate's own reader), DeepSpeed JSONs
(only "auto" fields the trainer or accelerate fill), experiment YAMLs (the trainer's config),
and the SLURM and multi-node scripts, whose per-node command is checked with stand-ins for
srun and scontrol."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
ACCELERATE = sorted((LAUNCH / "accelerate").glob("*.yaml"))
DEEPSPEED = sorted((LAUNCH / "deepspeed").glob("*.json"))
EXPERIMENTS = sorted(p for p in (LAUNCH / "configs").glob("*.yaml")
                     if "method" in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_reads_it(path):
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and cfg.num_processes % cfg.num_machines == 0
    ds = cfg.deepspeed_config or {}
    if ds.get("deepspeed_config_file"):
        assert (LAUNCH.parent / ds["deepspeed_config_file"]).is_file()
        # accelerate refuses these beside a DeepSpeed JSON (they belong in the JSON)
        raw = yaml.safe_load(path.read_text())
        assert "mixed_precision" not in raw and set(ds) <= {"deepspeed_config_file",
                                                             "zero3_init_flag",
                                                             "deepspeed_multinode_launcher"}
    elif "zero" in path.name:
        assert ds["zero3_save_16bit_model"] is True


def test_every_launch_the_readme_names_exists():
    names = {p.stem for p in ACCELERATE}
    assert {"gpu_1", "gpu_ddp", "gpu_zero1", "gpu_zero2", "gpu_zero3", "gpu_zero3_offload",
            "multinode_zero2"} <= names


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_json_has_only_autos_that_are_filled(path):
    from tbps.trainer.running.plan import AUTO_FIELDS, _auto_keys

    ds = json.loads(path.read_text())
    assert set(_auto_keys(ds)) <= AUTO_FIELDS
    assert "optimizer" not in ds and "scheduler" not in ds    # the trainer builds its own
    zero = ds["zero_optimization"]
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True   # best/ and final/


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_config_loads(path):
    from tbps.trainer.common.config_files import load_config

    cfg = load_config(path)
    if path.stem in ("irra_synth", "rde_synth", "amns_synth", "aga_synth"):   # CPU recipes
        assert cfg.train.precision == "auto"        # fp32 on a CPU without native bf16


@pytest.mark.parametrize("script", ["slurm.sh", "multinode.sh"])
def test_script_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def test_slurm_starts_one_launcher_a_node(tmp_path):
    """scontrol and srun stand-ins: srun runs the task once a node with that node's
    SLURM_NODEID, `python` only prints its arguments."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text("#!/bin/bash\n[ \"$1\" = show ] && printf 'gpu-a\\ngpu-b\\n'\n"
                                   "[ \"$1\" = requeue ] && echo requeued $2\nexit 0\n")
    (bin_ / "srun").write_text(
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        "for n in 0 1; do SLURM_NODEID=$n \"$@\"; done\n")
    (bin_ / "python").write_text("#!/bin/bash\necho \"node $SLURM_NODEID: python $*\"\n"
                                 "exit ${FAKE_RC:-0}\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_ID="1234", SLURM_GPUS_ON_NODE="4",
               SLURM_CPUS_ON_NODE="32")
    env.pop("OMP_NUM_THREADS", None)
    cmd = ["bash", str(LAUNCH / "slurm.sh"), "--config", "launch/configs/irra.yaml",
           "data.shards=shards/cuhk"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=LAUNCH.parent,
                         check=True).stdout
    lines = [x for x in out.splitlines() if x.startswith("node ")]
    assert len(lines) == 2
    for n, line in enumerate(lines):
        assert f"node {n}: python -m tbps.trainer.launch --config_file " \
               "launch/accelerate/multinode_zero2.yaml --num_machines 2 --num_processes 8 " \
               f"--machine_rank {n} --main_process_ip gpu-a --main_process_port 29734 " \
               "-m tbps.trainer.train --config launch/configs/irra.yaml data.shards=shards/cuhk " \
               "train.resume=auto" == line
    stopped = subprocess.run(cmd, env={**env, "FAKE_RC": "3"}, capture_output=True, text=True,
                             cwd=LAUNCH.parent)
    assert stopped.returncode == 3 and "requeued 1234" in stopped.stdout
