// Where the pieces of a similarity tile live, for the 16-bit tensor-core path of similarity_tile.cuh:
// which 16-byte chunks a thread copies into a shared-memory stage, the swizzled address of each chunk,
// the row each lane hands to ldmatrix, and the (row, column) of each mma.sync accumulator register.
// Plain C++ (host and device), so that a CPU test can run the tile's data movement through an emulation
// of cp.async, ldmatrix and mma.sync (tests/cpp/tile_emulation.cpp) and compare it with float64 math.
#pragma once

#include "tile_config.cuh"

#if defined(__CUDACC__)
#define FASTCLIP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTCLIP_HOST_DEVICE inline
#endif

namespace fastclip {
namespace cuda {
namespace layout {

constexpr int kThreads = 256;                         // 8 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr int kWarpGridCols = 4;                      // warps as 2 x 4 over the 128 x 128 tile ...
constexpr int kWarpRows = kRowBlock / (kWarps / kWarpGridCols);  // ... 64 rows x 32 columns each
constexpr int kWarpCols = kColBlock / kWarpGridCols;
constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 16;      // mma.sync.m16n8k16
constexpr int kWarpMTiles = kWarpRows / kMmaM;        // 4 x 4 accumulator tiles per warp
constexpr int kWarpNTiles = kWarpCols / kMmaN;
constexpr int kStageDepth = 32;                       // 16-bit features per row and stage: 64 bytes
constexpr int kChunkElems = 8;                        // one 16-byte chunk
constexpr int kStageChunks = kStageDepth / kChunkElems;
constexpr int kStages = 4;                            // depth of the cp.async ring
constexpr int kStageElems = kRowBlock * kStageDepth;  // one operand's stage (kRowBlock == kColBlock)
constexpr int kCopiesPerThread = kRowBlock * kStageChunks / kThreads;  // chunks per operand and stage
// Row stride (floats) of the finished tile in shared memory: 8 mod 32 banks, so the float2 stores of a
// half-warp's accumulators (rows g .. g + 3, columns 2t, 2t + 1) cover 32 distinct banks.
constexpr int kSimLd = kColBlock + 8;

static_assert(kRowBlock == kColBlock, "one stage geometry serves both operands");
static_assert(kRowBlock * kStageChunks % kThreads == 0, "every thread copies the same number of chunks");
static_assert(kStageChunks == 4 && kStageDepth / kMmaK == 2, "the swizzle below spreads 4 chunks per row over the banks");

// The first row and column of warp `warp`'s 64 x 32 part of the tile.
FASTCLIP_HOST_DEVICE int warp_row0(int warp) { return (warp / kWarpGridCols) * kWarpRows; }
FASTCLIP_HOST_DEVICE int warp_col0(int warp) { return (warp % kWarpGridCols) * kWarpCols; }

// Element offset of chunk `chunk` of stage row `row`. Rows are 64 bytes, so rows r and r + 2 would share
// banks; XOR-ing the chunk with bits 1-2 of the row puts the 8 rows an ldmatrix reads (same logical chunk)
// in 8 different 16-byte bank groups.
FASTCLIP_HOST_DEVICE int stage_offset(int row, int chunk) {
  return row * kStageDepth + ((chunk ^ ((row >> 1) & 3)) * kChunkElems);
}

// Copy `copy` (0 .. kCopiesPerThread - 1) of thread `thread` (16-byte copies): a stage row and a chunk of
// it. Consecutive threads take consecutive chunks of a row, so a warp reads 512 contiguous bytes of 8
// rows' features. A thread's copies are kCopyRowsApart rows apart, at the same chunk and swizzle, so the
// kernel keeps one offset: copy_offset.
constexpr int kCopyRowsApart = kThreads / kStageChunks;
static_assert(kCopyRowsApart % 8 == 0, "copies kCopyRowsApart rows apart share a swizzle");
FASTCLIP_HOST_DEVICE int copy_row(int thread, int copy) { return (thread + copy * kThreads) / kStageChunks; }
FASTCLIP_HOST_DEVICE int copy_chunk(int thread, int copy) { return (thread + copy * kThreads) % kStageChunks; }
FASTCLIP_HOST_DEVICE int copy_offset(int thread, int copy) {
  return stage_offset(copy_row(thread, 0), copy_chunk(thread, 0)) + copy * kCopyRowsApart * kStageDepth;
}
// Rows that are not 16-byte aligned are copied element by element: thread t takes features
// 16 (t % 2) .. + 15 of stage row t / 2.
constexpr int kScalarCopyElems = 16;
static_assert(kRowBlock * kStageDepth == kThreads * kScalarCopyElems, "one row half per thread");
FASTCLIP_HOST_DEVICE int scalar_copy_row(int thread) { return thread / 2; }
FASTCLIP_HOST_DEVICE int scalar_copy_feature(int thread) { return (thread % 2) * kScalarCopyElems; }

// ldmatrix.x4 of an A operand (16 rows x 16 features, row-major): lane l points at a row of matrix l / 8,
// matrices ordered (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15): the
// order of mma.sync's four A registers.
FASTCLIP_HOST_DEVICE int a_lane_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
FASTCLIP_HOST_DEVICE int a_lane_chunk(int lane) { return (lane >> 4) & 1; }
// ldmatrix.x4 of B for two n8 tiles (16 text rows x 16 features): matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
// (n 8-15, k 0-7), (n 8-15, k 8-15): both B registers of the first n8 tile, then of the second.
FASTCLIP_HOST_DEVICE int b_lane_row(int lane) { return (lane & 7) + ((lane >> 4) & 1) * 8; }
FASTCLIP_HOST_DEVICE int b_lane_chunk(int lane) { return (lane >> 3) & 1; }

// The stage offsets of a lane's first A and B fragment rows (ldmatrix addresses) at step 0.
FASTCLIP_HOST_DEVICE int a_fragment_base(int warp, int lane) {
  return stage_offset(warp_row0(warp) + a_lane_row(lane), a_lane_chunk(lane));
}
FASTCLIP_HOST_DEVICE int b_fragment_base(int warp, int lane) {
  return stage_offset(warp_col0(warp) + b_lane_row(lane), b_lane_chunk(lane));
}

// The stage offset of a lane's ldmatrix row `rows` rows further down and `step` k16 steps further on,
// from its offset `base` at step 0. Every fragment row a lane reads has the same swizzle (the rows of one
// ldmatrix start at a multiple of 8), so the next step's chunk (+2) is one flipped bit of the offset.
FASTCLIP_HOST_DEVICE int fragment_offset(int base, int rows, int step) {
  return (base + rows * kStageDepth) ^ (step * 2 * kChunkElems);
}

// Accumulator register q (0..3) of an m16n8 tile, held by lane `lane`: its row and column in the tile.
FASTCLIP_HOST_DEVICE int acc_row(int lane, int q) { return (lane >> 2) + 8 * (q >> 1); }
FASTCLIP_HOST_DEVICE int acc_col(int lane, int q) { return 2 * (lane & 3) + (q & 1); }

// The row pass of the forward kernels: lane l of warp w owns half a tile row, row 16 w + l / 2 and
// columns 64 (l % 2) .. + 63, which it visits in a rotated order (half_row_col(thread, k), k = 0 .. 63) so
// that the warp's 32 reads at each k fall in 32 different banks (row stride 8 mod 32 banks, see kSimLd in
// similarity_tile.cuh): 8 (row % 4) + 2 (row % 16 / 4) + l % 2 + k, mod 32.
constexpr int kHalfRow = kColBlock / 2;
static_assert(kRowBlock == 16 * kWarps && kHalfRow == 64, "the rotation is for 16 rows x 2 halves per warp");
FASTCLIP_HOST_DEVICE int half_row(int thread) { return (thread / 32) * 16 + (thread % 32) / 2; }
FASTCLIP_HOST_DEVICE int half_row_col0(int thread) { return (thread % 2) * kHalfRow; }
FASTCLIP_HOST_DEVICE int half_row_col(int thread, int k) {
  const int r = (thread % 32) / 2, h = thread % 2;
  return h * kHalfRow + ((k + 2 * (r / 4) + h) & (kHalfRow - 1));
}

// The column pass of the forward kernels: threads 2c and 2c + 1 share column c, thread 2c + h taking rows
// col_pass_row(h, i), i = 0 .. 63: at each i the two rows are 2 apart (16 banks), so a warp's 16 columns x
// 2 rows are conflict-free.
constexpr int kColPassRows = kRowBlock / 2;
static_assert(kColBlock * 2 == kThreads, "two threads per column");
FASTCLIP_HOST_DEVICE int col_pass_row(int h, int i) { return 4 * (i / 2) + 2 * h + i % 2; }

}  // namespace layout
}  // namespace cuda
}  // namespace fastclip
