"""The data pipeline's verbs of `tbps`: synth, shard, verify, stats and `bench data`.

    tbps synth  --out data/synth --seed 0               # CUHK-PEDES format
    tbps synth  --out data/pretrain --population pretrain --disjoint-from data/synth
    tbps shard  ... --tokenizer synthetic-vocab         # one vocabulary for both
    tbps shard  --format cuhk-pedes --root data/synth --out shards/synth
    tbps verify shards/synth
    tbps stats  shards/synth
    tbps bench data shards/synth384                         # samples/s per core

Real data:  --format cuhk-pedes --root data/CUHK-PEDES (reid_raw.json + imgs/),
            --format icfg-pedes --root data/ICFG-PEDES (ICFG-PEDES.json + imgs/),
            --format rstpreid   --root data/RSTPReid   (data_captions.json + imgs/).
Noisy correspondence (RDE protocol on the train split): --noise-rate 0.5 --noise-seed 0, or
--noise-index CUHK-PEDES_0.5.npy (RDE's noiseindex/ files: the paper's exact noisy pairs);
--write-noise-index FILE.npy saves the noise applied in that layout, for another code to load.

Exit codes: 0 done; 1 `verify` found problems; 2 bad input (a missing or damaged file, a wrong
value, an impossible combination: one paragraph on stderr saying what and what to do); 3 stopped
by SIGTERM or Ctrl-C (the message says how to continue; `shard` resumes where it stopped).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tbps.data_pipeline.schema import DEFAULT_SHARD_SIZE, SPLITS
from tbps.data_pipeline.workers import stop_on_signals


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HEIGHTxWIDTH such as 384x128, got {text!r}") from None
    return h, w


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


# config fields named in error messages -> the flags that set them
_FLAGS = {"SynthConfig.num_train_ids": "--train-ids", "SynthConfig.num_val_ids": "--val-ids",
          "SynthConfig.num_test_ids": "--test-ids", "SynthConfig.images_per_id": "--images-per-id",
          "SynthConfig.height": "--image-size (height)", "SynthConfig.width": "--image-size (width)",
          "SynthConfig.seed": "--seed", "shard_size": "--shard-size", "resize": "--resize",
          "SynthConfig.caption_style": "--caption-style", "SynthConfig.background": "--background",
          "SynthConfig.attribute_profile": "--attribute-profile",
          "noise_rate": "--noise-rate"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tbps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate the synthetic person dataset (CUHK-PEDES format)")
    s.add_argument("--out", required=True)
    s.add_argument("--population", choices=["benchmark", "pretrain"], default="benchmark",
                   help="pretrain: web-style captions, studio backgrounds, web attribute "
                        "frequencies, other framing and seed, no identity of the benchmark")
    s.add_argument("--disjoint-from", metavar="DIR",
                   help="a synthetic dataset whose identities this one must not repeat "
                        "(default for --population pretrain: the default benchmark)")
    s.add_argument("--caption-style", choices=["pedestrian", "web"])
    s.add_argument("--background", choices=["street", "studio"])
    s.add_argument("--attribute-profile", choices=["pedestrian", "web"])
    s.add_argument("--seed", type=int, help="default: 0 (benchmark), 101 (pretrain)")
    s.add_argument("--train-ids", type=int, default=1000)
    s.add_argument("--val-ids", type=int, default=100)
    s.add_argument("--test-ids", type=int, default=200)
    s.add_argument("--images-per-id", type=int, default=4)
    s.add_argument("--image-size", type=_size, default=(96, 32), help="HEIGHTxWIDTH")
    s.add_argument("--workers", type=_positive, default=1)
    s.add_argument("--preview", help="also write a PNG contact sheet here")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("shard", help="annotations + images -> webdataset shards + manifest")
    s.add_argument("--format", required=True, choices=["cuhk-pedes", "icfg-pedes", "rstpreid"])
    s.add_argument("--root", required=True, help="dataset folder (annotation file + imgs/)")
    s.add_argument("--out", required=True)
    s.add_argument("--shard-size", type=_positive, default=DEFAULT_SHARD_SIZE)
    s.add_argument("--resize", type=_size, help="HEIGHTxWIDTH to resize images to")
    s.add_argument("--noise-rate", type=float, help="default 0 (no noise)")
    s.add_argument("--noise-seed", type=int, help="default 0")
    s.add_argument("--noise-index", metavar="FILE.npy",
                   help="the noisy pairs from an index file in RDE's layout (its noiseindex/*.npy): "
                        "pair i takes the caption of train pair FILE[i]; instead of --noise-rate "
                        "and --noise-seed")
    s.add_argument("--write-noise-index", metavar="FILE.npy",
                   help="also save the train split's noise in that layout")
    s.add_argument("--shuffle-seed", type=int, default=0)
    s.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    s.add_argument("--tokenizer", choices=["word-level", "synthetic-vocab", "none"],
                   default="word-level", help="synthetic-vocab: one vocabulary for every "
                   "synthetic population (shards of each get the same ids)")
    s.add_argument("--workers", type=_positive, default=1)
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("verify", help="check every shard against the manifest")
    s.add_argument("shards")
    s.add_argument("--workers", type=_positive, default=1)

    s = sub.add_parser("stats", help="per-split counts from the manifest")
    s.add_argument("shards")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("bench", prog="tbps bench data", help="loader samples/s per CPU core")
    s.add_argument("shards")
    s.add_argument("--samples", type=_positive, default=2000)
    s.add_argument("--batch-size", type=_positive, default=64)
    s.add_argument("--image-size", type=_size, default=(384, 128))
    s.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the shards' own)")
    s.add_argument("--repeats", type=_positive, default=3,
                   help="timed rounds of decode-only vs TrainLoader (median and range)")
    for sp in sub.choices.values():
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with stop_on_signals():
            return COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:                     # StopRequested too
        what = "SIGINT" if type(exc) is KeyboardInterrupt else str(exc)
        print(f"stopped by {what}: {_how_to_continue(args)}", file=sys.stderr)
        return 3
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {_describe(exc)}", file=sys.stderr)
        return 2


def _describe(exc: Exception) -> str:
    """The message of a user error: the exception's own where it names the thing and what to
    do (this package's are written so); a hint added to the system's bare ones."""
    if isinstance(exc, BrokenProcessPool):
        return (f"a worker process died ({exc}), e.g. killed for memory; run the command again "
                "(with fewer --workers if memory is short; shard resumes)")
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        hints = {errno.ENOENT: "check the path", errno.EACCES: "check its permissions",
                 errno.ENOSPC: "free some space and run the command again",
                 errno.ENOTDIR: "a part of the path is a file, not a folder",
                 errno.EISDIR: "it is a folder; give a file path"}
        hint = hints.get(exc.errno, "check the path")
        return f"{exc.filename}: {exc.strerror.lower()}; {hint}"
    text = str(exc) or type(exc).__name__
    for field, flag in _FLAGS.items():
        text = re.sub(rf"\b{re.escape(field)}\b", flag, text)
    return text


def _how_to_continue(args) -> str:
    if args.command == "shard":
        return (f"the shards written so far are kept in {args.out}; run the same command again "
                "to continue (finished shards are skipped)")
    if args.command == "synth":
        return (f"the dataset in {args.out} is incomplete; run the same command with --overwrite "
                "to generate it again")
    return "nothing was changed; run the command again"


# Each verb imports its module when it runs: `--help` and the other verbs skip numpy, PIL,
# pyarrow and torch.


def _synth(args) -> int:
    from tbps.data_pipeline.synth_population import SynthConfig, pretrain_config  # numpy: lazy
    from tbps.data_pipeline.synth_preview import preview  # PIL: lazy
    from tbps.data_pipeline.synth_writer import generate  # PIL: lazy

    fields = dict(num_train_ids=args.train_ids, num_val_ids=args.val_ids,
                  num_test_ids=args.test_ids, images_per_id=args.images_per_id,
                  height=args.image_size[0], width=args.image_size[1])
    fields.update({k: v for k, v in (("seed", args.seed), ("caption_style", args.caption_style),
                                     ("background", args.background),
                                     ("attribute_profile", args.attribute_profile)) if v is not None})
    if args.disjoint_from:
        fields["disjoint_from"] = _synth_config_of(args.disjoint_from)
    if args.population == "pretrain":
        cfg = pretrain_config(**fields)
    else:
        cfg = SynthConfig(**fields)
    summary = generate(args.out, cfg, workers=args.workers, progress=not args.quiet,
                       overwrite=args.overwrite)
    if args.preview:
        preview(args.out, args.preview)
    print(json.dumps(summary))
    return 0


def _synth_config_of(folder: str):
    from tbps.data_pipeline.synth_population import SynthConfig  # numpy: lazy
    from tbps.data_pipeline.synth_writer import META_FILE  # PIL: lazy

    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--disjoint-from {folder}: no {META_FILE} there; give a folder "
                                "written by `tbps synth`")
    try:
        return SynthConfig.from_json(json.loads(path.read_text())[0]["config"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"--disjoint-from {folder}: {path} is damaged or from another version "
                         f"({exc}); generate that dataset again") from None


def _shard(args) -> int:
    from tbps.data_pipeline.sharding import ShardOptions, shard_dataset  # PIL, pyarrow: lazy

    if args.noise_index is not None:
        given = [f for f, v in (("--noise-rate", args.noise_rate), ("--noise-seed", args.noise_seed))
                 if v is not None]
        if given:
            raise ValueError(f"--noise-index {args.noise_index} fixes the noisy pairs, so "
                             f"{' and '.join(given)} cannot be given with it; drop one or the other")
        noise = dict(noise_index=args.noise_index, noise_seed=None)
    else:
        noise = dict(noise_rate=0.0 if args.noise_rate is None else args.noise_rate,
                     noise_seed=0 if args.noise_seed is None else args.noise_seed)
    opts = ShardOptions(shard_size=args.shard_size, resize=args.resize,
                        shuffle_seed=args.shuffle_seed, on_error=args.on_error,
                        tokenizer=args.tokenizer, **noise)
    summary = shard_dataset(args.format, args.root, args.out, opts, workers=args.workers,
                            progress=not args.quiet, overwrite=args.overwrite,
                            write_noise_to=args.write_noise_index)
    print(json.dumps(summary))
    return 0


def _verify(args) -> int:
    from tbps.data_pipeline.verify import verify  # PIL, pyarrow: lazy

    problems = verify(args.shards, workers=args.workers, progress=not args.quiet)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) in {args.shards}")
    return 1 if problems else 0


def _stats(args) -> int:
    from tbps.data_pipeline.verify import stats  # PIL, pyarrow: lazy

    result = stats(args.shards)
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console  # rich: lazy, for the table alone
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
    from tbps.data_pipeline.bench import print_report, run_bench  # torch: lazy
    from tbps.data_pipeline.manifest import read_meta  # pyarrow: lazy
    from tbps.data_pipeline.tokenizer import CaptionTokenizer  # numpy: lazy

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


if __name__ == "__main__":
    sys.exit(main())
