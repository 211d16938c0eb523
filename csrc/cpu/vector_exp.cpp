// exp_inplace (vector_exp.h): a Cephes-style float exponential in AVX2 intrinsics, dispatched at run time.
#include "cpu/vector_exp.h"

#include <cmath>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTCLIP_HAVE_AVX2_EXP 1
#endif

namespace fastclip {
namespace cpu {
namespace {

constexpr float kMaxArg = 88.0f;    // exp(88) < FLT_MAX, so 2^n below never overflows
constexpr float kMinArg = -87.33f;  // exp(-87.33) ~ FLT_MIN: below it, 0 instead of a denormal

// Below kMinArg 0, as the vector version gives; else std::exp.
inline float exp_portable(float x) { return x < kMinArg ? 0.0f : std::exp(x < kMaxArg ? x : kMaxArg); }

#ifdef FASTCLIP_HAVE_AVX2_EXP
// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2: ln 2 split in two so that x - n ln 2 is
// exact, and Cephes' degree-6 minimax polynomial for exp(r) (relative error ~1e-7).
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  const __m256 c = _mm256_min_ps(_mm256_set1_ps(kMaxArg), x);  // min_ps returns its 2nd operand, x, if NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(c, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), c);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kPoly[0]);
  for (int k = 1; k < 6; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kPoly[k]));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 underflow = _mm256_cmp_ps(c, _mm256_set1_ps(kMinArg), _CMP_LT_OQ);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

__attribute__((target("avx2,fma"))) void exp_avx2(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, exp8(_mm256_loadu_ps(x + j)));
  if (j < n) {  // the tail through a lane mask: no scalar loop, and the same arithmetic as every lane
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)), lanes);
    _mm256_maskstore_ps(x + j, live, exp8(_mm256_maskload_ps(x + j, live)));
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

}  // namespace

void exp_inplace(float* x, int64_t n) {
#ifdef FASTCLIP_HAVE_AVX2_EXP
  if (cpu_has_avx2_fma()) return exp_avx2(x, n);
#endif
  for (int64_t j = 0; j < n; ++j) x[j] = exp_portable(x[j]);
}

void exp_inplace(double* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j]);
}

}  // namespace cpu
}  // namespace fastclip
