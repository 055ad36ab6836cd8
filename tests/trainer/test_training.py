"""Real training runs under `accelerate launch` with 2 CPU processes (gloo)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tbps.trainer.common import dist
from tbps.trainer.running import checkpoint

from tests.trainer.conftest import EPOCHS, launch, step_losses

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _falls(losses: dict[int, float]) -> None:
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:3]) / 3
    last = sum(losses[s] for s in steps[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"


@pytest.mark.smoke
def test_ddp_trains_evaluates_and_exports(ddp_run):
    losses = step_losses(ddp_run)
    assert sorted(losses) == list(range(1, 21))
    _falls(losses)
    report = json.loads((ddp_run / "metrics.json").read_text())
    assert report["select_split"] == "val" and report["best_epoch"] in (1, 2)
    for key in ("best", "final"):
        assert set(report[key]["t2i"]) == {"R1", "R5", "R10", "mAP", "mINP"}
    for name in ("best/model.safetensors", "final/model.safetensors", "hf/model.safetensors",
                 "hf/tokenizer.json", "config.yaml", "checkpoints/latest"):
        assert (ddp_run / name).is_file(), name


@pytest.mark.smoke
@pytest.mark.parametrize("zero", ["cpu_zero2.yaml", "cpu_zero3.yaml"])
def test_deepspeed_zero_matches_ddp(tmp_path, tiny_shards, ddp_run, zero):
    run = tmp_path / "run"
    launch(zero, run, tiny_shards, *EPOCHS)
    ds, ddp = step_losses(run), step_losses(ddp_run)
    _falls(ds)
    assert sorted(ds) == sorted(ddp)
    for step in ds:       # the same computation, distributed differently
        assert ds[step] == pytest.approx(ddp[step], rel=2e-4), step
    # the last checkpoint passes the restricted loader's check (DeepSpeed's records allowed)
    # and its partitions put together are final/'s weights: a model.pretrained start
    last = checkpoint.newest(run)
    assert checkpoint.verify(last) == [] and (last / "clip_config.json").is_file()
    whole, final = dist.checkpoint_model_state(last), load_file(run / "final/model.safetensors")
    assert set(whole) == set(final)
    for name, value in final.items():
        assert torch.equal(whole[name], value), name


def test_existing_run_is_not_overwritten(tmp_path, tiny_shards, ddp_run):
    proc = launch(None, ddp_run, tiny_shards, *EPOCHS, wait=False)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "already holds a run" in out


def test_evaluate_cli_reproduces_the_run_figures(tmp_path, ddp_run):
    import os
    import subprocess
    import sys

    from tests.trainer.conftest import REPO

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "tbps.trainer.inference.evaluate", str(ddp_run / "best"),
                           "--split", "test", "--out", str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "evaluation.json").read_text())["metrics"]["t2i"]
    want = json.loads((ddp_run / "metrics.json").read_text())["best"]["t2i"]
    assert got == pytest.approx(want, abs=1e-6)
    assert "R1" in proc.stdout and "mINP" in proc.stdout


def test_gradient_accumulation_in_bf16(tmp_path, tiny_shards):
    run = tmp_path / "run"
    launch("cpu_ddp.yaml", run, tiny_shards, "train.epochs=1", "optim.grad_accum=2",
           "train.precision=bf16", "data.batch_size=64")    # 16 a rank x 2 ranks x 2
    losses = step_losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5]          # 10 batches a rank, 2 per step
    assert all(0 < v < 100 for v in losses.values())
