// The chunked path's epilogue kernels (chunked_epilogue.cuh): one pass over a chunk of fp32 dot products
// that a cuBLAS GEMM wrote, with no shared memory and no atomics.
//
// A warp is a unit of work (csrc/chunked/epilogue_geometry.h): lane l owns the columns 4l..4l+3 and
// 128+4l..128+4l+3 of its 256-column tile (16-byte loads, 512 contiguous bytes per warp and run) and
// walks its split's rows one at a time. Per row it makes the row's partial over the tile with two warp
// reductions (max, then the sum of exponentials under it), and updates its columns' running (max, sum):
// a column belongs to one lane, so its state stays in registers for the whole split. Exponentials run in
// base 2 (ex2.approx) with the scale pre-multiplied by log2(e); maxes are written back in natural units.
// The dots are read once and never again (streaming loads); the CPU twin is cpu/chunked_epilogue_cpu.cpp.
// The sigmoid loss's kernel has the same layout, with no column state but the lanes' labels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "chunked/epilogue_geometry.h"
#include "chunked_epilogue.cuh"

namespace fastclip {
namespace cuda {
namespace {

using chunked::kColsPerLane;
using chunked::kLanes;
using chunked::kTileCols;
using chunked::kVector;
using chunked::kWarpsPerCta;
using chunked::tile_column;

constexpr int kThreads = kWarpsPerCta * kLanes;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float fast_exp2(float x) {  // exp2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T to_element(float x);
template <>
__device__ __forceinline__ float to_element<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half to_element<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 to_element<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// This warp's unit: tile `tile` (columns c0 ..) of split `split` (rows r0 .. r1 - 1).
struct Unit {
  int64_t index, tile, split, r0, r1, c0;
};

// False for the spare warps of the last CTA.
__device__ __forceinline__ bool unit_of(const ChunkShape& s, Unit& u) {
  u.index = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kLanes;
  if (u.index >= s.col_tiles * s.row_splits) return false;
  u.tile = u.index % s.col_tiles, u.split = u.index / s.col_tiles;
  u.r0 = u.split * s.rows_per_split;
  u.r1 = u.r0 + s.rows_per_split < s.rows ? u.r0 + s.rows_per_split : s.rows;
  u.c0 = u.tile * kTileCols;
  return true;
}

// The lane's dots of one row (0 past the last column). kVectorized: cols % 4 == 0 and 16-byte aligned
// rows, so a run of four is wholly inside or wholly past the edge.
template <bool kVectorized>
__device__ __forceinline__ void load_row(const float* row, int64_t c0, int64_t cols, int lane,
                                         float (&x)[kColsPerLane]) {
#pragma unroll
  for (int run = 0; run < kColsPerLane / kVector; ++run) {
    const int64_t base = c0 + tile_column(lane, run * kVector);
    if constexpr (kVectorized) {
      float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
      if (base < cols) q = __ldcs(reinterpret_cast<const float4*>(row + base));  // read once: streaming
      x[run * kVector + 0] = q.x, x[run * kVector + 1] = q.y, x[run * kVector + 2] = q.z, x[run * kVector + 3] = q.w;
    } else {
#pragma unroll
      for (int e = 0; e < kVector; ++e) x[run * kVector + e] = base + e < cols ? __ldcs(row + base + e) : 0.f;
    }
  }
}

// row[c] = to_element(mul * g[k]) for the lane's columns c inside the tile.
template <typename T, bool kVectorized>
__device__ __forceinline__ void store_row(T* row, int64_t c0, int64_t cols, int lane, const float (&g)[kColsPerLane],
                                          float mul) {
#pragma unroll
  for (int run = 0; run < kColsPerLane / kVector; ++run) {
    const int64_t base = c0 + tile_column(lane, run * kVector);
    if constexpr (kVectorized) {
      if (base >= cols) continue;
      T v[kVector];
#pragma unroll
      for (int e = 0; e < kVector; ++e) v[e] = to_element<T>(mul * g[run * kVector + e]);
      if constexpr (sizeof(T) == 4) {
        float4 q;
        memcpy(&q, v, sizeof(q));
        *reinterpret_cast<float4*>(row + base) = q;
      } else {
        uint2 q;
        memcpy(&q, v, sizeof(q));
        *reinterpret_cast<uint2*>(row + base) = q;
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVector; ++e)
        if (base + e < cols) row[base + e] = to_element<T>(mul * g[run * kVector + e]);
    }
  }
}

// The tile column the mask takes from chunk row i, or -1 (none).
__device__ __forceinline__ int64_t hole_of(const ChunkShape& s, int64_t i, int64_t c0) {
  return s.mask_diagonal ? i + s.diagonal - c0 : -1;
}

template <bool kVectorized>
__global__ void __launch_bounds__(kThreads) chunk_forward_kernel(ChunkForwardArgs args) {
  const ChunkShape& s = args.shape;
  Unit u;
  if (!unit_of(s, u)) return;
  const int lane = threadIdx.x % kLanes;
  const float scale2 = *s.scale * kLog2e;  // S in base-2 units
  float col_max[kColsPerLane], col_sum[kColsPerLane];
#pragma unroll
  for (int k = 0; k < kColsPerLane; ++k) col_max[k] = -INFINITY, col_sum[k] = 0.f;

  for (int64_t i = u.r0; i < u.r1; ++i) {
    float v[kColsPerLane];
    load_row<kVectorized>(s.dots + i * s.cols, u.c0, s.cols, lane, v);
    const int64_t hole = hole_of(s, i, u.c0);
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      const int c = tile_column(lane, k);
      v[k] = u.c0 + c < s.cols && c != hole ? scale2 * v[k] : -INFINITY;
      m = fmaxf(m, v[k]);
    }
    m = warp_max(m);
    float sum = 0.f;
    if (m != -INFINITY) {  // the same for the whole warp; -inf: the mask emptied the row in this tile
#pragma unroll
      for (int k = 0; k < kColsPerLane; ++k) sum += fast_exp2(v[k] - m);
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      args.row_max[u.tile * s.rows + i] = m * kLn2;
      args.row_sum[u.tile * s.rows + i] = sum;
    }
    // Columns: running (max, sum) with one exponential per entry and no branch: e = exp2(-|v - max|)
    // scales the old sum when v is the new max, else it is v's own term.
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      const float e = v[k] == -INFINITY ? 0.f : fast_exp2(-fabsf(v[k] - col_max[k]));
      col_sum[k] = v[k] > col_max[k] ? fmaf(col_sum[k], e, 1.f) : col_sum[k] + e;
      col_max[k] = fmaxf(col_max[k], v[k]);
    }
  }
#pragma unroll
  for (int k = 0; k < kColsPerLane; ++k) {
    const int64_t col = u.c0 + tile_column(lane, k);
    if (col < s.cols) {
      args.col_max[u.split * s.cols + col] = col_max[k] * kLn2;
      args.col_sum[u.split * s.cols + col] = col_sum[k];
    }
  }
}

// The lane's per-column inputs of a backward: grad_col and col_lse (base 2), 0 past the edge.
__device__ __forceinline__ void load_columns(const ChunkBackwardArgs& a, int64_t c0, int lane,
                                             float (&grad_col)[kColsPerLane], float (&col_lse2)[kColsPerLane]) {
#pragma unroll
  for (int k = 0; k < kColsPerLane; ++k) {
    const int64_t col = c0 + tile_column(lane, k);
    const bool ok = col < a.shape.cols;
    grad_col[k] = ok ? a.grad_col[col] : 0.f;
    col_lse2[k] = ok ? a.col_lse[col] * kLog2e : 0.f;
  }
}

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads) chunk_backward_kernel(ChunkBackwardArgs args) {
  const ChunkShape& s = args.shape;
  Unit u;
  if (!unit_of(s, u)) return;
  const int lane = threadIdx.x % kLanes;
  const float scale = *s.scale, scale2 = scale * kLog2e;
  const float tile_mul = scale * (args.tile_scale ? *args.tile_scale : 1.f);  // exact: a power of two
  float grad_col[kColsPerLane], col_lse2[kColsPerLane];
  load_columns(args, u.c0, lane, grad_col, col_lse2);
  T* grad_tile = static_cast<T*>(args.grad_tile);
  float scale_grad = 0.f;  // sum of G * dot
  for (int64_t i = u.r0; i < u.r1; ++i) {
    float x[kColsPerLane], g[kColsPerLane];
    load_row<kVectorized>(s.dots + i * s.cols, u.c0, s.cols, lane, x);
    const int64_t hole = hole_of(s, i, u.c0);
    const float grad_row = args.grad_row[i], row_lse2 = args.row_lse[i] * kLog2e;
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      const int c = tile_column(lane, k);
      g[k] = 0.f;  // past the edge (not stored) or masked (without exp(S - lse): a masked row's lse is -inf)
      if (u.c0 + c < s.cols && c != hole) {
        const float v = scale2 * x[k];
        g[k] = grad_row * fast_exp2(v - row_lse2) + grad_col[k] * fast_exp2(v - col_lse2[k]);
        scale_grad = fmaf(g[k], x[k], scale_grad);
      }
    }
    store_row<T, kVectorized>(grad_tile + i * s.cols, u.c0, s.cols, lane, g, tile_mul);
  }
  scale_grad = warp_sum(scale_grad);
  if (lane == 0) args.scale_partial[u.index] = scale_grad;
}

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads) chunk_loss_backward_kernel(ChunkLossArgs args) {
  const ChunkBackwardArgs& b = args.base;
  const ChunkShape& s = b.shape;
  Unit u;
  if (!unit_of(s, u)) return;
  const int lane = threadIdx.x % kLanes;
  const float scale = *s.scale, scale2 = scale * kLog2e;
  const float tile_mul = scale * (b.tile_scale ? *b.tile_scale : 1.f);
  const float uniform = *args.grad_uniform;
  float grad_col[kColsPerLane], col_lse2[kColsPerLane], col_rest[kColsPerLane];
  int64_t col_id[kColsPerLane];
  load_columns(b, u.c0, lane, grad_col, col_lse2);
#pragma unroll
  for (int k = 0; k < kColsPerLane; ++k) {
    const int64_t col = u.c0 + tile_column(lane, k);
    col_id[k] = col < s.cols ? args.col_ids[col] : -1;
    col_rest[k] = 0.f;
  }
  T* grad_tile = static_cast<T*>(b.grad_tile);
  float scale_grad = 0.f;
  for (int64_t i = u.r0; i < u.r1; ++i) {
    float x[kColsPerLane], g[kColsPerLane];
    load_row<kVectorized>(s.dots + i * s.cols, u.c0, s.cols, lane, x);
    const int64_t hole = hole_of(s, i, u.c0);
    const int64_t pair = args.partner[i] - args.col_offset - u.c0;  // a tile column, if in range
    const int64_t row_id = args.row_ids[i];
    const float grad_row = b.grad_row[i], row_lse2 = b.row_lse[i] * kLog2e, positive = args.grad_positive[i];
    float rest = 0.f;
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      const int c = tile_column(lane, k);
      g[k] = 0.f;
      if (u.c0 + c >= s.cols || c == hole) continue;
      if (c == pair) {  // filled in by the host from the rests of its row and column
        args.pair_dot[i] = x[k];
        continue;
      }
      const float v = scale2 * x[k];
      const float p_row = fast_exp2(v - row_lse2);
      const float p_col = grad_col[k] != 0.f ? fast_exp2(v - col_lse2[k]) : 0.f;  // SupCon has no column terms
      rest += p_row;
      col_rest[k] += p_col;
      const float target = (row_id == col_id[k] ? positive : 0.f) + uniform;
      g[k] = grad_row * p_row + grad_col[k] * p_col - target;
      scale_grad = fmaf(g[k], x[k], scale_grad);
    }
    rest = warp_sum(rest);
    if (lane == 0) args.row_rest[u.tile * s.rows + i] = rest;
    store_row<T, kVectorized>(grad_tile + i * s.cols, u.c0, s.cols, lane, g, tile_mul);
  }
#pragma unroll
  for (int k = 0; k < kColsPerLane; ++k) {
    const int64_t col = u.c0 + tile_column(lane, k);
    if (col < s.cols) args.col_rest[u.split * s.cols + col] = col_rest[k];
  }
  scale_grad = warp_sum(scale_grad);
  if (lane == 0) b.scale_partial[u.index] = scale_grad;
}

// One pass of the sigmoid loss (ChunkSigmoidArgs). e = exp(-|z L|) serves both the loss, softplus(-z L) =
// max(-z L, 0) + log1p(e), and the sigmoid, sigmoid(-z L) = e / (1 + e) or 1 / (1 + e) by the sign of z L.
template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads) chunk_sigmoid_kernel(ChunkSigmoidArgs args) {
  const ChunkShape& s = args.shape;
  Unit u;
  if (!unit_of(s, u)) return;
  const int lane = threadIdx.x % kLanes;
  const float scale = *s.scale, bias = *args.bias;
  const float tile_mul = scale * (args.tile_scale ? *args.tile_scale : 1.f);  // exact: a power of two
  int64_t col_label[kColsPerLane];
#pragma unroll
  for (int k = 0; k < kColsPerLane; ++k) {
    const int64_t col = u.c0 + tile_column(lane, k);
    col_label[k] = col < s.cols ? args.col_labels[col] : 0;
  }
  T* grad_tile = static_cast<T*>(args.grad_tile);
  double scale_grad = 0.0, bias_grad = 0.0;  // fp32 within a row, double across rows
  for (int64_t i = u.r0; i < u.r1; ++i) {
    float x[kColsPerLane], g[kColsPerLane];
    load_row<kVectorized>(s.dots + i * s.cols, u.c0, s.cols, lane, x);
    const int64_t row_label = args.row_labels[i];
    const float grad_row = args.grad_row[i];
    float loss = 0.f, row_scale = 0.f, row_bias = 0.f;
#pragma unroll
    for (int k = 0; k < kColsPerLane; ++k) {
      g[k] = 0.f;
      if (u.c0 + tile_column(lane, k) >= s.cols) continue;
      const bool positive = col_label[k] == row_label;
      const float l = fmaf(scale, x[k], bias);
      const float zl = positive ? l : -l;
      const float e = fast_exp2(-fabsf(zl) * kLog2e);  // in (0, 1]
      loss += fmaxf(-zl, 0.f) + log1pf(e);
      const float r = __frcp_rn(1.f + e);
      const float sig = zl >= 0.f ? e * r : r;  // sigmoid(-z L)
      g[k] = positive ? -grad_row * sig : grad_row * sig;
      row_scale = fmaf(g[k], x[k], row_scale);
      row_bias += g[k];
    }
    loss = warp_sum(loss);
    if (lane == 0) args.row_loss[u.tile * s.rows + i] = loss;
    scale_grad += row_scale, bias_grad += row_bias;
    store_row<T, kVectorized>(grad_tile + i * s.cols, u.c0, s.cols, lane, g, tile_mul);
  }
  const float unit_scale = warp_sum(static_cast<float>(scale_grad)), unit_bias = warp_sum(static_cast<float>(bias_grad));
  if (lane == 0) args.scale_partial[u.index] = unit_scale, args.bias_partial[u.index] = unit_bias;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The grid of a chunk: one warp per unit; nullopt-like 0 for a shape no kernel can take.
inline unsigned ctas_of(const ChunkShape& s) {
  if (s.rows <= 0 || s.cols <= 0 || s.col_tiles < 1 || s.row_splits < 1) return 0;
  const int64_t ctas = (s.col_tiles * s.row_splits + kWarpsPerCta - 1) / kWarpsPerCta;
  return ctas > 0x7fffffff ? 0u : static_cast<unsigned>(ctas);
}

// Calls launch(T{}, std::integral_constant<bool, vectorized>{}) for the tile's element type.
template <typename Launch>
cudaError_t launch_typed(ElementType type, bool vectorized, Launch&& launch) {
  const auto with = [&](auto element) {
    if (vectorized) launch(element, std::true_type{});
    else launch(element, std::false_type{});
  };
  switch (type) {
    case ElementType::kFloat32: with(float{}); break;
    case ElementType::kBFloat16: with(__nv_bfloat16{}); break;
    case ElementType::kFloat16: with(__half{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_chunk_forward(const ChunkForwardArgs& args, cudaStream_t stream) {
  const unsigned ctas = ctas_of(args.shape);
  if (ctas == 0) return cudaErrorInvalidValue;
  if (args.shape.cols % kVector == 0 && aligned16(args.shape.dots))
    chunk_forward_kernel<true><<<ctas, kThreads, 0, stream>>>(args);
  else
    chunk_forward_kernel<false><<<ctas, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_chunk_backward(ElementType type, const ChunkBackwardArgs& args, cudaStream_t stream) {
  const unsigned ctas = ctas_of(args.shape);
  if (ctas == 0) return cudaErrorInvalidValue;
  const bool vectorized = args.shape.cols % kVector == 0 && aligned16(args.shape.dots) && aligned16(args.grad_tile);
  return launch_typed(type, vectorized, [&](auto element, auto vector) {
    chunk_backward_kernel<decltype(element), decltype(vector)::value><<<ctas, kThreads, 0, stream>>>(args);
  });
}

cudaError_t launch_chunk_loss_backward(ElementType type, const ChunkLossArgs& args, cudaStream_t stream) {
  const ChunkShape& s = args.base.shape;
  const unsigned ctas = ctas_of(s);
  if (ctas == 0) return cudaErrorInvalidValue;
  const bool vectorized = s.cols % kVector == 0 && aligned16(s.dots) && aligned16(args.base.grad_tile);
  return launch_typed(type, vectorized, [&](auto element, auto vector) {
    chunk_loss_backward_kernel<decltype(element), decltype(vector)::value><<<ctas, kThreads, 0, stream>>>(args);
  });
}

cudaError_t launch_chunk_sigmoid(ElementType type, const ChunkSigmoidArgs& args, cudaStream_t stream) {
  const ChunkShape& s = args.shape;
  const unsigned ctas = ctas_of(s);
  if (ctas == 0 || s.mask_diagonal) return cudaErrorInvalidValue;
  const bool vectorized = s.cols % kVector == 0 && aligned16(s.dots) && aligned16(args.grad_tile);
  return launch_typed(type, vectorized, [&](auto element, auto vector) {
    chunk_sigmoid_kernel<decltype(element), decltype(vector)::value><<<ctas, kThreads, 0, stream>>>(args);
  });
}

}  // namespace cuda
}  // namespace fastclip
