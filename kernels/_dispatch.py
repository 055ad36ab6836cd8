"""Backend choice shared by the ops: `impl="auto" | "triton" | "reference"`.

`auto` takes the Triton kernel when every tensor is on CUDA and triton imports, else the eager
reference; the choice is logged once per (op, choice) on the "kernels" logger. Inside
`with forced(impl):` every call that asks for `auto` (the trainer's) resolves as `impl`: the switch
an end-to-end comparison of the kernels against the references uses. `triton` on CPU
tensors runs the kernel in the Triton interpreter, which must be switched on (TRITON_INTERPRET=1)
before `kernels` is imported, because `@triton.jit` reads the variable when it decorates.

Every kernel launch goes through `launch`, and every decision that depends on the device through
`compiled`, `sm_count` and `max_shared`: tests/kernels/compile_sm90.py replaces these to replay,
on a machine without a GPU, exactly the launches a GPU run makes and compile them for sm_90.

Nothing here touches CUDA at import time.
"""
import contextlib
import functools
import logging
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # non-Linux machines: keep the module importable, the reference still works
    HAS_TRITON = False

    class _Stub:
        """Just enough of `triton` / `triton.language` for the kernel definitions to parse."""

        constexpr = staticmethod(lambda value=None: value)

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()

IMPLS = ("auto", "triton", "reference")
log = logging.getLogger("kernels")
_logged: set[tuple[str, str]] = set()
_forced: str | None = None          # set by `forced`: what "auto" means for now


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(op: str, impl: str, *tensors: torch.Tensor) -> str:
    """Return "triton" or "reference" for this call; log the automatic choice once."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r}; choose one of {IMPLS}")
    if impl == "auto" and _forced is not None:
        impl = _forced
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        choice = "triton" if (on_cuda and HAS_TRITON) else "reference"
        reason = ("CUDA tensors and triton available" if choice == "triton"
                  else "triton not importable" if on_cuda else "tensors not on CUDA")
        if (op, choice) not in _logged:
            _logged.add((op, choice))
            log.info("%s: using the %s implementation (%s)", op, choice, reason)
        return choice
    if impl == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{op}: impl='triton' but triton is not importable; use impl='reference'")
        if not on_cuda and not interpreting():
            raise ValueError(f"{op}: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             "`kernels` is imported (the Triton interpreter); or use impl='reference'")
    return impl


@contextlib.contextmanager
def forced(impl: str):
    """Within: calls with impl="auto" resolve as `impl` ("auto": no forcing); calls naming an
    impl keep it. Process-wide (not per thread); nests, and restores the previous setting."""
    global _forced
    if impl not in IMPLS:
        raise ValueError(f"forced: impl={impl!r}; choose one of {IMPLS}")
    before, _forced = _forced, (None if impl == "auto" else impl)
    try:
        yield
    finally:
        _forced = before


_interceptors: list = []


def interceptable(region: str):
    """Decorator of the kernels' public ops: within `intercepted(wrap)`, a call runs
    `wrap(op, region)(*args, **kwargs)` instead of the op (benchmarks time an op's share of a
    training step this way); otherwise the op itself, at the cost of one list check."""
    def decorate(op):
        @functools.wraps(op)
        def call(*args, **kwargs):
            if not _interceptors:
                return op(*args, **kwargs)
            return _interceptors[-1](op, region)(*args, **kwargs)
        return call
    return decorate


@contextlib.contextmanager
def intercepted(wrap):
    """Within: every call of an `interceptable` op goes through wrap(op, region)."""
    _interceptors.append(wrap)
    try:
        yield
    finally:
        _interceptors.remove(wrap)


def compiled(x: torch.Tensor) -> bool:
    """True when the kernels run compiled on a GPU, False in the CPU interpreter."""
    return x.is_cuda


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device.index or 0).multi_processor_count


def max_shared(device: torch.device) -> int:
    """Bytes of shared memory one program may use (227 KiB on an H100, 163 KiB on an A100)."""
    props = torch.cuda.get_device_properties(device.index or 0)
    return getattr(props, "shared_memory_per_block_optin", 232448)


_chosen: dict = {}


def launch(kernel, grid, args, consts, configs, key=None):
    """kernel[grid(config)](*args, **consts, **config) with the fastest of `configs` for `key`:
    with several candidates (on a GPU) each is timed once per key and the choice logged; the
    interpreter gets one. Launches write only their outputs, so timing them is harmless."""
    cfg = configs[0]
    if len(configs) > 1:
        if key not in _chosen:
            import triton.testing  # only with Triton, only when benchmarking

            times = [triton.testing.do_bench(lambda c=c: kernel[grid(c)](*args, **consts, **c),
                                             warmup=2, rep=8) for c in configs]
            best = min(range(len(configs)), key=times.__getitem__)
            _chosen[key] = configs[best]
            log.info("%s %s: tiles %s (%.3f ms; candidates %s ms)", kernel.fn.__name__, key,
                     configs[best], times[best], ", ".join(f"{t:.3f}" for t in times))
        cfg = _chosen[key]
    kernel[grid(cfg)](*args, **consts, **cfg)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()
