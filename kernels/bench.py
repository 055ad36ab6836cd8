"""Benchmark the fused ops against eager PyTorch and torch.compile, on the same inputs.

Commands:
  tbps bench kernels                          # CPU: the reference paths at small sizes
  tbps bench kernels --out runs/bench/h200    # a GPU: every case below, eager, compile, Triton
  tbps bench kernels --sizes goal --kinds sdm,tal --providers eager,triton
  TRITON_INTERPRET=1 tbps bench kernels --providers eager,triton --kinds sdm   # CPU, interpreter

Cases: similarity_loss of every kind (sdm, bsdm, tal, itc, waf) and topk_select (top-k and sampled),
at the goal size (similarity n = N = 16384, D = 512; selection B = 1024, L = 576, k = 0.3 L,
D = 768) and the training sizes (n = 64 queries against N = 512 keys, D = 512; selection of
ViT-B/16's 193 tokens at 384x128 for a batch of 64), in fwd and fwd+bwd.

Providers: "eager" is the op's own reference (the test oracle, so the baseline cannot drift),
"compile" is torch.compile of that reference, "triton" the fused kernels. Every provider runs
once on the same inputs and upstream gradient before it is timed, and its outputs and input
gradients are compared with eager's: the `check` column says ok or MISMATCH with the relative
error (selection must agree exactly); a mismatch is reported, never hidden, and counted in the
last line. Columns: time p20/p50/p80 (ms), speed-up against eager and against compile, TFLOP/s of
the useful work (similarity: 2 n N D forward, 6 n N D forward+backward, doubled for itc's momentum
logits) and GB/s of the bytes that must move (inputs, outputs, gradients, never the n x N
matrix), each as a share of the device's specification peak (SPECS: dense tensor-core TFLOP/s in
the benchmark dtype and HBM bandwidth; "unknown device" leaves the shares empty), and the peak
extra memory beyond the inputs. For the Triton path at each case, torch.profiler's per-kernel
breakdown (device time per kernel, share of the total). Results: bench.csv, bench.json (device,
spec, versions, commit, command, rows, profiles; on a GPU also the tiles each launch chose and
every compiled kernel's registers and spills as the driver loaded it) and bench.png, written
after every case so an interrupted run keeps what it measured; default folder
runs/bench/<device>-<time> (git ignores runs/). Prints a table and, last, one JSON line.
"""
import argparse
import csv
import importlib
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from tbps.kernels import _dispatch
from tbps.kernels._dispatch import interpreting
from tbps.kernels.environment import environment
from tbps.kernels.similarity_loss import KINDS, similarity_loss
from tbps.kernels.topk_select import topk_select

SIZES = {  # similarity: (n, N, D); selection: (B, L, D), k = 0.3 L
    "goal": {"similarity": [(16384, 16384, 512)], "topk": [(1024, 576, 768)]},
    "train": {"similarity": [(64, 512, 512)], "topk": [(64, 193, 768)]},
    "small": {"similarity": [(4096, 4096, 512)], "topk": [(256, 576, 768)]},
    "cpu": {"similarity": [(64, 256, 64)], "topk": [(2, 32, 16)]},  # small: the interpreter too
}
TAU = {"sdm": 0.02, "bsdm": 0.02, "tal": 0.015, "itc": 0.02, "waf": 0.02}
SELECTIONS = ("select", "sample")
# Vendor datasheet peaks, dense (no sparsity): TFLOP/s for bf16/fp16 tensor cores, TF32 tensor
# cores and fp32 without them, and HBM TB/s. Matched on torch.cuda.get_device_name by MATCH.
SPECS = {
    "H100 SXM": dict(bf16=989.4, tf32=494.7, fp32=66.9, hbm=3.35),
    "H100 PCIe": dict(bf16=756.5, tf32=378.0, fp32=51.2, hbm=2.0),
    "H100 NVL": dict(bf16=835.5, tf32=417.5, fp32=60.0, hbm=3.9),
    "H200": dict(bf16=989.4, tf32=494.7, fp32=66.9, hbm=4.8),
    "H200 NVL": dict(bf16=835.5, tf32=417.5, fp32=60.0, hbm=4.8),
    "A100 SXM 80GB": dict(bf16=312.0, tf32=156.0, fp32=19.5, hbm=2.039),
    "A100 SXM 40GB": dict(bf16=312.0, tf32=156.0, fp32=19.5, hbm=1.555),
    "A100 PCIe 80GB": dict(bf16=312.0, tf32=156.0, fp32=19.5, hbm=1.935),
    "A100 PCIe 40GB": dict(bf16=312.0, tf32=156.0, fp32=19.5, hbm=1.555),
}
MATCH = [  # (words all in the lower-cased device name, SPECS key), first match wins
    (("h200", "nvl"), "H200 NVL"), (("h200",), "H200"),
    (("h100", "pcie"), "H100 PCIe"), (("h100", "nvl"), "H100 NVL"), (("h100",), "H100 SXM"),
    (("a100", "pcie", "80gb"), "A100 PCIe 80GB"), (("a100", "pcie"), "A100 PCIe 40GB"),
    (("a100", "80gb"), "A100 SXM 80GB"), (("a100",), "A100 SXM 40GB"),
]
TOLERANCE = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # relative, vs eager


@dataclass
class Row:
    op: str
    kind: str
    size: str
    provider: str
    mode: str
    ms_p20: float = math.nan
    ms_p50: float = math.nan
    ms_p80: float = math.nan
    x_eager: float = math.nan  # eager p50 / this p50
    x_compile: float = math.nan  # compile p50 / this p50
    tflops: float = math.nan
    pct_tensor_peak: float = math.nan
    gbps: float = math.nan
    pct_hbm_peak: float = math.nan
    extra_mib: float = math.nan
    check: str = ""  # ok / MISMATCH ... against eager's outputs and gradients
    status: str = "ok"


def device_spec(name: str):
    """(SPECS key, peaks) for this device name, or (None, None) for an unknown device."""
    low = name.lower()
    for words, key in MATCH:
        if all(w in low for w in words):
            return key, SPECS[key]
    return None, None


# --------------------------------------------------------------------------- measuring
def time_fn(fn, device, grads=(), repeats=5):
    """(p20, p50, p80) in ms. CUDA: triton.testing.do_bench (L2 flushed between runs); CPU: wall
    clock over a few runs (the CPU numbers only show that the paths run)."""
    if device.type == "cuda":
        import triton.testing  # on a GPU only: triton is absent off Linux

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=list(grads))
        return p20, p50, p80
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        for t in grads:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return q[1], statistics.median(times), q[7]


def extra_mib(fn, device, grads=()):
    """Peak memory allocated during fn beyond what existed before it (CUDA only)."""
    if device.type != "cuda":
        return math.nan
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def profile(fn, device, top=12):
    """Per-kernel breakdown of one call: device kernels on CUDA, CPU ops otherwise."""
    cuda = device.type == "cuda"
    if cuda:
        fn()  # compiled and tuned before it is profiled
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = (getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
              if cuda else evt.self_cpu_time_total)
        if us > 0:
            rows.append(dict(name=evt.key[:90], calls=evt.count, us=round(us, 1)))
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows) or 1.0
    for r in rows:
        r["share"] = round(r["us"] / total, 3)
    return dict(unit="device us" if cuda else "CPU us (self)", total_us=round(total, 1), kernels=rows[:top])


def compiled_kernels() -> list:
    """What the driver reports for every kernel variant this process compiled: registers and
    spills as the GPU loaded them (the offline check is tests/kernels/compile_sm90.py)."""
    out = []
    for module in ("tbps.kernels.similarity_loss", "tbps.kernels.topk_select"):
        for name, fn in vars(importlib.import_module(module)).items():
            caches = getattr(fn, "device_caches", None)
            if not name.startswith("_") or not isinstance(caches, dict):
                continue
            for cache in caches.values():
                for kernel in cache[0].values():
                    try:
                        kernel._init_handles()  # registers and spills are known once loaded
                        meta = kernel.metadata
                        out.append(dict(kernel=name, registers=kernel.n_regs, spills=kernel.n_spills,
                                        shared=meta.shared, num_warps=meta.num_warps,
                                        num_stages=meta.num_stages))
                    except Exception as e:  # noqa: BLE001  another Triton's internals: say so
                        out.append(dict(kernel=name, error=f"{type(e).__name__}: {e}"))
    return out


def relative_error(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item() if want.numel() else 0.0


def compare(outs, ref, exact: bool, dtype) -> str:
    """ok / MISMATCH against eager's outputs (a tuple of tensors, the same structure)."""
    if exact:
        bad = [i for i, (a, b) in enumerate(zip(outs, ref)) if not torch.equal(a, b)]
        return "ok (exact)" if not bad else f"MISMATCH (outputs {bad} differ)"
    err = max(relative_error(a, b) for a, b in zip(outs, ref))
    tol = TOLERANCE.get(dtype, 2e-3)
    return f"ok (rel err {err:.1e})" if err <= tol else f"MISMATCH (rel err {err:.2e} > {tol:.0e})"


# --------------------------------------------------------------------------- cases
def similarity_cases(shapes, kinds, providers, device, dtype):
    """(key, {provider: (fwd, fwd+bwd, grads, outputs)}, work, exact) per (shape, kind)."""
    for n, N, D in shapes:
        g = torch.Generator(device).manual_seed(0)
        key_ids = torch.randint(0, max(1, N // 4), (N,), device=device, generator=g)  # ~4 per id
        ids = key_ids[:n]  # the local queries are among the keys, as after an all_gather
        q0, k0, qm, km = (torch.randn(x, D, device=device, dtype=dtype, generator=g) for x in (n, N, n, N))
        upstream = torch.rand(n, device=device, dtype=torch.float32, generator=g)
        for kind in kinds:
            mom = kind == "itc"
            s = q0.element_size() * (2 if mom else 1)
            work = {"fwd": (2 * n * N * D * (2 if mom else 1), (n + N) * D * s + 4 * n),
                    "fwd+bwd": (2 * n * N * D * (4 if mom else 3), 2 * (n + N) * D * s + 4 * n
                                + (n + N) * D * q0.element_size())}
            fns = {}
            for provider in providers:
                impl = "triton" if provider == "triton" else "reference"

                def loss(q, k, kind=kind, impl=impl):
                    return similarity_loss(q, k, ids, key_ids, kind=kind, tau=TAU[kind],
                                           momentum_query_nD=qm if mom else None,
                                           momentum_key_ND=km if mom else None, impl=impl)

                f = torch.compile(loss, dynamic=False) if provider == "compile" else loss
                q, k = (x.detach().clone().requires_grad_() for x in (q0, k0))

                def outputs(f=f, q=q, k=k):
                    out = f(q, k)
                    return (out, *torch.autograd.grad(out, (q, k), upstream))

                fns[provider] = (lambda f=f, q=q, k=k: f(q, k),
                                 lambda f=f, q=q, k=k: f(q, k).backward(upstream), (q, k), outputs)
            yield ("similarity", kind, f"n={n} N={N} D={D}"), fns, work, False


def topk_cases(shapes, selections, providers, device, dtype):
    for B, L, D in shapes:
        k = int(0.3 * L)
        g = torch.Generator(device).manual_seed(0)
        scores = torch.randn(B, L, device=device, dtype=dtype, generator=g)
        weights = torch.rand(B, L, device=device, generator=g)
        valid = torch.rand(B, L, device=device, generator=g) > 0.05
        feats0 = torch.randn(B, L, D, device=device, dtype=dtype, generator=g)
        upstream = torch.randn(B, k, D, device=device, dtype=dtype, generator=g)
        s = feats0.element_size()
        for selection in selections:
            sample = selection == "sample"
            inputs = B * L * (4 + 4 + 1 + 4) if sample else B * L * (scores.element_size() + 1)
            fwd = inputs + B * k * 9 + 2 * B * k * D * s
            work = {"fwd": (0, fwd), "fwd+bwd": (0, fwd + B * k * (D * s + 9) + B * L * D * s)}
            fns = {}
            for provider in providers:
                impl = "triton" if provider == "triton" else "reference"

                def select(fe, impl=impl):
                    if sample:  # the same seeded draw for every provider
                        gen = torch.Generator(device).manual_seed(1)
                        return topk_select(None, valid, k, fe, weights_BL=weights, sample=True,
                                           generator=gen, impl=impl)
                    return topk_select(scores, valid, k, fe, impl=impl)

                f = torch.compile(select, dynamic=False) if provider == "compile" else select
                feats = feats0.detach().clone().requires_grad_()

                def outputs(f=f, feats=feats):
                    out = f(feats)
                    return (out.indices_Bk, out.valid_Bk, out.features_BkD,
                            *torch.autograd.grad(out.features_BkD, feats, upstream))

                fns[provider] = (lambda f=f, fe=feats: f(fe).features_BkD,
                                 lambda f=f, fe=feats: f(fe).features_BkD.backward(upstream),
                                 (feats,), outputs)
            yield ("topk", selection, f"B={B} L={L} k={k} D={D}"), fns, work, True


def run_case(key, fns, work, exact, device, dtype, spec, repeats, want_profile):
    """Rows of one case (every provider x mode) and the Triton path's profile."""
    rows, ref, prof = [], None, None
    peak_flops = spec and spec["bf16" if dtype in (torch.bfloat16, torch.float16) else
                               "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"]
    for provider, (fwd, fwd_bwd, grads, outputs) in fns.items():
        check = ""
        try:
            outs = outputs()
            if provider == "eager":
                ref, check = outs, "reference"
            elif ref is not None:
                check = compare(outs, ref, exact, dtype)
            del outs
        except Exception as e:  # noqa: BLE001  record and go on: one provider must not hide the others
            check = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            row = Row(*key, provider=provider, mode=mode, check=check)
            try:
                row.ms_p20, row.ms_p50, row.ms_p80 = time_fn(fn, device, grads, repeats)
                row.extra_mib = extra_mib(fn, device, grads)
                flops, nbytes = work[mode]
                row.tflops = flops / row.ms_p50 / 1e9 if flops else math.nan
                row.gbps = nbytes / row.ms_p50 / 1e6
                if spec:
                    row.pct_tensor_peak = 100 * row.tflops / peak_flops
                    row.pct_hbm_peak = 100 * row.gbps / (1e3 * spec["hbm"])
            except torch.cuda.OutOfMemoryError:
                row.status = "OOM"
            except Exception as e:  # noqa: BLE001
                row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
            finally:
                for t in grads:
                    t.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
        if provider == "triton" and want_profile:
            try:
                prof = profile(fwd_bwd, device)
            except Exception as e:  # noqa: BLE001
                prof = {"error": f"{type(e).__name__}: {e}"}
            for t in grads:
                t.grad = None
    base = {(r.mode, r.provider): r.ms_p50 for r in rows}
    for r in rows:
        r.x_eager = base.get((r.mode, "eager"), math.nan) / r.ms_p50
        r.x_compile = base.get((r.mode, "compile"), math.nan) / r.ms_p50
    return rows, prof


# --------------------------------------------------------------------------- reporting
def device_record(device, dtype) -> dict:
    """The device measured on (a GPU's name matches SPECS), its specification peaks, the dtype."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    spec_name, spec = device_spec(name) if device.type == "cuda" else (None, None)
    return {"device": name, "spec": spec_name or "unknown device", "spec_peaks": spec,
            "dtype": str(dtype).replace("torch.", "")}


def fmt(x, spec=".3g"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write(out: Path, rows, profiles, env, note, cuda: bool):
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*asdict(Row("", "", "", "", "")), *env])
        writer.writeheader()
        writer.writerows({**asdict(r), **env} for r in rows)
    extra = {}
    if cuda:  # the tiles each launch chose, and the compiled variants as the driver sees them
        extra = {"tiles": {" ".join(map(str, k)): v for k, v in _dispatch._chosen.items()},
                 "compiled_kernels": compiled_kernels()}
    (out / "bench.json").write_text(json.dumps({**env, "note": note, "rows": [asdict(r) for r in rows],
                                                "profiles": profiles, **extra}, indent=1, default=str))


def print_table(rows, profiles, env, note):
    from rich.console import Console  # rich and matplotlib only when the results are shown
    from rich.table import Table

    table = Table(title=f"tbps.kernels.bench on {env['device']} ({env['dtype']}; peaks: {env['spec']})",
                  caption=note)
    cols = ("op", "kind", "size", "provider", "mode", "p50 ms", "p20-p80", "x eager", "x compile",
            "TFLOP/s", "% tensor", "GB/s", "% HBM", "extra MiB", "check", "status")
    for col in cols:
        table.add_column(col, justify="left" if col in cols[:5] + ("check", "status") else "right")
    for r in rows:
        table.add_row(r.op, r.kind, r.size, r.provider, r.mode, fmt(r.ms_p50),
                      f"{fmt(r.ms_p20)}-{fmt(r.ms_p80)}", fmt(r.x_eager, ".2f"), fmt(r.x_compile, ".2f"),
                      fmt(r.tflops), fmt(r.pct_tensor_peak, ".1f"), fmt(r.gbps), fmt(r.pct_hbm_peak, ".1f"),
                      fmt(r.extra_mib, ".0f"), r.check, r.status)
    console = Console(width=250)
    console.print(table)
    for case, prof in profiles.items():
        kernels = ", ".join(f"{k['name'][:40]} {100 * k['share']:.0f}%" for k in prof.get("kernels", [])[:5])
        console.print(f"triton {case}: {prof.get('total_us', '-')} {prof.get('unit', '')}: {kernels}")


def plot(rows, env, path):
    import matplotlib  # heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use('Agg')

    panels = sorted({(r.op, r.mode) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.6), squeeze=False)
    for ax, (op, mode) in zip(axes[0], panels):
        sel = [r for r in rows if (r.op, r.mode) == (op, mode) and r.status == "ok"]
        cases = list(dict.fromkeys((r.kind, r.size) for r in sel))
        providers = list(dict.fromkeys(r.provider for r in sel))
        width = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            ms = {(r.kind, r.size): r.ms_p50 for r in sel if r.provider == p}
            ax.bar([j + i * width for j in range(len(cases))], [ms.get(c, math.nan) for c in cases],
                   width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))],
                      [f"{k}\n{s}" for k, s in cases], rotation=30, ha="right", fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"{op} {mode}")
        ax.legend(fontsize=7)
    fig.suptitle(f"{env['device']} ({env['spec']}), {env['dtype']}; torch {env['torch']}, "
                 f"triton {env['triton']}, CUDA {env['cuda']}; commit {env['commit'][:12]}\n"
                 f"{env['command']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- entry point
def parse_args(argv):
    p = argparse.ArgumentParser(prog="tbps bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--op", choices=("similarity", "topk", "all"), default="all")
    p.add_argument("--sizes", default=None, help=f"comma-separated from {tuple(SIZES)}; default "
                   "goal,train on CUDA, cpu otherwise")
    p.add_argument("--kinds", default=",".join(KINDS), help="similarity kinds, comma-separated")
    p.add_argument("--selections", default=",".join(SELECTIONS), help="topk: select, sample")
    p.add_argument("--providers", default=None,
                   help="comma-separated from eager,compile,triton; default: all three on CUDA, "
                        "eager on CPU (torch.compile there takes about 30 s per graph; triton "
                        "needs TRITON_INTERPRET=1)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=5, help="CPU timing runs")
    p.add_argument("--no-profile", action="store_true", help="skip the per-kernel profiles")
    p.add_argument("--out", default=None, help="results folder (default runs/bench/<device>-<time>)")
    args = p.parse_args(argv)
    for name, values, allowed in (("--kinds", args.kinds, KINDS),
                                  ("--selections", args.selections, SELECTIONS),
                                  ("--sizes", args.sizes or "cpu", tuple(SIZES)),
                                  ("--providers", args.providers or "eager", ("eager", "compile", "triton"))):
        if bad := [v for v in values.split(",") if v not in allowed]:
            p.error(f"{name}: unknown {bad}; choose from {allowed}")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sizes = (args.sizes or ("goal,train" if cuda else "cpu")).split(",")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")]
    providers = (args.providers or ("eager,compile,triton" if cuda else "eager")).split(",")
    providers = ["eager"] + [p for p in providers if p != "eager"]  # eager first: the reference
    note = None
    if not cuda:
        dropped = "triton" in providers and not interpreting()
        providers = [p for p in providers if p != "triton" or interpreting()]
        note = ("CPU: the CPU numbers only show that the paths run"
                + ("; triton dropped (it needs a GPU, or TRITON_INTERPRET=1)" if dropped else ""))
    env = {**environment("tbps bench kernels", argv), **device_record(device, dtype)}
    out = Path(args.out or f"runs/bench/{device.type}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    cases = []  # generators: each size's tensors exist only while that size runs
    for size in sizes:
        if args.op in ("similarity", "all"):
            cases.append(similarity_cases(SIZES[size]["similarity"], args.kinds.split(","),
                                          providers, device, dtype))
        if args.op in ("topk", "all"):
            cases.append(topk_cases(SIZES[size]["topk"], args.selections.split(","), providers,
                                    device, dtype))
    rows, profiles = [], {}
    try:
        for gen in cases:
            for key, fns, work, exact in gen:
                case_rows, prof = run_case(key, fns, work, exact, device, dtype, env["spec_peaks"],
                                           args.repeats, not args.no_profile and "triton" in fns)
                rows += case_rows
                if prof is not None:
                    profiles[" ".join(key)] = prof
                write(out, rows, profiles, env, note, cuda)  # after every case: a cut run keeps it
    except KeyboardInterrupt:  # SIGINT (a time limit): report the cases that finished
        note = (note + "; " if note else "") + f"interrupted after {len(rows)} rows"
        write(out, rows, profiles, env, note, cuda)
    plot(rows, env, out / "bench.png")
    print_table(rows, profiles, env, note)
    print(json.dumps({"out": str(out), "device": env["device"], "rows": len(rows),
                      "failed": sum(r.status != "ok" for r in rows),
                      "mismatches": sum(r.check.startswith(("MISMATCH", "error")) for r in rows)}))
    return rows


if __name__ == "__main__":
    main()
