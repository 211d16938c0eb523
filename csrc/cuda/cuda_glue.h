// Host-side pieces shared by the ATen glue of the fused CUDA kernels (contrastive_lse_cuda.cu,
// pairwise_sigmoid_cuda.cu): dtype and float32-policy mapping, device checks, the launch geometry, and
// the backward's loop over gradient-tile blocks.
//
// Every backward here has the same shape: for a block of rows x columns, a fused kernel recomputes the
// similarity tiles and writes s * G for the block into a scratch tile in the input dtype (fp16 tiles
// times a power of two that keeps them in range, see TileScaling), and two cuBLAS GEMMs turn it into the
// feature gradients (the G @ text product has a D-wide output that does not fit in registers; a real
// GEMM runs it near peak). backward_through_gradient_blocks() runs that loop; the op supplies only the
// kernel launch for one block.
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

// sum = a @ b (first) or sum += a @ b, into an fp32 `sum`; a and b in the input dtype.
inline void add_product(at::Tensor& sum, bool first, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    if (first) at::mm_out(sum, a, b);
    else sum.addmm_(a, b);
    return;
  }
  const auto product = mm_fp32(a, b);
  if (first) sum.copy_(product);
  else sum.add_(product);
}

// How an fp16 gradient tile is kept in range. s * G spans far more than fp16 does: at N = 16384, D = 768,
// s = 100 about 85% of its entries lie below fp16's smallest subnormal (6e-8) and would flush to zero.
// The kernel stores factor * s * G instead, factor = 2^k chosen so that the largest entry the tile can
// hold lands in (2^14, 2^15], safely below fp16's max (65504); the GEMMs then run with fp32 outputs
// (a scaled fp16 output could overflow) and `inverse` undoes the factor exactly (a power of two).
struct TileScaling {
  at::Tensor factor;   // 0-d fp32 on the device: read by the kernel, no host sync
  at::Tensor inverse;  // 0-d fp32: 1 / factor
};

constexpr int kTileExponent = 15;  // the largest possible tile entry is kept in (2^14, 2^15]

// 2^k for an int32 tensor k in [-126, 126], assembled from the float's bits: exact, no exp2 rounding.
inline at::Tensor power_of_two(const at::Tensor& k) {
  return (k + 127).bitwise_left_shift(23).view(at::kFloat);
}

// The scaling of fp16 tiles from `bound`, a one-element fp32 device tensor with |s * G_ij| <= bound for
// every entry of the tile. (bf16 has fp32's range and needs none.)
inline TileScaling fp16_tile_scaling(const at::Tensor& bound) {
  // bound = m * 2^e with m in [0.5, 1), so bound * 2^(15 - e) lies in [2^14, 2^15]: exact, unlike log2.
  const auto exponent = std::get<1>(at::frexp(bound));
  auto k = (kTileExponent - exponent).clamp(-126, 126);  // factor and inverse stay normal floats
  // A zero bound (an all-zero tile) or a non-finite one (the gradients are inf/nan anyway): factor 1.
  k = at::where(at::isfinite(bound) & (bound > 0), k, at::zeros_like(k));
  return TileScaling{power_of_two(k), power_of_two(-k)};
}

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

// Feature gradients {grad_image, grad_text} (input dtype) of an op whose backward is "s * G, then the two
// GEMMs": launch(block) must enqueue, on the current stream, the kernel that writes the (scaled) s * G
// for `block`. img and txt are contiguous [n, D] and [N, D] on one CUDA device; the caller holds its
// device guard. With keep_fp32 both come back as fp32 sums, unrounded, for a caller that adds terms of
// its own before the one rounding (this keeps a whole fp32 [n, D] for grad_image too).
//
// Rows are the outer loop: a row block of grad_image is final after its columns loop and is rounded to
// the input dtype right away (its fp32 sum is one [block_rows, D] buffer). Every column of grad_text is
// in flight until the last row block, so grad_text needs an fp32 sum of [N, D] (that is the floor for
// any visiting order of the blocks, short of recomputing tiles): one per column block, each rounded and
// freed in turn at the end. fp32 inputs sum straight into their outputs.
template <typename Launch>
std::pair<at::Tensor, at::Tensor> backward_through_gradient_blocks(const at::Tensor& img, const at::Tensor& txt,
                                                                   const std::optional<TileScaling>& scaling,
                                                                   Launch&& launch, bool keep_fp32 = false) {
  const int64_t n = img.size(0), N = txt.size(0), D = img.size(1);
  const bool fp32 = img.scalar_type() == at::kFloat;
  const auto f32 = img.options().dtype(at::kFloat);
  const auto [block_rows, block_cols] = gradient_block(n, N, img.element_size());
  // One scratch tile for every block: the stream orders each kernel after the previous block's GEMMs.
  auto grad_tile = at::empty({block_rows * block_cols}, img.options());
  // A gradient that is one block's product (and has no scaling to undo) is written by its GEMM directly.
  const bool direct_img = fp32 || (block_cols >= N && !scaling && !keep_fp32);
  const bool direct_txt = fp32 || (block_rows >= n && !scaling && !keep_fp32);
  auto grad_img = direct_img || !keep_fp32 ? at::empty_like(img) : at::empty({n, D}, f32);
  auto grad_txt = direct_txt ? at::empty_like(txt) : at::Tensor();
  auto row_sum = direct_img || keep_fp32 ? at::Tensor() : at::empty({block_rows, D}, f32);
  std::vector<at::Tensor> col_sums;  // fp32 [cols, D] per column block, unless direct_txt
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    const auto img_rows = img.narrow(0, r0, rows);
    auto grad_img_rows = grad_img.narrow(0, r0, rows);
    auto img_sum = direct_img || keep_fp32 ? grad_img_rows : row_sum.narrow(0, 0, rows);
    for (int64_t c0 = 0, b = 0; c0 < N; c0 += block_cols, ++b) {
      const int64_t cols = std::min(block_cols, N - c0);
      const auto txt_cols = txt.narrow(0, c0, cols);
      const int splits = column_splits(row_blocks_of(rows), cols, img.get_device());
      auto g = grad_tile.narrow(0, 0, rows * cols).view({rows, cols});  // will hold s * G for this block
      launch(GradientBlock{r0, rows, c0, cols, img_rows.data_ptr(), txt_cols.data_ptr(), g.data_ptr(),
                           scaling ? scaling->factor.data_ptr<float>() : nullptr, splits,
                           row_blocks_of(rows) * splits});
      if (direct_img && !fp32) at::mm_out(img_sum, g, txt_cols);
      else add_product(img_sum, c0 == 0, g, txt_cols);
      if (direct_txt) {
        auto txt_sum = grad_txt.narrow(0, c0, cols);
        if (fp32) add_product(txt_sum, r0 == 0, g.t(), img_rows);
        else at::mm_out(txt_sum, g.t(), img_rows);
      } else {
        if (r0 == 0) col_sums.push_back(at::empty({cols, D}, f32));
        add_product(col_sums[b], r0 == 0, g.t(), img_rows);
      }
    }
    if (!direct_img && keep_fp32) {
      if (scaling) img_sum.mul_(scaling->inverse);
    } else if (!direct_img) {
      grad_img_rows.copy_(scaling ? img_sum.mul_(scaling->inverse) : img_sum);
    }
  }
  grad_tile.reset();
  row_sum.reset();
  if (!direct_txt) {
    // Rounded one column block at a time, each fp32 sum freed before the next: the peak stays near the
    // fp32 sums alone, not fp32 sums plus a whole rounded copy.
    std::vector<at::Tensor> rounded;
    for (auto& sum : col_sums) {
      if (scaling) sum.mul_(scaling->inverse);
      rounded.push_back(keep_fp32 ? sum : sum.to(txt.scalar_type()));
      sum.reset();
    }
    grad_txt = rounded.size() == 1 ? rounded.front() : at::cat(rounded);
  }
  return {grad_img, grad_txt};
}

// The sum of the kernels' per-CTA partials, in double and in a fixed order (deterministic), shaped and
// typed like `like` (logit_scale or logit_bias).
inline at::Tensor sum_partials(const std::vector<at::Tensor>& partials, const at::Tensor& like) {
  return at::cat(partials).sum(at::kDouble).to(like.scalar_type()).reshape(like.sizes());
}

}  // namespace glue
}  // namespace fastclip
