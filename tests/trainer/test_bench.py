"""The step benchmark times the trainer's own step, phase by phase, and the EMA refresh."""
import json

import pytest

from tests.trainer.conftest import REPO, TINY_MODEL


@pytest.mark.slow
def test_bench_reports_every_phase_and_the_momentum_model(tmp_path, tiny_shards):
    from tbps.trainer.tools.bench import PHASES, main

    out = tmp_path / "bench.json"
    assert main(["--config", str(REPO / "launch/configs/irra_synth.yaml"), "--steps", "2",
                 "--warmup", "1", "--out", str(out), f"data.shards={tiny_shards}", *TINY_MODEL,
                 "method=amns"]) == 0
    r = json.loads(out.read_text())
    assert set(r["phases_ms"]) == set(PHASES) and all(v >= 0 for v in r["phases_ms"].values())
    assert r["phases_ms"]["forward"] > r["inside_forward_ms"]["momentum_forward"] > 0
    assert r["inside_forward_ms"]["image_encoder_forward"] > 0
    assert r["ema"]["bytes_gathered_per_rank"] == 4 * r["ema"]["parameters"]      # fp32 copy
    assert r["samples_per_s"] > 0 and r["kept_patches"] == "70%" and r["cpu"]


def test_bench_refuses_bad_arguments(capsys):
    from tbps.trainer.tools.bench import main

    assert main(["--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
