// Launchers of the fused pairwise sigmoid (SigLIP) loss kernels: plain CUDA C++, raw pointers, no ATen,
// so this compiles with nvcc alone (CI compiles it without a GPU or a CUDA build of PyTorch).
//
// For S = s * image @ text^T, L = S + b and z_ij = +1 where row_labels[i] == col_labels[j], -1 elsewhere,
// tile by tile (never stored):
//   forward : per row and column split, sum_j softplus(-z_ij * L_ij) over the split's columns
//             -> row_partial [splits, rows], which the host sums into the row losses;
//   backward: G_ij = -g_i * z_ij * sigmoid(-z_ij * L_ij), written as grad_tile = tile_scale * s * G
//             [rows, cols] (a sigmoid is at most 1, so |entry| <= tile_scale * |s| * max |g|), plus
//             per-CTA partial sums of G * <image_i, text_j> (the logit_scale gradient) and of G (the
//             logit_bias gradient); the host turns the tile into feature gradients with two GEMMs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tile_config.cuh"

namespace fastclip {
namespace cuda {

struct SigmoidForwardArgs {
  const void* image;          // [rows, dim], row-major, contiguous
  const void* text;           // [cols, dim]
  int64_t rows, cols, dim;
  const float* scale;         // device scalar s
  const float* bias;          // device scalar b
  const int64_t* row_labels;  // [rows]
  const int64_t* col_labels;  // [cols]
  int col_splits;             // from plan_col_splits
  float* row_partial;         // [col_splits, rows]
};

struct SigmoidBackwardArgs {
  const void* image;          // [rows, dim]: the rows of this block
  const void* text;           // [cols, dim]: the columns of this block
  int64_t rows, cols, dim;
  const float* scale;
  const float* bias;
  const float* grad_row;      // [rows]: upstream gradient of the row losses
  const int64_t* row_labels;  // [rows]
  const int64_t* col_labels;  // [cols]
  int col_splits;
  void* grad_tile;            // [rows, cols], same element type as the inputs, holds tile_scale * s * G
  const float* tile_scale;    // device scalar, a power of two keeping fp16 tiles in range; nullptr: 1
  float* scale_partial;       // [ceil(rows / kRowBlock) * col_splits]: sum of G * <image_i, text_j>
  float* bias_partial;        // [ceil(rows / kRowBlock) * col_splits]: sum of G
};

cudaError_t launch_sigmoid_forward(ElementType type, Float32Mode mode, const SigmoidForwardArgs& args,
                                   cudaStream_t stream);
cudaError_t launch_sigmoid_backward(ElementType type, Float32Mode mode, const SigmoidBackwardArgs& args,
                                    cudaStream_t stream);

// CTAs of each kernel that one SM of the current device runs at once (see contrastive_lse.cuh).
int sigmoid_forward_ctas_per_sm(ElementType type, Float32Mode mode);
int sigmoid_backward_ctas_per_sm(ElementType type, Float32Mode mode);

}  // namespace cuda
}  // namespace fastclip
