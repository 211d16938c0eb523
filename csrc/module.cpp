// The fastclip._C Python module and the schemas of its operators.
// Importing the module loads this library, which registers the ops with the PyTorch dispatcher;
// the CPU and CUDA implementations register themselves in their own files.
#include <Python.h>
#include <torch/library.h>

#include <limits>

#include "contrastive_lse.h"

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
  grad_img.add_(txt.index_select(0, target) * weight);
  grad_txt.index_add_(0, target, img * weight);
  return (pair_grad * pair_dot).sum().to(at::kDouble);
}

void check_sigmoid_inputs(const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
                          const at::Tensor& logit_bias, const at::Tensor& row_labels, const at::Tensor& col_labels) {
  check_lse_inputs(image, text, logit_scale);
  TORCH_CHECK(logit_bias.numel() == 1, "logit_bias must hold one value, got shape ", logit_bias.sizes());
  TORCH_CHECK(row_labels.dim() == 1 && row_labels.size(0) == image.size(0), "row_labels must be [", image.size(0),
              "], got ", row_labels.sizes());
  TORCH_CHECK(col_labels.dim() == 1 && col_labels.size(0) == text.size(0), "col_labels must be [", text.size(0),
              "], got ", col_labels.sizes());
  for (const auto* t : {&row_labels, &col_labels}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, "row_labels and col_labels must be int64, got ", t->scalar_type());
    TORCH_CHECK(t->device() == image.device(), "row_labels and col_labels must be on ", image.device(), ", got ",
                t->device());
  }
  TORCH_CHECK(logit_scale.device() == image.device() && logit_bias.device() == image.device(),
              "logit_scale and logit_bias must be on ", image.device());
}

void check_sigmoid_backward_inputs(const at::Tensor& grad_row_loss, const at::Tensor& image) {
  TORCH_CHECK(grad_row_loss.dim() == 1 && grad_row_loss.size(0) == image.size(0), "grad_row_loss must be [",
              image.size(0), "], got ", grad_row_loss.sizes());
  TORCH_CHECK(grad_row_loss.device() == image.device(), "pairwise_sigmoid_backward: grad_row_loss must be on ",
              image.device(), ", got ", grad_row_loss.device());
}

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

}  // namespace fastclip

TORCH_LIBRARY(fastclip, m) {
  // masked_diagonal = d leaves the entries (i, i + d) out of both log-sum-exps (SupCon's self-pairs).
  m.def(
      "contrastive_lse(Tensor image, Tensor text, Tensor logit_scale, int? masked_diagonal=None) -> "
      "(Tensor row_lse, Tensor col_lse)");
  m.def(
      "contrastive_lse_backward(Tensor grad_row_lse, Tensor grad_col_lse, Tensor image, Tensor text, "
      "Tensor logit_scale, Tensor row_lse, Tensor col_lse, int? masked_diagonal=None) -> (Tensor grad_image, "
      "Tensor grad_text, Tensor grad_logit_scale)");
  // The gradient of a whole contrastive loss (contrastive_lse.h): G folds the target terms in before any
  // rounding, pair entries from the rests of their row and column; outputs in the accumulation dtype.
  m.def(
      "contrastive_loss_backward(Tensor grad_row, Tensor grad_col, Tensor grad_positive, Tensor grad_uniform, "
      "Tensor grad_pair, Tensor image, Tensor text, Tensor logit_scale, Tensor row_lse, Tensor col_lse, "
      "Tensor row_ids, Tensor col_ids, Tensor partner, int? masked_diagonal=None) -> (Tensor grad_image, "
      "Tensor grad_text, Tensor grad_logit_scale)");
  // row_loss[i] = sum_j softplus(-z_ij * (s * <image_i, text_j> + b)), z_ij = +1 if row_labels[i] ==
  // col_labels[j] else -1: SigLIP's sigmoid loss, one row at a time.
  m.def(
      "pairwise_sigmoid(Tensor image, Tensor text, Tensor logit_scale, Tensor logit_bias, Tensor row_labels, "
      "Tensor col_labels) -> Tensor row_loss");
  m.def(
      "pairwise_sigmoid_backward(Tensor grad_row_loss, Tensor image, Tensor text, Tensor logit_scale, "
      "Tensor logit_bias, Tensor row_labels, Tensor col_labels) -> (Tensor grad_image, Tensor grad_text, "
      "Tensor grad_logit_scale, Tensor grad_logit_bias)");
}

// A plain module with no functions: importing it is what loads the library and registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastclip compiled operators", -1, nullptr};
  return PyModule_Create(&module);
}
