"""Worker processes of the data commands (synth, shard, verify): they end with their parent.

    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                               initargs=(os.getpid(),))
    try:
        ...
    except BaseException:
        stop_pool(pool)              # a stop request or an error: the workers end now
        raise

A worker leaves every signal decision to its parent: it ignores SIGINT (Ctrl-C reaches the whole
process group; the parent decides) and takes SIGTERM's default action (the parent ends it that
way). If the parent dies without a word (SIGKILL, a crash), the kernel ends the worker too
(Linux: PR_SET_PDEATHSIG); elsewhere a thread in the worker notices that its parent changed.

`stop_on_signals()` turns SIGTERM (and SIGINT) in the parent into `StopRequested`, so a command
unwinds through its `except`/`finally` blocks and the CLI can say how to continue (exit code 3).
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

PR_SET_PDEATHSIG = 1


class StopRequested(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: the command stops where it is."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGTERM and SIGINT raise StopRequested in the main thread."""
    def _raise(signum, _frame):
        raise StopRequested(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def init_worker(parent_pid: int) -> None:
    """Initializer of a worker process (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not _die_with_parent_linux():
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:           # the parent died before the line above
        os._exit(1)


def _die_with_parent_linux() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def stop_pool(pool) -> None:
    """End a ProcessPoolExecutor or multiprocessing.Pool now: queued tasks dropped, workers killed
    (a half-written output of theirs is a temporary file the next run removes)."""
    if hasattr(pool, "terminate"):                       # multiprocessing.Pool
        pool.terminate()
        pool.join()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())   # before shutdown
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        with contextlib.suppress(OSError, ValueError):
            p.terminate()
    for p in processes:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            p.join(5)
