"""Noisy-correspondence injection, the RDE protocol (METHODS.md, "Noise injection").

A random subset C of floor(rate * N) training pairs has its captions permuted among themselves;
every image keeps its own pid. The subset is a prefix of one seeded permutation of 0..N-1, so for
one seed the noisy sets are nested across rates (20 % inside 50 % inside 80 %). Within C the
captions move along one cycle (pair C[k] takes the caption of C[k+1]), a permutation without fixed
points: exactly floor(rate * N) pairs end up with another pair's caption, where a random
permutation would leave a few in place.

Each record keeps the source pair's index (`caption_src`) and pid (`caption_pid`) and a `noisy`
flag, for diagnostics only: training never reads them.
"""
from __future__ import annotations

import numpy as np

from tbps.data_pipeline.schema import Record


def noise_source(n: int, rate: float, seed: int) -> np.ndarray:
    """src[i] = index of the pair whose caption pair i receives (src[i] == i when clean)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    num_noisy = int(np.floor(rate * n))
    if num_noisy == 1:
        raise ValueError(f"noise rate {rate} of {n} pairs selects one pair, which cannot swap "
                         "captions with itself; use a larger rate")
    order = np.random.default_rng(seed).permutation(n)
    chosen = order[:num_noisy]
    src = np.arange(n)
    src[chosen] = np.roll(chosen, -1)
    return src


def apply_noise(records: list[Record], rate: float, seed: int) -> list[Record]:
    """Records of one split with the protocol applied; records must be in index order."""
    if [r.index for r in records] != list(range(len(records))):
        raise ValueError("records must be numbered 0..n-1 in order")
    src = noise_source(len(records), rate, seed)
    out = []
    for rec, s in zip(records, src):
        if s == rec.index:
            out.append(rec)
        else:
            donor = records[s]
            out.append(rec.replace(caption=donor.caption, noisy=True, caption_src=int(s),
                                   caption_pid=donor.pid))
    return out
