"""The benchmark CLI runs on CPU (reference paths) and writes its table, CSV, JSON and plot."""
import csv
import json

import torch

from kernels.bench import main


def test_cpu_benchmark_writes_results(tmp_path, capsys):
    rows = main(["--out", str(tmp_path)])
    assert rows and all(r.status == "ok" for r in rows)
    printed = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "reference paths only" in printed and {r.provider for r in rows} == {"eager"}
    assert json.loads(printed.strip().splitlines()[-1])["rows"] == len(rows)
    meta = json.loads((tmp_path / "bench.json").read_text())
    for key in ("device", "torch", "triton", "commit", "command", "peaks", "rows"):
        assert meta[key], key
    assert meta["command"] == f"python -m kernels.bench --out {tmp_path}"
    with open(tmp_path / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"ms_p50", "ms_p20", "ms_p80", "commit"} <= set(table[0])
    assert {r["op"] for r in table} == {"similarity", "topk"}
    assert (tmp_path / "bench.png").stat().st_size > 1000
