// pairwise_sigmoid, pairwise_sigmoid_backward and pairwise_sigmoid_with_grad: SigLIP's sigmoid loss, one value per row (schemas in
// pairwise_sigmoid.cpp; implementations in cpu/pairwise_sigmoid_cpu.cpp and cuda/pairwise_sigmoid_cuda.cu).
//
// For S = s * image @ text^T (never stored whole):
//   row_loss[i] = sum_j softplus(-z_ij * L_ij), L = S + b, z_ij = +1 where row_labels[i] == col_labels[j]
//   and -1 elsewhere; backward, for upstream gradient g of row_loss:
//   G[i, j] = -g[i] * z_ij * sigmoid(-z_ij * L_ij)
//   grad_image = s * G @ text,  grad_text = s * G^T @ image,  grad_scale = sum(G * <image_i, text_j>),
//   grad_bias = sum(G)
// pairwise_sigmoid_with_grad(grad_row_loss, ...) returns row_loss and that backward's gradients together,
// from one pass over the similarities (chunked/chunked_sigmoid.h), all in the accumulation dtype and
// unrounded: for a loss that knows g before the sweep (SigLIP's: g = 1/N), three N x N x D GEMMs where a
// forward and a recomputing backward take four.
#pragma once

#include <ATen/ATen.h>

namespace fastclip {

// Checks of pairwise_sigmoid's inputs: the features as contrastive_lse's, one-element scale and bias, int64
// labels [n], [N].
void check_sigmoid_inputs(const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
                          const at::Tensor& logit_bias, const at::Tensor& row_labels, const at::Tensor& col_labels);

// The upstream gradient of pairwise_sigmoid's backward: [n] on the features' device.
void check_sigmoid_backward_inputs(const at::Tensor& grad_row_loss, const at::Tensor& image);

}  // namespace fastclip
