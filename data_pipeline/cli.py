"""Command line of the data pipeline: `python -m data_pipeline <command>` (or `tbps-data`).

    python -m data_pipeline synth  --out data/synth --seed 0               # CUHK-PEDES format
    python -m data_pipeline shard  --format cuhk-pedes --root data/synth --out shards/synth
    python -m data_pipeline verify shards/synth
    python -m data_pipeline stats  shards/synth
    python -m data_pipeline bench  shards/synth384                         # samples/s per core

Real data:  --format cuhk-pedes --root data/CUHK-PEDES (reid_raw.json + imgs/),
            --format icfg-pedes --root data/ICFG-PEDES (ICFG-PEDES.json + imgs/),
            --format rstpreid   --root data/RSTPReid   (data_captions.json + imgs/).
Noisy correspondence (RDE protocol on the train split): --noise-rate 0.5 --noise-seed 0.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from data_pipeline.schema import DEFAULT_SHARD_SIZE, SPLITS


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HEIGHTxWIDTH such as 384x128, got {text!r}") from None
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate the synthetic person dataset (CUHK-PEDES format)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train-ids", type=int, default=1000)
    s.add_argument("--val-ids", type=int, default=100)
    s.add_argument("--test-ids", type=int, default=200)
    s.add_argument("--images-per-id", type=int, default=4)
    s.add_argument("--image-size", type=_size, default=(96, 32), help="HEIGHTxWIDTH")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--preview", help="also write a PNG contact sheet here")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("shard", help="annotations + images -> webdataset shards + manifest")
    s.add_argument("--format", required=True, choices=["cuhk-pedes", "icfg-pedes", "rstpreid"])
    s.add_argument("--root", required=True, help="dataset folder (annotation file + imgs/)")
    s.add_argument("--out", required=True)
    s.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    s.add_argument("--resize", type=_size, help="HEIGHTxWIDTH to resize images to")
    s.add_argument("--noise-rate", type=float, default=0.0)
    s.add_argument("--noise-seed", type=int, default=0)
    s.add_argument("--shuffle-seed", type=int, default=0)
    s.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    s.add_argument("--tokenizer", choices=["word-level", "none"], default="word-level")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("verify", help="check every shard against the manifest")
    s.add_argument("shards")
    s.add_argument("--workers", type=int, default=1)

    s = sub.add_parser("stats", help="per-split counts from the manifest")
    s.add_argument("shards")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("bench", help="loader samples/s per CPU core")
    s.add_argument("shards")
    s.add_argument("--samples", type=int, default=2000)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--image-size", type=_size, default=(384, 128))
    s.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the shards' own)")
    s.add_argument("--repeats", type=int, default=3,
                   help="timed rounds of decode-only vs TrainLoader (median and range)")
    for sp in sub.choices.values():
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _synth(args) -> int:
    from data_pipeline.synthetic import SynthConfig, generate, preview

    cfg = SynthConfig(seed=args.seed, num_train_ids=args.train_ids, num_val_ids=args.val_ids,
                      num_test_ids=args.test_ids, images_per_id=args.images_per_id,
                      height=args.image_size[0], width=args.image_size[1])
    summary = generate(args.out, cfg, workers=args.workers, progress=not args.quiet,
                       overwrite=args.overwrite)
    if args.preview:
        preview(args.out, args.preview)
    print(json.dumps(summary))
    return 0


def _shard(args) -> int:
    from data_pipeline.sharding import ShardOptions, shard_dataset

    opts = ShardOptions(shard_size=args.shard_size, resize=args.resize,
                        shuffle_seed=args.shuffle_seed, noise_rate=args.noise_rate,
                        noise_seed=args.noise_seed, on_error=args.on_error,
                        tokenizer=args.tokenizer)
    summary = shard_dataset(args.format, args.root, args.out, opts, workers=args.workers,
                            progress=not args.quiet, overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0


def _verify(args) -> int:
    from data_pipeline.verify import verify

    problems = verify(args.shards, workers=args.workers, progress=not args.quiet)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) in {args.shards}")
    return 1 if problems else 0


def _stats(args) -> int:
    from data_pipeline.verify import stats

    result = stats(args.shards)
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console
    from rich.table import Table

    splits = [s for s in SPLITS if s in result["splits"]]
    table = Table(title=f"{args.shards} ({result['format']}, {result['num_classes']} train ids)")
    table.add_column("")
    for split in splits:
        table.add_column(split, justify="right")
    for field in result["splits"][splits[0]]:
        table.add_row(field.replace("_", " "), *(str(result["splits"][s][field]) for s in splits))
    Console().print(table)
    return 0


def _bench(args) -> int:
    from pathlib import Path

    from data_pipeline.bench import print_report, run_bench
    from data_pipeline.manifest import read_meta
    from data_pipeline.tokenizer import CaptionTokenizer

    name = args.tokenizer or read_meta(args.shards).get("tokenizer")
    if name is None:
        raise ValueError("the shards have no tokenizer folder; pass --tokenizer")
    path = Path(args.shards) / name
    tok = CaptionTokenizer.from_pretrained(path if path.is_dir() else name)
    print_report(run_bench(args.shards, tok, samples=args.samples, batch_size=args.batch_size,
                           image_size=args.image_size, repeats=args.repeats))
    return 0


COMMANDS = {"synth": _synth, "shard": _shard, "verify": _verify, "stats": _stats,
            "bench": _bench}
