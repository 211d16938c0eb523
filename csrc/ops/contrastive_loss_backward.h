// contrastive_loss_backward: the gradient of a whole contrastive loss (fastclip/ops/contrastive_gradient.py)
// in one sweep over the similarity tiles of contrastive_lse (contrastive_lse.h; schema in
// contrastive_loss_backward.cpp; implementations next to contrastive_lse's in cpu/ and cuda/):
//   G[i, j] = gr[i] * P_row + gc[j] * P_col - gp[i] * (row_ids[i] == col_ids[j]) - gu
// except at the pair entries j = partner[i] >= 0, set after the sweep from the rests of their row and column
// (add_pair_entries, common.h); feature gradients returned unrounded, in the accumulation dtype.
#pragma once

#include <ATen/ATen.h>

namespace fastclip {

// The loss-specific inputs of contrastive_loss_backward: grad_positive, grad_pair and int64 row_ids,
// partner [n]; one-element grad_uniform; int64 col_ids [N]; partner entries in [-1, N).
void check_loss_backward_inputs(const at::Tensor& grad_positive, const at::Tensor& grad_uniform,
                                const at::Tensor& grad_pair, const at::Tensor& row_ids, const at::Tensor& col_ids,
                                const at::Tensor& partner, const at::Tensor& image, const at::Tensor& text);

}  // namespace fastclip
