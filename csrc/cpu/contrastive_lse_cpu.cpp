// CPU implementation of fastclip::contrastive_lse and its backward.
//
// The same tiled algorithm as the CUDA kernel (kernels/contrastive_lse.cu), so that CI tests it
// (tiles are wider here and their dot products come from a BLAS call instead of tensor cores):
//  - forward: rows in blocks (cpu/tile_sweep_cpu.h), in parallel; each block sweeps the columns tile by tile,
//    keeping a running (max, sum) per row (online log-sum-exp) and writing the tile's column partials
//    (max, sum over the block's rows) to a [blocks, N] buffer, merged afterwards. Rows are processed in
//    chunks so that this buffer stays within a fixed budget whatever N is.
//  - backward: per chunk of rows, recompute the similarity tiles, write the gradient tile
//    G = gr * P_row + gc * P_col into a [chunk, N] buffer, then two GEMMs give the feature gradients.
// A masked diagonal (entries (i, i + d)) is set to -inf in each tile before it is reduced.
// No N x N matrix is ever stored.
// With FASTCLIP_CPU_LOSS_PATH=chunked the ops run the CUDA chunked path's driver instead, with its CPU
// epilogue (chunked/chunked_loss.h), so that the CPU tests check that path's arithmetic.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "chunked/chunked_loss.h"
#include "chunked/loss_path.h"
#include "common.h"
#include "cpu/chunked_epilogue_cpu.h"
#include "cpu/row_sums.h"
#include "cpu/tile_sweep_cpu.h"
#include "cpu/vector_exp.h"
#include "ops/contrastive_loss_backward.h"
#include "ops/contrastive_lse.h"

namespace fastclip {
namespace {

using cpu::kMaxRowBlock;

// The chunked path's scratch budget on CPU: the tile sweep's.
int64_t chunk_budget(const at::Tensor& text) { return chunk_budget_bytes(cpu::scratch_budget_bytes(text.size(0))); }

// The column of row r that the mask removes, or -1 (no mask, or the diagonal misses row r).
inline int64_t masked_column(const std::optional<int64_t>& diagonal, int64_t r, int64_t cols) {
  if (!diagonal) return -1;
  const int64_t j = r + *diagonal;
  return j >= 0 && j < cols ? j : -1;
}

// One row's exponentials: out[j] = exp(scale * dot[j] - shift[j]) (shift per column) or - shift (one value).
template <typename acc_t>
void exp_of_scaled(const acc_t* dot, acc_t scale, const acc_t* shift, int64_t n, acc_t* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = scale * dot[j] - shift[j];
  cpu::exp_inplace(out, n);
}

template <typename acc_t>
void exp_of_scaled(const acc_t* dot, acc_t scale, acc_t shift, int64_t n, acc_t* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = scale * dot[j] - shift;
  cpu::exp_inplace(out, n);
}

// Zero the entries of a row that take no part in the sweep's sums (the masked one, a pair entry): they
// may hold inf or NaN (a fully masked row's lse is -inf), so they are overwritten, never subtracted.
template <typename acc_t>
void clear_entry(int64_t j, int64_t n, acc_t* a, acc_t* b, acc_t* c) {
  if (j < 0 || j >= n) return;
  a[j] = 0, b[j] = 0;
  if (c != nullptr) c[j] = 0;
}

// How far below a tile's reference its exponentials may reach and still share one: three quarters of the
// way to the smallest normal number (fp32: 65.5; exp_inplace flushes below -87.33), so that every term
// that matters keeps its precision. The CUDA kernels' rule (kernels/shared_exponential.cuh).
template <typename acc_t>
acc_t shared_exp_spread() {
  return acc_t(-0.75) * std::log(std::numeric_limits<acc_t>::min());
}

// (m, l) += (m2, l2) for (max, sum of exp(v - max)) pairs; (-inf, 0) is the empty pair.
template <typename acc_t>
void merge_max_sum(acc_t& m, acc_t& l, acc_t m2, acc_t l2) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  if (m2 == kNegInf) return;
  const acc_t top = std::max(m, m2);
  l = (m == kNegInf ? acc_t(0) : l * std::exp(m - top)) + l2 * std::exp(m2 - top);
  m = top;
}

// The forward sweep of rows [row_begin, row_end): row log-sum-exps, and per row block the column
// partials (max, sum). Where a tile's kept logits lie within shared_exp_spread of its max hi, one
// exponential exp(s - hi) per entry serves both directions, each partial then re-expressed relative to
// its own max; other tiles take one max and one exponential per direction.
template <typename acc_t>
void forward_chunk(const at::Tensor& img, const at::Tensor& txt, acc_t scale, std::optional<int64_t> diagonal,
                   int64_t row_begin, int64_t row_end, acc_t* strip, acc_t* row_lse, acc_t* col_max, acc_t* col_sum) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t spread = shared_exp_spread<acc_t>();
  const int64_t cols = txt.size(0);
  cpu::sweep_row_blocks<acc_t>(img, txt, row_begin, row_end, strip, [&](int64_t b, int64_t r0, int64_t rows, auto visit_tiles) {
    acc_t run_max[kMaxRowBlock], run_sum[kMaxRowBlock], tile_row_max[kMaxRowBlock];
    acc_t e[cpu::kColBlock], tile_col_max[cpu::kColBlock], tile_col_sum[cpu::kColBlock], col_shift[cpu::kColBlock];
    for (int64_t i = 0; i < rows; ++i) run_max[i] = kNegInf, run_sum[i] = 0;
    visit_tiles([&](int64_t c0, int64_t tc, acc_t* tile) {
      // Scaled logits, the mask, and the extremes: lo over the entries before the mask (a bound on the
      // kept ones'), the row and column maxima after it.
      std::fill_n(tile_col_max, tc, kNegInf);
      acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = kNegInf;
      for (int64_t i = 0; i < rows; ++i) {
        acc_t* s_row = tile + i * tc;
        for (int64_t j = 0; j < tc; ++j) s_row[j] *= scale;
        lo = std::min(lo, cpu::row_min(s_row, tc));
        const int64_t masked = masked_column(diagonal, r0 + i, cols);
        if (masked >= c0 && masked < c0 + tc) s_row[masked - c0] = kNegInf;
        for (int64_t j = 0; j < tc; ++j) tile_col_max[j] = std::max(tile_col_max[j], s_row[j]);
        tile_row_max[i] = cpu::row_max(s_row, tc);
        hi = std::max(hi, tile_row_max[i]);
      }
      std::fill_n(tile_col_sum, tc, acc_t(0));
      if (hi != kNegInf && hi - lo <= spread) {
        for (int64_t i = 0; i < rows; ++i) {
          exp_of_scaled(tile + i * tc, acc_t(1), hi, tc, e);  // 0 where masked
          for (int64_t j = 0; j < tc; ++j) tile_col_sum[j] += e[j];
          if (tile_row_max[i] != kNegInf)
            merge_max_sum(run_max[i], run_sum[i], tile_row_max[i], cpu::row_sum(e, tc) * std::exp(hi - tile_row_max[i]));
        }
        // Relative to each column's own max: exp(hi - col max) <= exp(spread), no overflow.
        for (int64_t j = 0; j < tc; ++j)
          tile_col_sum[j] = tile_col_max[j] == kNegInf ? acc_t(0) : tile_col_sum[j] * std::exp(hi - tile_col_max[j]);
      } else {
        for (int64_t i = 0; i < rows; ++i) {
          if (tile_row_max[i] == kNegInf) continue;  // nothing unmasked in this row of the tile
          exp_of_scaled(tile + i * tc, acc_t(1), tile_row_max[i], tc, e);
          merge_max_sum(run_max[i], run_sum[i], tile_row_max[i], cpu::row_sum(e, tc));
        }
        // A column the mask empties in this block has max -inf: shifted by 0, its entries give exp(-inf) = 0.
        for (int64_t j = 0; j < tc; ++j) col_shift[j] = tile_col_max[j] == kNegInf ? acc_t(0) : tile_col_max[j];
        for (int64_t i = 0; i < rows; ++i) {
          exp_of_scaled(tile + i * tc, acc_t(1), col_shift, tc, e);
          for (int64_t j = 0; j < tc; ++j) tile_col_sum[j] += e[j];
        }
      }
      std::copy_n(tile_col_max, tc, col_max + b * cols + c0);
      std::copy_n(tile_col_sum, tc, col_sum + b * cols + c0);
    });
    for (int64_t i = 0; i < rows; ++i) row_lse[r0 + i] = run_max[i] + std::log(run_sum[i]);  // -inf if all masked
  });
}

// The backward's shared exponential for one tile: ref, the largest finite log-sum-exp among the block's
// rows and the tile's used columns (every logit is at most its row's, so exp(s - ref) <= 1), and the
// factors P_row = e * row_factor[i], P_col = e * col_factor[j] with e = exp(s - ref). False (two
// exponentials instead) when those log-sum-exps spread wider than shared_exp_spread.
template <typename acc_t>
bool shared_factors(const acc_t* row_lse, int64_t rows, const acc_t* col_lse, const acc_t* grad_col, int64_t tc,
                    acc_t& ref, acc_t* row_factor, acc_t* col_factor) {
  acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = -std::numeric_limits<acc_t>::infinity();
  const auto include = [&](acc_t v) {
    if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  };
  for (int64_t i = 0; i < rows; ++i) include(row_lse[i]);
  for (int64_t j = 0; j < tc; ++j)
    if (grad_col[j] != 0) include(col_lse[j]);  // SupCon has no column terms
  if (!(lo <= hi && hi - lo <= shared_exp_spread<acc_t>())) return false;
  ref = hi;
  // 0 for a log-sum-exp of -inf (every entry of its row or column is left out) or an unused column.
  for (int64_t i = 0; i < rows; ++i) row_factor[i] = std::isfinite(row_lse[i]) ? std::exp(ref - row_lse[i]) : 0;
  for (int64_t j = 0; j < tc; ++j)
    col_factor[j] = grad_col[j] != 0 && std::isfinite(col_lse[j]) ? std::exp(ref - col_lse[j]) : 0;
  return true;
}

template <typename acc_t>
void backward_chunk(const at::Tensor& img, const at::Tensor& txt, acc_t scale, std::optional<int64_t> diagonal,
                    int64_t row_begin, int64_t row_end, const acc_t* grad_row, const acc_t* grad_col,
                    const acc_t* row_lse, const acc_t* col_lse, acc_t* grad_tile, double* scale_partial) {
  const int64_t cols = txt.size(0);
  cpu::sweep_row_blocks<acc_t>(img, txt, row_begin, row_end, grad_tile, [&](int64_t b, int64_t r0, int64_t rows, auto visit_tiles) {
    double ds = 0;  // sum of G * dS/ds = G * <image_i, text_j>; double: it cancels against the positives
    acc_t p_row[cpu::kColBlock], p_col[cpu::kColBlock], row_factor[kMaxRowBlock], col_factor[cpu::kColBlock];
    visit_tiles([&](int64_t c0, int64_t tc, const acc_t* tile) {
      acc_t ref;
      const bool shared = shared_factors(row_lse + r0, rows, col_lse + c0, grad_col + c0, tc, ref, row_factor, col_factor);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = r0 + i;
        const acc_t* dot = tile + i * tc;
        acc_t* g_row = grad_tile + (r - row_begin) * cols + c0;
        if (shared) {  // G = e (gr a_i + gc_j b_j), e = exp(s - ref)
          exp_of_scaled(dot, scale, ref, tc, p_row);
          const acc_t ga = grad_row[r] * row_factor[i];
          for (int64_t j = 0; j < tc; ++j) g_row[j] = p_row[j] * (ga + grad_col[c0 + j] * col_factor[j]);
        } else {
          exp_of_scaled(dot, scale, row_lse[r], tc, p_row);
          exp_of_scaled(dot, scale, col_lse + c0, tc, p_col);
          for (int64_t j = 0; j < tc; ++j) g_row[j] = grad_row[r] * p_row[j] + grad_col[c0 + j] * p_col[j];
        }
        clear_entry<acc_t>(masked_column(diagonal, r, cols) - c0, tc, g_row, p_row, nullptr);  // no gradient
        ds += cpu::row_dot(g_row, dot, tc);
      }
    });
    scale_partial[b] = ds;
  });
}

// The loss coefficients of contrastive_loss_backward (ops/contrastive_loss_backward.h), as raw pointers.
template <typename acc_t>
struct LossCoefficients {
  const acc_t *grad_row, *grad_col, *grad_positive;
  acc_t grad_uniform;
  const int64_t *row_ids, *col_ids, *partner;
};

// G of the whole loss for rows [row_begin, row_end) into grad_tile, with each pair entry left at 0 and
// its ingredients collected instead: row_rest[r] (P_row over the row's other entries), the block's
// column partials col_rest[b * cols + j] (P_col over its rows but pair entries) and pair_dot[r].
template <typename acc_t>
void loss_backward_chunk(const at::Tensor& img, const at::Tensor& txt, acc_t scale, std::optional<int64_t> diagonal,
                         int64_t row_begin, int64_t row_end, const LossCoefficients<acc_t>& k, const acc_t* row_lse,
                         const acc_t* col_lse, acc_t* grad_tile, acc_t* row_rest, acc_t* col_rest, acc_t* pair_dot,
                         double* scale_partial) {
  const int64_t cols = txt.size(0);
  cpu::sweep_row_blocks<acc_t>(img, txt, row_begin, row_end, grad_tile, [&](int64_t b, int64_t r0, int64_t rows, auto visit_tiles) {
    double ds = 0;  // sum of G * <image_i, text_j>
    acc_t rest[kMaxRowBlock], p_row[cpu::kColBlock], p_col[cpu::kColBlock];
    acc_t row_factor[kMaxRowBlock], col_factor[cpu::kColBlock];
    std::fill_n(rest, rows, acc_t(0));
    acc_t* col_part = col_rest + b * cols;
    visit_tiles([&](int64_t c0, int64_t tc, const acc_t* tile) {
      const acc_t* gc = k.grad_col + c0;
      acc_t ref;
      const bool shared = shared_factors(row_lse + r0, rows, col_lse + c0, gc, tc, ref, row_factor, col_factor);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = r0 + i;
        const acc_t* dot = tile + i * tc;
        acc_t* g_row = grad_tile + (r - row_begin) * cols + c0;
        const acc_t gr = k.grad_row[r], gp = k.grad_positive[r];
        const int64_t id = k.row_ids[r];
        if (shared) {  // P_row = e a_i, P_col = e b_j (0 for unused columns), e = exp(s - ref)
          exp_of_scaled(dot, scale, ref, tc, p_col);
          for (int64_t j = 0; j < tc; ++j) p_row[j] = p_col[j] * row_factor[i];
          for (int64_t j = 0; j < tc; ++j) p_col[j] *= col_factor[j];
        } else {
          exp_of_scaled(dot, scale, row_lse[r], tc, p_row);
          exp_of_scaled(dot, scale, col_lse + c0, tc, p_col);
          for (int64_t j = 0; j < tc; ++j) p_col[j] = gc[j] != 0 ? p_col[j] : acc_t(0);  // SupCon: no column terms
        }
        for (int64_t j = 0; j < tc; ++j) g_row[j] = gr * p_row[j] + gc[j] * p_col[j] - k.grad_uniform;
        // The positive targets apart: a few entries per row, and an int64 compare would keep the loop
        // above from vectorising.
        if (gp != 0)
          for (int64_t j = 0; j < tc; ++j) g_row[j] -= id == k.col_ids[c0 + j] ? gp : acc_t(0);
        // No entry where masked; the pair entry is filled in from the rests after the sweep.
        const int64_t pair = k.partner[r] - c0;
        if (pair >= 0 && pair < tc) pair_dot[r] = dot[pair];
        clear_entry(pair, tc, g_row, p_row, p_col);
        clear_entry(masked_column(diagonal, r, cols) - c0, tc, g_row, p_row, p_col);
        rest[i] += cpu::row_sum(p_row, tc);
        for (int64_t j = 0; j < tc; ++j) col_part[c0 + j] += p_col[j];
        ds += cpu::row_dot(g_row, dot, tc);
      }
    });
    for (int64_t i = 0; i < rows; ++i) row_rest[r0 + i] = rest[i];
    scale_partial[b] = ds;
  });
}

std::tuple<at::Tensor, at::Tensor> contrastive_lse_cpu(const at::Tensor& image, const at::Tensor& text,
                                                       const at::Tensor& logit_scale,
                                                       std::optional<int64_t> masked_diagonal) {
  check_lse_inputs(image, text, logit_scale);
  if (cpu_loss_path() == LossPath::kChunked)
    return chunked::contrastive_lse(image, text, logit_scale, masked_diagonal, cpu_chunk_epilogue(), chunk_budget(text));
  const auto acc_type = cpu::accumulate_type(image.scalar_type());
  // Detached: the GEMMs run in parallel_for worker threads, which do not inherit grad mode.
  const auto img = image.detach().to(acc_type).contiguous(), txt = text.detach().to(acc_type).contiguous();
  const int64_t n = img.size(0), N = txt.size(0);
  auto row_lse = at::empty({n}, img.options());
  at::Tensor col_lse;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "contrastive_lse_cpu", [&] {
    const auto scale = static_cast<scalar_t>(logit_scale.item<double>());
    // Per row: its dot products (the sweep's strip) and its share of the column partials, one (max, sum)
    // pair per row block (kMinRowBlock rows or more) and column.
    const int64_t row_bytes = sizeof(scalar_t) * N + 2 * sizeof(scalar_t) * N / cpu::kMinRowBlock;
    const int64_t chunk = rows_per_chunk(n, row_bytes, cpu::kMinRowBlock, cpu::scratch_budget_bytes(N));
    auto strip = at::empty({std::min(n, chunk) * N}, img.options());
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t r1 = std::min(n, r0 + chunk);
      auto col_max = at::empty({cpu::row_blocks(r1 - r0), N}, img.options()), col_sum = at::empty_like(col_max);
      forward_chunk<scalar_t>(img, txt, scale, masked_diagonal, r0, r1, strip.data_ptr<scalar_t>(),
                              row_lse.data_ptr<scalar_t>(), col_max.data_ptr<scalar_t>(), col_sum.data_ptr<scalar_t>());
      auto chunk_lse = merge_partial_lse(col_max, col_sum, 0);
      col_lse = col_lse.defined() ? at::logaddexp(col_lse, chunk_lse) : chunk_lse;
    }
  });
  return {row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_lse_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& logit_scale, const at::Tensor& row_lse, const at::Tensor& col_lse,
    std::optional<int64_t> masked_diagonal) {
  check_lse_inputs(image, text, logit_scale);
  check_lse_backward_inputs(grad_row, grad_col, image, text, row_lse, col_lse);
  if (cpu_loss_path() == LossPath::kChunked)
    return chunked::contrastive_lse_backward(grad_row, grad_col, image, text, logit_scale, row_lse, col_lse,
                                             masked_diagonal, cpu_chunk_epilogue(), chunk_budget(text));
  const auto acc_type = cpu::accumulate_type(image.scalar_type());
  const auto img = image.detach().to(acc_type).contiguous(), txt = text.detach().to(acc_type).contiguous();
  const auto gr = grad_row.to(acc_type).contiguous(), gc = grad_col.to(acc_type).contiguous();
  const auto rl = row_lse.to(acc_type).contiguous(), cl = col_lse.to(acc_type).contiguous();
  auto grad_img = at::empty_like(img), grad_txt = at::zeros_like(txt);
  at::Tensor grad_scale;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "contrastive_lse_backward_cpu", [&] {
    const auto scale = static_cast<scalar_t>(logit_scale.item<double>());
    std::vector<double> partials;
    cpu::backward_through_gradient_tiles<scalar_t>(img, txt, scale, grad_img, grad_txt, [&](int64_t r0, int64_t r1, scalar_t* g) {
      std::vector<double> chunk_partials(cpu::row_blocks(r1 - r0));
      backward_chunk<scalar_t>(img, txt, scale, masked_diagonal, r0, r1, gr.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
                               rl.data_ptr<scalar_t>(), cl.data_ptr<scalar_t>(), g, chunk_partials.data());
      partials.insert(partials.end(), chunk_partials.begin(), chunk_partials.end());
    });
    grad_scale = at::full_like(logit_scale, cpu::ordered_sum(partials));
  });
  return {grad_img.to(image.scalar_type()), grad_txt.to(text.scalar_type()), grad_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& grad_positive,
    const at::Tensor& grad_uniform, const at::Tensor& grad_pair, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& logit_scale, const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& row_ids,
    const at::Tensor& col_ids, const at::Tensor& partner, std::optional<int64_t> masked_diagonal) {
  check_lse_inputs(image, text, logit_scale);
  check_lse_backward_inputs(grad_row, grad_col, image, text, row_lse, col_lse);
  check_loss_backward_inputs(grad_positive, grad_uniform, grad_pair, row_ids, col_ids, partner, image, text);
  if (cpu_loss_path() == LossPath::kChunked)
    return chunked::contrastive_loss_backward(grad_row, grad_col, grad_positive, grad_uniform, grad_pair, image, text,
                                              logit_scale, row_lse, col_lse, row_ids, col_ids, partner,
                                              masked_diagonal, cpu_chunk_epilogue(), chunk_budget(text));
  const auto acc_type = cpu::accumulate_type(image.scalar_type());
  const auto img = image.detach().to(acc_type).contiguous(), txt = text.detach().to(acc_type).contiguous();
  const auto as_acc = [&](const at::Tensor& t) { return t.detach().to(acc_type).contiguous(); };
  const auto gr = as_acc(grad_row), gc = as_acc(grad_col), gp = as_acc(grad_positive), ge = as_acc(grad_pair);
  const auto rl = as_acc(row_lse), cl = as_acc(col_lse);
  const auto rid = row_ids.contiguous(), cid = col_ids.contiguous(), pid = partner.contiguous();
  const int64_t n = img.size(0), N = txt.size(0);
  auto grad_img = at::empty_like(img), grad_txt = at::zeros_like(txt);
  auto row_rest = at::zeros({n}, img.options()), col_rest = at::zeros({N}, img.options());
  auto pair_dot = at::zeros({n}, img.options());
  at::Tensor grad_scale;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "contrastive_loss_backward_cpu", [&] {
    const auto scale = static_cast<scalar_t>(logit_scale.item<double>());
    const LossCoefficients<scalar_t> k{gr.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), gp.data_ptr<scalar_t>(),
                                       static_cast<scalar_t>(grad_uniform.item<double>()), rid.data_ptr<int64_t>(),
                                       cid.data_ptr<int64_t>(), pid.data_ptr<int64_t>()};
    std::vector<double> partials;
    cpu::backward_through_gradient_tiles<scalar_t>(img, txt, scale, grad_img, grad_txt, [&](int64_t r0, int64_t r1, scalar_t* g) {
      std::vector<double> chunk_partials(cpu::row_blocks(r1 - r0));
      auto col_parts = at::zeros({cpu::row_blocks(r1 - r0), N}, img.options());
      loss_backward_chunk<scalar_t>(img, txt, scale, masked_diagonal, r0, r1, k, rl.data_ptr<scalar_t>(),
                                    cl.data_ptr<scalar_t>(), g, row_rest.data_ptr<scalar_t>(),
                                    col_parts.data_ptr<scalar_t>(), pair_dot.data_ptr<scalar_t>(), chunk_partials.data());
      col_rest.add_(col_parts.sum(0));
      partials.insert(partials.end(), chunk_partials.begin(), chunk_partials.end());
    });
    grad_scale = at::scalar_tensor(cpu::ordered_sum(partials), img.options().dtype(at::kDouble));
  });
  grad_scale += add_pair_entries(img, txt, logit_scale.to(acc_type).reshape({}), gr, gc, ge, pid, row_rest, col_rest,
                                 pair_dot, grad_img, grad_txt);
  // Unrounded (accumulation dtype): the caller rounds each gradient once, after any sums of its own.
  return {grad_img, grad_txt, grad_scale.to(acc_type)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CPU, m) {
  m.impl("contrastive_lse", &contrastive_lse_cpu);
  m.impl("contrastive_lse_backward", &contrastive_lse_backward_cpu);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cpu);
}

}  // namespace fastclip
