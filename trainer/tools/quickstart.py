"""The built-in default job: synthetic data -> shards -> 2-process CPU training -> metrics.

    tbps quickstart                       # everything under data/ and runs/
    tbps quickstart --epochs 2 --out runs/try
    tbps quickstart --train-ids 300 --epochs 3 train.precision=fp32   # smaller

Steps (each skipped when its output already exists, so running the same command again after a
stop continues where it stopped):
  1. `tbps synth` : 1,000 train / 100 val / 200 test synthetic identities
     (--train-ids changes the first; the data then goes to <data>/synth-t<N>)
  2. `tbps shard` : webdataset shards + manifest + word-level tokenizer
  3. `tbps launch` (accelerate launch with launch/accelerate/cpu_ddp.yaml, 2
     processes over gloo) of `tbps.trainer.train` with launch/configs/irra_synth.yaml; its precision
     is auto: bf16 on a CPU with bf16 instructions, fp32 elsewhere
  4. the test metrics of the best (val-selected) and final weights, as a table

Exit codes: 0 done; 2 bad input (the step that failed says what); 3 stopped by SIGTERM, SIGUSR1
or Ctrl-C (the training writes a checkpoint first): run the same command again to continue.
Every step runs as a child process that ends with this one.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tbps.trainer.launch import die_with_parent

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRAIN_IDS = 1000
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


class StepFailed(Exception):
    def __init__(self, step: str, code: int):
        super().__init__(step)
        self.step, self.code = step, code


def _run(step: str, cmd: list[str], env: dict | None = None) -> None:
    """A step as a child process: signals sent to this process reach it (a stop request), and
    it ends if this process dies. Ctrl-C reaches it from the terminal by itself."""
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)

    def forward(_signum, _frame):       # every step takes SIGTERM as its stop request
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)   # the child decides
    try:
        code = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if code != 0:
        raise StepFailed(step, code)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tbps quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data", help="folder for the dataset and its shards")
    p.add_argument("--out", default="runs/quickstart", help="run folder")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--train-ids", type=int, default=DEFAULT_TRAIN_IDS,
                   help=f"training identities of the synthetic data (default {DEFAULT_TRAIN_IDS})")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--config", default=str(REPO / "launch/configs/irra_synth.yaml"))
    p.add_argument("overrides", nargs="*", help="extra section.field=value overrides")
    args = p.parse_args(argv)
    for name in ("epochs", "train_ids", "processes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    try:
        return _quickstart(args)
    except StepFailed as exc:
        if exc.code == 3 or exc.code < 0:
            print(f"quickstart: stopped during {exc.step}; run the same command again to "
                  "continue (finished steps are skipped, the training resumes from its "
                  "checkpoint)", file=sys.stderr)
            return 3
        if exc.code == 2:
            print(f"quickstart: {exc.step} refused its input (see the message above)",
                  file=sys.stderr)
            return 2
        print(f"quickstart: {exc.step} failed with exit code {exc.code} (see above)",
              file=sys.stderr)
        return 1


def _quickstart(args) -> int:
    t0 = time.time()
    py = sys.executable
    name = "synth" if args.train_ids == DEFAULT_TRAIN_IDS else f"synth-t{args.train_ids}"
    data, shards, run = Path(args.data) / name, Path(args.data) / f"{name}-shards", Path(args.out)
    if not (data / "reid_raw.json").exists():
        # a folder without the annotation file is this command's own interrupted output
        extra = ["--overwrite"] if (data / "imgs").exists() else []
        _run("synth", [py, "-m", "tbps.data_pipeline.cli", "synth", "--out", str(data), "--seed", "0",
                       "--train-ids", str(args.train_ids), "--workers", "2", "--quiet", *extra])
    if not (shards / "manifest.parquet").exists():
        _run("shard", [py, "-m", "tbps.data_pipeline.cli", "shard", "--format", "cuhk-pedes", "--root",
                       str(data), "--out", str(shards), "--workers", "2", "--quiet"])
    overrides = [f"data.shards={shards}", f"train.output_dir={run}", *args.overrides]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if (run / "checkpoints").exists():
        overrides.append("train.resume=latest")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false")
    _run("training", [py, "-m", "tbps.trainer.launch", "--config_file",
                      str(REPO / "launch/accelerate/cpu_ddp.yaml"), "--num_processes",
                      str(args.processes), "-m", "tbps.trainer.train", "--config", args.config,
                      *overrides], env=env)
    report = json.loads((run / "metrics.json").read_text())
    print(json.dumps({"quickstart_seconds": round(time.time() - t0, 1), "run": str(run),
                      "test": {k: report[k] for k in ("best", "final") if k in report}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
