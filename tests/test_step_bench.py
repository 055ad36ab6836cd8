"""launch/step_bench.py: the table, AWM's ratio to the full-token step, the --gpu guard."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("step_bench", REPO / "launch" / "step_bench.py")
step_bench = importlib.util.module_from_spec(spec)
sys.modules["step_bench"] = step_bench
spec.loader.exec_module(step_bench)


def _result(step_ms, momentum=0.0, image=100.0, device="cpu:0"):
    return {"cpu": "x", "torch": "t", "world_size": 2, "precision": "fp32", "threads": 1,
            "commit": "abc", "device": device, "device_name": None, "samples_per_s": 10.0,
            "step_ms": step_ms, "phases_ms": {"data": 1.0, "forward": 2.0, "backward": 3.0,
                                              "optimizer": 4.0, "ema": 0.0},
            "inside_forward_ms": {"momentum_forward": momentum, "image_encoder_forward": image},
            "command": "tbps bench step ..."}


def test_table_reports_awm_against_every_patch():
    results = {"irra": _result(900.0), "amns": _result(1100.0, momentum=120.0, image=70.0),
               "amns-all-patches": _result(1000.0), "amns-random-drop": _result(950.0),
               "amns-vit-b16": _result(300.0, momentum=50.0, image=60.0),
               "amns-vit-b16-all-patches": _result(400.0)}
    text = step_bench.table(results)
    assert "- amns: AWM step / full-token step = 1.10 (1100 / 1000 ms; the momentum forward " \
           "it adds 120 ms, the online image encoder 70 against 100 ms)" in text
    assert "- amns-vit-b16: AWM step / full-token step = 0.75" in text
    assert "amns-random-drop: AWM" not in text and text.startswith("CPU: x;")
    alone = step_bench.table({"amns": _result(1100.0)})             # nothing to compare with
    assert "AWM step" not in alone


def test_unknown_case_and_gpu_without_a_device_are_refused(capsys):
    with pytest.raises(SystemExit):
        step_bench.main(["--cases", "nope"])
    assert "unknown cases" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            step_bench.main(["--gpu", "--cases", "amns"])
        assert "no CUDA device" in capsys.readouterr().err
