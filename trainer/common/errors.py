"""What a trainer command says when it cannot go on, and its exit code.

    sys.exit(errors.guard(lambda: run(args), on_stop="continue with train.resume=latest"))

Exit codes of every command (train, evaluate, export, bench, search, quickstart, the dry run):
  0  done;
  1  a fault: another rank died or stopped answering (the message says which collective timed
     out), the weights became non-finite (`TrainingFault`), or a bug (with its traceback: bugs
     are not hidden);
  2  bad input: a missing or damaged file, a wrong value, an impossible combination; one
     paragraph on stderr naming the thing and what to do, no traceback;
  3  stopped on request (SIGTERM, SIGUSR1, Ctrl-C); the message says how to continue.

Under several ranks every rank meets the same bad config or shards: rank 0 says it, the others
exit quietly. An error only one rank can meet (its own checkpoint file) is a `RankError` and
that rank says it.
"""
from __future__ import annotations

import errno
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

OS_HINTS = {errno.ENOENT: "check the path", errno.EACCES: "check its permissions",
            errno.ENOSPC: "free some space and run the command again",
            errno.EDQUOT: "free some of the quota and run the command again",
            errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EISDIR: "it is a folder; give a file path",
            errno.EROFS: "the file system is read-only; choose another folder"}


class Stopped(Exception):
    """Stopped on request (a scheduler's SIGTERM / SIGUSR1, Ctrl-C); the message says how to
    continue."""


class TrainingFault(RuntimeError):
    """The run cannot go on for a reason that is not bad input (its weights became
    non-finite): one paragraph naming what to do, exit code 1, no traceback."""


class RankError(ValueError):
    """Bad input that only this rank meets (e.g. its own file in a checkpoint)."""


class CollectiveError(RuntimeError):
    """A collective failed: another rank died, or did not reach it within the timeout."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (or a full disk): answered without a traceback."""

    kinds = [ValueError, OSError, FloatingPointError, EOFError, pickle.UnpicklingError,
             yaml.YAMLError]
    try:
        from safetensors import SafetensorError  # optional for this check

        kinds.append(SafetensorError)
    except ImportError:
        pass
    return tuple(kinds)


def describe(exc: BaseException) -> str:
    """One paragraph: the exception's own message where it names the thing and what to do (this
    package's are written so), a hint added to the system's bare ones."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        hint = OS_HINTS.get(exc.errno, "check the path")
        return f"{exc.filename}: {exc.strerror.lower()}; {hint}"
    text = str(exc) or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def check_output(out, inputs: dict, *, own_marker: str | None = None, flag: str = "--out"):
    """Refuse an output folder that is, holds or lies inside one of the command's inputs
    ({what: path}), or that holds files this command did not write (own_marker: a file its
    own output always has, which makes writing over it fine)."""

    out = Path(out).resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        src = Path(path).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"{flag} {out} overlaps the {what} {src}: a command never writes "
                             f"into its own input; choose another {flag}")
    if out.is_dir() and any(out.iterdir()) and own_marker and not (out / own_marker).exists():
        raise ValueError(f"{flag} {out} already holds files this command did not write (no "
                         f"{own_marker}); choose a new or empty folder")


def is_collective_failure(exc: BaseException) -> bool:
    """True for the errors torch.distributed raises when a peer dies or a collective times out."""
    if isinstance(exc, CollectiveError):
        return True
    try:
        from torch.distributed import DistError  # every CLI imports errors: torch off its start-up
    except ImportError:                             # pragma: no cover (old torch)
        DistError = ()                              # noqa: N806
    if DistError and isinstance(exc, DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("gloo", "Connection reset by peer", "Connection closed by peer",
                            "Timed out waiting", "NCCL", "Broken pipe"))


def _rank() -> int:
    try:
        import torch.distributed as dist  # every CLI imports errors: torch off its start-up

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except (ImportError, RuntimeError):
        pass
    return int(os.environ.get("RANK", "0"))


LAST = {"rank_specific": False, "message": None, "deferred": False}   # the last guarded failure
EXIT_DIR = "TRAINER_EXIT_DIR"
"""Set by `tbps launch` (trainer/launch.py): the folder where each rank leaves its exit code and
its message, which the wrapper says once, last, for all ranks."""


def say(text: str) -> None:
    """One paragraph on stderr, kept in LAST["message"]; under `tbps launch`, for a command that
    hands its message to the wrapper (`guard(deferred=True)`), only kept: the wrapper says it."""
    LAST["message"] = text
    if not LAST["deferred"]:
        print(text, file=sys.stderr, flush=True)


def guard(fn: Callable[[], int | None], *, on_stop: str = "run the command again",
          timeout_field: str | None = None, deferred: bool = False) -> int:
    """Run a command's body and turn how it ended into an exit code and one paragraph
    (deferred: the command writes its message for `tbps launch` to say, when under it)."""
    rank = _rank()
    LAST["rank_specific"], LAST["message"] = False, None
    LAST["deferred"] = deferred and bool(os.environ.get(EXIT_DIR))
    try:
        return fn() or 0
    except Stopped as exc:
        if rank == 0:
            say(str(exc))
        return 3
    except KeyboardInterrupt:
        if rank == 0:
            say(f"stopped by Ctrl-C; {on_stop}")
        return 3
    except Exception as exc:                       # noqa: BLE001 (sorted below)
        rank = _rank()
        if is_collective_failure(exc):
            LAST["rank_specific"] = True
            setting = f" ({timeout_field})" if timeout_field else ""
            say(f"error on rank {rank}: a collective operation failed: {describe(exc)}. Another "
                "rank died, or stopped answering for longer than the collective timeout"
                f"{setting}: its own log says why (out of memory, a crash, a hung data loader "
                "or a paused process). Fix that and continue from the last complete checkpoint "
                "with train.resume=latest.")
            return 1
        if isinstance(exc, TrainingFault):
            if rank == 0:
                say(f"error: {exc}")
            return 1
        if isinstance(exc, user_errors()):
            LAST["rank_specific"] = isinstance(exc, RankError)
            if rank == 0 or isinstance(exc, RankError):
                several = int(os.environ.get("WORLD_SIZE", "1")) > 1
                where = f"rank {rank}: " if isinstance(exc, RankError) and several else ""
                say(f"error: {where}{describe(exc)}")
            return 2
        raise
