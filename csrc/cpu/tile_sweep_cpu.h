// The tile machinery shared by the CPU pairwise ops (contrastive_lse, pairwise_sigmoid).
//
// Every op is a reduction over the tiles of <image_i, text_j> that are never stored whole:
//  - `sweep_row_blocks` hands each block of up to kMaxRowBlock rows (blocks in parallel) a way to visit
//    its rows x kColBlock dot-product tiles in column order, each computed by one BLAS call;
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

// A single-threaded GEMM of a 256 x 512 tile runs within ~10% of a large GEMM's rate, one of 64 x 512
// ~40% below it (MKL, D = 512): blocks are as tall as the thread count allows, down to kMinRowBlock.
constexpr int64_t kMaxRowBlock = 256;
constexpr int64_t kMinRowBlock = 32;
constexpr int64_t kColBlock = 512;  // wider than the GPU's tiles: a BLAS call per tile must amortise

// The scratch of a sweep (or chunked pass) over N columns: 1/32 of the N x N fp32 logits the naive loss
// materialises, within [8, 64] MiB, and at least one kMinRowBlock-row block per thread (so that the
// sweep's parallel_for has work for every thread). Small enough that from N = 8192 (D = 512) the fused
// loss's peak stays under 5% of the naive loss's on a few threads: the naive loss's ~16 bytes per logit
// come to 1 GiB there, the two feature gradients to 3% of it, an 8 MiB scratch to 0.8%.
inline int64_t scratch_budget_bytes(int64_t num_cols) {
  const int64_t share = std::clamp<int64_t>(num_cols * num_cols * 4 / 32, 8ll << 20, 64ll << 20);
  const int64_t per_thread_floor = int64_t{std::max(1, at::get_num_threads())} * kMinRowBlock * num_cols * 4;
  return std::max(share, per_thread_floor);
}

inline at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Rows per block of a sweep over `rows` rows: one block per thread or more, each at most kMaxRowBlock.
inline int64_t row_block_size(int64_t rows) {
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t per_thread = (rows + threads - 1) / threads;
  return std::clamp((per_thread + kMinRowBlock - 1) / kMinRowBlock * kMinRowBlock, kMinRowBlock, kMaxRowBlock);
}

inline int64_t row_blocks(int64_t rows) {
  const int64_t block = row_block_size(rows);
  return (rows + block - 1) / block;
}

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
//
// `strip`, if given, is a [row_end - row_begin, N] buffer: multi-threaded GEMMs of all the rows, one per
// kColBlock columns, fill it with every dot product first and each tile is copied out of it (a
// single-threaded GEMM per 256 x 512 tile runs ~10% below the rate of one over all the rows); a block may
// overwrite the strip's entries of the tiles it has visited (a backward writes G there in place). Without
// a strip, each tile comes from its own single-threaded GEMM and no N-wide buffer is needed.
template <typename acc_t, typename BlockFn>
void sweep_row_blocks(const at::Tensor& img, const at::Tensor& txt, int64_t row_begin, int64_t row_end,
                      acc_t* strip, const BlockFn& block_fn) {
  const int64_t num_cols = txt.size(0);
  const int64_t block = row_block_size(row_end - row_begin);
  if (strip != nullptr) {
    // One GEMM per kColBlock columns: after a GEMM with an N-wide output MKL holds a packing buffer of a
    // wide panel of the text features (about 10 MiB at N = 8192, D = 512), after a 512-wide one about
    // 2 MiB; measured here at an equal or better rate. (The PyTorch path's tiles do the same: GEMM_COLS.)
    auto dots = at::from_blob(strip, {row_end - row_begin, num_cols}, img.options());
    const auto rows = img.narrow(0, row_begin, row_end - row_begin);
    for (int64_t c0 = 0; c0 < num_cols; c0 += kColBlock) {
      const int64_t cols = std::min(kColBlock, num_cols - c0);
      auto out = dots.narrow(1, c0, cols);
      at::mm_out(out, rows, txt.narrow(0, c0, cols).t());
    }
  }
  at::parallel_for(0, row_blocks(row_end - row_begin), 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> tile(block * kColBlock);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = row_begin + b * block;
      const int64_t rows = std::min(block, row_end - r0);
      const auto visit_tiles = [&](const auto& tile_fn) {
        for (int64_t c0 = 0; c0 < num_cols; c0 += kColBlock) {
          const int64_t cols = std::min(kColBlock, num_cols - c0);
          if (strip == nullptr) {
            dot_tile(img, txt, r0, rows, c0, cols, tile.data());
          } else {
            for (int64_t i = 0; i < rows; ++i)
              std::copy_n(strip + (r0 - row_begin + i) * num_cols + c0, cols, tile.data() + i * cols);
          }
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
  const int64_t chunk = rows_per_chunk(n, sizeof(acc_t) * N, kMinRowBlock, scratch_budget_bytes(N));
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
