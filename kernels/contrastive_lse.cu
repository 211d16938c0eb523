// Fused similarity + log-sum-exp kernels of the CLIP contrastive loss (forward and backward).
//
// One CTA (4 warps) owns kRowBlock = 64 rows of `image` and sweeps the column tiles of its split. Each
// 64 x 64 similarity tile comes from the shared tile machinery (similarity_tile.cuh: tensor cores, fp32
// accumulation, staged through shared memory) and is consumed there:
//  - forward: online (running max, sum) per row across tiles, and per-tile (max, sum) per column;
//  - backward: G = gr * P_row + gc * P_col written (times s and the tile scale) to the caller's gradient
//    tile.
// Both directions of the loss share the one tile. Exponentials run in base 2 (ex2.approx) with the
// scale pre-multiplied by log2(e); results are converted back to natural logs before they are written.
// A masked diagonal (j - i == diagonal) is dropped entry by entry: its value counts as -inf in the
// forward reductions and its gradient is 0. A (max, sum) partial that saw only masked entries stays at
// (-inf, 0): every exponential is guarded so that -inf - -inf never turns into NaN.
// No N x N matrix exists anywhere: the forward writes O(rows + cols) partials per CTA.
#include <cstdint>

#include "contrastive_lse.cuh"
#include "similarity_tile.cuh"

namespace fastclip {
namespace cuda {
namespace {

using namespace tile;

template <typename T, Float32Mode kMode, bool kVectorized>
__global__ void __launch_bounds__(kThreads) lse_forward_kernel(LseForwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  SharedTiles<T>& tiles = shared_tiles<T>();
  const T* image = static_cast<const T*>(args.image);
  const T* text = static_cast<const T*>(args.text);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowBlock;
  const int split = blockIdx.y;
  const float scale2 = *args.scale * kLog2e;  // S in base-2 units
  int tile_count;
  const int64_t tile_begin = split_range(args.cols, args.col_splits, split, tile_count);

  // Row statistics: warp w owns rows 16w..16w+15; lane l sees columns l and l + 32 of every tile and
  // keeps its own running (max, sum), merged across lanes at the end.
  constexpr int kRowsPerWarp = kRowBlock / 4;
  float run_max[kRowsPerWarp], run_sum[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) run_max[i] = -INFINITY, run_sum[i] = 0.f;

  for (int t = 0; t < tile_count; ++t) {
    const int64_t col0 = (tile_begin + t) * kColBlock;
    similarity_tile<T, kMode, kVectorized>(tiles, image, text, row0, args.rows, col0, args.cols, args.dim);

    const bool lo_ok = col0 + lane < args.cols, hi_ok = col0 + lane + 32 < args.cols;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp * kRowsPerWarp + i;
      const int64_t hole = row0 + r + args.diagonal - col0;  // the tile column the mask takes from row r
      const bool masked_lo = args.mask_diagonal && hole == lane, masked_hi = args.mask_diagonal && hole == lane + 32;
      const float v0 = lo_ok && !masked_lo ? scale2 * tiles.sim[r][lane] : -INFINITY;
      const float v1 = hi_ok && !masked_hi ? scale2 * tiles.sim[r][lane + 32] : -INFINITY;
      const float m = fmaxf(run_max[i], fmaxf(v0, v1));
      if (m == -INFINITY) continue;  // this lane has seen no valid (unmasked) column yet
      if (m > run_max[i]) run_sum[i] *= fast_exp2(run_max[i] - m);
      run_sum[i] += fast_exp2(v0 - m) + fast_exp2(v1 - m);
      run_max[i] = m;
    }

    // Column partials over this CTA's rows: thread pair (2c, 2c+1) owns column c, rows interleaved
    // (r = h, h + 2, ...) so the two threads read different shared-memory banks.
    const int c = threadIdx.x >> 1, h = threadIdx.x & 1;
    const int64_t hole = args.mask_diagonal ? col0 + c - args.diagonal - row0 : -1;  // the row the mask takes
    // The max is taken over scaled logits (base 2), so a negative scale is handled like any other.
    float col_max = -INFINITY;
    for (int r = h; r < kRowBlock; r += 2)
      if (row0 + r < args.rows && r != hole) col_max = fmaxf(col_max, scale2 * tiles.sim[r][c]);
    col_max = fmaxf(col_max, __shfl_xor_sync(kFullMask, col_max, 1));
    float col_sum = 0.f;
    // -inf: the mask took the block's only valid row from this column; the partial stays (-inf, 0).
    if (col_max != -INFINITY)
      for (int r = h; r < kRowBlock; r += 2)
        if (row0 + r < args.rows && r != hole) col_sum += fast_exp2(scale2 * tiles.sim[r][c] - col_max);
    col_sum += __shfl_xor_sync(kFullMask, col_sum, 1);
    if (h == 0 && col0 + c < args.cols) {
      const int64_t out = static_cast<int64_t>(blockIdx.x) * args.cols + col0 + c;
      args.col_max[out] = col_max * kLn2;
      args.col_sum[out] = col_sum;
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    float m = run_max[i], l = run_sum[i];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float m_other = __shfl_xor_sync(kFullMask, m, offset);
      const float l_other = __shfl_xor_sync(kFullMask, l, offset);
      const float m_new = fmaxf(m, m_other);
      l = (m == -INFINITY ? 0.f : l * fast_exp2(m - m_new)) +
          (m_other == -INFINITY ? 0.f : l_other * fast_exp2(m_other - m_new));
      m = m_new;
    }
    const int64_t row = row0 + warp * kRowsPerWarp + i;
    if (lane == 0 && row < args.rows) {
      args.row_max[static_cast<int64_t>(split) * args.rows + row] = m * kLn2;
      args.row_sum[static_cast<int64_t>(split) * args.rows + row] = l;
    }
  }
#else
  __trap();  // the host refuses devices below sm_80
#endif
}

template <typename T, Float32Mode kMode, bool kVectorized>
__global__ void __launch_bounds__(kThreads) lse_backward_kernel(LseBackwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  SharedTiles<T>& tiles = shared_tiles<T>();
  __shared__ float row_lse2[kRowBlock], row_grad[kRowBlock];
  const T* image = static_cast<const T*>(args.image);
  const T* text = static_cast<const T*>(args.text);
  T* grad_tile = static_cast<T*>(args.grad_tile);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowBlock;
  const float scale = *args.scale, scale2 = scale * kLog2e;
  const float tile_mul = scale * tile_scale(args.tile_scale);  // exact: the tile scale is a power of two
  for (int r = threadIdx.x; r < kRowBlock; r += kThreads) {
    const bool ok = row0 + r < args.rows;
    row_lse2[r] = ok ? args.row_lse[row0 + r] * kLog2e : 0.f;
    row_grad[r] = ok ? args.grad_row[row0 + r] : 0.f;
  }  // visible after the barriers inside similarity_tile
  int tile_count;
  const int64_t tile_begin = split_range(args.cols, args.col_splits, blockIdx.y, tile_count);

  // Thread owns column c of every tile and rows g, g + 2, ...: a warp reads and writes 32 consecutive
  // columns of one row at a time (conflict-free shared memory, coalesced stores).
  const int c = threadIdx.x % kColBlock, g = threadIdx.x / kColBlock;
  float scale_grad = 0.f;  // sum of G * <image_i, text_j>
  for (int t = 0; t < tile_count; ++t) {
    const int64_t col0 = (tile_begin + t) * kColBlock, col = col0 + c;
    similarity_tile<T, kMode, kVectorized>(tiles, image, text, row0, args.rows, col0, args.cols, args.dim);
    if (col >= args.cols) continue;
    const float col_lse2 = args.col_lse[col] * kLog2e, col_grad = args.grad_col[col];
    const int64_t hole = args.mask_diagonal ? col - args.diagonal - row0 : -1;  // the row the mask takes
    for (int r = g; r < kRowBlock; r += kThreads / kColBlock) {
      const int64_t row = row0 + r;
      if (row >= args.rows) break;
      if (r == hole) {  // G = 0, without evaluating exp(S - lse): a fully masked row's lse is -inf
        grad_tile[row * args.cols + col] = from_float<T>(0.f);
        continue;
      }
      const float dot = tiles.sim[r][c], v = scale2 * dot;
      const float grad = row_grad[r] * fast_exp2(v - row_lse2[r]) + col_grad * fast_exp2(v - col_lse2);
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
    lse_forward_kernel<typename V::Element, V::kMode, V::kVectorized><<<grid, kThreads, 0, stream>>>(args);
  });
}

cudaError_t launch_lse_backward(ElementType type, Float32Mode mode, const LseBackwardArgs& args, cudaStream_t stream) {
  return launch_variant(type, mode, args, [&](auto variant, dim3 grid) {
    using V = decltype(variant);
    lse_backward_kernel<typename V::Element, V::kMode, V::kVectorized><<<grid, kThreads, 0, stream>>>(args);
  });
}

}  // namespace cuda
}  // namespace fastclip
