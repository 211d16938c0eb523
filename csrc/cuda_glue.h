// Host-side pieces shared by the ATen glue of the fused CUDA kernels (contrastive_lse_cuda.cu,
// pairwise_sigmoid_cuda.cu): dtype and float32-policy mapping, device checks, the launch geometry, and
// the backward's loop over gradient-tile blocks.
//
// Every backward here has the same shape: for a block of rows x columns, a fused kernel recomputes the
// similarity tiles and writes s * G for the block into a scratch tile in the input dtype, and two cuBLAS
// GEMMs turn it into the feature gradients (the G @ text product has a D-wide output that does not fit
// in registers; a real GEMM runs it near peak). backward_through_gradient_blocks() runs that loop; the
// op supplies only the kernel launch for one block.
// Only c10/cuda headers (no ATen/cuda/CUDAContext.h, which drags in cuBLAS/cuSPARSE headers), so the
// glue also compiles against a CPU build of PyTorch plus the CUDA toolkit: CI checks it with nvcc.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "tile_config.cuh"

namespace fastclip {
namespace glue {

// Scratch per pass: column partials (forward) or the gradient-tile block (backward). It bounds the extra
// memory whatever N is; 256 MiB is an 11k x 11k bf16 block, large enough for the GEMMs to run near peak.
constexpr int64_t kScratchBudgetBytes = 256ll << 20;

inline cuda::ElementType element_type(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::ElementType::kFloat32;
    case at::kBFloat16: return cuda::ElementType::kBFloat16;
    case at::kHalf: return cuda::ElementType::kFloat16;
    default:
      TORCH_CHECK(false, "the CUDA ", op, " kernel takes float32, bfloat16 or float16 features, got ",
                  t.scalar_type(), "; use backend='torch' for other dtypes");
  }
}

// Follow PyTorch's own float32 matmul policy (torch.backends.cuda.matmul.allow_tf32).
inline cuda::Float32Mode float32_mode() {
  return at::globalContext().allowTF32CuBLAS() ? cuda::Float32Mode::kTf32 : cuda::Float32Mode::kTf32x3;
}

inline int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

// The features (and logit_scale) on one CUDA device of compute capability 8.0 or newer; the op's own
// shape/dtype checks run first.
inline void check_cuda_device(const at::Tensor& image, const at::Tensor& logit_scale, const char* op) {
  TORCH_CHECK(image.is_cuda() && logit_scale.device() == image.device(),
              "image_features, text_features and logit_scale must be on one CUDA device, got ", image.device(),
              " and ", logit_scale.device());
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, image.get_device());
  TORCH_CHECK(major >= 8, "the CUDA ", op, " kernel needs compute capability 8.0 or newer (tensor-core "
              "bf16/tf32), this device is ", major, ".x; use backend='torch'");
}

// Enough column splits that the grid fills the GPU about twice over.
inline int column_splits(int64_t row_blocks, int64_t cols, int device) {
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int64_t wanted = (2 * sms + row_blocks - 1) / row_blocks;
  return cuda::plan_col_splits(cols, static_cast<int>(std::min<int64_t>(wanted, 65535)));
}

inline int64_t row_blocks_of(int64_t rows) { return (rows + cuda::kRowBlock - 1) / cuda::kRowBlock; }

// Rows and columns of the gradient-tile blocks: about square, within the scratch budget. Square blocks
// keep the accumulation traffic of the GEMMs, 2 * (N / block) passes over an N x D gradient, negligible
// even at N = 1M (row-only chunks would rewrite all of grad_text once per chunk).
inline std::pair<int64_t, int64_t> gradient_block(int64_t n, int64_t N, int64_t element_size) {
  const int64_t cells = kScratchBudgetBytes / element_size;
  const auto whole_blocks = [](int64_t x) { return std::max<int64_t>(cuda::kRowBlock, x / cuda::kRowBlock * cuda::kRowBlock); };
  const int64_t rows = std::min(n, whole_blocks(static_cast<int64_t>(std::sqrt(static_cast<double>(cells)))));
  const int64_t cols = std::min(N, whole_blocks(cells / rows));
  return {rows, cols};
}

// a @ b with an fp32 result: bf16/fp16 products are not rounded to 16 bits before they are summed.
inline at::Tensor mm_fp32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
}

// One gradient-tile block, as the op's launch callable sees it: rows [r0, r0 + rows) of the image
// features and columns [c0, c0 + cols) of the text features; the kernel fills grad_tile ([rows, cols],
// the input dtype) with s * G over a grid of row_blocks x col_splits CTAs (one per-CTA partial each).
struct GradientBlock {
  int64_t r0, rows, c0, cols;
  const void* image;  // the block's first image row
  const void* text;   // the block's first text row
  void* grad_tile;
  int col_splits;
  int64_t ctas;       // row_blocks_of(rows) * col_splits
};

// Feature gradients {grad_image, grad_text} (input dtype) of an op whose backward is "s * G, then the two
// GEMMs": launch(block) must enqueue, on the current stream, the kernel that writes s * G for `block`.
// img and txt are contiguous [n, D] and [N, D] on one CUDA device; the caller holds its device guard.
template <typename Launch>
std::pair<at::Tensor, at::Tensor> backward_through_gradient_blocks(const at::Tensor& img, const at::Tensor& txt,
                                                                   Launch&& launch) {
  const int64_t n = img.size(0), N = txt.size(0), D = img.size(1);
  const auto [block_rows, block_cols] = gradient_block(n, N, img.element_size());
  // One scratch tile for every block: the stream orders each kernel after the previous block's GEMMs.
  auto grad_tile = at::empty({block_rows * block_cols}, img.options());
  // With a single block along a dimension the GEMM writes that gradient directly in the input dtype;
  // with several, the blocks' products are summed in fp32.
  const auto f32 = img.options().dtype(at::kFloat);
  auto grad_img = block_cols >= N ? at::empty_like(img) : at::zeros({n, D}, f32);
  auto grad_txt = block_rows >= n ? at::empty_like(txt) : at::zeros({N, D}, f32);
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    const auto img_rows = img.narrow(0, r0, rows);
    for (int64_t c0 = 0; c0 < N; c0 += block_cols) {
      const int64_t cols = std::min(block_cols, N - c0);
      const auto txt_cols = txt.narrow(0, c0, cols);
      const int splits = column_splits(row_blocks_of(rows), cols, img.get_device());
      auto g = grad_tile.narrow(0, 0, rows * cols).view({rows, cols});  // will hold s * G for this block
      launch(GradientBlock{r0, rows, c0, cols, img_rows.data_ptr(), txt_cols.data_ptr(), g.data_ptr(), splits,
                           row_blocks_of(rows) * splits});
      auto grad_img_rows = grad_img.narrow(0, r0, rows);
      auto grad_txt_cols = grad_txt.narrow(0, c0, cols);
      if (block_cols >= N) at::mm_out(grad_img_rows, g, txt_cols);
      else grad_img_rows.add_(mm_fp32(g, txt_cols));
      if (block_rows >= n) at::mm_out(grad_txt_cols, g.t(), img_rows);
      else grad_txt_cols.add_(mm_fp32(g.t(), img_rows));
    }
  }
  return {grad_img.to(img.scalar_type()), grad_txt.to(txt.scalar_type())};
}

// The sum of the kernels' per-CTA partials, in double and in a fixed order (deterministic), shaped and
// typed like `like` (logit_scale or logit_bias).
inline at::Tensor sum_partials(const std::vector<at::Tensor>& partials, const at::Tensor& like) {
  return at::cat(partials).sum(at::kDouble).to(like.scalar_type()).reshape(like.sizes());
}

}  // namespace glue
}  // namespace fastclip
