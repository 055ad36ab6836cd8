"""A training step of the sampled and momentum parts on 2 ranks equals one process on the
same global batch (draws are keyed by sample, trainer/recipe/draws.py): AMNS's AWM under DeepSpeed
ZeRO-3 (momentum image encoder sharded), AGA's ITC + ITM + MLM with AGM and TEM under DDP,
where every ITM hard negative has to come from the other rank. (IRRA's random MLM masking draws
from each rank's own generator, as IRRA does, so the AWM case leaves the mlm term out.)"""
import os
import subprocess
import sys

import pytest
import torch

from tbps.data_pipeline.tokenizer import train_word_level
from tests.trainer import parts_worker
from tests.trainer.conftest import REPO

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WORKER = str(REPO / "tests" / "trainer" / "parts_worker.py")


def _launch(tmp_path, config, overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch/accelerate" / config), "--num_processes", "2", WORKER,
           str(tmp_path), str(tmp_path / "tok"), *overrides]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(tmp_path / "result.pt")


@pytest.mark.parametrize("config, overrides", [
    ("cpu_zero3.yaml", ["method=amns",
                        "recipe.losses=[{kind: bsdm}, {kind: waf}, {kind: id}]"]),
    ("cpu_ddp.yaml", ["method=aga", "recipe.enrich.prob=0.75"]),
], ids=["awm-zero3", "aga-ddp"])
def test_two_ranks_equal_one_process(tmp_path, config, overrides):
    train_word_level(parts_worker.CAPTIONS * 2, tmp_path / "tok")
    got = _launch(tmp_path, config, overrides)
    want = parts_worker.reference(tmp_path / "tok", overrides)
    assert got["ema_kind"] == ("zero3" if config == "cpu_zero3.yaml" else "flat")
    for k, v in want["values"].items():
        assert got["values"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert set(got["grads"]) == set(want["grads"])
    for name, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=2e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if "method=aga" in overrides:
        calls = [c for rank in got["itm_calls"] for c in rank]
        assert len(calls) == 4                     # two directions on each rank
        for c in calls:
            assert bool(c["found"].all()) and bool((c["picked_ids"] != c["pid"]).all())
        assert 0 < want["values"]["enriched"] < 1
