"""What a loader shares with its worker processes: epoch, counters, start method, worker setup."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os

from torch.utils.data import get_worker_info

log = logging.getLogger("tbps.data_pipeline.loader")   # the loader's messages, wherever raised


class SharedEpoch:
    """Epoch and resume position, readable by persistent workers."""

    def __init__(self, ctx):
        self._epoch = ctx.Value("q", 0)
        self._start_batch = ctx.Value("q", 0)

    def set(self, epoch: int, start_batch: int = 0) -> None:
        self._epoch.value, self._start_batch.value = epoch, start_batch

    def get(self) -> tuple[int, int]:
        return self._epoch.value, self._start_batch.value


class LoaderStats:
    """Counters of skipped and padded samples, summed over a rank's workers."""

    KINDS = ("corrupt_shard", "bad_sample", "bad_image", "padded")

    def __init__(self, ctx):
        self._values = {k: ctx.Value("q", 0) for k in self.KINDS}

    def add(self, kind: str, n: int = 1) -> int:
        v = self._values[kind]
        with v.get_lock():
            v.value += n
            return v.value

    def snapshot(self) -> dict[str, int]:
        return {k: v.value for k, v in self._values.items()}


def warn(stats: LoaderStats, kind: str, every: int, message: str) -> None:
    """Counts one bad item of `kind`; logs the first and then every `every`-th."""
    total = stats.add(kind)
    if total == 1 or total % every == 0:
        log.warning("data: %s (%d %s so far)", message, total, kind.replace("_", " "))


def worker_slot() -> tuple[int, int]:
    """(this loader worker's id, the number of workers); (0, 1) in the training process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def init_worker(_worker_id: int) -> None:
    # each worker tokenizes on one thread: the workers are the parallelism (and a tokenizer
    # thread pool per worker would oversubscribe the cores)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def mp_context():
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
