// The tile machinery shared by the fused pairwise kernels (contrastive_lse.cu, pairwise_sigmoid.cu):
// device code, included only by kernel sources.
//
// A CTA of kThreads = 128 threads (4 warps in a 2 x 2 grid of 32 x 32 sub-tiles) owns kRowBlock = 64 rows
// of `image` and sweeps the 64-column tiles of its column split. similarity_tile() computes one 64 x 64
// tile of dot products <image_i, text_j> on the tensor cores (WMMA: bf16/fp16 in their own type, fp32 as
// one or three TF32 products, see Float32Mode) with fp32 accumulation, through shared-memory stages of
// kDepth features (16-byte vector loads where rows are aligned), and leaves it in shared memory, where
// each kernel consumes it with its own loss. launch_variant() picks the kernel instantiation (element
// type, float32 mode, vectorized loads) for a launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "tile_config.cuh"

namespace fastclip {
namespace cuda {
namespace tile {

using namespace nvcuda;

constexpr int kThreads = 128;            // 4 warps in a 2 x 2 grid of 32 x 32 sub-tiles
constexpr int kDepth = 32;               // feature elements per shared-memory stage
constexpr int kSimLd = kColBlock + 4;    // similarity tile row stride (floats): WMMA wants multiples of 4
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct MmaTraits;

template <>
struct MmaTraits<__half> {
  static constexpr int kK = 16;    // WMMA depth
  static constexpr int kPad = 8;   // keeps rows 16-byte aligned and shifts banks
  static constexpr int kVec = 8;   // elements per 16-byte load
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
};

template <>
struct MmaTraits<__nv_bfloat16> {
  static constexpr int kK = 16;
  static constexpr int kPad = 8;
  static constexpr int kVec = 8;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
};

template <>
struct MmaTraits<float> {
  static constexpr int kK = 8;
  static constexpr int kPad = 4;
  static constexpr int kVec = 4;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
};

template <typename T>
struct SharedTiles {
  static constexpr int kLd = kDepth + MmaTraits<T>::kPad;
  T a[kRowBlock][kLd];         // image rows x feature stage
  T b[kColBlock][kLd];         // text rows x feature stage (= B^T, read as column-major B)
  float sim[kRowBlock][kSimLd];  // the finished tile of dot products <image_i, text_j>
};

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The multiplier of a stored gradient tile: a device scalar (a power of two chosen by the host so that
// fp16 tiles neither flush to zero nor overflow), or 1 without one.
__device__ __forceinline__ float tile_scale(const float* scale) { return scale ? *scale : 1.f; }

__device__ __forceinline__ float fast_exp2(float x) {  // exp2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Copy rows [row0, row0 + kRowBlock) x features [k0, k0 + kDepth) of a row-major [num_rows, dim] matrix
// into shared memory, zero-filling past either edge (zeros add nothing to a dot product).
template <typename T, bool kVectorized>
__device__ __forceinline__ void load_stage(T (*dst)[SharedTiles<T>::kLd], const T* src, int64_t row0,
                                           int64_t num_rows, int64_t k0, int64_t dim) {
  if constexpr (kVectorized) {
    constexpr int kVec = MmaTraits<T>::kVec;
    constexpr int kPerRow = kDepth / kVec;
    for (int idx = threadIdx.x; idx < kRowBlock * kPerRow; idx += kThreads) {
      const int r = idx / kPerRow, v = idx % kPerRow;
      const int64_t row = row0 + r, k = k0 + v * kVec;
      uint4 value = make_uint4(0u, 0u, 0u, 0u);
      if (row < num_rows && k < dim) value = *reinterpret_cast<const uint4*>(src + row * dim + k);
      *reinterpret_cast<uint4*>(&dst[r][v * kVec]) = value;
    }
  } else {
    for (int idx = threadIdx.x; idx < kRowBlock * kDepth; idx += kThreads) {
      const int r = idx / kDepth, c = idx % kDepth;
      const int64_t row = row0 + r, k = k0 + c;
      dst[r][c] = (row < num_rows && k < dim) ? src[row * dim + k] : from_float<T>(0.f);
    }
  }
}

template <typename Frag>
__device__ __forceinline__ void to_tf32(Frag& frag) {
#pragma unroll
  for (int t = 0; t < frag.num_elements; ++t) frag.x[t] = wmma::__float_to_tf32(frag.x[t]);
}

// frag = tf32(frag) and rest = tf32(frag - tf32(frag)): the split behind 3xTF32.
template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& frag, Frag& rest) {
#pragma unroll
  for (int t = 0; t < frag.num_elements; ++t) {
    const float value = frag.x[t];
    const float hi = wmma::__float_to_tf32(value);
    frag.x[t] = hi;
    rest.x[t] = wmma::__float_to_tf32(value - hi);
  }
}

// Accumulate one shared-memory stage into the warp's 32 x 32 sub-tile.
template <typename T, Float32Mode kMode>
__device__ __forceinline__ void mma_stage(const SharedTiles<T>& tiles, typename MmaTraits<T>::FragC (&acc)[2][2],
                                          int warp_row, int warp_col) {
  using Traits = MmaTraits<T>;
#pragma unroll
  for (int kk = 0; kk < kDepth; kk += Traits::kK) {
    typename Traits::FragA a[2];
    typename Traits::FragB b[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &tiles.a[warp_row * 32 + i * 16][kk], SharedTiles<T>::kLd);
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &tiles.b[warp_col * 32 + j * 16][kk], SharedTiles<T>::kLd);
    if constexpr (std::is_same_v<T, float> && kMode == Float32Mode::kTf32x3) {
      typename Traits::FragA a_lo[2];
      typename Traits::FragB b_lo[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) split_tf32(a[i], a_lo[i]);
#pragma unroll
      for (int j = 0; j < 2; ++j) split_tf32(b[j], b_lo[j]);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          // This stage's three products go into a fresh accumulator, small terms first, and only then
          // into the running sum with fp32 adds: the tensor cores' reduced-precision accumulation then
          // never sees the large running sum beside the small correction terms.
          typename Traits::FragC part;
          wmma::fill_fragment(part, 0.f);
          wmma::mma_sync(part, a_lo[i], b[j], part);
          wmma::mma_sync(part, a[i], b_lo[j], part);
          wmma::mma_sync(part, a[i], b[j], part);
#pragma unroll
          for (int t = 0; t < part.num_elements; ++t) acc[i][j].x[t] += part.x[t];
        }
    } else {
      if constexpr (std::is_same_v<T, float>) {
#pragma unroll
        for (int i = 0; i < 2; ++i) to_tf32(a[i]);
#pragma unroll
        for (int j = 0; j < 2; ++j) to_tf32(b[j]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
}

// tiles.sim = image[row0 : row0 + 64] . text[col0 : col0 + 64]^T (zeros past the edges). Ends with a
// barrier, so every thread may read the whole tile afterwards.
template <typename T, Float32Mode kMode, bool kVectorized>
__device__ __forceinline__ void similarity_tile(SharedTiles<T>& tiles, const T* image, const T* text, int64_t row0,
                                                int64_t rows, int64_t col0, int64_t cols, int64_t dim) {
  const int warp = threadIdx.x / 32;
  const int warp_row = warp / 2, warp_col = warp % 2;
  typename MmaTraits<T>::FragC acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int64_t k0 = 0; k0 < dim; k0 += kDepth) {
    load_stage<T, kVectorized>(tiles.a, image, row0, rows, k0, dim);
    load_stage<T, kVectorized>(tiles.b, text, col0, cols, k0, dim);
    __syncthreads();
    mma_stage<T, kMode>(tiles, acc, warp_row, warp_col);
    __syncthreads();  // the next stage overwrites a and b
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&tiles.sim[warp_row * 32 + i * 16][warp_col * 32 + j * 16], acc[i][j], kSimLd,
                              wmma::mem_row_major);
  __syncthreads();
}

// The column tiles [begin, begin + count) that split `split` of `splits` sweeps (see plan_col_splits). A
// 32-bit count (2^31 tiles would be 1.4e11 columns) keeps the loop bound in one register: with a 64-bit
// end, ptxas spilled it in the bf16/fp16 contrastive kernels on sm_90.
__device__ __forceinline__ int64_t split_range(int64_t cols, int splits, int split, int& count) {
  const int64_t tiles = (cols + kColBlock - 1) / kColBlock;
  const int64_t per_split = (tiles + splits - 1) / splits;
  const int64_t begin = split * per_split;
  count = static_cast<int>((begin + per_split < tiles ? begin + per_split : tiles) - begin);
  return begin;
}

// Thread 0 writes the sum of `value` over the CTA's threads to out[blockIdx.y * gridDim.x + blockIdx.x]:
// one partial per CTA, which the host adds up in double (a fixed order: deterministic). Every thread of
// the CTA must call it; it may be called again right after (it ends with a barrier).
__device__ __forceinline__ void store_cta_sum(float value, float* out) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    out[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
  }
  __syncthreads();  // warp_sums is free again
}

template <typename T>
__device__ __forceinline__ SharedTiles<T>& shared_tiles() {
  // Raw storage: __shared__ variables of class type with constructors are not allowed.
  __shared__ __align__(128) unsigned char storage[sizeof(SharedTiles<T>)];
  return *reinterpret_cast<SharedTiles<T>*>(storage);
}

// ---- host side: picking and launching a kernel instantiation ----

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// One instantiation of a tile kernel: element type, float32 mode, and whether its loads are 16-byte vectors.
template <typename T, Float32Mode kMode_, bool kVectorized_>
struct Variant {
  using Element = T;
  static constexpr Float32Mode kMode = kMode_;
  static constexpr bool kVectorized = kVectorized_;
};

template <typename T, Float32Mode kMode, typename Args, typename Launch>
cudaError_t launch_typed(const Args& args, Launch&& launch) {
  // 16-byte loads need every row start aligned: a row length that is a whole number of vectors.
  const bool vectorized = args.dim % MmaTraits<T>::kVec == 0 && aligned16(args.image) && aligned16(args.text);
  const dim3 grid(static_cast<unsigned>((args.rows + kRowBlock - 1) / kRowBlock), static_cast<unsigned>(args.col_splits));
  if (vectorized) launch(Variant<T, kMode, true>{}, grid);
  else launch(Variant<T, kMode, false>{}, grid);
  return cudaGetLastError();
}

// Checks the tile problem in `args` (image, text, rows, cols, dim, col_splits) and calls
// launch(Variant<...>{}, grid) for the run-time element type, float32 mode and alignment; `launch` starts
// kernel<Variant::Element, Variant::kMode, Variant::kVectorized><<<grid, kThreads, 0, stream>>>.
template <typename Args, typename Launch>
cudaError_t launch_variant(ElementType type, Float32Mode mode, const Args& args, Launch&& launch) {
  if (args.rows <= 0 || args.cols <= 0 || args.dim <= 0 || args.col_splits < 1) return cudaErrorInvalidValue;
  if ((args.rows + kRowBlock - 1) / kRowBlock > 0x7fffffff || args.col_splits > 65535) return cudaErrorInvalidValue;
  switch (type) {
    case ElementType::kFloat16:
      return launch_typed<__half, Float32Mode::kTf32>(args, launch);
    case ElementType::kBFloat16:
      return launch_typed<__nv_bfloat16, Float32Mode::kTf32>(args, launch);
    case ElementType::kFloat32:
      return mode == Float32Mode::kTf32 ? launch_typed<float, Float32Mode::kTf32>(args, launch)
                                        : launch_typed<float, Float32Mode::kTf32x3>(args, launch);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tile
}  // namespace cuda
}  // namespace fastclip
