"""LoaderConfig: how batches are made, for training and evaluation loaders alike."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tbps.data_pipeline.transforms import TrainAugment


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
