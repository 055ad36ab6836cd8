"""The noisy-correspondence study on the synthetic data: IRRA, TAL without division, and RDE.

    python launch/noise_study.py --out runs/noise-study                  # 0 % and 50 %, seeds 0 1
    python launch/noise_study.py --out runs/noise-study --rates 0 0.2 0.5 --seeds 0

Every run is `accelerate launch` with 2 CPU processes (launch/accelerate/cpu_ddp.yaml) on the
default synthetic dataset, sharded once per noise rate with the RDE protocol (noise seed 0), and
trained identically but for the method:
  irra      launch/configs/irra_synth.yaml           SDM + ID + MLM (the baseline)
  tal       launch/configs/rde_synth.yaml recipe.weighting.kind=none   BGE + TSE with TAL on
                                                every pair (the control: TAL's gain without division)
  rde       launch/configs/rde_synth.yaml            BGE + TSE, TAL, consensus division
A run whose metrics.json exists is skipped, so an interrupted study resumes. The table (test
Rank-1 / mAP of the val-selected weights; RDE's BGE+TSE row; the consensus's precision and recall
of "clean" at the last division) goes to <out>/results.md and results.json, with the commands,
versions and commit.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "irra": ("launch/configs/irra_synth.yaml", []),
    "tal": ("launch/configs/rde_synth.yaml", ["recipe.weighting.kind=none"]),
    "rde": ("launch/configs/rde_synth.yaml", []),
}


def run(cmd: list[str], log: Path | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    with open(log, "w") if log else open(os.devnull, "w") as fh:
        subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)


def prepare(data: Path, rates: list[float]) -> dict[float, Path]:
    py = sys.executable
    if not (data / "synth" / "reid_raw.json").exists():
        run([py, "-m", "data_pipeline", "synth", "--out", str(data / "synth"), "--seed", "0",
             "--workers", "2", "--quiet"])
    shards = {}
    for rate in rates:
        out = data / f"synth-n{int(round(rate * 100)):02d}"
        if not (out / "manifest.parquet").exists():
            run([py, "-m", "data_pipeline", "shard", "--format", "cuhk-pedes", "--root",
                 str(data / "synth"), "--out", str(out), "--noise-rate", str(rate),
                 "--noise-seed", "0", "--workers", "2", "--quiet"])
        shards[rate] = out
    return shards


def train(method: str, shards: Path, out: Path, seed: int, extra: list[str]) -> list[str]:
    config, overrides = METHODS[method]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch/accelerate/cpu_ddp.yaml"), "-m", "trainer.train",
           "--config", config, f"data.shards={shards}", f"train.output_dir={out}",
           f"train.seed={seed}", *overrides, *extra]
    if not (out / "metrics.json").exists():
        if (out / "checkpoints").exists():
            cmd.append("train.resume=latest")
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        run(cmd, out.parent / f"{out.name}.log")
        (out / "wall_seconds.txt").write_text(f"{time.time() - t0:.0f}\n")
    return cmd


def summarize(out: Path) -> dict:
    report = json.loads((out / "metrics.json").read_text())
    metrics = report.get("best") or report["final"]
    first = next(iter(metrics))                 # "t2i" or RDE's "BGE+TSE"
    row = {"R1": metrics[first]["R1"], "mAP": metrics[first]["mAP"], "similarity": first,
           "best_epoch": report["best_epoch"]}
    divisions = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
                 if '"epoch_start"' in line]
    divisions = [d for d in divisions if d.get("event") == "epoch_start"]
    if divisions and "ccd/consensus_precision" in divisions[-1]:
        last = divisions[-1]
        row.update(precision=last["ccd/consensus_precision"], recall=last["ccd/consensus_recall"],
                   kept=last["kept"], ccd_seconds=last["ccd_seconds"],
                   precision_by_epoch=[round(d["ccd/consensus_precision"], 3) for d in divisions])
    wall = out / "wall_seconds.txt"
    row["wall_s"] = int(wall.read_text()) if wall.exists() else None
    return row


def table(results: list[dict], rates: list[float]) -> str:
    lines = ["| method | " + " | ".join(f"R1 / mAP at {int(r * 100)} %" for r in rates) +
             " | R1 drop | consensus precision / recall (last division) |",
             "|---|" + "---|" * len(rates) + "---|---|"]
    for method in METHODS:
        cells, r1 = [], {}
        for rate in rates:
            rows = [r for r in results if r["method"] == method and r["rate"] == rate]
            if not rows:
                cells.append("-")
                continue
            r1[rate] = sum(r["R1"] for r in rows) / len(rows)
            cells.append(" · ".join(f"{r['R1']:.1f} / {r['mAP']:.1f}" for r in rows) +
                         f" (mean R1 {r1[rate]:.1f})")
        drop = f"{r1[rates[0]] - r1[rates[-1]]:.1f}" if len(r1) == len(rates) > 1 else "-"
        noisy = [r for r in results if r["method"] == method and r["rate"] == rates[-1]
                 and "precision" in r]
        div = " · ".join(f"{r['precision']:.3f} / {r['recall']:.3f}" for r in noisy) or "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {drop} | {div} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/noise-study")
    p.add_argument("--data", default="data")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("overrides", nargs="*", help="extra section.field=value for every run")
    args = p.parse_args(argv)
    out, rates = Path(args.out), sorted(args.rates)
    shards = prepare(Path(args.data), rates)
    results, commands = [], []
    for seed in args.seeds:
        for rate in rates:
            for method in args.methods:
                run_dir = out / f"{method}-n{int(round(rate * 100)):02d}-s{seed}"
                cmd = train(method, shards[rate], run_dir, seed, args.overrides)
                commands.append(" ".join(cmd).replace(sys.executable, "python")
                                .replace(f"{REPO}/", ""))
                results.append({"method": method, "rate": rate, "seed": seed,
                                **summarize(run_dir)})
                print(json.dumps(results[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    env = {"device": f"CPU ({os.cpu_count()} cores), 2 processes over gloo",
           "python": platform.python_version(), "torch": torch.__version__, "commit": commit,
           "command": "python launch/noise_study.py " + " ".join(argv or sys.argv[1:])}
    (out / "results.json").write_text(json.dumps({"environment": env, "runs": results,
                                                  "commands": commands}, indent=1))
    text = (f"# Noisy correspondence on the synthetic data\n\n{table(results, rates)}\n\n"
            f"Each cell: test R1 / mAP per seed ({', '.join(map(str, args.seeds))}), "
            "val-selected weights.\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n")
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
