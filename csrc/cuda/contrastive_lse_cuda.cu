// CUDA implementation of fastclip::contrastive_lse and its backward: the ATen glue around the raw
// launchers in kernels/contrastive_lse.cu (built only when PyTorch and the toolkit have CUDA).
//
// Forward: rows in chunks (so the [row_blocks, N] column partials fit a fixed scratch budget), the
// fused kernel per chunk, then small merges of the partial (max, sum) pairs into log-sum-exps.
// Backward: per block of rows x columns, the fused kernel writes s * G for the block into a scratch tile
// and two GEMMs turn it into the feature gradients (the shared loop in cuda_glue.h).
// masked_diagonal = d leaves out the entries (i, i + d); the kernels take the diagonal relative to the
// rows and columns they are given, so a chunk at row r0 gets d + r0 and a block at (r0, c0) d + r0 - c0.
// That is the fused path. Each call may take the chunked path instead (cuBLAS GEMMs plus one epilogue
// pass, chunked/chunked_loss.h), as cuda_loss_path (chunked/loss_path.h) decides.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "chunked/chunked_loss.h"
#include "chunked/loss_path.h"
#include "common.h"
#include "contrastive_lse.cuh"
#include "cuda/chunked_epilogue_cuda.h"
#include "cuda/cuda_glue.h"
#include "ops/contrastive_loss_backward.h"
#include "ops/contrastive_lse.h"

namespace fastclip {
namespace {

constexpr const char* kOp = "contrastive_lse";

void check_cuda_inputs(const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale) {
  check_lse_inputs(image, text, logit_scale);
  glue::check_cuda_device(image, logit_scale, kOp);
  glue::element_type(image, kOp);  // float32, bfloat16 or float16, whichever path runs
}

bool chunked_path(const at::Tensor& image, const at::Tensor& text) {
  return cuda_loss_path(image.size(0), text.size(0), image.size(1), image.scalar_type()) == LossPath::kChunked;
}

int64_t chunk_budget() { return chunk_budget_bytes(glue::kScratchBudgetBytes); }

// The mask as the kernels take it: a diagonal that misses the n x N matrix altogether masks nothing, and
// dropping it keeps every offset the kernels see (d + r0 - c0) far from int64 overflow: |d| < n + N.
std::optional<int64_t> effective_diagonal(std::optional<int64_t> d, int64_t n, int64_t N) {
  if (d && *d > -n && *d < N) return d;
  return std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> contrastive_lse_cuda(const at::Tensor& image, const at::Tensor& text,
                                                        const at::Tensor& logit_scale,
                                                        std::optional<int64_t> masked_diagonal) {
  check_cuda_inputs(image, text, logit_scale);
  const c10::cuda::CUDAGuard guard(image.device());
  if (chunked_path(image, text))
    return chunked::contrastive_lse(image, text, logit_scale, masked_diagonal, cuda_chunk_epilogue(), chunk_budget());
  const auto type = glue::element_type(image, kOp);
  const auto img = image.contiguous(), txt = text.contiguous();
  const auto scale = logit_scale.to(at::kFloat).contiguous();  // read on the device: no host sync
  const int64_t n = img.size(0), N = txt.size(0), D = img.size(1);
  const auto diagonal = effective_diagonal(masked_diagonal, n, N);
  const auto f32 = img.options().dtype(at::kFloat);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  auto row_lse = at::empty({n}, f32);
  at::Tensor col_lse;
  const int ctas_per_sm = cuda::lse_forward_ctas_per_sm(type, glue::float32_mode());
  // Column partials: one (max, sum) pair of floats per row block and column.
  const int64_t chunk =
      rows_per_chunk(n, 2 * sizeof(float) * N / cuda::kRowBlock, cuda::kRowBlock, glue::kScratchBudgetBytes);
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    const int64_t blocks = glue::row_blocks_of(rows);
    const int splits = glue::column_splits(blocks, N, image.get_device(), ctas_per_sm);
    auto row_max = at::empty({splits, rows}, f32), row_sum = at::empty({splits, rows}, f32);
    auto col_max = at::empty({blocks, N}, f32), col_sum = at::empty({blocks, N}, f32);
    cuda::LseForwardArgs args{};
    args.image = static_cast<const char*>(img.data_ptr()) + r0 * D * img.element_size();
    args.text = txt.data_ptr();
    args.rows = rows, args.cols = N, args.dim = D;
    args.scale = scale.data_ptr<float>();
    args.mask_diagonal = diagonal.has_value();
    args.diagonal = diagonal ? *diagonal + r0 : 0;  // row i of the chunk is row r0 + i of the matrix
    args.col_splits = splits;
    args.row_max = row_max.data_ptr<float>(), args.row_sum = row_sum.data_ptr<float>();
    args.col_max = col_max.data_ptr<float>(), args.col_sum = col_sum.data_ptr<float>();
    C10_CUDA_CHECK(cuda::launch_lse_forward(type, glue::float32_mode(), args, stream));
    // Fully masked rows and columns have only (-inf, 0) partials: merge_partial_lse gives -inf, and so
    // does logaddexp(-inf, -inf).
    row_lse.narrow(0, r0, rows).copy_(merge_partial_lse(row_max, row_sum, 0));
    auto chunk_lse = merge_partial_lse(col_max, col_sum, 0);
    col_lse = col_lse.defined() ? at::logaddexp(col_lse, chunk_lse) : chunk_lse;
  }
  return {row_lse, col_lse};
}

// The log-sum-exp backward's arguments for one gradient block; contrastive_loss_backward's kernel takes
// the same and its loss terms besides.
cuda::LseBackwardArgs lse_backward_args(const glue::GradientBlock& block, int64_t dim, const at::Tensor& scale,
                                        std::optional<int64_t> diagonal, const at::Tensor& gr, const at::Tensor& rl,
                                        const at::Tensor& gc, const at::Tensor& cl, at::Tensor& partial) {
  cuda::LseBackwardArgs args{};
  args.image = block.image, args.text = block.text;
  args.rows = block.rows, args.cols = block.cols, args.dim = dim;
  args.scale = scale.data_ptr<float>();
  args.mask_diagonal = diagonal.has_value();
  // Block row i is matrix row r0 + i and block column j is column c0 + j: j == i + d + r0 - c0.
  args.diagonal = diagonal ? *diagonal + block.r0 - block.c0 : 0;
  args.grad_row = gr.data_ptr<float>() + block.r0, args.row_lse = rl.data_ptr<float>() + block.r0;
  args.grad_col = gc.data_ptr<float>() + block.c0, args.col_lse = cl.data_ptr<float>() + block.c0;
  args.col_splits = block.col_splits;
  args.grad_tile = block.grad_tile, args.tile_scale = block.tile_scale;
  args.scale_partial = partial.data_ptr<float>();
  return args;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_lse_backward_cuda(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& logit_scale, const at::Tensor& row_lse, const at::Tensor& col_lse,
    std::optional<int64_t> masked_diagonal) {
  check_cuda_inputs(image, text, logit_scale);
  check_lse_backward_inputs(grad_row, grad_col, image, text, row_lse, col_lse);
  const c10::cuda::CUDAGuard guard(image.device());
  if (chunked_path(image, text))
    return chunked::contrastive_lse_backward(grad_row, grad_col, image, text, logit_scale, row_lse, col_lse,
                                             masked_diagonal, cuda_chunk_epilogue(), chunk_budget());
  const auto type = glue::element_type(image, kOp);
  const auto img = image.contiguous(), txt = text.contiguous();
  const auto scale = logit_scale.to(at::kFloat).contiguous();
  const auto as_f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const auto gr = as_f32(grad_row), gc = as_f32(grad_col), rl = as_f32(row_lse), cl = as_f32(col_lse);
  const int64_t n = img.size(0), N = txt.size(0), D = img.size(1);
  const auto diagonal = effective_diagonal(masked_diagonal, n, N);
  const auto f32 = img.options().dtype(at::kFloat);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  std::optional<glue::TileScaling> scaling;  // fp16 tiles only
  // |s * G_ij| = |s| * |gr_i * P_row + gc_j * P_col| <= |s| * (max |gr| + max |gc|), as P_row, P_col <= 1.
  if (type == cuda::ElementType::kFloat16)
    scaling = glue::fp16_tile_scaling(scale.abs() * (gr.abs().max() + gc.abs().max()));
  std::vector<at::Tensor> scale_partials;
  const auto launch = [&](const glue::GradientBlock& block) {
    auto partial = at::empty({block.ctas}, f32);
    const auto args = lse_backward_args(block, D, scale, diagonal, gr, rl, gc, cl, partial);
    C10_CUDA_CHECK(cuda::launch_lse_backward(type, glue::float32_mode(), args, stream));
    scale_partials.push_back(partial);
  };
  auto [grad_img, grad_txt] = glue::backward_through_gradient_blocks(
      img, txt, scaling, cuda::lse_backward_ctas_per_sm(type, glue::float32_mode()), launch);
  return {grad_img, grad_txt, glue::sum_partials(scale_partials, logit_scale)};
}

// contrastive_loss_backward (ops/contrastive_loss_backward.h): the backward above with the loss's target terms folded
// into the tile, then the pair entries from the rests the kernel collects, added to fp32 gradient sums
// that are returned unrounded.
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_backward_cuda(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& grad_positive,
    const at::Tensor& grad_uniform, const at::Tensor& grad_pair, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& logit_scale, const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& row_ids,
    const at::Tensor& col_ids, const at::Tensor& partner, std::optional<int64_t> masked_diagonal) {
  check_cuda_inputs(image, text, logit_scale);
  check_lse_backward_inputs(grad_row, grad_col, image, text, row_lse, col_lse);
  check_loss_backward_inputs(grad_positive, grad_uniform, grad_pair, row_ids, col_ids, partner, image, text);
  const c10::cuda::CUDAGuard guard(image.device());
  if (chunked_path(image, text))
    return chunked::contrastive_loss_backward(grad_row, grad_col, grad_positive, grad_uniform, grad_pair, image, text,
                                              logit_scale, row_lse, col_lse, row_ids, col_ids, partner,
                                              masked_diagonal, cuda_chunk_epilogue(), chunk_budget());
  const auto type = glue::element_type(image, kOp);
  const auto img = image.contiguous(), txt = text.contiguous();
  const auto scale = logit_scale.to(at::kFloat).contiguous();
  const auto as_f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const auto gr = as_f32(grad_row), gc = as_f32(grad_col), gp = as_f32(grad_positive), ge = as_f32(grad_pair);
  const auto gu = as_f32(grad_uniform).reshape({}), rl = as_f32(row_lse), cl = as_f32(col_lse);
  const auto rid = row_ids.contiguous(), cid = col_ids.contiguous(), pid = partner.contiguous();
  const int64_t n = img.size(0), N = txt.size(0), D = img.size(1);
  const auto diagonal = effective_diagonal(masked_diagonal, n, N);
  const auto f32 = img.options().dtype(at::kFloat);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto row_rest = at::zeros({n}, f32), col_rest = at::zeros({N}, f32), pair_dot = at::zeros({n}, f32);

  std::optional<glue::TileScaling> scaling;  // fp16 tiles only
  // |s * G_ij| <= |s| * (max |gr| + max |gc| + max |gp| + |gu|), as P_row, P_col <= 1.
  if (type == cuda::ElementType::kFloat16)
    scaling = glue::fp16_tile_scaling(scale.abs() * (gr.abs().max() + gc.abs().max() + gp.abs().max() + gu.abs()));
  std::vector<at::Tensor> scale_partials;
  const auto launch = [&](const glue::GradientBlock& block) {
    const int64_t blocks = glue::row_blocks_of(block.rows);
    auto partial = at::empty({block.ctas}, f32);
    auto row_part = at::empty({block.col_splits, block.rows}, f32), col_part = at::empty({2 * blocks, block.cols}, f32);
    cuda::LossBackwardArgs args{};
    static_cast<cuda::LseBackwardArgs&>(args) = lse_backward_args(block, D, scale, diagonal, gr, rl, gc, cl, partial);
    args.loss.grad_positive = gp.data_ptr<float>() + block.r0;
    args.loss.grad_uniform = gu.data_ptr<float>();
    args.loss.row_ids = rid.data_ptr<int64_t>() + block.r0, args.loss.col_ids = cid.data_ptr<int64_t>() + block.c0;
    args.loss.partner = pid.data_ptr<int64_t>() + block.r0, args.loss.col_offset = block.c0;
    args.loss.row_rest = row_part.data_ptr<float>(), args.loss.col_rest = col_part.data_ptr<float>();
    args.loss.pair_dot = pair_dot.data_ptr<float>() + block.r0;
    C10_CUDA_CHECK(cuda::launch_loss_backward(type, glue::float32_mode(), args, stream));
    scale_partials.push_back(partial);
    row_rest.narrow(0, block.r0, block.rows).add_(row_part.sum(0));
    col_rest.narrow(0, block.c0, block.cols).add_(col_part.sum(0));
  };
  auto [grad_img, grad_txt] = glue::backward_through_gradient_blocks(
      img, txt, scaling, cuda::loss_backward_ctas_per_sm(type, glue::float32_mode()), launch, /*keep_fp32=*/true);
  auto grad_scale = at::cat(scale_partials).sum(at::kDouble);
  // 16-bit features promote to fp32 inside (row by row), no whole fp32 copy.
  grad_scale += add_pair_entries(img, txt, scale.reshape({}), gr, gc, ge, pid, row_rest, col_rest, pair_dot, grad_img,
                                 grad_txt);
  return {grad_img, grad_txt, grad_scale.to(at::kFloat)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CUDA, m) {
  m.impl("contrastive_lse", &contrastive_lse_cuda);
  m.impl("contrastive_lse_backward", &contrastive_lse_backward_cuda);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cuda);
}

}  // namespace fastclip
