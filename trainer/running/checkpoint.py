"""Training checkpoints: atomic, verified, resumable mid-epoch and on another number of ranks.

Layout of a run folder:
    checkpoints/step-00000420/   accelerate state (model.safetensors, optimizer; DeepSpeed's
                                 own partitioned files under ZeRO), rng-rankNNNNN.json (each
                                 rank's random generators), ema-rankNNNNN.safetensors (each
                                 rank's EMA fragments), what rebuilding the model takes
                                 (config.yaml, clip_config.json, model.json, tokenizer/: the
                                 folder can be a model.pretrained start), trainer_state.json,
                                 manifest.json
    checkpoints/latest           name of the newest complete checkpoint
    best/, final/                model.safetensors (consolidated weights), config.yaml, tokenizer/

Writing: every rank writes into `<name>.partial`; once all are done rank 0 writes
trainer_state.json, flushes every file to disk, and writes manifest.json (the size of every
file) last, then renames the folder into place (an older folder of the same name is moved aside
first, and removed only after). A save that fails (a full disk) or is killed leaves a `.partial`
folder that nothing reads and the next save removes: the last complete checkpoint is never
touched. Old checkpoints are pruned only after the new one is in place.

Reading (`find`): the newest checkpoint whose files match its manifest; a damaged one (a file
missing, of another size or with other bytes than its SHA-256 says: truncated, half-copied,
damaged in place) is named and skipped for the next older.
`load` reports a file that cannot be read, naming it, instead of loading half of it.

Nothing in a checkpoint can run code (a folder may have been downloaded or shared): this
project's state is JSON and safetensors; the optimizer files accelerate and DeepSpeed pickle are
read first by torch's restricted loader (`verify`) and loaded under it too (`dist.weights_only_
loads`, which overrides DeepSpeed's weights_only=False); a file holding anything but tensors,
plain values and DeepSpeed's plain records is refused as damaged. Older checkpoints (random
states and EMA pickled) are read the same safe way.

trainer_state.json holds the epoch, the batches of that epoch already trained on, the optimizer
step, the best score with its epoch and the evaluation history (a checkpoint at an epoch's end
is written after that epoch's evaluation), and the layout the run had (ranks, batch size,
accumulation, steps per epoch, total steps) so a resume on another layout can say what changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tbps.trainer.common import collective, dist
from tbps.trainer.common.errors import RankError, is_collective_failure

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
DS_FOLDER = "pytorch_model"              # accelerate's name for DeepSpeed's own files
_PICKLED = (".pkl", ".bin", ".pt", ".pth")


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
    return f"ema-rank{rank:05d}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.json"


def _accelerate_rng_file(rank: int) -> str:
    return f"random_states_{rank}.pkl"


def save(acc, run_dir: Path, state: TrainState, keep: int, ema=None, describe=None) -> Path:
    """All ranks: the run's state as `checkpoints/step-N/` (see the module's text); `describe`
    (rank 0) writes what rebuilding the model takes into the folder."""
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{state.step:08d}"
    tmp = root / (final.name + ".partial")
    try:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        collective.barrier()
        acc.save_state(str(tmp))
        rank = collective.rank()
        # every rank its own generators (JSON, in place of accelerate's pickle) and fragments
        (tmp / _accelerate_rng_file(rank)).unlink(missing_ok=True)
        (tmp / rng_file(rank)).write_text(json.dumps(_rng_state(acc)))
        if ema is not None:
            _save_ema(ema.state_dict(), tmp / ema_file(rank))
        collective.barrier()
        if acc.is_main_process:
            if describe is not None:
                describe(tmp)
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
        manifest = json.loads((path / MANIFEST).read_text())
        sizes, digests = manifest["files"], manifest.get("sha256", {})   # older: sizes only
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
        return [f"{MANIFEST} cannot be read ({exc})"]
    problems = []
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, {size} were written")
        elif name in digests and _sha256(f) != digests[name]:
            problems.append(f"{name} does not hold the bytes that were written (its SHA-256 "
                            "differs: damaged in place)")
    return problems or _contents(path)


def safe_load(f: Path, deepspeed: bool = False):
    """torch.load of a pickle accelerate, DeepSpeed or an older version of this project wrote,
    as tensors, plain values and `dist.checkpoint_records` only: a file that would run code on
    load raises instead (pickle.UnpicklingError)."""
    with dist.weights_only_loads(deepspeed):
        try:
            return torch.load(f, map_location="cpu", mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            # not torch's zip format (a bare pickle): read it, restricted, to say what it holds
            return torch.load(f, map_location="cpu")


def _contents(path: Path) -> list[str]:
    """Every file a resume would unpickle, map or parse, read here without running anything:
    pickles (DeepSpeed's own under DS_FOLDER included) through `safe_load` (tensor data mapped,
    not read), safetensors by their header, the random generators' JSON parsed."""
    problems = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            if f.suffix in _PICKLED:
                safe_load(f, deepspeed=DS_FOLDER in f.relative_to(path).parts)
            elif f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
            elif f.name.startswith("rng-rank"):
                _check_rng(json.loads(f.read_text()))
        except Exception as exc:                    # noqa: BLE001 (any refusal or damage)
            problems.append(f"{f.relative_to(path)} cannot be read as tensors and plain values "
                            f"({_reason(exc)}): damaged, or holding code that loading would run")
    return problems


def _reason(exc: Exception) -> str:
    """The part of a loader's error that says what is in the file: torch's weights_only refusal
    also advises loading the file unrestricted, which a checkpoint of unknown origin must
    never be."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"(Trying to load [^\n]*|Unsupported global[^\n]*|Unsupported operand"
                      r"[^\n]*)", text)
    line = found.group(1) if found else next((x for x in text.splitlines() if x.strip()), "")
    line = re.split(r"\.\s+(?:Please|Re-running|Check|This file)", line)[0]
    return f"{type(exc).__name__}: {line.strip()[:160]}"


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
    rng = _check_random_state(path, state)
    try:
        with dist.weights_only_loads(deepspeed=dist.using_deepspeed()):
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
    if rng is not None:
        _set_rng(acc, rng)
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


def _check_random_state(path: Path, state: TrainState) -> dict | None:
    """This rank's random generators as saved (None: none to restore, or accelerate's older
    pickle, which accelerate restores itself); accelerate skips a random-state file it cannot
    read with an info line, so a missing or unreadable one is refused here instead."""
    rank, world = collective.rank(), state.layout.get("world_size", collective.world_size())
    if rank >= world:
        return None                         # this rank did not exist: a fresh random state
    f, old = path / rng_file(rank), path / _accelerate_rng_file(rank)
    if not f.is_file() and not old.is_file():
        raise RankError(f"{f} is missing: the checkpoint is incomplete; resume from an older one "
                        "with train.resume=<its folder>")
    try:
        if f.is_file():
            return _check_rng(json.loads(f.read_text()))
        safe_load(old)
        return None
    except Exception as exc:                        # noqa: BLE001 (any unpickling failure)
        bad = f if f.is_file() else old
        raise RankError(f"{bad} cannot be read ({_reason(exc)}): the checkpoint is "
                        "damaged; resume from an older one with train.resume=<its folder>") \
            from None


def _rng_state(acc) -> dict:
    """Every generator a rank draws from, as JSON (bytes as hex)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"step": int(getattr(acc, "step", 0)), "python": [version, list(words), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().numpy().tobytes().hex()}
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
    return state


def _check_rng(state) -> dict:
    """`state` if it is what `_rng_state` writes; ValueError naming the field otherwise."""
    def need(ok, field):
        if not ok:
            raise ValueError(f"field {field!r} is missing or malformed")

    need(isinstance(state, dict), "(top level)")
    need(isinstance(state.get("step"), int), "step")
    py = state.get("python")
    need(isinstance(py, list) and len(py) == 3 and isinstance(py[1], list)
         and len(py[1]) == 625 and all(isinstance(w, int) for w in py[1]), "python")
    npy = state.get("numpy")
    need(isinstance(npy, list) and len(npy) == 5 and npy[0] == "MT19937"
         and isinstance(npy[1], list) and len(npy[1]) == 624
         and all(isinstance(w, int) and 0 <= w < 2**32 for w in npy[1]), "numpy")
    for name, hexes in [("torch", [state.get("torch")])] + [("cuda", state.get("cuda") or [])]:
        for h in hexes:
            need(isinstance(h, str) and _is_hex(h), name)
    need(len(state["torch"]) // 2 == torch.get_rng_state().numel(), "torch")
    return state


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _set_rng(acc, state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes(state["torch"]))
    if torch.cuda.is_available() and state.get("cuda"):
        for device, h in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_bytes(h), device)
    if hasattr(acc, "step"):
        acc.step = state["step"]


def _bytes(hexes: str) -> torch.Tensor:
    return torch.frombuffer(bytearray.fromhex(hexes), dtype=torch.uint8).clone()


def _save_ema(state: dict, f: Path) -> None:
    """A rank's EMA fragments as safetensors, their layout in the file's metadata."""
    layout = {k: state[k] for k in ("kind", "world_size", "modules", "fragments")}
    save_file({f"shadow.{i}": t.contiguous() for i, t in enumerate(state["shadow"])}, str(f),
              metadata={"ema": json.dumps(layout)})


def _read_ema(f: Path) -> dict:
    if f.suffix != ".safetensors":                  # written before the EMA was safetensors
        return safe_load(f)
    with safe_open(str(f), framework="pt") as st:
        state = json.loads(st.metadata()["ema"])
        state["shadow"] = [st.get_tensor(f"shadow.{i}") for i in range(len(state["fragments"]))]
    return state


def _load_ema(path: Path, ema) -> list[str]:
    own = path / ema_file(collective.rank())
    files = sorted(path.glob("ema-rank*.safetensors")) or sorted(path.glob("ema-rank*.pt"))
    if not files:
        raise CheckpointError(f"{path} holds no EMA (ema-rank*.safetensors) but this run has a "
                              "momentum model: resume it with the same recipe")
    if not own.is_file():
        own = own.with_suffix(".pt")
    try:
        if own.is_file():
            state = _read_ema(own)
            if ema.same_layout(state):
                ema.load_state_dict(state)
                return []
        states = [_read_ema(f) for f in files]
    except Exception as exc:                        # noqa: BLE001 (any unpickling failure)
        raise CheckpointError(f"an EMA file in {path} cannot be read ({type(exc).__name__}: "
                              f"{exc}); resume from an older checkpoint") from None
    ema.load_state_dicts(states)
    return [f"the EMA was saved as {len(files)} fragment file(s) ({states[0]['kind']} over "
            f"{states[0]['world_size']} ranks): put together and re-cut for this run's "
            f"{collective.world_size()} rank(s) ({ema.kind})"]


def _seal(folder: Path) -> None:
    """Flush every file to disk, then write the manifest (last: its presence means complete)
    with every file's size and SHA-256, so damage that keeps the size is seen too."""
    sizes, digests = {}, {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            name = str(f.relative_to(folder))
            sizes[name], digests[name] = f.stat().st_size, _sha256(f, flush=True)
    _write_atomic(folder / MANIFEST, json.dumps({"files": sizes, "sha256": digests}, indent=1))
    _fsync_dir(folder)


def _sha256(f: Path, flush: bool = False) -> str:
    """The file's SHA-256, read once; flush: its data forced to disk too."""
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
        if flush:
            os.fsync(fh.fileno())
    return h.hexdigest()


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
