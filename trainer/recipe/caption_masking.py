"""Caption masking (IRRA's random MLM mask, AGA's AGM) and AGA's text enrichment (TEM).

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

`mask_captions` is the recipe's masking part (config recipe.caption_mask); `enrich` is TEM
(recipe.enrich), run on the momentum model: the captions rewritten at the masked words by its
MLM's prediction.
"""
from __future__ import annotations

import functools
import math

import torch

from tbps.kernels.topk_select import topk_select
from tbps.trainer.model.encoder import word_positions
from tbps.trainer.recipe import draws


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


def mask_captions(cm, txt, *, generator: torch.Generator, keys, mask_id: int, vocab_size: int,
                  special_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's caption mask (cm: config CaptionMaskConfig) of the online text features:
    (masked ids, labels). random: IRRA's, from the rank's step generator; uniform and attention
    (AGM): k words drawn by keyed draws (trainer/recipe/draws.py), AGM weighting them by the
    layer-aggregated EOS attention."""
    ids = txt.input_ids_BL
    opts = dict(mask_id=mask_id, vocab_size=vocab_size, special_ids=special_ids)
    if cm.kind == "random":
        return random_mlm_mask(ids, txt.eos_B, prob=cm.ratio, generator=generator, **opts)
    score = aggregate_layers(txt.attn_rows_BlL, cm.beta) if cm.kind == "attention" else None
    L = ids.shape[1]
    noise = draws.exponential(*keys, L, stream=draws.AGM)
    uniforms = (draws.uniform(*keys, L, stream=draws.MASK_KIND),
                draws.uniform(*keys, L, stream=draws.MASK_WORD))
    return sampled_mlm_mask(ids, txt.eos_B, score, ratio=cm.ratio, noise_BL=noise,
                            uniforms=uniforms, **opts)


def aggregate_layers(rows_BlL: torch.Tensor, beta: float) -> torch.Tensor:
    """AGM's layer aggregation: a_bar^1 = a^1, a_bar^l = beta a_bar^(l-1) + (1 - beta) a^l."""
    agg = rows_BlL[:, 0]
    for layer in range(1, rows_BlL.shape[1]):
        agg = beta * agg + (1.0 - beta) * rows_BlL[:, layer]
    return agg


def mlm_logits(model, masked_ids_BL: torch.Tensor, image_tokens_BTE: torch.Tensor) -> torch.Tensor:
    """The MLM head's logits at every position of the masked captions, attending to the image
    tokens through the cross-modal encoder (the mlm term and TEM)."""
    mtxt = model.encoder.encode_text(masked_ids_BL, rows="none", length=masked_ids_BL.shape[1])
    return model.mlm_head(model.cross_tokens(mtxt.tokens_BLE, mtxt.eos_B, image_tokens_BTE))


def enrich(model, ec, ids_BL, masked_ids_BL, labels_BL, image_tokens_BTE, keys, special_ids
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """TEM on the momentum model (ec: config EnrichConfig): the MLM's word at each masked
    position (argmax, or sampled by inverse CDF with one keyed uniform a word); each caption
    replaced by its enriched version with probability ec.prob. Returns (ids, replaced_B)."""
    seed, index = keys
    logits = mlm_logits(model, masked_ids_BL, image_tokens_BTE).float()
    logits[..., list(special_ids)] = float("-inf")             # never a special token
    if ec.kind == "sample":
        u = draws.uniform(seed, index, ids_BL.shape[1], stream=draws.TEM_WORD).float()
        cdf = logits.softmax(-1).cumsum(-1)
        pred = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None]).squeeze(-1)
        pred = pred.clamp(max=logits.shape[-1] - 1)
    else:
        pred = logits.argmax(-1)
    enriched = torch.where(labels_BL != -100, pred, ids_BL)
    use_B = draws.uniform(seed, index, 1, stream=draws.TEM_CAPTION)[:, 0] < ec.prob
    return torch.where(use_B[:, None], enriched, ids_BL), use_B
