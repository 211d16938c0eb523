// What every op of the chunked path shares besides its epilogue: the rows of a chunk, the dots GEMM into
// the scratch, and the budget of a backward's blocks (chunked_loss.cpp, chunked_sigmoid.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "gradient_blocks.h"

namespace fastclip {
namespace chunked {

// Chunks and blocks have whole multiples of this many rows (and block columns): small enough that a test
// can force several chunks at small sizes, large enough that the GEMMs see whole tiles.
constexpr int64_t kChunkRows = 32;

// The dot products of a chunk or block, from one GEMM into `scratch` (accumulation dtype), which the first
// call sizes for this first (largest) block.
inline at::Tensor block_dots(at::Tensor& scratch, const at::Tensor& img_rows, const at::Tensor& txt_cols) {
  const int64_t rows = img_rows.size(0), cols = txt_cols.size(0);
  if (!scratch.defined()) scratch = at::empty({rows * cols}, img_rows.options().dtype(accumulate_type_of(img_rows)));
  auto dots = scratch.narrow(0, 0, rows * cols).view({rows, cols});
  mm_into(dots, img_rows, txt_cols.t());
  return dots;
}

// A backward's blocks: the gradient tile (input dtype) and the dots beside it (accumulation dtype).
inline BlockBudget backward_budget(const at::Tensor& img, int64_t budget_bytes) {
  const auto acc_size = static_cast<int64_t>(c10::elementSize(accumulate_type_of(img)));
  return BlockBudget{static_cast<int64_t>(img.element_size()) + acc_size, budget_bytes, kChunkRows};
}

inline at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) { return t.detach().to(acc).contiguous(); }

}  // namespace chunked
}  // namespace fastclip
