// The schema of contrastive_loss_backward (contrastive_loss_backward.h) and the checks of its loss-specific
// inputs; the features, logit_scale and log-sum-exps are checked as contrastive_lse_backward's.
#include "ops/contrastive_loss_backward.h"

#include <torch/library.h>

namespace fastclip {

void check_loss_backward_inputs(const at::Tensor& grad_positive, const at::Tensor& grad_uniform,
                                const at::Tensor& grad_pair, const at::Tensor& row_ids, const at::Tensor& col_ids,
                                const at::Tensor& partner, const at::Tensor& image, const at::Tensor& text) {
  const auto n = image.size(0), N = text.size(0);
  TORCH_CHECK(grad_positive.dim() == 1 && grad_positive.size(0) == n, "grad_positive must be [", n, "], got ",
              grad_positive.sizes());
  TORCH_CHECK(grad_pair.dim() == 1 && grad_pair.size(0) == n, "grad_pair must be [", n, "], got ", grad_pair.sizes());
  TORCH_CHECK(grad_uniform.numel() == 1, "grad_uniform must hold one value, got shape ", grad_uniform.sizes());
  TORCH_CHECK(row_ids.dim() == 1 && row_ids.size(0) == n, "row_ids must be [", n, "], got ", row_ids.sizes());
  TORCH_CHECK(partner.dim() == 1 && partner.size(0) == n, "partner must be [", n, "], got ", partner.sizes());
  TORCH_CHECK(col_ids.dim() == 1 && col_ids.size(0) == N, "col_ids must be [", N, "], got ", col_ids.sizes());
  for (const auto* t : {&row_ids, &col_ids, &partner})
    TORCH_CHECK(t->scalar_type() == at::kLong, "row_ids, col_ids and partner must be int64, got ", t->scalar_type());
  for (const auto* t : {&grad_positive, &grad_uniform, &grad_pair, &row_ids, &col_ids, &partner})
    TORCH_CHECK(t->device() == image.device(), "contrastive_loss_backward: every tensor must be on ", image.device(),
                ", got one on ", t->device());
  // The kernels only compare partner entries with column indices; the gradients' index_select rejects one
  // past the columns. Checked here on CPU tensors, where reading them costs nothing; on a GPU it would be a
  // host sync in every backward.
  if (!partner.is_cuda())
    TORCH_CHECK(n == 0 || (partner.min().item<int64_t>() >= -1 && partner.max().item<int64_t>() < N),
                "partner entries must lie in [-1, ", N, ")");
}

}  // namespace fastclip

TORCH_LIBRARY_FRAGMENT(fastclip, m) {
  // The gradient of a whole contrastive loss (contrastive_loss_backward.h): G folds the target terms in before
  // any rounding, pair entries from the rests of their row and column; outputs in the accumulation dtype.
  m.def(
      "contrastive_loss_backward(Tensor grad_row, Tensor grad_col, Tensor grad_positive, Tensor grad_uniform, "
      "Tensor grad_pair, Tensor image, Tensor text, Tensor logit_scale, Tensor row_lse, Tensor col_lse, "
      "Tensor row_ids, Tensor col_ids, Tensor partner, int? masked_diagonal=None) -> (Tensor grad_image, "
      "Tensor grad_text, Tensor grad_logit_scale)");
}
