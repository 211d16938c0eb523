// CPU implementation of fastclip::contrastive_lse and its backward.
//
// The same tiled algorithm as the CUDA kernel (kernels/contrastive_lse.cu), so that CI tests it
// (tiles are wider here and their dot products come from a BLAS call instead of tensor cores):
//  - forward: rows in blocks of kRowBlock, in parallel; each block sweeps the columns tile by tile,
//    keeping a running (max, sum) per row (online log-sum-exp) and writing the tile's column partials
//    (max, sum over the block's rows) to a [blocks, N] buffer, merged afterwards. Rows are processed in
//    chunks so that this buffer stays within a fixed budget whatever N is.
//  - backward: per chunk of rows, recompute the similarity tiles, write the gradient tile
//    G = gr * P_row + gc * P_col into a [chunk, N] buffer, then two GEMMs give the feature gradients.
// No N x N matrix is ever stored.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "contrastive_lse.h"

namespace fastclip {
namespace {

constexpr int64_t kRowBlock = 64;
constexpr int64_t kColBlock = 512;  // wider than the GPU's tiles: a BLAS call per tile must amortise
constexpr int64_t kScratchBudgetBytes = 64ll << 20;

// tile[i * cols + j] = <img[r0 + i], txt[c0 + j]> for a rows x cols tile, by one (single-threaded) GEMM.
template <typename acc_t>
void dot_tile(const at::Tensor& img, const at::Tensor& txt, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
              acc_t* tile) {
  auto out = at::from_blob(tile, {rows, cols}, img.options());
  at::mm_out(out, img.narrow(0, r0, rows), txt.narrow(0, c0, cols).t());
}

template <typename acc_t>
void forward_chunk(const at::Tensor& img, const at::Tensor& txt, int64_t cols, acc_t scale, int64_t row_begin,
                   int64_t row_end, acc_t* row_lse, acc_t* col_max, acc_t* col_sum) {
  const int64_t blocks = (row_end - row_begin + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> tile(kRowBlock * kColBlock);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = row_begin + b * kRowBlock;
      const int64_t rows = std::min(kRowBlock, row_end - r0);
      acc_t run_max[kRowBlock], run_sum[kRowBlock];
      for (int64_t i = 0; i < rows; ++i) run_max[i] = -std::numeric_limits<acc_t>::infinity(), run_sum[i] = 0;
      for (int64_t c0 = 0; c0 < cols; c0 += kColBlock) {
        const int64_t tc = std::min(kColBlock, cols - c0);
        dot_tile(img, txt, r0, rows, c0, tc, tile.data());
        for (int64_t i = 0; i < rows; ++i) {
          acc_t* s_row = tile.data() + i * tc;
          acc_t tile_max = -std::numeric_limits<acc_t>::infinity();
          for (int64_t j = 0; j < tc; ++j) s_row[j] *= scale, tile_max = std::max(tile_max, s_row[j]);
          const acc_t new_max = std::max(run_max[i], tile_max);
          acc_t sum = run_sum[i] * std::exp(run_max[i] - new_max);
          for (int64_t j = 0; j < tc; ++j) sum += std::exp(s_row[j] - new_max);
          run_max[i] = new_max, run_sum[i] = sum;
        }
        for (int64_t j = 0; j < tc; ++j) {
          acc_t m = -std::numeric_limits<acc_t>::infinity(), sum = 0;
          for (int64_t i = 0; i < rows; ++i) m = std::max(m, tile[i * tc + j]);
          for (int64_t i = 0; i < rows; ++i) sum += std::exp(tile[i * tc + j] - m);
          col_max[b * cols + c0 + j] = m, col_sum[b * cols + c0 + j] = sum;
        }
      }
      for (int64_t i = 0; i < rows; ++i) row_lse[r0 + i] = run_max[i] + std::log(run_sum[i]);
    }
  });
}

template <typename acc_t>
void backward_chunk(const at::Tensor& img, const at::Tensor& txt, int64_t cols, acc_t scale, int64_t row_begin,
                    int64_t row_end, const acc_t* grad_row, const acc_t* grad_col, const acc_t* row_lse,
                    const acc_t* col_lse, acc_t* grad_tile, double* scale_partial) {
  const int64_t blocks = (row_end - row_begin + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> tile(kRowBlock * kColBlock);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = row_begin + b * kRowBlock;
      const int64_t rows = std::min(kRowBlock, row_end - r0);
      double ds = 0;  // sum of G * dS/ds = G * <image_i, text_j>; double: it cancels against the positives
      for (int64_t c0 = 0; c0 < cols; c0 += kColBlock) {
        const int64_t tc = std::min(kColBlock, cols - c0);
        dot_tile(img, txt, r0, rows, c0, tc, tile.data());
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t r = r0 + i;
          acc_t* g_row = grad_tile + (r - row_begin) * cols + c0;
          for (int64_t j = 0; j < tc; ++j) {
            const acc_t dot = tile[i * tc + j], s = scale * dot;
            const acc_t g = grad_row[r] * std::exp(s - row_lse[r]) + grad_col[c0 + j] * std::exp(s - col_lse[c0 + j]);
            g_row[j] = g;
            ds += g * dot;
          }
        }
      }
      scale_partial[b] = ds;
    }
  });
}

at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> contrastive_lse_cpu(const at::Tensor& image, const at::Tensor& text,
                                                       const at::Tensor& logit_scale) {
  check_lse_inputs(image, text, logit_scale);
  const auto acc_type = accumulate_type(image.scalar_type());
  // Detached: the GEMMs below run in parallel_for worker threads, which do not inherit grad mode.
  const auto img = image.detach().to(acc_type).contiguous(), txt = text.detach().to(acc_type).contiguous();
  const int64_t n = img.size(0), N = txt.size(0);
  auto row_lse = at::empty({n}, img.options());
  at::Tensor col_lse;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "contrastive_lse_cpu", [&] {
    const auto scale = static_cast<scalar_t>(logit_scale.item<double>());
    // Column partials: one (max, sum) pair per row block and column.
    const int64_t chunk = rows_per_chunk(n, 2 * sizeof(scalar_t) * N / kRowBlock, kRowBlock, kScratchBudgetBytes);
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t r1 = std::min(n, r0 + chunk);
      const int64_t blocks = (r1 - r0 + kRowBlock - 1) / kRowBlock;
      auto col_max = at::empty({blocks, N}, img.options()), col_sum = at::empty({blocks, N}, img.options());
      forward_chunk<scalar_t>(img, txt, N, scale, r0, r1,
                              row_lse.data_ptr<scalar_t>(), col_max.data_ptr<scalar_t>(), col_sum.data_ptr<scalar_t>());
      auto chunk_lse = merge_partial_lse(col_max, col_sum, 0);
      col_lse = col_lse.defined() ? at::logaddexp(col_lse, chunk_lse) : chunk_lse;
    }
  });
  return {row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_lse_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& logit_scale, const at::Tensor& row_lse, const at::Tensor& col_lse) {
  check_lse_inputs(image, text, logit_scale);
  check_lse_backward_inputs(grad_row, grad_col, image, text, row_lse, col_lse);
  const auto acc_type = accumulate_type(image.scalar_type());
  const auto img = image.detach().to(acc_type).contiguous(), txt = text.detach().to(acc_type).contiguous();
  const auto gr = grad_row.to(acc_type).contiguous(), gc = grad_col.to(acc_type).contiguous();
  const auto rl = row_lse.to(acc_type).contiguous(), cl = col_lse.to(acc_type).contiguous();
  const int64_t n = img.size(0), N = txt.size(0);
  auto grad_img = at::empty_like(img), grad_txt = at::zeros_like(txt);
  at::Tensor grad_scale;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "contrastive_lse_backward_cpu", [&] {
    const auto scale = static_cast<scalar_t>(logit_scale.item<double>());
    const int64_t chunk = rows_per_chunk(n, sizeof(scalar_t) * N, kRowBlock, kScratchBudgetBytes);
    auto grad_tile = at::empty({chunk, N}, img.options());
    std::vector<double> partials;
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t r1 = std::min(n, r0 + chunk);
      std::vector<double> chunk_partials((r1 - r0 + kRowBlock - 1) / kRowBlock);
      backward_chunk<scalar_t>(img, txt, N, scale, r0, r1,
                               gr.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), rl.data_ptr<scalar_t>(),
                               cl.data_ptr<scalar_t>(), grad_tile.data_ptr<scalar_t>(), chunk_partials.data());
      partials.insert(partials.end(), chunk_partials.begin(), chunk_partials.end());
      auto g = grad_tile.narrow(0, 0, r1 - r0);
      auto grad_img_rows = grad_img.narrow(0, r0, r1 - r0);
      at::mm_out(grad_img_rows, g, txt).mul_(scale);
      grad_txt.addmm_(g.t(), img.narrow(0, r0, r1 - r0), /*beta=*/1, /*alpha=*/scale);
    }
    double ds = 0;  // fixed summation order: deterministic
    for (auto p : partials) ds += p;
    grad_scale = at::full_like(logit_scale, ds);
  });
  return {grad_img.to(image.scalar_type()), grad_txt.to(text.scalar_type()), grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CPU, m) {
  m.impl("contrastive_lse", &contrastive_lse_cpu);
  m.impl("contrastive_lse_backward", &contrastive_lse_backward_cpu);
}

}  // namespace fastclip
