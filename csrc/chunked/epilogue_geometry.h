// How the chunked path's epilogue splits one chunk of similarities ([rows, cols], fp32) into units of
// work: plain C++, shared by the CUDA kernels (kernels/chunked_epilogue.cu) and their CPU twin
// (cpu/chunked_epilogue_cpu.cpp), so that both produce the same partials.
//
// A unit is one warp: a tile of kTileCols columns of one row split. Its 32 lanes each own kColsPerLane
// columns of the tile (two runs of four, read as 16-byte vectors: a warp reads 512 contiguous bytes per
// run), and it walks the split's rows one at a time:
//  - a column is owned by one lane of one unit per split: its running (max, sum) needs no atomics, and
//    the splits' partials are merged on the host ([row_splits, cols] per chunk, a small merge);
//  - a row's partial over the tile is a warp reduction; the tiles' partials ([col_tiles, rows]) are merged
//    on the host.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastclip {
namespace chunked {

constexpr int kLanes = 32;
constexpr int kVector = 4;                            // floats per 16-byte load
constexpr int kColsPerLane = 2 * kVector;             // two vectors per lane and row
constexpr int kTileCols = kLanes * kColsPerLane;      // 256 columns per unit
constexpr int kWarpsPerCta = 8;                       // units per CTA (they share nothing)
constexpr int64_t kMinRowsPerSplit = 16;              // below this a split's partials cost more than its rows

// The column of lane `lane`'s k-th value (k < kColsPerLane) in a tile: two runs of 4 x 32 columns.
inline constexpr int tile_column(int lane, int k) {
  return (k / kVector) * (kLanes * kVector) + lane * kVector + k % kVector;
}

struct EpilogueGrid {
  int64_t col_tiles;       // ceil(cols / kTileCols)
  int64_t row_splits;      // splits of the chunk's rows
  int64_t rows_per_split;  // the last split may have fewer
  int64_t units() const { return col_tiles * row_splits; }
  int64_t split_begin(int64_t split) const { return split * rows_per_split; }
};

// Enough row splits that about `target_units` units run (a GPU wants several warps per core to hide
// memory latency; a CPU one unit per thread or more), never splits of fewer than kMinRowsPerSplit rows.
inline EpilogueGrid plan_epilogue(int64_t rows, int64_t cols, int64_t target_units) {
  const int64_t col_tiles = (cols + kTileCols - 1) / kTileCols;
  const int64_t max_splits = std::max<int64_t>(1, rows / kMinRowsPerSplit);
  const int64_t wanted = std::max<int64_t>(1, (target_units + col_tiles - 1) / col_tiles);
  const int64_t splits = std::min(wanted, max_splits);
  const int64_t per_split = (rows + splits - 1) / splits;
  return {col_tiles, (rows + per_split - 1) / per_split, per_split};  // no empty split
}

}  // namespace chunked
}  // namespace fastclip
