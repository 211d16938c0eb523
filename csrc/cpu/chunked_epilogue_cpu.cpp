// The CPU twin of the chunked path's epilogue kernels (kernels/chunked_epilogue.cu). Each unit of work
// (chunked/epilogue_geometry.h: a tile of kTileCols columns of one row split, a warp on the GPU) runs here
// in one task, in natural-log units instead of the GPU's base 2, with the same per-unit partials: a row's
// (max, sum) per tile, a column's running (max, sum) over its split's rows, one logit-scale partial per
// unit. Only the order of a few sums differs (a warp adds its lanes as a tree).
// Also the sigmoid loss's one pass (chunked_sigmoid.h): per row and tile the sum of softplus(-z L), and s * G.
#include "cpu/chunked_epilogue_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu/vector_exp.h"

namespace fastclip {
namespace {

using chunked::EpilogueGrid;
using chunked::kTileCols;

// One unit's place in the chunk: rows [r0, r1) of its split, columns [c0, c0 + tc) of its tile.
struct Unit {
  int64_t index, tile, split, r0, r1, c0, tc;
};

template <typename Fn>
void for_each_unit(const EpilogueGrid& grid, int64_t rows, int64_t cols, const Fn& fn) {
  at::parallel_for(0, grid.units(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t tile = u % grid.col_tiles, split = u / grid.col_tiles;  // the GPU's order of units
      const int64_t r0 = grid.split_begin(split), c0 = tile * kTileCols;
      fn(Unit{u, tile, split, r0, std::min(rows, r0 + grid.rows_per_split), c0, std::min<int64_t>(kTileCols, cols - c0)});
    }
  });
}

// The tile column the mask takes from local row i, or -1.
inline int64_t hole_of(const chunked::Dots& d, int64_t i, int64_t c0) {
  return d.diagonal ? i + *d.diagonal - c0 : -1;
}

template <typename acc_t>
void forward(const chunked::ForwardChunk& c) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t rows = c.dots.size(0), cols = c.dots.size(1);
  const acc_t scale = c.scale.item<acc_t>();
  const acc_t* dots = c.dots.data_ptr<acc_t>();
  acc_t *row_max = c.row_max.data_ptr<acc_t>(), *row_sum = c.row_sum.data_ptr<acc_t>();
  acc_t *col_max = c.col_max.data_ptr<acc_t>(), *col_sum = c.col_sum.data_ptr<acc_t>();
  for_each_unit(c.grid, rows, cols, [&](const Unit& u) {
    acc_t cm[kTileCols], cs[kTileCols], v[kTileCols];
    std::fill_n(cm, u.tc, kNegInf), std::fill_n(cs, u.tc, acc_t(0));
    for (int64_t i = u.r0; i < u.r1; ++i) {
      const acc_t* row = dots + i * cols + u.c0;
      const int64_t hole = hole_of(c, i, u.c0);
      acc_t m = kNegInf;
      for (int64_t j = 0; j < u.tc; ++j) {
        v[j] = j == hole ? kNegInf : scale * row[j];
        m = std::max(m, v[j]);
      }
      acc_t sum = 0;
      if (m != kNegInf)  // a row the mask empties in this tile keeps (-inf, 0)
        for (int64_t j = 0; j < u.tc; ++j) sum += std::exp(v[j] - m);
      row_max[u.tile * rows + i] = m, row_sum[u.tile * rows + i] = sum;
      // Columns: a running (max, sum) per column with one exponential per entry, e = exp(-|v - max|),
      // which scales the old sum when v is the new max and else is v's own term (the GPU's arithmetic).
      for (int64_t j = 0; j < u.tc; ++j) {
        const acc_t e = v[j] == kNegInf ? acc_t(0) : std::exp(-std::abs(v[j] - cm[j]));
        cs[j] = v[j] > cm[j] ? cs[j] * e + 1 : cs[j] + e;
        cm[j] = std::max(cm[j], v[j]);
      }
    }
    for (int64_t j = 0; j < u.tc; ++j) col_max[u.split * cols + u.c0 + j] = cm[j], col_sum[u.split * cols + u.c0 + j] = cs[j];
  });
}

// s * G * tile_scale, the multiplier of every stored gradient entry.
template <typename acc_t>
acc_t tile_multiplier(const chunked::BackwardChunk& c) {
  const acc_t scale = c.scale.item<acc_t>();
  return c.tile_scale ? scale * static_cast<acc_t>(c.tile_scale->item<float>()) : scale;
}

template <typename T, typename acc_t>
void lse_backward(const chunked::BackwardChunk& c) {
  const int64_t rows = c.dots.size(0), cols = c.dots.size(1);
  const acc_t scale = c.scale.item<acc_t>(), tile_mul = tile_multiplier<acc_t>(c);
  const acc_t* dots = c.dots.data_ptr<acc_t>();
  const acc_t *gr = c.grad_row.data_ptr<acc_t>(), *rl = c.row_lse.data_ptr<acc_t>();
  const acc_t *gc = c.grad_col.data_ptr<acc_t>(), *cl = c.col_lse.data_ptr<acc_t>();
  T* out = c.grad_tile.data_ptr<T>();
  acc_t* partial = c.scale_partial.data_ptr<acc_t>();
  for_each_unit(c.grid, rows, cols, [&](const Unit& u) {
    acc_t ds = 0;  // sum of G * dot: the logit_scale gradient's share of this unit
    for (int64_t i = u.r0; i < u.r1; ++i) {
      const int64_t hole = hole_of(c, i, u.c0);
      for (int64_t j = 0; j < u.tc; ++j) {
        const int64_t col = u.c0 + j;
        if (j == hole) {  // G = 0, without evaluating exp(S - lse): a fully masked row's lse is -inf
          out[i * cols + col] = static_cast<T>(0);
          continue;
        }
        const acc_t dot = dots[i * cols + col], s = scale * dot;
        const acc_t g = gr[i] * std::exp(s - rl[i]) + gc[col] * std::exp(s - cl[col]);
        ds += g * dot;
        out[i * cols + col] = static_cast<T>(tile_mul * g);
      }
    }
    partial[u.index] = ds;
  });
}

template <typename T, typename acc_t>
void loss_backward(const chunked::LossChunk& c) {
  const int64_t rows = c.dots.size(0), cols = c.dots.size(1);
  const acc_t scale = c.scale.item<acc_t>(), tile_mul = tile_multiplier<acc_t>(c);
  const acc_t uniform = c.grad_uniform.item<acc_t>();
  const acc_t* dots = c.dots.data_ptr<acc_t>();
  const acc_t *gr = c.grad_row.data_ptr<acc_t>(), *rl = c.row_lse.data_ptr<acc_t>();
  const acc_t *gc = c.grad_col.data_ptr<acc_t>(), *cl = c.col_lse.data_ptr<acc_t>();
  const acc_t* gp = c.grad_positive.data_ptr<acc_t>();
  const int64_t *row_ids = c.row_ids.data_ptr<int64_t>(), *col_ids = c.col_ids.data_ptr<int64_t>();
  const int64_t* partner = c.partner.data_ptr<int64_t>();
  T* out = c.grad_tile.data_ptr<T>();
  acc_t *partial = c.scale_partial.data_ptr<acc_t>(), *pair_dot = c.pair_dot.data_ptr<acc_t>();
  acc_t *row_rest = c.row_rest.data_ptr<acc_t>(), *col_rest = c.col_rest.data_ptr<acc_t>();
  for_each_unit(c.grid, rows, cols, [&](const Unit& u) {
    acc_t ds = 0, col_part[kTileCols];
    std::fill_n(col_part, u.tc, acc_t(0));
    for (int64_t i = u.r0; i < u.r1; ++i) {
      const int64_t hole = hole_of(c, i, u.c0), pair = partner[i] - c.col_offset - u.c0;  // tile columns
      acc_t rest = 0;
      for (int64_t j = 0; j < u.tc; ++j) {
        const int64_t col = u.c0 + j;
        const acc_t dot = dots[i * cols + col];
        acc_t g = 0;
        if (j == pair) pair_dot[i] = dot;  // the entry is filled in from the rests after the sweep
        if (j != hole && j != pair) {
          const acc_t s = scale * dot;
          const acc_t p_row = std::exp(s - rl[i]);
          const acc_t p_col = gc[col] != 0 ? std::exp(s - cl[col]) : acc_t(0);  // SupCon has no column terms
          rest += p_row;
          col_part[j] += p_col;
          const acc_t target = (row_ids[i] == col_ids[col] ? gp[i] : acc_t(0)) + uniform;
          g = gr[i] * p_row + gc[col] * p_col - target;
          ds += g * dot;
        }
        out[i * cols + col] = static_cast<T>(tile_mul * g);
      }
      row_rest[u.tile * rows + i] = rest;
    }
    for (int64_t j = 0; j < u.tc; ++j) col_rest[u.split * cols + u.c0 + j] = col_part[j];
    partial[u.index] = ds;
  });
}

// The exponentials of one row of a tile, in place: x[j] = exp(x[j]) (vectorised for fp32).
inline void exp_row(float* x, int64_t n) { cpu::exp_inplace(x, n); }
inline void exp_row(double* x, int64_t n) { cpu::exp_inplace(x, n); }

// Below this e, log1p(e) = e (1 - e (1/2 - e / 3)) to fp32's rounding (the next term is e^4 / 4): most
// entries of a sigmoid loss sit far from the decision boundary and take the series, in vector lanes; the
// rest take std::log1p. fp64 takes std::log1p throughout.
template <typename acc_t>
constexpr acc_t kSeriesBelow = std::is_same_v<acc_t, float> ? acc_t(0x1p-12) : acc_t(0);

// Each row of a unit in three passes over its tile columns, the first two branch-free (SIMD lanes):
// z L and -|z L|; e = exp(-|z L|) in (0, 1], shared by the loss, softplus(-z L) = max(-z L, 0) +
// log1p(e), and the sigmoid, sigmoid(-z L) = e / (1 + e) or 1 / (1 + e) by the sign of z L; then
// std::log1p for the few e the series does not cover.
template <typename T, typename acc_t>
void sigmoid(const chunked::SigmoidChunk& c) {
  const int64_t rows = c.dots.size(0), cols = c.dots.size(1);
  const acc_t scale = c.scale.item<acc_t>(), bias = c.bias.item<acc_t>();
  const acc_t tile_mul = scale * (c.tile_scale ? static_cast<acc_t>(c.tile_scale->item<float>()) : acc_t(1));
  const acc_t* dots = c.dots.data_ptr<acc_t>();
  const acc_t* gr = c.grad_row.data_ptr<acc_t>();
  const int64_t *row_labels = c.row_labels.data_ptr<int64_t>(), *col_labels = c.col_labels.data_ptr<int64_t>();
  T* out = c.grad_tile.data_ptr<T>();
  acc_t *row_loss = c.row_loss.data_ptr<acc_t>(), *scale_partial = c.scale_partial.data_ptr<acc_t>();
  acc_t* bias_partial = c.bias_partial.data_ptr<acc_t>();
  constexpr acc_t series_below = kSeriesBelow<acc_t>;
  for_each_unit(c.grid, rows, cols, [&](const Unit& u) {
    double ds = 0, db = 0;  // a unit sums up to rows_per_split * 256 terms: per row in acc_t, rows in double
    acc_t zl[kTileCols], e[kTileCols], g[kTileCols];
    const int64_t* labels = col_labels + u.c0;
    for (int64_t i = u.r0; i < u.r1; ++i) {
      const acc_t* row = dots + i * cols + u.c0;
      const int64_t label = row_labels[i];
      const acc_t weight = gr[i];
#pragma omp simd
      for (int64_t j = 0; j < u.tc; ++j) {
        const acc_t l = scale * row[j] + bias;
        zl[j] = labels[j] == label ? l : -l;  // z * L
        e[j] = zl[j] < 0 ? zl[j] : -zl[j];
      }
      exp_row(e, u.tc);
      acc_t loss = 0, row_ds = 0, row_db = 0;
#pragma omp simd reduction(+ : loss, row_ds, row_db)
      for (int64_t j = 0; j < u.tc; ++j) {
        const acc_t x = e[j], r = 1 / (1 + x);
        const acc_t sig = zl[j] >= 0 ? x * r : r;                  // sigmoid(-z L)
        const acc_t gj = labels[j] == label ? -weight * sig : weight * sig;  // -g z sigmoid(-z L)
        row_ds += gj * row[j], row_db += gj;
        g[j] = tile_mul * gj;
        const acc_t series = x < series_below ? x * (1 - x * (acc_t(0.5) - x * acc_t(1.0 / 3))) : 0;
        loss += (zl[j] < 0 ? -zl[j] : acc_t(0)) + series;
      }
      for (int64_t j = 0; j < u.tc; ++j)
        if (!(e[j] < series_below)) loss += std::log1p(e[j]);  // NaN too: a NaN similarity gives a NaN loss
      T* out_row = out + i * cols + u.c0;
      for (int64_t j = 0; j < u.tc; ++j) out_row[j] = static_cast<T>(g[j]);
      row_loss[u.tile * rows + i] = loss;
      ds += row_ds, db += row_db;
    }
    scale_partial[u.index] = static_cast<acc_t>(ds), bias_partial[u.index] = static_cast<acc_t>(db);
  });
}

// acc_t: fp64 for fp64 tiles, else fp32 (the dots' dtype, chosen by the driver).
#define FASTCLIP_DISPATCH_TILE(tile_type, name, ...)                                               \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tile_type, name, [&] {                 \
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;            \
    __VA_ARGS__();                                                                                 \
  })

class CpuEpilogue final : public chunked::Epilogue {
 public:
  int64_t target_units(const at::Tensor&) const override { return 4 * at::get_num_threads(); }

  void forward(const chunked::ForwardChunk& c) const override {
    if (c.dots.scalar_type() == at::kDouble) fastclip::forward<double>(c);
    else fastclip::forward<float>(c);
  }

  void lse_backward(const chunked::BackwardChunk& c) const override {
    FASTCLIP_DISPATCH_TILE(c.grad_tile.scalar_type(), "chunked_lse_backward_cpu",
                           [&] { fastclip::lse_backward<scalar_t, acc_t>(c); });
  }

  void loss_backward(const chunked::LossChunk& c) const override {
    FASTCLIP_DISPATCH_TILE(c.grad_tile.scalar_type(), "chunked_loss_backward_cpu",
                           [&] { fastclip::loss_backward<scalar_t, acc_t>(c); });
  }

  void sigmoid(const chunked::SigmoidChunk& c) const override {
    FASTCLIP_DISPATCH_TILE(c.grad_tile.scalar_type(), "chunked_sigmoid_cpu",
                           [&] { fastclip::sigmoid<scalar_t, acc_t>(c); });
  }
};

}  // namespace

const chunked::Epilogue& cpu_chunk_epilogue() {
  static const CpuEpilogue epilogue;
  return epilogue;
}

}  // namespace fastclip
