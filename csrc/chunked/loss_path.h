// Which implementation of the contrastive-loss ops runs a call: the fused tile sweep (the tiles of the
// similarity matrix computed and reduced in one kernel, or its CPU twin) or the chunked path
// (chunked_loss.h: cuBLAS/BLAS GEMMs plus one epilogue pass). Environment variables, read on every call
// so that a benchmark or a test can switch between calls:
//   FASTCLIP_CUDA_LOSS_PATH = fused | chunked   forces the CUDA ops' path (unset: loss_path_table)
//   FASTCLIP_CPU_LOSS_PATH  = fused | chunked   the cpp backend's path (unset: fused)
//   FASTCLIP_LOSS_CHUNK_BYTES = <bytes>         the chunked path's scratch budget (tests force tiny chunks)
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastclip {

enum class LossPath { kFused, kChunked };

// The path of a CUDA call with n x N similarities of D features in `dtype`.
LossPath cuda_loss_path(int64_t n, int64_t N, int64_t D, at::ScalarType dtype);

// The path of a CPU call (the C++ backend).
LossPath cpu_loss_path();

// The chunked path's scratch budget in bytes: FASTCLIP_LOSS_CHUNK_BYTES, else `default_bytes`.
int64_t chunk_budget_bytes(int64_t default_bytes);

}  // namespace fastclip
