"""The pretrained backbone of the noise study: the small CLIP trained clean on a shifted population.

    tbps pretrain --out runs/backbone --benchmark data/study/synth
    tbps pretrain --out runs/backbone --benchmark data/study/synth \\
        --zero-shot data/study/shards-n00                     # + its test metrics there, untuned
    # tiny (seconds): tbps pretrain --out runs/bb --benchmark DIR --train-ids 20 \\
    #     --val-ids 4 train.max_steps=2

The person-retrieval papers fine-tune a CLIP pretrained on web pairs; this makes the stand-in:
  1. `tbps synth --population pretrain --disjoint-from BENCHMARK`: web-style
     captions and synonyms, studio backgrounds, web attribute frequencies, other framing and
     poses, its own seed, no identity of the benchmark (data_pipeline/synthetic.py
     pretrain_config);
  2. `tbps shard --tokenizer synthetic-vocab`: the one word-level vocabulary
     of every synthetic population, so the backbone reads the benchmark's captions;
  3. `accelerate launch -m tbps.trainer.train --config launch/configs/pretrain_synth.yaml` (ITC with
     identity targets, the file says why), weights selected on the population's val split;
  4. `tbps export`: OUT/backbone/, a transformers CLIP folder with its tokenizer, the
     folder `model.pretrained` (and `data.tokenizer=auto`) loads.
OUT/pretrain.json records the settings (the benchmark's generator config, the population's size
and seed, the training config's bytes and overrides, the process count). A second call with the
same settings reuses the backbone (an interrupted one continues where it stopped); with other
settings it stops and names what differs (--overwrite remakes it). `--zero-shot SHARDS` adds the
backbone's test metrics on those shards, untuned (OUT/backbone/zero_shot.json, per shards).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tbps.data_pipeline.synthetic import META_FILE, PRETRAIN_SEED
from tbps.trainer.common.config_files import load_config
from tbps.trainer.inference.evaluate import evaluate
from tbps.trainer.model.weights import build_model, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
RECORD = "pretrain.json"
STAGES = ("data", "shards", "run", "backbone")


@dataclass(frozen=True, kw_only=True)
class PretrainSettings:
    benchmark: str
    """The benchmark's synthetic dataset folder: the population never repeats its identities."""
    train_ids: int = 2000
    val_ids: int = 100
    images_per_id: int = 4
    seed: int = PRETRAIN_SEED
    """The population's generator seed."""
    shard_size: int = 256
    """Samples per shard (every rank needs shards of its own: small populations, small shards)."""
    config: str = "launch/configs/pretrain_synth.yaml"
    overrides: tuple[str, ...] = ()
    """Extra section.field=value for the training run (e.g. train.epochs=6)."""
    processes: int = 2
    accelerate_config: str = "launch/accelerate/cpu_ddp.yaml"
    """The launcher's config (not part of the record: the process count is)."""

    def record(self) -> dict:
        """What decides the backbone's weights, as JSON: compared between calls."""
        bench = Path(self.benchmark) / META_FILE
        if not bench.is_file():
            raise FileNotFoundError(f"--benchmark {self.benchmark}: no {META_FILE} there; give "
                                    "the folder `tbps synth` wrote")
        config = _path(self.config)
        return {"benchmark_config": json.loads(bench.read_text())[0]["config"],
                "train_ids": self.train_ids, "val_ids": self.val_ids,
                "images_per_id": self.images_per_id, "seed": self.seed,
                "shard_size": self.shard_size,
                "config": self.config,
                "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
                "overrides": list(self.overrides), "processes": self.processes}


def _path(p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() or p.exists() else REPO / p


def _run(cmd: list[str], log: Path | None = None) -> None:
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    if log is None:
        subprocess.run([str(c) for c in cmd], check=True, env=env)
        return
    with open(log, "a") as fh:
        proc = subprocess.run([str(c) for c in cmd], env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(str(c) for c in cmd[:6])} ... failed (exit "
                           f"{proc.returncode}); its output is in {log}")


def differences(have: dict, want: dict) -> list[str]:
    return [f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k)]


def ensure_backbone(out: str | Path, settings: PretrainSettings, *, overwrite: bool = False
                    ) -> Path:
    """OUT/backbone, made or reused; ValueError if OUT holds one of other settings."""
    out = Path(out)
    want = settings.record()
    record = out / RECORD
    if record.is_file():
        have = json.loads(record.read_text())["settings"]
        if have != want:
            if not overwrite:
                raise ValueError(f"{out} holds a backbone made with other settings ("
                                 f"{'; '.join(differences(have, want))}): pass --overwrite to "
                                 "remake it, or choose another --out")
            for name in STAGES:
                shutil.rmtree(out / name, ignore_errors=True)
            record.unlink()
    backbone = out / "backbone"
    if (backbone / "backbone.json").is_file():
        print(f"pretrain: reusing {backbone} (same settings)", flush=True)
        return backbone
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"settings": want}, indent=1) + "\n")
    t0 = time.time()
    py = sys.executable
    data, shards, run = out / "data", out / "shards", out / "run"
    if not (data / "reid_raw.json").is_file():
        _run([py, "-m", "tbps.data_pipeline.cli", "synth", "--out", data, "--population", "pretrain",
              "--disjoint-from", settings.benchmark, "--seed", settings.seed,
              "--train-ids", settings.train_ids, "--val-ids", settings.val_ids,
              "--test-ids", 1, "--images-per-id", settings.images_per_id, "--workers", 2,
              "--quiet", "--overwrite"])
    if not (shards / "manifest.parquet").is_file():
        _run([py, "-m", "tbps.data_pipeline.cli", "shard", "--format", "cuhk-pedes", "--root", data,
              "--out", shards, "--tokenizer", "synthetic-vocab", "--shard-size", settings.shard_size,
              "--workers", 2, "--quiet"])
    if not (run / "metrics.json").is_file():
        resume = ["train.resume=latest"] if (run / "checkpoints").exists() else []
        _run([py, "-m", "accelerate.commands.launch", "--config_file",
              _path(settings.accelerate_config), "--num_processes", settings.processes,
              "-m", "tbps.trainer.train", "--config", _path(settings.config), f"data.shards={shards}",
              f"train.output_dir={run}", *settings.overrides, *resume], log=out / "train.log")
    metrics = json.loads((run / "metrics.json").read_text())
    weights = run / ("best" if metrics.get("best_epoch") is not None else "final")
    partial = out / "backbone.partial"
    shutil.rmtree(partial, ignore_errors=True)
    _run([py, "-m", "tbps.trainer.inference.export", weights, partial], log=out / "export.log")
    summary = {"settings": want, "weights": str(weights.relative_to(out)),
               "pretrain_metrics": metrics.get("best") or metrics.get("final"),
               "pretrain_split": metrics.get("split"), "seconds": round(time.time() - t0, 1)}
    (partial / "backbone.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(backbone, ignore_errors=True)
    partial.rename(backbone)
    print(f"pretrain: wrote {backbone} in {summary['seconds']:.0f} s", flush=True)
    return backbone


def zero_shot(backbone: str | Path, shards: str | Path, split: str = "test") -> dict:
    """Metrics ({similarity: {R1, ...}}) on `shards` of the model `model.pretrained=backbone`
    builds, untuned; cached in backbone/zero_shot.json per shards folder, split and manifest."""
    backbone, shards = Path(backbone), Path(shards)
    cache = backbone / "zero_shot.json"
    key = f"{shards.resolve()}:{split}:" + hashlib.sha256(
        (shards / "manifest.parquet").read_bytes()).hexdigest()[:16]
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in known:
        known[key] = _evaluate_untuned(backbone, shards, split)
        cache.write_text(json.dumps(known, indent=1) + "\n")
    return known[key]


def _evaluate_untuned(backbone: Path, shards: Path, split: str) -> dict:

    info = backbone / "tbps_export.json"
    size = json.loads(info.read_text())["image_size"] if info.is_file() else [96, 32]
    cfg = load_config(None, ["method=null", f"model.pretrained={backbone}",
                             f"model.image_size={size}", f"data.shards={shards}",
                             "data.num_workers=0", "recipe.losses=[{kind: itc, alpha: 0.0}]"])
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer, num_classes=0, num_samples=1).eval()
    with torch.no_grad():
        return evaluate(model, cfg, tokenizer, split, torch.device("cpu"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tbps pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/backbone")
    p.add_argument("--benchmark", required=True, help="the benchmark's synthetic dataset folder")
    defaults = PretrainSettings(benchmark="")
    p.add_argument("--train-ids", type=int, default=defaults.train_ids)
    p.add_argument("--val-ids", type=int, default=defaults.val_ids)
    p.add_argument("--images-per-id", type=int, default=defaults.images_per_id)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--shard-size", type=int, default=defaults.shard_size)
    p.add_argument("--config", default=defaults.config)
    p.add_argument("--processes", type=int, default=defaults.processes)
    p.add_argument("--accelerate-config", default=defaults.accelerate_config)
    p.add_argument("--zero-shot", metavar="SHARDS", help="also evaluate the backbone untuned on "
                   "the test split of these shards")
    p.add_argument("--overwrite", action="store_true", help="remake a backbone of other settings")
    p.add_argument("overrides", nargs="*", help="section.field=value for the training run")
    args = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(PretrainSettings)}
    settings = PretrainSettings(**{k: v for k, v in vars(args).items() if k in fields
                                   and k != "overrides"}, overrides=tuple(args.overrides))
    try:
        backbone = ensure_backbone(args.out, settings, overwrite=args.overwrite)
        result = {"backbone": str(backbone)}
        if args.zero_shot:
            result["zero_shot"] = zero_shot(backbone, args.zero_shot)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
