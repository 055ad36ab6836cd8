"""Refactor parity: the IRRA and RDE presets reproduce the per-step losses (and RDE's divisions)
recorded in golden_losses.json to a relative 1e-6 (tests/trainer/golden.py says how, and why
RDE's record was re-taken once)."""
import pytest

from tests.trainer import golden

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def golden_shards(tmp_path_factory):
    return golden.make_shards(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("preset", list(golden.PRESETS))
def test_preset_reproduces_the_golden_losses(tmp_path, golden_shards, preset):
    want = golden.expected(preset)
    got = golden.run_preset(preset, golden_shards, tmp_path / "run")
    problems = golden.compare(got, want)
    assert not problems, "\n".join(problems[:20])
    if preset == "rde":
        assert sum(k.startswith("division-") for k in want) == 3
