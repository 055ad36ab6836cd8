import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tbps.data_pipeline.sharding import ShardOptions, shard_dataset
from tbps.data_pipeline.synthetic import SynthConfig, generate

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = ["model.vision_width=64", "model.text_width=64", "model.embed_dim=64",
              "model.vision_layers=2", "model.text_layers=2", "model.cross_layers=1",
              "data.batch_size=32", "data.num_workers=0", "data.eval_batch_size=64",
              "optim.lr=1e-3", "optim.warmup_epochs=0.2", "train.log_every_steps=1",
              "train.tensorboard=false", "train.precision=fp32"]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """40 train ids x 4 images x 2 captions = 320 pairs (10 shards), 8 val and 10 test ids."""
    root = tmp_path_factory.mktemp("tiny")
    generate(root / "data", SynthConfig(seed=5, num_train_ids=40, num_val_ids=8,
                                        num_test_ids=10), progress=False)
    shard_dataset("cuhk-pedes", root / "data", root / "shards", ShardOptions(shard_size=32),
                  progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_shards_noisy(tiny_shards):
    """The same pairs with 50 % of the train captions permuted (RDE protocol)."""
    root = tiny_shards.parent
    shard_dataset("cuhk-pedes", root / "data", root / "shards-n50",
                  ShardOptions(shard_size=32, noise_rate=0.5, noise_seed=0), progress=False)
    return root / "shards-n50"


def launch(accelerate_config: str | None, run_dir: Path, shards: Path, *overrides,
           processes: int = 2, wait: bool = True, timeout: int = 600, wrapper: bool = False):
    """Run tbps.trainer.train under `accelerate launch` (or alone when accelerate_config is None);
    wrapper: through `tbps launch` (signals forwarded, exit codes kept)."""
    args = ["--config", str(REPO / "launch/configs/irra_synth.yaml"), f"data.shards={shards}",
            f"train.output_dir={run_dir}", *TINY_MODEL, *overrides]
    if accelerate_config is None:
        cmd = [sys.executable, "-m", "tbps.trainer.train", *args]
    else:
        launcher = "tbps.trainer.launch" if wrapper else "accelerate.commands.launch"
        cmd = [sys.executable, "-m", launcher, "--config_file",
               str(REPO / "launch/accelerate" / accelerate_config), "--num_processes",
               str(processes), "-m", "tbps.trainer.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=REPO)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def step_losses(run_dir: Path) -> dict[int, float]:
    """{optimizer step: logged loss} from a run's log.jsonl (last value per step)."""
    out = {}
    for line in (Path(run_dir) / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "step":
            out[rec["step"]] = rec["loss"]
    return out


EPOCHS = ["train.epochs=2"]          # 320 pairs / global batch 32 = 10 steps an epoch
EMA = ["ema.modules=[encoder]", "ema.momentum=0.9"]


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory, tiny_shards):
    """The uninterrupted reference: 2 ranks (DDP over gloo), 2 epochs, the momentum model on."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    launch("cpu_ddp.yaml", run, tiny_shards, *EPOCHS, *EMA)
    return run


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Runs built in the test process leave accelerate's singletons behind (mixed precision
    included); the next in-process run starts from a clean state."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
