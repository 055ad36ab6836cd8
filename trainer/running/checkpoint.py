"""Training checkpoints: atomic, verified, resumable mid-epoch and on another number of ranks.

Layout of a run folder:
    checkpoints/step-00000420/   accelerate state (model, optimizer, per-rank RNG; DeepSpeed's
                                 own partitioned files under ZeRO), ema-rankNNNNN.pt (each
                                 rank's EMA fragments), trainer_state.json, manifest.json
    checkpoints/latest           name of the newest complete checkpoint
    best/, final/                model.safetensors (consolidated weights), config.yaml, tokenizer/

Writing: every rank writes into `<name>.partial`; once all are done rank 0 writes
trainer_state.json, flushes every file to disk, and writes manifest.json (the size of every
file) last, then renames the folder into place (an older folder of the same name is moved aside
first, and removed only after). A save that fails (a full disk) or is killed leaves a `.partial`
folder that nothing reads and the next save removes: the last complete checkpoint is never
touched. Old checkpoints are pruned only after the new one is in place.

Reading (`find`): the newest checkpoint whose files match its manifest; a damaged one (a file
missing or of another size: truncated, half-copied) is named and skipped for the next older.
`load` reports a file that cannot be read, naming it, instead of loading half of it.

trainer_state.json holds the epoch, the batches of that epoch already trained on, the optimizer
step, the best score with its epoch and the evaluation history (a checkpoint at an epoch's end
is written after that epoch's evaluation), and the layout the run had (ranks, batch size,
accumulation, steps per epoch, total steps) so a resume on another layout can say what changes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from tbps.trainer.common import collective
from tbps.trainer.common.errors import RankError, is_collective_failure

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
DS_FOLDER = "pytorch_model"              # accelerate's name for DeepSpeed's own files
_multiarray = getattr(np, "_core", None) or np.core
# what accelerate's random states hold beside tensors: numpy's generator state (an array)
_NUMPY_GLOBALS = [_multiarray.multiarray._reconstruct, np.ndarray, np.dtype,
                  type(np.dtype(np.uint32))]


class CheckpointError(RankError):
    """A checkpoint that cannot be used or written (the message names it and what to do); any
    rank that meets it says so, since a rank's own files may be the damaged ones."""


@dataclass
class TrainState:
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    samples_seen: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    history: list = field(default_factory=list)
    layout: dict = field(default_factory=dict)
    """world_size, batch_size, grad_accum, batches_per_epoch (a rank's), steps_per_epoch,
    total_steps, epochs, zero_stage of the run that wrote the checkpoint."""


def ema_file(rank: int) -> str:
    return f"ema-rank{rank:05d}.pt"


def save(acc, run_dir: Path, state: TrainState, keep: int, ema=None) -> Path:
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{state.step:08d}"
    tmp = root / (final.name + ".partial")
    try:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        collective.barrier()
        acc.save_state(str(tmp))
        if ema is not None:              # every rank its own fragments
            torch.save(ema.state_dict(), tmp / ema_file(collective.rank()))
        collective.barrier()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
            _seal(tmp)
            _move_into_place(tmp, final)
            _write_atomic(root / LATEST, final.name)
            _prune(root, keep, final)
        collective.barrier()
    except OSError as exc:
        good = _newest_complete(root)
        raise CheckpointError(
            f"writing the checkpoint {final.name} failed: {exc}. The last complete checkpoint "
            f"({good or 'none yet'}) is untouched; free some space (or fix the folder) and "
            "continue with train.resume=latest") from None
    return final


def find(run_dir: Path, resume: str) -> tuple[Path, list[str]]:
    """The checkpoint `resume` names ("latest"/"auto" or a folder), and a line for every newer
    checkpoint skipped as damaged."""
    if resume not in ("latest", "auto"):
        path = Path(resume)
        problems = verify(path)
        if problems:
            raise CheckpointError(f"train.resume={resume}: {path} cannot be resumed from: "
                                  f"{'; '.join(problems)}")
        return path, []
    root = Path(run_dir) / CKPT_DIR
    skipped = []
    for path in _complete(root)[::-1]:
        problems = verify(path)
        if not problems:
            return path, skipped
        skipped.append(f"{path} is damaged ({'; '.join(problems[:3])}): skipped")
    detail = f" ({'; '.join(skipped)})" if skipped else ""
    raise CheckpointError(f"train.resume={resume}: no complete checkpoint under {root}{detail}; "
                          "start the run afresh (without train.resume) or point "
                          "train.resume at a checkpoint folder")


def verify(path: Path) -> list[str]:
    """What is wrong with a checkpoint folder (empty: nothing found)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        return [f"no {STATE_FILE} (not a complete checkpoint)"]
    try:
        json.loads((path / STATE_FILE).read_text())
    except (ValueError, OSError) as exc:
        return [f"{STATE_FILE} cannot be read ({exc})"]
    if not (path / MANIFEST).is_file():  # written before manifests: no sizes to compare with
        return _contents(path)
    try:
        sizes = json.loads((path / MANIFEST).read_text())["files"]
    except (ValueError, OSError, KeyError, TypeError) as exc:
        return [f"{MANIFEST} cannot be read ({exc})"]
    problems = []
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, {size} were written")
    return problems or _contents(path)


def safe_load(f: Path):
    """torch.load of a file accelerate or this project pickled, as tensors and plain values
    only (numpy arrays allowed, for the random states): a file that would run code on load
    raises instead (pickle.UnpicklingError)."""
    with torch.serialization.safe_globals(_NUMPY_GLOBALS):
        return torch.load(f, weights_only=True, map_location="cpu", mmap=True)


def _contents(path: Path) -> list[str]:
    """Files that a resume would unpickle or map, read here without running anything: the
    pickles outside DeepSpeed's own folder through `safe_load` (tensor data mapped, not read),
    safetensors by their header. DeepSpeed's own files (DS_FOLDER) are left to DeepSpeed."""
    problems = []
    for f in sorted(path.iterdir()):
        try:
            if f.suffix in (".pkl", ".bin", ".pt", ".pth"):
                safe_load(f)
            elif f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
        except Exception as exc:                    # noqa: BLE001 (any refusal or damage)
            problems.append(f"{f.name} cannot be read as tensors and plain values "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}): damaged, "
                            "or holding code that loading would run")
    return problems


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((Path(path) / STATE_FILE).read_text()))


def universal(acc, path: Path) -> Path:
    """`path` converted to DeepSpeed's universal checkpoint (optimizer state per parameter, not
    per rank) in `<name>.universal` beside it (the original is left as it is), with the
    engine told to load that form. Rank 0 converts once; later resumes reuse the folder."""
    path = Path(path)
    target = path.with_name(path.name + ".universal")
    if acc.is_main_process and not (target / STATE_FILE).is_file():

        tmp = path.with_name(path.name + ".universal.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(path / DS_FOLDER), "--output_folder", str(tmp / DS_FOLDER),
               "--inject_missing_state"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise CheckpointError(f"{path} could not be converted to a universal checkpoint for "
                                  f"another number of ranks ({done.stderr.strip()[-500:]}); "
                                  "resume on the number of ranks that wrote it")
        for f in path.iterdir():
            if f.is_file() and f.name != MANIFEST:
                shutil.copy2(f, tmp / f.name)
        os.replace(tmp, target)
    collective.barrier()
    acc.deepspeed_engine_wrapped.engine._config.load_universal_checkpoint = True
    return target


def load(acc, path: Path, ema=None) -> tuple[TrainState, list[str]]:
    """Model, optimizer, RNG and EMA state from a verified checkpoint, and what was done beyond
    loading (lines for the log); a file that cannot be read is an error naming it. The EMA is
    re-cut when the checkpoint's layout differs."""
    path = Path(path)
    state = TrainState(**json.loads((path / STATE_FILE).read_text()))
    _check_random_state(path, state)
    try:
        acc.load_state(str(path))
    except Exception as exc:                        # noqa: BLE001 (re-raised below)
        if is_collective_failure(exc):
            raise
        if '"recipe.' in str(exc) or "'recipe." in str(exc):
            raise CheckpointError(
                f"{path} was written by a version whose model kept its heads under `recipe.` "
                "(before weights format 3): resume it with that version; its best/ and final/ "
                "weights folders load in this one") from None
        raise CheckpointError(f"{path} cannot be loaded: {type(exc).__name__}: {exc}. The "
                              "checkpoint is damaged; resume from an older one with "
                              "train.resume=<its folder>") from None
    notes = [] if ema is None else _load_ema(path, ema)
    return state, notes


def set_aside(run_dir: Path, resumed: Path) -> list[Path]:
    """Rank 0: rename complete-looking checkpoints newer than the one resumed from (found
    damaged) to `<name>.damaged`, so nothing reads or prunes them; they are kept for a look."""
    moved = []
    for path in _complete(Path(run_dir) / CKPT_DIR):
        if path.name > Path(resumed).name:
            target = path.with_name(path.name + ".damaged")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
            moved.append(target)
            log.warning("set %s aside as %s", path, target.name)
    return moved


def _check_random_state(path: Path, state: TrainState) -> None:
    """accelerate skips a random-state file it cannot read with an info line; refuse instead."""
    rank, world = collective.rank(), state.layout.get("world_size", collective.world_size())
    f = path / f"random_states_{rank}.pkl"
    if rank >= world:
        return                              # this rank did not exist: a fresh random state
    if not f.is_file():
        raise RankError(f"{f} is missing: the checkpoint is incomplete; resume from an older one "
                        "with train.resume=<its folder>")
    try:
        safe_load(f)
    except Exception as exc:                        # noqa: BLE001 (any unpickling failure)
        raise RankError(f"{f} cannot be read ({type(exc).__name__}: {exc}): the checkpoint is "
                        "damaged; resume from an older one with train.resume=<its folder>") \
            from None


def _load_ema(path: Path, ema) -> list[str]:
    own = path / ema_file(collective.rank())
    files = sorted(path.glob("ema-rank*.pt"))
    if not files:
        raise CheckpointError(f"{path} holds no EMA (ema-rank*.pt) but this run has a momentum "
                              "model: resume it with the same recipe")
    try:
        if own.is_file():
            state = torch.load(own, weights_only=True)
            if ema.same_layout(state):
                ema.load_state_dict(state)
                return []
        states = [torch.load(f, weights_only=True) for f in files]
    except Exception as exc:                        # noqa: BLE001 (any unpickling failure)
        raise CheckpointError(f"an EMA file in {path} cannot be read ({type(exc).__name__}: "
                              f"{exc}); resume from an older checkpoint") from None
    ema.load_state_dicts(states)
    return [f"the EMA was saved as {len(files)} fragment file(s) ({states[0]['kind']} over "
            f"{states[0]['world_size']} ranks): put together and re-cut for this run's "
            f"{collective.world_size()} rank(s) ({ema.kind})"]


def _seal(folder: Path) -> None:
    """Flush every file to disk, then write the manifest (last: its presence means complete)."""
    sizes = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            sizes[str(f.relative_to(folder))] = f.stat().st_size
    _write_atomic(folder / MANIFEST, json.dumps({"files": sizes}, indent=1))
    _fsync_dir(folder)


def _move_into_place(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def newest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder (None: none yet)."""
    return _newest_complete(Path(run_dir) / CKPT_DIR)


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run folder holds a complete checkpoint."""
    return bool(_complete(Path(run_dir) / CKPT_DIR))


def _complete(root: Path) -> list[Path]:
    """Checkpoint folders that were renamed into place, oldest first."""
    return sorted(p for p in root.glob("step-*") if p.is_dir() and "." not in p.name)


def _newest_complete(root: Path) -> Path | None:
    done = [p for p in _complete(root) if (p / STATE_FILE).is_file()]
    return done[-1] if done else None


def _prune(root: Path, keep: int, newest: Path) -> None:
    done = [p for p in _complete(root) if p != newest]
    for old in done[: max(0, len(done) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
