// One exponential per similarity for both directions of the contrastive kernels, where it is exact.
//
// The row and column terms of an entry are 2^(v - a_i) and 2^(v - b_j) (base-2 logits v, row and column
// references a_i, b_j: a running max in the forward, the log-sum-exps in the backward). With one reference
// R for the whole tile, e = 2^(v - R) gives both: 2^(v - a_i) = e * 2^(R - a_i), and likewise for b_j, at
// one exponential per entry and one per row or column. That is exact (one more rounding) as long as no
// term that matters falls below fp32's normal range (2^-126, where ex2.approx.ftz flushes to zero) and no
// factor 2^(R - a_i) overflows: the kernels use it only for tiles where every reference (forward: every
// valid logit) lies within kSharedExpSpread of R, and fall back to two exponentials elsewhere (a decision
// per tile, the same for the whole CTA, so no divergence). In CLIP batches the spread is far smaller than
// that bound (logits within s * 2 of each other, s <= 100), so the fallback is the rare case.
#pragma once

#include "similarity_tile.cuh"

namespace fastclip {
namespace cuda {
namespace tile {

// 2^-64: a term at the far end of the spread is still 2^62 times fp32's smallest normal number, and a
// factor 2^(R - a_i) is at most 2^64.
constexpr float kSharedExpSpread = 64.f;

__device__ __forceinline__ bool within_spread(float lo, float hi) { return lo <= hi && hi - lo <= kSharedExpSpread; }

// The backward's per-row state in shared memory: row_lse2 (base 2), row_grad, and row_factor =
// 2^(row_ref - row_lse2) relative to the block's largest finite row log-sum-exp row_ref (0 where the
// row's log-sum-exp is not finite: a fully masked row, whose entries are never evaluated).
struct BackwardRows {
  float* row_lse2;
  float* row_grad;
  float* row_factor;
  float ref;  // the largest finite row_lse2 of the block (-inf if none)
  float lo;   // the smallest
};

// Fills the BackwardRows arrays ([kRowBlock] each) for rows [row0, row0 + kRowBlock); every thread must
// call it. The arrays are visible to all threads after the next barrier (similarity_tile's first).
__device__ __forceinline__ BackwardRows load_backward_rows(float* row_lse2, float* row_grad, float* row_factor,
                                                           const float* lse, const float* grad, int64_t row0,
                                                           int64_t rows, float* scratch) {
  float lo = INFINITY, hi = -INFINITY, lse2 = 0.f;
  const int r = threadIdx.x;
  if (r < kRowBlock) {
    const bool ok = row0 + r < rows;
    lse2 = ok ? lse[row0 + r] * kLog2e : 0.f;
    row_lse2[r] = lse2;
    row_grad[r] = ok ? grad[row0 + r] : 0.f;
    if (ok && isfinite(lse2)) lo = hi = lse2;
  }
  cta_min_max(lo, hi, scratch);
  // Only read for tiles within the spread, where hi - lse2 <= kSharedExpSpread: no overflow there.
  if (r < kRowBlock) row_factor[r] = isfinite(lse2) ? fast_exp2(hi - lse2) : 0.f;
  return {row_lse2, row_grad, row_factor, hi, lo};
}

// The tile's reference for the backward: the largest finite log-sum-exp among the block's rows and the
// tile's columns whose terms are used (col_used: in range, a non-zero column gradient). Every valid entry's
// logit is at most its row's log-sum-exp, so 2^(v - ref) <= 1. `shared` says whether every such
// log-sum-exp lies within the spread. Every thread must call it (a CTA reduction, one barrier).
__device__ __forceinline__ float backward_tile_reference(const BackwardRows& rows, float col_lse2, bool col_used,
                                                         float* scratch, bool& shared) {
  float lo = rows.lo, hi = rows.ref;
  if (col_used && isfinite(col_lse2)) lo = fminf(lo, col_lse2), hi = fmaxf(hi, col_lse2);
  cta_min_max(lo, hi, scratch);
  shared = within_spread(lo, hi) && rows.lo <= rows.ref;  // the rows' factors need a finite rows.ref
  return hi;
}

}  // namespace tile
}  // namespace cuda
}  // namespace fastclip
