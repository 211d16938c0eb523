// Launchers of the fused contrastive log-sum-exp kernels: plain CUDA C++, raw pointers, no ATen,
// so this compiles with nvcc alone (CI compiles it without a GPU or a CUDA build of PyTorch).
//
// Forward: for S = s * image @ text^T, tile by tile (never stored), each CTA of kRowBlock rows and one
// column split writes
//   per row and split : (max, sum exp(S - max)) over the split's columns       -> row_max/row_sum [splits, rows]
//   per row block, col: (max, sum exp(S - max)) over the block's rows          -> col_max/col_sum [row_blocks, cols]
// which the host merges into log-sum-exps. Backward: per tile, recompute S and write
//   grad_tile = s * (gr[i] * exp(S - row_lse[i]) + gc[j] * exp(S - col_lse[j]))  [rows, cols]
// plus one partial sum of G * <image_i, text_j> per CTA (the logit_scale gradient); the host turns the
// gradient tile into feature gradients with two GEMMs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastclip {
namespace cuda {

constexpr int kRowBlock = 64;  // rows per CTA
constexpr int kColBlock = 64;  // columns per tile

enum class ElementType { kFloat32, kBFloat16, kFloat16 };

// How float32 inputs use the tensor cores: one TF32 product (what torch does when TF32 is allowed), or
// three (hi*hi + hi*lo + lo*hi, near-fp32 accuracy, for the default "highest" matmul precision).
enum class Float32Mode { kTf32, kTf32x3 };

// Number of column splits actually used for `cols` columns when `requested` are asked for: every split
// gets at least one tile and all but the last get the same number.
inline int plan_col_splits(int64_t cols, int requested) {
  const int64_t tiles = (cols + kColBlock - 1) / kColBlock;
  const int64_t want = requested < 1 ? 1 : (requested > tiles ? tiles : requested);
  const int64_t per_split = (tiles + want - 1) / want;
  return static_cast<int>((tiles + per_split - 1) / per_split);
}

struct LseForwardArgs {
  const void* image;   // [rows, dim], row-major, contiguous
  const void* text;    // [cols, dim]
  int64_t rows, cols, dim;
  const float* scale;  // device scalar s
  int col_splits;      // from plan_col_splits
  float* row_max;      // [col_splits, rows]
  float* row_sum;
  float* col_max;      // [ceil(rows / kRowBlock), cols]
  float* col_sum;
};

struct LseBackwardArgs {
  const void* image;   // [rows, dim]: the rows of this chunk
  const void* text;    // [cols, dim]
  int64_t rows, cols, dim;
  const float* scale;
  const float* grad_row;  // [rows]
  const float* row_lse;   // [rows]
  const float* grad_col;  // [cols]
  const float* col_lse;   // [cols]
  int col_splits;
  void* grad_tile;        // [rows, cols], same element type as the inputs, holds s * G
  float* scale_partial;   // [ceil(rows / kRowBlock) * col_splits]
};

cudaError_t launch_lse_forward(ElementType type, Float32Mode mode, const LseForwardArgs& args, cudaStream_t stream);
cudaError_t launch_lse_backward(ElementType type, Float32Mode mode, const LseBackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastclip
