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
// Everything the CLIP loss adds on top (targets, label smoothing, weights) is O(N * D) and stays in Python.
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
