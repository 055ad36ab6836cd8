"""The built-in default job: synthetic data -> shards -> 2-process CPU training -> metrics.

    python -m trainer.quickstart                       # everything under data/ and runs/
    python -m trainer.quickstart --epochs 2 --out runs/try

Steps (each skipped when its output already exists):
  1. `python -m data_pipeline synth` : 1,000 train / 100 val / 200 test synthetic identities
  2. `python -m data_pipeline shard` : webdataset shards + manifest + word-level tokenizer
  3. `accelerate launch` (launch/accelerate/cpu_ddp.yaml, 2 processes over gloo) of
     `trainer.train` with launch/configs/irra_synth.yaml
  4. the test metrics of the best (val-selected) and final weights, as a table
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data", help="folder for the dataset and its shards")
    p.add_argument("--out", default="runs/quickstart", help="run folder")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--config", default=str(REPO / "launch/configs/irra_synth.yaml"))
    p.add_argument("overrides", nargs="*", help="extra section.field=value overrides")
    args = p.parse_args(argv)
    t0 = time.time()
    py = sys.executable
    data, shards, run = Path(args.data) / "synth", Path(args.data) / "synth-shards", Path(args.out)
    if not (data / "reid_raw.json").exists():
        _run([py, "-m", "data_pipeline", "synth", "--out", str(data), "--seed", "0",
              "--workers", "2", "--quiet"])
    if not (shards / "manifest.parquet").exists():
        _run([py, "-m", "data_pipeline", "shard", "--format", "cuhk-pedes", "--root", str(data),
              "--out", str(shards), "--workers", "2", "--quiet"])
    overrides = [f"data.shards={shards}", f"train.output_dir={run}", *args.overrides]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if (run / "checkpoints").exists():
        overrides.append("train.resume=latest")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false")
    _run([py, "-m", "accelerate.commands.launch", "--config_file",
          str(REPO / "launch/accelerate/cpu_ddp.yaml"), "--num_processes", str(args.processes),
          "-m", "trainer.train", "--config", args.config, *overrides], env=env)
    report = json.loads((run / "metrics.json").read_text())
    print(json.dumps({"quickstart_seconds": round(time.time() - t0, 1), "run": str(run),
                      "test": {k: report[k] for k in ("best", "final") if k in report}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
