"""The wrapper's stderr relay: accelerate's ChildFailedError traceback and failure report are
dropped when a rank said why it ended; a rank's own traceback (a bug) always shows."""
import io
import os
import sys

import pytest

from tbps.trainer import launch

RANK_BUG = (b"Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
            b"ZeroDivisionError: division by zero\n")
LAUNCHER = (b"Traceback (most recent call last):\n  File \"accelerate\", line 9, in main\n"
            b"    raise ChildFailedError(\n"
            b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
            b"============================================================\n"
            b"tbps.trainer.train FAILED\n  exitcode  : 1 (pid: 12)\n"
            b"============================================================\n")


def _relayed(tmp_path, data: bytes, codes: dict[str, str]) -> bytes:
    for name, text in codes.items():
        (tmp_path / name).write_text(text)
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    captured = io.BytesIO()
    real = sys.stderr
    sys.stderr = io.TextIOWrapper(captured)
    try:
        with os.fdopen(r, "rb") as stream:
            launch._relay(stream, str(tmp_path))
        return captured.getvalue()
    finally:
        sys.stderr = real


@pytest.mark.parametrize("said", [True, False])
def test_the_launchers_report_goes_only_when_a_rank_said_why(tmp_path, said):
    codes = {"0": "1", "0.message": "error: the weights hold non-finite values"} if said else {}
    notice = (b"E1208 02:01:09.847000 22594 torch/distributed/elastic/multiprocessing/api.py:"
              b"1002] failed (exitcode: 1) local_rank: 0 (pid: 22599) of binary: python3\n")
    data = b"step 1\nprogress 10%\r" + RANK_BUG + b"error: rank 1 said\n" + notice + LAUNCHER
    got = _relayed(tmp_path, data, codes)
    assert got.startswith(b"step 1\nprogress 10%\r" + RANK_BUG + b"error: rank 1 said\n")
    assert (b"ChildFailedError" in got) is not said
    assert (b"FAILED" in got) is not said and (b"failed (exitcode" in got) is not said


def test_the_ranks_messages_are_said_once_naming_the_ranks(tmp_path, capsys):
    for rank in (0, 1, 10):
        (tmp_path / f"rank-{rank}.message").write_text(f"error: rank {rank}: a file is damaged")
        (tmp_path / f"rank-{rank}").write_text("2")
    launch._say_last(str(tmp_path), 2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: ranks 0, 1 and 10: a file is damaged", "tbps launch: exit code 2"]
