"""The training-step timer of the GPU check runs the project's own model and recipes (a tiny
model here, the kernels in the interpreter), and the kernels and the references give the same
first loss from the same weights and batch."""
import math

import pytest

from tbps.kernels._dispatch import interpreting
from tbps.kernels.step_timing import main


@pytest.mark.skipif(not interpreting(), reason="the CPU run drives the kernels in the interpreter")
def test_tiny_step_timing_kernels_match_reference(tmp_path):
    rows = main(["--tiny", "--precision", "fp32", "--steps", "1", "--warmup", "0",
                 "--out", str(tmp_path)])
    assert [r.get("error") for r in rows] == [None] * 4
    by = {(r["preset"], r["impl"]): r for r in rows}
    for preset in ("irra", "rde"):
        kern, ref = by[(preset, "kernels")], by[(preset, "reference")]
        assert math.isclose(kern["first_loss"], ref["first_loss"], rel_tol=1e-4), preset
        assert kern["samples_per_s"] > 0 and 0 < kern["similarity_share"] < 1
    assert by[("rde", "kernels")]["selection_share"] > 0 and by[("irra", "kernels")]["selection_share"] == 0
    assert (tmp_path / "step.json").is_file()
