"""One writer per run folder: `<run>/run.lock` names the run writing there.

Rank 0 creates it (exclusively) before the run writes anything and removes it when the run
ends, however it ends; another run given the same folder is refused with the holder's host, pid,
start time and command. The holder touches it as it logs and checkpoints. A lock left by a
process that is gone is stale and taken over: on this host, its pid is not running; on another
host (a requeued job on a new node), it was not touched for STALE_AFTER_S. Otherwise the message
says how to remove it when that run is known to be over.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from tbps.trainer.common import collective

LOCK = "run.lock"
STALE_AFTER_S = 1800.0


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self) -> None:
        """Take the lock or raise ValueError (exit 2) naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise ValueError(self._refusal(holder)) from None
                self.path.unlink(missing_ok=True)        # a run that is gone: take it over
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise ValueError(self._refusal(self._holder()))

    def touch(self) -> None:
        """The holder is alive (rank 0, at logging steps and checkpoints)."""
        if self.held:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}                      # being written, or damaged: treated as held

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            try:
                return holder != {} and time.time() - self.path.stat().st_mtime > STALE_AFTER_S
            except OSError:
                return False
        if holder["pid"] == os.getpid():
            return True                    # this process's own, from a run that ended badly
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _refusal(self, holder: dict) -> str:
        who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
               f"{holder.get('started', '?')}: {holder.get('command', '?')}") if holder else \
            "a holder whose lock file cannot be read"
        return (f"{self.path.parent} is being written by another run ({who}). Wait for it to end "
                "or choose another train.output_dir; if that run is known to be over (on another "
                f"machine), remove {self.path}")


def take(run_dir: Path, is_main: bool) -> RunLock:
    """Rank 0 takes the run folder's lock; every rank raises the same refusal (exit 2)."""
    lock, refusal = RunLock(run_dir), None
    if is_main:
        try:
            lock.acquire()
        except ValueError as exc:
            refusal = str(exc)
    refusal = collective.broadcast_object(refusal)
    if refusal:
        raise ValueError(refusal)
    return lock
