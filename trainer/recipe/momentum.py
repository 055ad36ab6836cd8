"""The momentum model's part of a step: what the parts ask of the EMA copy, and its forward.

Parts that need it (config RecipeConfig.momentum_parts, the one place that decides): AWM's patch
scores, TEM's enriched captions, itc's distillation targets. `momentum_modules` says which
modules of the model the EMA copies (trainer/running/ema.py builds it, pruned to those); the
step runs `momentum_forward` on that copy through its forward, so ZeRO-3 gathers its layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tbps.trainer.common.config import Config
from tbps.trainer.recipe.caption_masking import enrich
from tbps.trainer.recipe.token_selection import patch_scores

IMAGE_ENCODER = ("encoder.clip.vision_model", "encoder.clip.visual_projection")


@dataclass
class MomentumRequest:
    """What the online step hands the momentum model."""

    image: torch.Tensor
    input_ids_BL: torch.Tensor                 # the captions, cut as the online encoder cut them
    caption_embeds_BE: torch.Tensor            # online caption embeddings (AWM's text score)
    masked_ids_BL: torch.Tensor | None         # the caption mask (TEM)
    mlm_labels_BL: torch.Tensor | None
    keys: tuple                                # (step seed, sample index) for keyed draws


@dataclass
class Momentum:
    """What the momentum model's forward returns (no gradient)."""

    image_tokens_BTE: torch.Tensor | None = None     # projected tokens of the full image
    patch_scores_BN: torch.Tensor | None = None      # AWM's score of every patch
    caption_ids_BL: torch.Tensor | None = None       # captions after enrichment (TEM)
    enriched_B: torch.Tensor | None = None           # which captions were replaced
    embeds: dict = field(default_factory=dict)       # branch -> (image_BE, text_BE)


def momentum_modules(cfg: Config) -> tuple[str, ...]:
    """Module paths of the model that the recipe's parts need a momentum copy of."""
    rc, paths = cfg.recipe, []
    if rc.image_tokens.kind == "attention":
        paths += IMAGE_ENCODER
    for term in rc.losses:
        if term.needs_momentum():
            paths.append("encoder")
            if "tse" in term.branches_or_default():
                paths += ["tse_image", "tse_text"]
    if rc.enrich.kind != "none":
        paths += ["encoder", "cross", "mlm_head"]
    return tuple(dict.fromkeys(paths))


@torch.no_grad()
def momentum_forward(model, rc, request: MomentumRequest, special_ids) -> Momentum:
    """An entry point (model(momentum_forward, ...)) of the momentum copy: rc is the config's
    RecipeConfig."""
    out, enc = Momentum(), model.encoder
    awm = rc.image_tokens.kind == "attention"
    tem = rc.enrich.kind != "none"
    distil = [t for t in rc.losses if t.needs_momentum()]
    tse = any("tse" in t.branches_or_default() for t in distil)
    img = None
    if awm or tem or distil:
        cls_rows = awm and rc.image_tokens.score == "cls"
        img = enc.encode_image(request.image, rows="last" if (cls_rows or tse) else "none")
        out.image_tokens_BTE = img.tokens_BTE
    if awm:
        out.patch_scores_BN = patch_scores(rc.image_tokens.score, img, request.caption_embeds_BE)
    ids = request.input_ids_BL
    if tem:
        ids, out.enriched_B = enrich(model, rc.enrich, ids, request.masked_ids_BL,
                                     request.mlm_labels_BL, img.tokens_BTE, request.keys,
                                     special_ids)
        out.caption_ids_BL = ids
    if distil:
        txt = enc.encode_text(ids, rows="last" if tse else "none", length=ids.shape[1])
        out.embeds["bge"] = (img.embeds_BE, txt.embeds_BE)
        if tse:
            out.embeds["tse"] = model.tse(img, txt)
    return out
