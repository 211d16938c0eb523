// Launchers of the fused contrastive log-sum-exp kernels: plain CUDA C++, raw pointers, no ATen,
// so this compiles with nvcc alone (CI compiles it without a GPU or a CUDA build of PyTorch).
//
// Forward: for S = s * image @ text^T, tile by tile (never stored), each CTA of kRowBlock rows and one
// column split writes
//   per row and split : (max, sum exp(S - max)) over the split's columns       -> row_max/row_sum [splits, rows]
//   per row block, col: (max, sum exp(S - max)) over the block's rows          -> col_max/col_sum [row_blocks, cols]
// which the host merges into log-sum-exps. Backward: per tile, recompute S and write
//   grad_tile = tile_scale * s * (gr[i] * exp(S - row_lse[i]) + gc[j] * exp(S - col_lse[j]))  [rows, cols]
// (both exponentials are at most 1 for the true log-sum-exps, so |entry| <= tile_scale * |s| *
// (max |gr| + max |gc|): the bound the host picks tile_scale from)
// plus one partial sum of G * <image_i, text_j> per CTA (the logit_scale gradient); the host turns the
// gradient tile into feature gradients with two GEMMs.
// With mask_diagonal the entries (i, j) with j - i == diagonal (indices local to the arguments' rows and
// columns) count as S = -inf: left out of both reductions, G = 0 there. A partial that sees no entry
// (every one masked) is written as (max, sum) = (-inf, 0).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tile_config.cuh"

namespace fastclip {
namespace cuda {

struct LseForwardArgs {
  const void* image;   // [rows, dim], row-major, contiguous
  const void* text;    // [cols, dim]
  int64_t rows, cols, dim;
  const float* scale;  // device scalar s
  bool mask_diagonal;  // leave out the entries (i, i + diagonal)
  int64_t diagonal;    // |diagonal| < rows + cols (the host drops diagonals that miss the matrix)
  int col_splits;      // from plan_col_splits
  float* row_max;      // [col_splits, rows]
  float* row_sum;
  float* col_max;      // [ceil(rows / kRowBlock), cols]
  float* col_sum;
};

// The target terms of contrastive_loss_backward (csrc/ops/contrastive_loss_backward.h): the kernel writes
//   G = gr P_row + gc P_col - grad_positive[i] (row_ids[i] == col_ids[j]) - *grad_uniform
// and leaves the pair entries (j + col_offset == partner[i]) at 0, collecting their ingredients instead
// for the host: the rests of P_row (per row and column split) and of P_col (per row block, thread group
// and column) over the other entries, and the pair's dot product.
struct LossTerms {
  const float* grad_positive;  // [rows]; nullptr: contrastive_lse_backward (the fields below unused)
  const float* grad_uniform;   // device scalar
  const int64_t* row_ids;      // [rows]
  const int64_t* col_ids;      // [cols]
  const int64_t* partner;      // [rows]: a column of the whole matrix, or -1
  int64_t col_offset;          // this block's first column in the whole matrix
  float* row_rest;             // [col_splits, rows]
  float* col_rest;             // [2 * ceil(rows / kRowBlock), cols]: per row block and half of its rows
  float* pair_dot;             // [rows]: written where the pair entry lies in this block
};

struct LseBackwardArgs {
  const void* image;   // [rows, dim]: the rows of this block
  const void* text;    // [cols, dim]: the columns of this block
  int64_t rows, cols, dim;
  const float* scale;
  bool mask_diagonal;
  int64_t diagonal;       // relative to this block's first row and column
  const float* grad_row;  // [rows]
  const float* row_lse;   // [rows]
  const float* grad_col;  // [cols]
  const float* col_lse;   // [cols]
  int col_splits;
  void* grad_tile;        // [rows, cols], same element type as the inputs, holds tile_scale * s * G
  const float* tile_scale;  // device scalar, a power of two keeping fp16 tiles in range; nullptr: 1
  float* scale_partial;   // [ceil(rows / kRowBlock) * col_splits]
};

// contrastive_loss_backward's kernel: the backward's arguments plus the loss's. (A struct of its own: a
// larger LseBackwardArgs changed the log-sum-exp kernels' register allocation.)
struct LossBackwardArgs : LseBackwardArgs {
  LossTerms loss;
};

cudaError_t launch_lse_forward(ElementType type, Float32Mode mode, const LseForwardArgs& args, cudaStream_t stream);
cudaError_t launch_lse_backward(ElementType type, Float32Mode mode, const LseBackwardArgs& args, cudaStream_t stream);
// contrastive_loss_backward's kernel (contrastive_loss.cu).
cudaError_t launch_loss_backward(ElementType type, Float32Mode mode, const LossBackwardArgs& args, cudaStream_t stream);

// CTAs of each kernel that one SM of the current device runs at once (the CUDA occupancy calculator):
// the host sizes its column splits so that the grid fills the GPU.
int lse_forward_ctas_per_sm(ElementType type, Float32Mode mode);
int lse_backward_ctas_per_sm(ElementType type, Float32Mode mode);
int loss_backward_ctas_per_sm(ElementType type, Float32Mode mode);

}  // namespace cuda
}  // namespace fastclip
