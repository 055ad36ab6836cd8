"""The search index on disk, and building it: embed a gallery once, grow it as the gallery grows.

    build_index(embedder, "photos/", "photos.idx")      # only the new or changed images
    index = load_index("photos.idx")                    # header, rows, {branch: N x D}

The folder holds `index.parquet` (one row per image, sorted by key: key, path, id, source, stamp,
and one float32 embedding column `emb_<branch>` per branch) and `index.json` (the model, its
weights' sha256, branches and dimensions, count, the gallery, the files skipped and why), each
written atomically, and `approx.faiss` when built with `approximate=True`
(tbps.trainer.inference.approximate).
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from tbps.data_pipeline.loader import balanced_counts
from tbps.data_pipeline.progress import progress_bar
from tbps.trainer.common import collective
from tbps.trainer.inference.approximate import APPROX, write_approximate
from tbps.trainer.inference.embedder import Embedder
from tbps.trainer.inference.gallery import Item, Problem, decode, gallery_kind, list_gallery, read_items

TABLE, HEADER = "index.parquet", "index.json"
FORMAT = "tbps-search-index/1"
TEXT_COLUMNS = ("key", "path", "id", "source", "stamp")


@dataclass
class Index:
    header: dict
    rows: dict[str, list[str]]               # TEXT_COLUMNS
    emb: dict[str, torch.Tensor]             # {branch: N x D float32}

    def __len__(self) -> int:
        return len(self.rows["key"])


def load_index(folder: Path) -> Index:
    folder = Path(folder)
    if not (folder / HEADER).is_file() or not (folder / TABLE).is_file():
        raise FileNotFoundError(f"{folder} is no search index (no {HEADER} / {TABLE}): build one "
                                "with `tbps search index WEIGHTS GALLERY --out "
                                f"{folder}`")
    try:
        header = json.loads((folder / HEADER).read_text())
        table = pq.read_table(folder / TABLE)
        rows = {c: table[c].to_pylist() for c in TEXT_COLUMNS}
        emb = {}
        for b, d in header["branches"].items():
            flat = table[f"emb_{b}"].combine_chunks().flatten().to_numpy()
            emb[b] = torch.from_numpy(flat.reshape(len(table), d).copy())
    except Exception as exc:  # noqa: BLE001 - a damaged file surfaces as any library's error
        raise ValueError(f"the index in {folder} is damaged ({type(exc).__name__}: {exc}); "
                         f"{_rebuild(folder)}") from None
    if header.get("format") != FORMAT or header.get("count") != len(table):
        raise ValueError(f"the index in {folder} is of another format or incomplete (format "
                         f"{header.get('format')!r}, {header.get('count')} rows announced, "
                         f"{len(table)} found); {_rebuild(folder)}")
    return Index(header, rows, emb)


def _rebuild(folder: Path) -> str:
    return (f"remove {folder} (it is made from the gallery: nothing else is lost) and index "
            f"again with `tbps search index WEIGHTS GALLERY --out {folder}`")


def _write_index(folder: Path, header: dict, rows: dict[str, list], emb: dict[str, np.ndarray]
                 ) -> None:
    """Table, then header, each atomically (a header always describes a complete table)."""
    folder.mkdir(parents=True, exist_ok=True)
    cols = {c: pa.array(rows[c], type=pa.string()) for c in TEXT_COLUMNS}
    for b, e in sorted(emb.items()):
        cols[f"emb_{b}"] = pa.FixedSizeListArray.from_arrays(
            pa.array(e.astype(np.float32).reshape(-1)), e.shape[1])
    tmp = folder / (TABLE + ".partial")
    pq.write_table(pa.table(cols), tmp, compression="zstd")
    os.replace(tmp, folder / TABLE)
    tmp = folder / (HEADER + ".partial")
    tmp.write_text(json.dumps(header, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / HEADER)


def _reusable(out: Path, embedder: Embedder, gallery: dict) -> Index | None:
    """The index already in `out` when it can grow, None when there is none; refuses one built
    with other weights or over another gallery."""
    if not (out / HEADER).exists():
        return None
    old = load_index(out)
    h = old.header
    if h["model"]["sha256"] != embedder.sha256:
        raise ValueError(f"the index in {out} was built with other weights (sha256 "
                         f"{h['model']['sha256'][:12]}..., from {h['model']['path']}); this model's "
                         f"are {embedder.sha256[:12]}...: pass a new --out, or delete {out}")
    if h["gallery"] != gallery:
        raise ValueError(f"the index in {out} covers another gallery ({h['gallery']}, not "
                         f"{gallery}): pass a new --out, or delete {out}")
    return old


def build_index(embedder: Embedder, gallery: Path, out: Path, *, split: str = "test",
                batch_size: int = 64, workers: int = 2, approximate: bool = False,
                progress: bool = True) -> dict:
    """Embed the new and changed images of `gallery` into the index in `out`; every rank takes a
    share, rank 0 writes. Returns a summary (on every rank)."""
    gallery, out = Path(gallery), Path(out)
    kind = gallery_kind(gallery)
    where = {"path": str(gallery.resolve()), "kind": kind,
             "split": split if kind == "shards" else None}
    items, problems = list_gallery(gallery, split, exclude=out)
    old = _reusable(out, embedder, where)
    have = {} if old is None else dict(zip(old.rows["key"], old.rows["stamp"]))
    pending = [it for it in items if have.get(it.key) != it.stamp]
    counts = balanced_counts(len(pending), collective.world_size())
    start = sum(counts[:collective.rank()])
    mine = pending[start:start + counts[collective.rank()]]
    done, emb, bad = _embed_items(embedder, gallery, mine, batch_size, workers,
                                  progress and collective.rank() == 0)
    positions = collective.gather_varlen(torch.tensor([start + j for j in done], dtype=torch.long,
                                                device=embedder.device))
    new = {b: collective.gather_varlen(e).cpu().numpy() for b, e in sorted(emb.items())}
    problems = problems + [p for part in collective.all_gather_object(bad) for p in part]
    summary = {"images": len(items), "embedded": int(positions.numel()),
               "kept": len(items) - len(pending), "skipped": len(problems),
               "removed": 0 if old is None else len(set(have) - {it.key for it in items})}
    if collective.rank() == 0:
        rows, vecs = _merge(items, pending, positions.tolist(), new, old, embedder.dims)
        header = {"format": FORMAT, "count": len(rows["key"]), "gallery": where,
                  "model": {"path": embedder.path, "kind": embedder.kind,
                            "sha256": embedder.sha256, "image_size": list(embedder.image_size)},
                  "branches": embedder.dims, "similarities": embedder.similarities,
                  "skipped": sorted((p.as_dict() for p in problems), key=lambda d: d["path"]),
                  "approximate": write_approximate(out, vecs) if approximate else None}
        if not approximate and (out / APPROX).exists():
            (out / APPROX).unlink()            # it would describe the old rows
        _write_index(out, header, rows, vecs)
    collective.barrier()
    return summary


def _merge(items: list[Item], pending: list[Item], positions: list[int],
           new: dict[str, np.ndarray], old: Index | None, dims: dict[str, int]):
    """Rows and embeddings of the new index, sorted by key: the embedded pending items (row r of
    `new` is pending[positions[r]]) and the old rows of unchanged items."""
    fresh = {pending[p].key: r for r, p in enumerate(positions)}
    current = {it.key: it for it in items}
    unchanged = {} if old is None else {
        k: j for j, (k, s) in enumerate(zip(old.rows["key"], old.rows["stamp"]))
        if k in current and current[k].stamp == s}
    keys = sorted(k for k in current if k in fresh or k in unchanged)
    rows = {c: [getattr(current[k], c) for k in keys] for c in TEXT_COLUMNS}
    vecs = {}
    for b, d in dims.items():
        vecs[b] = np.zeros((len(keys), d), np.float32)
        for n, k in enumerate(keys):
            vecs[b][n] = new[b][fresh[k]] if k in fresh else old.emb[b][unchanged[k]].numpy()
    return rows, vecs


def _embed_items(embedder: Embedder, gallery: Path, items: list[Item], batch_size: int,
                 workers: int, progress: bool):
    """(positions of the embedded items, {branch: n x D} on the device, [Problem])."""
    done, feats, bad = [], {b: [] for b in embedder.dims}, []
    size = embedder.image_size

    def load(pair):
        it, data = pair
        if isinstance(data, Problem):
            return data
        try:
            return decode(data, size)
        except UnidentifiedImageError:
            return Problem(it.path, "not a readable image (no format that PIL knows)")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return Problem(it.path, f"not a readable image ({re.sub(' at 0x[0-9a-f]+', '', str(exc))})")

    stream = read_items(gallery, items)
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            progress_bar("embedding gallery", total=len(items), unit="images",
                         enabled=progress) as bar:
        for start in range(0, len(items), batch_size):
            chunk = [next(stream) for _ in range(min(batch_size, len(items) - start))]
            images, pos = [], []
            for j, got in enumerate(pool.map(load, chunk)):
                if isinstance(got, Problem):
                    bad.append(got)
                else:
                    images.append(got)
                    pos.append(start + j)
            if images:
                out = embedder.images(torch.from_numpy(np.stack(images)))
                for b in feats:
                    feats[b].append(out[b].float())
                done.extend(pos)
            bar.advance(len(chunk))
    dev = embedder.device
    return done, {b: torch.cat(v) if v else torch.zeros(0, embedder.dims[b], device=dev)
                  for b, v in feats.items()}, bad
