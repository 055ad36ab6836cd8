"""Image-token selection: which patches the online image encoder sees (AMNS's AWM, its ablation).

Config recipe.image_tokens: all | random | attention (AWM). floor(ratio x N) patches are dropped,
drawn without replacement with probability proportional to a weight: 1 (random) or 1 - the
min-max normalised patch score of the momentum image encoder (AWM: the best-scored patch is
never dropped). The score is the cosine of each projected patch token with the paired caption's
embedding ("text") or the last layer's CLS attention row ("cls"). The draw is the exponential
race: the top n_drop of weight / E, E ~ Exp(1) keyed by sample (trainer/recipe/draws.py),
through tbps.kernels.topk_select.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tbps.kernels.topk_select import topk_select
from tbps.trainer.recipe import draws


def patch_scores(score: str, img, caption_embeds_BE: torch.Tensor) -> torch.Tensor:
    """AWM's score of every patch (recipe.image_tokens.score: text | cls) from the momentum
    model's image features (with the last layer's CLS row for "cls")."""
    if score == "cls":
        return img.attn_BK
    return F.cosine_similarity(img.tokens_BTE[:, 1:].float(), caption_embeds_BE.float()[:, None],
                               dim=-1)


def keep_patches(it, num_patches: int, scores_BN: torch.Tensor | None, keys
                 ) -> torch.Tensor | None:
    """Indices (B x K, ascending) of the patches the online encoder sees; None: all."""
    if it.kind == "all":
        return None
    seed, index = keys
    n_drop = math.floor(it.ratio * num_patches)
    if it.kind == "random":
        weights = torch.ones(index.shape[0], num_patches, device=index.device)
    else:
        weights = awm_weights(scores_BN)
    return drop_patches(weights, n_drop, seed, index)


def drop_patches(weights_BN: torch.Tensor, n_drop: int, seed: int, index_B: torch.Tensor
                 ) -> torch.Tensor:
    """Kept patch indices (B x (N - n_drop), ascending) after dropping n_drop patches drawn
    without replacement with probability proportional to weights_BN."""
    N = weights_BN.shape[1]
    noise = draws.exponential(seed, index_B, N, stream=draws.AWM)
    drop = topk_select(weights_BN / noise, weights_BN > 0, n_drop)
    return kept_indices(drop.indices_Bk, drop.valid_Bk, N)


def awm_weights(scores_BN: torch.Tensor) -> torch.Tensor:
    """AWM's drop weight of each patch: 1 - its min-max normalised score (per image)."""
    s = scores_BN.float()
    lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)
    return 1.0 - (s - lo) / (hi - lo).clamp(min=1e-12)


def kept_indices(drop_Bk: torch.Tensor, drop_valid_Bk: torch.Tensor, N: int) -> torch.Tensor:
    """Ascending indices of the N - k patches not dropped (no host sync: a sort, not nonzero)."""
    dropped = torch.zeros(drop_Bk.shape[0], N, dtype=torch.long, device=drop_Bk.device)
    dropped.scatter_add_(1, drop_Bk, drop_valid_Bk.long())
    order = torch.arange(N, device=drop_Bk.device)[None] + N * (dropped > 0).long()
    return order.sort(dim=1).values[:, : N - drop_Bk.shape[1]]
