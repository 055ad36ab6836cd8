"""The sharded EMA with 2 CPU processes under DDP, ZeRO-2 and ZeRO-3, and alone."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tbps.data_pipeline.tokenizer import train_word_level
from tbps.trainer.running.ema import momentum_at
from tests.trainer.conftest import REPO
from tests.trainer.ema_worker import CAPTIONS

WORKER = str(REPO / "tests" / "trainer" / "ema_worker.py")


def _run(tmp_path, config, mode):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    if config is None:
        cmd = [sys.executable, WORKER]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch/accelerate" / config), "--num_processes", "2", WORKER]
    proc = subprocess.run(cmd + [str(tmp_path), str(tmp_path / "tok"), mode], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((tmp_path / f"{mode}.json").read_text())


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("config, kind", [(None, "flat"), ("cpu_ddp.yaml", "flat"),
                                          ("cpu_zero2.yaml", "zero12"),
                                          ("cpu_zero3.yaml", "zero3")])
def test_sharded_ema_equals_an_unsharded_reference_and_resumes(tmp_path, config, kind):
    train_word_level(CAPTIONS * 2, tmp_path / "tok")
    fresh = _run(tmp_path, config, "fresh")
    assert fresh["kind"] == kind
    assert fresh["moved"] > 1e-3                       # the EMA differs from the weights
    assert fresh["ema_vs_reference"] < 1e-6            # fp32 rounding
    world, total = fresh["world"], fresh["reference_bytes"]
    # about 1/world of the fp32 EMA on each rank; under ZeRO-1/2 the slices follow DeepSpeed's
    # optimizer partitions, which split the whole model evenly, not the EMA'd part of it
    slack = 0.15 if kind == "zero12" else 0.02
    for b in fresh["sharded_bytes"]:
        assert abs(b - total / world) <= slack * total, fresh["sharded_bytes"]
    if kind == "zero3":                                 # partitions are padded to equal sizes
        assert total <= sum(fresh["sharded_bytes"]) <= total * 1.01
    else:                                               # the fragments tile the EMA exactly
        assert sum(fresh["sharded_bytes"]) == total
    assert fresh["forward_image"] < 1e-5 * max(1.0, fresh["forward_scale"])
    assert fresh["forward_text"] < 1e-5 * max(1.0, fresh["forward_scale"])
    _run(tmp_path, config, "resume")
    a = torch.load(tmp_path / "fresh-ema.pt")
    b = torch.load(tmp_path / "resume-ema.pt")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-7, msg=name)


def test_momentum_schedule():
    assert momentum_at(0, m0=0.995, m_end=0.995, total_steps=100) == 0.995
    assert momentum_at(0, m0=0.995, m_end=1.0, total_steps=100) == pytest.approx(0.995)
    assert momentum_at(50, m0=0.995, m_end=1.0, total_steps=100) == pytest.approx(0.9975)
    assert momentum_at(100, m0=0.995, m_end=1.0, total_steps=100) == pytest.approx(1.0)
    assert momentum_at(500, m0=0.9, m_end=1.0, total_steps=100) == pytest.approx(1.0)
