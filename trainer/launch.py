"""`accelerate launch` whose ranks hear the scheduler's signals and whose exit code says why.

    python -m trainer.launch --config_file launch/accelerate/gpu_zero2.yaml \\
        -m trainer.train --config launch/configs/irra.yaml data.shards=shards/cuhk
    kill -USR1 <pid of python -m trainer.launch>      # checkpoint and stop; exit code 3

Every argument goes to `accelerate launch` unchanged. Why a wrapper: `accelerate launch` (torch
elastic underneath) starts each rank in a session of its own and handles only SIGTERM, SIGINT,
SIGHUP and SIGQUIT. SIGUSR1, what a scheduler sends before a time limit, kills the launcher at
once and the ranks are left training; on SIGTERM it terminates the ranks (SIGKILL 30 s later,
whatever they were writing) and exits 1 whatever they did. This wrapper:
- starts `accelerate launch` with SIGUSR1 ignored and outside the terminal's process group;
- turns SIGTERM, SIGUSR1, SIGHUP and the first Ctrl-C into a stop request (SIGUSR1) to every rank:
  the ranks agree on a step (trainer/dist.py StopAgreement), write a checkpoint and exit 3;
  a second Ctrl-C terminates the launcher (no checkpoint);
- exits with the code the node's first rank chose (written into $TRAINER_EXIT_FILE): 0 done, 2 bad input,
  3 stopped on request (continue with train.resume=latest), else the launcher's own.

Children end with their parent: the launcher gets SIGTERM when this wrapper dies, and every rank
(`follow_launcher`) a stop request (SIGTERM) when its launcher dies, so no rank trains on alone.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

EXIT_FILE = "TRAINER_EXIT_FILE"
STOP_REQUESTS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


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


def write_exit_code(code: int) -> None:
    """The first rank of each node: the exit code the run means, for the wrapper on that node
    (the launcher itself reports 1 for any failure)."""
    path = os.environ.get(EXIT_FILE)
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        with contextlib.suppress(OSError):
            with open(path, "w") as fh:
                fh.write(str(code))


def _launcher_preexec() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)    # inherited: the ranks install their own
    die_with_parent(signal.SIGTERM)


def _ranks(pid: int) -> list[int]:
    """The launcher's child processes: the ranks (torch elastic starts them directly)."""
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children()]
    except Exception:                                 # noqa: BLE001 (psutil absent or gone)
        path = f"/proc/{pid}/task/{pid}/children"
        try:
            with open(path) as fh:
                return [int(x) for x in fh.read().split()]
        except OSError:
            return []


def run(args: list[str]) -> int:
    fd, exit_file = tempfile.mkstemp(prefix="trainer-exit-")
    os.close(fd)
    env = dict(os.environ, **{EXIT_FILE: exit_file})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args]
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_launcher_preexec, start_new_session=True)
    state = {"requests": 0, "interrupts": 0}

    def forward(signum, _frame):
        if signum == signal.SIGINT:
            state["interrupts"] += 1
            if state["interrupts"] > 1:
                print("trainer.launch: second Ctrl-C: terminating the launcher (no checkpoint)",
                      file=sys.stderr, flush=True)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                return
        state["requests"] += 1
        ranks = _ranks(proc.pid)
        print(f"trainer.launch: {signal.Signals(signum).name}: asking {len(ranks)} rank(s) to "
              "checkpoint and stop", file=sys.stderr, flush=True)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    previous = {s: signal.signal(s, forward) for s in (*STOP_REQUESTS, signal.SIGINT)}
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except InterruptedError:
                continue
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    try:
        with open(exit_file) as fh:
            chosen = fh.read().strip()
    except OSError:
        chosen = ""
    finally:
        with contextlib.suppress(OSError):
            os.unlink(exit_file)
    if rc != 0 and chosen in ("2", "3"):
        return int(chosen)
    if rc < 0:                                    # the launcher itself died of a signal
        return 128 - rc
    return rc


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
