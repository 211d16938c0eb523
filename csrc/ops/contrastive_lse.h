// contrastive_lse and contrastive_lse_backward: the fused log-sum-exps of a similarity matrix (schemas in
// contrastive_lse.cpp; implementations in cpu/contrastive_lse_cpu.cpp and cuda/contrastive_lse_cuda.cu).
//
// The op computes, for S = s * image @ text^T (never stored whole):
//   row_lse[i] = logsumexp_j S[i, j]   (n values)
//   col_lse[j] = logsumexp_i S[i, j]   (N values; over the rows given, i.e. a rank's partial)
// and its backward, for upstream gradients gr (of row_lse) and gc (of col_lse):
//   G[i, j]     = gr[i] * exp(S[i, j] - row_lse[i]) + gc[j] * exp(S[i, j] - col_lse[j])
//   grad_image  = s * G @ text,   grad_text = s * G^T @ image,   grad_scale = sum(G * S) / s
// With masked_diagonal = d the entries (i, i + d) are left out (as if S were -inf there).
#pragma once

#include <ATen/ATen.h>

namespace fastclip {

// Argument checks shared by every implementation; messages name the argument and the expectation.
void check_lse_inputs(const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale);
void check_lse_backward_inputs(const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& image,
                               const at::Tensor& text, const at::Tensor& row_lse, const at::Tensor& col_lse);

}  // namespace fastclip
