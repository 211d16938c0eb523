// The chunked path of pairwise_sigmoid_with_grad (ops/pairwise_sigmoid.h): SigLIP's row losses and, for a
// row gradient known before the sweep, every gradient, from one pass over the similarities.
//
// A sigmoid loss has no normaliser over rows or columns, so G_ij depends on entry (i, j) alone: per block
// of rows x columns (the loop of gradient_blocks.h) one GEMM makes the dots, the epilogue writes both the
// block's row losses and s * G, and the loop's two GEMMs give the feature gradients. That is three
// N x N x D GEMMs for forward and backward together, where a forward followed by a recomputing backward
// takes four.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#include "chunked/chunked_loss.h"

namespace fastclip {
namespace chunked {

// (row_loss [n], grad_image, grad_text, grad_logit_scale, grad_logit_bias), all in the accumulation dtype
// and unrounded (the caller rounds each once). Arguments checked by the caller; budget_bytes bounds the
// scratch of the dots and the gradient tile.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_sigmoid_with_grad(
    const at::Tensor& grad_row, const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
    const at::Tensor& logit_bias, const at::Tensor& row_labels, const at::Tensor& col_labels,
    const Epilogue& epilogue, int64_t budget_bytes);

}  // namespace chunked
}  // namespace fastclip
