"""Writes the synthetic dataset in CUHK-PEDES's layout (reid_raw.json, imgs/), and its meta.

    OUT/reid_raw.json                 [{"split", "captions", "file_path", "processed_tokens", "id"}]
    OUT/imgs/synth/00001/00001_0.jpg  one JPEG per image (quality 95, RGB, 96 x 32 by default)
    OUT/synth_meta.json               the config and each identity's attributes (beyond the format)

The output depends on the config alone: byte-identical for a seed whatever the number of worker
processes.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tbps.data_pipeline.synth_captions import make_captions, tokenize
from tbps.data_pipeline.synth_population import Identity, SynthConfig, sample_identities
from tbps.data_pipeline.synth_render import render_image
from tbps.data_pipeline.workers import init_worker, stop_pool

ANNOTATION_FILE = "reid_raw.json"
META_FILE = "synth_meta.json"
IMAGE_SUBDIR = "synth"  # file_path prefix, under OUT/imgs/


def file_path(pid: int, k: int) -> str:
    return f"{IMAGE_SUBDIR}/{pid:05d}/{pid:05d}_{k}.jpg"


def _render_chunk(out_dir: str, config: SynthConfig, identities: list[Identity]) -> list[dict]:
    """Write the images of some identities; return their annotation records (worker task)."""
    images = Path(out_dir) / "imgs"
    records = []
    for ident in identities:
        (images / IMAGE_SUBDIR / f"{ident.id:05d}").mkdir(parents=True, exist_ok=True)
        for k in range(config.images_per_id):
            path = file_path(ident.id, k)
            render_image(ident, k, config).save(images / path, "JPEG", quality=config.jpeg_quality)
            captions = make_captions(ident, k, config)
            records.append({"split": ident.split, "captions": captions, "file_path": path,
                            "processed_tokens": [tokenize(c) for c in captions], "id": ident.id})
    return records


def _write_json_list(path: Path, items: list) -> None:
    """A JSON list, one item per line: readable, diffable and byte-stable; written atomically."""
    text = "[\n" + ",\n".join(json.dumps(x) for x in items) + "\n]\n"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; choose a folder")
    existing = [p for p in (out / ANNOTATION_FILE, out / "imgs" / IMAGE_SUBDIR) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a dataset ({', '.join(str(p) for p in existing)}); choose "
            "another output folder or pass overwrite=True (CLI: --overwrite) to replace it")
    if (out / ANNOTATION_FILE).exists() and not (out / META_FILE).exists():
        raise FileExistsError(
            f"{out / ANNOTATION_FILE} was not written by this generator (no {META_FILE} beside "
            "it), so it is not replaced, even with --overwrite; choose another output folder")
    for p in (out / ANNOTATION_FILE, out / META_FILE):
        p.unlink(missing_ok=True)  # first, so a failed run leaves no annotation file behind
    shutil.rmtree(out / "imgs" / IMAGE_SUBDIR, ignore_errors=True)
    (out / "imgs" / IMAGE_SUBDIR).mkdir(parents=True)


def _render_all(out: Path, config: SynthConfig, identities: list[Identity], workers: int,
                progress: bool, console) -> list[dict]:
    """Render in chunks of identities, in a pool when workers > 1; records come back in id order."""
    size = max(1, min(50, len(identities) // (8 * workers)))
    chunks = [identities[i:i + size] for i in range(0, len(identities), size)]
    task = _Task(str(out), config)
    # The pool starts before the progress bar's refresh thread: forking beside a thread can
    # deadlock. Fork (where there is one) needs no importable __main__, unlike spawn.
    methods = multiprocessing.get_all_start_methods()
    pool = None
    if workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = ctx.Pool(workers, initializer=init_worker, initargs=(os.getpid(),))
    columns = (TextColumn("synthetic ids"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    records = []
    try:
        with Progress(*columns, console=console, disable=not progress) as bar:
            bar_task = bar.add_task("ids", total=len(identities))
            results = pool.imap(task, chunks) if pool else map(task, chunks)  # imap keeps order
            for chunk, chunk_records in zip(chunks, results, strict=True):
                records.extend(chunk_records)
                bar.advance(bar_task, len(chunk))
    except BaseException:
        if pool:
            stop_pool(pool)
        raise
    if pool:
        pool.close()
        pool.join()
    return records


class _Task:
    """_render_chunk with its fixed arguments bound; picklable for Pool.imap."""

    def __init__(self, out_dir: str, config: SynthConfig):
        self.out_dir, self.config = out_dir, config

    def __call__(self, identities: list[Identity]) -> list[dict]:
        return _render_chunk(self.out_dir, self.config, identities)


def generate(out_dir: str | os.PathLike, config: SynthConfig, *, workers: int = 1,
             progress: bool = True, overwrite: bool = False) -> dict:
    """Write the dataset to out_dir; return a summary (counts per split, vocabulary size, seconds).

    The output depends on the config alone, not on workers. Images are written as they are drawn,
    reid_raw.json last, so its presence means the folder is complete. An out_dir that already holds
    a dataset raises FileExistsError unless overwrite=True. progress: print the config, a progress
    bar and the summary (to stderr).
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    start = time.perf_counter()
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    console = Console(stderr=True)
    if progress:
        console.print(f"synthetic: {config} -> {out} ({workers} worker(s))")
    identities = sample_identities(config)
    records = _render_all(out, config, identities, workers, progress, console)
    meta = [{"generator": "data_pipeline.synthetic", "config": config.to_json()}]
    _write_json_list(out / META_FILE, meta + [dataclasses.asdict(i) for i in identities])
    _write_json_list(out / ANNOTATION_FILE, records)
    summary = _summarize(records, out, time.perf_counter() - start)
    if progress:
        console.print(f"synthetic: {summary}")
    return summary


def _summarize(records: list[dict], out: Path, seconds: float) -> dict:
    ids = {s: set() for s in ("train", "val", "test")}
    images = dict.fromkeys(ids, 0)
    captions = dict.fromkeys(ids, 0)
    vocab, longest = set(), 0
    for r in records:
        ids[r["split"]].add(r["id"])
        images[r["split"]] += 1
        captions[r["split"]] += len(r["captions"])
        for tokens in r["processed_tokens"]:
            vocab.update(tokens)
            longest = max(longest, len(tokens))
    return {"out_dir": str(out), "ids": {s: len(v) for s, v in ids.items()}, "images": images,
            "captions": captions, "vocab_size": len(vocab), "max_caption_tokens": longest,
            "seconds": round(seconds, 3)}
