// Fused similarity + log-sum-exp kernels of the CLIP contrastive loss (forward and backward).
//
// One CTA (4 warps) owns kRowBlock = 64 rows of `image` and sweeps the column tiles of its split. Each
// 64 x 64 similarity tile is computed on the tensor cores (WMMA: bf16/fp16 in their own type, fp32 as
// one or three TF32 products) with fp32 accumulation, staged through shared memory, and consumed there:
//  - forward: online (running max, sum) per row across tiles, and per-tile (max, sum) per column;
//  - backward: G = gr * P_row + gc * P_col written (times s) to the caller's gradient tile.
// Both directions of the loss share the one tile. Exponentials run in base 2 (ex2.approx) with the
// scale pre-multiplied by log2(e); results are converted back to natural logs before they are written.
// No N x N matrix exists anywhere: the forward writes O(rows + cols) partials per CTA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "contrastive_lse.cuh"

namespace fastclip {
namespace cuda {
namespace {

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

// The column tiles [begin, end) that split `split` of `splits` sweeps (see plan_col_splits).
__device__ __forceinline__ void split_range(int64_t cols, int splits, int split, int64_t& begin, int64_t& end) {
  const int64_t tiles = (cols + kColBlock - 1) / kColBlock;
  const int64_t per_split = (tiles + splits - 1) / splits;
  begin = split * per_split;
  end = begin + per_split < tiles ? begin + per_split : tiles;
}

template <typename T>
__device__ __forceinline__ SharedTiles<T>& shared_tiles() {
  // Raw storage: __shared__ variables of class type with constructors are not allowed.
  __shared__ __align__(128) unsigned char storage[sizeof(SharedTiles<T>)];
  return *reinterpret_cast<SharedTiles<T>*>(storage);
}

template <typename T, Float32Mode kMode, bool kVectorized>
__global__ void __launch_bounds__(kThreads) lse_forward_kernel(LseForwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  SharedTiles<T>& tiles = shared_tiles<T>();
  const T* image = static_cast<const T*>(args.image);
  const T* text = static_cast<const T*>(args.text);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowBlock;
  const int split = blockIdx.y;
  const float scale2 = *args.scale * kLog2e;  // S in base-2 units
  int64_t tile_begin, tile_end;
  split_range(args.cols, args.col_splits, split, tile_begin, tile_end);

  // Row statistics: warp w owns rows 16w..16w+15; lane l sees columns l and l + 32 of every tile and
  // keeps its own running (max, sum), merged across lanes at the end.
  constexpr int kRowsPerWarp = kRowBlock / 4;
  float run_max[kRowsPerWarp], run_sum[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) run_max[i] = -INFINITY, run_sum[i] = 0.f;

  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t col0 = t * kColBlock;
    similarity_tile<T, kMode, kVectorized>(tiles, image, text, row0, args.rows, col0, args.cols, args.dim);

    const bool lo_ok = col0 + lane < args.cols, hi_ok = col0 + lane + 32 < args.cols;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp * kRowsPerWarp + i;
      const float v0 = lo_ok ? scale2 * tiles.sim[r][lane] : -INFINITY;
      const float v1 = hi_ok ? scale2 * tiles.sim[r][lane + 32] : -INFINITY;
      const float m = fmaxf(run_max[i], fmaxf(v0, v1));
      if (m == -INFINITY) continue;  // this lane has seen no valid column yet
      if (m > run_max[i]) run_sum[i] *= fast_exp2(run_max[i] - m);
      run_sum[i] += fast_exp2(v0 - m) + fast_exp2(v1 - m);
      run_max[i] = m;
    }

    // Column partials over this CTA's rows: thread pair (2c, 2c+1) owns column c, rows interleaved
    // (r = h, h + 2, ...) so the two threads read different shared-memory banks.
    const int c = threadIdx.x >> 1, h = threadIdx.x & 1;
    // The max is taken over scaled logits (base 2), so a negative scale is handled like any other.
    float col_max = -INFINITY;
    for (int r = h; r < kRowBlock; r += 2)
      if (row0 + r < args.rows) col_max = fmaxf(col_max, scale2 * tiles.sim[r][c]);
    col_max = fmaxf(col_max, __shfl_xor_sync(kFullMask, col_max, 1));  // finite: row0 is a valid row
    float col_sum = 0.f;
    for (int r = h; r < kRowBlock; r += 2)
      if (row0 + r < args.rows) col_sum += fast_exp2(scale2 * tiles.sim[r][c] - col_max);
    col_sum += __shfl_xor_sync(kFullMask, col_sum, 1);
    if (h == 0 && col0 + c < args.cols) {
      const int64_t out = static_cast<int64_t>(blockIdx.x) * args.cols + col0 + c;
      args.col_max[out] = col_max * kLn2;
      args.col_sum[out] = col_sum;
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    float m = run_max[i], l = run_sum[i];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float m_other = __shfl_xor_sync(kFullMask, m, offset);
      const float l_other = __shfl_xor_sync(kFullMask, l, offset);
      const float m_new = fmaxf(m, m_other);
      l = (m == -INFINITY ? 0.f : l * fast_exp2(m - m_new)) +
          (m_other == -INFINITY ? 0.f : l_other * fast_exp2(m_other - m_new));
      m = m_new;
    }
    const int64_t row = row0 + warp * kRowsPerWarp + i;
    if (lane == 0 && row < args.rows) {
      args.row_max[static_cast<int64_t>(split) * args.rows + row] = m * kLn2;
      args.row_sum[static_cast<int64_t>(split) * args.rows + row] = l;
    }
  }
#else
  __trap();  // the host refuses devices below sm_80
#endif
}

template <typename T, Float32Mode kMode, bool kVectorized>
__global__ void __launch_bounds__(kThreads) lse_backward_kernel(LseBackwardArgs args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  SharedTiles<T>& tiles = shared_tiles<T>();
  __shared__ float row_lse2[kRowBlock], row_grad[kRowBlock], warp_sums[kThreads / 32];
  const T* image = static_cast<const T*>(args.image);
  const T* text = static_cast<const T*>(args.text);
  T* grad_tile = static_cast<T*>(args.grad_tile);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowBlock;
  const float scale = *args.scale, scale2 = scale * kLog2e;
  for (int r = threadIdx.x; r < kRowBlock; r += kThreads) {
    const bool ok = row0 + r < args.rows;
    row_lse2[r] = ok ? args.row_lse[row0 + r] * kLog2e : 0.f;
    row_grad[r] = ok ? args.grad_row[row0 + r] : 0.f;
  }  // visible after the barriers inside similarity_tile
  int64_t tile_begin, tile_end;
  split_range(args.cols, args.col_splits, blockIdx.y, tile_begin, tile_end);

  // Thread owns column c of every tile and rows g, g + 2, ...: a warp reads and writes 32 consecutive
  // columns of one row at a time (conflict-free shared memory, coalesced stores).
  const int c = threadIdx.x % kColBlock, g = threadIdx.x / kColBlock;
  float scale_grad = 0.f;  // sum of G * <image_i, text_j>
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t col0 = t * kColBlock, col = col0 + c;
    similarity_tile<T, kMode, kVectorized>(tiles, image, text, row0, args.rows, col0, args.cols, args.dim);
    if (col >= args.cols) continue;
    const float col_lse2 = args.col_lse[col] * kLog2e, col_grad = args.grad_col[col];
    for (int r = g; r < kRowBlock; r += kThreads / kColBlock) {
      const int64_t row = row0 + r;
      if (row >= args.rows) break;
      const float dot = tiles.sim[r][c], v = scale2 * dot;
      const float grad = row_grad[r] * fast_exp2(v - row_lse2[r]) + col_grad * fast_exp2(v - col_lse2);
      scale_grad = fmaf(grad, dot, scale_grad);
      grad_tile[row * args.cols + col] = from_float<T>(scale * grad);
    }
  }

#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) scale_grad += __shfl_xor_sync(kFullMask, scale_grad, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = scale_grad;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    args.scale_partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
  }
#else
  __trap();
#endif
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename Args>
dim3 grid_of(const Args& args) {
  return dim3(static_cast<unsigned>((args.rows + kRowBlock - 1) / kRowBlock), static_cast<unsigned>(args.col_splits));
}

template <typename T, Float32Mode kMode, typename Args>
cudaError_t launch_typed(const Args& args, cudaStream_t stream) {
  if (args.rows <= 0 || args.cols <= 0 || args.dim <= 0 || args.col_splits < 1) return cudaErrorInvalidValue;
  if ((args.rows + kRowBlock - 1) / kRowBlock > 0x7fffffff || args.col_splits > 65535) return cudaErrorInvalidValue;
  // 16-byte loads need every row start aligned: a row length that is a whole number of vectors.
  const bool vectorized = args.dim % MmaTraits<T>::kVec == 0 && aligned16(args.image) && aligned16(args.text);
  constexpr bool kForward = std::is_same_v<Args, LseForwardArgs>;
  if constexpr (kForward) {
    if (vectorized) lse_forward_kernel<T, kMode, true><<<grid_of(args), kThreads, 0, stream>>>(args);
    else lse_forward_kernel<T, kMode, false><<<grid_of(args), kThreads, 0, stream>>>(args);
  } else {
    if (vectorized) lse_backward_kernel<T, kMode, true><<<grid_of(args), kThreads, 0, stream>>>(args);
    else lse_backward_kernel<T, kMode, false><<<grid_of(args), kThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

template <typename Args>
cudaError_t launch(ElementType type, Float32Mode mode, const Args& args, cudaStream_t stream) {
  switch (type) {
    case ElementType::kFloat16:
      return launch_typed<__half, Float32Mode::kTf32>(args, stream);
    case ElementType::kBFloat16:
      return launch_typed<__nv_bfloat16, Float32Mode::kTf32>(args, stream);
    case ElementType::kFloat32:
      return mode == Float32Mode::kTf32 ? launch_typed<float, Float32Mode::kTf32>(args, stream)
                                        : launch_typed<float, Float32Mode::kTf32x3>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_lse_forward(ElementType type, Float32Mode mode, const LseForwardArgs& args, cudaStream_t stream) {
  return launch(type, mode, args, stream);
}

cudaError_t launch_lse_backward(ElementType type, Float32Mode mode, const LseBackwardArgs& args, cudaStream_t stream) {
  return launch(type, mode, args, stream);
}

}  // namespace cuda
}  // namespace fastclip
