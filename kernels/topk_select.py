"""Top-k token selection with the gather of the selected token features, fused.

Letters: B rows (images or captions), L tokens per row, k selected, D feature width.
TSE (RDE) keeps the k best-scored tokens; AWM and AGM draw k tokens without replacement with
probability proportional to a weight (`sample=True`).

Ordering. Each score becomes an int64 key that sorts like the score, with ties to the lower
index: the fp32 bits are flipped into a signed integer with the float order (-0.0 is first made
+0.0), shifted into the high 32 bits, and (BLOCK_L - 1 - index) fills the low 32 bits. Invalid
positions get the smallest high word, below every float including -inf, so they come last and
mark the unused slots. The kernel takes `tl.topk` of one row of keys (the row, padded to a power
of two, lives in registers; L <= 576 in practice) and unpacks indices and validity; the eager
reference runs `torch.topk` on the same keys, so both are deterministic and agree exactly. Rows
with fewer than k valid positions return valid False, index 0 and zero features in the extra slots.

Sampling (`sample=True`). Drawing k items one after another with probability proportional to w is
the same law as keeping the k largest w_j / E_j with E_j ~ Exp(1) independent (exponential race:
the first arrival E_j / w_j is item j with probability w_j / sum w, and the race is memoryless), the
division form of Gumbel-top-k. E is drawn in torch from `generator` and passed to the kernel;
IEEE division is correctly rounded in both, so kernel and reference return the same draw. Weights
must be >= 0; a zero weight is never drawn (it counts as invalid).

Gather. The same program copies the selected rows features[b, idx, :] to the output, as raw bits
(the features are viewed as an integer dtype of their width, so every dtype, bf16 included, is an
exact copy); it reads only the k slots it stores, and only the valid ones. The backward writes
every row of d_features once: a program owns a block of positions of one row, finds each
position's slot among the row's selected indices (a BLOCK x k compare in registers; indices in a
row are distinct) and writes d_out[b, slot] there, zeros elsewhere, so there is no zero-fill
pass and no scatter.

Bytes (the op is memory bound): forward reads B L (score 4 + valid 1 [+ weight 4 + noise 4]) bytes,
writes B k (8 + 1) bytes and moves 2 B k D s bytes of features (s = element size); the backward
reads B k (D s + 9) and writes B L D s. At B = 1024, L = 576, k = 172, D = 768 in bf16 the forward
is 0.55 GB (0.16 ms at 3.35 TB/s) and the backward 1.18 GB (0.35 ms).
The op takes activations only, no parameters, so it needs nothing special under ZeRO-3.
"""
from typing import NamedTuple, Optional

import torch

from tbps.kernels import _dispatch
from tbps.kernels._dispatch import next_pow2, resolve_impl, tl, triton

_INT32_MIN = -(2**31)
_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class TopK(NamedTuple):
    indices_Bk: torch.Tensor  # int64, ordered by score (ties: lower index first); 0 in empty slots
    valid_Bk: torch.Tensor  # bool, False in the slots beyond a row's valid count
    features_BkD: Optional[torch.Tensor]  # gathered features, zeros in empty slots; None if not given


# --------------------------------------------------------------------------- Triton kernels
@triton.jit
def _topk_select_fwd_kernel(
    # pointers
    SCORES, VALID, WEIGHTS, NOISE, FEAT, IDX_OUT, VALID_OUT, FEAT_OUT,
    # sizes
    L, k, D,
    # row strides (last dimensions contiguous)
    stride_s, stride_v, stride_w, stride_e, stride_fb, stride_fl, stride_ob, stride_ok,
    # meta-parameters
    BLOCK_L: tl.constexpr, K_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
    SAMPLE: tl.constexpr, HAS_FEATURES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_L)
    inb = offs < L
    valid = tl.load(VALID + row * stride_v + offs, mask=inb, other=0) != 0
    if SAMPLE:
        w = tl.load(WEIGHTS + row * stride_w + offs, mask=inb, other=0.0).to(tl.float32)
        e = tl.load(NOISE + row * stride_e + offs, mask=inb, other=1.0).to(tl.float32)
        valid = valid & (w > 0)
        score = tl.div_rn(w, e)  # correctly rounded, as torch: kernel and reference agree
    else:
        score = tl.load(SCORES + row * stride_s + offs, mask=inb, other=0.0).to(tl.float32)
    score = tl.where(score == 0, 0.0, score)  # -0.0 ties with +0.0, as in torch
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed ints in float order
    ordered = tl.where(valid, ordered, -2147483648)  # below every float: invalid goes last
    packed = (ordered.to(tl.int64) << 32) | (BLOCK_L - 1 - offs).to(tl.int64)
    top = tl.topk(packed, K_POW2)

    slot = tl.arange(0, K_POW2)
    slot_in = slot < k
    slot_valid = (top >> 32) > -2147483648
    # the low word is the reversed index (< 2^31): truncating to int32 keeps it exactly
    idx = tl.where(slot_valid, (BLOCK_L - 1) - top.to(tl.int32), 0).to(tl.int64)
    tl.store(IDX_OUT + row * k + slot, idx, mask=slot_in)
    tl.store(VALID_OUT + row * k + slot, slot_valid.to(tl.int8), mask=slot_in)
    if HAS_FEATURES:
        src = FEAT + row * stride_fb + idx[:, None] * stride_fl
        dst = FEAT_OUT + row * stride_ob + slot[:, None] * stride_ok
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)[None, :]
            x = tl.load(src + d, mask=(slot_in & slot_valid)[:, None] & (d < D), other=0)
            tl.store(dst + d, x, mask=slot_in[:, None] & (d < D))


@triton.jit
def _topk_select_bwd_kernel(
    DOUT, IDX, VALID, DFEAT,
    L, k, D,
    stride_ob, stride_ok, stride_fb, stride_fl,
    BLOCK_P: tl.constexpr, K_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d_features[b, l] = d_out[b, slot of l] for the BLOCK_P positions l of this program, zeros
    where l was not selected: every element of d_features written once."""
    row = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    slot = tl.arange(0, K_POW2)
    keep = (slot < k) & (tl.load(VALID + row * k + slot, mask=slot < k, other=0) != 0)
    idx = tl.load(IDX + row * k + slot, mask=keep, other=-1)
    hit = pos[:, None] == idx[None, :]  # (BLOCK_P, K_POW2), at most one hit per position
    src_slot = tl.max(tl.where(hit, slot[None, :], -1), 1)
    chosen = src_slot >= 0
    src = DOUT + row * stride_ob + tl.maximum(src_slot, 0)[:, None].to(tl.int64) * stride_ok
    dst = DFEAT + row * stride_fb + pos[:, None].to(tl.int64) * stride_fl
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)[None, :]
        x = tl.load(src + d, mask=chosen[:, None] & (d < D), other=0)
        tl.store(dst + d, x, mask=(pos < L)[:, None] & (d < D))


# --------------------------------------------------------------------------- launchers
def _as_bits(x: torch.Tensor) -> torch.Tensor:
    """The same memory as an integer tensor: the kernels copy features bit for bit."""
    return x.view(_BITS_DTYPE[x.element_size()])


def _block_d(D: int, k_pow2: int) -> int:
    return max(16, min(next_pow2(D), 8192 // k_pow2, 256))


def topk_select_forward(scores_BL, valid_BL, k, features_BLD, weights_BL, noise_BL):
    """Launch the selection (+ gather) kernel; return (indices_Bk, valid_Bk, features_BkD)."""
    B, L = valid_BL.shape
    dev = valid_BL.device
    idx = torch.empty(B, k, dtype=torch.int64, device=dev)
    ok = torch.empty(B, k, dtype=torch.int8, device=dev)
    has_feat = features_BLD is not None
    D = features_BLD.shape[2] if has_feat else 1
    out = torch.empty(B, k, D, dtype=features_BLD.dtype, device=dev) if has_feat else None
    sample = weights_BL is not None
    scores = weights_BL if sample else scores_BL
    noise = noise_BL if sample else scores
    feat_bits = _as_bits(features_BLD) if has_feat else idx.view(B, k, 1)
    out_bits = _as_bits(out) if has_feat else idx.view(B, k, 1)
    k_pow2 = max(2, next_pow2(k))  # tl.topk needs a power of two >= 2
    _dispatch.launch(
        _topk_select_fwd_kernel, lambda c: (B,),
        (scores, valid_BL.view(torch.int8), scores, noise, feat_bits, idx, ok, out_bits, L, k, D,
         scores.stride(0), valid_BL.stride(0), scores.stride(0), noise.stride(0),
         feat_bits.stride(0), feat_bits.stride(1), out_bits.stride(0), out_bits.stride(1)),
        dict(BLOCK_L=max(next_pow2(L), k_pow2), K_POW2=k_pow2, BLOCK_D=_block_d(D, k_pow2),
             SAMPLE=sample, HAS_FEATURES=has_feat), [{}])
    return idx, ok.bool(), out


def topk_select_backward(dout_BkD, idx_Bk, valid_Bk, L):
    """d_features (B, L, D): the gradient of the gathered rows, zeros elsewhere, in one pass."""
    B, k, D = dout_BkD.shape
    dfeat = torch.empty(B, L, D, dtype=dout_BkD.dtype, device=dout_BkD.device)
    dout = _as_bits(dout_BkD.contiguous())
    dbits = _as_bits(dfeat)
    k_pow2 = max(2, next_pow2(k))
    block_p = 32 if _dispatch.compiled(dfeat) else 64
    _dispatch.launch(
        _topk_select_bwd_kernel, lambda c: (B, triton.cdiv(L, block_p)),
        (dout, idx_Bk, valid_Bk.view(torch.int8), dbits, L, k, D,
         dout.stride(0), dout.stride(1), dbits.stride(0), dbits.stride(1)),
        dict(BLOCK_P=block_p, K_POW2=k_pow2, BLOCK_D=_block_d(D, block_p)), [{}])
    return dfeat


class TopKSelectFunction(torch.autograd.Function):
    """Selection is piecewise constant: only the gathered features carry a gradient."""

    @staticmethod
    def forward(ctx, features_BLD, scores_BL, valid_BL, k, weights_BL, noise_BL):
        idx, ok, out = topk_select_forward(scores_BL, valid_BL, k, features_BLD, weights_BL, noise_BL)
        ctx.save_for_backward(idx, ok)
        ctx.L = valid_BL.shape[1]
        ctx.mark_non_differentiable(idx, ok)
        return idx, ok, out

    @staticmethod
    def backward(ctx, _didx, _dok, dout_BkD):
        idx, ok = ctx.saved_tensors
        return topk_select_backward(dout_BkD, idx, ok, ctx.L), None, None, None, None, None


# --------------------------------------------------------------------------- eager reference
def _packed_keys(score_BL: torch.Tensor, valid_BL: torch.Tensor) -> torch.Tensor:
    """int64 keys that order like the scores, ties to the lower index, invalid last."""
    B, L = score_BL.shape
    score = score_BL.float()
    score = torch.where(score == 0, 0.0, score)
    bits = score.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    ordered = torch.where(valid_BL, ordered, _INT32_MIN)
    low = torch.arange(L - 1, -1, -1, device=score.device)
    return (ordered << 32) | low


def topk_select_reference(scores_BL, valid_BL, k, features_BLD=None, *, weights_BL=None,
                          noise_BL=None) -> TopK:
    """Eager PyTorch (torch.topk + gather) on deterministic int64 keys. With weights_BL and
    noise_BL (Exp(1) noise) it is the sampled variant. Same result as the kernel."""
    B, L = valid_BL.shape
    valid = valid_BL.bool()
    if weights_BL is not None:
        valid = valid & (weights_BL > 0)
        scores_BL = weights_BL.float() / noise_BL.float()
    keys = _packed_keys(scores_BL, valid)
    top = keys.topk(k, dim=1).values
    ok = (top >> 32) > _INT32_MIN
    idx = torch.where(ok, (L - 1) - (top & 0xFFFFFFFF), 0)
    feats = None
    if features_BLD is not None:
        gathered = features_BLD.gather(1, idx[:, :, None].expand(-1, -1, features_BLD.shape[2]))
        feats = torch.where(ok[:, :, None], gathered, torch.zeros((), dtype=gathered.dtype,
                                                                   device=gathered.device))
    return TopK(idx, ok, feats)


# --------------------------------------------------------------------------- public API
@_dispatch.interceptable("selection")
def topk_select(scores_BL, valid_BL, k, features_BLD=None, *, weights_BL=None, sample=False,
                generator=None, impl="auto") -> TopK:
    """Top-k of scores_BL over the positions where valid_BL is True (None: all valid), ordered by
    score with ties to the lower index, and the gathered features (gradient flows to features_BLD).
    sample=True instead draws k valid positions without replacement with probability proportional
    to weights_BL (>= 0), using Exp(1) noise from `generator`; the result is ordered by draw.
    Slots beyond a row's valid count: valid False, index 0, zero features.
    impl: "auto" (Triton on CUDA, else the reference) | "triton" | "reference".
    """
    ref = scores_BL if not sample else weights_BL
    if ref is None:
        raise ValueError("sample=True needs weights_BL" if sample else "scores_BL is required")
    if ref.ndim != 2:
        raise ValueError(f"scores/weights must be (B, L), got {tuple(ref.shape)}")
    B, L = ref.shape
    if not 0 <= k <= L:
        raise ValueError(f"k={k} must be in [0, L={L}]")
    if valid_BL is None:
        valid_BL = torch.ones(B, L, dtype=torch.bool, device=ref.device)
    if valid_BL.shape != (B, L):
        raise ValueError(f"valid_BL {tuple(valid_BL.shape)} must match the scores ({B}, {L})")
    if features_BLD is not None and (features_BLD.ndim != 3 or features_BLD.shape[:2] != (B, L)):
        raise ValueError(f"features_BLD {tuple(features_BLD.shape)} must be ({B}, {L}, D)")
    weights = noise = None
    if sample:
        weights = weights_BL.detach()
        noise = torch.empty(B, L, dtype=torch.float32, device=ref.device).exponential_(
            generator=generator)
    scores = None if sample else scores_BL.detach()
    tensors = [t for t in (ref, valid_BL, features_BLD) if t is not None]
    if resolve_impl("topk_select", impl, *tensors) == "reference" or k == 0 or B == 0:
        return topk_select_reference(scores, valid_BL.bool(), k, features_BLD, weights_BL=weights,
                                     noise_BL=noise)
    scores = scores.contiguous() if scores is not None else None
    weights = weights.contiguous() if weights is not None else None
    valid = valid_BL.to(torch.bool).contiguous()
    if features_BLD is None:
        idx, ok, _ = topk_select_forward(scores, valid, k, None, weights, noise)
        return TopK(idx, ok, None)
    feats = features_BLD if features_BLD.stride(-1) == 1 else features_BLD.contiguous()
    idx, ok, out = TopKSelectFunction.apply(feats, scores, valid, k, weights, noise)
    return TopK(idx, ok, out)
