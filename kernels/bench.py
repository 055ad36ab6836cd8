"""Benchmark the fused ops against eager PyTorch and torch.compile.

Commands:
  python -m kernels.bench                                     # CPU: reference paths, tiny sizes
  python -m kernels.bench --sizes full --out runs/bench/h100  # one GPU, the sizes of the targets
  python -m kernels.bench --op similarity --kinds sdm,tal,itc --sizes small
  python -m kernels.bench --providers eager,compile           # include torch.compile on CPU

Providers: "eager" is the op's own `<op>_reference` (the test oracle, so the baseline cannot drift),
"compile" is torch.compile of that reference, "triton" the fused kernel (CUDA only). Modes: fwd
and fwd+bwd. Per row: median and 20th/80th percentile times, the rate from the work formulas in
the op files' docstrings (similarity: TFLOP/s of 2 n N D forward, 6 n N D forward+backward;
selection: GB/s of the bytes moved) as a share of the device's measured peak (a large matmul in the
benchmark dtype; a large copy), peak extra memory (CUDA), and the speed-up over eager.
Writes bench.csv, bench.json (device, versions, commit, command, peaks, rows) and bench.png to --out
(default runs/bench/<device>-<time>, which git ignores), prints a rich table and, last, one JSON line.
"""
import argparse
import csv
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels._dispatch import HAS_TRITON
from kernels.similarity_loss import KINDS, similarity_loss
from kernels.topk_select import topk_select

SIZES = {  # similarity: (n, N, D); selection: (B, L, D), k = 0.3 L
    "similarity": {
        "cpu": [(256, 256, 64), (512, 512, 128)],
        "small": [(1024, 1024, 256), (4096, 4096, 256), (4096, 4096, 1024)],
        "full": [(n, n, d) for n in (1024, 4096, 16384, 65536) for d in (256, 1024)],
    },
    "topk": {
        "cpu": [(32, 192, 64), (64, 576, 64)],
        "small": [(256, 192, 768), (1024, 576, 768)],
        "full": [(256, 192, 768), (1024, 192, 768), (256, 576, 768), (1024, 576, 768)],
    },
}
TAU = {"sdm": 0.02, "bsdm": 0.02, "tal": 0.015, "itc": 0.02, "waf": 0.02}


@dataclass
class Row:
    op: str
    kind: str
    size: str
    provider: str
    mode: str
    ms_p50: float = math.nan
    ms_p20: float = math.nan
    ms_p80: float = math.nan
    rate: float = math.nan  # TFLOP/s (similarity) or GB/s (topk)
    rate_unit: str = ""
    pct_peak: float = math.nan
    peak_mem_mib: float = math.nan
    speedup_vs_eager: float = math.nan
    status: str = "ok"


# --------------------------------------------------------------------------- timing
def time_fn(fn, device, grad_to_none=()):
    """(p50, p20, p80) in ms. CUDA: triton.testing.do_bench (flushes L2 between runs); CPU: wall
    clock over a few runs (the CPU numbers only show that the paths run)."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=list(grad_to_none)))
    fn()  # warm-up (and compile, for torch.compile)
    times = []
    for _ in range(5):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def peak_extra_mib(fn, device):
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_peaks(device, dtype):
    """Measured matmul TFLOP/s in dtype and copy GB/s (read + write), the denominators of % peak."""
    m, nbytes = (8192, 2 << 30) if device.type == "cuda" else (1024, 64 << 20)
    a = torch.randn(m, m, device=device, dtype=dtype)
    ms = time_fn(lambda: a @ a, device)[0]
    x = torch.empty(nbytes // 4, device=device)
    y = torch.empty_like(x)
    ms_copy = time_fn(lambda: y.copy_(x), device)[0]
    return {"matmul_tflops": 2 * m**3 / ms / 1e9, "copy_gbps": 2 * nbytes / ms_copy / 1e6}


# --------------------------------------------------------------------------- cases
def similarity_cases(sizes, kinds, providers, device, dtype):
    for n, N, D in sizes:
        g = torch.Generator(device).manual_seed(0)
        key_ids = torch.randint(0, max(1, N // 4), (N,), device=device, generator=g)  # ~4 per id
        ids = key_ids[:n]  # the local queries are among the keys, as after an all_gather
        feats = [torch.randn(x, D, device=device, dtype=dtype, generator=g) for x in (n, N, n, N)]
        upstream = torch.rand(n, device=device, dtype=torch.float32)
        for kind in kinds:
            mom = kind == "itc"
            flops = {"fwd": 2 * n * N * D * (2 if mom else 1),
                     "fwd+bwd": 2 * n * N * D * (4 if mom else 3)}
            for provider in providers:
                impl = "triton" if provider == "triton" else "reference"

                def loss(q, k, qm, km, kind=kind, impl=impl):
                    return similarity_loss(q, k, ids, key_ids, kind=kind, tau=TAU[kind],
                                           momentum_query_nD=qm, momentum_key_ND=km, impl=impl)

                f = torch.compile(loss, dynamic=False) if provider == "compile" else loss
                q, k = (x.detach().requires_grad_() for x in feats[:2])
                qm, km = feats[2:] if mom else (None, None)
                yield (("similarity", kind, f"n={n} N={N} D={D}", provider),
                       {"fwd": (lambda f=f, q=q, k=k, qm=qm, km=km: f(q, k, qm, km), ()),
                        "fwd+bwd": (lambda f=f, q=q, k=k, qm=qm, km=km: f(q, k, qm, km).backward(upstream),
                                    (q, k))},
                       flops, "TFLOP/s")


def topk_cases(sizes, providers, device, dtype):
    for B, L, D in sizes:
        k = int(0.3 * L)
        g = torch.Generator(device).manual_seed(0)
        scores = torch.randn(B, L, device=device, dtype=dtype, generator=g)
        valid = torch.rand(B, L, device=device, generator=g) > 0.05
        feats = torch.randn(B, L, D, device=device, dtype=dtype, generator=g).requires_grad_()
        upstream = torch.randn(B, k, D, device=device, dtype=dtype, generator=g)
        s = feats.element_size()
        fwd_bytes = B * L * (scores.element_size() + 1) + B * k * 9 + 2 * B * k * D * s
        nbytes = {"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + B * L * D * s + B * k * D * s}
        for provider in providers:
            impl = "triton" if provider == "triton" else "reference"

            def select(sc, va, fe, impl=impl, k=k):
                return topk_select(sc, va, k, fe, impl=impl).features_BkD

            f = torch.compile(select, dynamic=False) if provider == "compile" else select
            yield (("topk", "select", f"B={B} L={L} k={k} D={D}", provider),
                   {"fwd": (lambda f=f: f(scores, valid, feats), ()),
                    "fwd+bwd": (lambda f=f: f(scores, valid, feats).backward(upstream), (feats,))},
                   nbytes, "GB/s")


def run_case(key, fns, work, unit, device, peaks):
    rows = []
    for mode, (fn, grads) in fns.items():
        row = Row(*key, mode=mode, rate_unit=unit)
        try:
            row.ms_p50, row.ms_p20, row.ms_p80 = time_fn(fn, device, grads)
            row.peak_mem_mib = peak_extra_mib(fn, device)
            row.rate = work[mode] / row.ms_p50 / (1e9 if unit == "TFLOP/s" else 1e6)
            peak = peaks["matmul_tflops"] if unit == "TFLOP/s" else peaks["copy_gbps"]
            row.pct_peak = 100 * row.rate / peak
        except torch.cuda.OutOfMemoryError:
            row.status = "OOM"
        except Exception as e:  # record and go on: one failing provider must not hide the others
            row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        finally:
            for t in grads:
                t.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def add_speedups(rows):
    eager = {(r.op, r.kind, r.size, r.mode): r.ms_p50 for r in rows if r.provider == "eager"}
    for r in rows:
        base = eager.get((r.op, r.kind, r.size, r.mode), math.nan)
        r.speedup_vs_eager = base / r.ms_p50 if r.ms_p50 > 0 else math.nan


# --------------------------------------------------------------------------- reporting
def environment(device, dtype, argv):
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    triton_version = None
    if HAS_TRITON:
        import triton

        triton_version = triton.__version__
    return {"device": name, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version, "python": platform.python_version(),
            "commit": commit, "command": " ".join(["python -m kernels.bench", *argv]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def fmt(x, spec=".3g"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(rows, env, peaks, cpu_note):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kernels.bench on {env['device']} ({env['dtype']})", caption=cpu_note)
    for col in ("op", "kind", "size", "provider", "mode", "p50 ms", "p20-p80 ms", "rate", "% peak",
                "peak MiB", "x eager", "status"):
        table.add_column(col, justify="right" if col not in ("op", "kind", "size", "provider",
                                                             "mode", "status") else "left")
    for r in rows:
        table.add_row(r.op, r.kind, r.size, r.provider, r.mode, fmt(r.ms_p50),
                      f"{fmt(r.ms_p20)}-{fmt(r.ms_p80)}", f"{fmt(r.rate)} {r.rate_unit}",
                      fmt(r.pct_peak, ".1f"), fmt(r.peak_mem_mib, ".0f"), fmt(r.speedup_vs_eager, ".2f"),
                      r.status)
    console = Console(width=200)
    console.print(table)
    console.print(f"measured peaks: {peaks['matmul_tflops']:.2f} TFLOP/s matmul ({env['dtype']}), "
                  f"{peaks['copy_gbps']:.1f} GB/s copy")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.op, r.mode) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (op, mode) in zip(axes[0], panels):
        sel = [r for r in rows if (r.op, r.mode) == (op, mode) and r.status == "ok"]
        sizes = list(dict.fromkeys(r.size for r in rows if r.op == op))
        for line in sorted({(r.kind, r.provider) for r in sel}):
            pts = [(sizes.index(r.size), r.ms_p50) for r in sel if (r.kind, r.provider) == line]
            ax.plot(*zip(*pts), marker="o", label=f"{line[1]} ({line[0]})")
        ax.set_xticks(range(len(sizes)), sizes, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"{op} {mode}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- entry point
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("--op", choices=("similarity", "topk", "all"), default="all")
    p.add_argument("--sizes", choices=("cpu", "small", "full"), default=None,
                   help="default: full on CUDA, cpu otherwise")
    p.add_argument("--kinds", default="sdm", help=f"comma-separated similarity kinds from {KINDS}")
    p.add_argument("--providers", default=None,
                   help="comma-separated from eager,compile,triton; default: all three on CUDA, "
                        "eager on CPU (torch.compile there takes about 30 s per graph)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", default=None, help="results folder (default runs/bench/<device>-<time>)")
    args = p.parse_args(argv)
    kinds = args.kinds.split(",")
    if bad := [k for k in kinds if k not in KINDS]:
        p.error(f"--kinds: unknown {bad}; choose from {KINDS}")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sizes = args.sizes or ("full" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")]
    providers = (args.providers or ("eager,compile,triton" if cuda else "eager")).split(",")
    if bad := [p for p in providers if p not in ("eager", "compile", "triton")]:
        raise SystemExit(f"--providers: unknown {bad}; choose from eager, compile, triton")
    cpu_note = None
    if not cuda:
        cpu_note = ("CPU: reference paths only (eager" + (", torch.compile" if "compile" in providers else "")
                    + "); Triton timings need a CUDA GPU, the CPU numbers only show the harness runs")
        providers = [p for p in providers if p != "triton"]
    env = environment(device, dtype, argv)
    peaks = measure_peaks(device, dtype)
    cases = []  # generators: each size's tensors exist only while that size runs
    if args.op in ("similarity", "all"):
        cases.append(similarity_cases(SIZES["similarity"][sizes], args.kinds.split(","), providers,
                                      device, dtype))
    if args.op in ("topk", "all"):
        cases.append(topk_cases(SIZES["topk"][sizes], providers, device, dtype))
    rows = [row for gen in cases for case in gen for row in run_case(*case, device, peaks)]
    add_speedups(rows)

    out = Path(args.out or f"runs/bench/{device.type}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*asdict(rows[0]), *env])
        writer.writeheader()
        writer.writerows({**asdict(r), **env} for r in rows)
    (out / "bench.json").write_text(json.dumps({**env, "note": cpu_note, "peaks": peaks,
                                                "rows": [asdict(r) for r in rows]}, indent=1))
    plot(rows, out / "bench.png")
    print_table(rows, env, peaks, cpu_note)
    print(json.dumps({"out": str(out), "device": env["device"], "rows": len(rows),
                      "failed": sum(r.status != "ok" for r in rows)}))
    return rows


if __name__ == "__main__":
    main()
