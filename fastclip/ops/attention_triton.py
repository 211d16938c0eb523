"""Triton kernels for `fastclip::attention`: flash-attention forward and backward for CLIP's shapes.

Algorithm (FlashAttention-2, as in Triton's tutorial 06), adapted to what CLIP needs:

- any sequence length (1, 7, 50, 77, 197, 257, 577, ...): every tile is bounds-masked, so nothing
  assumes a multiple of the block size, in the forward or in the backward;
- any head dim up to 128 (32, 64, 80, 128): the head-dim block is the next power of two and the
  extra lanes are masked to zero on load (80 runs as 128; the padding costs FLOPs, not memory traffic);
- top-left causal mask (key j is visible to query i iff j <= i, as SDPA's `is_causal`);
- optional boolean key padding mask [batch, seq_k], True = padded (ignored), as nn.MultiheadAttention;
- optional per-sequence lengths [batch]: a program whose query block starts past its sequence's end
  writes zeros and exits, key loops stop at the end (CLIP's text tower: captions end long before 77);
- a query row that sees no key at all (every key padded) gets output 0 and log-sum-exp -inf, and
  contributes nothing to any gradient: defined values, never NaN;
- q, k, v, the output gradient and the mask are read through their strides, so views of a fused qkv
  projection need no copy; the output is written in [batch, seq, heads, head_dim] memory order (a
  [batch, heads, seq, head_dim] view), so `out.transpose(1, 2).reshape(b, s, h * d)` is free.

Softmax runs in base 2 (exp2; scores pre-multiplied by scale * log2(e)), all accumulation is fp32, and
the forward saves the natural-log log-sum-exp per query row for the backward, which recomputes the
probability tiles after a preprocess kernel (delta = rowsum(dO * O) - dLSE), on one of two paths (see
`backward_path`): "fused", one kernel per key block that makes S, P and dP once and writes dK, dV and its
share of dQ (5 dots per tile; dQ summed with fp32 atomics into a zeroed buffer, then cast), or "split", a
dK/dV kernel (one program per key block, looping over query blocks) and a dQ kernel (one program per query
block, looping over key blocks): 7 dots per tile, no atomics, deterministic. Every grid is
(batch * heads, blocks along the sequence): axis 0 takes 2^31 - 1 programs, axis 1 only 65535.
On a GPU the kernels take fp16 and bf16. Compiled for fp32 with fp32 accuracy (3xTF32 dots; IEEE dots are
worse) they spill registers in 33 of 44 configs of tiles up to 64x32 (ptxas, sm_80/sm_90), so fp32 goes to
SDPA (`fastclip.ops.attention` dispatches). The interpreter runs fp32 too, which is how the tests hold the
kernels to float64 math.

Importing this module imports Triton and defines the kernels. Triton decides *at definition time*
whether a kernel is compiled or interpreted (`TRITON_INTERPRET=1`, for CPU tensors), so that variable
must be set before this module is first imported; `fastclip.ops.attention` imports it lazily for that
reason. `INTERPRET` records the mode the kernels were defined in.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from fastclip.backends import triton_interpreting

INTERPRET: bool = triton_interpreting()
MAX_HEAD_DIM = 128  # register/shared-memory budget of one [BLOCK, head_dim] tile set; SDPA covers larger

# The kernels spell out log2(e) and ln(2) as literals: plain globals are not visible to jit code.
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_kernel(
    Q, K, V, Mask, Lengths, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, seq_q, seq_k, qk_scale,  # qk_scale = scale * log2(e): scores in base-2 units
    SEQ_Q_BUCKET, SEQ_K_BUCKET,  # autotune keys only (power-of-two buckets of the lengths)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: axis 1 stops at 65535
    pid_m = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)  # int64: batch offsets of big fused-qkv views pass 2^31
    off_h = (pid_bh % num_heads).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM  # head-dim padding lanes (80 -> 128) load as 0 and are never stored

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    mask_base = Mask + off_b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    q_end, k_end = _sequence_ends(Lengths, off_b, seq_q, seq_k, HAS_LENGTHS)
    full_hi, hi = _key_range(start_m, q_end, k_end, CAUSAL, HAS_LENGTHS, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d, d_ok,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, k_end, qk_scale,
            CAUSAL, HAS_MASK, False,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d, d_ok,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, k_end, qk_scale,
            CAUSAL, HAS_MASK, True,
        )

    # l_i == 0 only for a row that saw no key (l_i >= 1 otherwise: the max term is exp2(0)); rows past
    # the sequence's length are empty by definition (with causal they saw the keys before them).
    empty = l_i == 0.0
    if HAS_LENGTHS:
        empty = empty | (offs_m >= q_end)
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # natural log
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)


@triton.jit
def _sequence_ends(Lengths, off_b, seq_q, seq_k, HAS_LENGTHS: tl.constexpr):
    """(query end, key end) of sequence `off_b`: its length clamped to [0, seq], else the full lengths."""
    if HAS_LENGTHS:
        length = tl.maximum(tl.load(Lengths + off_b), 0)
        return tl.minimum(length, seq_q), tl.minimum(length, seq_k)
    else:
        return seq_q, seq_k


@triton.jit
def _key_range(start_m, q_end, k_end, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_hi, hi) for the query block at start_m: key blocks [0, full_hi) need no bounds or causal
    mask, [full_hi, hi) do. A causal query block sees keys up to its last row only, and a key block is
    wholly visible iff its last key <= start_m. A block past its sequence's length reads no key."""
    if CAUSAL:
        hi = tl.minimum(k_end, start_m + BLOCK_M)
        full_hi = (tl.minimum(k_end, start_m + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = k_end
        full_hi = (k_end // BLOCK_N) * BLOCK_N
    if HAS_LENGTHS:
        hi = tl.where(start_m < q_end, hi, 0)
        full_hi = tl.minimum(full_hi, hi)
    return full_hi, hi


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d, d_ok,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, seq_k, qk_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
):
    """One key block of the online softmax; MASKED tiles apply the bounds and causal masks."""
    cols = start_n + offs_n
    col_ok = cols < seq_k
    kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASKED:
        kt = tl.load(kt_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    else:
        kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    s = tl.dot(q, kt) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
    if MASKED:
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
    if HAS_MASK:
        padded = tl.load(mask_base + cols * stride_mn, mask=col_ok, other=1)
        s = tl.where(padded[None, :] != 0, float("-inf"), s)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no visible key so far has m_new = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


# --------------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_preprocess(
    Out, DO, DLse, Delta, DQAcc,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_ab, stride_ah, stride_am, stride_ad,
    num_heads, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, ZERO_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id - dLSE_i: the softmax-backward row term (dLSE folds in the lse's gradient).
    ZERO_DQ: also zero the same rows of the fused backward's fp32 dQ sum, which saves that path a launch."""
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: axis 1 stops at 65535
    pid_m = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = (offs_m < seq_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=tile_ok, other=0.0)
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    do = tl.load(do_ptrs, mask=tile_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = pid_bh.to(tl.int64) * seq_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + rows, mask=offs_m < seq_q, other=0.0)
    tl.store(Delta + rows, delta, mask=offs_m < seq_q)
    if ZERO_DQ:
        acc = DQAcc + off_b * stride_ab + off_h * stride_ah + offs_m[:, None] * stride_am + offs_d[None, :] * stride_ad
        tl.store(acc, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=tile_ok)


@triton.jit
def _load_row_stats(Lse, Delta, rows, rows_ok):
    """Base-2 lse and delta per row. A row that saw no key (lse = -inf) gets +inf, so all its P are 0
    rather than inf (its keys are all padded, so the mask would discard them anyway: belt and braces)."""
    lse = tl.load(Lse + rows, mask=rows_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + rows, mask=rows_ok, other=0.0)
    return lse2, delta


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Mask, Lengths, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_heads, seq_q, seq_k, qk_scale, scale,
    SEQ_Q_BUCKET, SEQ_K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV for one key block: dV = P^T dO, dK = scale * dS^T Q with dS = P * (dP - delta), dP = dO V^T."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < seq_k
    d_ok = offs_d < HEAD_DIM
    kv_ok = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_ok, other=0.0)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    stats_base = pid_bh.to(tl.int64) * seq_q
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Rows past the query end load q = dO = 0 and lse = +inf, so their P is 0 and they add nothing: only
    # the query blocks that straddle the causal diagonal need an explicit mask. Causal: rows >= start_n
    # only. A key block past its sequence's length reads no query.
    q_end, k_end = _sequence_ends(Lengths, off_b, seq_q, seq_k, HAS_LENGTHS)
    if HAS_LENGTHS:
        q_end = tl.where(start_n < k_end, q_end, 0)
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(lo + tl.cdiv(start_n + BLOCK_N - lo, BLOCK_M) * BLOCK_M, tl.cdiv(q_end, BLOCK_M) * BLOCK_M)
        mid = tl.maximum(mid, lo)  # a key block past the last query (seq_k > seq_q): both loops empty
    else:
        lo = 0
        mid = 0
    for start_m in range(lo, mid, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(
            dk, dv, k, v, q_base, do_base, Lse, Delta, stats_base, start_m, offs_m, offs_n, offs_d, d_ok,
            stride_qm, stride_qd, stride_dom, stride_dod, q_end, qk_scale, True,
        )
    for start_m in range(mid, q_end, BLOCK_M):
        dk, dv = _bwd_dkdv_tile(
            dk, dv, k, v, q_base, do_base, Lse, Delta, stats_base, start_m, offs_m, offs_n, offs_d, d_ok,
            stride_qm, stride_qd, stride_dom, stride_dod, q_end, qk_scale, False,
        )

    dk = dk * scale
    if HAS_LENGTHS:  # keys past the length are ignored: no gradient (their rows above hold stray sums)
        dk = tl.where(offs_n[:, None] < k_end, dk, 0.0)
        dv = tl.where(offs_n[:, None] < k_end, dv, 0.0)
    if HAS_MASK:
        # A padded key has P = 0 in every row, so its gradients are 0. Rows of dK/dV are independent, so
        # selecting here (not multiplying) also discards any overflow computed for those keys above.
        padded = tl.load(Mask + off_b * stride_mb + offs_n * stride_mn, mask=col_ok, other=1)
        dk = tl.where(padded[:, None] != 0, 0.0, dk)
        dv = tl.where(padded[:, None] != 0, 0.0, dv)
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bwd_dkdv_tile(
    dk, dv, k, v, q_base, do_base, Lse, Delta, stats_base, start_m, offs_m, offs_n, offs_d, d_ok,
    stride_qm, stride_qd, stride_dom, stride_dod, seq_q, qk_scale,
    CAUSAL_TILE: tl.constexpr,
):
    rows = start_m + offs_m
    rows_ok = rows < seq_q
    tile_ok = rows_ok[None, :] & d_ok[:, None]
    qt = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd, mask=tile_ok, other=0.0)  # (D, M)
    dot_ = tl.load(do_base + rows[None, :] * stride_dom + offs_d[:, None] * stride_dod, mask=tile_ok, other=0.0)
    lse2, delta = _load_row_stats(Lse, Delta, stats_base + rows, rows_ok)
    st = tl.dot(k, qt) * qk_scale  # (BLOCK_N, BLOCK_M): S^T, base 2
    pt = tl.exp2(st - lse2[None, :])
    if CAUSAL_TILE:
        pt = tl.where(offs_n[:, None] <= rows[None, :], pt, 0.0)
    dv = tl.dot(pt.to(dot_.dtype), tl.trans(dot_), dv)
    dpt = tl.dot(v, dot_)  # (BLOCK_N, BLOCK_M): (dO V^T)^T
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)
    return dk, dv


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Mask, Lengths, DO, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_heads, seq_q, seq_k, qk_scale, scale,
    SEQ_Q_BUCKET, SEQ_K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ for one query block: dQ = scale * dS K, looping over key blocks like the forward."""
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: axis 1 stops at 65535
    pid_m = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    d_ok = offs_d < HEAD_DIM
    tile_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=tile_ok, other=0.0)
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    do = tl.load(do_ptrs, mask=tile_ok, other=0.0)
    lse2, delta = _load_row_stats(Lse, Delta, pid_bh.to(tl.int64) * seq_q + offs_m, row_ok)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    mask_base = Mask + off_b * stride_mb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Same split as the forward. Here bounds masking of keys is essential: a key past the end loads as 0,
    # its P = exp2(-lse) can overflow, and inf * 0 in dS @ K would poison the whole row of dQ. Rows past
    # the query end have lse = -inf (P = 0), so they get dQ = 0.
    q_end, k_end = _sequence_ends(Lengths, off_b, seq_q, seq_k, HAS_LENGTHS)
    full_hi, hi = _key_range(start_m, q_end, k_end, CAUSAL, HAS_LENGTHS, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_hi, BLOCK_N):
        dq = _bwd_dq_tile(
            dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d, d_ok,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, k_end, qk_scale,
            CAUSAL, HAS_MASK, False,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _bwd_dq_tile(
            dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d, d_ok,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, k_end, qk_scale,
            CAUSAL, HAS_MASK, True,
        )
    dq = dq * scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=tile_ok)


@triton.jit
def _bwd_dq_tile(
    dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d, d_ok,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, seq_k, qk_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
):
    cols = start_n + offs_n
    col_ok = cols < seq_k
    kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vt_ptrs = v_base + cols[None, :] * stride_vn + offs_d[:, None] * stride_vd
    if MASKED:
        kt = tl.load(kt_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        vt = tl.load(vt_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    else:
        kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
        vt = tl.load(vt_ptrs, mask=d_ok[:, None], other=0.0)
    s = tl.dot(q, kt) * qk_scale
    p = tl.exp2(s - lse2[:, None])  # (BLOCK_M, BLOCK_N)
    if MASKED:
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None])
        p = tl.where(visible, p, 0.0)
    if HAS_MASK:
        padded = tl.load(mask_base + cols * stride_mn, mask=col_ok, other=1)
        p = tl.where(padded[None, :] != 0, 0.0, p)
    dp = tl.dot(do, vt)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(kt.dtype), tl.trans(kt), dq)


@triton.jit
def _bwd_fused_kernel(
    Q, K, V, Mask, Lengths, DO, Lse, Delta, DQ, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_heads, seq_q, seq_k, qk_scale, scale,
    SEQ_Q_BUCKET, SEQ_K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block and its share of dQ, with S, P and dP made once per tile (5 dots, not the
    split path's 7). dQ = scale * dS K is added across key blocks with fp32 atomics into DQ, which the
    caller zeroes; the summation order then varies from run to run (not deterministic)."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < seq_k
    d_ok = offs_d < HEAD_DIM
    kv_ok = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_ok, other=0.0)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    dq_base = DQ + off_b * stride_dqb + off_h * stride_dqh
    stats_base = pid_bh.to(tl.int64) * seq_q
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Unlike dK/dV alone, dQ sums over keys, so a key that is hidden (past the end, past the length,
    # padded) must have P = 0 in every tile: its stray P could be inf, and inf * 0 would poison dQ.
    q_end, k_end = _sequence_ends(Lengths, off_b, seq_q, seq_k, HAS_LENGTHS)
    key_ok = offs_n < k_end
    if HAS_MASK:
        padded = tl.load(Mask + off_b * stride_mb + offs_n * stride_mn, mask=col_ok, other=1)
        key_ok = key_ok & (padded == 0)
    if HAS_LENGTHS:
        q_end = tl.where(start_n < k_end, q_end, 0)
    # The query blocks as in the dK/dV kernel: only those straddling the causal diagonal need its mask.
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(lo + tl.cdiv(start_n + BLOCK_N - lo, BLOCK_M) * BLOCK_M, tl.cdiv(q_end, BLOCK_M) * BLOCK_M)
        mid = tl.maximum(mid, lo)
    else:
        lo = 0
        mid = 0
    for start_m in range(lo, mid, BLOCK_M):
        dk, dv = _bwd_fused_tile(
            dk, dv, k, v, key_ok, q_base, do_base, dq_base, Lse, Delta, stats_base, start_m, offs_m, offs_n,
            offs_d, d_ok, stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd, q_end, qk_scale,
            scale, True,
        )
    for start_m in range(mid, q_end, BLOCK_M):
        dk, dv = _bwd_fused_tile(
            dk, dv, k, v, key_ok, q_base, do_base, dq_base, Lse, Delta, stats_base, start_m, offs_m, offs_n,
            offs_d, d_ok, stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd, q_end, qk_scale,
            scale, False,
        )
    # Hidden keys had P = 0 throughout, so their rows of dK and dV are already 0.
    dk = dk * scale
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bwd_fused_tile(
    dk, dv, k, v, key_ok, q_base, do_base, dq_base, Lse, Delta, stats_base, start_m, offs_m, offs_n, offs_d, d_ok,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd, seq_q, qk_scale, scale,
    CAUSAL_TILE: tl.constexpr,
):
    """One query block against the resident key block: dK, dV accumulate in registers, dQ goes out by atomics."""
    rows = start_m + offs_m
    rows_ok = rows < seq_q
    tile_ok = rows_ok[None, :] & d_ok[:, None]
    qt = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd, mask=tile_ok, other=0.0)  # (D, M)
    dot_ = tl.load(do_base + rows[None, :] * stride_dom + offs_d[:, None] * stride_dod, mask=tile_ok, other=0.0)
    lse2, delta = _load_row_stats(Lse, Delta, stats_base + rows, rows_ok)
    st = tl.dot(k, qt) * qk_scale  # (BLOCK_N, BLOCK_M): S^T, base 2
    pt = tl.exp2(st - lse2[None, :])
    visible = key_ok[:, None]
    if CAUSAL_TILE:
        visible = visible & (offs_n[:, None] <= rows[None, :])
    pt = tl.where(visible, pt, 0.0)
    dv = tl.dot(pt.to(dot_.dtype), tl.trans(dot_), dv)
    dpt = tl.dot(v, dot_)  # (BLOCK_N, BLOCK_M): (dO V^T)^T
    dst = (pt * (dpt - delta[None, :])).to(qt.dtype)
    dk = tl.dot(dst, tl.trans(qt), dk)
    dq = tl.dot(tl.trans(dst), k) * scale  # (BLOCK_M, BLOCK_D): this key block's share of dQ
    # relaxed: the sum is read only by a later kernel, so no ordering between the adds is needed.
    tl.atomic_add(dq_base + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq,
                  mask=rows_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


# ------------------------------------------------------------------------------------- tuning + launchers

# (BLOCK_M, BLOCK_N, num_warps, num_stages). CLIP's sequences are short (50-577) and batches large
# (thousands of heads), so parallelism comes from batch * heads and the cost of a partial last tile
# matters more than peak tile throughput: small and medium tiles first, 128 only for the long lengths.
_FWD_CONFIGS = [(32, 32, 4, 2), (32, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3),
                (128, 32, 8, 3), (128, 64, 8, 3), (64, 128, 8, 2), (128, 128, 8, 2)]
_DKDV_CONFIGS = [(32, 32, 4, 2), (32, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2),
                 (32, 128, 8, 2), (64, 128, 8, 2)]
_DQ_CONFIGS = [(32, 32, 4, 2), (32, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2),
               (128, 32, 8, 3), (128, 64, 8, 2)]
# The fused backward keeps a key block resident like dK/dV, and a dQ tile per step besides: dK/dV's candidates
# plus 8-warp small tiles, the only ones that fit sm_80's registers at head dim 80/128 (tools/check_triton_compile.py).
_FUSED_CONFIGS = [(32, 32, 4, 2), (32, 32, 8, 2), (32, 64, 4, 3), (32, 64, 8, 2), (64, 32, 4, 3), (64, 32, 8, 2),
                  (64, 64, 4, 3), (64, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 2)]

# Configs that spill registers, per (kernel, GPU family, BLOCK_D): measured with bf16 and fp16 inputs,
# Triton 3.6 and 3.9, by tools/check_triton_compile.py (ptxas -v; spill bytes noted are the worst case).
# A spill puts accumulator or operand values in local memory inside the key/query loop, so such a config
# is slower than a smaller tile that fits: it is never compiled or timed. The sets are irregular (ptxas's
# allocation is not monotonic in the tile size), hence lists rather than a register formula.
_SPILLS: dict[tuple[str, int, int], set[tuple[int, int, int, int]]] = {
    # sm_80 forward: odd cases of 4-32 B (Triton 3.9); at head dim 80 (BLOCK_D 128) with lengths, 4-12 B.
    ("fwd", 80, 32): {(64, 64, 4, 3), (128, 64, 8, 3)},
    ("fwd", 80, 128): {(128, 64, 8, 3), (32, 64, 4, 3), (64, 64, 8, 3)},
    # sm_90 forward: a 64x128 score tile at head dim 64 (8 B); at 128 the 4-warp tiles (4-52 B).
    ("fwd", 90, 64): {(64, 128, 8, 2)},
    ("fwd", 90, 128): {(32, 32, 4, 2), (32, 64, 4, 3), (64, 64, 4, 3)},
    # sm_80 dK/dV holds k, v, dk and dv of a whole key block besides the score tiles: at head dims 32 and
    # 64 most 64-row query blocks spill (12-296 B); at 128 the 128-key blocks and 64x64/4 warps (188-16188 B).
    ("dkdv", 80, 32): {(64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2),
                       (32, 32, 4, 2)},  # the last with lengths, Triton 3.6 (4 B)
    ("dkdv", 80, 64): {(32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2)},
    ("dkdv", 80, 128): {(32, 128, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2)},
    # sm_90 dK/dV fits up to head dim 64; at 128 all but 64x32/4 warps and 64x64/8 warps spill (16-248 B).
    ("dkdv", 90, 128): {(32, 32, 4, 2), (32, 64, 4, 3), (32, 128, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2)},
    # sm_80 dQ holds q, dO and dq of a query block: 64x64 and 128x64 tiles spill at head dim 64 (8-32 B),
    # 64x64/4 warps and the 128-row tiles at 128 (12-716 B).
    ("dq", 80, 32): {(64, 64, 4, 3)},  # with lengths (4 B)
    ("dq", 80, 64): {(64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2)},
    ("dq", 80, 128): {(64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2)},
    ("dq", 90, 32): {(32, 64, 4, 3)},  # causal with mask and lengths (255 registers, 28 B)
    # The fused backward holds dK/dV's key block and a dQ tile besides. sm_80: at head dim 64 the 64-row
    # query blocks and 32x64/4 warps spill (8-812 B); at 128 everything with 4 warps or a 64x64+ tile
    # (44-5904 B), leaving the 8-warp small tiles. sm_90: 64x64/4 warps and 64x128 from head dim 64 on
    # (24-68 B), at 128 also 32x64/4 warps and 64x64/8 warps (148-724 B).
    ("fused", 80, 64): {(32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2)},
    ("fused", 80, 128): {(32, 32, 4, 2), (32, 64, 4, 3), (32, 128, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3),
                         (64, 64, 8, 2), (64, 128, 8, 2)},
    ("fused", 90, 64): {(64, 64, 4, 3), (64, 128, 8, 2)},
    ("fused", 90, 128): {(32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2)},
}
# Hopper's warpgroup MMA (wgmma) works on 64-row blocks: a program whose resident block (the queries of
# the forward and dQ, the keys of dK/dV) has fewer rows compiles to Ampere's mma.sync on sm_90 (read from
# the PTX by tools/check_triton_compile.py), so those configs are not timed there.
_WGMMA_MIN_ROWS = 64
# Under the interpreter: one fixed config, no benchmarking (fast and reproducible on a CPU).
INTERPRET_BLOCK = (32, 32)
_AUTOTUNE_KEY = ["SEQ_Q_BUCKET", "SEQ_K_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_MASK", "HAS_LENGTHS"]


def _configs(table: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    if INTERPRET:
        m, n = INTERPRET_BLOCK
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


def _config_key(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _arch_family(q) -> int:
    """The rule family of Q's GPU: 80 (Ampere, Ada: mma.sync) or 90 (Hopper and newer), 0 if not CUDA.

    The rules were measured on sm_80 and sm_90; other GPUs follow the nearest (sm_86/89 have less shared
    memory: a config over it fails to launch and Triton's autotuner skips it). CPU tensors (the
    interpreter) get no rule.
    """
    if not isinstance(q, torch.Tensor) or q.device.type != "cuda":
        return 0
    return 90 if torch.cuda.get_device_capability(q.device)[0] >= 9 else 80


def _prune(
    configs: list[triton.Config], named_args: dict, *, kernel: str = "", arch: int | None = None, **kwargs,
) -> list[triton.Config]:
    """The configs worth compiling and timing for one launch of `kernel` ("fwd", "dkdv", "dq" or "fused").

    Drops, in order: the largest tiles at head dim 128, configs that spill registers on the GPU's family
    (`_SPILLS`), on sm_90 blocks too small for wgmma, and then tiles longer than the sequence (pure
    waste). If the length leaves nothing, the smallest usable tile runs. `arch` overrides the family
    read from Q's device (the ahead-of-time compile check runs without a GPU).
    """
    seq_q = max(16, named_args.get("SEQ_Q_BUCKET", kwargs.get("SEQ_Q_BUCKET", 16)))
    seq_k = max(16, named_args.get("SEQ_K_BUCKET", kwargs.get("SEQ_K_BUCKET", 16)))
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    q = named_args.get("Q", kwargs.get("Q"))
    family = _arch_family(q) if arch is None else arch
    dropped = _SPILLS.get((kernel, family, block_d), set())
    max_tile = 64 * 64 * 2 if block_d >= 128 else None  # the largest tiles at head dim 128
    usable = [
        c for c in configs
        if _config_key(c) not in dropped and (max_tile is None or _area(c) <= max_tile)
    ] or configs  # never empty: with every config ruled out, run one rather than fail
    if family >= 90:
        usable = [c for c in usable if _resident_rows(kernel, c) >= _WGMMA_MIN_ROWS] or usable
    kept = [c for c in usable if c.kwargs["BLOCK_M"] <= seq_q and c.kwargs["BLOCK_N"] <= seq_k]
    return kept or [min(usable, key=_area)]


def _area(config: triton.Config) -> int:
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]


def _resident_rows(kernel: str, config: triton.Config) -> int:
    """Rows of the block a program keeps (the M of its dots): keys for dK/dV and the fused backward (4 of its
    5 dots), queries otherwise."""
    return config.kwargs["BLOCK_N" if kernel in ("dkdv", "fused") else "BLOCK_M"]


def _tuned(kernel, table: list[tuple[int, int, int, int]], name: str, reset_to_zero: list[str] | None = None):
    """The autotuned kernel; `reset_to_zero` names accumulators that each timed run must start from zero."""
    prune = functools.partial(_prune, kernel=name)
    tune = triton.autotune(
        configs=_configs(table), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune},
        reset_to_zero=reset_to_zero,
    )
    return tune(kernel)


_fwd_tuned = _tuned(_fwd_kernel, _FWD_CONFIGS, "fwd")
_dkdv_tuned = _tuned(_bwd_dkdv_kernel, _DKDV_CONFIGS, "dkdv")
_dq_tuned = _tuned(_bwd_dq_kernel, _DQ_CONFIGS, "dq")
_fused_tuned = _tuned(_bwd_fused_kernel, _FUSED_CONFIGS, "fused", reset_to_zero=["DQ"])


def autotuned_kernels() -> dict[str, triton.runtime.Autotuner]:
    """The autotuned kernels by name; each one's `.cache` maps an autotune key to the config it chose."""
    return {"fwd": _fwd_tuned, "dkdv": _dkdv_tuned, "dq": _dq_tuned, "fused": _fused_tuned}
_PREPROCESS_BLOCK = 64


def _bucket(n: int) -> int:
    """The smallest power of two >= n (n >= 1). Plain Python: triton.next_power_of_2 is a constexpr function
    whose call wrapper costs microseconds, several times per launch."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# CUDA's grid limits: axis 0 takes 2^31 - 1 programs, axes 1 and 2 only 65535. batch * heads reaches
# 65536 at ViT-L/14 with batch 4096, so it goes on axis 0 and the blocks along the sequence on axis 1.
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65535


def launch_grid(batch_heads: int, length: int, block: int) -> tuple[int, int]:
    """(batch * heads, blocks of `block` along `length`): the grid of every attention kernel."""
    blocks = -(-length // block)  # ceil division (triton.cdiv's call wrapper is slow on the launch path)
    if batch_heads > MAX_GRID_X:
        raise ValueError(f"batch * heads = {batch_heads} exceeds the {MAX_GRID_X} programs a CUDA grid axis takes; "
                         "split the batch")
    if blocks > MAX_GRID_Y:
        raise ValueError(f"a sequence of {length} tokens needs {blocks} blocks of {block}, over CUDA's "
                         f"{MAX_GRID_Y}; use backend='torch'")
    return batch_heads, blocks


def _device_guard(t: torch.Tensor):
    """Launch on t's GPU, not the current one (a model on cuda:1 without torch.cuda.set_device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _mask_arg(key_padding_mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
    """The mask as uint8 (a free reinterpretation of bool) with its strides; a dummy pointer when absent."""
    if key_padding_mask is None:
        return like, 0, 0, False
    mask = key_padding_mask.view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1), True


def _lengths_arg(lengths: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The per-sequence lengths as int32 (the kernels clamp them to [0, seq]); a dummy pointer when absent."""
    if lengths is None:
        return like, False
    return lengths.to(torch.int32).contiguous(), True


def _block_kwargs(block: tuple[int, int] | None) -> dict:
    if block is None:
        return {}
    return {"BLOCK_M": block[0], "BLOCK_N": block[1], "num_warps": 4, "num_stages": 1 if INTERPRET else 2}


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    block: tuple[int, int] | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [b, h, s_q, d] (stored as [b, s_q, h, d]) and fp32 log-sum-exp [b, h, s_q] of checked inputs.

    `block=(BLOCK_M, BLOCK_N)` bypasses the autotuner (tests use it to exercise other tilings).
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    out = torch.empty((batch, seq_q, heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    mask, stride_mb, stride_mn, has_mask = _mask_arg(key_padding_mask, q)
    lengths, has_lengths = _lengths_arg(lengths, q)
    kernel = _fwd_tuned if block is None else _fwd_kernel
    with _device_guard(q):
        kernel[lambda meta: launch_grid(batch * heads, seq_q, meta["BLOCK_M"])](
            q, k, v, mask, lengths, out, lse,
            *q.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *out.stride(),
            heads, seq_q, seq_k, scale * LOG2E, _bucket(seq_q), _bucket(seq_k),
            HEAD_DIM=head_dim, BLOCK_D=max(16, _bucket(head_dim)),
            CAUSAL=causal, HAS_MASK=has_mask, HAS_LENGTHS=has_lengths,
            **_block_kwargs(block),
        )
    return out, lse


# ------------------------------------------------------------------------------------ the backward path

# Two backwards. "fused": one kernel per key block computes S, P and dP once and writes dK, dV and its share
# of dQ (5 dots per tile; dQ summed with fp32 atomics, FlashAttention-2's scheme, which its CUDA code uses on
# sm_80 and sm_90 alike). "split": a dK/dV kernel and a dQ kernel, each recomputing P (7 dots per tile), no
# atomics, so the same inputs give the same bits on every run. Deterministic mode always takes "split".
BACKWARD_PATHS = ("fused", "split")
BACKWARD_PATH_ENV = "FASTCLIP_ATTENTION_BACKWARD"  # "fused" | "split" forces one ("" or "auto": the rule)
# (GPU family, dtype, power-of-two bucket of seq_k) -> the path where it is not the default "fused". Empty
# until measured: the first GPU benchmark (bench_attention.py times both paths) sets it.
BACKWARD_TABLE: dict[tuple[int, torch.dtype, int], str] = {}


def backward_path(q: torch.Tensor, seq_k: int) -> str:
    """The backward that runs for `q` ("fused" or "split"): "split" under torch's deterministic mode, else
    the one FASTCLIP_ATTENTION_BACKWARD forces (read on every call), else BACKWARD_TABLE's, else "fused"."""
    if torch.are_deterministic_algorithms_enabled():
        return "split"
    forced = os.environ.get(BACKWARD_PATH_ENV, "")
    if forced and forced != "auto":
        if forced not in BACKWARD_PATHS:
            raise RuntimeError(f"{BACKWARD_PATH_ENV} must be 'fused', 'split' or 'auto', got {forced!r}")
        return forced
    if not BACKWARD_TABLE:  # no rule yet: skip the device query on the launch path
        return "fused"
    return BACKWARD_TABLE.get((_arch_family(q), q.dtype, _bucket(seq_k)), "fused")


def backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    block: tuple[int, int] | None = None,
    lengths: torch.Tensor | None = None,
    *,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    path: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (like q, k, v) from the output gradient and, optionally, the log-sum-exp's gradient.

    `grads`: three tensors shaped like q, k, v (any strides: the slices of one packed d(qkv)) that the
    kernels write instead of allocating. `path`: "fused" or "split" forces a backward (default:
    `backward_path`).
    """
    if grads is None:
        grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    path = backward_path(q, k.shape[2]) if path is None else path
    if path not in BACKWARD_PATHS:
        raise ValueError(f"path must be one of {BACKWARD_PATHS} or None, got {path!r}")
    with _device_guard(q):
        if path == "fused":
            # fp32 dQ sum in the forward output's [b, s, h, d] memory order, like the slices of a packed
            # d(qkv); uninitialised here: the preprocess zeroes it (the autotuner also does, around its timings).
            batch, heads, seq_q, head_dim = q.shape
            dq_acc = torch.empty((batch, seq_q, heads, head_dim), dtype=torch.float32, device=q.device)
            dq_acc = dq_acc.transpose(1, 2)
            delta = _delta(grad_out, grad_lse, out, lse, dq_acc)
            _fused_backward(grad_out, q, k, v, lse.contiguous(), delta, dq_acc, grads, key_padding_mask, causal,
                            scale, block, lengths)
        else:
            delta = _delta(grad_out, grad_lse, out, lse, None)
            _split_backward(grad_out, q, k, v, lse.contiguous(), delta, grads, key_padding_mask, causal, scale,
                            block, lengths)
    return grads


def _delta(grad_out, grad_lse, out, lse, dq_acc: torch.Tensor | None) -> torch.Tensor:
    """rowsum(dO * O) - dLSE [b, h, s_q] fp32: the softmax backward's row term, one preprocess launch, which
    also zeroes `dq_acc` (the fused path's dQ sum, shaped like out) when given."""
    batch, heads, seq_q, head_dim = out.shape
    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=out.device)
    has_dlse = grad_lse is not None
    dlse = grad_lse.to(torch.float32).contiguous() if has_dlse else delta
    zero_dq = dq_acc is not None
    acc = dq_acc if zero_dq else delta  # a dummy pointer when absent
    acc_strides = dq_acc.stride() if zero_dq else (0, 0, 0, 0)
    _bwd_preprocess[launch_grid(batch * heads, seq_q, _PREPROCESS_BLOCK)](
        out, grad_out, dlse, delta, acc, *out.stride(), *grad_out.stride(), *acc_strides, heads, seq_q,
        HEAD_DIM=head_dim, BLOCK_D=max(16, _bucket(head_dim)), HAS_DLSE=has_dlse, ZERO_DQ=zero_dq,
        BLOCK_M=_PREPROCESS_BLOCK,
    )
    return delta


def _kernel_args(q, k, key_padding_mask, causal, scale, block, lengths) -> tuple[tuple, tuple, dict]:
    """(mask and lengths pointers, shape scalars, constexpr keywords) shared by the backward kernels."""
    batch, heads, seq_q, head_dim = q.shape
    mask, stride_mb, stride_mn, has_mask = _mask_arg(key_padding_mask, q)
    lengths, has_lengths = _lengths_arg(lengths, q)
    constants = dict(
        HEAD_DIM=head_dim, BLOCK_D=max(16, _bucket(head_dim)), CAUSAL=causal, HAS_MASK=has_mask,
        HAS_LENGTHS=has_lengths, **_block_kwargs(block),
    )
    shape_args = (heads, seq_q, k.shape[2], scale * LOG2E, scale, _bucket(seq_q), _bucket(k.shape[2]))
    return (mask, lengths, stride_mb, stride_mn), shape_args, constants


def _split_backward(grad_out, q, k, v, lse, delta, grads, key_padding_mask, causal, scale, block, lengths):
    """The dK/dV kernel (one program per key block) and the dQ kernel (one per query block): deterministic."""
    dq, dk, dv = grads
    (mask, lengths, stride_mb, stride_mn), shape_args, common = _kernel_args(
        q, k, key_padding_mask, causal, scale, block, lengths
    )
    batch_heads, seq_q, seq_k = q.shape[0] * q.shape[1], q.shape[2], k.shape[2]
    dkdv = _dkdv_tuned if block is None else _bwd_dkdv_kernel
    dkdv[lambda meta: launch_grid(batch_heads, seq_k, meta["BLOCK_N"])](
        q, k, v, mask, lengths, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *grad_out.stride(),
        *dk.stride(), *dv.stride(), *shape_args, **common,
    )
    dq_kernel = _dq_tuned if block is None else _bwd_dq_kernel
    dq_kernel[lambda meta: launch_grid(batch_heads, seq_q, meta["BLOCK_M"])](
        q, k, v, mask, lengths, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *grad_out.stride(),
        *dq.stride(), *shape_args, **common,
    )


def _fused_backward(grad_out, q, k, v, lse, delta, dq_acc, grads, key_padding_mask, causal, scale, block, lengths):
    """One kernel per key block, dQ summed into the zeroed fp32 `dq_acc`, then cast into dq."""
    dq, dk, dv = grads
    batch, heads = q.shape[:2]
    (mask, lengths, stride_mb, stride_mn), shape_args, common = _kernel_args(
        q, k, key_padding_mask, causal, scale, block, lengths
    )
    kernel = _fused_tuned if block is None else _bwd_fused_kernel
    kernel[lambda meta: launch_grid(batch * heads, k.shape[2], meta["BLOCK_N"])](
        q, k, v, mask, lengths, grad_out, lse, delta, dq_acc, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *grad_out.stride(),
        *dq_acc.stride(), *dk.stride(), *dv.stride(), *shape_args, **common,
    )
    dq.copy_(dq_acc)
