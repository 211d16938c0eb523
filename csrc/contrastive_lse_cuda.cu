// CUDA implementation of fastclip::contrastive_lse and its backward: the ATen glue around the raw
// launchers in kernels/contrastive_lse.cu (built only when PyTorch and the toolkit have CUDA).
//
// Forward: rows in chunks (so the [row_blocks, N] column partials fit a fixed scratch budget), the
// fused kernel per chunk, then small merges of the partial (max, sum) pairs into log-sum-exps.
// Backward: per block of rows x columns, the fused kernel writes s * G for the block into a scratch tile
// in the input dtype, and two cuBLAS GEMMs turn it into the feature gradients (the G @ text product has a
// D-wide output that does not fit in registers; a real GEMM runs it near peak).
// Only c10/cuda headers (no ATen/cuda/CUDAContext.h, which drags in cuBLAS/cuSPARSE headers), so this
// file also compiles against a CPU build of PyTorch plus the CUDA toolkit: CI checks it with nvcc.
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <utility>
#include <vector>

#include "contrastive_lse.cuh"
#include "contrastive_lse.h"

namespace fastclip {
namespace {

// Scratch per pass: column partials (forward) or the gradient-tile block (backward). It bounds the extra
// memory whatever N is; 256 MiB is an 11k x 11k bf16 block, large enough for the GEMMs to run near peak.
constexpr int64_t kScratchBudgetBytes = 256ll << 20;

cuda::ElementType element_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::ElementType::kFloat32;
    case at::kBFloat16: return cuda::ElementType::kBFloat16;
    case at::kHalf: return cuda::ElementType::kFloat16;
    default:
      TORCH_CHECK(false, "the CUDA contrastive_lse kernel takes float32, bfloat16 or float16 features, got ",
                  t.scalar_type(), "; use backend='torch' for other dtypes");
  }
}

// Follow PyTorch's own float32 matmul policy (torch.backends.cuda.matmul.allow_tf32).
cuda::Float32Mode float32_mode() {
  return at::globalContext().allowTF32CuBLAS() ? cuda::Float32Mode::kTf32 : cuda::Float32Mode::kTf32x3;
}

int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

void check_cuda_inputs(const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale) {
  check_lse_inputs(image, text, logit_scale);
  TORCH_CHECK(image.is_cuda() && logit_scale.device() == image.device(),
              "image_features, text_features and logit_scale must be on one CUDA device, got ", image.device(),
              " and ", logit_scale.device());
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, image.get_device());
  TORCH_CHECK(major >= 8, "the CUDA contrastive_lse kernel needs compute capability 8.0 or newer (tensor-core "
              "bf16/tf32), this device is ", major, ".x; use backend='torch'");
}

// Enough column splits that the grid fills the GPU about twice over.
int column_splits(int64_t row_blocks, int64_t cols, int device) {
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int64_t wanted = (2 * sms + row_blocks - 1) / row_blocks;
  return cuda::plan_col_splits(cols, static_cast<int>(std::min<int64_t>(wanted, 65535)));
}

int64_t row_blocks_of(int64_t rows) { return (rows + cuda::kRowBlock - 1) / cuda::kRowBlock; }

std::tuple<at::Tensor, at::Tensor> contrastive_lse_cuda(const at::Tensor& image, const at::Tensor& text,
                                                        const at::Tensor& logit_scale) {
  check_cuda_inputs(image, text, logit_scale);
  const c10::cuda::CUDAGuard guard(image.device());
  const auto type = element_type(image);
  const auto img = image.contiguous(), txt = text.contiguous();
  const auto scale = logit_scale.to(at::kFloat).contiguous();  // read on the device: no host sync
  const int64_t n = img.size(0), N = txt.size(0), D = img.size(1);
  const auto f32 = img.options().dtype(at::kFloat);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  auto row_lse = at::empty({n}, f32);
  at::Tensor col_lse;
  // Column partials: one (max, sum) pair of floats per row block and column.
  const int64_t chunk = rows_per_chunk(n, 2 * sizeof(float) * N / cuda::kRowBlock, cuda::kRowBlock, kScratchBudgetBytes);
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    const int64_t blocks = row_blocks_of(rows);
    const int splits = column_splits(blocks, N, image.get_device());
    auto row_max = at::empty({splits, rows}, f32), row_sum = at::empty({splits, rows}, f32);
    auto col_max = at::empty({blocks, N}, f32), col_sum = at::empty({blocks, N}, f32);
    cuda::LseForwardArgs args{static_cast<const char*>(img.data_ptr()) + r0 * D * img.element_size(),
                              txt.data_ptr(), rows, N, D, scale.data_ptr<float>(), splits,
                              row_max.data_ptr<float>(), row_sum.data_ptr<float>(),
                              col_max.data_ptr<float>(), col_sum.data_ptr<float>()};
    C10_CUDA_CHECK(cuda::launch_lse_forward(type, float32_mode(), args, stream));
    row_lse.narrow(0, r0, rows).copy_(merge_partial_lse(row_max, row_sum, 0));
    auto chunk_lse = merge_partial_lse(col_max, col_sum, 0);
    col_lse = col_lse.defined() ? at::logaddexp(col_lse, chunk_lse) : chunk_lse;
  }
  return {row_lse, col_lse};
}

// Rows and columns of the gradient-tile blocks: about square, within the scratch budget. Square blocks
// keep the accumulation traffic of the GEMMs, 2 * (N / block) passes over an N x D gradient, negligible
// even at N = 1M (row-only chunks would rewrite all of grad_text once per chunk).
std::pair<int64_t, int64_t> gradient_block(int64_t n, int64_t N, int64_t element_size) {
  const int64_t cells = kScratchBudgetBytes / element_size;
  const auto whole_blocks = [](int64_t x) { return std::max<int64_t>(cuda::kRowBlock, x / cuda::kRowBlock * cuda::kRowBlock); };
  const int64_t rows = std::min(n, whole_blocks(static_cast<int64_t>(std::sqrt(static_cast<double>(cells)))));
  const int64_t cols = std::min(N, whole_blocks(cells / rows));
  return {rows, cols};
}

// a @ b with an fp32 result: bf16/fp16 products are not rounded to 16 bits before they are summed.
at::Tensor mm_fp32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_lse_backward_cuda(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& logit_scale, const at::Tensor& row_lse, const at::Tensor& col_lse) {
  check_cuda_inputs(image, text, logit_scale);
  check_lse_backward_inputs(grad_row, grad_col, image, text, row_lse, col_lse);
  const c10::cuda::CUDAGuard guard(image.device());
  const auto type = element_type(image);
  const auto img = image.contiguous(), txt = text.contiguous();
  const auto scale = logit_scale.to(at::kFloat).contiguous();
  const auto as_f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const auto gr = as_f32(grad_row), gc = as_f32(grad_col), rl = as_f32(row_lse), cl = as_f32(col_lse);
  const int64_t n = img.size(0), N = txt.size(0), D = img.size(1);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  const auto [block_rows, block_cols] = gradient_block(n, N, img.element_size());
  auto grad_tile = at::empty({block_rows * block_cols}, img.options());
  // With a single block along a dimension the GEMM writes that gradient directly in the input dtype;
  // with several, the blocks' products are summed in fp32.
  const auto f32 = img.options().dtype(at::kFloat);
  auto grad_img = block_cols >= N ? at::empty_like(img) : at::zeros({n, D}, f32);
  auto grad_txt = block_rows >= n ? at::empty_like(txt) : at::zeros({N, D}, f32);
  std::vector<at::Tensor> scale_partials;
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    const auto img_rows = img.narrow(0, r0, rows);
    for (int64_t c0 = 0; c0 < N; c0 += block_cols) {
      const int64_t cols = std::min(block_cols, N - c0);
      const auto txt_cols = txt.narrow(0, c0, cols);
      const int splits = column_splits(row_blocks_of(rows), cols, image.get_device());
      auto partial = at::empty({row_blocks_of(rows) * splits}, f32);
      auto g = grad_tile.narrow(0, 0, rows * cols).view({rows, cols});  // will hold s * G for this block
      cuda::LseBackwardArgs args{img_rows.data_ptr(), txt_cols.data_ptr(), rows, cols, D, scale.data_ptr<float>(),
                                 gr.data_ptr<float>() + r0, rl.data_ptr<float>() + r0, gc.data_ptr<float>() + c0,
                                 cl.data_ptr<float>() + c0, splits, g.data_ptr(), partial.data_ptr<float>()};
      C10_CUDA_CHECK(cuda::launch_lse_backward(type, float32_mode(), args, stream));
      scale_partials.push_back(partial);
      auto grad_img_rows = grad_img.narrow(0, r0, rows);
      auto grad_txt_cols = grad_txt.narrow(0, c0, cols);
      if (block_cols >= N) at::mm_out(grad_img_rows, g, txt_cols);
      else grad_img_rows.add_(mm_fp32(g, txt_cols));
      if (block_rows >= n) at::mm_out(grad_txt_cols, g.t(), img_rows);
      else grad_txt_cols.add_(mm_fp32(g.t(), img_rows));
    }
  }
  auto grad_scale = at::cat(scale_partials).sum(at::kDouble).to(logit_scale.scalar_type()).reshape(logit_scale.sizes());
  return {grad_img.to(image.scalar_type()), grad_txt.to(text.scalar_type()), grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CUDA, m) {
  m.impl("contrastive_lse", &contrastive_lse_cuda);
  m.impl("contrastive_lse_backward", &contrastive_lse_backward_cuda);
}

}  // namespace fastclip
