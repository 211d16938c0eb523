// Tile geometry and launch options shared by the fused pairwise kernels (contrastive_lse.cuh,
// pairwise_sigmoid.cuh): host-visible, plain C++ (no device code), so the ATen glue can include it.
#pragma once

#include <cstdint>

namespace fastclip {
namespace cuda {

constexpr int kRowBlock = 128;  // rows per CTA
constexpr int kColBlock = 128;  // columns per tile

enum class ElementType { kFloat32, kBFloat16, kFloat16 };

// How float32 inputs use the tensor cores: one TF32 product (what torch does when TF32 is allowed), or
// three (hi*hi + hi*lo + lo*hi, near-fp32 accuracy, for the default "highest" matmul precision).
enum class Float32Mode { kTf32, kTf32x3 };

// Number of column splits actually used for `cols` columns when `requested` are asked for: every split
// gets at least one tile and all but the last get the same number.
inline int plan_col_splits(int64_t cols, int requested) {
  const int64_t tiles = (cols + kColBlock - 1) / kColBlock;
  const int64_t want = requested < 1 ? 1 : (requested > tiles ? tiles : requested);
  const int64_t per_split = (tiles + want - 1) / want;
  return static_cast<int>((tiles + per_split - 1) / per_split);
}

}  // namespace cuda
}  // namespace fastclip
