"""Stop requests inside a rank: signals become a request the ranks agree on, and the exit code
a rank ends with says why (read by the launcher wrapper, trainer/launch.py).

    catch_stop_signals()            # SIGTERM / SIGUSR1 -> stop_requested() is True
    follow_launcher()               # a stop request when the launcher dies
    ...
    exit_code(code)                 # what to end with (written into $TRAINER_EXIT_DIR)
    ignore_stop_requests()          # the work is over: a late request must not kill
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

from tbps.trainer.common.errors import EXIT_DIR  # noqa: F401 (re-exported: the wrapper reads it here)

STOP_REQUESTS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)      # what a rank turns into a stop request
PR_SET_PDEATHSIG = 1
_stop = {"signal": None}                               # the first stop signal this process got


def _on_stop_signal(signum, _frame) -> None:
    _stop["signal"] = _stop["signal"] or signum


def catch_stop_signals() -> None:
    """SIGTERM / SIGUSR1 become a stop request that the ranks agree on (the training loop)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _on_stop_signal)


def stop_requested() -> bool:
    """Whether this process got a stop signal."""
    return _stop["signal"] is not None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux); elsewhere a
    thread watches the parent. Call it in the child (e.g. as a Popen preexec_fn)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
                if os.getppid() != parent:          # the parent died before the call
                    os.kill(os.getpid(), sig)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent, sig), daemon=True).start()


def _watch_parent(parent: int, sig: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), sig)


def follow_launcher() -> None:
    """In a rank started by torch elastic (`accelerate launch`, torchrun): a stop request
    (SIGTERM) when the launcher dies, so the ranks checkpoint and stop instead of training on
    unattended. A process started by hand keeps running when its shell exits."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(signal.SIGTERM)


def ignore_stop_requests() -> None:
    """At the end of a rank's work: later stop requests (the wrapper repeats them) are ignored.
    Python resets its handlers to the default action while it shuts down, and a SIGUSR1 then
    would end the process as killed by a signal instead of with its exit code."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_REQUESTS:
            signal.signal(sig, signal.SIG_IGN)


def exit_code(code: int, *, same_on_every_rank: bool = True, message: str | None = None
              ) -> int:
    """The exit code a rank should end with. Under the wrapper each rank writes the code it
    means into $TRAINER_EXIT_DIR and ends a stop (3), or bad input every rank met (2), with 0, so
    that the launcher ends quietly instead of printing its failure report over the message; the
    wrapper then exits with the code, after repeating `message` (what the rank said) where the
    launcher printed its own report. Without the wrapper the code is the exit code."""
    folder = os.environ.get(EXIT_DIR)
    if not folder:
        return code
    rank = os.environ.get("RANK", "0")
    with contextlib.suppress(OSError):
        if message:
            with open(os.path.join(folder, f"rank-{rank}.message"), "w") as fh:
                fh.write(message)
        with open(os.path.join(folder, f"rank-{rank}"), "w") as fh:
            fh.write(str(code))
    return 0 if code == 3 or (code == 2 and same_on_every_rank) else code
