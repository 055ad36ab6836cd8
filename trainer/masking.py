"""Masked-language-modelling inputs: which word tokens to hide and what to put there.

Word tokens are the positions strictly between the start token and each caption's EOS. A chosen
position becomes the mask token (80 %), a random word token (10 %) or stays (10 %); its label is
the original id, every other label is -100 (ignored). Every caption gets at least one. Draws come
from the generator passed in (seeded per step by the trainer), so a resumed run masks the same
tokens.
"""
from __future__ import annotations

import torch


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
    if bool(empty.any()):
        best = torch.where(words, u, -1.0).argmax(dim=1)
        chosen[empty, best[empty]] = True
    return apply_mask(ids_BL, chosen, mask_id=mask_id, vocab_size=vocab_size,
                      special_ids=special_ids, generator=generator)


def apply_mask(ids_BL, chosen_BL, *, mask_id: int, vocab_size: int, special_ids,
               generator: torch.Generator):
    """80/10/10 replacement of the chosen positions; returns (masked ids, labels)."""
    r = torch.rand(ids_BL.shape, generator=generator).to(ids_BL.device)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[list(special_ids)] = False
    words = allowed.nonzero().squeeze(1)
    rand_ids = words[torch.randint(len(words), ids_BL.shape, generator=generator)].to(ids_BL.device)
    masked = ids_BL.clone()
    masked[chosen_BL & (r < 0.8)] = mask_id
    swap = chosen_BL & (r >= 0.8) & (r < 0.9)
    masked[swap] = rand_ids[swap]
    labels = torch.where(chosen_BL, ids_BL, torch.full_like(ids_BL, -100))
    return masked, labels
