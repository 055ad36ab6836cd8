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


def _irra_rule(name: str) -> float:
    """IRRA's solver/build.py on its own parameter names (lr_factor 5, bias_lr_factor 2)."""
    lr = 1.0
    if "cross" in name:
        lr = 5.0
    if "bias" in name:
        lr = 2.0
    if "classifier" in name or "mlm_head" in name:
        lr = 5.0
    return lr


# their name -> this project's (tbps convert's mapping)
NAMES = {"cross_attn.out_proj.weight": "cross.cross.out.weight",
         "cross_attn.out_proj.bias": "cross.cross.out.bias",
         "cross_modal_transformer.resblocks.0.mlp.c_fc.weight": "cross.blocks.0.mlp.0.weight",
         "cross_modal_transformer.resblocks.0.mlp.c_fc.bias": "cross.blocks.0.mlp.0.bias",
         "ln_pre_t.weight": "cross.ln_text.weight", "ln_pre_t.bias": "cross.ln_text.bias",
         "ln_pre_i.weight": "cross.ln_image.weight", "ln_post.weight": "cross.ln_post.weight",
         "ln_post.bias": "cross.ln_post.bias", "classifier.weight": "classifier.weight",
         "classifier.bias": "classifier.bias", "mlm_head.fc.weight": "mlm_head.decoder.weight",
         "mlm_head.fc.bias": "mlm_head.decoder.bias",
         "base_model.visual.conv1.weight":
             "encoder.clip.vision_model.embeddings.patch_embedding.weight",
         "base_model.visual.ln_pre.bias": "encoder.clip.vision_model.pre_layrnorm.bias"}


def test_the_irra_group_rule_gives_the_authors_multipliers():
    from tbps.trainer.running.optim import lr_mult

    new = {n for n in NAMES.values() if not n.startswith("encoder.")}
    irra = load_config(None, ["optim.group_rule=irra"]).optim
    project = load_config(None, []).optim
    for theirs, ours in NAMES.items():
        assert lr_mult(ours, new, irra) == _irra_rule(theirs), theirs
    assert lr_mult("cross.cross.out.bias", new, project) == 5.0      # this project's rule
    assert lr_mult("cross.ln_text.weight", new, project) == 5.0
