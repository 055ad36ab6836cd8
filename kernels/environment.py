"""The machine, versions, commit and command behind a results file: one record for every tool.

    environment("tbps bench kernels", argv)   # {"cpu": ..., "torch": ..., "commit": ..., ...}
    python -m tbps.kernels.environment --command "bash kernels/gpu_check.sh"   # as JSON

Keys: cpu (lscpu's model name), cores, threads (torch's), gpu (name, memory, SMs and
architecture; None without one), python, torch, cuda, triton, transformers, deepspeed, accelerate
(None where not installed), commit (HEAD, "-dirty" with uncommitted changes to tracked files;
KERNELS_COMMIT where the copy has no .git), command and time. A tool adds its own fields.
Nothing of the trainer is imported here: kernels is the lowest layer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "triton", "transformers", "deepspeed", "accelerate")


def _run(cmd: list[str]) -> str | None:
    """stdout of a short command, None where it cannot run or fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def cpu_model() -> str:
    """lscpu's model name, else what platform knows."""
    for line in (_run(["lscpu"]) or "").splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def commit() -> str:
    """HEAD, with "-dirty" where tracked files have uncommitted changes."""
    head = _run(["git", "rev-parse", "HEAD"])
    if not head:                            # a copy without .git (the GPU machine's): say so
        return os.environ.get("KERNELS_COMMIT", "unknown")
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + ("-dirty" if dirty else "")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(prog: str, argv: list[str] | None = None) -> dict:
    """The record; command = prog and argv (default: this process's arguments)."""
    import torch  # kept off this module's import: the study's command line starts without it

    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = (f"{torch.cuda.get_device_name(0)} ({p.total_memory / 2**30:.0f} GiB, "
               f"{p.multi_processor_count} SMs, sm_{p.major}{p.minor})")
    argv = sys.argv[1:] if argv is None else list(argv)
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": gpu, "python": platform.python_version(),
            **{name: _version(name) for name in PACKAGES}, "cuda": torch.version.cuda,
            "commit": commit(), "command": " ".join([prog, *argv]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tbps.kernels.environment",
                                description=__doc__.split("\n")[0])
    p.add_argument("--command", default="python -m tbps.kernels.environment",
                   help="the command to record")
    args = p.parse_args(argv)
    print(json.dumps(environment(args.command, []), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
