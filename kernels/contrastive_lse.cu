// Fused similarity + log-sum-exp kernels of the CLIP contrastive loss (forward and backward).
//
// One CTA (8 warps) owns kRowBlock = 128 rows of `image` and sweeps the column tiles of its split. Each
// 128 x 128 similarity tile comes from the shared tile machinery (similarity_tile.cuh: tensor cores, fp32
// accumulation, left in shared memory) and is consumed there:
//  - forward: online (running max, sum) per row across tiles, and per-tile (max, sum) per column;
//  - backward: G = gr * P_row + gc * P_col written (times s and the tile scale) to the caller's gradient
//    tile.
// Both directions of the loss share the one tile, and, where it is exact, one exponential per entry
// (shared_exponential.cuh); other tiles take one per direction. Exponentials run in base 2 (ex2.approx)
// with the scale pre-multiplied by log2(e); results are converted back to natural logs before they are
// written. A masked diagonal (j - i == diagonal) is dropped entry by entry: its value counts as -inf in
// the forward reductions and its gradient is 0. A (max, sum) partial that saw only masked entries stays
// at (-inf, 0): every exponential is guarded so that -inf - -inf never turns into NaN.
// No N x N matrix exists anywhere: the forward writes O(rows + cols) partials per CTA.
#include <cstdint>

#include "contrastive_lse.cuh"
#include "shared_exponential.cuh"
#include "similarity_tile.cuh"

namespace fastclip {
namespace cuda {
namespace {

using namespace tile;

// (m, l) += (m2, l2) for (max, sum of 2^(v - max)) pairs, base 2; (-inf, 0) is the empty pair.
__device__ __forceinline__ void merge_max_sum(float& m, float& l, float m2, float l2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2, l = l2;
    return;
  }
  const float top = fmaxf(m, m2);
  l = l * fast_exp2(m - top) + l2 * fast_exp2(m2 - top);
  m = top;
}

template <typename T, Float32Mode kMode, bool kVectorized>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<T>) lse_forward_kernel(LseForwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  SharedTiles<T>& tiles = shared_tiles<T>();
  __shared__ float scratch[2 * kWarps];
  const T* image = static_cast<const T*>(args.image);
  const T* text = static_cast<const T*>(args.text);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowBlock;
  const int split = blockIdx.y;
  const float scale2 = *args.scale * kLog2e;  // S in base-2 units
  int tile_count;
  const int64_t tile_begin = split_range(args.cols, args.col_splits, split, tile_count);

  // Row statistics: each lane keeps the running (max, sum) of its half row (HalfRow), merged with the
  // other half's lane at the end. Column statistics: threads 2c and 2c + 1 share tile column c
  // (col_pass_row). Both layouts are recomputed after each tile, to keep registers free for its GEMM.
  float run_max = -INFINITY, run_sum = 0.f;

  for (int t = 0; t < tile_count; ++t) {
    const int64_t col0 = (tile_begin + t) * kColBlock;
    similarity_tile<T, kMode, kVectorized>(tiles, image, text, row0, args.rows, col0, args.cols, args.dim);
    const HalfRow mine = half_row();
    const int64_t row = row0 + mine.row;
    const bool row_ok = row < args.rows;
    const int c = threadIdx.x >> 1, h = threadIdx.x & 1;

    // This lane's half row as base-2 logits: -inf past the edges and on the masked diagonal. (Read twice
    // from shared memory rather than held: 64 more registers would spill.)
    const int64_t row_hole = args.mask_diagonal ? row + args.diagonal - col0 : -1;  // the tile column masked
    const auto logit = [&](int k) {
      const int col = mine.col(k);
      const bool ok = row_ok && col0 + col < args.cols && col != row_hole;
      return ok ? scale2 * tiles.sim[mine.row][col] : -INFINITY;
    };
    float lo = INFINITY, hi = -INFINITY;
#pragma unroll 8
    for (int k = 0; k < kHalfRow; ++k) {
      const float v = logit(k);
      if (v != -INFINITY) lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    const float lane_max = hi;
    cta_min_max(lo, hi, scratch);  // now the tile's extremes

    float col_max = -INFINITY, col_sum = 0.f;
    if (within_spread(lo, hi)) {
      // One exponential per entry, relative to the tile's max; each partial is then re-expressed
      // relative to its own max (at most 2^64 larger: no overflow).
      float sum = 0.f;
#pragma unroll 8
      for (int k = 0; k < kHalfRow; ++k) {
        const float e = fast_exp2(logit(k) - hi);  // 0 for -inf
        sum += e;
        tiles.sim[mine.row][mine.col(k)] = e;
      }
      if (lane_max != -INFINITY) merge_max_sum(run_max, run_sum, lane_max, sum * fast_exp2(hi - lane_max));
      __syncthreads();  // every entry's exponential is in
      float peak = 0.f;
      for (int i = 0; i < kColPassRows; ++i) {
        const float e = tiles.sim[col_pass_row(h, i)][c];
        col_sum += e;
        peak = fmaxf(peak, e);
      }
      col_sum += __shfl_xor_sync(kFullMask, col_sum, 1);
      peak = fmaxf(peak, __shfl_xor_sync(kFullMask, peak, 1));
      if (peak > 0.f) col_max = hi + fast_log2(peak), col_sum = __fdividef(col_sum, peak);
      else col_sum = 0.f;
    } else {
      if (lane_max != -INFINITY) {
        float sum = 0.f;
#pragma unroll 8
        for (int k = 0; k < kHalfRow; ++k) sum += fast_exp2(logit(k) - lane_max);
        merge_max_sum(run_max, run_sum, lane_max, sum);
      }
      // The max is taken over scaled logits (base 2), so a negative scale is handled like any other.
      const int64_t col_hole = args.mask_diagonal ? col0 + c - args.diagonal - row0 : -1;  // the tile row masked
      for (int i = 0; i < kColPassRows; ++i) {
        const int r = col_pass_row(h, i);
        if (row0 + r < args.rows && r != col_hole) col_max = fmaxf(col_max, scale2 * tiles.sim[r][c]);
      }
      col_max = fmaxf(col_max, __shfl_xor_sync(kFullMask, col_max, 1));
      // -inf: the mask took the block's only valid row from this column; the partial stays (-inf, 0).
      if (col_max != -INFINITY)
        for (int i = 0; i < kColPassRows; ++i) {
          const int r = col_pass_row(h, i);
          if (row0 + r < args.rows && r != col_hole) col_sum += fast_exp2(scale2 * tiles.sim[r][c] - col_max);
        }
      col_sum += __shfl_xor_sync(kFullMask, col_sum, 1);
    }
    if (h == 0 && col0 + c < args.cols) {
      const int64_t out = static_cast<int64_t>(blockIdx.x) * args.cols + col0 + c;
      args.col_max[out] = col_max * kLn2;
      args.col_sum[out] = col_sum;
    }
  }

  merge_max_sum(run_max, run_sum, __shfl_xor_sync(kFullMask, run_max, 1), __shfl_xor_sync(kFullMask, run_sum, 1));
  const HalfRow mine = half_row();
  const int64_t row = row0 + mine.row;
  if (mine.col0 == 0 && row < args.rows) {
    args.row_max[static_cast<int64_t>(split) * args.rows + row] = run_max * kLn2;
    args.row_sum[static_cast<int64_t>(split) * args.rows + row] = run_sum;
  }
#else
  __trap();  // the host refuses devices below sm_80
#endif
}

template <typename T, Float32Mode kMode, bool kVectorized>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<T>) lse_backward_kernel(LseBackwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  SharedTiles<T>& tiles = shared_tiles<T>();
  __shared__ float row_lse2[kRowBlock], row_grad[kRowBlock], row_factor[kRowBlock], scratch[2 * kWarps];
  const T* image = static_cast<const T*>(args.image);
  const T* text = static_cast<const T*>(args.text);
  T* grad_tile = static_cast<T*>(args.grad_tile);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowBlock;
  const float scale = *args.scale, scale2 = scale * kLog2e;
  const float tile_mul = scale * tile_scale(args.tile_scale);  // exact: the tile scale is a power of two
  const BackwardRows rows =
      load_backward_rows(row_lse2, row_grad, row_factor, args.row_lse, args.grad_row, row0, args.rows, scratch);
  int tile_count;
  const int64_t tile_begin = split_range(args.cols, args.col_splits, blockIdx.y, tile_count);

  // Thread owns column c of every tile and rows g, g + 2, ...: a warp reads and writes 32 consecutive
  // columns of one row at a time (conflict-free shared memory, coalesced stores).
  constexpr int kRowStep = kThreads / kColBlock;
  const int c = threadIdx.x % kColBlock, g = threadIdx.x / kColBlock;
  float scale_grad = 0.f;  // sum of G * <image_i, text_j>
  for (int t = 0; t < tile_count; ++t) {
    const int64_t col0 = (tile_begin + t) * kColBlock, col = col0 + c;
    similarity_tile<T, kMode, kVectorized>(tiles, image, text, row0, args.rows, col0, args.cols, args.dim);
    const bool col_ok = col < args.cols;
    const float col_lse2 = col_ok ? args.col_lse[col] * kLog2e : 0.f, col_grad = col_ok ? args.grad_col[col] : 0.f;
    bool shared;
    const float ref = backward_tile_reference(rows, col_lse2, col_ok && col_grad != 0.f, scratch, shared);
    if (!col_ok) continue;
    const int64_t hole = args.mask_diagonal ? col - args.diagonal - row0 : -1;  // the row the mask takes
    // G = e * (gr * 2^(ref - row lse) + gc * 2^(ref - col lse)) with e = 2^(v - ref), where shared.
    const float row_shift = shared ? fast_exp2(ref - rows.ref) : 0.f;
    const float col_coef = shared && col_grad != 0.f ? col_grad * fast_exp2(ref - col_lse2) : 0.f;
    for (int r = g; r < kRowBlock; r += kRowStep) {
      const int64_t row = row0 + r;
      if (row >= args.rows) break;
      if (r == hole) {  // G = 0, without evaluating exp(S - lse): a fully masked row's lse is -inf
        grad_tile[row * args.cols + col] = from_float<T>(0.f);
        continue;
      }
      const float dot = tiles.sim[r][c];
      const float grad =
          shared ? fast_exp2(fmaf(scale2, dot, -ref)) * fmaf(row_grad[r] * row_factor[r], row_shift, col_coef)
                 : row_grad[r] * fast_exp2(fmaf(scale2, dot, -row_lse2[r])) +
                       col_grad * fast_exp2(fmaf(scale2, dot, -col_lse2));
      scale_grad = fmaf(grad, dot, scale_grad);
      grad_tile[row * args.cols + col] = from_float<T>(tile_mul * grad);
    }
  }
  store_cta_sum(scale_grad, args.scale_partial);
#else
  __trap();
#endif
}

}  // namespace

cudaError_t launch_lse_forward(ElementType type, Float32Mode mode, const LseForwardArgs& args, cudaStream_t stream) {
  return launch_variant(type, mode, args, [&](auto variant, dim3 grid) {
    using V = decltype(variant);
    launch_tile_kernel<typename V::Element>(lse_forward_kernel<typename V::Element, V::kMode, V::kVectorized>, grid,
                                            stream, args);
  });
}

cudaError_t launch_lse_backward(ElementType type, Float32Mode mode, const LseBackwardArgs& args, cudaStream_t stream) {
  return launch_variant(type, mode, args, [&](auto variant, dim3 grid) {
    using V = decltype(variant);
    launch_tile_kernel<typename V::Element>(lse_backward_kernel<typename V::Element, V::kMode, V::kVectorized>, grid,
                                            stream, args);
  });
}

int lse_forward_ctas_per_sm(ElementType type, Float32Mode mode) {
  return tile_occupancy(type, mode, [](auto v) {
    using V = decltype(v);
    return lse_forward_kernel<typename V::Element, V::kMode, V::kVectorized>;
  });
}

int lse_backward_ctas_per_sm(ElementType type, Float32Mode mode) {
  return tile_occupancy(type, mode, [](auto v) {
    using V = decltype(v);
    return lse_backward_kernel<typename V::Element, V::kMode, V::kVectorized>;
  });
}

}  // namespace cuda
}  // namespace fastclip
