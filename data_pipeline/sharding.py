"""Annotations -> webdataset tar shards + manifest, in parallel, resumable and byte-reproducible.

    tbps shard --format cuhk-pedes --root data/CUHK-PEDES --out shards/cuhk
    tbps shard --format rstpreid --root data/RSTPReid --out shards/rstp \
        --resize 384x128 --noise-rate 0.5 --noise-seed 0 --workers 8
    tbps shard --format cuhk-pedes --root data/CUHK-PEDES --out shards/cuhk-n50 \
        --noise-index RDE/noiseindex/CUHK-PEDES_0.5.npy    # the paper's noisy pairs (noise.py)

Output:
    OUT/<split>/shard-NNNNNN.tar   samples "<key>.<jpg|png>" + "<key>.json" (schema.Record fields)
    OUT/manifest.parquet           one row per sample; per-split shard sizes and checksums
    OUT/tokenizer/                 a word-level tokenizer trained on the train captions
    OUT/.plan.json, OUT/.progress/ bookkeeping that makes an interrupted run resumable

Order: train samples are spread over the shards in a seeded random order (`--shuffle-seed`), so
any shard is a random slice of the identities; val/test keep the annotation order. Tar members
carry fixed metadata (mtime, owner, mode), so the same input and options give the same bytes,
whatever the number of workers.

Resuming: a shard counts as done once its tar was renamed into place and its record was written
to OUT/.progress; a rerun with the same input and options skips done shards. A rerun with other
input or options refuses to mix the two (use a new --out, or --overwrite).

Safety: an OUT that is the input folder, lies inside it or holds it is refused; --overwrite
deletes only what this tool writes, and refuses before deleting anything when OUT holds other
files. A dataset without any usable record is refused before OUT is touched. Worker processes end
with the command (`tbps.data_pipeline.workers`); a stop (SIGTERM, Ctrl-C) leaves done shards in place.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from tbps.data_pipeline import readers
from tbps.data_pipeline.manifest import MANIFEST, write_manifest
from tbps.data_pipeline.noise import (
    apply_source,
    noise_source,
    noisy_fraction,
    read_noise_index,
    write_noise_index,
)
from tbps.data_pipeline.progress import progress_bar
from tbps.data_pipeline.schema import DEFAULT_SHARD_SIZE, SPLITS, Record, sample_key, shard_name
from tbps.data_pipeline.synth_vocab import train_shared_tokenizer
from tbps.data_pipeline.tokenizer import train_word_level
from tbps.data_pipeline.workers import init_worker, stop_pool

log = logging.getLogger(__name__)

PLAN = ".plan.json"
PROGRESS_DIR = ".progress"
TOKENIZER_DIR = "tokenizer"
TAR_MTIME = 946684800          # 2000-01-01: fixed, so tars are byte-reproducible
TOKENIZERS = ("word-level", "synthetic-vocab", "none")
PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


class ShardError(RuntimeError):
    pass


@dataclass(frozen=True, kw_only=True)
class ShardOptions:
    """What goes into the shards (all of it is part of the resume fingerprint)."""

    shard_size: int = DEFAULT_SHARD_SIZE
    """Samples per shard; small enough that shards >= nodes x ranks x loader workers."""
    resize: tuple[int, int] | None = None
    """(height, width) to resize every image to at shard time (re-encoded as JPEG); None keeps
    the original bytes."""
    jpeg_quality: int = 95
    """JPEG quality when re-encoding resized images."""
    shuffle_seed: int = 0
    """Seed of the order in which train samples are spread over the shards."""
    noise_rate: float = 0.0
    """Fraction of train pairs whose captions are permuted (RDE protocol); 0 for none. With
    noise_index, set from the file: the realised fraction of pairs holding another's caption."""
    noise_seed: int | None = 0
    """Seed of the noise permutation; noisy sets are nested across rates for one seed. None with
    noise_index."""
    noise_index: str | None = None
    """A noise index file in RDE's layout (`noise.read_noise_index`) that fixes the noisy pairs
    instead of noise_rate and noise_seed."""
    on_error: str = "fail"
    """"fail": stop on a malformed record; "skip": drop it and report it."""
    tokenizer: str = "word-level"
    """"word-level": train a tokenizer on the train captions into OUT/tokenizer;
    "synthetic-vocab": a word-level tokenizer over every word the synthetic generator can write
    (every population: the same ids for all of them); "none": no tokenizer."""

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 8):
            raise ValueError(f"resize must be (height, width) of at least 8, got {self.resize}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.noise_index is None and not 0.0 <= self.noise_rate < 1.0:
            raise ValueError(f"noise_rate must be in [0, 1), got {self.noise_rate}")
        if self.on_error not in readers.ON_ERROR:
            raise ValueError(f"on_error must be one of {readers.ON_ERROR}, got {self.on_error!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")


def shard_dataset(fmt: str, root: str | os.PathLike, out: str | os.PathLike,
                  options: ShardOptions = ShardOptions(), *, workers: int = 1,
                  progress: bool = True, overwrite: bool = False,
                  write_noise_to: str | os.PathLike | None = None) -> dict:
    """Read, (noise,) plan, write shards in parallel, then the manifest. Returns a summary.
    write_noise_to: also save the train split's noise as an index file there."""
    t0 = time.time()
    root, out = Path(root), Path(out)
    _check_not_input(root, out)
    records, report = readers.read_annotations(fmt, root, on_error=options.on_error)
    if not report.ok:
        log.warning("skipping malformed records:\n%s", report.render())
    if not any(records.values()):
        raise ShardError(f"{report.source} holds no usable (image, caption) pair ({report.entries} "
                         "entries" + (", all malformed" if report.entries else "") + "): nothing "
                         f"to shard. Check that --root {root} is the dataset folder and --format "
                         f"{fmt} its format.")
    records, options, noise_meta = _add_noise(records, options, write_noise_to)
    plan = _plan(records, options)
    fingerprint = _fingerprint(fmt, options, plan)
    _prepare_out(out, fingerprint, fmt, options, overwrite)

    done = _load_progress(out)
    todo = [(split, sid, recs) for split, shards in plan.items()
            for sid, recs in enumerate(shards) if f"{split}/{shard_name(sid)}" not in done]
    total = sum(len(r) for shards in plan.values() for r in shards)
    resumed = total - sum(len(r) for *_, r in todo)
    if resumed:
        log.info("resuming: %d of %d samples already sharded", resumed, total)
    image_dir = root / readers.IMAGE_DIR
    _run_tasks(todo, image_dir, out, options, workers, progress, total, resumed, done)

    rows, meta = _collect(plan, done, fmt, options)
    if options.tokenizer == "word-level" and "train" in records:
        train_word_level(sorted(r.caption for r in records["train"]), out / TOKENIZER_DIR)
        meta["tokenizer"] = TOKENIZER_DIR
    elif options.tokenizer == "synthetic-vocab":
        train_shared_tokenizer(out / TOKENIZER_DIR)
        meta["tokenizer"] = TOKENIZER_DIR
    meta["annotation_report"] = {"problems": dict(report.counts), "entries": report.entries}
    if noise_meta:
        meta["noise_index"] = noise_meta
    write_manifest(out, rows, meta)
    return {"out": str(out), "seconds": round(time.time() - t0, 2),
            "splits": {s: {"samples": v["num_samples"], "shards": len(v["shards"])}
                       for s, v in meta["splits"].items()},
            "skipped_records": dict(report.counts),
            **({"noise_index": noise_meta} if noise_meta else {})}


# -- planning -----------------------------------------------------------------------------------


def _add_noise(records: dict[str, list[Record]], options: ShardOptions, write_to) -> tuple:
    """The train split with its noise (seeded, or from an index file), the options with the
    realised rate where a file gave it, and the file's provenance for the manifest."""
    train = records.get("train", [])
    if options.noise_index is None and options.noise_rate == 0 and write_to is None:
        return records, options, None
    if not train:
        if options.noise_index is None and write_to is None:
            return records, options, None
        raise ShardError("a noise index numbers the train split's pairs, and this dataset has no "
                         "train split")
    if options.noise_index is not None:
        src = read_noise_index(options.noise_index, len(train))
        options = replace(options, noise_rate=noisy_fraction(src), noise_seed=None)
    else:
        src = noise_source(len(train), options.noise_rate, options.noise_seed)
    if write_to is not None:
        write_noise_index(write_to, src)
    noise_meta = None
    if options.noise_index is not None:
        noise_meta = {"file": Path(options.noise_index).name, "pairs": len(src),
                      "noisy_pairs": int(np.count_nonzero(src != np.arange(len(src)))),
                      "sha256": hashlib.sha256(Path(options.noise_index).read_bytes()).hexdigest()}
        log.info("noise index %s: %d of %d train pairs take another pair's caption (rate %.6f)",
                 options.noise_index, noise_meta["noisy_pairs"], len(src), options.noise_rate)
    return {**records, "train": apply_source(train, src)}, options, noise_meta


def _plan(records: dict[str, list[Record]], options: ShardOptions) -> dict[str, list[list[Record]]]:
    plan = {}
    for split in SPLITS:
        recs = records.get(split, [])
        if not recs:
            continue
        if split == "train":
            order = np.random.default_rng(options.shuffle_seed).permutation(len(recs))
            recs = [recs[i] for i in order]
        n = options.shard_size
        plan[split] = [recs[i:i + n] for i in range(0, len(recs), n)]
    return plan


def _fingerprint(fmt: str, options: ShardOptions, plan) -> str:
    h = hashlib.sha256(json.dumps([fmt, asdict(options)], sort_keys=True).encode())
    for shards in plan.values():
        for recs in shards:
            for r in recs:
                h.update(json.dumps(r.sample_json(), sort_keys=True).encode())
    return h.hexdigest()


def _check_not_input(root: Path, out: Path) -> None:
    r, o = root.resolve(), out.resolve()
    if o == r or r in o.parents or o in r.parents:
        where = "is" if o == r else "lies inside" if r in o.parents else "holds"
        raise ShardError(f"--out {out} {where} the input folder --root {root}; shards are written "
                         "next to a dataset, never into it: choose an --out outside it")


def _foreign_files(out: Path) -> list[str]:
    """What OUT holds that this tool did not write (and --overwrite must therefore keep)."""
    ours = {*SPLITS, PROGRESS_DIR, TOKENIZER_DIR, PLAN, MANIFEST}
    foreign = []
    for p in sorted(out.iterdir()):
        name = p.name.removesuffix(".partial")
        if name not in ours or p.is_dir() != (name in (*SPLITS, PROGRESS_DIR, TOKENIZER_DIR)):
            foreign.append(p.name)
        elif name in SPLITS:
            foreign += [f"{p.name}/{q.name}" for q in sorted(p.iterdir())
                        if not _SHARD_FILE.fullmatch(q.name)]
        elif name in (PROGRESS_DIR, TOKENIZER_DIR):
            foreign += [f"{p.name}/{q.name}" for q in sorted(p.iterdir())
                        if q.is_dir() or q.suffix not in (".json", ".txt", ".partial")]
    return foreign


_SHARD_FILE = re.compile(r"shard-\d{6}\.tar(\.partial)?")


def _read_plan(plan_file: Path) -> dict:
    try:
        plan = json.loads(plan_file.read_text())
        if isinstance(plan, dict):
            return plan
    except (ValueError, UnicodeDecodeError):
        pass
    raise ShardError(f"{plan_file} is damaged, so the shards beside it cannot be resumed: pass "
                     "--overwrite to shard again into this folder, or use a new --out")


def _prepare_out(out: Path, fingerprint: str, fmt: str, options: ShardOptions,
                 overwrite: bool) -> None:
    plan_file = out / PLAN
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} is a file; choose a folder")
    if overwrite and out.exists():
        foreign = _foreign_files(out)
        if foreign:
            raise ShardError(f"--overwrite replaces the shards in {out}, but the folder holds files "
                             f"this tool did not write ({', '.join(foreign[:5])}"
                             f"{', ...' if len(foreign) > 5 else ''}); nothing was deleted. "
                             "Move them away or choose another --out.")
        for name in [*SPLITS, PROGRESS_DIR, TOKENIZER_DIR]:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (PLAN, MANIFEST):
            (out / name).unlink(missing_ok=True)
    if plan_file.exists():
        if _read_plan(plan_file).get("fingerprint") != fingerprint:
            raise ShardError(f"{out} holds shards of other input or options (a different plan); "
                             "use a new --out or pass --overwrite to replace them")
    elif out.exists() and any(out.iterdir()):
        raise ShardError(f"{out} exists and is not a shard folder of this tool; "
                         "use a new --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    for partial in out.glob("*/*.partial"):
        partial.unlink()
    _write_json_atomic(plan_file, {"fingerprint": fingerprint, "format": fmt,
                                   "options": asdict(options)})


def _load_progress(out: Path) -> dict[str, dict]:
    done = {}
    for f in sorted((out / PROGRESS_DIR).glob("*.json")):
        try:
            info = json.loads(f.read_text())
            name = info["name"]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            log.warning("%s is damaged: its shard is written again", f)
            continue
        if (out / name).is_file():
            done[name] = info
    return done


# -- writing ------------------------------------------------------------------------------------


def _run_tasks(todo, image_dir: Path, out: Path, options: ShardOptions, workers: int,
               progress: bool, total: int, resumed: int, done: dict) -> None:
    if workers <= 1 or not todo:
        with progress_bar("sharding", total=total, unit="samples", enabled=progress) as bar:
            bar.advance(resumed)
            for split, sid, recs in todo:
                info = write_shard(split, sid, recs, image_dir, out, options)
                done[info["name"]] = info
                bar.advance(len(recs))
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                                  initargs=(os.getpid(),))
    try:
        # every task submitted (so every worker forked) before the progress bar's thread starts:
        # forking beside a running thread can deadlock
        futures = {pool.submit(write_shard, split, sid, recs, image_dir, out, options):
                   len(recs) for split, sid, recs in todo}
        with progress_bar("sharding", total=total, unit="samples", enabled=progress) as bar:
            bar.advance(resumed)
            for fut in cf.as_completed(futures):
                info = fut.result()
                done[info["name"]] = info
                bar.advance(futures[fut])
    except BaseException:
        stop_pool(pool)
        raise
    pool.shutdown()


def write_shard(split: str, shard_id: int, records: list[Record], image_dir: Path, out: Path,
                options: ShardOptions) -> dict:
    """Write one tar (atomically) and its progress record; returns that record."""
    name = f"{split}/{shard_name(shard_id)}"
    path = out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    samples, skipped = [], []
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for rec in records:
            try:
                data, ext = load_image_bytes(image_dir / rec.image_path, options)
            except ShardError as exc:
                if options.on_error == "fail":
                    raise
                skipped.append({"index": rec.index, "error": str(exc)})
                continue
            key = sample_key(rec.split, rec.index)
            _add_member(tar, f"{key}.{ext}", data)
            _add_member(tar, f"{key}.json", json.dumps(rec.sample_json(), sort_keys=True).encode())
            samples.append({"index": rec.index, "image_sha1": hashlib.sha1(data).hexdigest(),
                            "image_bytes": len(data)})
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, path)
    info = {"name": name, "split": split, "num_samples": len(samples), "sha256": digest,
            "bytes": path.stat().st_size, "samples": samples, "skipped": skipped}
    _write_json_atomic(out / PROGRESS_DIR / f"{split}-{shard_name(shard_id)}.json", info)
    return info


def load_image_bytes(path: Path, options: ShardOptions) -> tuple[bytes, str]:
    """The bytes to store for an image and their extension; decodes once to catch corrupt files."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format
            if options.resize is not None:
                h, w = options.resize
                im = im.convert("RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=options.jpeg_quality)
                return buf.getvalue(), "jpg"
    except Exception as exc:           # PIL reports a damaged file in many ways (SyntaxError too)
        raise ShardError(f"{path}: cannot read image ({exc}); replace the file, or pass "
                         "--on-error skip to leave it out") from None
    if fmt not in PIL_FORMAT_EXT:
        raise ShardError(f"{path}: unsupported image format {fmt}")
    return data, PIL_FORMAT_EXT[fmt]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, sort_keys=True, indent=1))
    os.replace(tmp, path)


# -- manifest ---------------------------------------------------------------------------------


def _collect(plan, done: dict, fmt: str, options: ShardOptions) -> tuple[list[dict], dict]:
    rows, splits = [], {}
    for split, shards in plan.items():
        shard_infos, pids, images = [], set(), set()
        for sid, recs in enumerate(shards):
            info = done[f"{split}/{shard_name(sid)}"]
            stored = {s["index"]: s for s in info["samples"]}
            for rec in recs:
                if rec.index not in stored:
                    continue
                s = stored[rec.index]
                row = rec.sample_json()
                row.update(shard=info["name"], image_sha1=s["image_sha1"],
                           image_bytes=s["image_bytes"])
                rows.append(row)
                pids.add(rec.pid)
                images.add(rec.image_id)
            shard_infos.append({k: info[k] for k in ("name", "num_samples", "sha256", "bytes")})
        splits[split] = {"num_samples": sum(s["num_samples"] for s in shard_infos),
                         "num_ids": len(pids), "num_images": len(images),
                         "shards": shard_infos}
    skipped = [s for info in done.values() for s in info["skipped"]]
    if skipped:
        log.warning("%d image(s) could not be read and were left out, e.g. %s", len(skipped),
                    "; ".join(s["error"] for s in skipped[:3]))
    train = [r for shards in plan.get("train", []) for r in shards]
    meta = {"format": fmt, "options": asdict(options), "splits": splits,
            "num_classes": max((r.pid for r in train), default=-1) + 1, "tokenizer": None,
            "skipped_images": len(skipped)}
    return rows, meta
