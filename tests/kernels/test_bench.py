"""The benchmark CLI on CPU: every case on the reference path with its table, CSV, JSON and plot
and the environment record; the Triton path in the interpreter checked against eager, a wrong
output reported as a mismatch; the device specification table; the dispatch switch that forces
an implementation."""
import csv
import json

import pytest
import torch

import tbps.kernels.bench as bench
from tbps.kernels import _dispatch
from tbps.kernels._dispatch import interpreting


def test_cpu_benchmark_writes_results(tmp_path, capsys):
    rows = bench.main(["--out", str(tmp_path)])
    assert rows and all(r.status == "ok" for r in rows)
    assert {(r.op, r.kind) for r in rows} == ({("similarity", k) for k in bench.KINDS}
                                              | {("topk", "select"), ("topk", "sample")})
    printed = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert {r.provider for r in rows} == {"eager"} and "paths run" in printed
    assert json.loads(printed.strip().splitlines()[-1])["rows"] == len(rows)
    meta = json.loads((tmp_path / "bench.json").read_text())
    for key in ("device", "spec", "torch", "triton", "commit", "command", "rows", "cpu", "threads",
                "python", "time"):
        assert meta[key], key
    assert meta["command"] == f"tbps bench kernels --out {tmp_path}"
    with open(tmp_path / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert {"ms_p20", "ms_p50", "ms_p80", "x_eager", "x_compile", "tflops", "pct_tensor_peak", "gbps",
            "pct_hbm_peak", "extra_mib", "check", "commit"} <= set(table[0])
    assert (tmp_path / "bench.png").stat().st_size > 1000


@pytest.mark.skipif(torch.cuda.is_available() or not interpreting(), reason="the CPU interpreter run")
def test_triton_outputs_are_checked_against_eager(tmp_path, capsys, monkeypatch):
    real = bench.topk_select

    def wrong_on_triton(*args, impl, **kwargs):  # a broken kernel: one feature off
        out = real(*args, impl=impl, **kwargs)
        if impl == "triton":
            out = out._replace(features_BkD=out.features_BkD + (out.features_BkD == out.features_BkD.max()))
        return out

    monkeypatch.setattr(bench, "topk_select", wrong_on_triton)
    rows = bench.main(["--out", str(tmp_path), "--providers", "eager,triton", "--kinds", "sdm",
                       "--selections", "select", "--repeats", "1"])
    check = {(r.op, r.provider): r.check for r in rows}
    assert check[("similarity", "triton")].startswith("ok (rel err")
    assert check[("topk", "triton")].startswith("MISMATCH")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mismatches"] == 2
    profiles = json.loads((tmp_path / "bench.json").read_text())["profiles"]
    assert set(profiles) == {"similarity sdm n=64 N=256 D=64", "topk select B=2 L=32 k=9 D=16"}
    assert all(p["kernels"] and p["total_us"] > 0 for p in profiles.values())


@pytest.mark.parametrize("name, spec", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"), ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"),
    ("NVIDIA GeForce RTX 4090", None)])
def test_device_specification_table(name, spec):
    assert bench.device_spec(name)[0] == spec


def test_forced_switch_resolves_the_auto_calls_only():
    x = torch.zeros(2)
    want = "triton" if interpreting() else "reference"
    with _dispatch.forced("reference"):
        assert _dispatch.resolve_impl("op", "auto", x) == "reference"
        with _dispatch.forced(want):
            assert _dispatch.resolve_impl("op", "auto", x) == want
            assert _dispatch.resolve_impl("op", "reference", x) == "reference"
        assert _dispatch.resolve_impl("op", "auto", x) == "reference"
    assert _dispatch._forced is None
    with pytest.raises(ValueError, match="forced"):
        with _dispatch.forced("fast"):
            pass
