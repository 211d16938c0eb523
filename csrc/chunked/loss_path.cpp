// The choice between the fused and the chunked path of the contrastive-loss ops (loss_path.h).
#include "chunked/loss_path.h"

#include <cstdlib>
#include <optional>
#include <string>

namespace fastclip {
namespace {

// The path an environment variable forces, if set (an empty value counts as unset).
std::optional<LossPath> forced_path(const char* variable) {
  const char* value = std::getenv(variable);
  if (value == nullptr || *value == '\0') return std::nullopt;
  const std::string v(value);
  if (v == "chunked") return LossPath::kChunked;
  if (v == "fused") return LossPath::kFused;
  TORCH_CHECK(false, variable, " must be 'chunked' or 'fused' (or unset), got '", v, "'");
}

// The CUDA path by problem size, for calls that force none. The first GPU benchmark of both paths (an
// H200, bf16, D = 768; benchmarks/results/NVIDIA_H200/bench_loss.json) measured the chunked path 3.4x
// faster than the fused kernel at N = 16384 and 4.1x at 65536. At N = 4096 the fused one was 7% ahead,
// with both about 3x slower than the naive loss (most likely host-bound, not yet profiled), so that size
// decides nothing yet: the chunked path runs everywhere. That fused kernel (64 x 64 WMMA tiles) has since
// been replaced (128 x 128 tiles, mma.sync, a cp.async ring, a shared exponential), not yet measured; a
// benchmark of both paths over N, D, dtype and architecture sets this table.
LossPath loss_path_table(int64_t /*n*/, int64_t /*N*/, int64_t /*D*/, at::ScalarType /*dtype*/) {
  return LossPath::kChunked;
}

}  // namespace

LossPath cuda_loss_path(int64_t n, int64_t N, int64_t D, at::ScalarType dtype) {
  if (const auto forced = forced_path("FASTCLIP_CUDA_LOSS_PATH")) return *forced;
  return loss_path_table(n, N, D, dtype);
}

LossPath cpu_loss_path() {
  // The fused tile sweep stays the CPU default: the chunked path is there to test the CUDA path's
  // arithmetic (and its 16-bit gradient tiles round G, which the CPU sweep keeps in fp32).
  return forced_path("FASTCLIP_CPU_LOSS_PATH").value_or(LossPath::kFused);
}

int64_t chunk_budget_bytes(int64_t default_bytes) {
  const char* value = std::getenv("FASTCLIP_LOSS_CHUNK_BYTES");
  if (value == nullptr || *value == '\0') return default_bytes;
  char* end = nullptr;
  const long long bytes = std::strtoll(value, &end, 10);
  TORCH_CHECK(*end == '\0' && bytes > 0, "FASTCLIP_LOSS_CHUNK_BYTES must be a positive number of bytes, got '",
              value, "'");
  return bytes;
}

}  // namespace fastclip
