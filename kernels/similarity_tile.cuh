// The tile machinery shared by the fused pairwise kernels (contrastive_lse.cu, contrastive_loss.cu,
// pairwise_sigmoid.cu): device code, included only by kernel sources.
//
// A CTA of kThreads = 256 threads (8 warps, 2 x 4 over the tile, 64 x 32 each) owns kRowBlock = 128 rows
// of `image` and sweeps the 128-column tiles of its column split. similarity_tile() computes one 128 x 128
// tile of dot products <image_i, text_j> with fp32 accumulation and leaves it in shared memory, where
// each kernel consumes it with its own loss:
//  - bf16/fp16: mma.sync.m16n8k16 on fragments loaded with ldmatrix from a 4-stage cp.async ring of
//    32-feature stages (swizzled, conflict-free; tile_layout.h), one barrier per stage;
//  - fp32: WMMA with one or three TF32 products (see Float32Mode) on synchronously loaded stages.
// The finished tile shares its shared memory with the operand stages (a union): similarity_tile() starts
// with a barrier, so a kernel may read the previous tile until it calls it again.
// launch_variant() picks the kernel instantiation (element type, float32 mode, vectorized loads) and
// launch_tile_kernel() starts it with the tile's dynamic shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "tile_config.cuh"
#include "tile_layout.h"

namespace fastclip {
namespace cuda {
namespace tile {

using namespace nvcuda;

constexpr int kThreads = layout::kThreads;
constexpr int kWarps = layout::kWarps;
constexpr int kSimLd = layout::kSimLd;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

// CTAs per SM the 16-bit kernels are built for: at most 128 registers a thread, so that two CTAs (16
// warps) share an SM's 64K registers. fp32, whose 3xTF32 split needs far more, keeps ptxas's choice.
template <typename T>
constexpr int kMinBlocksPerSm = std::is_same_v<T, float> ? 1 : 2;

// ---- shared memory

// 16-bit operands: kStages stages of 128 rows x 32 features per operand, as raw bits (tile_layout.h).
struct Stages16 {
  uint16_t a[layout::kStages][layout::kStageElems];
  uint16_t b[layout::kStages][layout::kStageElems];
};

// fp32 operands (WMMA): one stage of 128 rows x 32 features, rows padded to shift banks.
constexpr int kDepth32 = 32;
constexpr int kLd32 = kDepth32 + 4;
struct Stages32 {
  float a[kRowBlock][kLd32];
  float b[kColBlock][kLd32];
};

template <typename T>
using Stages = std::conditional_t<std::is_same_v<T, float>, Stages32, Stages16>;

template <typename T>
union SharedTiles {
  Stages<T> stages;
  float sim[kRowBlock][kSimLd];  // the finished tile of dot products <image_i, text_j>
};

// Dynamic shared memory per CTA (the kernels' static arrays add at most ~6 KB): two CTAs fit an A100's
// 164 KB and three an H100's 228 KB; one fits the 100 KB of sm_86/sm_89/sm_120 parts.
static_assert(sizeof(SharedTiles<__half>) <= 72 * 1024 && sizeof(SharedTiles<float>) <= 72 * 1024,
              "the tile's shared memory decides how many CTAs an SM holds");

template <typename T>
__device__ __forceinline__ SharedTiles<T>& shared_tiles() {
  extern __shared__ __align__(128) unsigned char dynamic_shared[];
  return *reinterpret_cast<SharedTiles<T>*>(dynamic_shared);
}

// ---- small device helpers

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

__device__ __forceinline__ float fast_log2(float x) {  // log2(0) = -inf
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The min of `lo` and the max of `hi` over the CTA, returned to every thread. Every thread must call it;
// `scratch` holds 2 * kWarps floats, free again after the next barrier.
__device__ __forceinline__ void cta_min_max(float& lo, float& hi, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(kFullMask, lo, offset));
    hi = fmaxf(hi, __shfl_xor_sync(kFullMask, hi, offset));
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = lo, scratch[kWarps + threadIdx.x / 32] = hi;
  __syncthreads();
  lo = scratch[0], hi = scratch[kWarps];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) lo = fminf(lo, scratch[w]), hi = fmaxf(hi, scratch[kWarps + w]);
}

// ---- 16-bit path: cp.async ring, ldmatrix, mma.sync

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes from global to shared memory, or 16 zero bytes when !valid (the source is then not read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// One operand's source rows for this thread's copies (tile_layout.h; nullptr past the last row), set up
// once per tile, so that a stage costs a pointer offset per copy.
template <typename T, bool kVectorized>
struct StageSource {
  static constexpr int kCopies = kVectorized ? layout::kCopiesPerThread : 1;
  const T* src[kCopies];

  __device__ __forceinline__ StageSource(const T* matrix, int64_t row0, int64_t num_rows, int64_t dim) {
#pragma unroll
    for (int copy = 0; copy < kCopies; ++copy) {
      const int r = kVectorized ? layout::copy_row(threadIdx.x, copy) : layout::scalar_copy_row(threadIdx.x);
      const int f = kVectorized ? layout::copy_chunk(threadIdx.x, copy) * layout::kChunkElems
                                : layout::scalar_copy_feature(threadIdx.x);
      src[copy] = row0 + r < num_rows ? matrix + (row0 + r) * dim + f : nullptr;
    }
  }

  // Fill `stage` with features [k0, k0 + 32) of the rows, zeros past either edge (zeros add nothing to a
  // dot product): asynchronous 16-byte copies, or element by element where rows are not 16-byte aligned.
  // A zero-fill copy still names a source address: `matrix`, valid and never read.
  __device__ __forceinline__ void copy(uint16_t* stage, int k0, int64_t dim, const T* matrix) const {
    if constexpr (kVectorized) {
      const bool in_dim = k0 + layout::copy_chunk(threadIdx.x, 0) * layout::kChunkElems < dim;  // whole chunks
#pragma unroll
      for (int copy = 0; copy < kCopies; ++copy) {
        const bool valid = src[copy] != nullptr && in_dim;
        cp_async_16(shared_address(stage + layout::copy_offset(threadIdx.x, copy)), valid ? src[copy] + k0 : matrix,
                    valid);
      }
    } else {
      T* dst = reinterpret_cast<T*>(stage);
      const int row = layout::scalar_copy_row(threadIdx.x), first = layout::scalar_copy_feature(threadIdx.x);
#pragma unroll 2  // more loads in flight would cost registers the accumulators need
      for (int e = 0; e < layout::kScalarCopyElems; ++e) {
        const int f = first + e;
        const bool valid = src[0] != nullptr && k0 + f < dim;
        dst[layout::stage_offset(row, f / layout::kChunkElems) + f % layout::kChunkElems] =
            valid ? src[0][k0 + e] : from_float<T>(0.f);
      }
    }
  }
};

using Accumulators = float[layout::kWarpMTiles][layout::kWarpNTiles][4];

// Accumulate one stage into the warp's 64 x 32 part of the tile. a_base and b_base: the lane's ldmatrix
// offsets for its first fragment rows at step 0 (tile_layout.h: fragment_offset).
template <typename T>
__device__ __forceinline__ void mma_stage16(const uint16_t* a_stage, const uint16_t* b_stage, Accumulators& acc,
                                            int a_base, int b_base) {
  using namespace layout;
#pragma unroll
  for (int step = 0; step < kStageDepth / kMmaK; ++step) {
    uint32_t a[kWarpMTiles][4], b[kWarpNTiles][2];
#pragma unroll
    for (int i = 0; i < kWarpMTiles; ++i)
      ldmatrix_x4(a[i], shared_address(a_stage + fragment_offset(a_base, i * kMmaM, step)));
#pragma unroll
    for (int j = 0; j < kWarpNTiles; j += 2) {
      uint32_t pair[4];
      ldmatrix_x4(pair, shared_address(b_stage + fragment_offset(b_base, j * kMmaN, step)));
      b[j][0] = pair[0], b[j][1] = pair[1], b[j + 1][0] = pair[2], b[j + 1][1] = pair[3];
    }
#pragma unroll
    for (int i = 0; i < kWarpMTiles; ++i)
#pragma unroll
      for (int j = 0; j < kWarpNTiles; ++j) mma_16816<T>(acc[i][j], a[i], b[j]);
  }
}

template <typename T, bool kVectorized>
__device__ __forceinline__ void similarity_tile16(SharedTiles<T>& tiles, const T* image, const T* text,
                                                  int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                                  int64_t dim) {
  using namespace layout;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp_row0(warp), wc = warp_col0(warp);
  Accumulators acc;
#pragma unroll
  for (int i = 0; i < kWarpMTiles; ++i)
#pragma unroll
    for (int j = 0; j < kWarpNTiles; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;
  const int steps = static_cast<int>((dim + kStageDepth - 1) / kStageDepth);  // dim < 2^31: launch_variant
  const StageSource<T, kVectorized> a_src(image, row0, rows, dim), b_src(text, col0, cols, dim);
  const int a_base = a_fragment_base(warp, lane), b_base = b_fragment_base(warp, lane);
  Stages16& st = tiles.stages;
  const auto issue = [&](int step) {  // the copies of `step` into its ring slot, as one commit group
    if (step < steps) {
      a_src.copy(st.a[step % kStages], step * kStageDepth, dim, image);
      b_src.copy(st.b[step % kStages], step * kStageDepth, dim, text);
    }
    cp_async_commit();  // an empty group past the end keeps the count that cp_async_wait relies on
  };

  __syncthreads();  // the stages overwrite the previous tile, which every thread is done reading
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<kStages - 2>();  // this thread's copies of `step` have landed ...
    __syncthreads();               // ... everyone's; and every warp is done with step - 1's slot
    issue(step + kStages - 1);     // refills step - 1's slot
    mma_stage16<T>(st.a[step % kStages], st.b[step % kStages], acc, a_base, b_base);
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages, which the similarities overwrite
#pragma unroll
  for (int i = 0; i < kWarpMTiles; ++i)
#pragma unroll
    for (int j = 0; j < kWarpNTiles; ++j) {
      const int r = wr + i * kMmaM + acc_row(lane, 0), c = wc + j * kMmaN + acc_col(lane, 0);
      *reinterpret_cast<float2*>(&tiles.sim[r][c]) = make_float2(acc[i][j][0], acc[i][j][1]);
      *reinterpret_cast<float2*>(&tiles.sim[r + 8][c]) = make_float2(acc[i][j][2], acc[i][j][3]);
    }
  __syncthreads();
}

// ---- fp32 path: WMMA on TF32

using FragA32 = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragB32 = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragC32 = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
constexpr int kWmmaM = layout::kWarpRows / 16, kWmmaN = layout::kWarpCols / 16;  // 4 x 2 fragments per warp

// Copy rows [row0, row0 + 128) x features [k0, k0 + 32) into a stage, zeros past either edge.
template <bool kVectorized>
__device__ __forceinline__ void load_stage32(float (*dst)[kLd32], const float* src, int64_t row0, int64_t num_rows,
                                             int64_t k0, int64_t dim) {
  if constexpr (kVectorized) {
    constexpr int kPerRow = kDepth32 / 4;
    for (int idx = threadIdx.x; idx < kRowBlock * kPerRow; idx += kThreads) {
      const int r = idx / kPerRow, v = idx % kPerRow;
      const int64_t row = row0 + r, k = k0 + v * 4;
      float4 value = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row < num_rows && k < dim) value = *reinterpret_cast<const float4*>(src + row * dim + k);
      *reinterpret_cast<float4*>(&dst[r][v * 4]) = value;
    }
  } else {
    for (int idx = threadIdx.x; idx < kRowBlock * kDepth32; idx += kThreads) {
      const int r = idx / kDepth32, c = idx % kDepth32;
      const int64_t row = row0 + r, k = k0 + c;
      dst[r][c] = (row < num_rows && k < dim) ? src[row * dim + k] : 0.f;
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

template <Float32Mode kMode>
__device__ __forceinline__ void mma_stage32(const Stages32& st, FragC32 (&acc)[kWmmaM][kWmmaN], int wr, int wc) {
#pragma unroll 1  // unrolled, ptxas hoists every step's fragment loads beside the 64 accumulators and spills
  for (int kk = 0; kk < kDepth32; kk += 8) {
    FragB32 b[kWmmaN];
#pragma unroll
    for (int j = 0; j < kWmmaN; ++j) wmma::load_matrix_sync(b[j], &st.b[wc + j * 16][kk], kLd32);
    if constexpr (kMode == Float32Mode::kTf32x3) {
      FragB32 b_lo[kWmmaN];
#pragma unroll
      for (int j = 0; j < kWmmaN; ++j) split_tf32(b[j], b_lo[j]);
      // One A fragment (and its split) at a time: with all four live beside the accumulators, ptxas spills.
#pragma unroll
      for (int i = 0; i < kWmmaM; ++i) {
        FragA32 a, a_lo;
        wmma::load_matrix_sync(a, &st.a[wr + i * 16][kk], kLd32);
        split_tf32(a, a_lo);
#pragma unroll
        for (int j = 0; j < kWmmaN; ++j) {
          // This stage's three products go into a fresh accumulator, small terms first, and only then
          // into the running sum with fp32 adds: the tensor cores' reduced-precision accumulation then
          // never sees the large running sum beside the small correction terms.
          FragC32 part;
          wmma::fill_fragment(part, 0.f);
          wmma::mma_sync(part, a_lo, b[j], part);
          wmma::mma_sync(part, a, b_lo[j], part);
          wmma::mma_sync(part, a, b[j], part);
#pragma unroll
          for (int t = 0; t < part.num_elements; ++t) acc[i][j].x[t] += part.x[t];
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kWmmaN; ++j) to_tf32(b[j]);
#pragma unroll
      for (int i = 0; i < kWmmaM; ++i) {
        FragA32 a;
        wmma::load_matrix_sync(a, &st.a[wr + i * 16][kk], kLd32);
        to_tf32(a);
#pragma unroll
        for (int j = 0; j < kWmmaN; ++j) wmma::mma_sync(acc[i][j], a, b[j], acc[i][j]);
      }
    }
  }
}

template <Float32Mode kMode, bool kVectorized>
__device__ __forceinline__ void similarity_tile32(SharedTiles<float>& tiles, const float* image, const float* text,
                                                  int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                                  int64_t dim) {
  const int warp = threadIdx.x / 32;
  const int wr = layout::warp_row0(warp), wc = layout::warp_col0(warp);
  FragC32 acc[kWmmaM][kWmmaN];
#pragma unroll
  for (int i = 0; i < kWmmaM; ++i)
#pragma unroll
    for (int j = 0; j < kWmmaN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int64_t k0 = 0; k0 < dim; k0 += kDepth32) {
    __syncthreads();  // the previous stage (or, at k0 = 0, the previous tile) is no longer read
    load_stage32<kVectorized>(tiles.stages.a, image, row0, rows, k0, dim);
    load_stage32<kVectorized>(tiles.stages.b, text, col0, cols, k0, dim);
    __syncthreads();
    mma_stage32<kMode>(tiles.stages, acc, wr, wc);
  }
  __syncthreads();  // every warp is done with the stage, which the similarities overwrite
#pragma unroll
  for (int i = 0; i < kWmmaM; ++i)
#pragma unroll
    for (int j = 0; j < kWmmaN; ++j)
      wmma::store_matrix_sync(&tiles.sim[wr + i * 16][wc + j * 16], acc[i][j], kSimLd, wmma::mem_row_major);
  __syncthreads();
}

// tiles.sim = image[row0 : row0 + 128] . text[col0 : col0 + 128]^T (zeros past the edges). Starts and
// ends with a barrier: every thread may read the whole tile afterwards, until its next call.
template <typename T, Float32Mode kMode, bool kVectorized>
__device__ __forceinline__ void similarity_tile(SharedTiles<T>& tiles, const T* image, const T* text, int64_t row0,
                                                int64_t rows, int64_t col0, int64_t cols, int64_t dim) {
  if constexpr (std::is_same_v<T, float>)
    similarity_tile32<kMode, kVectorized>(tiles, image, text, row0, rows, col0, cols, dim);
  else
    similarity_tile16<T, kVectorized>(tiles, image, text, row0, rows, col0, cols, dim);
}

// The forward kernels' row pass (tile_layout.h: half_row_col): this thread's half row.
using layout::col_pass_row;
using layout::kColPassRows;
using layout::kHalfRow;
struct HalfRow {
  int row;   // tile row
  int col0;  // first tile column of the half
  __device__ __forceinline__ int col(int k) const { return layout::half_row_col(threadIdx.x, k); }
};
__device__ __forceinline__ HalfRow half_row() {
  return {layout::half_row(threadIdx.x), layout::half_row_col0(threadIdx.x)};
}

// The column tiles [begin, begin + count) that split `split` of `splits` sweeps (see plan_col_splits). A
// 32-bit count (2^31 tiles would be 2.7e11 columns) keeps the loop bound in one register: with a 64-bit
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
  __shared__ float warp_sums[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
    out[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
  }
  __syncthreads();  // warp_sums is free again
}

// ---- host side: picking and launching a kernel instantiation

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// One instantiation of a tile kernel: element type, float32 mode, and whether its loads are 16-byte vectors.
template <typename T, Float32Mode kMode_, bool kVectorized_>
struct Variant {
  using Element = T;
  static constexpr Float32Mode kMode = kMode_;
  static constexpr bool kVectorized = kVectorized_;
};

// Starts `kernel` (an instantiation for element type T) with the tile's dynamic shared memory, which is
// above the 48 KiB a kernel gets without asking; the attribute is set on every launch, as it is per
// device and costs no synchronisation.
template <typename T, typename Args>
void launch_tile_kernel(void (*kernel)(Args), dim3 grid, cudaStream_t stream, const Args& args) {
  constexpr int bytes = sizeof(SharedTiles<T>);
  // A failure stays the thread's last error, which launch_typed returns.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess) return;
  kernel<<<grid, kThreads, bytes, stream>>>(args);
}

// CTAs of `kernel` (an instantiation for element type T) that one SM holds at once, from the CUDA
// occupancy calculator (registers, shared memory, threads); at least 1.
template <typename T, typename Args>
int ctas_per_sm(void (*kernel)(Args)) {
  constexpr int bytes = sizeof(SharedTiles<T>);
  int blocks = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, bytes) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query only costs grid size; the launch reports real errors
    return 1;
  }
  return blocks > 0 ? blocks : 1;
}

// ctas_per_sm of the vectorized instantiation kernel_of(Variant<...>{}) for the run-time element type and
// float32 mode.
template <typename KernelOf>
int tile_occupancy(ElementType type, Float32Mode mode, KernelOf&& kernel_of) {
  switch (type) {
    case ElementType::kFloat16:
      return ctas_per_sm<__half>(kernel_of(Variant<__half, Float32Mode::kTf32, true>{}));
    case ElementType::kBFloat16:
      return ctas_per_sm<__nv_bfloat16>(kernel_of(Variant<__nv_bfloat16, Float32Mode::kTf32, true>{}));
    case ElementType::kFloat32:
      return mode == Float32Mode::kTf32 ? ctas_per_sm<float>(kernel_of(Variant<float, Float32Mode::kTf32, true>{}))
                                        : ctas_per_sm<float>(kernel_of(Variant<float, Float32Mode::kTf32x3, true>{}));
  }
  return 1;
}

template <typename T, Float32Mode kMode, typename Args, typename Launch>
cudaError_t launch_typed(const Args& args, Launch&& launch) {
  // 16-byte loads need every row start aligned: a row length that is a whole number of vectors.
  constexpr int kVec = std::is_same_v<T, float> ? 4 : layout::kChunkElems;
  const bool vectorized = args.dim % kVec == 0 && aligned16(args.image) && aligned16(args.text);
  const dim3 grid(static_cast<unsigned>((args.rows + kRowBlock - 1) / kRowBlock), static_cast<unsigned>(args.col_splits));
  if (vectorized) launch(Variant<T, kMode, true>{}, grid);
  else launch(Variant<T, kMode, false>{}, grid);
  return cudaGetLastError();
}

// Checks the tile problem in `args` (image, text, rows, cols, dim, col_splits) and calls
// launch(Variant<...>{}, grid) for the run-time element type, float32 mode and alignment; `launch` starts
// kernel<Variant::Element, Variant::kMode, Variant::kVectorized> with launch_tile_kernel.
template <typename Args, typename Launch>
cudaError_t launch_variant(ElementType type, Float32Mode mode, const Args& args, Launch&& launch) {
  if (args.rows <= 0 || args.cols <= 0 || args.dim <= 0 || args.col_splits < 1) return cudaErrorInvalidValue;
  if ((args.rows + kRowBlock - 1) / kRowBlock > 0x7fffffff || args.col_splits > 65535) return cudaErrorInvalidValue;
  if (args.dim > 0x7fffffff - 64) return cudaErrorInvalidValue;  // the stage loop counts features in 32 bits
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
