"""Triton kernels for `fastclip::attention`: flash-attention forward and backward for CLIP's shapes.

Algorithm (FlashAttention-2, as in Triton's tutorial 06), adapted to what CLIP needs:

- any sequence length (1, 7, 50, 77, 197, 257, 577, ...): every tile is bounds-masked, so nothing
  assumes a multiple of the block size, in the forward or in the backward. The ragged end runs in narrow
  tiles of TAIL (16) positions, along the inner loop and as extra programs of the grid, so a 64x64 tiling
  computes 208x208 pairs at 197 tokens, not 256x256 (`benchmarks/bench_attention.py --tiles` tabulates this);
- any head dim up to 128 (32, 64, 80, 128): held as one power-of-two block or two (`head_dim_pieces`: 80
  runs as 64 + 16, two dots per product over the head dim), lanes past the head dim masked to zero on load;
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


# ------------------------------------------------------------------------------------------ shared pieces

# The head dim is held as up to two power-of-two pieces, BLOCK_D lanes and BLOCK_D1 more (0: none): 80 runs
# as 64 + 16, so no dot works on padding lanes, where one 128-lane block would do 60% extra work. Every
# product over the head dim is then two dots (`_dot_pieces`), every product into it two outputs. Without a
# second piece its tensors are stand-ins (the first piece again) that no code reads.


@triton.jit
def _load_piece(base, idx, idx_ok, stride_i, stride_d, COL0: tl.constexpr, WIDTH: tl.constexpr,
                HEAD_DIM: tl.constexpr, CHECK_IDX: tl.constexpr, TRANS: tl.constexpr):
    """Head-dim lanes [COL0, COL0 + WIDTH) of the rows `idx`: [len(idx), WIDTH], or [WIDTH, len(idx)] if TRANS.
    Lanes past HEAD_DIM and (if CHECK_IDX) rows not `idx_ok` load as 0; no mask is built where none is needed."""
    d = COL0 + tl.arange(0, WIDTH)
    if TRANS:
        ptrs = base + idx[None, :] * stride_i + d[:, None] * stride_d
        idx_mask = idx_ok[None, :]
        d_mask = (d < HEAD_DIM)[:, None]
    else:
        ptrs = base + idx[:, None] * stride_i + d[None, :] * stride_d
        idx_mask = idx_ok[:, None]
        d_mask = (d < HEAD_DIM)[None, :]
    if COL0 + WIDTH > HEAD_DIM:
        if CHECK_IDX:
            x = tl.load(ptrs, mask=idx_mask & d_mask, other=0.0)
        else:
            x = tl.load(ptrs, mask=d_mask, other=0.0)
    else:
        if CHECK_IDX:
            x = tl.load(ptrs, mask=idx_mask, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_pieces(base, idx, idx_ok, stride_i, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_D1: tl.constexpr, CHECK_IDX: tl.constexpr, TRANS: tl.constexpr):
    """Both head-dim pieces of the rows `idx` (see `_load_piece`); the second is a stand-in if BLOCK_D1 == 0."""
    x0 = _load_piece(base, idx, idx_ok, stride_i, stride_d, 0, BLOCK_D, HEAD_DIM, CHECK_IDX, TRANS)
    if BLOCK_D1 > 0:
        x1 = _load_piece(base, idx, idx_ok, stride_i, stride_d, BLOCK_D, BLOCK_D1, HEAD_DIM, CHECK_IDX, TRANS)
    else:
        x1 = x0
    return x0, x1


@triton.jit
def _store_pieces(base, idx, idx_ok, stride_i, stride_d, x0, x1, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_D1: tl.constexpr):
    """Store the [len(idx), piece] tiles x0 (and x1) at rows `idx` that are `idx_ok`, lanes below HEAD_DIM."""
    d0 = tl.arange(0, BLOCK_D)
    tl.store(base + idx[:, None] * stride_i + d0[None, :] * stride_d, x0.to(base.dtype.element_ty),
             mask=idx_ok[:, None] & (d0 < HEAD_DIM)[None, :])
    if BLOCK_D1 > 0:
        d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
        tl.store(base + idx[:, None] * stride_i + d1[None, :] * stride_d, x1.to(base.dtype.element_ty),
                 mask=idx_ok[:, None] & (d1 < HEAD_DIM)[None, :])


@triton.jit
def _zero_pieces(ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr):
    """fp32 accumulators of ROWS rows, one per head-dim piece (a stand-in for the second if BLOCK_D1 == 0)."""
    z0 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    if BLOCK_D1 > 0:
        z1 = tl.zeros([ROWS, BLOCK_D1], dtype=tl.float32)
    else:
        z1 = z0
    return z0, z1


@triton.jit
def _dot_pieces(a0, a1, b0, b1, BLOCK_D1: tl.constexpr):
    """a @ b contracted over the head dim, given as pieces [.., D0] [.., D1] @ [D0, ..] [D1, ..]."""
    c = tl.dot(a0, b0)
    if BLOCK_D1 > 0:
        c = tl.dot(a1, b1, c)
    return c


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
               ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_hi, hi) for the ROWS queries at start_m: key blocks [0, full_hi) need no bounds or causal
    mask, [full_hi, hi) do. A causal query block sees keys up to its last row only, and a key block is
    wholly visible iff its last key <= start_m. A block past its sequence's length reads no key."""
    if CAUSAL:
        hi = tl.minimum(k_end, start_m + ROWS)
        full_hi = (tl.minimum(k_end, start_m + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = k_end
        full_hi = (k_end // BLOCK_N) * BLOCK_N
    if HAS_LENGTHS:
        hi = tl.where(start_m < q_end, hi, 0)
        full_hi = tl.minimum(full_hi, hi)
    return full_hi, hi


@triton.jit
def _query_range(start_n, q_end, CAUSAL: tl.constexpr, COLS: tl.constexpr, BLOCK_M: tl.constexpr):
    """(lo, mid, full_end) of the query loop for the COLS keys at start_n: whole query blocks from lo, the
    causal diagonal's in [lo, mid) (masked) and the rest in [mid, full_end); [full_end, q_end) is the ragged
    end, in narrow tiles. Causal: rows >= start_n only (lo is start_n's block)."""
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        diag_end = lo + tl.cdiv(start_n + COLS - lo, BLOCK_M) * BLOCK_M
        full_end = lo + (tl.maximum(q_end - lo, 0) // BLOCK_M) * BLOCK_M
        mid = tl.minimum(diag_end, full_end)
    else:
        lo = 0
        mid = 0
        full_end = (q_end // BLOCK_M) * BLOCK_M
    return lo, mid, full_end


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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """Output and log-sum-exp of BLOCK_M query rows, or of the last TAIL_M-row slice of the ragged end."""
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: axis 1 stops at 65535
    pid_m = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)  # int64: batch offsets of big fused-qkv views pass 2^31
    off_h = (pid_bh % num_heads).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    mask_base = Mask + off_b * stride_mb
    lse_base = Lse + pid_bh.to(tl.int64) * seq_q
    q_end, k_end = _sequence_ends(Lengths, off_b, seq_q, seq_k, HAS_LENGTHS)
    full_blocks = seq_q // BLOCK_M
    if TAIL_M < BLOCK_M:
        if pid_m < full_blocks:
            _fwd_rows(q_base, k_base, v_base, mask_base, o_base, lse_base, pid_m * BLOCK_M, q_end, k_end,
                      stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_om,
                      stride_od, seq_q, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_D1, CAUSAL, HAS_MASK, HAS_LENGTHS,
                      BLOCK_M, BLOCK_N, TAIL_N)
        else:
            _fwd_rows(q_base, k_base, v_base, mask_base, o_base, lse_base,
                      full_blocks * BLOCK_M + (pid_m - full_blocks) * TAIL_M, q_end, k_end,
                      stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_om,
                      stride_od, seq_q, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_D1, CAUSAL, HAS_MASK, HAS_LENGTHS,
                      TAIL_M, BLOCK_N, TAIL_N)
    else:
        _fwd_rows(q_base, k_base, v_base, mask_base, o_base, lse_base, pid_m * BLOCK_M, q_end, k_end,
                  stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_om,
                  stride_od, seq_q, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_D1, CAUSAL, HAS_MASK, HAS_LENGTHS,
                  BLOCK_M, BLOCK_N, TAIL_N)


@triton.jit
def _fwd_rows(
    q_base, k_base, v_base, mask_base, o_base, lse_base, start_m, q_end, k_end,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_om, stride_od,
    seq_q, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
):
    """The forward of the ROWS query rows at start_m: whole key blocks, then the ragged end in TAIL_N-key tiles."""
    offs_m = start_m + tl.arange(0, ROWS)
    row_ok = offs_m < seq_q
    q0, q1 = _load_pieces(q_base, offs_m, row_ok, stride_qm, stride_qd, HEAD_DIM, BLOCK_D, BLOCK_D1, True, False)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([ROWS], dtype=tl.float32)  # running row sum of exp2(score - m_i)
    acc0, acc1 = _zero_pieces(ROWS, BLOCK_D, BLOCK_D1)

    full_hi, hi = _key_range(start_m, q_end, k_end, CAUSAL, HAS_LENGTHS, ROWS, BLOCK_N)
    for start_n in range(0, full_hi, BLOCK_N):
        acc0, acc1, l_i, m_i = _fwd_tile(
            acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, mask_base, start_n, offs_m,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, k_end, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D1, BLOCK_N, CAUSAL, HAS_MASK, False,
        )
    # Masked tiles: whole blocks along a causal diagonal, then the ragged end [tail_lo, hi) in TAIL_N-key
    # tiles, which skip most of a partial block's padding (without a causal mask the masked range is shorter
    # than a block, so the whole-block loop is not even compiled).
    tail_lo = full_hi
    if CAUSAL:
        tail_lo = full_hi + ((hi - full_hi) // BLOCK_N) * BLOCK_N
        for start_n in range(full_hi, tail_lo, BLOCK_N):
            acc0, acc1, l_i, m_i = _fwd_tile(
                acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, mask_base, start_n, offs_m,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, k_end, qk_scale,
                HEAD_DIM, BLOCK_D, BLOCK_D1, BLOCK_N, CAUSAL, HAS_MASK, True,
            )
    for start_n in range(tail_lo, hi, TAIL_N):
        acc0, acc1, l_i, m_i = _fwd_tile(
            acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, mask_base, start_n, offs_m,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, k_end, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D1, TAIL_N, CAUSAL, HAS_MASK, True,
        )

    # l_i == 0 only for a row that saw no key (l_i >= 1 otherwise: the max term is exp2(0)); rows past
    # the sequence's length are empty by definition (with causal they saw the keys before them).
    empty = l_i == 0.0
    if HAS_LENGTHS:
        empty = empty | (offs_m >= q_end)
    l_safe = tl.where(empty, 1.0, l_i)
    out0 = tl.where(empty[:, None], 0.0, acc0 / l_safe[:, None])
    out1 = tl.where(empty[:, None], 0.0, acc1 / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # natural log
    _store_pieces(o_base, offs_m, row_ok, stride_om, stride_od, out0, out1, HEAD_DIM, BLOCK_D, BLOCK_D1)
    tl.store(lse_base + offs_m, lse, mask=row_ok)


@triton.jit
def _fwd_tile(
    acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, mask_base, start_n, offs_m,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, WIDTH: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
):
    """WIDTH keys of the online softmax; MASKED tiles apply the bounds and causal masks."""
    cols = start_n + tl.arange(0, WIDTH)
    col_ok = cols < seq_k
    kt0, kt1 = _load_pieces(k_base, cols, col_ok, stride_kn, stride_kd, HEAD_DIM, BLOCK_D, BLOCK_D1, MASKED, True)
    v0, v1 = _load_pieces(v_base, cols, col_ok, stride_vn, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_D1, MASKED, False)
    s = _dot_pieces(q0, q1, kt0, kt1, BLOCK_D1) * qk_scale  # (ROWS, WIDTH), base 2
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
    acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None])
    if BLOCK_D1 > 0:
        acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None])
    return acc0, acc1, l_i, m_new


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
    ZERO_DQ: also zero the same rows of the fused backward's fp32 dQ sum, which saves that path a launch.
    No dots here, so the head dim is one padded block (masked lanes cost no memory traffic)."""
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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """dK, dV of BLOCK_N keys (or of a TAIL_N-key slice of the ragged end): dV = P^T dO, dK = scale * dS^T Q
    with dS = P * (dP - delta), dP = dO V^T."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    dk_base = DK + off_b * stride_dkb + off_h * stride_dkh
    dv_base = DV + off_b * stride_dvb + off_h * stride_dvh
    mask_base = Mask + off_b * stride_mb
    stats_base = pid_bh.to(tl.int64) * seq_q
    q_end, k_end = _sequence_ends(Lengths, off_b, seq_q, seq_k, HAS_LENGTHS)
    full_blocks = seq_k // BLOCK_N
    if TAIL_N < BLOCK_N:
        if pid_n < full_blocks:
            _dkdv_cols(q_base, k_base, v_base, mask_base, do_base, dk_base, dv_base, Lse, Delta, stats_base,
                       pid_n * BLOCK_N, q_end, k_end, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn,
                       stride_vd, stride_mn, stride_dom, stride_dod, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                       seq_k, qk_scale, scale, HEAD_DIM, BLOCK_D, BLOCK_D1, CAUSAL, HAS_MASK, HAS_LENGTHS,
                       BLOCK_N, BLOCK_M, TAIL_M)
        else:
            _dkdv_cols(q_base, k_base, v_base, mask_base, do_base, dk_base, dv_base, Lse, Delta, stats_base,
                       full_blocks * BLOCK_N + (pid_n - full_blocks) * TAIL_N, q_end, k_end, stride_qm, stride_qd,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_dom, stride_dod, stride_dkn,
                       stride_dkd, stride_dvn, stride_dvd, seq_k, qk_scale, scale, HEAD_DIM, BLOCK_D, BLOCK_D1,
                       CAUSAL, HAS_MASK, HAS_LENGTHS, TAIL_N, BLOCK_M, TAIL_M)
    else:
        _dkdv_cols(q_base, k_base, v_base, mask_base, do_base, dk_base, dv_base, Lse, Delta, stats_base,
                   pid_n * BLOCK_N, q_end, k_end, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn,
                   stride_vd, stride_mn, stride_dom, stride_dod, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                   seq_k, qk_scale, scale, HEAD_DIM, BLOCK_D, BLOCK_D1, CAUSAL, HAS_MASK, HAS_LENGTHS,
                   BLOCK_N, BLOCK_M, TAIL_M)


@triton.jit
def _dkdv_cols(
    q_base, k_base, v_base, mask_base, do_base, dk_base, dv_base, Lse, Delta, stats_base, start_n, q_end, k_end,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_dom, stride_dod,
    stride_dkn, stride_dkd, stride_dvn, stride_dvd, seq_k, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    COLS: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
):
    """dK, dV of the COLS keys at start_n: whole query blocks, then the ragged end in TAIL_M-row tiles."""
    offs_n = start_n + tl.arange(0, COLS)
    col_ok = offs_n < seq_k
    k0, k1 = _load_pieces(k_base, offs_n, col_ok, stride_kn, stride_kd, HEAD_DIM, BLOCK_D, BLOCK_D1, True, False)
    v0, v1 = _load_pieces(v_base, offs_n, col_ok, stride_vn, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_D1, True, False)
    dk0, dk1 = _zero_pieces(COLS, BLOCK_D, BLOCK_D1)
    dv0, dv1 = _zero_pieces(COLS, BLOCK_D, BLOCK_D1)

    # Rows past the query end load q = dO = 0 and lse = +inf, so their P is 0 and they add nothing: only
    # the query blocks that straddle the causal diagonal need an explicit mask (and the narrow tiles of the
    # ragged end, which may straddle it too). A key block past its sequence's length reads no query.
    if HAS_LENGTHS:
        q_end = tl.where(start_n < k_end, q_end, 0)
    lo, mid, full_end = _query_range(start_n, q_end, CAUSAL, COLS, BLOCK_M)
    if CAUSAL:
        for start_m in range(lo, mid, BLOCK_M):
            dk0, dk1, dv0, dv1 = _bwd_dkdv_tile(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, Lse, Delta, stats_base, start_m, offs_n,
                stride_qm, stride_qd, stride_dom, stride_dod, q_end, qk_scale,
                HEAD_DIM, BLOCK_D, BLOCK_D1, BLOCK_M, True,
            )
    for start_m in range(mid, full_end, BLOCK_M):
        dk0, dk1, dv0, dv1 = _bwd_dkdv_tile(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, Lse, Delta, stats_base, start_m, offs_n,
            stride_qm, stride_qd, stride_dom, stride_dod, q_end, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D1, BLOCK_M, False,
        )
    for start_m in range(full_end, q_end, TAIL_M):
        dk0, dk1, dv0, dv1 = _bwd_dkdv_tile(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, Lse, Delta, stats_base, start_m, offs_n,
            stride_qm, stride_qd, stride_dom, stride_dod, q_end, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D1, TAIL_M, CAUSAL,
        )

    dk0 = dk0 * scale
    dk1 = dk1 * scale
    keep = col_ok
    if HAS_LENGTHS:  # keys past the length are ignored: no gradient (their rows above hold stray sums)
        keep = keep & (offs_n < k_end)
    if HAS_MASK:
        # A padded key has P = 0 in every row, so its gradients are 0. Rows of dK/dV are independent, so
        # selecting here (not multiplying) also discards any overflow computed for those keys above.
        padded = tl.load(mask_base + offs_n * stride_mn, mask=col_ok, other=1)
        keep = keep & (padded == 0)
    if HAS_LENGTHS or HAS_MASK:
        dk0 = tl.where(keep[:, None], dk0, 0.0)
        dk1 = tl.where(keep[:, None], dk1, 0.0)
        dv0 = tl.where(keep[:, None], dv0, 0.0)
        dv1 = tl.where(keep[:, None], dv1, 0.0)
    _store_pieces(dk_base, offs_n, col_ok, stride_dkn, stride_dkd, dk0, dk1, HEAD_DIM, BLOCK_D, BLOCK_D1)
    _store_pieces(dv_base, offs_n, col_ok, stride_dvn, stride_dvd, dv0, dv1, HEAD_DIM, BLOCK_D, BLOCK_D1)


@triton.jit
def _bwd_dkdv_tile(
    dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, Lse, Delta, stats_base, start_m, offs_n,
    stride_qm, stride_qd, stride_dom, stride_dod, seq_q, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, WIDTH: tl.constexpr,
    CAUSAL_TILE: tl.constexpr,
):
    """WIDTH query rows against the resident keys: dK and dV accumulate."""
    rows = start_m + tl.arange(0, WIDTH)
    rows_ok = rows < seq_q
    qt0, qt1 = _load_pieces(q_base, rows, rows_ok, stride_qm, stride_qd, HEAD_DIM, BLOCK_D, BLOCK_D1, True, True)
    dot0, dot1 = _load_pieces(do_base, rows, rows_ok, stride_dom, stride_dod, HEAD_DIM, BLOCK_D, BLOCK_D1, True, True)
    lse2, delta = _load_row_stats(Lse, Delta, stats_base + rows, rows_ok)
    st = _dot_pieces(k0, k1, qt0, qt1, BLOCK_D1) * qk_scale  # (COLS, WIDTH): S^T, base 2
    pt = tl.exp2(st - lse2[None, :])
    if CAUSAL_TILE:
        pt = tl.where(offs_n[:, None] <= rows[None, :], pt, 0.0)
    dv0 = tl.dot(pt.to(dot0.dtype), tl.trans(dot0), dv0)
    dpt = _dot_pieces(v0, v1, dot0, dot1, BLOCK_D1)  # (COLS, WIDTH): (dO V^T)^T
    dst = (pt * (dpt - delta[None, :])).to(qt0.dtype)
    dk0 = tl.dot(dst, tl.trans(qt0), dk0)
    if BLOCK_D1 > 0:
        dv1 = tl.dot(pt.to(dot1.dtype), tl.trans(dot1), dv1)
        dk1 = tl.dot(dst, tl.trans(qt1), dk1)
    return dk0, dk1, dv0, dv1


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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """dQ of BLOCK_M query rows (or a TAIL_M-row slice of the ragged end): dQ = scale * dS K, looping over key
    blocks like the forward."""
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: axis 1 stops at 65535
    pid_m = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    dq_base = DQ + off_b * stride_dqb + off_h * stride_dqh
    mask_base = Mask + off_b * stride_mb
    stats_base = pid_bh.to(tl.int64) * seq_q
    q_end, k_end = _sequence_ends(Lengths, off_b, seq_q, seq_k, HAS_LENGTHS)
    full_blocks = seq_q // BLOCK_M
    if TAIL_M < BLOCK_M:
        if pid_m < full_blocks:
            _dq_rows(q_base, k_base, v_base, mask_base, do_base, dq_base, Lse, Delta, stats_base, pid_m * BLOCK_M,
                     q_end, k_end, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                     stride_dom, stride_dod, stride_dqm, stride_dqd, seq_q, qk_scale, scale,
                     HEAD_DIM, BLOCK_D, BLOCK_D1, CAUSAL, HAS_MASK, HAS_LENGTHS, BLOCK_M, BLOCK_N, TAIL_N)
        else:
            _dq_rows(q_base, k_base, v_base, mask_base, do_base, dq_base, Lse, Delta, stats_base,
                     full_blocks * BLOCK_M + (pid_m - full_blocks) * TAIL_M,
                     q_end, k_end, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                     stride_dom, stride_dod, stride_dqm, stride_dqd, seq_q, qk_scale, scale,
                     HEAD_DIM, BLOCK_D, BLOCK_D1, CAUSAL, HAS_MASK, HAS_LENGTHS, TAIL_M, BLOCK_N, TAIL_N)
    else:
        _dq_rows(q_base, k_base, v_base, mask_base, do_base, dq_base, Lse, Delta, stats_base, pid_m * BLOCK_M,
                 q_end, k_end, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
                 stride_dom, stride_dod, stride_dqm, stride_dqd, seq_q, qk_scale, scale,
                 HEAD_DIM, BLOCK_D, BLOCK_D1, CAUSAL, HAS_MASK, HAS_LENGTHS, BLOCK_M, BLOCK_N, TAIL_N)


@triton.jit
def _dq_rows(
    q_base, k_base, v_base, mask_base, do_base, dq_base, Lse, Delta, stats_base, start_m, q_end, k_end,
    stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_dom, stride_dod,
    stride_dqm, stride_dqd, seq_q, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
):
    """dQ of the ROWS query rows at start_m: the forward's key loops."""
    offs_m = start_m + tl.arange(0, ROWS)
    row_ok = offs_m < seq_q
    q0, q1 = _load_pieces(q_base, offs_m, row_ok, stride_qm, stride_qd, HEAD_DIM, BLOCK_D, BLOCK_D1, True, False)
    do0, do1 = _load_pieces(do_base, offs_m, row_ok, stride_dom, stride_dod, HEAD_DIM, BLOCK_D, BLOCK_D1, True, False)
    lse2, delta = _load_row_stats(Lse, Delta, stats_base + offs_m, row_ok)
    dq0, dq1 = _zero_pieces(ROWS, BLOCK_D, BLOCK_D1)

    # Same split as the forward. Here bounds masking of keys is essential: a key past the end loads as 0,
    # its P = exp2(-lse) can overflow, and inf * 0 in dS @ K would poison the whole row of dQ. Rows past
    # the query end have lse = -inf (P = 0), so they get dQ = 0.
    full_hi, hi = _key_range(start_m, q_end, k_end, CAUSAL, HAS_LENGTHS, ROWS, BLOCK_N)
    for start_n in range(0, full_hi, BLOCK_N):
        dq0, dq1 = _bwd_dq_tile(
            dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, mask_base, start_n, offs_m,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, k_end, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D1, BLOCK_N, CAUSAL, HAS_MASK, False,
        )
    tail_lo = full_hi
    if CAUSAL:
        tail_lo = full_hi + ((hi - full_hi) // BLOCK_N) * BLOCK_N
        for start_n in range(full_hi, tail_lo, BLOCK_N):
            dq0, dq1 = _bwd_dq_tile(
                dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, mask_base, start_n, offs_m,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, k_end, qk_scale,
                HEAD_DIM, BLOCK_D, BLOCK_D1, BLOCK_N, CAUSAL, HAS_MASK, True,
            )
    for start_n in range(tail_lo, hi, TAIL_N):
        dq0, dq1 = _bwd_dq_tile(
            dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, mask_base, start_n, offs_m,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, k_end, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D1, TAIL_N, CAUSAL, HAS_MASK, True,
        )
    _store_pieces(dq_base, offs_m, row_ok, stride_dqm, stride_dqd, dq0 * scale, dq1 * scale,
                  HEAD_DIM, BLOCK_D, BLOCK_D1)


@triton.jit
def _bwd_dq_tile(
    dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, mask_base, start_n, offs_m,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, WIDTH: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
):
    """WIDTH keys against the resident query rows: dQ accumulates."""
    cols = start_n + tl.arange(0, WIDTH)
    col_ok = cols < seq_k
    kt0, kt1 = _load_pieces(k_base, cols, col_ok, stride_kn, stride_kd, HEAD_DIM, BLOCK_D, BLOCK_D1, MASKED, True)
    vt0, vt1 = _load_pieces(v_base, cols, col_ok, stride_vn, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_D1, MASKED, True)
    s = _dot_pieces(q0, q1, kt0, kt1, BLOCK_D1) * qk_scale
    p = tl.exp2(s - lse2[:, None])  # (ROWS, WIDTH)
    if MASKED:
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None])
        p = tl.where(visible, p, 0.0)
    if HAS_MASK:
        padded = tl.load(mask_base + cols * stride_mn, mask=col_ok, other=1)
        p = tl.where(padded[None, :] != 0, 0.0, p)
    dp = _dot_pieces(do0, do1, vt0, vt1, BLOCK_D1)
    ds = (p * (dp - delta[:, None])).to(kt0.dtype)
    dq0 = tl.dot(ds, tl.trans(kt0), dq0)
    if BLOCK_D1 > 0:
        dq1 = tl.dot(ds, tl.trans(kt1), dq1)
    return dq0, dq1


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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """dK, dV of BLOCK_N keys (or a TAIL_N-key slice of the ragged end) and their share of dQ, with S, P and
    dP made once per tile (5 dots, not the split path's 7). dQ = scale * dS K is added across key blocks with
    fp32 atomics into DQ, which the caller zeroes; the summation order then varies from run to run."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    dq_base = DQ + off_b * stride_dqb + off_h * stride_dqh
    dk_base = DK + off_b * stride_dkb + off_h * stride_dkh
    dv_base = DV + off_b * stride_dvb + off_h * stride_dvh
    mask_base = Mask + off_b * stride_mb
    stats_base = pid_bh.to(tl.int64) * seq_q
    q_end, k_end = _sequence_ends(Lengths, off_b, seq_q, seq_k, HAS_LENGTHS)
    full_blocks = seq_k // BLOCK_N
    if TAIL_N < BLOCK_N:
        if pid_n < full_blocks:
            _fused_cols(q_base, k_base, v_base, mask_base, do_base, dq_base, dk_base, dv_base, Lse, Delta, stats_base,
                        pid_n * BLOCK_N, q_end, k_end, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn,
                        stride_vd, stride_mn, stride_dom, stride_dod, stride_dqm, stride_dqd, stride_dkn, stride_dkd,
                        stride_dvn, stride_dvd, seq_k, qk_scale, scale, HEAD_DIM, BLOCK_D, BLOCK_D1, CAUSAL,
                        HAS_MASK, HAS_LENGTHS, BLOCK_N, BLOCK_M, TAIL_M)
        else:
            _fused_cols(q_base, k_base, v_base, mask_base, do_base, dq_base, dk_base, dv_base, Lse, Delta, stats_base,
                        full_blocks * BLOCK_N + (pid_n - full_blocks) * TAIL_N, q_end, k_end, stride_qm, stride_qd,
                        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_dom, stride_dod, stride_dqm,
                        stride_dqd, stride_dkn, stride_dkd, stride_dvn, stride_dvd, seq_k, qk_scale, scale,
                        HEAD_DIM, BLOCK_D, BLOCK_D1, CAUSAL, HAS_MASK, HAS_LENGTHS, TAIL_N, BLOCK_M, TAIL_M)
    else:
        _fused_cols(q_base, k_base, v_base, mask_base, do_base, dq_base, dk_base, dv_base, Lse, Delta, stats_base,
                    pid_n * BLOCK_N, q_end, k_end, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn,
                    stride_vd, stride_mn, stride_dom, stride_dod, stride_dqm, stride_dqd, stride_dkn, stride_dkd,
                    stride_dvn, stride_dvd, seq_k, qk_scale, scale, HEAD_DIM, BLOCK_D, BLOCK_D1, CAUSAL,
                    HAS_MASK, HAS_LENGTHS, BLOCK_N, BLOCK_M, TAIL_M)


@triton.jit
def _fused_cols(
    q_base, k_base, v_base, mask_base, do_base, dq_base, dk_base, dv_base, Lse, Delta, stats_base, start_n,
    q_end, k_end, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, stride_dom,
    stride_dod, stride_dqm, stride_dqd, stride_dkn, stride_dkd, stride_dvn, stride_dvd, seq_k, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    COLS: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
):
    """The fused backward of the COLS keys at start_n: the query loops of `_dkdv_cols`."""
    offs_n = start_n + tl.arange(0, COLS)
    col_ok = offs_n < seq_k
    k0, k1 = _load_pieces(k_base, offs_n, col_ok, stride_kn, stride_kd, HEAD_DIM, BLOCK_D, BLOCK_D1, True, False)
    v0, v1 = _load_pieces(v_base, offs_n, col_ok, stride_vn, stride_vd, HEAD_DIM, BLOCK_D, BLOCK_D1, True, False)
    dk0, dk1 = _zero_pieces(COLS, BLOCK_D, BLOCK_D1)
    dv0, dv1 = _zero_pieces(COLS, BLOCK_D, BLOCK_D1)

    # Unlike dK/dV alone, dQ sums over keys, so a key that is hidden (past the end, past the length,
    # padded) must have P = 0 in every tile: its stray P could be inf, and inf * 0 would poison dQ.
    key_ok = offs_n < k_end
    if HAS_MASK:
        padded = tl.load(mask_base + offs_n * stride_mn, mask=col_ok, other=1)
        key_ok = key_ok & (padded == 0)
    if HAS_LENGTHS:
        q_end = tl.where(start_n < k_end, q_end, 0)
    lo, mid, full_end = _query_range(start_n, q_end, CAUSAL, COLS, BLOCK_M)
    if CAUSAL:
        for start_m in range(lo, mid, BLOCK_M):
            dk0, dk1, dv0, dv1 = _bwd_fused_tile(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, key_ok, q_base, do_base, dq_base, Lse, Delta, stats_base,
                start_m, offs_n, stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd, q_end,
                qk_scale, scale, HEAD_DIM, BLOCK_D, BLOCK_D1, BLOCK_M, True,
            )
    for start_m in range(mid, full_end, BLOCK_M):
        dk0, dk1, dv0, dv1 = _bwd_fused_tile(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, key_ok, q_base, do_base, dq_base, Lse, Delta, stats_base,
            start_m, offs_n, stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd, q_end,
            qk_scale, scale, HEAD_DIM, BLOCK_D, BLOCK_D1, BLOCK_M, False,
        )
    for start_m in range(full_end, q_end, TAIL_M):
        dk0, dk1, dv0, dv1 = _bwd_fused_tile(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, key_ok, q_base, do_base, dq_base, Lse, Delta, stats_base,
            start_m, offs_n, stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd, q_end,
            qk_scale, scale, HEAD_DIM, BLOCK_D, BLOCK_D1, TAIL_M, CAUSAL,
        )
    # Hidden keys had P = 0 throughout, so their rows of dK and dV are already 0.
    _store_pieces(dk_base, offs_n, col_ok, stride_dkn, stride_dkd, dk0 * scale, dk1 * scale,
                  HEAD_DIM, BLOCK_D, BLOCK_D1)
    _store_pieces(dv_base, offs_n, col_ok, stride_dvn, stride_dvd, dv0, dv1, HEAD_DIM, BLOCK_D, BLOCK_D1)


@triton.jit
def _bwd_fused_tile(
    dk0, dk1, dv0, dv1, k0, k1, v0, v1, key_ok, q_base, do_base, dq_base, Lse, Delta, stats_base, start_m, offs_n,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd, seq_q, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, WIDTH: tl.constexpr,
    CAUSAL_TILE: tl.constexpr,
):
    """WIDTH query rows against the resident keys: dK, dV accumulate in registers, dQ goes out by atomics."""
    rows = start_m + tl.arange(0, WIDTH)
    rows_ok = rows < seq_q
    qt0, qt1 = _load_pieces(q_base, rows, rows_ok, stride_qm, stride_qd, HEAD_DIM, BLOCK_D, BLOCK_D1, True, True)
    dot0, dot1 = _load_pieces(do_base, rows, rows_ok, stride_dom, stride_dod, HEAD_DIM, BLOCK_D, BLOCK_D1, True, True)
    lse2, delta = _load_row_stats(Lse, Delta, stats_base + rows, rows_ok)
    st = _dot_pieces(k0, k1, qt0, qt1, BLOCK_D1) * qk_scale  # (COLS, WIDTH): S^T, base 2
    pt = tl.exp2(st - lse2[None, :])
    visible = key_ok[:, None]
    if CAUSAL_TILE:
        visible = visible & (offs_n[:, None] <= rows[None, :])
    pt = tl.where(visible, pt, 0.0)
    dv0 = tl.dot(pt.to(dot0.dtype), tl.trans(dot0), dv0)
    dpt = _dot_pieces(v0, v1, dot0, dot1, BLOCK_D1)  # (COLS, WIDTH): (dO V^T)^T
    dst = (pt * (dpt - delta[None, :])).to(qt0.dtype)
    dk0 = tl.dot(dst, tl.trans(qt0), dk0)
    # This key block's share of dQ = scale * dS K, per piece. relaxed: the sum is read only by a later
    # kernel, so no ordering between the adds is needed.
    d0 = tl.arange(0, BLOCK_D)
    dq0 = tl.dot(tl.trans(dst), k0) * scale  # (WIDTH, BLOCK_D)
    tl.atomic_add(dq_base + rows[:, None] * stride_dqm + d0[None, :] * stride_dqd, dq0,
                  mask=rows_ok[:, None] & (d0 < HEAD_DIM)[None, :], sem="relaxed")
    if BLOCK_D1 > 0:
        dv1 = tl.dot(pt.to(dot1.dtype), tl.trans(dot1), dv1)
        dk1 = tl.dot(dst, tl.trans(qt1), dk1)
        d1 = BLOCK_D + tl.arange(0, BLOCK_D1)
        dq1 = tl.dot(tl.trans(dst), k1) * scale
        tl.atomic_add(dq_base + rows[:, None] * stride_dqm + d1[None, :] * stride_dqd, dq1,
                      mask=rows_ok[:, None] & (d1 < HEAD_DIM)[None, :], sem="relaxed")
    return dk0, dk1, dv0, dv1

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

# Configs that spill registers, per (kernel, GPU family, head-dim lanes): BLOCK_D + BLOCK_D1, so the forward's
# head dim 80 is 80 (64 + 16) and the backward's 128 (one padded block, see PIECES). Measured on these kernels
# with bf16 by tools/check_triton_compile.py --unpruned (ptxas -v) with Triton 3.9 and 3.6 (the GPU image's,
# which spills less: 38 of 286 sm_90 kernels against 3.9's 203 of 692 on both families); the previous
# kernels' rules (3.6 and 3.9, bf16 and fp16) are kept on top. A spill puts accumulator or
# operand values in local memory inside the key/query loop, so such a config is slower than a smaller tile
# that fits: it is never compiled or timed. maxnreg cannot help here: every spill is at ptxas's 255-register
# ceiling, and a lower cap only spills more. The sets are irregular (ptxas's allocation is not monotonic in the
# tile size), hence lists rather than a register formula.
_SPILLS: dict[tuple[str, int, int], set[tuple[int, int, int, int]]] = {
    # The forward: odd cases of 4-52 B; at 80 lanes the 4-warp small tiles on sm_80, 64x64/4 and 64x128 on sm_90.
    ("fwd", 80, 32): {(64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3)},
    ("fwd", 80, 64): {(64, 32, 4, 3), (128, 32, 8, 3), (128, 128, 8, 2)},
    ("fwd", 80, 80): {(32, 32, 4, 2), (64, 32, 4, 3), (64, 128, 8, 2)},
    ("fwd", 80, 128): {(32, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3)},
    ("fwd", 90, 64): {(64, 128, 8, 2)},
    ("fwd", 90, 80): {(64, 64, 4, 3), (64, 128, 8, 2)},
    ("fwd", 90, 128): {(32, 32, 4, 2), (32, 64, 4, 3), (64, 64, 4, 3)},
    # dK/dV holds k, v, dk and dv of a whole key block besides the score tiles. sm_80: most 64-row query
    # blocks spill; at 128 the 128-key blocks and 64x64/4 warps. sm_90: fits up to 64 lanes; at 128 every
    # config with a 64-key block (wgmma's minimum) spills, so only 64x32 (mma.sync) is left.
    ("dkdv", 80, 32): {(32, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2)},
    ("dkdv", 80, 64): {(32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2)},
    ("dkdv", 80, 128): {(32, 128, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2)},
    ("dkdv", 90, 64): {(64, 64, 4, 3)},  # causal (Triton 3.6, 20-28 B)
    ("dkdv", 90, 128): {(32, 32, 4, 2), (32, 64, 4, 3), (32, 128, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2),
                        (64, 128, 8, 2)},
    # dQ holds q, dO and dq of a query block: 64x64 and 128x64 tiles spill at 64 lanes on sm_80, the 128-row
    # tiles (and 64x64/4 warps) at 128.
    ("dq", 80, 32): {(64, 64, 4, 3)},
    ("dq", 80, 64): {(64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2)},
    ("dq", 80, 128): {(64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2)},
    ("dq", 90, 32): {(32, 64, 4, 3)},
    ("dq", 90, 128): {(64, 64, 4, 3)},  # Triton 3.6
    # The fused backward holds dK/dV's key block and a dQ tile besides. sm_80: at 64 lanes the 64-row query
    # blocks and 32x64/4 warps; at 128 all but 32x32/8 and 64x32/8 warps. sm_90: 64x64/4 warps and 64x128
    # from 64 lanes on; at 128 every config with a 64-key block and 64x32/4 warps, leaving 32-key ones (mma.sync).
    ("fused", 80, 32): {(64, 128, 8, 2)},
    ("fused", 80, 64): {(32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2)},
    ("fused", 80, 128): {(32, 32, 4, 2), (32, 64, 4, 3), (32, 128, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3),
                         (64, 64, 8, 2), (64, 128, 8, 2)},
    ("fused", 90, 64): {(64, 64, 4, 3), (64, 128, 8, 2)},
    ("fused", 90, 128): {(32, 64, 4, 3), (32, 64, 8, 2), (32, 128, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3),
                         (64, 64, 8, 2), (64, 128, 8, 2)},
}
# Hopper's warpgroup MMA (wgmma) works on 64-row blocks: a program whose resident block (the queries of
# the forward and dQ, the keys of dK/dV) has fewer rows compiles to Ampere's mma.sync on sm_90 (read from
# the PTX by tools/check_triton_compile.py), so those configs are not timed there.
_WGMMA_MIN_ROWS = 64
# The ragged end of a sequence runs in tiles of TAIL positions (or of the block, if smaller): along the inner
# loop the last partial block, along the grid one program per TAIL positions. 16 is the smallest dimension
# tl.dot takes, so the padding left is under 16 positions per side (197 tokens run as 208, not 256).
TAIL = 16
# Under the interpreter: one fixed config, no benchmarking (fast and reproducible on a CPU). Its 16-wide
# ragged-end tiles run at every length that is not a multiple of 32.
INTERPRET_BLOCK = (32, 32)
_AUTOTUNE_KEY = ["SEQ_Q_BUCKET", "SEQ_K_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_MASK", "HAS_LENGTHS"]


def _tiles(block_m: int, block_n: int) -> dict[str, int]:
    """The tile constexprs of a (BLOCK_M, BLOCK_N) tiling: the blocks and their ragged-end tiles."""
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "TAIL_M": min(TAIL, block_m), "TAIL_N": min(TAIL, block_n)}


def _configs(table: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config(_tiles(*INTERPRET_BLOCK), num_warps=4, num_stages=1)]
    return [triton.Config(_tiles(m, n), num_warps=w, num_stages=s) for m, n, w, s in table]


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
    width = sum(kwargs.get(name, named_args.get(name, 0)) for name in ("BLOCK_D", "BLOCK_D1")) or 64
    q = named_args.get("Q", kwargs.get("Q"))
    family = _arch_family(q) if arch is None else arch
    dropped = _SPILLS.get((kernel, family, width), set())
    max_tile = 64 * 64 * 2 if width > 64 else None  # the largest tiles at head dims 80 and 128
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


def launch_grid(batch_heads: int, length: int, block: int, tail: int | None = None) -> tuple[int, int]:
    """(batch * heads, programs along `length`): the grid of every attention kernel. A program takes `block`
    positions, and the ragged end one program per `tail` positions (`tail` None: `block` as well)."""
    tail = block if tail is None else tail
    # ceil division (triton.cdiv's call wrapper is slow on the launch path)
    blocks = length // block + -(-(length % block) // tail)
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


# Which kernels hold the head dim in pieces. The backward kernels take them too (and the tests run them so),
# but compiled (Triton 3.9, tools/check_triton_compile.py --unpruned) they spill at head dim 80 in every
# dK/dV and fused config on sm_80 and in every 64-row one on sm_90, more than with one 128-lane block, so
# the backward pads to a power of two until that is solved; the forward fits.
PIECES = {"fwd": True, "bwd": False}


def _pieces_kwargs(head_dim: int, kernel: str) -> dict[str, int]:
    """BLOCK_D and BLOCK_D1 of `kernel` ("fwd" or "bwd"): `head_dim_pieces` where PIECES says, else one block."""
    block_d, block_d1 = head_dim_pieces(head_dim) if PIECES[kernel] else (max(16, _bucket(head_dim)), 0)
    return {"BLOCK_D": block_d, "BLOCK_D1": block_d1}


def _lengths_arg(lengths: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The per-sequence lengths as int32 (the kernels clamp them to [0, seq]); a dummy pointer when absent."""
    if lengths is None:
        return like, False
    return lengths.to(torch.int32).contiguous(), True


def _block_kwargs(block: tuple[int, ...] | None) -> dict:
    """Launch keywords of a forced tiling: (BLOCK_M, BLOCK_N), or (BLOCK_M, BLOCK_N, TAIL_M, TAIL_N)."""
    if block is None:
        return {}
    tiles = _tiles(*block[:2])
    if len(block) == 4:
        tiles.update(TAIL_M=block[2], TAIL_N=block[3])
    return {**tiles, "num_warps": 4, "num_stages": 1 if INTERPRET else 2}


def head_dim_pieces(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D1): the head dim's lanes as a power of two and a second one of at least 16 (or 0),
    where two cover it with fewer lanes than one (80: 64 + 16, 96: 64 + 32, 48: 32 + 16; 64: 64 + 0)."""
    whole = max(16, _bucket(head_dim))
    first = whole // 2
    if first >= 16 and head_dim > first:
        second = max(16, _bucket(head_dim - first))
        if first + second < whole:
            return first, second
    return whole, 0


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    block: tuple[int, ...] | None = None,
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
        kernel[lambda meta: launch_grid(batch * heads, seq_q, meta["BLOCK_M"], meta["TAIL_M"])](
            q, k, v, mask, lengths, out, lse,
            *q.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *out.stride(),
            heads, seq_q, seq_k, scale * LOG2E, _bucket(seq_q), _bucket(seq_k),
            HEAD_DIM=head_dim, **_pieces_kwargs(head_dim, "fwd"),
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
    block: tuple[int, ...] | None = None,
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
        HEAD_DIM=head_dim, **_pieces_kwargs(head_dim, "bwd"), CAUSAL=causal, HAS_MASK=has_mask,
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
    dkdv[lambda meta: launch_grid(batch_heads, seq_k, meta["BLOCK_N"], meta["TAIL_N"])](
        q, k, v, mask, lengths, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *grad_out.stride(),
        *dk.stride(), *dv.stride(), *shape_args, **common,
    )
    dq_kernel = _dq_tuned if block is None else _bwd_dq_kernel
    dq_kernel[lambda meta: launch_grid(batch_heads, seq_q, meta["BLOCK_M"], meta["TAIL_M"])](
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
    kernel[lambda meta: launch_grid(batch * heads, k.shape[2], meta["BLOCK_N"], meta["TAIL_N"])](
        q, k, v, mask, lengths, grad_out, lse, delta, dq_acc, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), stride_mb, stride_mn, *grad_out.stride(),
        *dq_acc.stride(), *dk.stride(), *dv.stride(), *shape_args, **common,
    )
    dq.copy_(dq_acc)
