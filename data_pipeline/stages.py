"""Stages 6-13 of the stream (listed in loader.py): tar samples -> fields -> batches of tensors.

Each stage is a generator over the previous one's items; `TrainStream` and `EvalStream` chain
them in one webdataset DataPipeline, and `bench` times them one by one.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from tbps.data_pipeline.loader_state import LoaderStats, log, warn
from tbps.data_pipeline.schema import IMAGE_EXTS, REQUIRED_SAMPLE_FIELDS
from tbps.data_pipeline.transforms import IDENTITY, TrainAugment, place_image

try:                                   # libjpeg-turbo straight to numpy: about 2x PIL's speed
    import simplejpeg
except ImportError:                    # pragma: no cover - PIL decodes everything too
    simplejpeg = None


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
            warn(stats, "bad_sample", every, f"{s['__key__']} in {s['__url__']}: {exc!r}")
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
            warn(stats, "bad_image", every, f"{s['key']}: cannot decode image ({exc})")
            continue
        place_image(img, s.get("geometry", IDENTITY), out_BHWC[len(placed)])
        placed.append(s)
    if repeat_bad and len(placed) < len(group):
        if not placed:
            raise RuntimeError("a whole batch of undecodable images; run `tbps verify` on the "
                               "shards")
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
