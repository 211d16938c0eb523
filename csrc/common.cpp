// Host-side helpers shared by the ops' CPU and CUDA implementations (common.h).
#include "common.h"

#include <algorithm>
#include <limits>
#include <tuple>

namespace fastclip {

int64_t rows_per_chunk(int64_t rows, int64_t bytes_per_row, int64_t row_block, int64_t budget_bytes) {
  int64_t chunk = std::max<int64_t>(row_block, budget_bytes / std::max<int64_t>(1, bytes_per_row));
  chunk = (chunk / row_block) * row_block;  // whole row blocks, so block boundaries match across chunks
  return std::min(chunk, rows);
}

at::Tensor merge_partial_lse(const at::Tensor& max, const at::Tensor& sum, int64_t dim) {
  auto m = std::get<0>(max.max(dim, /*keepdim=*/true));
  // Where every partial is -inf (all entries masked) shift by 0 instead: the result is log(0) = -inf, not NaN.
  m = at::where(m == -std::numeric_limits<double>::infinity(), at::zeros_like(m), m);
  return (m + (sum * (max - m).exp()).sum(dim, true).log()).squeeze(dim);
}

at::Tensor add_pair_entries(const at::Tensor& img, const at::Tensor& txt, const at::Tensor& scale,
                            const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& grad_pair,
                            const at::Tensor& partner, const at::Tensor& row_rest, const at::Tensor& col_rest,
                            const at::Tensor& pair_dot, at::Tensor& grad_img, at::Tensor& grad_txt) {
  const auto target = partner.clamp_min(0);
  // P - 1 at a pair entry is minus the rest of its row (column): a sum of small terms, exact where 1 - P
  // is below fp32's spacing near 1 (a nearly solved batch) and exp(S - lse) - 1 would be pure rounding.
  auto pair_grad = grad_pair - grad_row * row_rest - grad_col.index_select(0, target) * col_rest.index_select(0, target);
  pair_grad = at::where(partner >= 0, pair_grad, at::zeros_like(pair_grad));
  const auto weight = (scale * pair_grad).unsqueeze(1);
  // In row chunks of a few MiB: whole [n, D] products (gathered rows, promoted to the sums' dtype) would add
  // about one and a half gradients to the backward's peak memory, which is the fp32 sums themselves at
  // N = 1M and as much as the whole fused workspace at N = 8192.
  // (larger on a GPU, where every chunk costs launches: at N = 1M still a few dozen chunks)
  const int64_t kChunkBytes = img.is_cuda() ? int64_t{64} << 20 : int64_t{4} << 20;
  const int64_t row_bytes = std::max<int64_t>(1, img.size(1) * static_cast<int64_t>(grad_img.element_size()));
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkBytes / row_bytes);
  for (int64_t r0 = 0; r0 < img.size(0); r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, img.size(0) - r0);
    const auto rows_target = target.narrow(0, r0, rows), rows_weight = weight.narrow(0, r0, rows);
    grad_img.narrow(0, r0, rows).add_(txt.index_select(0, rows_target) * rows_weight);
    grad_txt.index_add_(0, rows_target, img.narrow(0, r0, rows) * rows_weight);
  }
  return (pair_grad * pair_dot).sum().to(at::kDouble);
}

}  // namespace fastclip
