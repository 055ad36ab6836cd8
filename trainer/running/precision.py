"""`train.precision=auto`: bf16 where the device computes it natively, fp32 elsewhere.

    choice = resolve("auto")          # Choice(precision="bf16", reason="...", warning=None)

A bf16 matmul is only worth it where the hardware has bf16 arithmetic:
- a CUDA GPU that supports bf16 natively (compute capability 8.0 or newer: A100, H100, ...);
- a CPU with bf16 instructions (x86: AVX512_BF16 or AMX-BF16; Arm: the BF16 extension) AND a
  torch whose oneDNN takes bf16 matmuls (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`).

The oneDNN call alone is not the test: it only checks AVX-512 (BW, VL, DQ), which CPUs without
bf16 arithmetic (Skylake-SP, Cascade Lake) also have; oneDNN then emulates bf16 through fp32 and
autocast gains nothing. Without it torch falls back to a scalar bf16 gemm, which is 20-30x slower
than fp32 (2048x128 @ 128x512, one thread: 429 ms against 15 ms on an AVX2-only EPYC; on this
project's Xeon with AMX, 0.65 ms bf16 against 4.3 ms fp32, and 287 ms with oneDNN switched off).

The choice is made once at start (`Run` logs it with its reason). An explicit `bf16` on a CPU
without native bf16 is kept but warned about, since a run that takes minutes can take hours.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    precision: str            # fp32 | bf16 | fp16
    reason: str
    warning: str | None = None


def cpu_bf16() -> tuple[bool, str]:
    """(native bf16 on this CPU, what was found)."""
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    caps = _cpu_capabilities()
    arch = caps.get("architecture", "")
    if arch in ("x86_64", "x86", "i386", "AMD64") or any(k.startswith("avx") for k in caps):
        isa = [k for k in ("amx_bf16", "avx512_bf16") if caps.get(k)]
        found = ", ".join(isa) or "no AVX512_BF16 / AMX-BF16"
    else:                                   # Arm: oneDNN's check is the BF16 extension
        isa = ["bf16"] if onednn else []
        found = "the Arm BF16 extension" if onednn else "no Arm BF16 extension"
    native = onednn and bool(isa)
    name = caps.get("cpu_name") or "this CPU"
    what = f"{name}: {found}; oneDNN bf16 matmul {'available' if onednn else 'unavailable'}"
    return native, what


def gpu_bf16() -> tuple[bool, str]:
    """(native bf16 on the current CUDA device, what was found)."""
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:                       # older torch: no emulation argument
        native = torch.cuda.is_bf16_supported() and major >= 8
    return native, f"{name} (compute capability {major}.{minor})"


def resolve(requested: str, device_type: str | None = None) -> Choice:
    """The precision a run uses for `train.precision=requested` on this machine's device."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    native, what = gpu_bf16() if device_type == "cuda" else cpu_bf16()
    if requested == "auto":
        if native:
            return Choice("bf16", f"auto: bf16, native on {what}")
        return Choice("fp32", f"auto: fp32, no native bf16 on {what}")
    warning = None
    if requested == "bf16" and not native:
        warning = (f"train.precision=bf16 on {what}: bf16 is emulated there and can be 20-30x "
                   "slower than fp32; train.precision=auto picks fp32 on such a device")
    return Choice(requested, f"train.precision={requested} as set", warning)


def _cpu_capabilities() -> dict:
    try:
        return dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):   # torch without the query
        return {}
