"""Helpers shared by the kernel tests."""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU (bf16 / TF32 numerics, large shapes)")


def assert_close_verbose(actual, expected, *, atol, rtol, name="", max_print=5):
    """allclose that names the worst mismatches (index, actual, expected) when it fails."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=False)
    if bad.any():
        err = (actual - expected).abs()
        worst = err.flatten().nan_to_num(float("inf")).argsort(descending=True)[:max_print]
        lines = [f"  {tuple(int(j) for j in torch.unravel_index(torch.tensor(i), err.shape))}: "
                 f"{actual.flatten()[i]:.6g} vs {expected.flatten()[i]:.6g}" for i in worst.tolist()]
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} mismatches (atol={atol}, "
                             f"rtol={rtol}), max abs err {err.max():.3g}\n" + "\n".join(lines))
