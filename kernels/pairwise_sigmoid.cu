// Fused similarity + pairwise sigmoid (SigLIP) loss kernels, forward and backward.
//
// The CTA layout and the similarity tiles are those of the contrastive kernels (similarity_tile.cuh):
// one CTA of 8 warps owns kRowBlock = 128 rows of `image` and sweeps the 128-column tiles of its split;
// each tile of dot products is computed on the tensor cores and consumed in shared memory:
//  - forward: per row, the sum over the tile's columns of softplus(-z * L), L = s * dot + b, added to a
//    compensated (Kahan) running sum: a row sums up to N positive terms in fp32, and compensation keeps
//    the result at fp32 accuracy whatever N is. Only [splits, rows] partials leave the CTA.
//  - backward: G = -g * z * sigmoid(-z * L) written (times s and the tile scale) to the caller's gradient
//    tile, plus the CTA's sums of G * dot and of G (the logit_scale and logit_bias gradients).
// Both functions are evaluated from exp(-|u|) <= 1, so large logits of either sign neither overflow nor
// lose the small terms; the log uses the accurate log1pf (the exponential's relative error barely moves
// the final value, the log's would).
// Labels are compared per pair (z = +1 on equal labels), so any positive structure (one per row,
// several, none) costs the same and nothing of size n x N is stored.
#include <cstdint>

#include "pairwise_sigmoid.cuh"
#include "similarity_tile.cuh"

namespace fastclip {
namespace cuda {
namespace {

using namespace tile;

// softplus(u) = log(1 + e^u) = max(u, 0) + log1p(e^-|u|).
__device__ __forceinline__ float softplus(float u) { return fmaxf(u, 0.f) + log1pf(fast_exp2(-fabsf(u) * kLog2e)); }

// sigmoid(u) = 1 / (1 + e^-u), computed from e^-|u| so that neither sign overflows.
__device__ __forceinline__ float sigmoid(float u) {
  const float e = fast_exp2(-fabsf(u) * kLog2e);
  const float p = 1.f / (1.f + e);
  return u >= 0.f ? p : e * p;
}

template <typename T, Float32Mode kMode, bool kVectorized>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<T>) sigmoid_forward_kernel(SigmoidForwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  SharedTiles<T>& tiles = shared_tiles<T>();
  const T* image = static_cast<const T*>(args.image);
  const T* text = static_cast<const T*>(args.text);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowBlock;
  const int split = blockIdx.y;
  const float scale = *args.scale, bias = *args.bias;
  int tile_count;
  const int64_t tile_begin = split_range(args.cols, args.col_splits, split, tile_count);

  // Each lane sums its half row (HalfRow) into a compensated running sum; the two halves are added at
  // the end. The layout is recomputed after each tile, to keep registers free for its GEMM.
  float run_sum = 0.f, run_err = 0.f;  // Kahan sum and its compensation

  for (int t = 0; t < tile_count; ++t) {
    const int64_t col0 = (tile_begin + t) * kColBlock;
    similarity_tile<T, kMode, kVectorized>(tiles, image, text, row0, args.rows, col0, args.cols, args.dim);
    const HalfRow mine = half_row();
    const int64_t row = row0 + mine.row;
    if (row >= args.rows) continue;  // no barrier below: lanes of rows past the edge may skip the tile
    const int64_t label = args.row_labels[row];
    for (int k = 0; k < kHalfRow; ++k) {
      const int col = mine.col(k);
      if (col0 + col >= args.cols) continue;
      // softplus(-z * L): -L for a positive pair (z = +1), L for a negative one.
      const float logit = fmaf(scale, tiles.sim[mine.row][col], bias);
      const float term = softplus(label == args.col_labels[col0 + col] ? -logit : logit);
      const float y = term - run_err, total = run_sum + y;
      run_err = (total - run_sum) - y;
      run_sum = total;
    }
  }

  float sum = run_sum - run_err;
  sum += __shfl_xor_sync(kFullMask, sum, 1);
  const HalfRow mine = half_row();
  const int64_t row = row0 + mine.row;
  if (mine.col0 == 0 && row < args.rows) args.row_partial[static_cast<int64_t>(split) * args.rows + row] = sum;
#else
  __trap();  // the host refuses devices below sm_80
#endif
}

template <typename T, Float32Mode kMode, bool kVectorized>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<T>) sigmoid_backward_kernel(SigmoidBackwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  SharedTiles<T>& tiles = shared_tiles<T>();
  __shared__ int64_t row_label[kRowBlock];
  __shared__ float row_grad[kRowBlock];
  const T* image = static_cast<const T*>(args.image);
  const T* text = static_cast<const T*>(args.text);
  T* grad_tile = static_cast<T*>(args.grad_tile);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowBlock;
  const float scale = *args.scale, bias = *args.bias;
  const float tile_mul = scale * tile_scale(args.tile_scale);  // exact: the tile scale is a power of two
  for (int r = threadIdx.x; r < kRowBlock; r += kThreads) {
    const bool ok = row0 + r < args.rows;
    row_label[r] = ok ? args.row_labels[row0 + r] : 0;
    row_grad[r] = ok ? args.grad_row[row0 + r] : 0.f;
  }  // visible after the barriers inside similarity_tile
  int tile_count;
  const int64_t tile_begin = split_range(args.cols, args.col_splits, blockIdx.y, tile_count);

  // Thread owns column c of every tile and rows g, g + 2, ...: a warp reads and writes 32 consecutive
  // columns of one row at a time (conflict-free shared memory, coalesced stores).
  const int c = threadIdx.x % kColBlock, g = threadIdx.x / kColBlock;
  float scale_grad = 0.f, bias_grad = 0.f;  // sums of G * <image_i, text_j> and of G
  for (int t = 0; t < tile_count; ++t) {
    const int64_t col0 = (tile_begin + t) * kColBlock, col = col0 + c;
    similarity_tile<T, kMode, kVectorized>(tiles, image, text, row0, args.rows, col0, args.cols, args.dim);
    if (col >= args.cols) continue;
    const int64_t label = args.col_labels[col];
    for (int r = g; r < kRowBlock; r += kThreads / kColBlock) {
      const int64_t row = row0 + r;
      if (row >= args.rows) break;
      const float dot = tiles.sim[r][c], logit = fmaf(scale, dot, bias);
      // G = -g * z * sigmoid(-z * L): -g * sigmoid(-L) for a positive pair, g * sigmoid(L) for a negative one.
      const float grad = row_label[r] == label ? -row_grad[r] * sigmoid(-logit) : row_grad[r] * sigmoid(logit);
      scale_grad = fmaf(grad, dot, scale_grad);
      bias_grad += grad;
      grad_tile[row * args.cols + col] = from_float<T>(tile_mul * grad);
    }
  }

  store_cta_sum(scale_grad, args.scale_partial);
  store_cta_sum(bias_grad, args.bias_partial);
#else
  __trap();
#endif
}

}  // namespace

cudaError_t launch_sigmoid_forward(ElementType type, Float32Mode mode, const SigmoidForwardArgs& args,
                                   cudaStream_t stream) {
  return launch_variant(type, mode, args, [&](auto variant, dim3 grid) {
    using V = decltype(variant);
    launch_tile_kernel<typename V::Element>(sigmoid_forward_kernel<typename V::Element, V::kMode, V::kVectorized>, grid,
                                            stream, args);
  });
}

cudaError_t launch_sigmoid_backward(ElementType type, Float32Mode mode, const SigmoidBackwardArgs& args,
                                    cudaStream_t stream) {
  return launch_variant(type, mode, args, [&](auto variant, dim3 grid) {
    using V = decltype(variant);
    launch_tile_kernel<typename V::Element>(sigmoid_backward_kernel<typename V::Element, V::kMode, V::kVectorized>, grid,
                                            stream, args);
  });
}

int sigmoid_forward_ctas_per_sm(ElementType type, Float32Mode mode) {
  return tile_occupancy(type, mode, [](auto v) {
    using V = decltype(v);
    return sigmoid_forward_kernel<typename V::Element, V::kMode, V::kVectorized>;
  });
}

int sigmoid_backward_ctas_per_sm(ElementType type, Float32Mode mode) {
  return tile_occupancy(type, mode, [](auto v) {
    using V = decltype(v);
    return sigmoid_backward_kernel<typename V::Element, V::kMode, V::kVectorized>;
  });
}

}  // namespace cuda
}  // namespace fastclip
