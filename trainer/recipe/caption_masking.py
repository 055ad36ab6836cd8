"""Masked-language-modelling inputs: which word tokens to hide and what to put there.

Word tokens are the positions strictly between the start token and each caption's EOS. Which
ones are hidden:
- `random_mlm_mask` (IRRA): each word independently with probability `prob`, at least one;
- `sampled_mlm_mask`: k = ceil(ratio x words) words drawn without replacement with probability
  proportional to a score (AGA's AGM: the layer-aggregated EOS attention), or uniformly (its
  ablation), through `tbps.kernels.topk_select`'s sampled variant.
A chosen position becomes the mask token (80 %), a random word token (10 %) or stays (10 %); its
label is the original id, every other label is -100 (ignored). Draws come from the generators
passed in (seeded per step by the trainer), so a resumed run masks the same tokens. No step here
reads a value back to the host.
"""
from __future__ import annotations

import functools
import math

import torch

from tbps.kernels.topk_select import topk_select


def word_positions(ids_BL: torch.Tensor, eos_B: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids_BL.shape[1], device=ids_BL.device)[None]
    return (pos >= 1) & (pos < eos_B[:, None])


def random_mlm_mask(ids_BL, eos_B, *, prob: float, mask_id: int, vocab_size: int,
                    special_ids, generator: torch.Generator):
    """IRRA's masking: each word token chosen independently with probability `prob`."""
    words = word_positions(ids_BL, eos_B)
    u = torch.rand(ids_BL.shape, generator=generator).to(ids_BL.device)
    chosen = (u < prob) & words
    # captions where nothing was drawn: take their highest-u word (uniform among words)
    empty = ~chosen.any(dim=1) & words.any(dim=1)
    best = torch.where(words, u, -1.0).argmax(dim=1)
    pos = torch.arange(ids_BL.shape[1], device=ids_BL.device)[None]
    chosen = chosen | (empty[:, None] & (pos == best[:, None]))
    return apply_mask(ids_BL, chosen, mask_id=mask_id, vocab_size=vocab_size,
                      special_ids=special_ids, generator=generator)


def sampled_mlm_mask(ids_BL, eos_B, score_BL, *, ratio: float, mask_id: int, vocab_size: int,
                     special_ids, noise_BL: torch.Tensor,
                     uniforms: tuple[torch.Tensor, torch.Tensor] | None = None,
                     generator: torch.Generator | None = None):
    """k = ceil(ratio x n) of a caption's n words, drawn without replacement with probability
    proportional to score_BL renormalised over the words (None: uniformly); then 80/10/10
    (drawn from `uniforms`, else from `generator`; see apply_mask).

    The draw is the exponential race: the top k_max of weight / E with noise_BL the E ~ Exp(1),
    through `tbps.kernels.topk_select`, for the longest possible caption (k_max from the batch's
    length, known without a sync); each caption keeps its first k of those, in race order,
    which is a draw of k without replacement."""
    words = word_positions(ids_BL, eos_B)
    n_B = words.sum(dim=1)
    if score_BL is None:
        weights = words.float()
    else:
        weights = torch.where(words, score_BL.float(), 0.0)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-30)
    k_B = torch.ceil(n_B.double() * ratio - 1e-9).long().clamp(min=1)
    k_max = max(1, math.ceil(ratio * max(ids_BL.shape[1] - 2, 1) - 1e-9))
    sel = topk_select(weights / noise_BL.to(weights.device), words & (weights > 0),
                      min(k_max, ids_BL.shape[1]))
    slot = torch.arange(sel.indices_Bk.shape[1], device=ids_BL.device)[None]
    take = sel.valid_Bk & (slot < k_B[:, None])
    chosen = torch.zeros_like(ids_BL).scatter_add_(1, sel.indices_Bk, take.long()) > 0
    return apply_mask(ids_BL, chosen, mask_id=mask_id, vocab_size=vocab_size,
                      special_ids=special_ids, generator=generator, uniforms=uniforms)


def apply_mask(ids_BL, chosen_BL, *, mask_id: int, vocab_size: int, special_ids,
               generator: torch.Generator | None = None,
               uniforms: tuple[torch.Tensor, torch.Tensor] | None = None):
    """80/10/10 replacement of the chosen positions; returns (masked ids, labels). The draws
    (which of the three, which random word) come from `generator`, or from two B x L uniforms
    given in `uniforms` (keyed draws, trainer/recipe/draws.py)."""
    words = _word_ids(vocab_size, tuple(special_ids))
    if uniforms is None:
        r = torch.rand(ids_BL.shape, generator=generator).to(ids_BL.device)
        pick = torch.randint(len(words), ids_BL.shape, generator=generator)
    else:
        r = uniforms[0].to(ids_BL.device)
        pick = (uniforms[1] * len(words)).long().clamp(max=len(words) - 1).cpu()
    rand_ids = words[pick].to(ids_BL.device)
    masked = torch.where(chosen_BL & (r < 0.8), mask_id, ids_BL)
    swap = chosen_BL & (r >= 0.8) & (r < 0.9)
    masked = torch.where(swap, rand_ids, masked)
    labels = torch.where(chosen_BL, ids_BL, torch.full_like(ids_BL, -100))
    return masked, labels


@functools.lru_cache(maxsize=8)
def _word_ids(vocab_size: int, special_ids: tuple[int, ...]) -> torch.Tensor:
    """Ids a random replacement may take: every id but the special tokens (CPU)."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[list(special_ids)] = False
    return allowed.nonzero().squeeze(1)
