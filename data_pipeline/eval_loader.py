"""The evaluation loader: text queries or gallery images of one rank, every sample once.

Samples are split over ranks and workers as in training, without shuffle, fill or augmentation
(ranks may differ by a batch; an undecodable image is left out, counted); `modality="text"`
never decodes images and `modality="image"` keeps one sample per image.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from tbps.data_pipeline.loader_config import LoaderConfig
from tbps.data_pipeline.loader_state import LoaderStats, init_worker, mp_context, worker_slot
from tbps.data_pipeline.manifest import SplitInfo, read_manifest, read_meta, split_info
from tbps.data_pipeline.partition import eval_share, reader_pieces
from tbps.data_pipeline.stages import (
    batch_samples,
    collate_batches,
    keep_only,
    parse_samples,
    tokenize_batches,
)
from tbps.data_pipeline.tar_reader import read_pieces


class EvalStream(IterableDataset):
    """One rank's share of an evaluation split, every sample once, in manifest order."""

    def __init__(self, root: Path, info: SplitInfo, tokenizer, cfg: LoaderConfig, rank: int,
                 world_size: int, modality: str, keep_indices: frozenset | None, stats):
        self.root, self.info, self.tokenizer, self.cfg = root, info, tokenizer, cfg
        self.rank, self.world_size, self.modality = rank, world_size, modality
        self.keep, self.stats = keep_indices, stats

    def __iter__(self):
        cfg = self.cfg
        worker, num_workers = worker_slot()
        start, stop = eval_share(self.info.num_samples, self.rank, self.world_size, worker,
                                 num_workers)
        images = self.modality == "image"
        every = cfg.warn_every
        return iter(wds.DataPipeline(
            partial(reader_pieces, self.info.shards, 0, None, start, stop),
            partial(read_pieces, root=self.root, stats=self.stats, every=every),
            partial(parse_samples, stats=self.stats, every=every, need_image=images),
            partial(keep_only, keep=self.keep),
            partial(batch_samples, batch_size=cfg.batch_size, partial=True),
            partial(collate_batches, size_HW=cfg.image_size if images else None,
                    stats=self.stats, every=every, repeat_bad=False),
            partial(tokenize_batches, tokenizer=self.tokenizer),
        ))


class EvalLoader:
    """Text queries (`modality="text"`) or gallery images (`"image"`) of one rank."""

    def __init__(self, shard_dir, tokenizer, cfg: LoaderConfig, *, split: str, modality: str,
                 rank: int = 0, world_size: int = 1):
        if modality not in ("text", "image"):
            raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
        self.root = Path(shard_dir)
        self.info = split_info(read_meta(self.root), split)
        keep = None
        if modality == "image":
            table = read_manifest(self.root, columns=["index", "image_id"], split=split)
            first = {}
            for idx, img in zip(table["index"].to_pylist(), table["image_id"].to_pylist()):
                first.setdefault(img, idx)
            keep = frozenset(first.values())
        self.num_samples = self.info.num_samples if keep is None else len(keep)
        ctx = mp_context()
        self.stats = LoaderStats(ctx)
        dataset = EvalStream(self.root, self.info, tokenizer, cfg, rank, world_size, modality,
                             keep, self.stats)
        workers = min(cfg.num_workers, max(1, self.info.num_samples // world_size))
        self._loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                                  pin_memory=cfg.pin,
                                  worker_init_fn=init_worker if workers > 0 else None,
                                  multiprocessing_context=ctx if workers > 0 else None)

    def __iter__(self):
        return iter(self._loader)
