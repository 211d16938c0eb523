// Exponentials of whole rows for the CPU tile sweeps: exp(x) of many values at once is where the CPU
// loss spends its time besides the GEMMs, and a scalar std::exp per similarity costs more than the GEMM
// that made it. The float version runs 8 lanes at a time with AVX2 + FMA where the CPU has them (checked
// once, at run time: the extension is built for the baseline x86-64 ISA), else std::exp.
#pragma once

#include <cstdint>

namespace fastclip {
namespace cpu {

// x[j] = exp(x[j]) for j < n, for arguments x <= 88 (the sweeps only exponentiate s - max <= 0 or
// s - lse, which is <= 0 up to rounding): within 2 ulp of std::exp, exactly 0 below -87.33 (no
// denormals) and for -inf, NaN for NaN.
void exp_inplace(float* x, int64_t n);
void exp_inplace(double* x, int64_t n);  // std::exp, for the float64 tests

}  // namespace cpu
}  // namespace fastclip
