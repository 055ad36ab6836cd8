"""Loader throughput: samples/s per CPU core for read + decode + augment + tokenize (+ batch).

    python -m data_pipeline bench shards/synth384 --samples 4000

Runs the training stream in this process on one core (torch and its helpers limited to one
thread, no loader workers), first stage by stage to show where the time goes, then end to end
through `TrainLoader` exactly as training uses it. Prints a table and one JSON line last.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline import loader as L
from data_pipeline.manifest import read_meta, split_info
from data_pipeline.transforms import TrainAugment


def _timed(stage, items):
    t0 = time.perf_counter()
    out = list(stage(items))
    return out, time.perf_counter() - t0


def run_bench(shard_dir, tokenizer, *, samples: int = 2000, batch_size: int = 64,
              image_size=(384, 128), split: str = "train") -> dict:
    torch.set_num_threads(1)
    root = Path(shard_dir)
    info = split_info(read_meta(root), split)
    ctx = L._mp_context()
    stats = L.LoaderStats(ctx)
    n = min(samples, info.num_samples)
    pieces = L.ranges_of(list(info.shards), 0, n)
    raw, t_read = _timed(lambda p: L.read_pieces(p, root, stats, 100), pieces)
    parsed, t_parse = _timed(lambda s: L.parse_samples(s, stats, 100), raw)
    decoded, t_decode = _timed(lambda s: L.decode_images(s, image_size, stats, 100), parsed)
    augmented, t_aug = _timed(lambda s: L.augment_samples(s, TrainAugment(), 0, 0), decoded)
    tokenized, t_tok = _timed(lambda s: L.tokenize_samples(s, tokenizer), augmented)
    _, t_batch = _timed(lambda s: L.batch_samples(s, batch_size), tokenized)
    stages = {"read": t_read, "parse": t_parse, "decode": t_decode, "augment": t_aug,
              "tokenize": t_tok, "batch": t_batch}

    cfg = L.LoaderConfig(batch_size=batch_size, image_size=tuple(image_size), num_workers=0)
    train = L.TrainLoader(root, tokenizer, cfg, split=split)
    want = max(1, min(train.num_batches, n // batch_size))
    t0, got = time.perf_counter(), 0
    for i, batch in enumerate(train.epoch(0)):
        got += batch["input_ids"].shape[0]
        if i + 1 == want:
            break
    t_loader = time.perf_counter() - t0
    shape = tuple(batch["image"].shape[-2:])
    return {
        "samples": n, "image_size": list(shape), "batch_size": batch_size,
        "per_sample_us": {k: round(v / n * 1e6, 1) for k, v in stages.items()},
        "stages_samples_per_s": round(n / sum(stages.values()), 1),
        "loader_samples_per_s_per_core": round(got / t_loader, 1),
        "cpu": platform.processor() or platform.machine(), "cores_used": 1,
        "torch": torch.__version__, "numpy": np.__version__,
        "pillow": __import__("PIL").__version__, "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"loader throughput, one core, images {result['image_size'][0]}x"
                        f"{result['image_size'][1]}, {result['samples']} samples")
    table.add_column("stage")
    table.add_column("us / sample", justify="right")
    for k, v in result["per_sample_us"].items():
        table.add_row(k, f"{v:.1f}")
    table.add_row("[bold]stages, samples/s", f"{result['stages_samples_per_s']:.0f}")
    table.add_row("[bold]TrainLoader, samples/s/core",
                  f"{result['loader_samples_per_s_per_core']:.0f}")
    Console().print(table)
    print(json.dumps(result))
