"""One seed from several integers (seed, epoch, rank, ...), the same on every machine."""
from __future__ import annotations

import numpy as np


def seed_of(*parts: int) -> int:
    """A 32-bit seed mixed from `parts` by numpy's SeedSequence; each part is taken as int()."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
