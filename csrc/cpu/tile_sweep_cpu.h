// The tile machinery shared by the CPU pairwise ops (contrastive_lse, pairwise_sigmoid).
//
// Every op is a reduction over the tiles of <image_i, text_j> that are never stored whole:
//  - `sweep_row_blocks` hands each block of kRowBlock rows (blocks in parallel) a way to visit its
//    kRowBlock x kColBlock dot-product tiles in column order, each computed by one BLAS call;
//  - `backward_through_gradient_tiles` runs a backward: per chunk of rows (sized to a fixed scratch
//    budget) the op fills the gradient tile G = dLoss/dS, then two GEMMs turn it into the gradients of
//    the image and text features.
// The CUDA kernels (kernels/similarity_tile.cuh) follow the same structure with smaller tiles.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace fastclip {
namespace cpu {

constexpr int64_t kRowBlock = 64;
constexpr int64_t kColBlock = 512;  // wider than the GPU's tiles: a BLAS call per tile must amortise
constexpr int64_t kScratchBudgetBytes = 64ll << 20;

inline at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline int64_t row_blocks(int64_t rows) { return (rows + kRowBlock - 1) / kRowBlock; }

// tile[i * cols + j] = <img[r0 + i], txt[c0 + j]> for a rows x cols tile, by one (single-threaded) GEMM.
template <typename acc_t>
void dot_tile(const at::Tensor& img, const at::Tensor& txt, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
              acc_t* tile) {
  auto out = at::from_blob(tile, {rows, cols}, img.options());
  at::mm_out(out, img.narrow(0, r0, rows), txt.narrow(0, c0, cols).t());
}

// For each block b of rows [row_begin, row_end) (in parallel): block_fn(b, r0, rows, visit_tiles), where
// visit_tiles(tile_fn) calls tile_fn(c0, cols, tile) for the block's dot-product tiles in column order.
// img and txt are contiguous tensors of the accumulation type, detached (worker threads do not inherit
// grad mode).
template <typename acc_t, typename BlockFn>
void sweep_row_blocks(const at::Tensor& img, const at::Tensor& txt, int64_t row_begin, int64_t row_end,
                      const BlockFn& block_fn) {
  const int64_t num_cols = txt.size(0);
  at::parallel_for(0, row_blocks(row_end - row_begin), 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> tile(kRowBlock * kColBlock);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = row_begin + b * kRowBlock;
      const int64_t rows = std::min(kRowBlock, row_end - r0);
      const auto visit_tiles = [&](const auto& tile_fn) {
        for (int64_t c0 = 0; c0 < num_cols; c0 += kColBlock) {
          const int64_t cols = std::min(kColBlock, num_cols - c0);
          dot_tile(img, txt, r0, rows, c0, cols, tile.data());
          tile_fn(c0, cols, tile.data());
        }
      };
      block_fn(b, r0, rows, visit_tiles);
    }
  });
}

// Feature gradients from a gradient tile filled chunk by chunk: fill(r0, r1, grad) writes G for rows
// [r0, r1) into grad ([r1 - r0, N], row-major); then grad_img[r0:r1] = scale * G @ txt and
// grad_txt += scale * G^T @ img[r0:r1]. grad_txt must start at zero.
template <typename acc_t, typename FillFn>
void backward_through_gradient_tiles(const at::Tensor& img, const at::Tensor& txt, acc_t scale, at::Tensor& grad_img,
                                     at::Tensor& grad_txt, const FillFn& fill) {
  const int64_t n = img.size(0), N = txt.size(0);
  const int64_t chunk = rows_per_chunk(n, sizeof(acc_t) * N, kRowBlock, kScratchBudgetBytes);
  auto grad_tile = at::empty({chunk, N}, img.options());
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t r1 = std::min(n, r0 + chunk);
    auto g = grad_tile.narrow(0, 0, r1 - r0);
    fill(r0, r1, g.data_ptr<acc_t>());
    auto grad_img_rows = grad_img.narrow(0, r0, r1 - r0);
    at::mm_out(grad_img_rows, g, txt).mul_(scale);
    grad_txt.addmm_(g.t(), img.narrow(0, r0, r1 - r0), /*beta=*/1, /*alpha=*/scale);
  }
}

// Sum of per-block partials in a fixed order (deterministic whatever the thread count).
inline double ordered_sum(const std::vector<double>& partials) {
  double total = 0;
  for (double p : partials) total += p;
  return total;
}

}  // namespace cpu
}  // namespace fastclip
