"""The step timers of tbps.trainer.tools.step_timing: `tbps bench step` times the trainer's own
step phase by phase and the EMA refresh; `tbps bench step-kernels` runs the project's model with
the kernels (in the interpreter here) and with the references, which give the same first loss
from the same weights and batch; the one synthetic batch."""
import json
import math

import pytest

from tbps.kernels._dispatch import interpreting
from tbps.trainer.common.config_files import load_config
from tbps.trainer.tools import step_timing
from tests.trainer.conftest import REPO, TINY_MODEL


@pytest.mark.slow
def test_phases_report_every_phase_and_the_momentum_model(tmp_path, tiny_shards):
    out = tmp_path / "bench.json"
    assert step_timing.phases_main([
        "--config", str(REPO / "launch/configs/irra_synth.yaml"), "--steps", "2", "--warmup",
        "1", "--out", str(out), f"data.shards={tiny_shards}", *TINY_MODEL, "method=amns"]) == 0
    r = json.loads(out.read_text())
    assert set(r["phases_ms"]) == set(step_timing.PHASES)
    assert all(v >= 0 for v in r["phases_ms"].values())
    assert r["phases_ms"]["forward"] > r["inside_forward_ms"]["momentum_forward"] > 0
    assert r["inside_forward_ms"]["image_encoder_forward"] > 0
    assert r["ema"]["bytes_gathered_per_rank"] == 4 * r["ema"]["parameters"]      # fp32 copy
    assert r["samples_per_s"] > 0 and r["kept_patches"] == "70%" and r["cpu"]
    assert r["commit"] and r["command"].startswith("tbps bench step --config")


def test_phases_refuse_bad_arguments(capsys):
    assert step_timing.phases_main(["--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


@pytest.mark.skipif(not interpreting(), reason="the CPU run drives the kernels in the interpreter")
def test_tiny_kernel_steps_match_the_reference(tmp_path):
    rows = step_timing.kernels_main(["--tiny", "--precision", "fp32", "--steps", "1", "--warmup",
                                     "0", "--out", str(tmp_path)])
    assert [r.get("error") for r in rows] == [None] * 4
    by = {(r["preset"], r["impl"]): r for r in rows}
    for preset in ("irra", "rde"):
        kern, ref = by[(preset, "kernels")], by[(preset, "reference")]
        assert math.isclose(kern["first_loss"], ref["first_loss"], rel_tol=1e-4), preset
        assert kern["samples_per_s"] > 0 and 0 < kern["similarity_share"] < 1
    assert by[("rde", "kernels")]["selection_share"] > 0
    assert by[("irra", "kernels")]["selection_share"] == 0
    meta = json.loads((tmp_path / "step.json").read_text())
    assert len(meta["rows"]) == 4 and meta["command"].startswith("tbps bench step-kernels --tiny")
    assert meta["spec"] and meta["dtype"] == "float32"


def test_the_module_entry_routes_kernels_to_step_kernels(capsys):
    with pytest.raises(SystemExit):
        step_timing.main(["kernels", "--help"])
    assert "tbps bench step-kernels" in capsys.readouterr().out


@pytest.mark.parametrize("full_length", [False, True])
def test_synthetic_batch_has_the_configured_shapes(full_length):
    cfg = load_config(REPO / "launch/configs/irra_synth.yaml", step_timing.TINY)
    vocab = step_timing.Vocabulary(100)
    b = step_timing.synthetic_batch(cfg, vocab, 6, num_classes=None if full_length else 50,
                                    full_length=full_length)
    L = cfg.model.context_length
    assert b["image"].shape == (6, 3, *cfg.model.image_size) and b["input_ids"].shape == (6, L)
    ids = b["input_ids"]
    eot = (ids == vocab.eot_id).int().argmax(dim=1)
    assert (ids[:, 0] == vocab.sot_id).all() and ((ids == vocab.eot_id).sum(1) == 1).all()
    assert b["text_length"] == int(eot.max()) + 1 and (b["text_length"] == L) == full_length
    pairs = [0, 0, 1, 1, 2, 2] if full_length else [*b["pid"][:3].tolist()] * 2
    assert b["pid"].tolist() == pairs
