"""Compile every kernel, in the configurations the launchers use on an H100, to an sm_90 cubin
without a GPU (Triton's bundled ptxas). Catches what only the compiler rejects (types, constexpr,
layouts); the interpreter accepts more. Run in a process without TRITON_INTERPRET:
    python -m tests.kernels.compile_sm90
"""
import importlib
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sl = importlib.import_module("kernels.similarity_loss")
tk = importlib.import_module("kernels.topk_select")
I32 = "i32"


def compile_sm90(fn, signature, constexprs, options):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                   options=options)


def similarity_kernels():
    for dtype, ptr in (("bf16", "*bf16"), ("fp16", "*fp16"), ("fp32", "*fp32")):
        for momentum in (False, True):
            dot = dict(HAS_MOMENTUM=momentum, UPCAST=dtype == "fp32",
                       INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32")
            feats = dict(Q=ptr, K=ptr, QM=ptr, KM=ptr, QID="*i64", KID="*i64")
            strides = dict(stride_q=I32, stride_k=I32, stride_qm=I32, stride_km=I32)
            cfg = sl._tile_config(1024, on_cuda=True, grad=False)
            blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
            opts = {k: v for k, v in cfg.items() if not k.startswith("BLOCK")}
            compile_sm90(sl._similarity_stats_kernel,
                         dict(feats, STATS="*fp32", n=I32, N=I32, D=I32, keys_per_split=I32,
                              **strides, inv_tau="fp32"), dict(blocks, **dot), opts)
            cfg = sl._tile_config(1024, on_cuda=True, grad=True)
            blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
            opts = {k: v for k, v in cfg.items() if not k.startswith("BLOCK")}
            compile_sm90(sl._similarity_grad_kernel,
                         dict(feats, ROWV="*fp32", G=ptr, C=I32, N=I32, D=I32, **strides,
                              stride_rowv=I32, stride_g=I32, inv_tau="fp32", c_neg="fp32"),
                         dict(blocks, **dot), opts)
            print("similarity", dtype, "momentum" if momentum else "", "ok", flush=True)


def topk_kernels():
    L, k, D = 576, 172, 768
    blocks = dict(BLOCK_L=triton.next_power_of_2(L), K_POW2=triton.next_power_of_2(k),
                  BLOCK_D=tk._block_d(D, triton.next_power_of_2(k)))
    for sample in (False, True):
        compile_sm90(tk._topk_select_fwd_kernel,
                     dict(SCORES="*bf16", VALID="*i8", WEIGHTS="*fp32", NOISE="*fp32", FEAT="*i16",
                          IDX_OUT="*i64", VALID_OUT="*i8", FEAT_OUT="*i16", L=I32, k=I32, D=I32,
                          stride_s=I32, stride_v=I32, stride_w=I32, stride_e=I32, stride_fb=I32,
                          stride_fl=I32, stride_ob=I32, stride_ok=I32),
                     dict(blocks, SAMPLE=sample, HAS_FEATURES=True), dict(num_warps=4))
    compile_sm90(tk._topk_select_bwd_kernel,
                 dict(DOUT="*i16", IDX="*i64", VALID="*i8", DFEAT="*i16", k=I32, D=I32,
                      stride_ob=I32, stride_ok=I32, stride_fb=I32, stride_fl=I32),
                 dict(K_POW2=blocks["K_POW2"], BLOCK_D=blocks["BLOCK_D"]), dict(num_warps=4))
    print("topk ok", flush=True)


if __name__ == "__main__":
    similarity_kernels()
    topk_kernels()
    sys.exit(0)
