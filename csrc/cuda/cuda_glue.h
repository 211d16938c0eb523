// Host-side pieces shared by the ATen glue of the CUDA kernels (contrastive_lse_cuda.cu,
// pairwise_sigmoid_cuda.cu, chunked_epilogue_cuda.cu): dtype and float32-policy mapping, device checks,
// the launch geometry, and the fused kernels' view of the backward loop over gradient-tile blocks.
//
// Every backward here has the same shape: for a block of rows x columns, a kernel writes s * G for the
// block into a scratch tile in the input dtype, and two cuBLAS GEMMs turn it into the feature gradients
// (the device-agnostic loop of gradient_blocks.h). backward_through_gradient_blocks() runs that loop for
// a fused kernel, which recomputes the similarity tiles itself; the op supplies only the kernel launch
// for one block.
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
#include <tuple>
#include <utility>
#include <vector>

#include "gradient_blocks.h"
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

// Enough column splits that the grid fills the GPU: one wave of the kernel's resident CTAs (ctas_per_sm,
// from the kernel's occupancy query) on every SM.
inline int column_splits(int64_t row_blocks, int64_t cols, int device, int ctas_per_sm) {
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int64_t wanted = (ctas_per_sm * sms + row_blocks - 1) / row_blocks;
  return cuda::plan_col_splits(cols, static_cast<int>(std::min<int64_t>(wanted, 65535)));
}

inline int64_t row_blocks_of(int64_t rows) { return (rows + cuda::kRowBlock - 1) / cuda::kRowBlock; }

// The backward loop, its block sizing and the fp16 tile scaling are device-agnostic (gradient_blocks.h);
// the fused kernels use them under these names.
using fastclip::add_product;
using fastclip::fp16_tile_scaling;
using fastclip::mm_fp32;
using fastclip::TileScaling;

// One gradient-tile block, as the op's launch callable sees it: rows [r0, r0 + rows) of the image
// features and columns [c0, c0 + cols) of the text features; the kernel fills grad_tile ([rows, cols],
// the input dtype) with tile_scale * s * G over a grid of row_blocks x col_splits CTAs (one per-CTA
// partial each).
struct GradientBlock {
  int64_t r0, rows, c0, cols;
  const void* image;        // the block's first image row
  const void* text;         // the block's first text row
  void* grad_tile;
  const float* tile_scale;  // device scalar: TileScaling::factor, or nullptr (1)
  int col_splits;
  int64_t ctas;             // row_blocks_of(rows) * col_splits
};

// Feature gradients {grad_image, grad_text} (input dtype) of a fused kernel's backward: the shared loop
// (backward_through_blocks, gradient_blocks.h) over blocks sized for a tile in the input dtype within the
// scratch budget, each block handed to launch(block) with the kernel's launch geometry. launch must
// enqueue, on the current stream, the kernel that writes the (scaled) s * G for `block`; the caller holds
// its device guard. ctas_per_sm: the kernel's occupancy (column_splits). keep_fp32: see backward_through_blocks.
template <typename Launch>
std::pair<at::Tensor, at::Tensor> backward_through_gradient_blocks(const at::Tensor& img, const at::Tensor& txt,
                                                                   const std::optional<TileScaling>& scaling,
                                                                   int ctas_per_sm, Launch&& launch,
                                                                   bool keep_fp32 = false) {
  const BlockBudget budget{static_cast<int64_t>(img.element_size()), kScratchBudgetBytes, cuda::kRowBlock};
  const auto fill = [&](const BlockSpan& block) {
    const int splits = column_splits(row_blocks_of(block.rows), block.cols, img.get_device(), ctas_per_sm);
    launch(GradientBlock{block.r0, block.rows, block.c0, block.cols, block.image.data_ptr(), block.text.data_ptr(),
                         block.grad_tile.data_ptr(), scaling ? scaling->factor.data_ptr<float>() : nullptr, splits,
                         row_blocks_of(block.rows) * splits});
  };
  return backward_through_blocks(img, txt, scaling, budget, fill, keep_fp32);
}

// The sum of the kernels' per-CTA partials, in double and in a fixed order (deterministic), shaped and
// typed like `like` (logit_scale or logit_bias).
inline at::Tensor sum_partials(const std::vector<at::Tensor>& partials, const at::Tensor& like) {
  return at::cat(partials).sum(at::kDouble).to(like.scalar_type()).reshape(like.sizes());
}

}  // namespace glue
}  // namespace fastclip
