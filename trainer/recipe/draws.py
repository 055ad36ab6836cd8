"""Random draws keyed by sample rather than by rank: counter-based, on any device, no state.

The recipe's sampled parts (AWM's patch drop, AGM's word draw, TEM's replacements, ITM's hard
negatives) draw their noise from a hash of (training seed, epoch, step, stream, sample index,
position) instead of a generator: a sample gets the same draw whichever rank holds it and
however the batch is split, so a 2-rank step equals one process on the same global batch, and a
resumed run draws the same. The hash is SplitMix64's finaliser on int64 tensors (wrapping
multiplication, logical shifts emulated by masking), so CPU and GPU give the same bits.

    u = uniform(seed, index_B, L, stream=AWM)        # B x L in (0, 1)
    e = exponential(seed, index_B, L, stream=AWM)    # Exp(1)
"""
from __future__ import annotations

import torch

# one stream per use, so two parts never share draws
AWM, AGM, TEM_WORD, TEM_CAPTION, ITM_TEXT, ITM_IMAGE, MASK_KIND, MASK_WORD = range(1, 9)
AUGMENT_KIND, AUGMENT_WORD = 9, 10          # RDE's caption augmentation (caption_augment.py)
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_M1 = 0xBF58476D1CE4E5B9 - 2**64
_M2 = 0x94D049BB133111EB - 2**64


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on an int64 tensor (bijective)."""
    x = x + _GOLDEN
    x = (x ^ _lsr(x, 30)) * _M1
    x = (x ^ _lsr(x, 27)) * _M2
    return x ^ _lsr(x, 31)


def step_seed(*parts: int) -> int:
    """One int64 seed from integers (training seed, epoch, step, ...)."""
    h = torch.zeros((), dtype=torch.long)
    for p in parts:
        h = mix(h ^ int(p))
    return int(h)


def uniform(seed: int, index_B: torch.Tensor, L: int, *, stream: int) -> torch.Tensor:
    """B x L uniforms in (0, 1), float64, a function of (seed, stream, index_B[b], position)."""
    base = mix(torch.tensor(seed, dtype=torch.long, device=index_B.device) ^ stream)
    rows = mix(base ^ index_B.long())
    cols = torch.arange(L, device=index_B.device, dtype=torch.long)
    bits = mix(rows[:, None] + cols[None, :] * _GOLDEN)
    return (_lsr(bits, 11).double() + 0.5) * 2.0 ** -53


def exponential(seed: int, index_B: torch.Tensor, L: int, *, stream: int) -> torch.Tensor:
    """B x L draws of Exp(1), float32."""
    return (-torch.log(uniform(seed, index_B, L, stream=stream))).float()
