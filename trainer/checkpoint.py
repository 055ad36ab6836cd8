"""Training checkpoints: atomic, resumable mid-epoch, pruned; and portable model weights.

Layout of a run folder:
    checkpoints/step-00000420/   accelerate state (model, optimizer, per-rank RNG; DeepSpeed's
                                 own partitioned files under ZeRO) + trainer_state.json
    checkpoints/latest           name of the newest complete checkpoint
    best/, final/                model.safetensors (consolidated weights), config.yaml, tokenizer/

A checkpoint is written to `<name>.partial` by every rank and renamed by rank 0 once all ranks
are done, so an interrupted save never looks complete. `trainer_state.json` holds the epoch, the
number of batches of that epoch already trained on, the optimizer step and the best score:
together with the loader's deterministic order this resumes in the middle of an epoch.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer import dist

CKPT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    samples_seen: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    history: list = field(default_factory=list)


def save(acc, run_dir: Path, state: TrainState, keep: int, ema=None) -> Path:
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{state.step:08d}"
    tmp = root / (final.name + ".partial")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    acc.save_state(str(tmp))
    if ema is not None:              # every rank its own fragments
        torch.save(ema.state_dict(), tmp / f"ema-rank{dist.rank():05d}.pt")
    dist.barrier()
    if acc.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
        _prune(root, keep)
    dist.barrier()
    return final


def find(run_dir: Path, resume: str) -> Path:
    """The checkpoint folder `resume` names ("latest" or a path); a clear error if none."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        return path
    root = Path(run_dir) / CKPT_DIR
    pointer = root / LATEST
    if pointer.is_file() and (root / pointer.read_text().strip() / STATE_FILE).is_file():
        return root / pointer.read_text().strip()
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    if not done:
        raise FileNotFoundError(f"--resume latest: no complete checkpoint under {root}")
    return done[-1]


def load(acc, path: Path, ema=None) -> TrainState:
    acc.load_state(str(path))
    if ema is not None:
        shard = Path(path) / f"ema-rank{dist.rank():05d}.pt"
        if not shard.is_file():
            raise FileNotFoundError(f"{shard} is missing: the checkpoint has no EMA for this rank")
        ema.load_state_dict(torch.load(shard, weights_only=True))
    return TrainState(**json.loads((Path(path) / STATE_FILE).read_text()))


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)
