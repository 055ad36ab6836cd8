"""`accelerate launch` whose ranks hear the scheduler's signals and whose exit code says why.

    tbps launch --config_file launch/accelerate/gpu_zero2.yaml \\
        -m tbps.trainer.train --config launch/configs/irra.yaml data.shards=shards/cuhk
    kill -USR1 <pid of tbps launch>      # checkpoint and stop; exit code 3

Every argument goes to `accelerate launch` unchanged. Why a wrapper: `accelerate launch` (torch
elastic underneath) starts each rank in a session of its own and handles only SIGTERM, SIGINT,
SIGHUP and SIGQUIT. SIGUSR1, what a scheduler sends before a time limit, kills the launcher at
once and the ranks are left training; on SIGTERM it terminates the ranks (SIGKILL 30 s later,
whatever they were writing) and exits 1 whatever they did. This wrapper:
- starts `accelerate launch` with SIGUSR1 ignored and outside the terminal's process group;
- turns SIGTERM, SIGUSR1, SIGHUP and the first Ctrl-C into a stop request (SIGUSR1) to every rank:
  the ranks agree on a step (trainer/common/collective.py StopAgreement), write a checkpoint and exit 3;
  a second Ctrl-C terminates the launcher (no checkpoint);
- exits with the code the ranks chose (each writes it into $TRAINER_EXIT_DIR): 0 done, 1 a
  fault, 2 bad input, 3 stopped on request (continue with train.resume=latest); the launcher's
  own code where no rank wrote one. Ranks that stop, or all meet the same bad input, end with
  0 under the wrapper, so the launcher does not print its failure report over their message.

Children end with their parent: the launcher gets SIGTERM when this wrapper dies, and every rank
(`follow_launcher`) a stop request (SIGTERM) when its launcher dies, so no rank trains on alone.
Once a rank reports a fault (a peer died or hung past train.collective_timeout_s), the ranks
still there are killed FAULT_GRACE_S later instead of the launcher's own 30 s grace.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

from tbps.trainer.running.signals import EXIT_DIR, STOP_REQUESTS, die_with_parent

RESEND_S = 2.0
FAULT_GRACE_S = 5.0


def _chosen(folder: str, launcher_rc: int) -> int:
    """The wrapper's exit code from what the ranks wrote: a fault (1) first, then bad input,
    then a stop; the launcher's own code where no rank wrote one."""
    codes = {_read_code(os.path.join(folder, name)) for name in os.listdir(folder)
             if "." not in name}
    for code in (1, 2, 3):
        if code in codes:
            return code
    if launcher_rc < 0:                         # the launcher itself died of a signal
        return 128 - launcher_rc
    return launcher_rc


def _launcher_preexec() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)    # inherited: the ranks install their own
    die_with_parent(signal.SIGTERM)


def _ranks(pid: int) -> list[int]:
    """The launcher's child processes: the ranks (torch elastic starts them directly)."""
    try:
        import psutil  # optional: without it the ranks are found by /proc

        return [c.pid for c in psutil.Process(pid).children()]
    except Exception:                                 # noqa: BLE001 (psutil absent or gone)
        path = f"/proc/{pid}/task/{pid}/children"
        try:
            with open(path) as fh:
                return [int(x) for x in fh.read().split()]
        except OSError:
            return []


def run(args: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="trainer-exit-") as folder:
        env = dict(os.environ, **{EXIT_DIR: folder})
        if not _has_cuda():               # spares DeepSpeed's "Setting accelerator to CPU"
            env.setdefault("DS_ACCELERATOR", "cpu")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *args]
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_launcher_preexec,
                                start_new_session=True, stderr=subprocess.PIPE)
        relay = threading.Thread(target=_relay, args=(proc.stderr, folder), daemon=True)
        relay.start()
        state = {"requested": None, "interrupts": 0}
        previous = {s: signal.signal(s, _handler(proc, state))
                    for s in (*STOP_REQUESTS, signal.SIGINT)}
        try:
            while True:
                try:
                    rc = proc.wait(timeout=RESEND_S)
                    break
                except subprocess.TimeoutExpired:
                    if state["requested"]:          # ranks that started (or armed) since
                        _ask_ranks(proc.pid)
                    _end_after_fault(folder, proc.pid, state)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        relay.join(timeout=10)
        code = _chosen(folder, rc)
        if code in (1, 2, 3):                       # the ranks left their messages to say
            _say_last(folder, code)
        return code


def _relay(stream, folder: str) -> None:
    """The launcher's and the ranks' stderr to ours as it comes (partial lines too: progress
    bars), except the launcher's ChildFailedError traceback and failure report when a rank
    said why it ended (exit 1 or 2 written with its message): that rank's message is the
    story, and `_say_last` repeats it last. A rank's own traceback (a bug) always passes."""
    out = sys.stderr.buffer
    held: list[bytes] = []                  # a traceback being read, not yet shown
    dropping, pending = False, b""
    fd = stream.fileno()
    while chunk := os.read(fd, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            line += b"\n"
            if dropping:
                continue                    # the launcher's report: it ends the launcher
            if held:
                held.append(line)
                if line[:1] not in (b" ", b"\t", b"\n") and not line.startswith(_TB_LINES):
                    if b"ChildFailedError" in line and _ranks_said_why(folder):
                        dropping = True
                    else:
                        out.write(b"".join(held))
                    held = []
                continue
            if line.startswith(b"Traceback (most recent call last):"):
                held = [line]
                continue
            if _ELASTIC_FAILED.search(line) and _ranks_said_why(folder):
                continue                    # torch elastic's one-line notice of the same exit
            out.write(line)
        if pending and not held and not dropping:
            out.write(pending)              # a partial line (a progress bar): now, not later
            pending = b""
        out.flush()
    if not dropping:
        out.write(b"".join(held) + pending)
        out.flush()


_ELASTIC_FAILED = re.compile(rb"elastic/multiprocessing/api\.py:\d+\] failed \(exitcode")
_TB_LINES = (b"Traceback (most recent call last):", b"During handling of the above",
             b"The above exception was")


def _ranks_said_why(folder: str) -> bool:
    return any(name.endswith(".message") for name in os.listdir(folder)) and any(
        _read_code(os.path.join(folder, n)) in (1, 2) for n in os.listdir(folder)
        if "." not in n)


def _say_last(folder: str, code: int) -> None:
    """The ranks' messages, each said once (the same text from several ranks as one line that
    names them), and the exit code: the last thing on the screen. The ranks of `tbps train`
    leave their message here instead of printing it (trainer/common/errors.py `say`)."""
    said: dict[tuple[str, str], list[str]] = {}
    for name in sorted(os.listdir(folder), key=_rank_order):
        if name.endswith(".message"):
            with open(os.path.join(folder, name)) as fh:
                text = fh.read().strip()
            if text:
                found = _RANK_PREFIX.match(text)
                key = (found.group(1), text[found.end():]) if found else ("", text)
                said.setdefault(key, []).append(found.group(2) if found else "")
    lines = []
    for (lead, text), ranks in said.items():
        ranks = [r for r in ranks if r]
        where = (f"rank {ranks[0]}: " if len(ranks) == 1 else
                 f"ranks {', '.join(ranks[:-1])} and {ranks[-1]}: " if ranks else "")
        lines.append(f"{lead}{where}{text}")
    if not lines and code in (1, 2):
        lines = ["a rank failed with the traceback above (a bug: please report it)"]
    print("\n".join(["", *lines, f"tbps launch: exit code {code}"]), file=sys.stderr, flush=True)


_RANK_PREFIX = re.compile(r"^(error:? (?:on )?)rank (\d+): ")


def _rank_order(name: str) -> tuple[int, str]:
    digits = "".join(c for c in name.split(".")[0] if c.isdigit())
    return (int(digits) if digits else -1, name)


def _has_cuda() -> bool:
    try:
        import torch  # the wrapper starts without torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _handler(proc, state: dict):
    def forward(signum, _frame):
        if signum == signal.SIGINT:
            state["interrupts"] += 1
            if state["interrupts"] > 1:
                print("tbps.trainer.launch: second Ctrl-C: terminating the launcher (no checkpoint)",
                      file=sys.stderr, flush=True)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                return
        state["requested"] = signum
        n = _ask_ranks(proc.pid)
        print(f"tbps.trainer.launch: {signal.Signals(signum).name}: asking {n} rank(s) to "
              "checkpoint and stop", file=sys.stderr, flush=True)

    return forward


def _end_after_fault(folder: str, launcher: int, state: dict) -> None:
    """Once a rank has reported a fault (a peer died or hung), the ranks still there are ended
    FAULT_GRACE_S later: a hung or paused rank would otherwise hold the launcher for its own
    30 s grace (it answers SIGTERM only when it runs)."""
    if "fault_at" not in state:
        if any(_read_code(os.path.join(folder, n)) == 1 for n in os.listdir(folder)):
            state["fault_at"] = time.monotonic()
        return
    if time.monotonic() - state["fault_at"] >= FAULT_GRACE_S:
        for pid in _ranks(launcher):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _read_code(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _ask_ranks(launcher: int) -> int:
    """A stop request (SIGUSR1) to every rank; repeated every RESEND_S seconds while the run
    lasts, so ranks that were still starting (their handler not yet set) get it too."""
    ranks = _ranks(launcher)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    return len(ranks)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
