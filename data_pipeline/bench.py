"""Loader throughput: samples/s per CPU core for read + decode + augment + tokenize (+ batch).

    python -m data_pipeline bench shards/synth384 --samples 4000

Runs the training stream in this process on one core (torch and its helpers limited to one
thread, no loader workers), first stage by stage to show where the time goes, then end to end
through `TrainLoader` exactly as training uses it. The loader hands uint8 images and erase boxes
to the trainer, which normalises them on its device; what that step would cost on this CPU is
reported beside. Prints a table and one JSON line last.
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
from data_pipeline.transforms import TrainAugment, normalize_images


def _drain(source) -> float:
    t0 = time.perf_counter()
    for _ in source:
        pass
    return time.perf_counter() - t0


def run_bench(shard_dir, tokenizer, *, samples: int = 2000, batch_size: int = 64,
              image_size=(384, 128), split: str = "train") -> dict:
    torch.set_num_threads(1)
    root = Path(shard_dir)
    info = split_info(read_meta(root), split)
    stats = L.LoaderStats(L._mp_context())
    n = min(samples, info.num_samples)
    augment = TrainAugment()
    stages = [
        ("read", lambda src: L.read_pieces(src, root, stats, 100)),
        ("parse", lambda src: L.parse_samples(src, stats, 100)),
        ("decode", lambda src: L.decode_images(src, image_size, stats, 100)),
        ("augment", lambda src: L.augment_samples(src, augment, 0, 0)),
        ("tokenize", lambda src: L.tokenize_samples(src, tokenizer)),
        ("batch", lambda src: L.batch_samples(src, batch_size)),
    ]
    # streaming, as in training: the time of each prefix of the stage list, minus the previous
    prefix, per_stage = 0.0, {}
    for i, (name, _) in enumerate(stages):
        source = iter(L.ranges_of(list(info.shards), 0, n))
        for _, stage in stages[: i + 1]:
            source = stage(source)
        total = _drain(source)
        per_stage[name], prefix = max(total - prefix, 0.0), total

    cfg = L.LoaderConfig(batch_size=batch_size, image_size=tuple(image_size), num_workers=0)
    train = L.TrainLoader(root, tokenizer, cfg, split=split)
    want = max(1, min(train.num_batches, n // batch_size))
    got, t_loader = 0, 0.0
    for epoch in range(2):                       # the first epoch warms the page cache
        t0, got = time.perf_counter(), 0
        for i, batch in enumerate(train.epoch(epoch)):
            got += batch["input_ids"].shape[0]
            if i + 1 == want:
                break
        t_loader = time.perf_counter() - t0
    shape = tuple(batch["image"].shape[1:3])
    t0 = time.perf_counter()
    normalize_images(batch["image"], batch["erase"])
    t_norm = (time.perf_counter() - t0) / batch["image"].shape[0]
    return {
        "samples": n, "image_size": list(shape), "batch_size": batch_size,
        "per_sample_us": {k: round(v / n * 1e6, 1) for k, v in per_stage.items()},
        "stages_samples_per_s": round(n / prefix, 1),
        "loader_samples_per_s_per_core": round(got / t_loader, 1),
        "normalize_on_cpu_us": round(t_norm * 1e6, 1),
        "jpeg_decoder": "simplejpeg" if L.simplejpeg is not None else "PIL",
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
    table.add_row("(normalise + erase, done on the device: us/sample on this CPU)",
                  f"{result['normalize_on_cpu_us']:.1f}")
    Console().print(table)
    print(json.dumps(result))
