"""Which samples each rank and loader worker reads (stages 1-4 of the stream, in loader.py).

Every reader takes a range [start, stop) of the epoch's shard sequence, computed from the manifest
sizes alone, so all ranks and workers agree without talking to each other.
"""
from __future__ import annotations

import numpy as np

from tbps.data_pipeline.manifest import ShardInfo


def balanced_counts(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts differing by at most one, the larger ones first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def shuffled_shards(shards: tuple[ShardInfo, ...], seed: int, epoch: int | None
                    ) -> list[ShardInfo]:
    """The epoch's shard order; identical on every rank and worker. epoch None: no shuffle."""
    if epoch is None:
        return list(shards)
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order]


def ranges_of(shards: list[ShardInfo], start: int, stop: int) -> list[tuple[str, int, int]]:
    """Pieces (shard name, first, end) covering positions [start, stop) of the concatenation."""
    pieces, offset = [], 0
    for sh in shards:
        lo, hi = max(start, offset), min(stop, offset + sh.num_samples)
        if lo < hi:
            pieces.append((sh.name, lo - offset, hi - offset))
        offset += sh.num_samples
        if offset >= stop:
            break
    return pieces


def reader_pieces(shards: tuple[ShardInfo, ...], seed: int, epoch: int | None, start: int,
                  stop: int):
    """Stages 1-4 as one source: this reader's pieces of the epoch's shuffled shard sequence."""
    yield from ranges_of(shuffled_shards(shards, seed, epoch), start, stop)


def train_share(num_batches: int, batch_size: int, rank: int, worker: int, num_workers: int,
                start_batch: int) -> tuple[int, int, int, int]:
    """A training worker's (role, start, quota, done_batches).

    Rank r's range is the r-th run of num_batches batches; worker roles take batch-aligned
    sub-ranges of it. The role turns with start_batch, so a resumed epoch keeps the batch order;
    done_batches of the role's batches were trained on before the resume.
    """
    role = (worker + start_batch) % num_workers
    per_worker = balanced_counts(num_batches, num_workers)
    quota = per_worker[role] * batch_size
    start = (rank * num_batches + sum(per_worker[:role])) * batch_size
    done_batches = start_batch // num_workers + (1 if role < start_batch % num_workers else 0)
    return role, start, quota, done_batches


def eval_share(num_samples: int, rank: int, world_size: int, worker: int, num_workers: int
               ) -> tuple[int, int]:
    """An evaluation worker's [start, stop): every sample in exactly one worker of one rank."""
    per_rank = balanced_counts(num_samples, world_size)
    per_worker = balanced_counts(per_rank[rank], num_workers)
    start = sum(per_rank[:rank]) + sum(per_worker[:worker])
    return start, start + per_worker[worker]
