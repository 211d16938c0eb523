// Shared host-side declarations of the fused pairwise ops (CPU and CUDA builds): contrastive_lse and
// pairwise_sigmoid.
//
// The op computes, for S = s * image @ text^T (never stored whole):
//   row_lse[i] = logsumexp_j S[i, j]   (n values)
//   col_lse[j] = logsumexp_i S[i, j]   (N values; over the rows given, i.e. a rank's partial)
// and its backward, for upstream gradients gr (of row_lse) and gc (of col_lse):
//   G[i, j]     = gr[i] * exp(S[i, j] - row_lse[i]) + gc[j] * exp(S[i, j] - col_lse[j])
//   grad_image  = s * G @ text,   grad_text = s * G^T @ image,   grad_scale = sum(G * S) / s
// With masked_diagonal = d the entries (i, i + d) are left out (as if S were -inf there).
//
// contrastive_loss_backward: the gradient of a whole contrastive loss (fastclip/ops/contrastive_gradient.py),
//   G[i, j] = gr[i] * P_row + gc[j] * P_col - gp[i] * (row_ids[i] == col_ids[j]) - gu
// except at the pair entries j = partner[i] >= 0, set after the sweep from the rests of their row and column
// (add_pair_entries); feature gradients returned unrounded, in the accumulation dtype.
//
// pairwise_sigmoid: row_loss[i] = sum_j softplus(-z_ij * L_ij), L = S + b, z_ij = +1 where
// row_labels[i] == col_labels[j] and -1 elsewhere; backward, for upstream gradient g of row_loss:
//   G[i, j] = -g[i] * z_ij * sigmoid(-z_ij * L_ij)
//   grad_image = s * G @ text,  grad_text = s * G^T @ image,  grad_scale = sum(G * <image_i, text_j>),
//   grad_bias = sum(G)
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fastclip {

// Argument checks shared by every implementation; messages name the argument and the expectation.
void check_lse_inputs(const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale);
void check_lse_backward_inputs(const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& image,
                               const at::Tensor& text, const at::Tensor& row_lse, const at::Tensor& col_lse);

// The loss-specific inputs of contrastive_loss_backward: grad_positive, grad_pair and int64 row_ids,
// partner [n]; one-element grad_uniform; int64 col_ids [N]; partner entries in [-1, N).
void check_loss_backward_inputs(const at::Tensor& grad_positive, const at::Tensor& grad_uniform,
                                const at::Tensor& grad_pair, const at::Tensor& row_ids, const at::Tensor& col_ids,
                                const at::Tensor& partner, const at::Tensor& image, const at::Tensor& text);

// The pair entries of contrastive_loss_backward, added after the sweep (device-agnostic ATen ops, in the
// accumulation dtype of grad_img/grad_txt, in place): G_i,p = grad_pair_i - grad_row_i * row_rest_i
// - grad_col_p * col_rest_p for p = partner_i >= 0, times scale * text_p into grad_img_i and scale *
// image_i into grad_txt_p. Returns their share of the logit_scale gradient, sum_i G_i,p * pair_dot_i.
at::Tensor add_pair_entries(const at::Tensor& img, const at::Tensor& txt, const at::Tensor& scale,
                            const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& grad_pair,
                            const at::Tensor& partner, const at::Tensor& row_rest, const at::Tensor& col_rest,
                            const at::Tensor& pair_dot, at::Tensor& grad_img, at::Tensor& grad_txt);

// Checks of pairwise_sigmoid's inputs: the features as above, one-element scale and bias, int64 labels [n], [N].
void check_sigmoid_inputs(const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
                          const at::Tensor& logit_bias, const at::Tensor& row_labels, const at::Tensor& col_labels);

// The upstream gradient of pairwise_sigmoid's backward: [n] on the features' device.
void check_sigmoid_backward_inputs(const at::Tensor& grad_row_loss, const at::Tensor& image);

// Rows handled per pass so that the pass's scratch, `bytes_per_row` for each of its rows, stays within
// `budget_bytes` whatever N is: a multiple of `row_block` (at least one block), at most `rows`.
int64_t rows_per_chunk(int64_t rows, int64_t bytes_per_row, int64_t row_block, int64_t budget_bytes);

// Merge partial (max, sum-of-exp) pairs along `dim` into log-sum-exp values.
at::Tensor merge_partial_lse(const at::Tensor& max, const at::Tensor& sum, int64_t dim);

}  // namespace fastclip
