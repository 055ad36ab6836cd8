"""A gallery of person images to search: a plain folder of images (recursively) or a shard folder.

    items, problems = list_gallery("photos/")                  # every file under photos/
    items, problems = list_gallery("shards/cuhk", split="test")  # one sample per image of a split
    for item, data in read_items(gallery, items): ...           # bytes, or a Problem

An item is one image: `key` (unique, stable: the file's path relative to the folder, or the
shard sample's key), `path` (what a person reads: the relative path, or the dataset's own image
path), `id` (the person id of a shard sample; for a folder, the image's sub-folder, which is the
person where a gallery keeps a folder per person), `source` (where the bytes are: the relative
path, or "<shard>:<sample key>") and `stamp`, what tells that an image changed: the sha1 of its
bytes that the shard manifest records, or a file's size and modification time.

Nothing bad stops a listing or a read: a missing or unreadable file, a file that is not an image
and a sample missing from its shard each become a `Problem` (where, why), which the caller reports.
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tbps.data_pipeline.loader import decode_image
from tbps.data_pipeline.manifest import MANIFEST, read_manifest, read_meta, split_info
from tbps.data_pipeline.schema import IMAGE_EXTS

IMAGE_SUFFIXES = frozenset("." + e for e in IMAGE_EXTS)


@dataclass(frozen=True)
class Item:
    key: str
    path: str
    id: str
    source: str
    stamp: str = ""


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def as_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


def gallery_kind(root: Path) -> str:
    """"shards" (a folder written by `tbps shard`) or "folder"."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"gallery {root} is not a folder: pass a folder of images (searched "
                                "recursively) or a shard folder written by `tbps "
                                "shard`")
    return "shards" if (root / MANIFEST).is_file() else "folder"


def list_gallery(root: Path, split: str = "test", exclude: Path | None = None
                 ) -> tuple[list[Item], list[Problem]]:
    """Items sorted by key, and the files that cannot be items. `exclude`: a folder to leave out
    (an index written inside the gallery)."""
    root = Path(root)
    if gallery_kind(root) == "shards":
        return _list_shards(root, split), []
    return _list_folder(root, exclude)


def _list_folder(root: Path, exclude: Path | None) -> tuple[list[Item], list[Problem]]:
    items, problems = [], []
    skip = Path(exclude).resolve() if exclude is not None else None
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if skip is not None and (p.resolve() == skip or skip in p.resolve().parents):
            continue
        if p.is_dir():
            continue
        if not p.exists():
            problems.append(Problem(rel, "missing (a link to nothing)"))
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(Problem(rel, f"not an image (suffix {p.suffix or 'none'!r}; images "
                                         f"are {', '.join(sorted(IMAGE_SUFFIXES))})"))
        else:
            parent, st = Path(rel).parent.as_posix(), p.stat()
            items.append(Item(key=rel, path=rel, id="" if parent == "." else parent, source=rel,
                              stamp=f"{st.st_size}:{st.st_mtime_ns}"))
    return items, problems


def _list_shards(root: Path, split: str) -> list[Item]:
    split_info(read_meta(root), split)            # a clear error when the split is absent
    table = read_manifest(root, columns=["key", "shard", "index", "pid", "image_id",
                                         "image_path", "image_sha1"], split=split)
    first: dict[int, dict] = {}
    for row in sorted(table.to_pylist(), key=lambda r: r["index"]):
        first.setdefault(row["image_id"], row)    # the gallery of an evaluation: one per image
    items = [Item(key=r["key"], path=r["image_path"], id=str(r["pid"]),
                  source=f"{r['shard']}:{r['key']}", stamp=r["image_sha1"] or "")
             for r in first.values()]
    return sorted(items, key=lambda it: it.key)


def read_items(root: Path, items: list[Item]):
    """Yields (item, bytes) or (item, Problem) for every item, in the given order. A shard is
    read once for the run of consecutive items it holds (items sorted by key come in runs)."""
    root = Path(root)
    wanted: dict[str, set[str]] = {}
    for it in items:
        if ":" in it.source:
            shard, _, key = it.source.rpartition(":")
            wanted.setdefault(shard, set()).add(key)
    cached_shard, cached = None, {}
    for it in items:
        if ":" not in it.source:
            yield it, _read_file(root, it)
            continue
        shard, _, key = it.source.rpartition(":")
        if shard != cached_shard:
            cached_shard, cached = shard, _read_shard(root / shard, wanted[shard])
        found = cached.pop(key, None)
        if found is None:
            found = Problem(it.path, f"sample {key} is missing from {shard}")
        elif isinstance(found, Problem):
            found = Problem(it.path, found.reason)
        yield it, found


def _read_file(root: Path, it: Item) -> bytes | Problem:
    try:
        return (root / it.source).read_bytes()
    except FileNotFoundError:
        return Problem(it.path, "missing (removed after it was listed?)")
    except OSError as exc:
        return Problem(it.path, f"unreadable ({exc.strerror or exc})")


def _read_shard(path: Path, wanted: set[str]) -> dict[str, bytes | Problem]:
    """The image bytes of the wanted sample keys of one tar; a Problem for each lost one."""
    out: dict[str, bytes | Problem] = {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if member.isreg() and key in wanted and ext.lower() in IMAGE_EXTS:
                    out[key] = tar.extractfile(member).read()
    except FileNotFoundError:
        reason = f"its shard {path.name} is missing"
        return {k: Problem("", reason) for k in wanted}
    except (tarfile.TarError, OSError, EOFError) as exc:
        for k in wanted - set(out):
            out[k] = Problem("", f"its shard {path.name} is unreadable from some point ({exc})")
    return out


def decode(data: bytes, size_HW: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 H x W x 3 (resized to size_HW when given); OSError / ValueError when not an image."""
    if size_HW is not None:
        return decode_image(data, size_HW)
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def load_images(root: Path, items: list[Item]) -> list[np.ndarray | None]:
    """Full-size images of some items (for pictures of results); None where unreadable."""
    out = []
    for _, data in read_items(root, items):
        try:
            out.append(None if isinstance(data, Problem) else decode(data))
        except (OSError, ValueError, Image.DecompressionBombError):
            out.append(None)
    return out
