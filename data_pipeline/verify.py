"""Check shards against their manifest (`verify`) and summarise them (`stats`).

    tbps verify shards/synth          # exit 1 with the list of problems
    tbps stats shards/synth [--json]

`verify` re-reads every shard: the file exists with the recorded size and sha256, its samples
are exactly the manifest's rows for that shard, in order, each json matches its row, each image
has the recorded sha1 and decodes. Stray tar files in a split folder are problems too.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import os
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from tbps.data_pipeline.manifest import read_manifest, read_meta
from tbps.data_pipeline.progress import progress_bar
from tbps.data_pipeline.schema import IMAGE_EXTS
from tbps.data_pipeline.workers import init_worker, stop_pool

_CHECKED_FIELDS = ("caption", "pid", "index", "image_id", "noisy", "caption_src")


def verify(shard_dir, *, workers: int = 1, progress: bool = True) -> list[str]:
    """All problems found, as readable lines; empty when the shards are intact."""
    root = Path(shard_dir)
    meta = read_meta(root)
    table = read_manifest(root).to_pylist()
    rows_by_shard = defaultdict(list)
    for row in table:
        rows_by_shard[row["shard"]].append(row)
    shards = [sh for s in meta["splits"].values() for sh in s["shards"]]
    problems = _stray_files(root, meta, shards)
    for name in sorted(set(rows_by_shard) - {sh["name"] for sh in shards}):
        problems.append(f"{name}: has manifest rows but is not in the shard list")
    jobs = [(root, sh, rows_by_shard.get(sh["name"], [])) for sh in shards]
    with progress_bar("verifying", total=len(jobs), unit="shards", enabled=progress) as bar:
        if workers <= 1:
            for job in jobs:
                problems += verify_shard(*job)
                bar.advance()
        else:
            problems += _verify_parallel(jobs, workers, bar)
    return problems


def _verify_parallel(jobs, workers: int, bar) -> list[str]:
    problems = []
    pool = cf.ProcessPoolExecutor(max_workers=workers, initializer=init_worker,
                                  initargs=(os.getpid(),))
    try:
        for found in pool.map(verify_shard, *zip(*jobs)):
            problems += found
            bar.advance()
    except BaseException:
        stop_pool(pool)
        raise
    pool.shutdown()
    return problems


def _stray_files(root: Path, meta: dict, shards: list[dict]) -> list[str]:
    known = {sh["name"] for sh in shards}
    found = {p.relative_to(root).as_posix() for split in meta["splits"]
             for p in (root / split).glob("*.tar")}
    return [f"{name}: tar file not in the manifest" for name in sorted(found - known)]


def verify_shard(root: Path, shard: dict, rows: list[dict]) -> list[str]:
    name, path = shard["name"], root / shard["name"]
    if not path.is_file():
        return [f"{name}: missing"]
    data = path.read_bytes()
    problems = []
    if len(data) != shard["bytes"]:
        problems.append(f"{name}: {len(data)} bytes, manifest says {shard['bytes']}")
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest")
    try:
        samples = _read_all(data)
    except (tarfile.TarError, EOFError, OSError) as exc:
        return problems + [f"{name}: unreadable tar ({exc})"]
    if len(samples) != shard["num_samples"] or len(samples) != len(rows):
        problems.append(f"{name}: {len(samples)} samples, manifest says {shard['num_samples']} "
                        f"({len(rows)} rows)")
    by_key = {s["__key__"]: s for s in samples}
    for row in rows:
        sample = by_key.get(row["key"])
        if sample is None:
            problems.append(f"{name}: sample {row['key']} missing")
            continue
        problems += [f"{name}: {row['key']}: {p}" for p in _check_sample(sample, row)]
    return problems


def _read_all(data: bytes) -> list[dict]:
    samples, current = [], None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if current is None or current["__key__"] != key:
                current = {"__key__": key}
                samples.append(current)
            current[ext] = tar.extractfile(member).read()
    return samples


def _check_sample(sample: dict, row: dict) -> list[str]:
    problems = []
    try:
        meta = json.loads(sample.get("json", b""))
    except json.JSONDecodeError:
        return ["json member missing or broken"]
    for f in _CHECKED_FIELDS:
        if meta.get(f) != row[f]:
            problems.append(f"json {f}={meta.get(f)!r}, manifest {row[f]!r}")
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        return problems + ["no image member"]
    if hashlib.sha1(image).hexdigest() != row["image_sha1"]:
        problems.append("image sha1 differs from the manifest")
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
    except Exception as exc:           # PIL reports a damaged file in many ways (SyntaxError too)
        problems.append(f"image does not decode ({exc})")
    return problems


def stats(shard_dir) -> dict:
    """Per-split counts, shard sizes, caption lengths and noise, from the manifest alone."""
    root = Path(shard_dir)
    meta = read_meta(root)
    table = read_manifest(root, columns=["split", "pid", "image_id", "caption", "noisy",
                                         "caption_pid", "image_bytes"])
    cols = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    out = {"format": meta["format"], "num_classes": meta["num_classes"],
           "tokenizer": meta["tokenizer"], "options": meta["options"], "splits": {}}
    for split, info in meta["splits"].items():
        sel = cols["split"] == split
        words = np.array([len(c.split()) for c in cols["caption"][sel]])
        sizes = [sh["num_samples"] for sh in info["shards"]]
        noisy = cols["noisy"][sel]
        out["splits"][split] = {
            "samples": int(sel.sum()), "images": int(len(np.unique(cols["image_id"][sel]))),
            "ids": int(len(np.unique(cols["pid"][sel]))), "shards": len(sizes),
            "shard_samples_min": min(sizes), "shard_samples_max": max(sizes),
            "caption_words_mean": round(float(words.mean()), 2),
            "caption_words_max": int(words.max()),
            "noisy": int(noisy.sum()),
            "noisy_other_id": int((noisy & (cols["caption_pid"][sel] != cols["pid"][sel])).sum()),
            "megabytes": round(sum(sh["bytes"] for sh in info["shards"]) / 2**20, 2),
        }
    return out
