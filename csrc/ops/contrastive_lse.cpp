// The schemas of contrastive_lse and contrastive_lse_backward (contrastive_lse.h), and their argument
// checks. The CPU and CUDA implementations register themselves in cpu/ and cuda/.
#include "ops/contrastive_lse.h"

#include <torch/library.h>

namespace fastclip {

void check_lse_inputs(const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale) {
  TORCH_CHECK(image.dim() == 2, "image_features must be 2-D [n, D], got shape ", image.sizes());
  TORCH_CHECK(text.dim() == 2, "text_features must be 2-D [N, D], got shape ", text.sizes());
  TORCH_CHECK(image.size(0) > 0 && text.size(0) > 0, "empty batch: image_features has ", image.size(0),
              " rows and text_features has ", text.size(0));
  TORCH_CHECK(image.size(1) == text.size(1), "feature dims differ: image_features has D=", image.size(1),
              ", text_features has D=", text.size(1));
  TORCH_CHECK(image.size(1) > 0, "feature dim D must be positive");
  TORCH_CHECK(image.scalar_type() == text.scalar_type(), "image_features and text_features must have the same dtype, got ",
              image.scalar_type(), " and ", text.scalar_type());
  TORCH_CHECK(image.device() == text.device(), "image_features and text_features must be on the same device, got ",
              image.device(), " and ", text.device());
  TORCH_CHECK(logit_scale.numel() == 1, "logit_scale must hold one value, got shape ", logit_scale.sizes());
}

void check_lse_backward_inputs(const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& image,
                               const at::Tensor& text, const at::Tensor& row_lse, const at::Tensor& col_lse) {
  const auto n = image.size(0), N = text.size(0);
  TORCH_CHECK(row_lse.dim() == 1 && row_lse.size(0) == n, "row_lse must be [", n, "], got ", row_lse.sizes());
  TORCH_CHECK(col_lse.dim() == 1 && col_lse.size(0) == N, "col_lse must be [", N, "], got ", col_lse.sizes());
  TORCH_CHECK(grad_row.dim() == 1 && grad_row.size(0) == n, "grad_row_lse must be [", n, "], got ", grad_row.sizes());
  TORCH_CHECK(grad_col.dim() == 1 && grad_col.size(0) == N, "grad_col_lse must be [", N, "], got ", grad_col.sizes());
  for (const auto* t : {&grad_row, &grad_col, &row_lse, &col_lse})
    TORCH_CHECK(t->device() == image.device(), "contrastive_lse_backward: every tensor must be on ", image.device(),
                ", got one on ", t->device());
}

}  // namespace fastclip

TORCH_LIBRARY_FRAGMENT(fastclip, m) {
  // masked_diagonal = d leaves the entries (i, i + d) out of both log-sum-exps (SupCon's self-pairs).
  m.def(
      "contrastive_lse(Tensor image, Tensor text, Tensor logit_scale, int? masked_diagonal=None) -> "
      "(Tensor row_lse, Tensor col_lse)");
  m.def(
      "contrastive_lse_backward(Tensor grad_row_lse, Tensor grad_col_lse, Tensor image, Tensor text, "
      "Tensor logit_scale, Tensor row_lse, Tensor col_lse, int? masked_diagonal=None) -> (Tensor grad_image, "
      "Tensor grad_text, Tensor grad_logit_scale)");
}
