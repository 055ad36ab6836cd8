"""Image transforms of the IRRA/RDE recipe, without torchvision (it cannot sit beside a CPU torch).

Training: flip (p 0.5) -> pad 10 with zeros -> random crop back to H x W -> to float -> CLIP
normalisation -> random erasing (p 0.5, area 2-40 %, aspect 0.3-3.3). Evaluation: normalisation
only. Images arrive already resized to H x W (at shard time or on decode).

Split in three for speed: `TrainAugment.draw` takes every random choice for one sample from that
sample's own generator (flip, crop offset, erasing rectangle); `place_image` applies the flip and
the crop while it copies the decoded image into its slot of the batch buffer, so the geometric part
costs one copy (the crop is a shifted slice, the padding zeros are the slot's borders); and
`normalize_images` converts a whole batch to float, normalises it and paints the erasing rectangles
in one pass on the training device (on a CPU worker this costs more than the JPEG decode). Erased
pixels get 0 after normalisation, i.e. the mean colour, which is what torchvision's
RandomErasing(value=mean) is meant to paint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Geometry(NamedTuple):
    """Where one image goes: mirrored or not, then shifted so that its content moves by (-dy, -dx),
    zeros filling in (the crop at offset (pad + dy, pad + dx) of the zero-padded image)."""

    flip: bool
    dy: int
    dx: int


IDENTITY = Geometry(False, 0, 0)


@dataclass(frozen=True)
class TrainAugment:
    """Per-sample random flip, pad-and-crop and an erasing rectangle."""

    flip_p: float = 0.5
    pad: int = 10
    erase_p: float = 0.5
    erase_scale: tuple[float, float] = (0.02, 0.4)
    erase_ratio: tuple[float, float] = (0.3, 3.3)

    def draw(self, H: int, W: int, rng: np.random.Generator
             ) -> tuple[Geometry, tuple[int, int, int, int]]:
        """This sample's flip and crop, and its erase box (top, left, h, w); h = 0: none."""
        u = rng.random(3)
        dy = dx = 0
        if self.pad > 0:
            dy, dx = (int(v) - self.pad for v in rng.integers(0, 2 * self.pad + 1, size=2))
        box = (0, 0, 0, 0)
        if u[1] < self.erase_p:
            box = erase_box(H, W, rng, self.erase_scale, self.erase_ratio)
        return Geometry(bool(u[0] < self.flip_p), dy, dx), box

    def __call__(self, img_HWC: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """Returns the augmented uint8 image and the erase box (one sample; the loader places
        images straight into its batch buffer instead)."""
        geometry, box = self.draw(img_HWC.shape[0], img_HWC.shape[1], rng)
        out = np.empty_like(img_HWC)
        place_image(img_HWC, geometry, out)
        return out, box


def place_image(img_HWC: np.ndarray, geometry: Geometry, out_HWC: np.ndarray) -> None:
    """Write the flipped and shifted image into out_HWC (same shape): one copy, zeros around.

    A flipped image's columns [sx, sx + w) are the original's [W - sx - w, W - sx) reversed, so
    only the cropped slice is flipped, by torch: numpy copies a reversed uint8 H x W x 3 view
    about 8x slower.
    """
    flip, dy, dx = geometry
    H, W = img_HWC.shape[:2]
    h, w = H - abs(dy), W - abs(dx)
    if h <= 0 or w <= 0:
        out_HWC[:] = 0
        return
    sy, ty = (dy, 0) if dy >= 0 else (0, -dy)
    sx, tx = (dx, 0) if dx >= 0 else (0, -dx)
    if flip:
        src = torch.from_numpy(img_HWC[sy:sy + h, W - sx - w:W - sx]).flip(1).numpy()
    else:
        src = img_HWC[sy:sy + h, sx:sx + w]
    out_HWC[ty:ty + h, tx:tx + w] = src
    out_HWC[:ty] = 0
    out_HWC[ty + h:] = 0
    out_HWC[ty:ty + h, :tx] = 0
    out_HWC[ty:ty + h, tx + w:] = 0


def erase_box(H: int, W: int, rng: np.random.Generator, scale, ratio
              ) -> tuple[int, int, int, int]:
    """A rectangle of area fraction in `scale` and aspect in `ratio` (10 tries, else none)."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < h < H and 0 < w < W:
            top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            return top, left, h, w
    return 0, 0, 0, 0


def normalize_images(images_BHWC: torch.Tensor, boxes_B4: torch.Tensor | None = None,
                     any_box: bool | None = None) -> torch.Tensor:
    """uint8 B x H x W x 3 -> float32 B x 3 x H x W, CLIP-normalised, erase boxes set to 0.

    Runs where the tensors are: the loader hands over uint8 images (4x fewer bytes to move) and
    the trainer calls this on the accelerator, where it costs nothing next to the model.
    any_box: whether any box is non-empty, when the caller knows it on the host (else it is
    read from the device).
    """
    mean = torch.tensor(CLIP_MEAN, device=images_BHWC.device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(CLIP_STD, device=images_BHWC.device).view(1, 3, 1, 1) * 255.0)
    x = (images_BHWC.permute(0, 3, 1, 2).float() - mean) * inv_std
    if any_box is None and boxes_B4 is not None:
        any_box = bool((boxes_B4[:, 2] > 0).any())
    if any_box:
        B, _, H, W = x.shape
        top, left, h, w = (boxes_B4[:, i].view(B, 1, 1) for i in range(4))
        rows = torch.arange(H, device=x.device).view(1, H, 1)
        cols = torch.arange(W, device=x.device).view(1, 1, W)
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        x = x.masked_fill(inside.unsqueeze(1), 0.0)
    return x.contiguous()


def prepare_batch(batch: dict, device, non_blocking: bool = True) -> dict:
    """A loader batch on `device`, with its images normalised there (see normalize_images).
    Whether any erase box is set is read on the host, before the copy: no device sync."""
    erase = batch.get("erase")
    any_box = None if erase is None else bool((erase[:, 2] > 0).any())
    out = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
    if "image" in out:
        out["image"] = normalize_images(out["image"], out.pop("erase", None), any_box)
    return out
