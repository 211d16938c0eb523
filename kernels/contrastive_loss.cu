// The fused backward of a whole contrastive loss (fastclip::contrastive_loss_backward): the layout and tile
// machinery of lse_backward_kernel (contrastive_lse.cu), with the loss's target terms folded into the
// gradient tile in fp32 and the pair entries left to the host, which fills them in from the rests of
// their row and column that this kernel collects (LossTerms in contrastive_lse.cuh). A file of its own,
// so that the log-sum-exp kernels compile exactly as before.
#include <cstdint>

#include "contrastive_lse.cuh"
#include "shared_exponential.cuh"
#include "similarity_tile.cuh"

namespace fastclip {
namespace cuda {
namespace {

using namespace tile;

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// contrastive_loss_backward's sweep (LossTerms in contrastive_lse.cuh); the layout of lse_backward_kernel.
// Every lane stays in the row loop, so that each row's rest is a warp reduction: warp w covers columns
// 32 (w % 4) .. + 31 of the rows r = g, g + 2, ... (g = w / 4), and its lane 0 alone adds that quarter-row's
// sum to rest[w % 4][r]: a fixed order, so the result is deterministic.
template <typename T, Float32Mode kMode, bool kVectorized>
__device__ __forceinline__ void loss_backward_sweep(const LossBackwardArgs& args, SharedTiles<T>& tiles,
                                                    const BackwardRows& rows, float* scratch, float scale2,
                                                    float tile_mul, float& scale_grad) {
  constexpr int kQuarters = kColBlock / 32, kRowStep = kThreads / kColBlock;
  __shared__ float row_pos[kRowBlock], rest[kQuarters][kRowBlock];
  __shared__ int64_t row_id[kRowBlock], row_pair[kRowBlock];
  const LossTerms& loss = args.loss;
  const T* image = static_cast<const T*>(args.image);
  const T* text = static_cast<const T*>(args.text);
  T* grad_tile = static_cast<T*>(args.grad_tile);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowBlock;
  for (int r = threadIdx.x; r < kRowBlock; r += kThreads) {
    const bool ok = row0 + r < args.rows;
    row_pos[r] = ok ? loss.grad_positive[row0 + r] : 0.f;
    row_id[r] = ok ? loss.row_ids[row0 + r] : -1;
    row_pair[r] = ok ? loss.partner[row0 + r] - loss.col_offset : -1;  // a column of this block, if in range
#pragma unroll
    for (int q = 0; q < kQuarters; ++q) rest[q][r] = 0.f;
  }  // visible after the barriers inside similarity_tile
  const float uniform = *loss.grad_uniform;
  int tile_count;
  const int64_t tile_begin = split_range(args.cols, args.col_splits, blockIdx.y, tile_count);
  const int c = threadIdx.x % kColBlock, g = threadIdx.x / kColBlock, quarter = (threadIdx.x / 32) % kQuarters;
  for (int t = 0; t < tile_count; ++t) {
    const int64_t col0 = (tile_begin + t) * kColBlock, col = col0 + c;
    similarity_tile<T, kMode, kVectorized>(tiles, image, text, row0, args.rows, col0, args.cols, args.dim);
    const bool col_ok = col < args.cols;
    const float col_lse2 = col_ok ? args.col_lse[col] * kLog2e : 0.f, col_grad = col_ok ? args.grad_col[col] : 0.f;
    bool shared;
    const float ref = backward_tile_reference(rows, col_lse2, col_ok && col_grad != 0.f, scratch, shared);
    // Where shared: P_row = e * 2^(ref - row lse), P_col = e * 2^(ref - col lse), e = 2^(v - ref).
    const float row_shift = shared ? fast_exp2(ref - rows.ref) : 0.f;
    const float col_factor = shared && col_grad != 0.f ? fast_exp2(ref - col_lse2) : 0.f;
    const int64_t col_id = col_ok ? loss.col_ids[col] : -1;
    const int64_t hole = args.mask_diagonal ? col - args.diagonal - row0 : -1;  // the row the mask takes
    float col_rest = 0.f;
    for (int r = g; r < kRowBlock; r += kRowStep) {
      const int64_t row = row0 + r;
      if (row >= args.rows) break;  // the same r for the whole warp
      const float dot = tiles.sim[r][c], v = scale2 * dot;
      const bool pair = col_ok && row_pair[r] == col;
      float p_row = 0.f, grad = 0.f;
      if (col_ok && r != hole && !pair) {
        float p_col;
        if (shared) {
          const float e = fast_exp2(v - ref);
          p_row = e * (rows.row_factor[r] * row_shift);
          p_col = e * col_factor;
        } else {
          p_row = fast_exp2(v - rows.row_lse2[r]);
          p_col = col_grad != 0.f ? fast_exp2(v - col_lse2) : 0.f;  // SupCon has no column terms
        }
        col_rest += p_col;
        const float target = (row_id[r] == col_id ? row_pos[r] : 0.f) + uniform;
        grad = rows.row_grad[r] * p_row + col_grad * p_col - target;
        scale_grad = fmaf(grad, dot, scale_grad);
      }
      if (pair) loss.pair_dot[row] = dot;
      if (col_ok) grad_tile[row * args.cols + col] = from_float<T>(tile_mul * grad);
      const float quarter_row = warp_sum(p_row);
      if (threadIdx.x % 32 == 0) rest[quarter][r] += quarter_row;
    }
    if (col_ok) loss.col_rest[(kRowStep * static_cast<int64_t>(blockIdx.x) + g) * args.cols + col] = col_rest;
  }
  __syncthreads();  // every warp's rest is in
  for (int r = threadIdx.x; r < kRowBlock; r += kThreads)
    if (row0 + r < args.rows) {
      float total = 0.f;
#pragma unroll
      for (int q = 0; q < kQuarters; ++q) total += rest[q][r];
      loss.row_rest[static_cast<int64_t>(blockIdx.y) * args.rows + row0 + r] = total;
    }
}

// lse_backward_kernel's preamble (contrastive_lse.cu), then the loss sweep.
template <typename T, Float32Mode kMode, bool kVectorized>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<T>) loss_backward_kernel(LossBackwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  SharedTiles<T>& tiles = shared_tiles<T>();
  __shared__ float row_lse2[kRowBlock], row_grad[kRowBlock], row_factor[kRowBlock], scratch[2 * kWarps];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowBlock;
  const float scale = *args.scale, scale2 = scale * kLog2e;
  const float tile_mul = scale * tile_scale(args.tile_scale);  // exact: the tile scale is a power of two
  const BackwardRows rows =
      load_backward_rows(row_lse2, row_grad, row_factor, args.row_lse, args.grad_row, row0, args.rows, scratch);
  float scale_grad = 0.f;  // sum of G * <image_i, text_j>
  loss_backward_sweep<T, kMode, kVectorized>(args, tiles, rows, scratch, scale2, tile_mul, scale_grad);
  store_cta_sum(scale_grad, args.scale_partial);
#else
  __trap();
#endif
}

}  // namespace

cudaError_t launch_loss_backward(ElementType type, Float32Mode mode, const LossBackwardArgs& args, cudaStream_t stream) {
  if (args.loss.grad_positive == nullptr) return cudaErrorInvalidValue;
  return launch_variant(type, mode, args, [&](auto variant, dim3 grid) {
    using V = decltype(variant);
    launch_tile_kernel<typename V::Element>(loss_backward_kernel<typename V::Element, V::kMode, V::kVectorized>, grid,
                                            stream, args);
  });
}

int loss_backward_ctas_per_sm(ElementType type, Float32Mode mode) {
  return tile_occupancy(type, mode, [](auto v) {
    using V = decltype(v);
    return loss_backward_kernel<typename V::Element, V::kMode, V::kVectorized>;
  });
}

}  // namespace cuda
}  // namespace fastclip
