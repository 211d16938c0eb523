// CUDA implementation of fastclip::pairwise_sigmoid (SigLIP's sigmoid loss, one value per row) and its
// backward: the ATen glue around the raw launchers in kernels/pairwise_sigmoid.cu (built only when
// PyTorch and the toolkit have CUDA).
//
// Forward: one launch over all rows; each CTA writes its rows' partial sums over its column split
// ([splits, n] floats, a few per row whatever N is), summed here in double. No chunking is needed: unlike
// contrastive_lse there are no column partials.
// Backward: the shared gradient-block loop of cuda_glue.h: per block of rows x columns the fused kernel
// writes s * G into the scratch tile, two GEMMs turn it into the feature gradients, and the per-CTA
// partials of sum(G * <image_i, text_j>) and sum(G) become the logit_scale and logit_bias gradients.
// pairwise_sigmoid_with_grad: the chunked path's one pass (chunked/chunked_sigmoid.h), cuBLAS GEMMs and the
// epilogue kernel of kernels/chunked_epilogue.cu.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "chunked/chunked_sigmoid.h"
#include "chunked/loss_path.h"
#include "cuda/chunked_epilogue_cuda.h"
#include "cuda/cuda_glue.h"
#include "ops/pairwise_sigmoid.h"
#include "pairwise_sigmoid.cuh"

namespace fastclip {
namespace {

constexpr const char* kOp = "pairwise_sigmoid";

void check_cuda_inputs(const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
                       const at::Tensor& logit_bias, const at::Tensor& row_labels, const at::Tensor& col_labels) {
  check_sigmoid_inputs(image, text, logit_scale, logit_bias, row_labels, col_labels);
  glue::check_cuda_device(image, logit_scale, kOp);
}

at::Tensor pairwise_sigmoid_cuda(const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
                                 const at::Tensor& logit_bias, const at::Tensor& row_labels,
                                 const at::Tensor& col_labels) {
  check_cuda_inputs(image, text, logit_scale, logit_bias, row_labels, col_labels);
  const c10::cuda::CUDAGuard guard(image.device());
  const auto type = glue::element_type(image, kOp);
  const auto img = image.contiguous(), txt = text.contiguous();
  // Read on the device: no host sync.
  const auto scale = logit_scale.to(at::kFloat).contiguous(), bias = logit_bias.to(at::kFloat).contiguous();
  const auto rl = row_labels.contiguous(), cl = col_labels.contiguous();
  const int64_t n = img.size(0), N = txt.size(0), D = img.size(1);
  const int splits = glue::column_splits(glue::row_blocks_of(n), N, image.get_device(),
                                         cuda::sigmoid_forward_ctas_per_sm(type, glue::float32_mode()));
  auto partial = at::empty({splits, n}, img.options().dtype(at::kFloat));

  cuda::SigmoidForwardArgs args{};
  args.image = img.data_ptr(), args.text = txt.data_ptr();
  args.rows = n, args.cols = N, args.dim = D;
  args.scale = scale.data_ptr<float>(), args.bias = bias.data_ptr<float>();
  args.row_labels = rl.data_ptr<int64_t>(), args.col_labels = cl.data_ptr<int64_t>();
  args.col_splits = splits;
  args.row_partial = partial.data_ptr<float>();
  C10_CUDA_CHECK(cuda::launch_sigmoid_forward(type, glue::float32_mode(), args, c10::cuda::getCurrentCUDAStream()));
  return partial.sum(0, /*keepdim=*/false, at::kDouble).to(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_sigmoid_backward_cuda(
    const at::Tensor& grad_row_loss, const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
    const at::Tensor& logit_bias, const at::Tensor& row_labels, const at::Tensor& col_labels) {
  check_cuda_inputs(image, text, logit_scale, logit_bias, row_labels, col_labels);
  check_sigmoid_backward_inputs(grad_row_loss, image);
  const c10::cuda::CUDAGuard guard(image.device());
  const auto type = glue::element_type(image, kOp);
  const auto img = image.contiguous(), txt = text.contiguous();
  const auto scale = logit_scale.to(at::kFloat).contiguous(), bias = logit_bias.to(at::kFloat).contiguous();
  const auto g = grad_row_loss.to(at::kFloat).contiguous();
  const auto rl = row_labels.contiguous(), cl = col_labels.contiguous();
  const int64_t D = img.size(1);
  const auto f32 = img.options().dtype(at::kFloat);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  std::optional<glue::TileScaling> scaling;  // fp16 tiles only
  // |s * G_ij| = |s| * |g_i| * sigmoid(-+L_ij) <= |s| * max |g|, as a sigmoid is at most 1.
  if (type == cuda::ElementType::kFloat16) scaling = glue::fp16_tile_scaling(scale.abs() * g.abs().max());
  std::vector<at::Tensor> scale_partials, bias_partials;
  const auto launch = [&](const glue::GradientBlock& block) {
    auto scale_partial = at::empty({block.ctas}, f32), bias_partial = at::empty({block.ctas}, f32);
    cuda::SigmoidBackwardArgs args{};
    args.image = block.image, args.text = block.text;
    args.rows = block.rows, args.cols = block.cols, args.dim = D;
    args.scale = scale.data_ptr<float>(), args.bias = bias.data_ptr<float>();
    args.grad_row = g.data_ptr<float>() + block.r0;
    args.row_labels = rl.data_ptr<int64_t>() + block.r0, args.col_labels = cl.data_ptr<int64_t>() + block.c0;
    args.col_splits = block.col_splits;
    args.grad_tile = block.grad_tile, args.tile_scale = block.tile_scale;
    args.scale_partial = scale_partial.data_ptr<float>(), args.bias_partial = bias_partial.data_ptr<float>();
    C10_CUDA_CHECK(cuda::launch_sigmoid_backward(type, glue::float32_mode(), args, stream));
    scale_partials.push_back(scale_partial);
    bias_partials.push_back(bias_partial);
  };
  auto [grad_img, grad_txt] = glue::backward_through_gradient_blocks(
      img, txt, scaling, cuda::sigmoid_backward_ctas_per_sm(type, glue::float32_mode()), launch);
  return {grad_img, grad_txt, glue::sum_partials(scale_partials, logit_scale),
          glue::sum_partials(bias_partials, logit_bias)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_sigmoid_with_grad_cuda(
    const at::Tensor& grad_row_loss, const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
    const at::Tensor& logit_bias, const at::Tensor& row_labels, const at::Tensor& col_labels) {
  check_cuda_inputs(image, text, logit_scale, logit_bias, row_labels, col_labels);
  check_sigmoid_backward_inputs(grad_row_loss, image);
  glue::element_type(image, "pairwise_sigmoid_with_grad");  // fp32, bf16 or fp16, else a clear error
  const c10::cuda::CUDAGuard guard(image.device());
  return chunked::pairwise_sigmoid_with_grad(grad_row_loss, image, text, logit_scale, logit_bias, row_labels,
                                             col_labels, cuda_chunk_epilogue(),
                                             chunk_budget_bytes(glue::kScratchBudgetBytes));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CUDA, m) {
  m.impl("pairwise_sigmoid", &pairwise_sigmoid_cuda);
  m.impl("pairwise_sigmoid_backward", &pairwise_sigmoid_backward_cuda);
  m.impl("pairwise_sigmoid_with_grad", &pairwise_sigmoid_with_grad_cuda);
}

}  // namespace fastclip
