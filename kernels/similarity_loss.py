"""Similarity-matrix losses (SDM, BSDM, TAL, ITC, WAF) fused with the similarity matrix.

Letters: n local queries (rows), N keys gathered from all ranks (columns), D embedding width.
One call is one retrieval direction; `bidirectional_similarity_loss` makes the two calls.

Maths (METHODS.md). S_ij = <q_i, k_j> of L2-normalised features, z_ij = S_ij / tau,
l_ij = [y_i == y_j] over valid keys, n_i = sum_j l_ij, p_ij = softmax_j(z_ij), q_ij = l_ij / n_i.
  sdm   KL(p_i || q_i)            = sum_j p_ij (log p_ij - log(q_ij + eps))
  bsdm  KL(p_i || q_i) + lam KL(q_i || p_i),  KL(q||p) = sum_j q_ij (log(q_ij + eps) - log p_ij)
  tal   [margin - sum_j a_ij S_ij + tau log sum_{j neg} exp(z_ij)]_+,  a_i = softmax over positives
        of z_i, detached
  itc   -sum_j t_ij log p_ij,  t_ij = alpha softmax_j(Sm_ij / tau) + (1 - alpha) q_ij, Sm from the
        momentum features (no gradient); alpha = 0 is multi-positive identity-target cross entropy
  waf   -(1 - P_i)^gamma log P_i,  P_i = sum_j l_ij p_ij  (the caller multiplies by pair weights)

Conventions (kernel and reference implement the same ones; tests check them):
  * an id < 0 marks padding: such a key is neither positive nor negative for anyone (pad an
    uneven all_gather with id -1); such a query gets loss 0 and zero gradient;
  * a row without positives: sdm, bsdm, itc and waf give loss 0 and zero gradient (q_i is
    undefined); tal drops the positive term, so its loss is [margin + tau lse_neg]_+;
  * a row without negatives: tal drops the negative term ([margin - sum_j a_ij S_ij]_+); waf gives
    0 (P_i = 1); sdm, bsdm and itc need no special case.

Forward (one fused kernel). Each program owns BLOCK_M rows and a range of keys, computes S tiles
with tl.dot and keeps only per-row online statistics, FlashAttention style, separately over the
positive and the negative keys (each with its own running max, so a positive set that is far
below the negatives does not underflow): (m, l = sum e^(z-m), a = sum e^(z-m) z) for positives and
for negatives, sum_pos z, n_i, and (m, l, a) of the momentum logits for itc. Key ranges split over
a second grid axis when n is small (partial statistics merged in torch, O(n)). Every loss above is
a closed form of these 11 numbers per row; the n x N matrix is never written.

Backward. dL_i/dz_ij is, for every kind, a per-row combination of five per-element terms:
  g_ij = e_ij * (pos ? w3 + P_i (w1 + w2 (z_ij - c_pos)) : w4 + Pn_i (w1 + w2 (z_ij - c_neg)))
         + w5_i l_ij + w6_i softmax_j(Sm_ij / tau)
with e_ij = exp(z_ij - lse_pos_i) on positives and exp(z_ij - lse_neg_i) on negatives (one exp per
element), P_i / Pn_i the softmax mass on positives / negatives (p_ij = e_ij P_i or e_ij Pn_i),
c = log(q + eps), and the row weights w computed in torch from the forward statistics. A kernel
recomputes S tiles and writes g for one chunk of rows (C x N, C chosen so the buffer is at most
_BWD_CHUNK_BYTES), then two matmuls give dQ = g K and dK += g^T Q. The chunk is O(N) memory for a
fixed C, so extra memory is O(n + N) (eager holds several n x N fp32 matrices). Why not a fully
fused dQ/dK kernel: its BLOCK_M x D fp32 accumulator does not fit in registers for D = 1024, and
splitting D recomputes S D / BLOCK_D times; writing g costs 2 bytes per element in bf16 while the
matmuls keep the tensor cores busy.

FLOPs and bytes. Useful work: forward 2 n N D (4 n N D with momentum), forward+backward 6 n N D
(8 n N D with momentum); the benchmark's TFLOP/s count only these. Executed work adds the S tiles
recomputed by the backward kernel (2 n N D more, 4 n N D with momentum), so the ceiling is 75 % of
the tensor-core peak. At n = N = 65536, D = 1024: 26.4 TFLOP useful, about 27 ms at 989 dense bf16
TFLOP/s. Bytes: the forward reads Q once and K once per row block (BLOCK_M flops per byte of K,
below the H100's ~300, so it relies on the row blocks in flight sharing K tiles in L2: they walk K
in the same order) and writes 11 n floats; the backward writes g once and reads it twice
(6 n N bytes in bf16: 26 GB, about 8 ms at 3.35 TB/s, at the size above). Eager reads and
writes n x N fp32 matrices about ten times per direction, and at n = N = 65536 one such matrix is
16 GiB.

Numerics: accumulation, exponentials and row statistics in fp32; bf16/fp16 operands go to tl.dot
as they are on a GPU (tensor cores, fp32 accumulate); in the interpreter, which mishandles bf16
arithmetic, bf16 is cast to fp32 right after the load (fp16 is not, so its native path is
tested). fp32 inputs use TF32 exactly when
torch.backends.cuda.matmul.allow_tf32 is set, as eager matmul does. The op takes activations only,
no parameters, so it needs nothing special under ZeRO-3.
"""
import functools
import math

import torch
import torch.nn.functional as F

from kernels._dispatch import next_pow2, resolve_impl, tl, triton

KINDS = ("sdm", "bsdm", "tal", "itc", "waf")
# forward statistics per row (the kernel's stores): m_pos l_pos a_pos s_pos n_pos m_neg l_neg a_neg
# m_mom l_mom a_mom; backward row vector: lse_pos lse_neg P Pn c_pos w1 w2 w3 w4 w5 w6 lse_mom
_NSTAT = 11
_BWD_CHUNK_BYTES = 256 << 20  # the g buffer for one row chunk; tests shrink it to force chunks


# --------------------------------------------------------------------------- Triton kernels
@triton.jit
def _scores_tile(A, B, rows, cols, row_in, col_in, D, stride_a, stride_b,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """fp32 tile A[rows] @ B[cols]^T, looping over D in BLOCK_K slices."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        d = d0 + tl.arange(0, BLOCK_K)
        a = tl.load(A + rows[:, None].to(tl.int64) * stride_a + d[None, :],
                    mask=row_in[:, None] & (d[None, :] < D), other=0.0)
        b = tl.load(B + cols[None, :].to(tl.int64) * stride_b + d[:, None],
                    mask=col_in[None, :] & (d[:, None] < D), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _safe_max(m_old, x):
    """Running max of the masked tile x (-inf = not a member), and the same with -inf -> 0 for use
    as a shift (a set with nothing seen yet must not produce inf - inf)."""
    m_new = tl.maximum(m_old, tl.max(x, 1))
    return m_new, tl.where(m_new == float("-inf"), 0.0, m_new)


@triton.jit
def _online_update(m, l, a, x, w, member):
    """Fold a tile into a running softmax of x over `member`: (max, sum e^(x-max), sum e^(x-max) w)."""
    x = tl.where(member, x, float("-inf"))
    m_new, shift = _safe_max(m, x)
    e = tl.exp(x - shift[:, None])
    scale = tl.exp(m - shift)
    return m_new, l * scale + tl.sum(e, 1), a * scale + tl.sum(e * w, 1)


@triton.jit
def _online_update_pos_neg(m_pos, l_pos, a_pos, m_neg, l_neg, a_neg, z, pos, neg):
    """_online_update for the positive and the negative set at once, with one exp per element
    (exp throughput, not the dot, limits this loop at D = 256 on an H100)."""
    m_pos_new, shift_pos = _safe_max(m_pos, tl.where(pos, z, float("-inf")))
    m_neg_new, shift_neg = _safe_max(m_neg, tl.where(neg, z, float("-inf")))
    shift = tl.where(pos, shift_pos[:, None], shift_neg[:, None])
    e = tl.exp(tl.where(pos | neg, z - shift, float("-inf")))
    e_pos = tl.where(pos, e, 0.0)
    e_neg = e - e_pos
    scale_pos = tl.exp(m_pos - shift_pos)
    scale_neg = tl.exp(m_neg - shift_neg)
    return (m_pos_new, l_pos * scale_pos + tl.sum(e_pos, 1), a_pos * scale_pos + tl.sum(e_pos * z, 1),
            m_neg_new, l_neg * scale_neg + tl.sum(e_neg, 1), a_neg * scale_neg + tl.sum(e_neg * z, 1))


@triton.jit
def _similarity_stats_kernel(
    # pointers
    Q, K, QM, KM, QID, KID, STATS,
    # sizes
    n, N, D, keys_per_split,
    # row strides (the last dimension is contiguous)
    stride_q, stride_k, stride_qm, stride_km,
    inv_tau,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n
    qid = tl.load(QID + rows, mask=row_in, other=-1)
    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, N)

    ninf = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK_M,), tl.float32)
    m_pos, l_pos, a_pos, s_pos, n_pos = ninf, zero, zero, zero, zero
    m_neg, l_neg, a_neg = ninf, zero, zero
    m_mom, l_mom, a_mom = ninf, zero, zero
    for j0 in range(start, end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_in = cols < end
        kid = tl.load(KID + cols, mask=col_in, other=-1)
        z = _scores_tile(Q, K, rows, cols, row_in, col_in, D, stride_q, stride_k,
                         BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION) * inv_tau
        valid = (kid >= 0)[None, :]
        pos = valid & (qid[:, None] == kid[None, :])
        neg = valid & (qid[:, None] != kid[None, :])
        m_pos, l_pos, a_pos, m_neg, l_neg, a_neg = _online_update_pos_neg(
            m_pos, l_pos, a_pos, m_neg, l_neg, a_neg, z, pos, neg)
        s_pos += tl.sum(tl.where(pos, z, 0.0), 1)
        n_pos += tl.sum(pos.to(tl.float32), 1)
        if HAS_MOMENTUM:
            zm = _scores_tile(QM, KM, rows, cols, row_in, col_in, D, stride_qm, stride_km,
                              BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION) * inv_tau
            # softmax of the momentum logits over valid keys, weighting the online logits z
            m_mom, l_mom, a_mom = _online_update(m_mom, l_mom, a_mom, zm, z, valid)

    out = STATS + pid_s * 11 * n + rows  # (splits, 11, n): one contiguous row per statistic
    tl.store(out + 0 * n, m_pos, mask=row_in)
    tl.store(out + 1 * n, l_pos, mask=row_in)
    tl.store(out + 2 * n, a_pos, mask=row_in)
    tl.store(out + 3 * n, s_pos, mask=row_in)
    tl.store(out + 4 * n, n_pos, mask=row_in)
    tl.store(out + 5 * n, m_neg, mask=row_in)
    tl.store(out + 6 * n, l_neg, mask=row_in)
    tl.store(out + 7 * n, a_neg, mask=row_in)
    tl.store(out + 8 * n, m_mom, mask=row_in)
    tl.store(out + 9 * n, l_mom, mask=row_in)
    tl.store(out + 10 * n, a_mom, mask=row_in)


@triton.jit
def _similarity_grad_kernel(
    # pointers: G is the (C x N) output for this chunk of rows, ROWV the (12 x n) row vector
    Q, K, QM, KM, QID, KID, ROWV, G,
    # sizes
    C, N, D,
    # strides
    stride_q, stride_k, stride_qm, stride_km, stride_rowv, stride_g,
    inv_tau, c_neg,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < C
    col_in = cols < N
    qid = tl.load(QID + rows, mask=row_in, other=-1)
    kid = tl.load(KID + cols, mask=col_in, other=-1)
    rv = ROWV + rows
    lse_pos = tl.load(rv + 0 * stride_rowv, mask=row_in, other=0.0)[:, None]
    lse_neg = tl.load(rv + 1 * stride_rowv, mask=row_in, other=0.0)[:, None]
    p_pos = tl.load(rv + 2 * stride_rowv, mask=row_in, other=0.0)[:, None]
    p_neg = tl.load(rv + 3 * stride_rowv, mask=row_in, other=0.0)[:, None]
    c_pos = tl.load(rv + 4 * stride_rowv, mask=row_in, other=0.0)[:, None]
    w1 = tl.load(rv + 5 * stride_rowv, mask=row_in, other=0.0)[:, None]
    w2 = tl.load(rv + 6 * stride_rowv, mask=row_in, other=0.0)[:, None]
    w3 = tl.load(rv + 7 * stride_rowv, mask=row_in, other=0.0)[:, None]
    w4 = tl.load(rv + 8 * stride_rowv, mask=row_in, other=0.0)[:, None]
    w5 = tl.load(rv + 9 * stride_rowv, mask=row_in, other=0.0)[:, None]

    z = _scores_tile(Q, K, rows, cols, row_in, col_in, D, stride_q, stride_k,
                     BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION) * inv_tau
    valid = (kid >= 0)[None, :]
    pos = valid & (qid[:, None] == kid[None, :])
    e = tl.exp(tl.where(valid, z - tl.where(pos, lse_pos, lse_neg), float("-inf")))
    g = e * tl.where(pos, w3 + p_pos * (w1 + w2 * (z - c_pos)),
                     w4 + p_neg * (w1 + w2 * (z - c_neg)))
    g += tl.where(pos, w5, 0.0)
    if HAS_MOMENTUM:
        w6 = tl.load(rv + 10 * stride_rowv, mask=row_in, other=0.0)[:, None]
        lse_mom = tl.load(rv + 11 * stride_rowv, mask=row_in, other=0.0)[:, None]
        zm = _scores_tile(QM, KM, rows, cols, row_in, col_in, D, stride_qm, stride_km,
                          BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION) * inv_tau
        g += w6 * tl.exp(tl.where(valid, zm - lse_mom, float("-inf")))
    out = G + rows[:, None].to(tl.int64) * stride_g + cols[None, :]
    tl.store(out, g.to(G.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


# --------------------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile_config(D: int, on_cuda: bool, grad: bool) -> dict:
    """Fixed tiles. The interpreter's cost grows with programs x loop steps, so it gets few large
    tiles; the GPU tiles are reasonable starting points for an H100, not yet swept (no autotune:
    it needs a driver, and several configs fail in the interpreter)."""
    if not on_cuda:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(max(next_pow2(D), 16), 128))
    if grad:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)


def _num_splits(n: int, N: int, device: torch.device, block_m: int, block_n: int) -> int:
    """Key-range splits so that a small n still fills the GPU (about two programs per SM)."""
    if device.type != "cuda":
        return 1
    want = triton.cdiv(2 * _sm_count(device.index or 0), triton.cdiv(n, block_m))
    return max(1, min(want, triton.cdiv(N, 2 * block_n)))  # at least two key tiles per split


def _dot_options(x: torch.Tensor) -> dict:
    upcast = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not x.is_cuda)
    tf32 = x.dtype != torch.float32 or (x.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    return dict(UPCAST=upcast, INPUT_PRECISION="tf32" if tf32 else "ieee")


def _merge_splits(stats_S11n: torch.Tensor) -> torch.Tensor:
    """Combine per-key-range statistics: sums add, (max, l, a) triples rescale to a common max."""
    if stats_S11n.shape[0] == 1:
        return stats_S11n[0]
    out = stats_S11n.sum(0)
    for i_m, i_l, i_a in ((0, 1, 2), (5, 6, 7), (8, 9, 10)):
        m_Sn = stats_S11n[:, i_m]
        m_n = m_Sn.amax(0)
        w_Sn = torch.exp(m_Sn - torch.where(torch.isinf(m_n), 0.0, m_n))
        out[i_m] = m_n
        out[i_l] = (stats_S11n[:, i_l] * w_Sn).sum(0)
        out[i_a] = (stats_S11n[:, i_a] * w_Sn).sum(0)
    return out


def similarity_stats(q_nD, k_ND, qid_n, kid_N, qm_nD, km_ND, inv_tau: float) -> torch.Tensor:
    """Launch the forward kernel; return the merged (11, n) fp32 row statistics."""
    (n, D), N = q_nD.shape, k_ND.shape[0]
    cfg = _tile_config(D, q_nD.is_cuda, grad=False)
    splits = _num_splits(n, N, q_nD.device, cfg["BLOCK_M"], cfg["BLOCK_N"])
    keys_per_split = max(1, triton.cdiv(triton.cdiv(N, splits), cfg["BLOCK_N"])) * cfg["BLOCK_N"]
    splits = max(1, triton.cdiv(N, keys_per_split))
    stats = torch.empty(splits, _NSTAT, n, dtype=torch.float32, device=q_nD.device)
    has_mom = qm_nD is not None
    qm_nD, km_ND = (qm_nD, km_ND) if has_mom else (q_nD, k_ND)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), splits)
    _similarity_stats_kernel[grid](
        q_nD, k_ND, qm_nD, km_ND, qid_n, kid_N, stats,
        n, N, D, keys_per_split,
        q_nD.stride(0), k_ND.stride(0), qm_nD.stride(0), km_ND.stride(0),
        inv_tau, HAS_MOMENTUM=has_mom, **_dot_options(q_nD), **cfg)
    return _merge_splits(stats)


def similarity_backward(q_nD, k_ND, qid_n, kid_N, qm_nD, km_ND, rowv_Rn, inv_tau: float,
                        c_neg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dQ and dK from the row vector (weights already scaled by dloss / tau), one row chunk at a
    time: a kernel recomputes the S tiles and writes g (C x N), two matmuls consume it."""
    (n, D), N = q_nD.shape, k_ND.shape[0]
    cfg = _tile_config(D, q_nD.is_cuda, grad=True)
    rows = max(1, _BWD_CHUNK_BYTES // max(1, N * q_nD.element_size()))
    chunk = min(n, max(cfg["BLOCK_M"], rows // cfg["BLOCK_M"] * cfg["BLOCK_M"]))
    has_mom = qm_nD is not None
    qm_nD, km_ND = (qm_nD, km_ND) if has_mom else (q_nD, k_ND)
    g_CN = torch.empty(chunk, N, dtype=q_nD.dtype, device=q_nD.device)
    dq_nD = torch.empty_like(q_nD)
    dk_ND = None
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        g = g_CN[: r1 - r0]
        grid = (triton.cdiv(r1 - r0, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
        _similarity_grad_kernel[grid](
            q_nD[r0:r1], k_ND, qm_nD[r0:r1], km_ND, qid_n[r0:r1], kid_N, rowv_Rn[:, r0:r1], g,
            r1 - r0, N, D,
            q_nD.stride(0), k_ND.stride(0), qm_nD.stride(0), km_ND.stride(0),
            rowv_Rn.stride(0), g.stride(0),
            inv_tau, c_neg, HAS_MOMENTUM=has_mom, **_dot_options(q_nD), **cfg)
        torch.mm(g, k_ND, out=dq_nD[r0:r1])
        part = g.T @ q_nD[r0:r1]
        if r1 - r0 == n:
            dk_ND = part
        else:  # several chunks: accumulate in fp32, cast once
            dk_ND = part.float() if dk_ND is None else dk_ND.add_(part.float())
    return dq_nD, dk_ND.to(k_ND.dtype)


# --------------------------------------------------------------------------- row algebra (torch, O(n))
def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def _row_terms(stats_11n, query_valid_n, kind, tau, margin, lam, eps, alpha, gamma):
    """Per-row loss and the backward row vector (12, n) from the forward statistics."""
    m_pos, l_pos, a_pos, s_pos, n_pos, m_neg, l_neg, a_neg, m_mom, l_mom, a_mom = stats_11n
    has_pos, has_neg = n_pos > 0, l_neg > 0
    lse_pos, lse_neg = m_pos + torch.log(l_pos), m_neg + torch.log(l_neg)  # -inf on an empty set
    lse = _finite(torch.logaddexp(lse_pos, lse_neg))
    lse_pos, lse_neg = _finite(lse_pos), _finite(lse_neg)
    p_pos = torch.where(has_pos, torch.exp(lse_pos - lse), 0.0)  # softmax mass on positives
    p_neg = torch.where(has_neg, torch.exp(lse_neg - lse), 0.0)  # = 1 - p_pos, without cancellation
    zbar_pos = torch.where(has_pos, a_pos / l_pos, 0.0)  # softmax-weighted mean of z, positives
    zbar_neg = torch.where(has_neg, a_neg / l_neg, 0.0)
    n_pos1 = n_pos.clamp(min=1.0)
    c_pos, c_neg = torch.log(1.0 / n_pos1 + eps), math.log(eps)
    zero, one = torch.zeros_like(lse), torch.ones_like(lse)
    w1 = w2 = w3 = w4 = w5 = w6 = zero
    mask = has_pos
    if kind in ("sdm", "bsdm"):
        neg_entropy = p_pos * zbar_pos + p_neg * zbar_neg - lse
        loss = neg_entropy - p_pos * c_pos - p_neg * c_neg
        w1, w2 = -(lse + loss), one
        if kind == "bsdm":
            loss = loss + lam * (c_pos - s_pos / n_pos1 + lse)
            w1, w5 = w1 + lam, -lam / n_pos1
    elif kind == "tal":
        raw = margin - tau * zbar_pos + torch.where(has_neg, tau * lse_neg, 0.0)
        loss, mask = raw.clamp(min=0.0), query_valid_n
        w3 = -tau * (raw >= 0).float()  # the subgradient torch.clamp uses at 0
        w4 = -w3
    elif kind == "itc":
        zbar_mom = torch.where(l_mom > 0, a_mom / l_mom, 0.0)
        loss = lse - alpha * zbar_mom - (1.0 - alpha) * s_pos / n_pos1
        w1, w5, w6 = one, -(1.0 - alpha) / n_pos1, -alpha * one
    else:  # waf; 1 - P is p_neg
        log_p = lse_pos - lse
        focal = p_neg ** gamma
        loss = -focal * log_p
        slope = torch.where(p_neg > 0, gamma * p_pos * p_neg.clamp(min=1e-30) ** (gamma - 1) * log_p, 0.0)
        w3 = slope - focal  # dL/dlog P; dlog P/dz = softmax over positives - p
        w1 = -w3
    maskf = mask.float()
    loss = torch.where(mask, loss, 0.0)
    lse_mom = _finite(m_mom + torch.log(l_mom))
    w = [x * maskf for x in (w1, w2, w3, w4, w5, w6)]
    rowv = torch.stack([lse_pos, lse_neg, p_pos, p_neg, c_pos, *w, lse_mom])
    return loss, rowv


class SimilarityLossFunction(torch.autograd.Function):
    """Fused forward (row statistics only) and chunked, tile-recomputing backward."""

    @staticmethod
    def forward(ctx, q_nD, k_ND, qid_n, kid_N, qm_nD, km_ND, kind, tau, margin, lam, eps,
                alpha, gamma):
        stats = similarity_stats(q_nD, k_ND, qid_n, kid_N, qm_nD, km_ND, 1.0 / tau)
        loss_n, rowv = _row_terms(stats, qid_n >= 0, kind, tau, margin, lam, eps, alpha, gamma)
        ctx.save_for_backward(q_nD, k_ND, qid_n, kid_N, qm_nD, km_ND, rowv)
        ctx.tau, ctx.c_neg = tau, math.log(eps)
        return loss_n

    @staticmethod
    def backward(ctx, dloss_n):
        q_nD, k_ND, qid_n, kid_N, qm_nD, km_ND, rowv = ctx.saved_tensors
        rowv = rowv.clone()
        rowv[5:11] *= dloss_n.float()[None] / ctx.tau  # dL/dz -> dL/dS, times upstream
        dq, dk = similarity_backward(q_nD, k_ND, qid_n, kid_N, qm_nD, km_ND, rowv,
                                     1.0 / ctx.tau, ctx.c_neg)
        return (dq, dk) + (None,) * 11


# --------------------------------------------------------------------------- eager reference
def _masked_lse(x_nN: torch.Tensor, mask_nN: torch.Tensor) -> torch.Tensor:
    """logsumexp over the masked entries of each row; -inf (with zero gradient) on empty rows."""
    x = x_nN.masked_fill(~mask_nN, float("-inf"))
    m = x.detach().amax(1, keepdim=True)
    m = torch.where(torch.isinf(m), 0.0, m)
    s = torch.exp(x - m).sum(1)
    nonempty = s > 0
    return torch.where(nonempty, torch.log(torch.where(nonempty, s, 1.0)) + m[:, 0], float("-inf"))


def _zero_where_inf(x):
    return torch.where(torch.isinf(x), 0.0, x)


def similarity_loss_reference(query_nD, key_ND, query_ids_n, key_ids_N, *, kind, tau, margin=0.1,
                              lam=1.0, eps=1e-8, alpha=0.4, gamma=2.0, momentum_query_nD=None,
                              momentum_key_ND=None, normalize=True):
    """Eager PyTorch: materialises the n x N similarity; loss maths in fp32 (fp64 for fp64 input).
    Same arguments, conventions and result as `similarity_loss`."""
    _check_args(query_nD, key_ND, query_ids_n, key_ids_N, kind, tau, alpha, momentum_query_nD,
                momentum_key_ND)
    q, k = _prepare(query_nD, normalize), _prepare(key_ND, normalize)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    sim_nN = (q @ k.T).to(acc)
    z_nN = sim_nN / tau
    qid, kid = query_ids_n.to(q.device), key_ids_N.to(q.device)
    valid_nN = (kid >= 0)[None, :].expand_as(z_nN)
    pos_nN = valid_nN & (qid[:, None] == kid[None, :])
    neg_nN = valid_nN & ~pos_nN
    n_pos = pos_nN.sum(1).to(acc)
    has_pos, qvalid = n_pos > 0, qid >= 0
    lse = _zero_where_inf(_masked_lse(z_nN, valid_nN))
    logp_nN = torch.where(valid_nN, z_nN - lse[:, None], 0.0)
    p_nN = torch.where(valid_nN, torch.exp(z_nN.masked_fill(~valid_nN, float("-inf")) - lse[:, None]), 0.0)
    q_nN = pos_nN.to(acc) / n_pos.clamp(min=1.0)[:, None]
    logq_nN = torch.log(q_nN + eps)
    if kind in ("sdm", "bsdm"):
        loss = (p_nN * torch.where(valid_nN, logp_nN - logq_nN, 0.0)).sum(1)
        if kind == "bsdm":
            loss = loss + lam * (q_nN * torch.where(pos_nN, logq_nN - logp_nN, 0.0)).sum(1)
        return torch.where(has_pos, loss, 0.0)
    if kind == "tal":
        lse_pos = _zero_where_inf(_masked_lse(z_nN, pos_nN))
        a_nN = torch.exp(z_nN.masked_fill(~pos_nN, float("-inf")) - lse_pos[:, None]).detach()
        pos_term = (a_nN * torch.where(pos_nN, sim_nN, 0.0)).sum(1)
        has_neg = neg_nN.any(1)
        neg_term = torch.where(has_neg, tau * _zero_where_inf(_masked_lse(z_nN, neg_nN)), 0.0)
        return torch.where(qvalid, (margin - pos_term + neg_term).clamp(min=0.0), 0.0)
    if kind == "itc":
        target_nN = q_nN
        if alpha > 0:
            with torch.no_grad():
                qm = _prepare(momentum_query_nD, normalize)
                km = _prepare(momentum_key_ND, normalize)
                zm_nN = (qm @ km.T).to(acc).masked_fill(~valid_nN, float("-inf")) / tau
                pm_nN = torch.where(valid_nN, torch.softmax(zm_nN, 1), 0.0)
            target_nN = alpha * pm_nN + (1.0 - alpha) * q_nN
        loss = -(target_nN * logp_nN).sum(1)
        return torch.where(has_pos, loss, 0.0)
    # waf
    log_p = _zero_where_inf(_masked_lse(z_nN, pos_nN)) - lse
    loss = -((1.0 - torch.exp(log_p)).clamp(min=0.0) ** gamma) * log_p
    return torch.where(has_pos, loss, 0.0)


# --------------------------------------------------------------------------- public API
def _prepare(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(x, dim=-1) if normalize else x


def _check_args(q, k, qid, kid, kind, tau, alpha, qm, km):
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {KINDS}")
    if not tau > 0:
        raise ValueError(f"tau={tau!r} must be a positive float")
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"query_nD {tuple(q.shape)} and key_ND {tuple(k.shape)} must be 2-D with "
                         "the same width D")
    if qid.shape != q.shape[:1] or kid.shape != k.shape[:1]:
        raise ValueError(f"ids {tuple(qid.shape)}, {tuple(kid.shape)} must have one entry per row "
                         f"of query_nD ({q.shape[0]}) and key_ND ({k.shape[0]})")
    if q.dtype != k.dtype or not q.dtype.is_floating_point:
        raise ValueError(f"query_nD ({q.dtype}) and key_ND ({k.dtype}) need one floating dtype")
    if kind == "itc" and alpha > 0:
        if qm is None or km is None:
            raise ValueError("kind='itc' with alpha > 0 needs momentum_query_nD and momentum_key_ND "
                             "(or pass alpha=0 for identity targets only)")
        if qm.shape != q.shape or km.shape != k.shape:
            raise ValueError("momentum features must have the shapes of query_nD and key_ND")


def similarity_loss(query_nD, key_ND, query_ids_n, key_ids_N, *, kind, tau, margin=0.1, lam=1.0,
                    eps=1e-8, alpha=0.4, gamma=2.0, momentum_query_nD=None, momentum_key_ND=None,
                    normalize=True, impl="auto") -> torch.Tensor:
    """Per-query loss (fp32, shape (n,)) of one retrieval direction: rows are the local queries,
    columns the keys of all ranks with their ids (id < 0 = padding). Differentiable w.r.t.
    query_nD and key_ND. See the module docstring for the kinds and the conventions.

    kind: "sdm" | "bsdm" | "tal" | "itc" | "waf"; tau: temperature (python float);
    margin: tal's m; lam: bsdm's weight of KL(q||p); eps: inside log(q + eps) (sdm, bsdm);
    alpha: itc's weight of the momentum targets (0: identity targets only); gamma: waf's focus;
    momentum_*: itc's momentum features (no gradient); normalize: L2-normalise all inputs first;
    impl: "auto" (Triton on CUDA, else the reference) | "triton" | "reference".
    """
    args = (query_nD, key_ND, query_ids_n, key_ids_N)
    opts = dict(kind=kind, tau=float(tau), margin=margin, lam=lam, eps=eps, alpha=alpha, gamma=gamma,
                momentum_query_nD=momentum_query_nD, momentum_key_ND=momentum_key_ND)
    choice = resolve_impl("similarity_loss", impl, query_nD, key_ND)
    if choice == "reference" or query_nD.shape[0] == 0 or key_ND.shape[0] == 0:  # empty: nothing to fuse
        return similarity_loss_reference(*args, normalize=normalize, **opts)
    _check_args(*args, kind, tau, alpha, momentum_query_nD, momentum_key_ND)
    if query_nD.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"impl='triton' takes fp32, fp16 or bf16, not {query_nD.dtype}")
    q, k = _prepare(query_nD, normalize).contiguous(), _prepare(key_ND, normalize).contiguous()
    qm = km = None
    if kind == "itc" and alpha > 0:
        qm = _prepare(momentum_query_nD.detach(), normalize).to(q.dtype).contiguous()
        km = _prepare(momentum_key_ND.detach(), normalize).to(q.dtype).contiguous()
    qid = query_ids_n.to(device=q.device, dtype=torch.int64).contiguous()
    kid = key_ids_N.to(device=q.device, dtype=torch.int64).contiguous()
    return SimilarityLossFunction.apply(q, k, qid, kid, qm, km, kind, float(tau), float(margin),
                                        float(lam), float(eps), float(alpha), float(gamma))


def bidirectional_similarity_loss(img_nD, txt_nD, ids_n, img_keys_ND, txt_keys_ND, key_ids_N, *,
                                  momentum_img_nD=None, momentum_txt_nD=None,
                                  momentum_img_keys_ND=None, momentum_txt_keys_ND=None, **kwargs):
    """(loss_i2t_n, loss_t2i_n): image queries over text keys, and text queries over image keys.
    Keyword arguments are those of `similarity_loss`; the momentum_* pairs feed itc."""
    i2t = similarity_loss(img_nD, txt_keys_ND, ids_n, key_ids_N, momentum_query_nD=momentum_img_nD,
                          momentum_key_ND=momentum_txt_keys_ND, **kwargs)
    t2i = similarity_loss(txt_nD, img_keys_ND, ids_n, key_ids_N, momentum_query_nD=momentum_txt_nD,
                          momentum_key_ND=momentum_img_keys_ND, **kwargs)
    return i2t, t2i
