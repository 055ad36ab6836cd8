"""Loader throughput on one CPU core, against the rate of decoding the JPEGs alone.

    tbps bench data shards/synth384 --samples 2000 --repeats 3

Runs everything in this process on one core (torch limited to one thread, the tokenizer's
thread pool off, no loader workers):
1. the training stream stage by stage (read, parse, augment, batch, decode + flip/crop into the
   batch, tokenize), each time a prefix of the stage list, to show where the time goes (the
   decode-only rate below tells how much of the decode stage is the JPEG decoder);
2. then, `repeats` times in turn after one warm-up round: decoding the same samples' JPEG bytes
   from memory (the decode-only rate: what a loader that did nothing but decode would reach) and
   `TrainLoader` end to end exactly as training uses it. Their ratio is the loader's efficiency;
   it holds across CPUs where absolute rates do not. Median and range over the repeats are
   reported (another process on the machine shows up as spread).
The loader hands uint8 images and erase boxes to the trainer, which normalises them on its device;
what that step would cost on this CPU is reported beside. Prints a table and one JSON line last.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tbps.data_pipeline import stages
from tbps.data_pipeline.loader import TrainLoader
from tbps.data_pipeline.loader_config import LoaderConfig
from tbps.data_pipeline.loader_state import LoaderStats, mp_context
from tbps.data_pipeline.manifest import read_meta, split_info
from tbps.data_pipeline.partition import ranges_of
from tbps.data_pipeline.schema import IMAGE_EXTS
from tbps.data_pipeline.tar_reader import read_pieces
from tbps.data_pipeline.transforms import TrainAugment, normalize_images
from tbps.kernels.environment import environment

TARGET_RATIO = 0.40


def _drain(source) -> float:
    t0 = time.perf_counter()
    for _ in source:
        pass
    return time.perf_counter() - t0


def _spread(values: list[float], digits: int = 1) -> dict:
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


def stage_times(root: Path, info, tokenizer, n: int, batch_size: int, image_size) -> dict:
    """us per sample of each training stage (streaming: each prefix's time minus the last)."""
    stats = LoaderStats(mp_context())
    augment = TrainAugment()
    steps = [
        ("read", lambda src: read_pieces(src, root, stats, 100)),
        ("parse", lambda src: stages.parse_samples(src, stats, 100)),
        ("augment", lambda src: stages.augment_samples(src, augment, image_size, 0, 0)),
        ("batch", lambda src: stages.batch_samples(src, batch_size)),
        ("decode + flip/crop into the batch",
         lambda src: stages.collate_batches(src, image_size, stats, 100)),
        ("tokenize", lambda src: stages.tokenize_batches(src, tokenizer)),
    ]
    prefix, per_stage = 0.0, {}
    for i, (name, _) in enumerate(steps):
        source = iter(ranges_of(list(info.shards), 0, n))
        for _, stage in steps[: i + 1]:
            source = stage(source)
        total = _drain(source)
        per_stage[name], prefix = max(total - prefix, 0.0), total
    return {"per_sample_us": {k: round(v / n * 1e6, 1) for k, v in per_stage.items()},
            "stages_samples_per_s": round(n / prefix, 1)}


def run_bench(shard_dir, tokenizer, *, samples: int = 2000, batch_size: int = 64,
              image_size=(384, 128), split: str = "train", repeats: int = 3) -> dict:
    if repeats < 1 or samples < 1 or batch_size < 1:
        raise ValueError("--samples, --batch-size and --repeats must be at least 1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"     # one core: no tokenizer thread pool
    torch.set_num_threads(1)
    root = Path(shard_dir)
    info = split_info(read_meta(root), split)
    n = min(samples, info.num_samples)
    image_size = tuple(image_size)
    result = {"samples": n, "batch_size": batch_size}
    result.update(stage_times(root, info, tokenizer, n, batch_size, image_size))

    stats = LoaderStats(mp_context())
    jpegs = [next(v for k, v in s.items() if k in IMAGE_EXTS)
             for s in read_pieces(ranges_of(list(info.shards), 0, n), root, stats, 100)]
    cfg = LoaderConfig(batch_size=batch_size, image_size=image_size, num_workers=0,
                       pin_memory=False)
    train = TrainLoader(root, tokenizer, cfg, split=split)
    want = max(1, min(train.num_batches, n // batch_size))
    decode_rates, loader_rates = [], []
    for r in range(repeats + 1):                 # round 0 warms the page cache and the code
        t0 = time.perf_counter()
        for data in jpegs:
            stages.decode_image(data, image_size)
        decode_rate = len(jpegs) / (time.perf_counter() - t0)
        got, t0 = 0, time.perf_counter()
        for i, batch in enumerate(train.epoch(r)):
            got += batch["input_ids"].shape[0]
            if i + 1 == want:
                break
        loader_rate = got / (time.perf_counter() - t0)
        if r:
            decode_rates.append(decode_rate)
            loader_rates.append(loader_rate)
    ratios = [a / b for a, b in zip(loader_rates, decode_rates, strict=True)]
    t0 = time.perf_counter()
    normalize_images(batch["image"], batch["erase"])
    t_norm = (time.perf_counter() - t0) / batch["image"].shape[0]
    result.update({
        "image_size": list(batch["image"].shape[1:3]), "repeats": repeats,
        "decode_only_samples_per_s": _spread(decode_rates),
        "loader_samples_per_s_per_core": _spread(loader_rates),
        "loader_to_decode_ratio": _spread(ratios, 3), "target_ratio": TARGET_RATIO,
        "normalize_on_cpu_us": round(t_norm * 1e6, 1),
        "jpeg_decoder": "simplejpeg" if stages.simplejpeg is not None else "PIL",
        "cores_used": 1, "numpy": np.__version__, "pillow": __import__("PIL").__version__,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"), **environment("tbps bench data"),
    })
    return result


def print_report(result: dict) -> None:
    h, w = result["image_size"]
    table = Table(title=f"loader throughput, one core of {result['cpu']}, images {h}x{w}, "
                        f"{result['samples']} samples")
    table.add_column("stage")
    table.add_column("us / sample", justify="right")
    for k, v in result["per_sample_us"].items():
        table.add_row(k, f"{v:.1f}")
    table.add_row("[bold]stages, samples/s", f"{result['stages_samples_per_s']:.0f}")

    def spread(d, fmt):
        return f"{d['median']:{fmt}} ({d['min']:{fmt}}-{d['max']:{fmt}})"

    reps = result["repeats"]
    table.add_row(f"[bold]decode only, samples/s (median, range of {reps})",
                  spread(result["decode_only_samples_per_s"], ".0f"))
    table.add_row(f"[bold]TrainLoader, samples/s/core (median, range of {reps})",
                  spread(result["loader_samples_per_s_per_core"], ".0f"))
    table.add_row(f"[bold]TrainLoader / decode only (target >= {result['target_ratio']:.2f})",
                  spread(result["loader_to_decode_ratio"], ".3f"))
    table.add_row("(normalise + erase, done on the device: us/sample on this CPU)",
                  f"{result['normalize_on_cpu_us']:.1f}")
    Console().print(table)
    print(json.dumps(result))
