"""ITM re-ranking on and off, on the finished runs of a noise study (AGA's acceptance).

    python launch/rerank_study.py --runs runs/noise-study/pretrained --methods aga \\
        --k 128 --results launch/results/aga_ablations

For every finished run of the methods (<runs>/<method>/<noise>-s<seed>/best), the test split is
evaluated once more with `tbps evaluate --itm-rerank K` (skipped when its
rerank-K.json exists). The table gives, per method and noise rate, R1 / mAP / mINP without and
with re-ranking (mean and standard deviation over training seeds), the paired per-seed
difference (on - off) with a t-interval, and the cost (seconds and queries/s on this machine).
Written to <results>/rerank.md and rerank.json with the CPU model, versions, commit and command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tbps.kernels.environment import environment

REPO = Path(__file__).resolve().parents[1]
METRICS = ("R1", "mAP", "mINP")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def rerank(run: Path, k: int) -> dict:
    out = run / f"rerank-{k}.json"
    if not out.exists():
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("TRITON_INTERPRET", None)
        tmp = run / f"rerank-{k}"
        subprocess.run([sys.executable, "-m", "tbps.trainer.inference.evaluate", str(run / "best"), "--split",
                        "test", "--itm-rerank", str(k), "--out", str(tmp)], check=True, cwd=REPO,
                       env=env, stdout=subprocess.DEVNULL)
        (tmp / "evaluation.json").replace(out)
        tmp.rmdir()
    return json.loads(out.read_text())["metrics"]


def interval(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return f"{diffs[0]:+.2f}" if diffs else "-"
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    h = T975.get(len(diffs) - 1, 2.0) * sd / math.sqrt(len(diffs))
    return f"{m:+.2f} [{m - h:+.2f}, {m + h:+.2f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/noise-study/pretrained")
    p.add_argument("--methods", nargs="+", default=["aga"])
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--results", default="launch/results/aga_ablations")
    args = p.parse_args(argv)
    rows = []
    for method in args.methods:
        for run in sorted((Path(args.runs) / method).glob("*-s*")):
            if not (run / "best" / "model.safetensors").exists():
                continue
            print(f"re-ranking {run}", flush=True)
            m = rerank(run, args.k)
            plain, ranked = next(iter(m.values())), next(v for n, v in m.items() if "+ITM@" in n)
            noise = run.name.rsplit("-s", 1)[0]
            rows.append({"method": method, "noise": noise, "seed": int(run.name.rsplit("-s", 1)[1]),
                         "off": {k: plain[k] for k in METRICS},
                         "on": {k: ranked[k] for k in METRICS},
                         "seconds": ranked["rerank_seconds"],
                         "queries_per_s": ranked["rerank_queries_per_s"]})
    lines = [f"ITM re-ranking of the top {args.k} (test split; mean +- std over training seeds; "
             "paired difference on - off with a 95 % t-interval)", "",
             "| method | noise | seeds | R1 off | R1 on | R1 on - off | mAP off | mAP on | mINP off |"
             " mINP on | seconds | queries/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["noise"]), []).append(r)
    for (method, noise), rs in sorted(groups.items()):
        def ms(side, k):
            v = [r[side][k] for r in rs]
            return f"{statistics.fmean(v):.1f} +- {statistics.stdev(v) if len(v) > 1 else 0:.1f}"
        lines.append(f"| {method} | {noise} | {len(rs)} | {ms('off', 'R1')} | {ms('on', 'R1')} | "
                     f"{interval([r['on']['R1'] - r['off']['R1'] for r in rs])} | "
                     f"{ms('off', 'mAP')} | {ms('on', 'mAP')} | {ms('off', 'mINP')} | "
                     f"{ms('on', 'mINP')} | {statistics.fmean(r['seconds'] for r in rs):.1f} | "
                     f"{statistics.fmean(r['queries_per_s'] for r in rs):.0f} |")
    env = environment("python launch/rerank_study.py", argv)
    lines += ["", f"CPU: {env['cpu']}; commit {env['commit']}; command: `{env['command']}`"]
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rerank.md").write_text("\n".join(lines) + "\n")
    (out / "rerank.json").write_text(json.dumps({"k": args.k, **env, "runs": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
