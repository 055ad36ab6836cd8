"""One writer per run folder: a second run given the same folder is refused (exit 2, naming the
holder) and the first is unharmed; a lock left by a process that is gone is taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tbps.trainer.running.lock import LOCK, RunLock
from tbps.trainer.train import main
from tests.trainer.conftest import REPO, TINY_MODEL, launch

CONFIG = str(REPO / "launch/configs/irra_synth.yaml")


def _args(run, shards, *extra):
    return ["--config", CONFIG, f"data.shards={shards}", f"train.output_dir={run}", *TINY_MODEL,
            "eval.select_split=none", "eval.final_split=none", *extra]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_second_run_into_the_same_folder_is_refused_and_the_first_unharmed(tmp_path,
                                                                             tiny_shards):
    run = tmp_path / "run"
    first = launch(None, run, tiny_shards, "eval.select_split=none", "train.epochs=20",
                   wait=False)
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (run / LOCK).exists()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    second = subprocess.run([sys.executable, "-m", "tbps.trainer.train",
                             *_args(run, tiny_shards, "train.resume=auto")], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    out, _ = first.communicate(timeout=600)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, out[-3000:]
    events = [json.loads(x)["event"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert events.count("config") == 1 and events.count("done") == 1
    assert not (run / LOCK).exists()


def test_a_lock_of_a_live_process_refuses_and_a_gone_ones_is_taken(tmp_path, tiny_shards,
                                                                  capsys):
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        held = {"host": socket.gethostname(), "pid": sleeper.pid, "started": "then",
                "command": "another run"}
        (run / LOCK).write_text(json.dumps(held))
        assert main(_args(run, tiny_shards, "train.max_steps=1")) == 2
        err = capsys.readouterr().err
        assert f"pid {sleeper.pid}" in err and "another run" in err
        assert sorted(p.name for p in run.iterdir()) == [LOCK]      # nothing else written
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(_args(run, tiny_shards, "train.max_steps=1")) == 0   # its pid is gone now
    assert not (run / LOCK).exists() and (run / "final").is_dir()


def test_another_hosts_lock_is_stale_only_when_untouched(tmp_path):
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x", "command": "y"}))
    with pytest.raises(ValueError, match="host elsewhere"):
        RunLock(tmp_path).acquire()
    old = time.time() - 2 * 3600
    os.utime(lock, (old, old))
    mine = RunLock(tmp_path)
    mine.acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    mine.release()
    assert not lock.exists()
