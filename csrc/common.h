// Host-side helpers shared by the ops' CPU and CUDA implementations (device-agnostic ATen code).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastclip {

// Rows handled per pass so that the pass's scratch, `bytes_per_row` for each of its rows, stays within
// `budget_bytes` whatever N is: a multiple of `row_block` (at least one block), at most `rows`.
int64_t rows_per_chunk(int64_t rows, int64_t bytes_per_row, int64_t row_block, int64_t budget_bytes);

// Merge partial (max, sum-of-exp) pairs along `dim` into log-sum-exp values.
at::Tensor merge_partial_lse(const at::Tensor& max, const at::Tensor& sum, int64_t dim);

// The pair entries of contrastive_loss_backward (ops/contrastive_loss_backward.h), added after the sweep
// (device-agnostic ATen ops, in the accumulation dtype of grad_img/grad_txt, in place): G_i,p = grad_pair_i
// - grad_row_i * row_rest_i - grad_col_p * col_rest_p for p = partner_i >= 0, times scale * text_p into
// grad_img_i and scale * image_i into grad_txt_p. Returns their share of the logit_scale gradient,
// sum_i G_i,p * pair_dot_i.
at::Tensor add_pair_entries(const at::Tensor& img, const at::Tensor& txt, const at::Tensor& scale,
                            const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& grad_pair,
                            const at::Tensor& partner, const at::Tensor& row_rest, const at::Tensor& col_rest,
                            const at::Tensor& pair_dot, at::Tensor& grad_img, at::Tensor& grad_txt);

}  // namespace fastclip
