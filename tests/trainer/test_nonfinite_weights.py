"""Weights that became non-finite are never written: no checkpoint, best/, final/ or export from
them; the run ends with exit 1 naming the last checkpoint (one process, in this one)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tbps.trainer.train import main
from tests.trainer.conftest import REPO, TINY_MODEL, launch

CONFIG = str(REPO / "launch/configs/irra_synth.yaml")


def test_an_infinite_learning_rate_writes_no_result(tmp_path, tiny_shards, capsys):
    run = tmp_path / "run"
    common = ["--config", CONFIG, f"data.shards={tiny_shards}", f"train.output_dir={run}",
              *TINY_MODEL, "train.ckpt_every_steps=1", "eval.select_split=none",
              "eval.final_split=none", "train.max_nonfinite_steps=100"]
    assert main([*common, "train.max_steps=2"]) == 0
    final = load_file(str(run / "final" / "model.safetensors"))
    capsys.readouterr()
    code = main([*common, "train.max_steps=4", "train.resume=latest", "optim.lr=.inf"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "non-finite values at step 3" in err and "step-00000002" in err
    assert "Traceback" not in err
    done = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert done == ["step-00000001", "step-00000002"]
    again = load_file(str(run / "final" / "model.safetensors"))       # the first run's, untouched
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert all(torch.isfinite(v).all() for v in again.values())
    events = [json.loads(x)["event"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert events.count("done") == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_under_the_launcher_the_last_screen_is_the_message_and_the_exit_code(tmp_path,
                                                                            tiny_shards):
    proc = launch("cpu_ddp.yaml", tmp_path / "run", tiny_shards, "optim.lr=.inf",
                  "train.ckpt_every_steps=1", "train.max_nonfinite_steps=100",
                  "eval.select_split=none", "eval.final_split=none", wrapper=True, wait=False)
    out, _ = proc.communicate(timeout=600)
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 1, out[-3000:]
    assert lines[-1] == "tbps launch: exit code 1"
    assert lines[-2].startswith("error: the weights hold non-finite values at step 1")
    assert "Traceback" not in out and "ChildFailedError" not in out     # the launcher's report
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        p.name.startswith("step-") for p in (tmp_path / "run" / "checkpoints").iterdir())
