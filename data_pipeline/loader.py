"""The streaming loader: webdataset stages from shards to batches, exact per-epoch counts.

    from tbps.data_pipeline.loader import LoaderConfig, TrainLoader, EvalLoader
    loader = TrainLoader("shards/synth", tokenizer, LoaderConfig(batch_size=64, image_size=(96, 32)),
                         rank=rank, world_size=world)
    for batch in loader.epoch(epoch):          # exactly loader.num_batches batches on every rank
        batch["image"], batch["input_ids"], batch["pid"], batch["index"]

The training stream of one loader worker is this explicit list of stages (one webdataset
DataPipeline):

  1. shard list      the split's shards, from the manifest (sizes included, no tar scan)
  2. shard shuffle   seeded by seed + epoch, BEFORE any split, so every epoch deals the shards
                     out differently; all ranks compute the same order
  3. node split      rank r takes the r-th equal range of the shuffled sample sequence
  4. worker split    worker w takes a batch-aligned sub-range of its rank's range
  5. tar reader      reads just that range (a shard may be shared by two neighbouring readers);
                     a corrupt or truncated tar ends its piece, counted, with a rate-limited warning
  6. parse           the json member; a sample without image, caption or ids is skipped, counted
  7. fill            tops the worker up to its exact quota by repeating its own samples when
                     anything was skipped (counted as padded), so ranks never disagree on counts
  8. sample shuffle  buffer seeded by (seed, epoch, rank, worker); it holds the compressed
                     samples (a sixth of the memory of decoded ones at 384x128)
  9. resume skip     drops the samples of batches already trained on (mid-epoch resume), before
                     anything is decoded
 10. augment         draws flip, crop offset and erasing box from a generator seeded by
                     (seed, epoch, sample index): independent of worker layout and position
 11. batch           groups of batch_size samples
 12. decode          each JPEG decoded into one reused buffer (resized if the shard holds another
                     size), then copied into its slot of the batch's uint8 B x H x W x 3 tensor,
                     flipped and cropped on the way (a shifted slice, zeros around); the tensor
                     lives in shared memory in a worker, so the hand-over copies nothing. An
                     undecodable image is counted and replaced by a repeat of another sample of
                     its batch (counted as padded)
 13. tokenize        the batch's captions in one call of the fast tokenizer -> B x 77 ids
The images stay uint8 with their erase boxes: `transforms.prepare_batch` normalises and erases
them on the training device. With `pin_memory` the DataLoader copies each batch into page-locked
memory, so that `prepare_batch(batch, "cuda")` (non_blocking) overlaps the copy with compute.

Splitting ranges of samples rather than whole shards gives every rank exactly
num_batches = floor(N / (batch * world)) batches, and every sample at most once per epoch (all
of them when N is a multiple of batch x world); the few left over change every epoch. A split with
fewer shards than ranks x workers is refused at start: re-shard smaller or use fewer workers.

The epoch (and the resume position) reach persistent workers through shared memory
(`SharedEpoch`), set before each epoch's iterator is created. Counts of skipped and padded
samples live in shared counters (`LoaderStats`) that the trainer logs.

Where the parts live: stages 1-4 in `partition`, 5 in `tar_reader`, 6-13 in `stages`; the
config in `loader_config`, the shared state in `loader_state`; evaluation streams (every sample
once, no shuffle, fill or augmentation) in `eval_loader`. This module holds the training stream.
"""
from __future__ import annotations

import logging
import random
from functools import partial
from pathlib import Path

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from tbps.data_pipeline.eval_loader import EvalLoader, EvalStream
from tbps.data_pipeline.loader_config import LoaderConfig
from tbps.data_pipeline.loader_state import LoaderStats, SharedEpoch, init_worker, worker_slot
from tbps.data_pipeline.loader_state import mp_context as _mp_context
from tbps.data_pipeline.manifest import SplitInfo, read_meta, split_info
from tbps.data_pipeline.partition import balanced_counts, ranges_of, reader_pieces, train_share
from tbps.data_pipeline.seeds import seed_of
from tbps.data_pipeline.stages import (
    augment_samples,
    batch_samples,
    collate_batches,
    decode_image,
    fill_to_quota,
    parse_samples,
    skip_samples,
    tokenize_batches,
)
from tbps.data_pipeline.tar_reader import _read_range, _read_range_tarfile, read_pieces

# The names other code imports from here: the trainer, the inference code and the tests (the
# tests also the last three, private ones).
__all__ = ["EvalLoader", "EvalStream", "LoaderConfig", "LoaderStats", "SharedEpoch", "TrainLoader",
           "TrainStream", "balanced_counts", "decode_image", "ranges_of", "read_pieces",
           "_mp_context", "_read_range", "_read_range_tarfile"]

log = logging.getLogger(__name__)


class TrainStream(IterableDataset):
    """One rank's training stream; each worker yields its exact share of the epoch's batches."""

    def __init__(self, root: Path, info: SplitInfo, tokenizer, cfg: LoaderConfig, rank: int,
                 world_size: int, shared: SharedEpoch, stats: LoaderStats):
        self.root, self.info, self.tokenizer, self.cfg = root, info, tokenizer, cfg
        self.rank, self.world_size, self.shared, self.stats = rank, world_size, shared, stats
        self.num_batches = info.num_samples // (cfg.batch_size * world_size)

    def __iter__(self):
        cfg, B = self.cfg, self.cfg.batch_size
        worker, num_workers = worker_slot()
        epoch, start_batch = self.shared.get()
        role, start, quota, done_batches = train_share(self.num_batches, B, self.rank, worker,
                                                       num_workers, start_batch)
        shuffle_rng = random.Random(seed_of(cfg.seed, epoch, self.rank, role))
        every = cfg.warn_every
        return iter(wds.DataPipeline(
            partial(reader_pieces, self.info.shards, cfg.seed, epoch, start, start + quota),
            partial(read_pieces, root=self.root, stats=self.stats, every=every),
            partial(parse_samples, stats=self.stats, every=every),
            partial(fill_to_quota, quota=quota, stats=self.stats),
            wds.filters.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=shuffle_rng),
            partial(skip_samples, n=done_batches * B),
            partial(augment_samples, augment=cfg.augment, size_HW=cfg.image_size, seed=cfg.seed,
                    epoch=epoch),
            partial(batch_samples, batch_size=B),
            partial(collate_batches, size_HW=cfg.image_size, stats=self.stats, every=every),
            partial(tokenize_batches, tokenizer=self.tokenizer),
        ))


class TrainLoader:
    """Training batches of one rank: `for batch in loader.epoch(e, start_batch)`."""

    def __init__(self, shard_dir, tokenizer, cfg: LoaderConfig, *, rank: int = 0,
                 world_size: int = 1, split: str = "train"):
        self.root = Path(shard_dir)
        self.meta = read_meta(self.root)
        info = split_info(self.meta, split)
        readers = world_size * max(1, cfg.num_workers)
        if info.num_shards < readers:
            raise ValueError(
                f"{info.num_shards} {split} shards for {world_size} rank(s) x "
                f"{max(1, cfg.num_workers)} loader worker(s) = {readers} readers; each reader "
                f"needs a shard of its own. Re-shard with a smaller --shard-size (at most "
                f"{max(1, info.num_samples // readers)}) or use fewer loader workers.")
        if info.num_samples < cfg.batch_size * world_size:
            raise ValueError(f"{split} has {info.num_samples} samples, fewer than one batch of "
                             f"{cfg.batch_size} on each of {world_size} rank(s); lower the batch "
                             "size")
        ctx = _mp_context()
        if cfg.pin_memory is None:
            log.info("data: pin_memory=%s (automatic: CUDA %s)", cfg.pin,
                     "available" if cfg.pin else "not available")
        self.shared, self.stats = SharedEpoch(ctx), LoaderStats(ctx)
        self.dataset = TrainStream(self.root, info, tokenizer, cfg, rank, world_size,
                                   self.shared, self.stats)
        self.num_batches = self.dataset.num_batches
        self.num_workers = min(cfg.num_workers, self.num_batches)
        self._loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=cfg.pin,
            worker_init_fn=init_worker if self.num_workers > 0 else None,
            multiprocessing_context=ctx if self.num_workers > 0 else None)

    def epoch(self, epoch: int, start_batch: int = 0):
        """Yields batches start_batch..num_batches-1 of `epoch`; fails loudly on a short epoch."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.num_batches}")
        self.shared.set(epoch, start_batch)
        n = start_batch
        if start_batch < self.num_batches:
            for batch in self._loader:
                yield batch
                n += 1
        if n != self.num_batches:
            raise RuntimeError(f"epoch {epoch}: the loader gave {n} batches, expected "
                               f"{self.num_batches}")
