"""The one definition of what a sample is: annotation records, shard members and manifest columns.

Every other module of the pipeline (readers, sharding, verify, loader) imports its names from here,
so a field is added in one place.

A *record* is one (image, caption) pair read from an annotation file. Records of a split are
numbered 0..n-1 in reader order; that number is the sample's `index`, stable across shardings,
noise rates and runs (CCD and the diagnostics key per-sample state by it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SPLITS = ("train", "val", "test")

# Tar members of one sample: "<key>.<image ext>" and "<key>.json".
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
JSON_EXT = "json"

# Default number of samples per shard. CUHK-PEDES's 68k training pairs give 267 shards: enough
# for 4 nodes x 8 ranks x 8 loader workers (256 slots).
DEFAULT_SHARD_SIZE = 256


def sample_key(split: str, index: int) -> str:
    """Tar key of a sample; no dots (webdataset splits the member name at the first dot)."""
    return f"{split}-{index:08d}"


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.tar"


@dataclass(frozen=True)
class Record:
    """One image-caption pair from an annotation file.

    Attributes:
        split: "train", "val" or "test".
        index: position of the pair within its split (0..n-1), its global sample index.
        pid: person id. Train ids are remapped to 0..n_ids-1; val/test keep the file's id.
        raw_id: the id exactly as written in the annotation file.
        image_id: number of the image within its split (0..n_images-1), shared by its captions.
        image_path: path of the image relative to the dataset's image folder, with "/".
        caption: the caption text (after any noise injection: possibly another pair's caption).
        caption_index: which caption of the image this is (0, 1, ...).
        noisy: True if noise injection gave this pair another pair's caption.
        caption_src: index of the pair whose caption this is (== index when not noisy).
        caption_pid: person id of the pair whose caption this is.
    """

    split: str
    index: int
    pid: int
    raw_id: int
    image_id: int
    image_path: str
    caption: str
    caption_index: int = 0
    noisy: bool = False
    caption_src: int = -1
    caption_pid: int = -1

    def __post_init__(self):
        # frozen dataclass: fill the "no noise" defaults through object.__setattr__
        if self.caption_src < 0:
            object.__setattr__(self, "caption_src", self.index)
        if self.caption_pid < 0:
            object.__setattr__(self, "caption_pid", self.pid)

    def replace(self, **changes) -> "Record":
        return dataclasses.replace(self, **changes)

    def sample_json(self) -> dict:
        """The json member stored beside the image in a shard."""
        return {
            "key": sample_key(self.split, self.index),
            "split": self.split,
            "index": self.index,
            "pid": self.pid,
            "raw_id": self.raw_id,
            "image_id": self.image_id,
            "image_path": self.image_path,
            "caption": self.caption,
            "caption_index": self.caption_index,
            "noisy": self.noisy,
            "caption_src": self.caption_src,
            "caption_pid": self.caption_pid,
        }


# Fields the loader needs from a sample's json; a sample missing one is corrupt.
REQUIRED_SAMPLE_FIELDS = ("caption", "pid", "index", "image_id")

# Manifest columns (one row per sample), in order.
MANIFEST_COLUMNS = (
    "key", "split", "shard", "index", "pid", "raw_id", "image_id", "image_path", "caption",
    "caption_index", "noisy", "caption_src", "caption_pid", "image_sha1", "image_bytes",
)
