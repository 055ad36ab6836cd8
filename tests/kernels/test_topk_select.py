"""topk_select: indices, validity, gathered features and their gradient against a plain Python
oracle, both implementations; the sampled variant exactly (kernel vs reference) and in law."""
import itertools
import math

import pytest
import torch

from tbps.kernels.topk_select import topk_select
from tests.kernels.utils import DEVICE, gpu, requires_cuda

torch.manual_seed(0)


def oracle(scores_BL, valid_BL, k):
    """Sort the valid positions by (-score, index) in Python."""
    B, L = scores_BL.shape
    idx = torch.zeros(B, k, dtype=torch.int64)
    ok = torch.zeros(B, k, dtype=torch.bool)
    for b in range(B):
        cand = sorted((j for j in range(L) if valid_BL[b, j]), key=lambda j: (-float(scores_BL[b, j]), j))
        for slot, j in enumerate(cand[:k]):
            idx[b, slot], ok[b, slot] = j, True
    return idx, ok


def awkward_scores(B, L, dtype, seed):
    """Many ties (one decimal), +-0.0, +-inf, a row with nothing valid, a row with 3 valid."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, L, generator=g).mul(2).round().div(2)
    valid = torch.rand(B, L, generator=g) > 0.25
    scores[0, : min(L, 6)] = torch.tensor([0.0, -0.0, 0.0, -0.0, math.inf, -math.inf])[: min(L, 6)]
    valid[0, : min(L, 6)] = True
    if B > 1:
        valid[1] = False
    if B > 2:
        valid[2] = False
        valid[2, torch.randperm(L, generator=g)[:3]] = True
    return scores.to(dtype), valid


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("B, L, k, D", [(7, 37, 11, 20), (3, 192, 57, 24), (4, 77, 22, 8),
                                        (3, 16, 16, 4), (5, 9, 1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_selection_gather_and_gradient(impl, B, L, k, D, dtype):
    scores, valid = awkward_scores(B, L, dtype, seed=B * L + k)
    feats = torch.randn(B, L, D).to(dtype)
    want_idx, want_ok = oracle(scores, valid, k)
    f = feats.clone().to(DEVICE).requires_grad_()
    out = topk_select(scores.to(DEVICE), valid.to(DEVICE), k, f, impl=impl)
    assert torch.equal(out.indices_Bk.cpu(), want_idx)
    assert torch.equal(out.valid_Bk.cpu(), want_ok)
    want_feat = torch.where(want_ok[..., None], feats.gather(1, want_idx[..., None].expand(-1, -1, D)),
                            torch.zeros((), dtype=dtype))
    assert out.features_BkD.dtype == dtype and torch.equal(out.features_BkD.cpu(), want_feat)
    upstream = torch.randn(B, k, D).to(dtype)
    out.features_BkD.backward(upstream.to(DEVICE))
    want_grad = torch.zeros(B, L, D, dtype=dtype)
    for b, slot in itertools.product(range(B), range(k)):
        if want_ok[b, slot]:
            want_grad[b, want_idx[b, slot]] = upstream[b, slot]
    assert torch.equal(f.grad.cpu(), want_grad)


@pytest.mark.smoke      # also in CI's newest-packages job (.ci/smoke)
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_without_features_without_mask_and_empty(impl):
    scores = torch.randn(4, 10, device=DEVICE)
    out = topk_select(scores, None, 3, impl=impl)
    assert out.features_BkD is None and out.valid_Bk.all()
    assert torch.equal(out.indices_Bk.cpu(), scores.cpu().topk(3, dim=1).indices)
    empty = topk_select(scores, None, 0, torch.randn(4, 10, 2, device=DEVICE), impl=impl)
    assert empty.indices_Bk.shape == (4, 0) and empty.features_BkD.shape == (4, 0, 2)


def test_argument_errors():
    scores = torch.randn(2, 5)
    with pytest.raises(ValueError, match="k=6"):
        topk_select(scores, None, 6)
    with pytest.raises(ValueError, match="weights"):
        topk_select(scores, None, 2, sample=True)
    with pytest.raises(ValueError, match="features"):
        topk_select(scores, None, 2, torch.randn(2, 4, 3))


# --------------------------------------------------------------------------- sampling
@pytest.mark.smoke      # also in CI's newest-packages job (.ci/smoke)
def test_sampled_kernel_equals_reference_draw_for_draw():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(9, 37, generator=g)
    w[0, 5:] = 0.0  # five drawable items for k = 11
    w[1] = 0.0  # nothing drawable
    valid = torch.rand(9, 37, generator=g) > 0.2
    feats = torch.randn(9, 37, 6)
    outs = [topk_select(None, valid.to(DEVICE), 11, feats.to(DEVICE), weights_BL=w.to(DEVICE),
                        sample=True, generator=torch.Generator(DEVICE).manual_seed(7), impl=impl)
            for impl in ("triton", "reference")]
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)
    ok = outs[0].valid_Bk.cpu()
    assert ok[0].sum() == (valid[0] & (w[0] > 0)).sum() and not ok[1].any() and ok[2:].all()
    chosen = outs[0].indices_Bk.cpu()
    assert all((w[b, chosen[b, ok[b]]] > 0).all() and valid[b, chosen[b, ok[b]]].all() for b in range(9))


def exact_inclusion(weights, k):
    """P(item i is among k draws without replacement, each draw proportional to weight)."""
    items = [i for i, w in enumerate(weights) if w > 0]
    probs = [0.0] * len(weights)
    for seq in itertools.permutations(items, k):
        p, left = 1.0, sum(weights)
        for i in seq:
            p *= weights[i] / left
            left -= weights[i]
        for i in seq:
            probs[i] += p
    return torch.tensor(probs)


def test_sampling_follows_the_law_of_successive_draws():
    weights = [1.0, 2.0, 3.0, 4.0, 0.0, 6.0]
    valid = torch.tensor([True, True, True, True, True, False])  # item 5 is masked out
    rows = 20000
    out = topk_select(None, valid.expand(rows, -1), 2, weights_BL=torch.tensor(weights).expand(rows, -1),
                      sample=True, generator=torch.Generator().manual_seed(0), impl="reference")
    counts = torch.zeros(6).index_add_(0, out.indices_Bk.flatten(), torch.ones(2 * rows))
    freq = counts / rows
    want = exact_inclusion([w if v else 0.0 for w, v in zip(weights, valid.tolist())], 2)
    sigma = (want * (1 - want) / rows).sqrt().clamp(min=1e-9)
    assert ((freq - want).abs() <= 5 * sigma + 1e-12).all(), (freq, want)
    first = torch.bincount(out.indices_Bk[:, 0], minlength=6) / rows  # the first draw: w / sum(w)
    assert (first[:4] - torch.tensor(weights[:4]) / 10).abs().max() < 0.015


# --------------------------------------------------------------------------- GPU only
@gpu
@requires_cuda
@pytest.mark.parametrize("sample", [False, True])
def test_large_shapes_match_reference(sample):
    B, L, D = 1024, 576, 768
    k = int(0.3 * L)
    scores = torch.randn(B, L, device="cuda", dtype=torch.bfloat16)
    valid = torch.rand(B, L, device="cuda") > 0.1
    feats = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = torch.rand(B, L, device="cuda") if sample else None
    outs = []
    for impl in ("triton", "reference"):
        out = topk_select(scores, valid, k, feats, weights_BL=weights, sample=sample,
                          generator=torch.Generator("cuda").manual_seed(3), impl=impl)
        out.features_BkD.float().sum().backward()
        outs.append((*out, feats.grad.clone()))
        feats.grad = None
    for a, b in zip(*outs):
        assert torch.equal(a, b)
