"""The data CLI's answers to bad input and to signals.

    python -m pytest -q tests/data_pipeline/test_cli.py

Bad input (a missing or damaged file, a wrong value, an impossible combination) gives one
paragraph naming the thing and what to do, exit code 2 and no traceback; SIGTERM or Ctrl-C during
`shard` stops it with exit code 3 and says how to continue; worker processes end with their parent
however it ends. The signal tests start `tbps shard --workers 2` in a child
process whose workers block after the first shards (Linux: they read /proc).
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tbps.data_pipeline.cli import main
from tbps.data_pipeline.manifest import read_meta
from tbps.data_pipeline.verify import verify

REPO = Path(__file__).resolve().parents[2]


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([*map(str, argv), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _shard(root, out, *extra):
    return ("shard", "--format", "cuhk-pedes", "--root", root, "--out", out, "--shard-size", "16",
            *extra)


@pytest.fixture
def dataset_copy(tmp_path, synth_root):
    dst = tmp_path / "data"
    shutil.copytree(synth_root, dst)
    return dst


def test_wrong_values_name_the_flag(capsys, tmp_path):
    code, err = _run(capsys, "synth", "--out", tmp_path / "s", "--train-ids", "0")
    assert code == 2 and "--train-ids must be an integer in [1, 99999], got 0" in err
    code, err = _run(capsys, *_shard(tmp_path, tmp_path / "o", "--noise-rate", "1.5"))
    assert code == 2 and "--noise-rate must be in [0, 1)" in err
    with pytest.raises(SystemExit) as exit_:
        main(["shard", "--format", "cuhk-pedes", "--root", "r", "--out", "o", "--workers", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--workers: expected an integer >= 1, got '0'" in err


def test_missing_and_damaged_inputs(capsys, tmp_path, synth_root, shard_root):
    code, err = _run(capsys, *_shard(tmp_path / "none", tmp_path / "o"))
    assert code == 2 and "reid_raw.json" in err
    for command in ("verify", "stats", "bench"):
        code, err = _run(capsys, command, tmp_path / "none")
        assert code == 2 and "manifest.parquet does not exist" in err
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "manifest.parquet").write_bytes(b"not parquet")
    code, err = _run(capsys, "stats", damaged)
    assert code == 2 and "is not a readable manifest" in err and "shard the dataset again" in err
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{broken")
    code, err = _run(capsys, "bench", shard_root, "--tokenizer", tok)
    assert code == 2 and f"could not load a tokenizer from '{tok}'" in err
    code, err = _run(capsys, "bench", shard_root, "--batch-size", "1000")
    assert code == 2 and "fewer than one batch of 1000" in err and "lower the batch size" in err
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    (root / "reid_raw.json").write_text("[{broken")
    code, err = _run(capsys, *_shard(root, tmp_path / "o"))
    assert code == 2 and "reid_raw.json is not valid JSON" in err and "repair" in err


def test_empty_dataset_is_refused_at_once(capsys, tmp_path):
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    (root / "reid_raw.json").write_text("[]")
    code, err = _run(capsys, *_shard(root, tmp_path / "o"))
    assert code == 2 and "holds no usable (image, caption) pair (0 entries)" in err
    assert not (tmp_path / "o").exists()


def test_output_that_is_or_holds_the_input_is_refused(capsys, tmp_path, dataset_copy):
    for out, where in ((dataset_copy, "is"), (dataset_copy / "shards", "lies inside"),
                       (tmp_path, "holds")):
        code, err = _run(capsys, *_shard(dataset_copy, out, "--overwrite"))
        assert code == 2 and f"{where} the input folder" in err
    assert sorted(p.name for p in dataset_copy.iterdir()) == ["imgs", "reid_raw.json",
                                                             "synth_meta.json"]
    code, err = _run(capsys, "synth", "--out", dataset_copy / "reid_raw.json" / "x")
    assert code == 2 and "not a directory" in err


def test_overwrite_checks_before_deleting(capsys, tmp_path, synth_root, shard_root):
    out = tmp_path / "out"
    shutil.copytree(shard_root, out)
    (out / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err = _run(capsys, *_shard(synth_root, out, "--overwrite", "--shard-size", "32"))
    assert code == 2 and "notes.txt" in err and "nothing was deleted" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    (out / "notes.txt").unlink()
    (out / ".plan.json").write_text("{")
    code, err = _run(capsys, *_shard(synth_root, out))
    assert code == 2 and ".plan.json is damaged" in err and "--overwrite" in err
    assert _run(capsys, *_shard(synth_root, out, "--overwrite"))[0] == 0
    assert verify(out, progress=False) == []


def test_synth_overwrite_keeps_a_dataset_it_did_not_write(capsys, tmp_path, synth_root):
    code, err = _run(capsys, "synth", "--out", synth_root, "--train-ids", "2")
    assert code == 2 and "already holds a dataset" in err and "--overwrite" in err
    (tmp_path / "reid_raw.json").write_text("[]")
    code, err = _run(capsys, "synth", "--out", tmp_path, "--overwrite", "--train-ids", "2")
    assert code == 2 and "was not written by this generator" in err
    assert (tmp_path / "reid_raw.json").read_text() == "[]"


def test_damaged_image_names_the_file_and_the_way_out(capsys, tmp_path, dataset_copy):
    entry = json.loads((dataset_copy / "reid_raw.json").read_text())[0]
    (dataset_copy / "imgs" / entry["file_path"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 40)
    code, err = _run(capsys, *_shard(dataset_copy, tmp_path / "o"))
    assert code == 2 and entry["file_path"] in err and "--on-error skip" in err


def test_the_module_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tbps.data_pipeline.cli", "verify", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "manifest.parquet does not exist" in proc.stderr


# -- signals ------------------------------------------------------------------------------------

# shards 0 and 1 of each split are written; the workers then block in the next ones
SLOW_SHARD = textwrap.dedent("""
    import sys, time
    import tbps.data_pipeline.sharding as sharding
    real = sharding.write_shard
    def write_shard(*args, **kwargs):
        if args[1] >= 2:
            time.sleep(120)
        return real(*args, **kwargs)
    write_shard.__module__, write_shard.__qualname__ = real.__module__, real.__qualname__
    sharding.write_shard = write_shard
    from tbps.data_pipeline.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start_blocked_shard(synth_root, out: Path):
    script = out.parent / "slow_shard.py"
    script.write_text(SLOW_SHARD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), *map(str, _shard(synth_root, out)),
                             "--workers", "2", "--quiet"], stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    deadline = time.time() + 60
    while not (out / ".progress" / "train-shard-000001.tar.json").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the shard run never got going"
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert len(workers) >= 2
    return proc, workers


def _wait_gone(pids, seconds: float = 10.0) -> list[int]:
    """The pids still alive after `seconds`; those are killed (a failing test leaves no orphans)."""
    deadline = time.time() + seconds
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_shard_cleanly_and_it_resumes(tmp_path, synth_root, shard_root,
                                                         signum, caplog):
    out = tmp_path / "out"
    proc, workers = _start_blocked_shard(synth_root, out)
    t0 = time.time()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3 and time.time() - t0 < 10
    assert "Traceback" not in err and f"stopped by {signum.name}" in err
    assert "run the same command again to continue" in err
    assert _wait_gone(workers) == []
    assert not (out / "manifest.parquet").exists()
    with caplog.at_level(logging.INFO, logger="tbps.data_pipeline.sharding"):
        assert main([*map(str, _shard(synth_root, out)), "--quiet"]) == 0
    assert "resuming: 32 of 352 samples already sharded" in caplog.text   # train shards 0, 1
    assert read_meta(out) == read_meta(shard_root)
    assert verify(out, progress=False) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_parent_ends_its_workers(tmp_path, synth_root):
    proc, workers = _start_blocked_shard(synth_root, tmp_path / "out")
    proc.kill()
    proc.wait(timeout=30)
    assert _wait_gone(workers, 5.0) == []
