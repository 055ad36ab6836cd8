"""The README's first command, end to end: the default synthetic data, 2 CPU processes, and the
model must learn (Rank-1 on the synthetic test split at least 40; chance is 0.5)."""
import json
import os
import subprocess
import sys

import pytest

from tests.trainer.conftest import REPO

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_quickstart_learns(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "trainer.quickstart", "--data",
                           str(tmp_path / "data"), "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    r1 = report["best"]["t2i"]["R1"]
    print(f"quickstart: best-on-val weights, test R1 {r1:.2f}, final {report['final']['t2i']}, "
          f"{summary['quickstart_seconds']} s")
    assert report["select_split"] == "val"
    assert r1 >= 40.0, report
