"""Every preset and every recipe command the README shows builds and trains two steps (the
momentum model and the division included), here in one process on the tiny synthetic shards."""
import json
import re
import shlex

import pytest

from tbps.trainer.common.config import presets
from tests.trainer.conftest import REPO, TINY_MODEL

pytestmark = pytest.mark.slow


def readme_recipes() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- recipes: begin -->(.*?)<!-- recipes: end -->", text, re.S).group(1)
    lines = [ln for ln in block.splitlines() if ln.startswith("tbps train")]
    assert len(lines) >= 6
    return [shlex.split(ln)[2:] for ln in lines]


def test_readme_recipes_are_the_ones_tested():
    assert any("method=aga" in args for args in readme_recipes())


@pytest.mark.parametrize("args", readme_recipes(), ids=lambda a: " ".join(a[1:])[:60] or a[0])
def test_readme_recipe_trains_two_steps(tmp_path, tiny_shards, args):
    from tbps.trainer.common.config_files import parse_overrides

    _two_steps(tmp_path, tiny_shards, REPO / args[1], parse_overrides(args[2:]))


@pytest.mark.parametrize("preset", presets())
def test_every_preset_trains_two_steps(tmp_path, tiny_shards, preset):
    _two_steps(tmp_path, tiny_shards, REPO / "launch/configs/irra_synth.yaml", [f"method={preset}"])


def _two_steps(tmp_path, tiny_shards, config, overrides):
    from tbps.trainer.common.config_files import load_config
    from tbps.trainer.train import Run

    cfg = load_config(config, overrides + [
        f"data.shards={tiny_shards}", f"train.output_dir={tmp_path / 'run'}", *TINY_MODEL,
        "train.max_steps=2", "eval.select_split=none", "eval.final_split=none",
        "recipe.weighting.warmup_epochs=0"])
    report = Run(cfg).fit()
    assert report["steps"] == 2
    events = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2]
    assert all(0 < e["loss"] < 1e4 for e in steps)
    if cfg.needs_momentum():
        assert "ema_momentum" in steps[0]
    if cfg.recipe.weighting.kind != "none":
        assert [e["epoch"] for e in events if e["event"] == "epoch_start"] == [0]
    assert (tmp_path / "run" / "final" / "model.json").is_file()
