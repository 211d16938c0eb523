// The chunked path of contrastive_lse, contrastive_lse_backward and contrastive_loss_backward (the math is
// in ops/contrastive_lse.h and ops/contrastive_loss_backward.h): every product of features is a GEMM, and
// one epilogue pass per chunk turns the similarities into the loss's quantities.
//
//  - forward: per chunk of rows, dots = image_c @ text^T (a GEMM with an fp32 output, or fp64 for fp64
//    features) into a scratch within a byte budget, then the epilogue reads it once and writes (max,
//    sum-of-exp) partials of every row (per tile of columns) and of every column (per split of rows);
//    small merges turn them into the chunk's row log-sum-exps and fold the column partials into running
//    column accumulators (online log-sum-exp: the running max, never a fixed one).
//  - backward: per block of rows x columns (the loop of gradient_blocks.h), the same GEMM, then the
//    epilogue writes s * G for the block in the input dtype, and the loop's two GEMMs give the feature
//    gradients; the epilogue's per-unit partials give the logit_scale gradient.
// The driver (chunked_loss.cpp) is device-agnostic ATen code: chunk planning, the GEMMs, the masked
// diagonal's offset in each chunk, the merges. The epilogue is the only device-specific part: CUDA kernels
// (cuda/chunked_epilogue_cuda.cu) or their CPU twin (cpu/chunked_epilogue_cpu.cpp), with the same units
// of work (chunked/epilogue_geometry.h), so that CPU tests run the CUDA path's arithmetic.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "chunked/epilogue_geometry.h"

namespace fastclip {
namespace chunked {

// What every epilogue reads: the dot products <image_i, text_j> of one chunk or block.
struct Dots {
  at::Tensor dots;                  // [rows, cols], contiguous, accumulation dtype (unscaled)
  at::Tensor scale;                 // 0-d, accumulation dtype, on the device: s
  std::optional<int64_t> diagonal;  // leave out the entries (i, i + diagonal), indices local to `dots`
  EpilogueGrid grid;                // the units of work (epilogue_geometry.h)
};

struct ForwardChunk : Dots {
  at::Tensor row_max, row_sum;  // [col_tiles, rows]: per row, over the columns of one tile (max in s units)
  at::Tensor col_max, col_sum;  // [row_splits, cols]: per column, over the rows of one split
};

struct BackwardChunk : Dots {
  at::Tensor grad_row, row_lse;           // [rows], accumulation dtype
  at::Tensor grad_col, col_lse;           // [cols]
  at::Tensor grad_tile;                   // [rows, cols], input dtype: tile_scale * s * G
  std::optional<at::Tensor> tile_scale;   // 0-d fp32 power of two (fp16 tiles, TileScaling); none: 1
  at::Tensor scale_partial;               // [units], accumulation dtype: sum of G * dot over each unit
};

// contrastive_loss_backward's block: G = gr P_row + gc P_col - gp [row_id == col_id] - gu, with each pair
// entry (partner[i] - col_offset) left at 0 and its ingredients collected instead.
struct LossChunk : BackwardChunk {
  at::Tensor grad_positive;           // [rows]
  at::Tensor grad_uniform;            // 0-d
  at::Tensor row_ids, col_ids;        // int64 [rows], [cols]
  at::Tensor partner;                 // int64 [rows]: a column of the whole matrix, or -1
  int64_t col_offset = 0;             // this block's first column in the whole matrix
  at::Tensor row_rest;                // [col_tiles, rows]: P_row over the other entries of each tile
  at::Tensor col_rest;                // [row_splits, cols]: P_col over the other entries of each split
  at::Tensor pair_dot;                // [rows]: the pair's dot product, written where it lies in this block
};

// pairwise_sigmoid's block in one pass (chunked_sigmoid.h): with L = s * dot + b and z = +1 where the
// labels agree (-1 elsewhere), each row's sum of softplus(-z * L) over the block and G = -g_i * z *
// sigmoid(-z * L), the gradient of sum_i g_i * row_loss_i.
struct SigmoidChunk : Dots {
  at::Tensor bias;                       // 0-d, accumulation dtype: b
  at::Tensor grad_row;                   // [rows]: g
  at::Tensor row_labels, col_labels;     // int64 [rows], [cols]
  at::Tensor grad_tile;                  // [rows, cols], input dtype: tile_scale * s * G
  std::optional<at::Tensor> tile_scale;  // as BackwardChunk's
  at::Tensor row_loss;                   // [col_tiles, rows]: softplus(-z * L) over each tile
  at::Tensor scale_partial;              // [units]: sum of G * dot over each unit
  at::Tensor bias_partial;               // [units]: sum of G over each unit
};

// The device-specific part: one pass over the dots of a chunk or block, writing what the structs name.
class Epilogue {
 public:
  virtual ~Epilogue() = default;
  // How many units of work a chunk should be split into on this device (plan_epilogue's target).
  virtual int64_t target_units(const at::Tensor& like) const = 0;
  virtual void forward(const ForwardChunk& chunk) const = 0;
  virtual void lse_backward(const BackwardChunk& chunk) const = 0;
  virtual void loss_backward(const LossChunk& chunk) const = 0;
  virtual void sigmoid(const SigmoidChunk& chunk) const = 0;
};

// The ops on the chunked path; arguments checked by the caller. budget_bytes bounds the scratch of the
// similarities (and, in the backward, of the gradient tile beside it).
std::tuple<at::Tensor, at::Tensor> contrastive_lse(const at::Tensor& image, const at::Tensor& text,
                                                   const at::Tensor& logit_scale,
                                                   std::optional<int64_t> masked_diagonal, const Epilogue& epilogue,
                                                   int64_t budget_bytes);

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_lse_backward(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& logit_scale, const at::Tensor& row_lse, const at::Tensor& col_lse,
    std::optional<int64_t> masked_diagonal, const Epilogue& epilogue, int64_t budget_bytes);

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_backward(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& grad_positive,
    const at::Tensor& grad_uniform, const at::Tensor& grad_pair, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& logit_scale, const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& row_ids,
    const at::Tensor& col_ids, const at::Tensor& partner, std::optional<int64_t> masked_diagonal,
    const Epilogue& epilogue, int64_t budget_bytes);

}  // namespace chunked
}  // namespace fastclip
