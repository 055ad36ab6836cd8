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

Evaluation streams (`EvalLoader`) split the samples the same way without shuffle, fill or
augmentation, so every sample is yielded exactly once across all ranks (ranks may differ by a
batch; an undecodable image is left out, counted); `modality="text"` never decodes images and
`modality="image"` keeps one sample per image.
"""
from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing as mp
import os
import random
import tarfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tbps.data_pipeline.manifest import ShardInfo, SplitInfo, read_manifest, read_meta, split_info
from tbps.data_pipeline.schema import IMAGE_EXTS, REQUIRED_SAMPLE_FIELDS
from tbps.data_pipeline.transforms import IDENTITY, TrainAugment, place_image

try:                                   # libjpeg-turbo straight to numpy: about 2x PIL's speed
    import simplejpeg
except ImportError:                    # pragma: no cover - PIL decodes everything too
    simplejpeg = None

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """How batches are made (the shards say what is in them)."""

    batch_size: int
    """Samples per batch on each rank."""
    image_size: tuple[int, int] = (384, 128)
    """(height, width) of the images the model sees; shards of another size are resized."""
    num_workers: int = 2
    """Loader worker processes per rank (0: load in the training process)."""
    shuffle_buffer: int = 500
    """Samples held by each worker's shuffle buffer."""
    seed: int = 0
    """Seed of shard order, sample shuffle and augmentation (combined with the epoch)."""
    augment: TrainAugment | None = TrainAugment()
    """Training augmentations (flip, pad-and-crop, random erasing); None: normalise only."""
    warn_every: int = 100
    """Warn on the first bad sample of a kind and then every this many."""
    pin_memory: bool | None = None
    """Hand batches over in page-locked memory (faster, asynchronous host-to-GPU copies). Set it
    to whether the training device is a GPU; None: pin when CUDA is available."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise ValueError(f"image_size must be (height, width) >= 8, got {self.image_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")

    @property
    def pin(self) -> bool:
        return torch.cuda.is_available() if self.pin_memory is None else bool(self.pin_memory)


# -- shared state between the training process and its loader workers -------------------------


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


def _warn(stats: LoaderStats, kind: str, every: int, message: str) -> None:
    total = stats.add(kind)
    if total == 1 or total % every == 0:
        log.warning("data: %s (%d %s so far)", message, total, kind.replace("_", " "))


# -- stages 1-4: which samples this reader takes ------------------------------------------------


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
    """Stages 1-4 as one source: this reader's pieces of the epoch's shuffled shard sequence.

    [start, stop) is the reader's range: the node split (rank r's equal range) and the worker
    split (a batch-aligned sub-range of it) are computed by the caller from the manifest sizes.
    """
    yield from ranges_of(shuffled_shards(shards, seed, epoch), start, stop)


def balanced_counts(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- stages 5-13 -----------------------------------------------------------------------------------


def read_pieces(pieces, root: Path, stats: LoaderStats, every: int):
    """Tar reader: samples (dicts of member bytes keyed by extension) of each piece's range."""
    for name, first, end in pieces:
        try:
            yield from _read_range(root / name, first, end)
        except (tarfile.TarError, OSError, EOFError) as exc:
            _warn(stats, "corrupt_shard", every, f"{name}: unreadable from some point ({exc})")


def _read_range(path: Path, first: int, end: int):
    """Samples at positions [first, end) of one tar; the tar format is read here (4x faster than
    tarfile), leaving tars with extended headers (pax, GNU long names) to `_read_range_tarfile`."""
    group, key, position = None, None, -1
    try:
        with open(path, "rb") as fh:
            size_of_file = os.fstat(fh.fileno()).st_size
            for name, size, regular in _ustar_members(fh):
                k, _, ext = name.partition(".")
                if regular and k != key:
                    if group is not None:
                        yield group
                        group = None
                    key, position = k, position + 1
                    if position >= end:
                        return
                    if position >= first:
                        group = {"__key__": k, "__url__": str(path)}
                if group is not None and regular:
                    data = fh.read(size)
                    if len(data) != size:
                        raise tarfile.ReadError(f"unexpected end of data in {name}")
                    group[ext.lower()] = data
                    fh.seek(-size % 512, os.SEEK_CUR)
                else:
                    if fh.tell() + size > size_of_file:
                        raise tarfile.ReadError(f"unexpected end of data in {name}")
                    fh.seek(size + -size % 512, os.SEEK_CUR)
    except _ExtendedHeader:
        # position: the sample being read, or the next one; tarfile starts over from there
        resume = position if group is not None else position + 1
        yield from _read_range_tarfile(path, max(first, resume), end)
        return
    if group is not None:
        yield group


class _ExtendedHeader(Exception):
    pass


def _ustar_members(fh):
    """(name, size, is regular file) of each member; the file position is at its data."""
    while True:
        header = fh.read(512)
        if len(header) < 512 or header == _EMPTY_BLOCK:
            if 0 < len(header) < 512:
                raise tarfile.ReadError("unexpected end of data in a header")
            return
        kind = header[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            raise _ExtendedHeader
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            checksum = int(header[148:156].split(b"\0", 1)[0].strip(), 8)
        except ValueError:
            raise _ExtendedHeader from None    # base-256 numbers, or not a tar: tarfile decides
        if checksum != sum(header) - sum(header[148:156]) + 256:
            raise tarfile.ReadError("bad checksum in a tar header")
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        yield name, size, kind in (b"0", b"\0", b"7")


_EMPTY_BLOCK = bytes(512)


def _read_range_tarfile(path: Path, first: int, end: int):
    group, key, position = None, None, -1
    with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            k, _, ext = member.name.partition(".")
            if k != key:
                if group is not None:
                    yield group
                    group = None
                key, position = k, position + 1
                if position >= end:
                    return
                if position >= first:
                    group = {"__key__": k, "__url__": str(path)}
            if group is not None:
                group[ext.lower()] = tar.extractfile(member).read()
    if group is not None:
        yield group


def parse_samples(samples, stats: LoaderStats, every: int, need_image: bool = True):
    """json member -> fields; drops (and counts) samples missing a member or a field."""
    for s in samples:
        image_ext = next((e for e in IMAGE_EXTS if e in s), None)
        try:
            meta = json.loads(s["json"])
            missing = [f for f in REQUIRED_SAMPLE_FIELDS if f not in meta]
            if missing or (need_image and image_ext is None):
                raise ValueError(f"missing {missing or 'image'}")
            if not isinstance(meta["caption"], str) or not meta["caption"].strip():
                raise ValueError("empty caption")
            out = {"key": s["__key__"], "caption": meta["caption"], "pid": int(meta["pid"]),
                   "index": int(meta["index"]), "image_id": int(meta["image_id"]),
                   "noisy": bool(meta.get("noisy", False)),
                   "image_bytes": s.get(image_ext) if need_image else None}
        except (KeyError, ValueError, TypeError) as exc:
            _warn(stats, "bad_sample", every, f"{s['__key__']} in {s['__url__']}: {exc!r}")
            continue
        yield out


def decode_image(data: bytes, size_HW: tuple[int, int], out: np.ndarray | None = None
                 ) -> np.ndarray:
    """Image bytes -> uint8 H x W x 3 RGB at size_HW (resized bilinearly if needed); a JPEG of
    that size is decoded straight into `out` when given (a buffer reused from image to image
    stays in the CPU's cache)."""
    h, w = size_HW
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        if out is not None and simplejpeg.decode_jpeg_header(data)[:2] == (h, w):
            return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
        if arr.shape[:2] == (h, w):
            return arr
        return np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR))
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(im)


def fill_to_quota(samples, quota: int, stats: LoaderStats, reservoir: int = 256):
    """Exactly `quota` samples: pass through, then repeat recent ones if some were skipped."""
    recent, n = [], 0
    for s in samples:
        if n == quota:
            return
        yield s
        n += 1
        recent.append(s)
        if len(recent) > reservoir:
            recent.pop(0)
    if n < quota:
        if not recent:
            raise RuntimeError("a loader worker found no readable sample in its shards; "
                               "run `tbps verify` on the shards")
        stats.add("padded", quota - n)
        log.warning("data: padding %d sample(s) by repetition after skipped ones", quota - n)
        for i in range(quota - n):
            yield recent[i % len(recent)]


def keep_only(samples, keep: frozenset | None):
    for s in samples:
        if keep is None or s["index"] in keep:
            yield s


def skip_samples(samples, n: int):
    for i, s in enumerate(samples):
        if i >= n:
            yield s


def augment_samples(samples, augment: TrainAugment | None, size_HW: tuple[int, int], seed: int,
                    epoch: int):
    """Draws each sample's flip, crop and erase box; the pixels move later, in `collate`."""
    for s in samples:
        if augment is not None:
            rng = np.random.default_rng([seed, epoch, s["index"], 0xA06])
            s["geometry"], s["erase"] = augment.draw(*size_HW, rng)
        yield s


def batch_samples(samples, batch_size: int, partial: bool = False):
    """Lists of batch_size samples (and the shorter last one when partial)."""
    buf = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield buf
            buf = []
    if buf and partial:
        yield buf


def collate_batches(groups, size_HW: tuple[int, int] | None, stats: LoaderStats, every: int,
                    *, repeat_bad: bool = True):
    """Each list of samples -> the batch's tensors (input_ids aside: `tokenize_batches`).

    size_HW None: no images. An undecodable image is counted and, with repeat_bad (training),
    replaced by a repeat of another sample of the batch so the batch keeps its size; without
    (evaluation), left out.
    """
    scratch = None if size_HW is None else np.empty((*size_HW, 3), np.uint8)
    for group in groups:
        images = None
        if size_HW is not None:
            images = _batch_buffer((len(group), *size_HW, 3))
            group = _decode_into(group, images.numpy(), scratch, stats, every, repeat_bad)
            images = images[:len(group)]
        batch = {
            "caption": [s["caption"] for s in group],
            "pid": torch.tensor([s["pid"] for s in group], dtype=torch.long),
            "index": torch.tensor([s["index"] for s in group], dtype=torch.long),
            "image_id": torch.tensor([s["image_id"] for s in group], dtype=torch.long),
            "noisy": torch.tensor([s["noisy"] for s in group], dtype=torch.bool),
        }
        if images is not None:         # uint8; normalised on the device (prepare_batch)
            batch["image"] = images
            if group and "erase" in group[0]:
                batch["erase"] = torch.tensor([s["erase"] for s in group], dtype=torch.int32)
        if group:
            yield batch


def _decode_into(group: list[dict], out_BHWC: np.ndarray, scratch: np.ndarray,
                 stats: LoaderStats, every: int, repeat_bad: bool) -> list[dict]:
    """Decodes, flips and crops the group's images into out_BHWC[0..k); returns the k samples
    placed (all of them with repeat_bad, bad ones replaced by repeats of good ones)."""
    size_HW = out_BHWC.shape[1:3]
    placed = []
    for s in group:
        try:
            img = decode_image(s["image_bytes"], size_HW, scratch)
        except Exception as exc:        # PIL reports a damaged file in many ways
            _warn(stats, "bad_image", every, f"{s['key']}: cannot decode image ({exc})")
            continue
        place_image(img, s.get("geometry", IDENTITY), out_BHWC[len(placed)])
        placed.append(s)
    if repeat_bad and len(placed) < len(group):
        if not placed:
            raise RuntimeError("a whole batch of undecodable images; run `python -m "
                               "data_pipeline verify` on the shards")
        stats.add("padded", len(group) - len(placed))
        for i in range(len(placed), len(group)):
            out_BHWC[i] = out_BHWC[i % len(placed)]
            placed.append(placed[i % len(placed)])
    return placed


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 tensor; in a loader worker in shared memory, where the DataLoader would copy it
    (as torch's own default_collate does)."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if get_worker_info() is None or new_shared is None:
        return torch.empty(shape, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(new_shared(math.prod(shape)), 0, shape)


def tokenize_batches(batches, tokenizer):
    """Replaces each batch's captions by their ids, all captions in one tokenizer call."""
    for batch in batches:
        batch["input_ids"] = torch.from_numpy(tokenizer.encode_batch(batch.pop("caption")))
        yield batch


# -- datasets ----------------------------------------------------------------------------------


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class TrainStream(IterableDataset):
    """One rank's training stream; each worker yields its exact share of the epoch's batches."""

    def __init__(self, root: Path, info: SplitInfo, tokenizer, cfg: LoaderConfig, rank: int,
                 world_size: int, shared: SharedEpoch, stats: LoaderStats):
        self.root, self.info, self.tokenizer, self.cfg = root, info, tokenizer, cfg
        self.rank, self.world_size, self.shared, self.stats = rank, world_size, shared, stats
        self.num_batches = info.num_samples // (cfg.batch_size * world_size)

    def __iter__(self):
        cfg, B = self.cfg, self.cfg.batch_size
        worker, num_workers = _worker()
        epoch, start_batch = self.shared.get()
        role = (worker + start_batch) % num_workers   # keeps batch order across a resume
        per_worker = balanced_counts(self.num_batches, num_workers)
        quota = per_worker[role] * B
        start = (self.rank * self.num_batches + sum(per_worker[:role])) * B
        done_batches = start_batch // num_workers + (1 if role < start_batch % num_workers else 0)
        shuffle_rng = random.Random(_seed_of(cfg.seed, epoch, self.rank, role))
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


class EvalStream(IterableDataset):
    """One rank's share of an evaluation split, every sample once, in manifest order."""

    def __init__(self, root: Path, info: SplitInfo, tokenizer, cfg: LoaderConfig, rank: int,
                 world_size: int, modality: str, keep_indices: frozenset | None, stats):
        self.root, self.info, self.tokenizer, self.cfg = root, info, tokenizer, cfg
        self.rank, self.world_size, self.modality = rank, world_size, modality
        self.keep, self.stats = keep_indices, stats

    def __iter__(self):
        cfg = self.cfg
        worker, num_workers = _worker()
        per_rank = balanced_counts(self.info.num_samples, self.world_size)
        rank_start = sum(per_rank[:self.rank])
        per_worker = balanced_counts(per_rank[self.rank], num_workers)
        start = rank_start + sum(per_worker[:worker])
        images = self.modality == "image"
        every = cfg.warn_every
        return iter(wds.DataPipeline(
            partial(reader_pieces, self.info.shards, 0, None, start, start + per_worker[worker]),
            partial(read_pieces, root=self.root, stats=self.stats, every=every),
            partial(parse_samples, stats=self.stats, every=every, need_image=images),
            partial(keep_only, keep=self.keep),
            partial(batch_samples, batch_size=cfg.batch_size, partial=True),
            partial(collate_batches, size_HW=cfg.image_size if images else None,
                    stats=self.stats, every=every, repeat_bad=False),
            partial(tokenize_batches, tokenizer=self.tokenizer),
        ))


# -- loaders -----------------------------------------------------------------------------------


def _init_worker(_worker_id: int) -> None:
    # each worker tokenizes on one thread: the workers are the parallelism (and a tokenizer
    # thread pool per worker would oversubscribe the cores)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _mp_context():
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


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
            worker_init_fn=_init_worker if self.num_workers > 0 else None,
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
        ctx = _mp_context()
        self.stats = LoaderStats(ctx)
        dataset = EvalStream(self.root, self.info, tokenizer, cfg, rank, world_size, modality,
                             keep, self.stats)
        workers = min(cfg.num_workers, max(1, self.info.num_samples // world_size))
        self._loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                                  pin_memory=cfg.pin,
                                  worker_init_fn=_init_worker if workers > 0 else None,
                                  multiprocessing_context=ctx if workers > 0 else None)

    def __iter__(self):
        return iter(self._loader)
