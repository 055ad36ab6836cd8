"""Compile, for an H100 (sm_90) and without a GPU, exactly the kernel variants a GPU run launches,
and report what `ptxas -v` says about each: registers, spills, shared memory, async copies.

How: the launchers run on CPU tensors of the real shapes with `_dispatch.compiled` answering True
and `_dispatch.sm_count` 132 (H100 SXM), and `_dispatch.launch` records each launch instead of
running it. Every recorded launch is specialised the way Triton's own launcher specialises it
(16-byte-aligned pointers and integers divisible by 16 get the alignment hints that allow
vectorised and asynchronous copies; an integer equal to 1 becomes a constant), compiled once per
candidate tile configuration, and its PTX assembled again by the ptxas Triton uses, with -v.

The shapes are the goal's and training's, in bf16: similarity n = 64 queries against N = 512
keys and n = N = 16384 (forward; its backward specialises like the training size: every size and
stride divisible by 16), D = 512, every kind, and top-k selection at 1024 x 576, k = 172, D = 768.
--all adds fp16, fp32 (IEEE and TF32) and D = 256 (the query tile loaded once), which the GPU
tests launch too (kernels/gpu_check.sh runs it first, on every core, and so fills Triton's cache).
Run in a process without TRITON_INTERPRET (the compiles run in --jobs processes, default 2):
    python -m tests.kernels.compile_sm90                 # the table
    python -m tests.kernels.compile_sm90 --all --json out.json
"""
import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

dispatch = importlib.import_module("tbps.kernels._dispatch")
sl = importlib.import_module("tbps.kernels.similarity_loss")
tk = importlib.import_module("tbps.kernels.topk_select")
TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
H100_SHARED = 232448  # bytes of shared memory one program may use


@dataclass
class Variant:
    kernel: str
    case: str  # which launch: shape, dtype, kind
    config: str  # the tile configuration
    hints: str  # the launch specialisation: D = divisible by 16, 1 = the constant 1
    registers: int
    spill_stores: int  # bytes
    spill_loads: int
    shared: int  # bytes of dynamic shared memory
    cp_async: int  # cp.async copies in the PTX (global -> shared, pipelined)
    tma: int  # cp.async.bulk (TMA) copies
    wgmma: int


def record(fn) -> list:
    """The launches fn makes on a (pretended) H100: (kernel, args, consts, configs) each."""
    launches = []

    def fake_launch(kernel, grid, args, consts, configs, key=None):
        launches.append((kernel, args, consts, configs))

    with mock.patch.object(dispatch, "compiled", lambda x: True), \
            mock.patch.object(dispatch, "sm_count", lambda device: H100_SMS), \
            mock.patch.object(dispatch, "max_shared", lambda device: H100_SHARED), \
            mock.patch.object(dispatch, "launch", fake_launch):
        fn()
    return launches


def similarity_launches(n, N, D, dtype, kinds, backward=True):
    """Forward (and backward) of every kind, as the autograd Function drives the launchers; the
    backward with the upstream gradient of a mean (stride 0) and of a weighted sum (stride 1)."""
    g = torch.Generator().manual_seed(0)
    q, k, qm, km = (torch.empty(x, D, dtype=dtype) for x in (n, N, n, N))  # values unused
    kid = torch.randint(0, max(1, N // 4), (N,), generator=g)
    qid = kid[:n].clone()

    def run():
        for kind in kinds:
            mom = (qm, km) if kind == "itc" else (None, None)
            loss, rowv, perm, ranges = sl.similarity_forward(
                q, k, qid, kid, *mom, kind, 0.02, 0.1, 1.0, 1e-8, 0.4, 2.0)
            if backward:
                for dloss in (torch.ones(()).expand(n), torch.ones(n)):
                    sl.similarity_backward(q, k, kid, *mom, perm, ranges, rowv, dloss, 0.02)

    return [(f"n={n} N={N} D={D} {str(dtype)[6:]}", x) for x in record(run)]


def topk_launches(B, L, D, dtype):
    k = int(0.3 * L)
    scores, weights, noise = torch.empty(B, L, dtype=dtype), torch.empty(B, L), torch.empty(B, L)
    valid = torch.ones(B, L, dtype=torch.bool)
    feats = torch.empty(B, L, D, dtype=dtype)  # values unused: only launches are recorded

    def run():
        tk.topk_select_forward(scores, valid, k, feats, None, None)
        idx, ok, out = tk.topk_select_forward(None, valid, k, feats, weights, noise)
        tk.topk_select_backward(out, idx, ok, L)

    return [(f"B={B} L={L} k={k} D={D} {str(dtype)[6:]}", x) for x in record(run)]


def ptxas_report(ptx: str, name: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` of this PTX."""
    arch = sm_arch_from_capability(TARGET.arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(TARGET.arch).path, "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={arch}", src, "-o", src + ".o"],
                              capture_output=True, text=True, check=True)
    log = proc.stderr + proc.stdout
    block = log[log.index(f"Compiling entry function '{name}'"):]
    regs = int(re.search(r"Used (\d+) registers", block).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                       block).groups())
    return regs, stores, loads


def specialise(launches) -> list:
    """One job per distinct compiled variant: what Triton's launcher would compile for each
    recorded launch and candidate configuration."""
    backend = make_backend(TARGET)
    seen, jobs = set(), []
    for case, (kernel, args, consts, configs) in launches:
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        for cfg in configs:
            kwargs = {**consts, **cfg}
            bound, spec, opts = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec,
                                                                      opts)
            key = (ASTSource(kernel, signature, constexprs, attrs).hash(), options.num_warps,
                   options.num_stages)
            if key in seen:
                continue
            seen.add(key)
            hints = " ".join(f"{p.name}:{s[1]}" for p, s in zip(kernel.params, spec)
                             if not p.is_constexpr and s[1] in ("D", 1))
            flags = " ".join(f"{k}={v}" for k, v in consts.items()
                             if k in ("KIND", "A_NEG", "HAS_MOMENTUM", "Q_ONCE", "SAMPLE",
                                      "INPUT_PRECISION"))
            jobs.append(dict(module=kernel.fn.__module__, name=kernel.fn.__name__,
                             signature=signature, constexprs=constexprs, attrs=attrs,
                             options=options.__dict__, case=f"{case} {flags}".strip(),
                             config=" ".join(f"{k}={v}" for k, v in cfg.items()), hints=hints))
    return jobs


def compile_job(job) -> Variant:
    kernel = getattr(importlib.import_module(job["module"]), job["name"])
    src = ASTSource(kernel, job["signature"], job["constexprs"], job["attrs"])
    compiled = triton.compile(src, target=TARGET, options=job["options"])
    ptx = compiled.asm["ptx"]
    regs, stores, loads = ptxas_report(ptx, job["name"])
    return Variant(kernel=job["name"], case=job["case"], config=job["config"], hints=job["hints"],
                   registers=regs, spill_stores=stores, spill_loads=loads,
                   shared=compiled.metadata.shared,
                   cp_async=len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)),
                   tma=ptx.count("cp.async.bulk"), wgmma=ptx.count("wgmma.mma_async"))


def compile_all(jobs, workers: int) -> list[Variant]:
    if workers <= 1:
        return [compile_job(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(compile_job, jobs))


def launches(everything: bool):
    bf16 = torch.bfloat16
    out = (similarity_launches(64, 512, 512, bf16, sl.KINDS)
           + similarity_launches(16384, 16384, 512, bf16, sl.KINDS, backward=False)
           + topk_launches(1024, 576, 768, bf16))
    if everything:  # also what tests -m gpu launch (fp32 at D = 256 with and without TF32)
        out += similarity_launches(64, 512, 512, torch.float16, sl.KINDS)
        out += similarity_launches(64, 512, 256, bf16, ("sdm", "itc"))
        before = torch.backends.cuda.matmul.allow_tf32
        try:
            for tf32 in (False, True):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                out += similarity_launches(64, 512, 512, torch.float32, ("sdm", "itc"))
                out += similarity_launches(64, 512, 256, torch.float32, ("sdm", "tal", "itc"))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.kernels.compile_sm90",
                                description=__doc__.split("\n")[0])
    p.add_argument("--all", action="store_true", help="fp16, fp32 and D = 256 variants too")
    p.add_argument("--json", help="also write the variants here")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    variants = compile_all(specialise(launches(args.all)), args.jobs)
    for v in variants:
        print(f"{v.kernel:28s} {v.case:78s} {v.config:62s} regs {v.registers:3d} spills "
              f"{v.spill_stores}/{v.spill_loads} smem {v.shared:6d} cp.async {v.cp_async:3d} "
              f"wgmma {v.wgmma:2d}  {v.hints}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(v) for v in variants], f, indent=1)
    print(f"compiled {len(variants)} variants for {sm_arch_from_capability(TARGET.arch)}")
    return variants


if __name__ == "__main__":
    main()
    sys.exit(0)
