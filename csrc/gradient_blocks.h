// The backward loop shared by every "s * G, then two GEMMs" backward, on any device (ATen only): the
// fused CUDA kernels (cuda/cuda_glue.h wraps it with their launch geometry) and the chunked path
// (chunked/chunked_loss.cpp, on CUDA and on CPU).
//
// For a block of rows x columns, the op writes s * G for the block into a scratch tile in the input dtype
// (fp16 tiles times a power of two that keeps them in range, see TileScaling), and two GEMMs turn it into
// the feature gradients (the G @ text product has a D-wide output that does not fit in registers; a real
// GEMM runs it near peak). backward_through_blocks() runs that loop; the op supplies only the fill of one
// block.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace fastclip {

// The dtype sums are kept in: fp32, or fp64 for fp64 features (the CPU backend takes those).
inline at::ScalarType accumulate_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// out = a @ b in out's dtype (the accumulation dtype), for a and b in the input dtype: bf16/fp16 products
// are not rounded to 16 bits before they are summed. CUDA has the GEMM with a wider output
// (aten::mm.dtype_out); the CPU has none, and a GEMM on upcast copies is the same arithmetic (every
// bf16/fp16 product is exact in fp32). fp32 GEMMs follow torch's TF32 policy, as any at::mm does.
inline void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) at::mm_out(out, a, b);
  else if (a.is_cuda()) at::mm_out(out, a, b, out.scalar_type());
  else at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
}

// a @ b with an fp32 result (mm_into with a fresh output).
inline at::Tensor mm_fp32(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::mm(a, b);
  auto out = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kFloat));
  mm_into(out, a, b);
  return out;
}

// sum = a @ b (first) or sum += a @ b, into a `sum` of the accumulation dtype; a and b in the input dtype.
inline void add_product(at::Tensor& sum, bool first, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == sum.scalar_type()) {
    if (first) at::mm_out(sum, a, b);
    else sum.addmm_(a, b);
    return;
  }
  if (first) {
    mm_into(sum, a, b);
    return;
  }
  auto product = at::empty_like(sum);
  mm_into(product, a, b);
  sum.add_(product);
}

// How an fp16 gradient tile is kept in range. s * G spans far more than fp16 does: at N = 16384, D = 768,
// s = 100 about 85% of its entries lie below fp16's smallest subnormal (6e-8) and would flush to zero.
// The kernel stores factor * s * G instead, factor = 2^k chosen so that the largest entry the tile can
// hold lands in (2^14, 2^15], safely below fp16's max (65504); the GEMMs then run with fp32 outputs
// (a scaled fp16 output could overflow) and `inverse` undoes the factor exactly (a power of two).
struct TileScaling {
  at::Tensor factor;   // 0-d fp32 on the device: read by the kernel, no host sync
  at::Tensor inverse;  // 0-d fp32: 1 / factor
};

constexpr int kTileExponent = 15;  // the largest possible tile entry is kept in (2^14, 2^15]

// 2^k for an int32 tensor k in [-126, 126], assembled from the float's bits: exact, no exp2 rounding.
inline at::Tensor power_of_two(const at::Tensor& k) {
  return (k + 127).bitwise_left_shift(23).view(at::kFloat);
}

// The scaling of fp16 tiles from `bound`, a one-element fp32 tensor with |s * G_ij| <= bound for every
// entry of the tile. (bf16 has fp32's range and needs none.)
inline TileScaling fp16_tile_scaling(const at::Tensor& bound) {
  // bound = m * 2^e with m in [0.5, 1), so bound * 2^(15 - e) lies in [2^14, 2^15]: exact, unlike log2.
  const auto exponent = std::get<1>(at::frexp(bound));
  auto k = (kTileExponent - exponent).clamp(-126, 126);  // factor and inverse stay normal floats
  // A zero bound (an all-zero tile) or a non-finite one (the gradients are inf/nan anyway): factor 1.
  k = at::where(at::isfinite(bound) & (bound > 0), k, at::zeros_like(k));
  return TileScaling{power_of_two(k), power_of_two(-k)};
}

// How large the gradient-tile blocks may be: `budget_bytes` of scratch, `bytes_per_cell` per block entry
// (the tile in the input dtype, plus whatever else the op keeps per entry), sides in whole `row_block`s.
struct BlockBudget {
  int64_t bytes_per_cell, budget_bytes, row_block;
};

// Rows and columns of the gradient-tile blocks: about square, within the budget. Square blocks keep the
// accumulation traffic of the GEMMs, 2 * (N / block) passes over an N x D gradient, negligible even at
// N = 1M (row-only chunks would rewrite all of grad_text once per chunk).
inline std::pair<int64_t, int64_t> gradient_block(int64_t n, int64_t N, const BlockBudget& budget) {
  const int64_t cells = std::max<int64_t>(1, budget.budget_bytes / budget.bytes_per_cell);
  const int64_t unit = budget.row_block;
  const auto whole_blocks = [unit](int64_t x) { return std::max<int64_t>(unit, x / unit * unit); };
  const int64_t rows = std::min(n, whole_blocks(static_cast<int64_t>(std::sqrt(static_cast<double>(cells)))));
  const int64_t cols = std::min(N, whole_blocks(cells / rows));
  return {rows, cols};
}

// One gradient-tile block as the fill callable sees it: rows [r0, r0 + rows) of the image features and
// columns [c0, c0 + cols) of the text features, and the [rows, cols] tile (input dtype) to fill with
// tile_scale * s * G.
struct BlockSpan {
  int64_t r0, rows, c0, cols;
  at::Tensor image;      // [rows, D] view
  at::Tensor text;       // [cols, D] view
  at::Tensor grad_tile;  // [rows, cols], contiguous
};

// Feature gradients {grad_image, grad_text} (input dtype) of an op whose backward is "s * G, then the two
// GEMMs": fill(block) must write (or enqueue, on the current stream) the (scaled) s * G for `block`. img
// and txt are contiguous [n, D] and [N, D] on one device. With keep_fp32 both come back as sums in the
// accumulation dtype, unrounded, for a caller that adds terms of its own before the one rounding (this
// keeps a whole [n, D] sum for grad_image too).
//
// Rows are the outer loop: a row block of grad_image is final after its columns loop and is rounded to
// the input dtype right away (its sum is one [block_rows, D] buffer). Every column of grad_text is in
// flight until the last row block, so grad_text needs a sum of [N, D] (that is the floor for any visiting
// order of the blocks, short of recomputing tiles): one per column block, each rounded and freed in turn
// at the end. Inputs in the accumulation dtype sum straight into their outputs.
template <typename Fill>
std::pair<at::Tensor, at::Tensor> backward_through_blocks(const at::Tensor& img, const at::Tensor& txt,
                                                          const std::optional<TileScaling>& scaling,
                                                          const BlockBudget& budget, Fill&& fill,
                                                          bool keep_fp32 = false) {
  const int64_t n = img.size(0), N = txt.size(0), D = img.size(1);
  const auto acc = img.options().dtype(accumulate_type_of(img));
  const bool full = img.scalar_type() == accumulate_type_of(img);  // fp32 (or fp64) features
  const auto [block_rows, block_cols] = gradient_block(n, N, budget);
  // One scratch tile for every block: the stream orders each kernel after the previous block's GEMMs.
  auto grad_tile = at::empty({block_rows * block_cols}, img.options());
  // A gradient that is one block's product (and has no scaling to undo) is written by its GEMM directly.
  const bool direct_img = full || (block_cols >= N && !scaling && !keep_fp32);
  const bool direct_txt = full || (block_rows >= n && !scaling && !keep_fp32);
  auto grad_img = direct_img || !keep_fp32 ? at::empty_like(img) : at::empty({n, D}, acc);
  // Unrounded column sums are views of one [N, D] sum: no concatenating copy of it at the end.
  auto grad_txt = direct_txt ? at::empty_like(txt) : keep_fp32 ? at::empty({N, D}, acc) : at::Tensor();
  auto row_sum = direct_img || keep_fp32 ? at::Tensor() : at::empty({block_rows, D}, acc);
  std::vector<at::Tensor> col_sums;  // [cols, D] per column block, unless direct_txt
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    const auto img_rows = img.narrow(0, r0, rows);
    auto grad_img_rows = grad_img.narrow(0, r0, rows);
    auto img_sum = direct_img || keep_fp32 ? grad_img_rows : row_sum.narrow(0, 0, rows);
    for (int64_t c0 = 0, b = 0; c0 < N; c0 += block_cols, ++b) {
      const int64_t cols = std::min(block_cols, N - c0);
      const auto txt_cols = txt.narrow(0, c0, cols);
      auto g = grad_tile.narrow(0, 0, rows * cols).view({rows, cols});  // will hold s * G for this block
      fill(BlockSpan{r0, rows, c0, cols, img_rows, txt_cols, g});
      if (direct_img && !full) at::mm_out(img_sum, g, txt_cols);
      else add_product(img_sum, c0 == 0, g, txt_cols);
      if (direct_txt) {
        auto txt_sum = grad_txt.narrow(0, c0, cols);
        if (full) add_product(txt_sum, r0 == 0, g.t(), img_rows);
        else at::mm_out(txt_sum, g.t(), img_rows);
      } else {
        if (r0 == 0) col_sums.push_back(keep_fp32 ? grad_txt.narrow(0, c0, cols) : at::empty({cols, D}, acc));
        add_product(col_sums[b], r0 == 0, g.t(), img_rows);
      }
    }
    if (!direct_img && keep_fp32) {
      if (scaling) img_sum.mul_(scaling->inverse);
    } else if (!direct_img) {
      grad_img_rows.copy_(scaling ? img_sum.mul_(scaling->inverse) : img_sum);
    }
  }
  grad_tile.reset();
  row_sum.reset();
  if (!direct_txt && keep_fp32) {
    if (scaling) grad_txt.mul_(scaling->inverse);
  } else if (!direct_txt) {
    // Rounded one column block at a time, each sum freed before the next: the peak stays near the sums
    // alone, not the sums plus a whole rounded copy.
    std::vector<at::Tensor> rounded;
    for (auto& sum : col_sums) {
      if (scaling) sum.mul_(scaling->inverse);
      rounded.push_back(sum.to(txt.scalar_type()));
      sum.reset();
    }
    grad_txt = rounded.size() == 1 ? rounded.front() : at::cat(rounded);
  }
  return {grad_img, grad_txt};
}

}  // namespace fastclip
