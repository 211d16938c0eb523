// Reductions over one row of a tile (a few hundred values in L1) for the CPU tile sweeps, written with
// 8 independent partial results so that the compiler vectorises them without -ffast-math (a single
// running float sum or max is a dependency chain it may not reorder).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace fastclip {
namespace cpu {

constexpr int kPartials = 8;

template <typename T, typename Combine, typename Term>
T reduce_row(int64_t n, T init, const Combine& combine, const Term& term) {
  T part[kPartials];
  std::fill_n(part, kPartials, init);
  int64_t j = 0;
  for (; j + kPartials <= n; j += kPartials)
    for (int k = 0; k < kPartials; ++k) part[k] = combine(part[k], term(j + k));
  T total = init;
  for (; j < n; ++j) total = combine(total, term(j));
  for (int k = 0; k < kPartials; ++k) total = combine(total, part[k]);
  return total;
}

// max_j x[j] (-inf for n = 0).
template <typename T>
T row_max(const T* x, int64_t n) {
  return reduce_row<T>(
      n, -std::numeric_limits<T>::infinity(), [](T a, T b) { return a < b ? b : a; }, [x](int64_t j) { return x[j]; });
}

// min_j x[j] (+inf for n = 0).
template <typename T>
T row_min(const T* x, int64_t n) {
  return reduce_row<T>(
      n, std::numeric_limits<T>::infinity(), [](T a, T b) { return b < a ? b : a; }, [x](int64_t j) { return x[j]; });
}

// sum_j x[j].
template <typename T>
T row_sum(const T* x, int64_t n) {
  return reduce_row<T>(n, T(0), [](T a, T b) { return a + b; }, [x](int64_t j) { return x[j]; });
}

// sum_j x[j] * y[j], each product rounded to T and summed in double (a gradient's sum that cancels).
template <typename T>
double row_dot(const T* x, const T* y, int64_t n) {
  return reduce_row<double>(
      n, 0.0, [](double a, double b) { return a + b; }, [x, y](int64_t j) { return static_cast<double>(x[j] * y[j]); });
}

}  // namespace cpu
}  // namespace fastclip
