"""optim.schedule=epoch gives the IRRA/RDE authors' learning-rate factors: constant within an
epoch, a linear warm-up staircase from warmup_start_factor, then a cosine staircase to 0."""
import math

import pytest

from tbps.trainer.common.config_files import load_config
from tbps.trainer.running.resume import lr_at


def _authors(epoch_index: int, warmup: int = 5, total: int = 60, start: float = 0.1) -> float:
    """Their scheduler's factor while epoch `epoch_index` (0-based) trains."""
    if epoch_index < warmup:
        alpha = epoch_index / warmup
        return start * (1 - alpha) + alpha
    return 0.5 * (1 + math.cos(math.pi * (epoch_index - warmup) / (total - warmup)))


def test_the_epoch_schedule_is_the_authors_staircase():
    cfg = load_config(None, ["optim.schedule=epoch", "optim.warmup_epochs=5",
                             "optim.warmup_start_factor=0.1", "optim.min_lr_factor=0"])
    layout = {"steps_per_epoch": 7, "total_steps": 7 * 60}
    for epoch in range(60):
        got = {lr_at(cfg, layout, epoch * 7 + k) for k in range(7)}
        assert len(got) == 1 and got.pop() == pytest.approx(_authors(epoch), abs=1e-12), epoch
    assert lr_at(cfg, layout, 59 * 7) == pytest.approx(0.000815, abs=1e-6)   # their last epoch


def test_the_step_schedule_changes_within_an_epoch():
    cfg = load_config(None, ["optim.warmup_epochs=1"])
    layout = {"steps_per_epoch": 10, "total_steps": 100}
    assert lr_at(cfg, layout, 1) < lr_at(cfg, layout, 2) < lr_at(cfg, layout, 9)
    with pytest.raises(ValueError, match="optim.schedule"):
        load_config(None, ["optim.schedule=hourly"])
