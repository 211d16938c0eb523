// The schemas of pairwise_sigmoid, pairwise_sigmoid_backward and pairwise_sigmoid_with_grad (pairwise_sigmoid.h), and their argument
// checks. The CPU and CUDA implementations register themselves in cpu/ and cuda/.
#include "ops/pairwise_sigmoid.h"

#include <torch/library.h>

#include "ops/contrastive_lse.h"

namespace fastclip {

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
  TORCH_CHECK(grad_row_loss.device() == image.device(), "grad_row_loss must be on ",
              image.device(), ", got ", grad_row_loss.device());
}

}  // namespace fastclip

TORCH_LIBRARY_FRAGMENT(fastclip, m) {
  // row_loss[i] = sum_j softplus(-z_ij * (s * <image_i, text_j> + b)), z_ij = +1 if row_labels[i] ==
  // col_labels[j] else -1: SigLIP's sigmoid loss, one row at a time.
  m.def(
      "pairwise_sigmoid(Tensor image, Tensor text, Tensor logit_scale, Tensor logit_bias, Tensor row_labels, "
      "Tensor col_labels) -> Tensor row_loss");
  m.def(
      "pairwise_sigmoid_backward(Tensor grad_row_loss, Tensor image, Tensor text, Tensor logit_scale, "
      "Tensor logit_bias, Tensor row_labels, Tensor col_labels) -> (Tensor grad_image, Tensor grad_text, "
      "Tensor grad_logit_scale, Tensor grad_logit_bias)");
  // pairwise_sigmoid's row losses and the gradients of sum_i grad_row_loss[i] * row_loss[i], from one pass
  // (a loss whose row weights are known before the sweep); the gradients unrounded, accumulation dtype.
  m.def(
      "pairwise_sigmoid_with_grad(Tensor grad_row_loss, Tensor image, Tensor text, Tensor logit_scale, "
      "Tensor logit_bias, Tensor row_labels, Tensor col_labels) -> (Tensor row_loss, Tensor grad_image, "
      "Tensor grad_text, Tensor grad_logit_scale, Tensor grad_logit_bias)");
}
