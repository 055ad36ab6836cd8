"""Similarity-matrix losses (SDM, BSDM, TAL, ITC, WAF) fused with the similarity matrix.

Letters: n local queries (rows), N keys gathered from all ranks (columns), D embedding width,
P positive pairs (query and key with the same id; about n to 4 n in training).
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

Every loss above is a closed form of a few numbers per row: over the negatives the running
softmax (max, sum e^(z - max), sum e^(z - max) z), the same over the positives with sum z and n_i,
and for itc the softmax of the momentum logits weighting z. The positives and the negatives keep
their own maxima, so a positive set far below the negatives does not underflow, and 1 - P_i is
computed from the negatives, never as a difference.

Forward: three launches, the n x N matrix is never written.
  1. `_similarity_stats_kernel`, the only O(n N D) part: S tiles by tl.dot, and per row the
     online softmax over the NEGATIVES only (one compare, one max, one exp2 per element) and for
     itc the momentum softmax. One flat loop over (key tile, D slice) keeps the copy pipeline full
     across key tiles; when D <= _Q_ONCE_MAX_D (and the dot runs on tensor cores) the query tile
     is loaded once, before the loop, and the loop streams keys only. Keys split over a second
     grid axis when n is small.
  2. `torch.sort` of the key ids (the only torch op of the row algebra).
  3. `_similarity_rows_kernel`: per row, merges the key splits, finds the query's positive keys
     in the sorted ids (binary search; the range is kept for the backward), computes their z
     exactly in O(P D), and the loss and the backward row vector (9 numbers) of the kind.
Backward, one chunk of rows at a time (C x N, at most _BWD_CHUNK_BYTES): `_similarity_grad_kernel`
recomputes the S tiles and writes dL/dS as if every valid key were a negative,
  g_ij = exp(z_ij - lse_neg_i) (B0_i + B1_i z_ij) + w6_i softmax_j(Sm_ij / tau),
then `_similarity_grad_pos_kernel` overwrites the P positive entries with
  g_ij = exp(z_ij - lse_pos_i) (C0_i + C1_i z_ij) + w5_i + w6_i softmax_j(Sm_ij / tau),
and two matmuls give dQ = g K and dK += g^T Q (accumulated in fp32 over chunks, rounded once).
The row constants come from the forward, scaled by the upstream gradient and 1/tau in the kernels.
Extra memory is O(n + N) plus the chunk (eager holds several n x N fp32 matrices).

FLOPs and bytes. Useful work: forward 2 n N D (4 n N D with momentum), forward+backward 6 n N D
(8 n N D with momentum); the benchmark's TFLOP/s count only these. Executed work adds the S tiles
recomputed by the backward kernel (2 n N D more, 4 n N D with momentum), so the ceiling is 75 % of
the tensor-core peak, and O(P D) for the positive pairs. A (BLOCK_M x BLOCK_N) tile of S costs
2 BLOCK_M BLOCK_N D flops for (BLOCK_M + BLOCK_N) D operand bytes from L2 (BLOCK_N D with the
query tile loaded once), so large tiles matter as much as HBM: K stays in L2 (16 MB at N = 16384,
D = 512, bf16). The per-element epilogue (about eight ALU ops and one exp2 in the forward, six and
one in the backward) competes with the matrix multiplies below D = 256; several programs per SM
(registers, checked by tests/kernels/compile_sm90.py) let one program's epilogue overlap another's
tl.dot. The backward writes g once and reads it twice (6 n N bytes in bf16).

Tiles: on the GPU a short list of configurations (those whose copy buffers fit the device's shared
memory) is timed once per shape by `_dispatch.launch`, the choice logged, the fastest kept; the
interpreter runs one configuration.

Numerics: accumulation, exponentials and row statistics in fp32; bf16/fp16 operands go to tl.dot
as they are on a GPU (tensor cores, fp32 accumulate); in the interpreter, which mishandles bf16
arithmetic, bf16 is cast to fp32 right after the load (fp16 is not, so its native path is
tested). fp32 inputs use TF32 exactly when torch.backends.cuda.matmul.allow_tf32 is set, as eager
matmul does. The positive pairs' z are exact fp32 dot products. The op takes activations only, no
parameters, so it needs nothing special under ZeRO-3.
"""
import math

import torch
import torch.nn.functional as F

from tbps.kernels import _dispatch
from tbps.kernels._dispatch import next_pow2, resolve_impl, tl, triton

KINDS = ("sdm", "bsdm", "tal", "itc", "waf")
# forward statistics per key split and row, base 2 (z2 = z log2 e): m_neg l_neg a_neg m_mom l_mom a_mom
_NSTAT = 6
# backward row vector: lse_pos lse_neg C0 C1 B0 B1 w5 w6 lse_mom (see the module docstring)
_NROWV = 9
_BWD_CHUNK_BYTES = 256 << 20  # the g buffer for one row chunk; tests shrink it to force chunks
_Q_ONCE_MAX_D = 256  # load the query tile once when D (padded to a power of two) is at most this
LOG2E, LN2 = math.log2(math.e), math.log(2.0)
_LOG2E, _LN2 = tl.constexpr(LOG2E), tl.constexpr(LN2)  # the kernels' copies


# --------------------------------------------------------------------------- Triton kernels
@triton.jit
def _load_rows(P, rows, row_in, d, D, stride, UPCAST: tl.constexpr):
    """Rows `rows` of a row-major matrix, columns d; zero outside. fp32 when UPCAST."""
    x = tl.load(P + rows[:, None].to(tl.int64) * stride + d[None, :],
                mask=row_in[:, None] & (d[None, :] < D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _online(m, l, a, x, w, A: tl.constexpr):
    """Fold a tile of base-2 logits x (-inf = not a member) into the running (max, sum 2^(x-max),
    sum 2^(x-max) w) of each row; the a sum only when A. A row with nothing seen yet keeps
    max = -inf, and the shift 0 keeps inf - inf out."""
    m_new = tl.maximum(m, tl.max(x, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp2(x - shift[:, None])
    scale = tl.exp2(m - shift)
    l = l * scale + tl.sum(e, 1)
    if A:
        a = a * scale + tl.sum(e * w, 1)
    return m_new, l, a


@triton.jit
def _tile_update(s, s_m, cols, col_in, KID, qid, scale2, m, l, a, m_m, l_m, a_m,
                 A_NEG: tl.constexpr, HAS_MOMENTUM: tl.constexpr):
    """Fold one S tile (and its momentum tile) into the negative and momentum statistics."""
    z2 = s * scale2
    kid = tl.load(KID + cols, mask=col_in, other=-1)
    valid = (kid >= 0)[None, :]
    neg = valid & (qid[:, None] != kid[None, :])
    m, l, a = _online(m, l, a, tl.where(neg, z2, float("-inf")), z2, A_NEG)
    if HAS_MOMENTUM:  # the softmax of the momentum logits over valid keys, weighting z
        m_m, l_m, a_m = _online(m_m, l_m, a_m, tl.where(valid, s_m * scale2, float("-inf")), z2, True)
    return m, l, a, m_m, l_m, a_m


@triton.jit
def _similarity_stats_kernel(
    # pointers
    Q, K, QM, KM, QID, KID, STATS,
    # sizes
    n, N, D, splits,
    # row strides (the last dimension is contiguous)
    stride_q, stride_k, stride_qm, stride_km,
    scale2,  # log2(e) / tau
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_POW2: tl.constexpr,
    Q_ONCE: tl.constexpr, A_NEG: tl.constexpr, HAS_MOMENTUM: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n
    qid = tl.load(QID + rows, mask=row_in, other=-1)
    keys_per_split = tl.cdiv(tl.cdiv(N, BLOCK_N), splits) * BLOCK_N
    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, N)

    ninf = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK_M,), tl.float32)
    m, l, a = ninf, zero, zero
    m_m, l_m, a_m = ninf, zero, zero
    if Q_ONCE:  # the whole width at once: the query tile stays, the loop streams key tiles
        d = tl.arange(0, D_POW2)
        q = _load_rows(Q, rows, row_in, d, D, stride_q, UPCAST)
        if HAS_MOMENTUM:
            qm = _load_rows(QM, rows, row_in, d, D, stride_qm, UPCAST)
        for j0 in range(start, end, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            col_in = cols < end
            s = tl.dot(q, tl.trans(_load_rows(K, cols, col_in, d, D, stride_k, UPCAST)),
                       input_precision=INPUT_PRECISION)
            s_m = s
            if HAS_MOMENTUM:
                s_m = tl.dot(qm, tl.trans(_load_rows(KM, cols, col_in, d, D, stride_km, UPCAST)),
                             input_precision=INPUT_PRECISION)
            m, l, a, m_m, l_m, a_m = _tile_update(s, s_m, cols, col_in, KID, qid, scale2, m, l, a,
                                                  m_m, l_m, a_m, A_NEG, HAS_MOMENTUM)
    else:  # one flat loop over (key tile, D slice): the copy pipeline never drains
        n_d = tl.cdiv(D, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_m = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for it in range(0, tl.cdiv(end - start, BLOCK_N) * n_d):
            tile = it // n_d
            d = (it - tile * n_d) * BLOCK_K + tl.arange(0, BLOCK_K)
            cols = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            col_in = cols < end
            acc = tl.dot(_load_rows(Q, rows, row_in, d, D, stride_q, UPCAST),
                         tl.trans(_load_rows(K, cols, col_in, d, D, stride_k, UPCAST)), acc,
                         input_precision=INPUT_PRECISION)
            if HAS_MOMENTUM:
                acc_m = tl.dot(_load_rows(QM, rows, row_in, d, D, stride_qm, UPCAST),
                               tl.trans(_load_rows(KM, cols, col_in, d, D, stride_km, UPCAST)),
                               acc_m, input_precision=INPUT_PRECISION)
            if it - tile * n_d == n_d - 1:  # the tile is complete
                m, l, a, m_m, l_m, a_m = _tile_update(acc, acc_m, cols, col_in, KID, qid, scale2,
                                                      m, l, a, m_m, l_m, a_m, A_NEG, HAS_MOMENTUM)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc_m = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    out = STATS + pid_s * 6 * n + rows  # (splits, 6, n): one contiguous row per statistic
    tl.store(out, m, mask=row_in)
    tl.store(out + n, l, mask=row_in)
    if A_NEG:
        tl.store(out + 2 * n, a, mask=row_in)
    if HAS_MOMENTUM:
        tl.store(out + 3 * n, m_m, mask=row_in)
        tl.store(out + 4 * n, l_m, mask=row_in)
        tl.store(out + 5 * n, a_m, mask=row_in)


@triton.jit
def _merge(m, l, a, m_s, l_s, a_s):
    """Combine two base-2 running softmaxes (max, l, a) of the same rows."""
    m_new = tl.maximum(m, m_s)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale, scale_s = tl.exp2(m - shift), tl.exp2(m_s - shift)
    return m_new, l * scale + l_s * scale_s, a * scale + a_s * scale_s


@triton.jit
def _positive_range(KID_SORTED, qid, valid_row, N, nbits, BLOCK_R: tl.constexpr):
    """[lo, hi) in the sorted key ids KID_SORTED[:N]: the keys with the query's id (empty for
    padded queries). lo counts the ids < qid, hi the ids < qid + 1: both binary searches in one
    loop of nbits = N.bit_length() halving steps. (int64 index arithmetic: the interpreter checks
    every int32 operation for overflow, which costs more than the search.)"""
    target = qid[:, None] + tl.arange(0, 2)[None, :]
    pos = tl.zeros((BLOCK_R, 2), tl.int64)
    step = tl.full((BLOCK_R, 2), 1, tl.int64) << (nbits - 1)
    for _ in range(0, nbits):
        probe = pos + step
        inb = probe <= N
        v = tl.load(KID_SORTED + probe - 1, mask=inb, other=0)
        pos = tl.where(inb & (v < target), probe, pos)
        step = step >> 1
    lo, hi = tl.split(pos)
    return lo, tl.where(valid_row & (qid >= 0), hi, lo)


@triton.jit
def _pair_dots(A, B, rows, row_in, cols, ok, D, stride_a, stride_b, BLOCK_R: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """<A[rows[r]], B[cols[r, p]]> for each (r, p) where ok, exactly in fp32: (BLOCK_R, BLOCK_P)."""
    acc = tl.zeros((BLOCK_R, BLOCK_P), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + tl.arange(0, BLOCK_D))[None, None, :]
        a = tl.load(A + rows[:, None, None].to(tl.int64) * stride_a + d,
                    mask=row_in[:, None, None] & (d < D), other=0.0).to(tl.float32)
        b = tl.load(B + cols[:, :, None].to(tl.int64) * stride_b + d,
                    mask=ok[:, :, None] & (d < D), other=0.0).to(tl.float32)
        acc += tl.sum(a * b, 2)
    return acc


@triton.jit
def _positive_tile(Q, K, PERM, rows, row_in, lo, hi, t0, D, stride_q, stride_k, inv_tau,
                   BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rows' positives t0 .. t0 + BLOCK_P of their sorted range [lo, hi): (in range, key
    column, scaled score)."""
    j = lo[:, None] + t0 + tl.arange(0, BLOCK_P)[None, :]
    ok = j < hi[:, None]
    col = tl.load(PERM + j, mask=ok, other=0)
    z = _pair_dots(Q, K, rows, row_in, col, ok, D, stride_q, stride_k, BLOCK_R, BLOCK_P,
                   BLOCK_D) * inv_tau
    return ok, col, z


@triton.jit
def _similarity_rows_kernel(
    # pointers: STATS (splits, 6, n) from the stats kernel; LOSS (n,), ROWV (9, n) and RANGE
    # (2, n: each row's positives in the sorted ids, for the backward) written
    Q, K, QID, KID_SORTED, PERM, STATS, LOSS, ROWV, RANGE,
    # sizes
    n, N, D, splits, nbits,
    stride_q, stride_k,
    # loss parameters
    inv_tau, tau, margin, lam, eps, c_neg, alpha, gamma,
    # meta-parameters
    KIND: tl.constexpr, A_NEG: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per row: the split statistics merged, the positives found and scored, the loss of KIND
    (0 sdm, 1 bsdm, 2 tal, 3 itc, 4 waf) and the backward row vector."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < n
    qid = tl.load(QID + rows, mask=row_in, other=-1)
    ninf = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK_R,), tl.float32)

    # negatives and the momentum softmax: merge the key splits (base 2)
    m_neg, l_neg, a_neg, m_mom, l_mom, a_mom = ninf, zero, zero, ninf, zero, zero
    for s in range(0, splits):
        st = STATS + s * 6 * n + rows
        a_s = zero
        if A_NEG:
            a_s = tl.load(st + 2 * n, mask=row_in, other=0.0)
        m_neg, l_neg, a_neg = _merge(m_neg, l_neg, a_neg, tl.load(st, mask=row_in, other=0.0),
                                     tl.load(st + n, mask=row_in, other=0.0), a_s)
        if HAS_MOMENTUM:
            m_mom, l_mom, a_mom = _merge(m_mom, l_mom, a_mom,
                                         tl.load(st + 3 * n, mask=row_in, other=0.0),
                                         tl.load(st + 4 * n, mask=row_in, other=0.0),
                                         tl.load(st + 5 * n, mask=row_in, other=0.0))

    # positives: the keys with the query's id, scored exactly (base-2 max and sums, a in z)
    lo, hi = _positive_range(KID_SORTED, qid, row_in, N, nbits, BLOCK_R)
    tl.store(RANGE + rows, lo, mask=row_in)
    tl.store(RANGE + n + rows, hi, mask=row_in)
    m_pos, l_pos, a_pos, s_pos = ninf, zero, zero, zero
    for t0 in range(0, tl.max(hi - lo, 0), BLOCK_P):
        ok, col, z = _positive_tile(Q, K, PERM, rows, row_in, lo, hi, t0, D, stride_q, stride_k,
                                    inv_tau, BLOCK_R, BLOCK_P, BLOCK_D)
        m_pos, l_pos, a_pos = _online(m_pos, l_pos, a_pos, tl.where(ok, z * _LOG2E, float("-inf")),
                                      z, True)
        s_pos += tl.sum(tl.where(ok, z, 0.0), 1)
    n_pos = (hi - lo).to(tl.float32)

    # the row algebra: the closed forms of the module docstring's losses
    has_pos = n_pos > 0
    has_neg = l_neg > 0
    lse_pos = tl.where(has_pos, (m_pos + tl.log2(tl.where(has_pos, l_pos, 1.0))) * _LN2, 0.0)
    lse_neg = tl.where(has_neg, (m_neg + tl.log2(tl.where(has_neg, l_neg, 1.0))) * _LN2, 0.0)
    top = tl.where(has_pos, lse_pos, tl.where(has_neg, lse_neg, 0.0))
    top = tl.where(has_neg, tl.maximum(top, lse_neg), top)
    total = tl.where(has_pos, tl.exp(lse_pos - top), 0.0) + tl.where(has_neg, tl.exp(lse_neg - top), 0.0)
    lse = tl.where(has_pos | has_neg, top + tl.log(tl.where(has_pos | has_neg, total, 1.0)), 0.0)
    p_pos = tl.where(has_pos, tl.exp(lse_pos - lse), 0.0)  # softmax mass on the positives
    p_neg = tl.where(has_neg, tl.exp(lse_neg - lse), 0.0)  # = 1 - p_pos, without cancellation
    zbar_pos = tl.where(has_pos, a_pos / tl.where(has_pos, l_pos, 1.0), 0.0)
    zbar_neg = tl.where(has_neg, a_neg / tl.where(has_neg, l_neg, 1.0) * _LN2, 0.0)
    n_pos1 = tl.maximum(n_pos, 1.0)
    c_pos = tl.log(1.0 / n_pos1 + eps)
    w1, w2, w3, w4, w5, w6 = zero, zero, zero, zero, zero, zero
    keep = has_pos
    if KIND <= 1:  # sdm, bsdm
        loss = p_pos * zbar_pos + p_neg * zbar_neg - lse - p_pos * c_pos - p_neg * c_neg
        w1 = -(lse + loss)
        w2 = zero + 1.0
        if KIND == 1:
            loss = loss + lam * (c_pos - s_pos / n_pos1 + lse)
            w1 = w1 + lam
            w5 = -lam / n_pos1
    elif KIND == 2:  # tal
        raw = margin - tau * zbar_pos + tl.where(has_neg, tau * lse_neg, 0.0)
        loss = tl.maximum(raw, 0.0)
        keep = row_in & (qid >= 0)
        w3 = tl.where(raw >= 0, -tau, 0.0)  # the subgradient torch.clamp uses at 0
        w4 = -w3
    elif KIND == 3:  # itc
        zbar_mom = tl.where(l_mom > 0, a_mom / tl.where(l_mom > 0, l_mom, 1.0) * _LN2, 0.0)
        loss = lse - alpha * zbar_mom - (1.0 - alpha) * s_pos / n_pos1
        w1 = zero + 1.0
        w5 = -(1.0 - alpha) / n_pos1
        w6 = zero - alpha
    else:  # waf; 1 - P is p_neg
        log_p = lse_pos - lse
        some = p_neg > 0
        log_q = tl.log(tl.where(some, p_neg, 1.0))
        focal = tl.where(some, tl.exp(gamma * log_q), tl.where(gamma == 0, 1.0, 0.0))
        loss = -focal * log_p
        slope = tl.where(some, gamma * p_pos * tl.exp((gamma - 1.0) * tl.maximum(log_q, -69.0776))
                         * log_p, 0.0)  # p_neg clamped at 1e-30, as the reference
        w3 = slope - focal  # dL/dlog P; dlog P/dz = softmax over positives - p
        w1 = -w3
    loss = tl.where(keep, loss, 0.0)
    w1, w2, w3 = tl.where(keep, w1, 0.0), tl.where(keep, w2, 0.0), tl.where(keep, w3, 0.0)
    w4, w5, w6 = tl.where(keep, w4, 0.0), tl.where(keep, w5, 0.0), tl.where(keep, w6, 0.0)
    lse_mom = tl.where(l_mom > 0, (m_mom + tl.log2(tl.where(l_mom > 0, l_mom, 1.0))) * _LN2, 0.0)
    tl.store(LOSS + rows, loss, mask=row_in)
    rv = ROWV + rows
    tl.store(rv, lse_pos, mask=row_in)
    tl.store(rv + n, lse_neg, mask=row_in)
    tl.store(rv + 2 * n, w3 + p_pos * (w1 - w2 * c_pos), mask=row_in)  # C0
    tl.store(rv + 3 * n, p_pos * w2, mask=row_in)  # C1
    tl.store(rv + 4 * n, w4 + p_neg * (w1 - w2 * c_neg), mask=row_in)  # B0
    tl.store(rv + 5 * n, p_neg * w2, mask=row_in)  # B1
    tl.store(rv + 6 * n, w5, mask=row_in)
    tl.store(rv + 7 * n, w6, mask=row_in)
    tl.store(rv + 8 * n, lse_mom, mask=row_in)


@triton.jit(do_not_specialize=["stride_dloss"])  # 0 after a mean, 1 after a weighted sum: one variant
def _similarity_grad_kernel(
    # pointers: G is the (C x N) output for this chunk of rows, ROWV the (9 x n) row vector
    Q, K, QM, KM, KID, ROWV, DLOSS, G,
    # sizes
    C, N, D,
    # strides
    stride_q, stride_k, stride_qm, stride_km, stride_rowv, stride_dloss, stride_g,
    inv_tau,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dL/dS for one tile, every valid key taken as a negative (the positive entries are
    overwritten by _similarity_grad_pos_kernel)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < C
    col_in = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        d = d0 + tl.arange(0, BLOCK_K)
        acc = tl.dot(_load_rows(Q, rows, row_in, d, D, stride_q, UPCAST),
                     tl.trans(_load_rows(K, cols, col_in, d, D, stride_k, UPCAST)), acc,
                     input_precision=INPUT_PRECISION)
        if HAS_MOMENTUM:
            acc_m = tl.dot(_load_rows(QM, rows, row_in, d, D, stride_qm, UPCAST),
                           tl.trans(_load_rows(KM, cols, col_in, d, D, stride_km, UPCAST)), acc_m,
                           input_precision=INPUT_PRECISION)
    # row constants: dL/dz -> dL/dS (1/tau) times the upstream gradient, in base 2
    scale = tl.load(DLOSS + rows * stride_dloss, mask=row_in, other=0.0) * inv_tau
    rv = ROWV + rows
    lse_neg2 = tl.load(rv + stride_rowv, mask=row_in, other=0.0) * _LOG2E
    b0 = tl.load(rv + 4 * stride_rowv, mask=row_in, other=0.0) * scale
    b1 = tl.load(rv + 5 * stride_rowv, mask=row_in, other=0.0) * scale * _LN2
    z2 = acc * (inv_tau * _LOG2E)
    # z <= lse_neg on every negative; the clamp only keeps the positive entries finite
    g = tl.exp2(tl.minimum(z2 - lse_neg2[:, None], 0.0)) * (b0[:, None] + b1[:, None] * z2)
    if HAS_MOMENTUM:
        w6 = tl.load(rv + 7 * stride_rowv, mask=row_in, other=0.0) * scale
        lse_mom2 = tl.load(rv + 8 * stride_rowv, mask=row_in, other=0.0) * _LOG2E
        g += w6[:, None] * tl.exp2(acc_m * (inv_tau * _LOG2E) - lse_mom2[:, None])
    kid = tl.load(KID + cols, mask=col_in, other=-1)
    g = tl.where((kid >= 0)[None, :], g, 0.0)
    out = G + rows[:, None].to(tl.int64) * stride_g + cols[None, :]
    tl.store(out, g.to(G.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


@triton.jit(do_not_specialize=["stride_dloss"])
def _similarity_grad_pos_kernel(
    # pointers: G as in _similarity_grad_kernel; only its positive entries are written; RANGE
    # the forward's (2, n) positive ranges in the sorted ids, PERM their key columns
    PERM, RANGE, ROWV, DLOSS, G, Q, K, QM, KM,
    # sizes
    C, D, stride_range,
    # strides
    stride_q, stride_k, stride_qm, stride_km, stride_rowv, stride_dloss, stride_g,
    inv_tau,
    # meta-parameters
    HAS_MOMENTUM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dL/dS on the positive pairs of a row block, O(P D)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < C
    lo = tl.load(RANGE + rows, mask=row_in, other=0)
    hi = tl.load(RANGE + stride_range + rows, mask=row_in, other=0)
    scale = tl.load(DLOSS + rows * stride_dloss, mask=row_in, other=0.0) * inv_tau
    rv = ROWV + rows
    lse_pos = tl.load(rv, mask=row_in, other=0.0)
    c0 = tl.load(rv + 2 * stride_rowv, mask=row_in, other=0.0) * scale
    c1 = tl.load(rv + 3 * stride_rowv, mask=row_in, other=0.0) * scale
    w5 = tl.load(rv + 6 * stride_rowv, mask=row_in, other=0.0) * scale
    w6 = tl.load(rv + 7 * stride_rowv, mask=row_in, other=0.0) * scale
    lse_mom = tl.load(rv + 8 * stride_rowv, mask=row_in, other=0.0)
    for t0 in range(0, tl.max(hi - lo, 0), BLOCK_P):
        ok, col, z = _positive_tile(Q, K, PERM, rows, row_in, lo, hi, t0, D, stride_q, stride_k,
                                    inv_tau, BLOCK_R, BLOCK_P, BLOCK_D)
        g = (tl.exp(tl.minimum(z - lse_pos[:, None], 0.0)) * (c0[:, None] + c1[:, None] * z)
             + w5[:, None])
        if HAS_MOMENTUM:
            zm = _pair_dots(QM, KM, rows, row_in, col, ok, D, stride_qm, stride_km, BLOCK_R,
                            BLOCK_P, BLOCK_D) * inv_tau
            g += w6[:, None] * tl.exp(tl.minimum(zm - lse_mom[:, None], 0.0))
        tl.store(G + rows[:, None].to(tl.int64) * stride_g + col, g.to(G.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- launchers
# Tile candidates for the GPU (16-bit and fp32 operands), timed once per shape by
# _dispatch.launch among those that fit the device's shared memory. tests/kernels/compile_sm90.py
# compiles every one for sm_90 as launched and checks registers, spills and asynchronous copies.
_STATS_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
]
_GRAD_CONFIGS = _STATS_CONFIGS
_FP32_CONFIGS = [  # BLOCK_K 16: the IEEE (no TF32) dot of two tiles spills at 32
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2),
]
# the interpreter's cost grows with programs x loop steps: few large tiles
_INTERPRETER_STATS = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32)
_INTERPRETER_GRAD = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)


def _candidates(x: torch.Tensor, configs: list, interpreter: dict, smem) -> list:
    """The tile configurations to try: on the GPU those whose copy buffers (`smem(config)` bytes,
    plus 8 KiB of scratch) fit in the device's shared memory; fp32 operands get their own list."""
    if not _dispatch.compiled(x):
        return [interpreter]
    limit = _dispatch.max_shared(x.device) - (8 << 10)
    return [c for c in (_FP32_CONFIGS if x.dtype == torch.float32 else configs) if smem(c) <= limit]


def _pipeline_bytes(c: dict, es: int, operands: int, d_pow2: int, q_once: bool) -> int:
    """Shared memory of the copy pipeline: num_stages (BLOCK_M + BLOCK_N) x BLOCK_K slices, or
    with the query tile loaded once, that tile and num_stages key tiles of the whole width."""
    if q_once:
        return operands * es * d_pow2 * (c["BLOCK_M"] + c["num_stages"] * c["BLOCK_N"])
    return operands * es * c["num_stages"] * c["BLOCK_K"] * (c["BLOCK_M"] + c["BLOCK_N"])


def _num_splits(n: int, N: int, x: torch.Tensor) -> int:
    """Key-range splits so that a small n still fills the GPU (about two programs per SM)."""
    if not _dispatch.compiled(x):
        return 1
    want = triton.cdiv(2 * _dispatch.sm_count(x.device), triton.cdiv(n, 64))
    return max(1, min(want, triton.cdiv(N, 128)))  # at least two 64-key tiles per split


def _dot_options(x: torch.Tensor) -> dict:
    compiled = _dispatch.compiled(x)
    upcast = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not compiled)
    tf32 = x.dtype != torch.float32 or (compiled and torch.backends.cuda.matmul.allow_tf32)
    return dict(UPCAST=upcast, INPUT_PRECISION="tf32" if tf32 else "ieee")


def _row_blocks(D: int, x: torch.Tensor) -> dict:
    """Row-kernel blocks: BLOCK_R rows walk their positives together, BLOCK_P at a time."""
    if _dispatch.compiled(x):
        return dict(BLOCK_R=16, BLOCK_P=4, BLOCK_D=min(max(next_pow2(D), 16), 64), num_warps=4)
    return dict(BLOCK_R=128, BLOCK_P=32, BLOCK_D=min(max(next_pow2(D), 16), 64))


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) on CUDA


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated in fp32 and returned in fp32; low-precision inputs stay on the tensor
    cores through torch.mm's out_dtype where this torch and device have it."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError, TypeError):
            _MM_OUT_DTYPE = False  # not for this dtype or device: upcast from now on
    return a.float() @ b.float()


def similarity_forward(q_nD, k_ND, qid_n, kid_N, qm_nD, km_ND, kind, tau, margin, lam, eps, alpha,
                       gamma):
    """Per-row loss (n,) and what the backward needs: (loss_n, rowv_Rn, perm_N, range_2n)."""
    (n, D), N = q_nD.shape, k_ND.shape[0]
    has_mom = qm_nD is not None
    qm_nD, km_ND = (qm_nD, km_ND) if has_mom else (q_nD, k_ND)
    a_neg = kind in ("sdm", "bsdm")
    splits = _num_splits(n, N, q_nD)
    stats = torch.empty(splits, _NSTAT, n, dtype=torch.float32, device=q_nD.device)
    d_pow2 = max(16, next_pow2(D))
    dot = _dot_options(q_nD)
    # an IEEE fp32 dot (no tensor cores) holds its operands in registers: a whole-width query
    # tile would spill, so that one always slices
    q_once = d_pow2 <= _Q_ONCE_MAX_D and dot["INPUT_PRECISION"] != "ieee"
    consts = dict(D_POW2=d_pow2 if q_once else 16,  # unused when slicing: one variant for every D
                  Q_ONCE=q_once, A_NEG=a_neg, HAS_MOMENTUM=has_mom, **dot)
    configs = _candidates(q_nD, _STATS_CONFIGS, _INTERPRETER_STATS, lambda c: _pipeline_bytes(
        c, q_nD.element_size(), 1 + has_mom, d_pow2, q_once))
    args = (q_nD, k_ND, qm_nD, km_ND, qid_n, kid_N, stats, n, N, D, splits,
            q_nD.stride(0), k_ND.stride(0), qm_nD.stride(0), km_ND.stride(0), LOG2E / tau)
    _dispatch.launch(_similarity_stats_kernel, lambda c: (triton.cdiv(n, c["BLOCK_M"]), splits),
                     args, consts, configs, ("stats", n, N, D, q_nD.dtype, *consts.values()))

    kid_sorted, perm = torch.sort(kid_N)
    loss = torch.empty(n, dtype=torch.float32, device=q_nD.device)
    rowv = torch.empty(_NROWV, n, dtype=torch.float32, device=q_nD.device)
    ranges = torch.empty(2, n, dtype=torch.int64, device=q_nD.device)
    args = (q_nD, k_ND, qid_n, kid_sorted, perm, stats, loss, rowv, ranges, n, N, D, splits,
            N.bit_length(),
            q_nD.stride(0), k_ND.stride(0), 1.0 / tau, tau, margin, lam, eps, math.log(eps), alpha,
            gamma)
    consts = dict(KIND=KINDS.index(kind), A_NEG=a_neg, HAS_MOMENTUM=has_mom)
    _dispatch.launch(_similarity_rows_kernel, lambda c: (triton.cdiv(n, c["BLOCK_R"]),), args,
                     consts, [_row_blocks(D, q_nD)])
    return loss, rowv, perm, ranges


def similarity_backward(q_nD, k_ND, kid_N, qm_nD, km_ND, perm, range_2n, rowv_Rn, dloss_n,
                        tau) -> tuple[torch.Tensor, torch.Tensor]:
    """dQ and dK, one row chunk at a time: the kernels write g (C x N) from the row vector and
    the upstream gradient, two matmuls consume it; dK is summed over chunks in fp32."""
    (n, D), N = q_nD.shape, k_ND.shape[0]
    has_mom = qm_nD is not None
    qm_nD, km_ND = (qm_nD, km_ND) if has_mom else (q_nD, k_ND)
    dloss_n = dloss_n.float()
    consts = dict(HAS_MOMENTUM=has_mom, **_dot_options(q_nD))
    configs = _candidates(q_nD, _GRAD_CONFIGS, _INTERPRETER_GRAD, lambda c: _pipeline_bytes(
        c, q_nD.element_size(), 1 + has_mom, D, False))
    blocks = _row_blocks(D, q_nD)
    rows = max(1, _BWD_CHUNK_BYTES // max(1, N * q_nD.element_size()))
    chunk = min(n, max(64, rows // 64 * 64))  # whole 64-row tiles
    g_CN = torch.empty(chunk, N, dtype=q_nD.dtype, device=q_nD.device)
    dq_nD = torch.empty_like(q_nD)
    dk_ND = None
    strides = (q_nD.stride(0), k_ND.stride(0), qm_nD.stride(0), km_ND.stride(0), rowv_Rn.stride(0),
               dloss_n.stride(0), g_CN.stride(0))
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        C, g = r1 - r0, g_CN[: r1 - r0]
        rows_of = (q_nD[r0:r1], k_ND, qm_nD[r0:r1], km_ND)
        _dispatch.launch(
            _similarity_grad_kernel,
            lambda c, C=C: (triton.cdiv(C, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"])),
            (*rows_of, kid_N, rowv_Rn[:, r0:r1], dloss_n[r0:r1], g, C, N, D, *strides, 1.0 / tau),
            consts, configs, ("grad", C, N, D, q_nD.dtype, has_mom))
        _dispatch.launch(
            _similarity_grad_pos_kernel, lambda c, C=C: (triton.cdiv(C, c["BLOCK_R"]),),
            (perm, range_2n[:, r0:r1], rowv_Rn[:, r0:r1], dloss_n[r0:r1], g, *rows_of, C, D,
             range_2n.stride(0), *strides, 1.0 / tau),
            dict(HAS_MOMENTUM=has_mom), [blocks])
        torch.mm(g, k_ND, out=dq_nD[r0:r1])
        if C == n:  # one chunk: one matmul, rounded once
            dk_ND = g.T @ q_nD
        else:  # several chunks: accumulate in fp32, cast once
            part = _mm_fp32(g.T, q_nD[r0:r1])
            dk_ND = part if dk_ND is None else dk_ND.add_(part)
    return dq_nD, dk_ND.to(k_ND.dtype)


class SimilarityLossFunction(torch.autograd.Function):
    """Fused forward (row statistics only) and chunked, tile-recomputing backward."""

    @staticmethod
    def forward(ctx, q_nD, k_ND, qid_n, kid_N, qm_nD, km_ND, kind, tau, margin, lam, eps,
                alpha, gamma):
        loss_n, rowv, perm, ranges = similarity_forward(
            q_nD, k_ND, qid_n, kid_N, qm_nD, km_ND, kind, tau, margin, lam, eps, alpha, gamma)
        ctx.save_for_backward(q_nD, k_ND, kid_N, qm_nD, km_ND, perm, ranges, rowv)
        ctx.tau = tau
        return loss_n

    @staticmethod
    def backward(ctx, dloss_n):
        dq, dk = similarity_backward(*ctx.saved_tensors, dloss_n, ctx.tau)
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


@_dispatch.interceptable("similarity")
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
