"""The shard manifest: `OUT/manifest.parquet`, one row per sample, per-split sizes in its metadata.

Rows carry the columns of `schema.MANIFEST_COLUMNS`. The file's key-value metadata (key "tbps")
holds a JSON document with, per split, the shard list (relative path, sample count, sha256, bytes)
and totals, plus the number of training classes and the tokenizer folder. The loader reads only
this metadata (`read_meta`), which costs one small read, never a scan of the tars.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tbps.data_pipeline.schema import MANIFEST_COLUMNS

MANIFEST = "manifest.parquet"
META_KEY = b"tbps"
MANIFEST_VERSION = 1

_TYPES = {
    "key": pa.string(), "split": pa.string(), "shard": pa.string(), "index": pa.int64(),
    "pid": pa.int64(), "raw_id": pa.int64(), "image_id": pa.int64(), "image_path": pa.string(),
    "caption": pa.string(), "caption_index": pa.int32(), "noisy": pa.bool_(),
    "caption_src": pa.int64(), "caption_pid": pa.int64(), "image_sha1": pa.string(),
    "image_bytes": pa.int64(),
}
assert tuple(_TYPES) == MANIFEST_COLUMNS


@dataclass(frozen=True)
class ShardInfo:
    name: str            # path relative to the shard folder, e.g. "train/shard-000003.tar"
    num_samples: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SplitInfo:
    split: str
    num_samples: int
    shards: tuple[ShardInfo, ...]

    @property
    def num_shards(self) -> int:
        return len(self.shards)


def write_manifest(out: str | os.PathLike, rows: list[dict], meta: dict) -> Path:
    """Write rows and metadata atomically (temp file, then rename)."""
    out = Path(out)
    schema = pa.schema([pa.field(c, t) for c, t in _TYPES.items()],
                       metadata={META_KEY: json.dumps({"version": MANIFEST_VERSION, **meta},
                                                      sort_keys=True).encode()})
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = out / (MANIFEST + ".partial")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, out / MANIFEST)
    return out / MANIFEST


def manifest_path(shard_dir: str | os.PathLike) -> Path:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {shard_dir} the output of "
                                "`tbps shard`?")
    return path


def _damaged(path: Path, exc: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable manifest ({exc}); shard the dataset again "
                      "(`tbps shard ... --overwrite`) or restore the file")


def read_meta(shard_dir: str | os.PathLike) -> dict:
    path = manifest_path(shard_dir)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(path, exc) from None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{manifest_path(shard_dir)} has no '{META_KEY.decode()}' metadata")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise _damaged(path, exc) from None
    if meta.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{manifest_path(shard_dir)}: manifest version {meta.get('version')}, "
                         f"this code reads version {MANIFEST_VERSION}; re-shard the dataset")
    return meta


def read_manifest(shard_dir: str | os.PathLike, columns=None, split: str | None = None
                  ) -> pa.Table:
    filters = [("split", "=", split)] if split else None
    path = manifest_path(shard_dir)
    try:
        return pq.read_table(path, columns=columns, filters=filters)
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(path, exc) from None


def split_info(meta: dict, split: str) -> SplitInfo:
    splits = meta.get("splits", {})
    if split not in splits:
        raise ValueError(f"the shards hold no {split!r} split (they have {sorted(splits)})")
    s = splits[split]
    try:
        shards = tuple(ShardInfo(**sh) for sh in s["shards"])
        return SplitInfo(split=split, num_samples=int(s["num_samples"]), shards=shards)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the manifest's entry for the {split!r} split is damaged ({exc!r}); "
                         "shard the dataset again") from None
