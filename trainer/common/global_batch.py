"""The global batch a config names, dealt to ranks: `data.batch_size` is the number of training
pairs per optimizer step over all ranks (the batch a paper reports), whatever the launch."""
from __future__ import annotations


def micro_batch(cfg, world_size: int) -> int:
    """A rank's share of the global batch `cfg.data.batch_size` (each of optim.grad_accum
    micro-steps): ValueError when it is not whole or below 2."""
    batch, accum = cfg.data.batch_size, cfg.optim.grad_accum
    share, rest = divmod(batch, world_size * accum)
    if rest or share < 2:
        near = max(2, round(batch / (world_size * accum))) * world_size * accum
        raise ValueError(
            f"invalid config field 'data.batch_size': {batch} (the global batch) does not split "
            f"into whole micro-batches of at least 2 over {world_size} rank(s) x accumulation "
            f"{accum}; use a multiple of {world_size * accum} such as {near}")
    return share
