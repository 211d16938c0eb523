// Launchers of the chunked path's epilogue kernels (csrc/chunked/chunked_loss.h): plain CUDA C++, raw
// pointers, no ATen, so this compiles with nvcc alone.
//
// Each kernel reads one chunk (or block) of dot products <image_i, text_j> [rows, cols] in fp32, written
// by a cuBLAS GEMM, once. Its units of work are warps (csrc/chunked/epilogue_geometry.h): a tile of 256
// columns of one row split; unit u takes tile u % col_tiles of split u / col_tiles.
//  - forward: per row and tile, (max, sum exp(S - max)) -> row_max/row_sum [col_tiles, rows]; per column
//    and split, the running (max, sum) over the split's rows -> col_max/col_sum [row_splits, cols]; maxes
//    in units of S (natural logs). The host merges both.
//  - backward: grad_tile = tile_scale * s * (gr[i] exp(S - row_lse[i]) + gc[j] exp(S - col_lse[j]))
//    in the tile's element type, and per unit the sum of G * dot -> scale_partial[unit].
//  - loss backward: G of contrastive_loss_backward (LossTerms in contrastive_lse.cuh, the same fields),
//    with per row and tile the rest of P_row -> row_rest [col_tiles, rows] and per column and split the
//    rest of P_col -> col_rest [row_splits, cols].
// S = s * dot. With mask_diagonal the entries (i, j) with j - i == diagonal count as S = -inf: left out of
// every reduction, G = 0 there. A partial that sees no entry is (-inf, 0).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tile_config.cuh"

namespace fastclip {
namespace cuda {

struct ChunkShape {
  const float* dots;   // [rows, cols], row-major, contiguous
  int64_t rows, cols;
  const float* scale;  // device scalar s
  bool mask_diagonal;
  int64_t diagonal;    // relative to this chunk's first row and column (far from int64 overflow: the host
                       // drops diagonals that miss the whole matrix)
  int64_t col_tiles, row_splits, rows_per_split;  // EpilogueGrid
};

struct ChunkForwardArgs {
  ChunkShape shape;
  float* row_max;  // [col_tiles, rows]
  float* row_sum;
  float* col_max;  // [row_splits, cols]
  float* col_sum;
};

struct ChunkBackwardArgs {
  ChunkShape shape;
  const float* grad_row;    // [rows]
  const float* row_lse;     // [rows]
  const float* grad_col;    // [cols]
  const float* col_lse;     // [cols]
  void* grad_tile;          // [rows, cols], the inputs' element type
  const float* tile_scale;  // device scalar (a power of two for fp16 tiles), or nullptr: 1
  float* scale_partial;     // [col_tiles * row_splits]
};

struct ChunkLossArgs {
  ChunkBackwardArgs base;
  const float* grad_positive;  // [rows]
  const float* grad_uniform;   // device scalar
  const int64_t* row_ids;      // [rows]
  const int64_t* col_ids;      // [cols]
  const int64_t* partner;      // [rows]: a column of the whole matrix, or -1
  int64_t col_offset;          // this block's first column in the whole matrix
  float* row_rest;             // [col_tiles, rows]
  float* col_rest;             // [row_splits, cols]
  float* pair_dot;             // [rows]: written where the pair entry lies in this block
};

// The sigmoid loss's one pass (csrc/chunked/chunked_sigmoid.h): L = s * dot + b, z = +1 where the labels
// agree, -1 elsewhere; per row and tile the sum of softplus(-z L) -> row_loss [col_tiles, rows];
// grad_tile = tile_scale * s * G with G = -grad_row[i] * z * sigmoid(-z L); per unit the sums of G * dot
// and of G, each added row by row in double (a unit may hold millions of entries).
struct ChunkSigmoidArgs {
  ChunkShape shape;          // mask_diagonal false
  const float* bias;         // device scalar b
  const float* grad_row;     // [rows]
  const int64_t* row_labels;  // [rows]
  const int64_t* col_labels;  // [cols]
  void* grad_tile;           // [rows, cols], the inputs' element type
  const float* tile_scale;   // device scalar (a power of two for fp16 tiles), or nullptr: 1
  float* row_loss;           // [col_tiles, rows]
  float* scale_partial;      // [col_tiles * row_splits]
  float* bias_partial;       // [col_tiles * row_splits]
};

cudaError_t launch_chunk_forward(const ChunkForwardArgs& args, cudaStream_t stream);
cudaError_t launch_chunk_backward(ElementType type, const ChunkBackwardArgs& args, cudaStream_t stream);
cudaError_t launch_chunk_loss_backward(ElementType type, const ChunkLossArgs& args, cudaStream_t stream);
cudaError_t launch_chunk_sigmoid(ElementType type, const ChunkSigmoidArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastclip
