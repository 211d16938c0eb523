// The 16-bit similarity tile of kernels/similarity_tile.cuh, run on a CPU: every thread's copies, ldmatrix
// addresses and accumulator positions come from kernels/tile_layout.h, as in the kernel, while cp.async,
// ldmatrix.x4 and mma.sync.m16n8k16 are emulated from their definitions in the PTX ISA (fragment layouts
// written out here, independently of the layout header). A wrong address, swizzle or fragment position
// gives a wrong product, which tests/test_tile_emulation.py compares with float64 math.
// It also audits the layout: every tile entry is visited once by the forward kernels' row and column
// passes, and the shared-memory accesses it promises to be conflict-free are.
//
// usage: tile_emulation ROWS COLS DIM VECTORIZED IN OUT
//   IN: float32 image [ROWS, DIM] then text [COLS, DIM] (values representable in 16 bits);
//   OUT: float32 [ROWS, COLS], the dot products as the kernel's tiles leave them.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include "tile_layout.h"

using namespace fastclip::cuda;
using namespace fastclip::cuda::layout;

namespace {

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "layout error: %s\n", what.c_str());
  std::exit(1);
}

// One operand's ring of stages, element by element (the values the 16-bit stores would hold).
using Ring = std::vector<float>;  // kStages * kStageElems

// The kernel's copies of `step` into its slot, for every thread (StageSource::copy).
void copy_stage(Ring& ring, const std::vector<float>& m, long rows, long dim, long row0, int step, bool vectorized) {
  float* stage = ring.data() + (step % kStages) * kStageElems;
  const long k0 = static_cast<long>(step) * kStageDepth;
  for (int t = 0; t < kThreads; ++t) {
    if (vectorized) {
      for (int copy = 0; copy < kCopiesPerThread; ++copy) {
        const long row = row0 + copy_row(t, copy), k = k0 + copy_chunk(t, copy) * kChunkElems;
        const bool valid = row < rows && k < dim;
        for (int e = 0; e < kChunkElems; ++e)  // cp.async: 16 bytes, or zeros with src-size 0
          stage[copy_offset(t, copy) + e] = valid ? m[row * dim + k + e] : 0.f;
      }
    } else {
      const int r = scalar_copy_row(t);
      for (int e = 0; e < kScalarCopyElems; ++e) {
        const int f = scalar_copy_feature(t) + e;
        const bool valid = row0 + r < rows && k0 + f < dim;
        stage[stage_offset(r, f / kChunkElems) + f % kChunkElems] = valid ? m[(row0 + r) * dim + k0 + f] : 0.f;
      }
    }
  }
}

// ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8j .. 8j + 7 give the row addresses of matrix j; lane l gets,
// in its register j, elements 2 (l % 4) and 2 (l % 4) + 1 of row l / 4 of matrix j.
void ldmatrix_x4(const float* stage, const int (&address)[32], float (&regs)[32][4][2]) {
  for (int j = 0; j < 4; ++j)
    for (int lane = 0; lane < 32; ++lane) {
      const int row_start = address[8 * j + lane / 4];
      if (row_start % 8 != 0) fail("ldmatrix row address not 16-byte aligned");
      for (int e = 0; e < 2; ++e) regs[lane][j][e] = stage[row_start + 2 * (lane % 4) + e];
    }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: with g = lane / 4, t = lane % 4, A's registers hold
// (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); B's (k = 2t..2t+1, n = g), (k = 2t+8.., n = g);
// C/D's (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
void mma_16816(const float (&a)[32][4][2], const float (&b)[32][2][2], float (&d)[32][4]) {
  float A[16][16], B[16][8], D[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = a[lane][0][e], A[g + 8][2 * t + e] = a[lane][1][e];
      A[g][2 * t + 8 + e] = a[lane][2][e], A[g + 8][2 * t + 8 + e] = a[lane][3][e];
      B[2 * t + e][g] = b[lane][0][e], B[2 * t + 8 + e][g] = b[lane][1][e];
      D[g][2 * t + e] = d[lane][e], D[g + 8][2 * t + e] = d[lane][2 + e];
    }
  }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j)
      for (int k = 0; k < 16; ++k) D[i][j] += A[i][k] * B[k][j];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 2; ++e) d[lane][e] = D[g][2 * t + e], d[lane][2 + e] = D[g + 8][2 * t + e];
  }
}

// One 128 x 128 tile as similarity_tile16 computes it: [kRowBlock][kSimLd] floats.
std::vector<float> similarity_tile(const std::vector<float>& image, const std::vector<float>& text, long rows,
                                   long cols, long dim, long row0, long col0, bool vectorized) {
  Ring a_ring(kStages * kStageElems), b_ring(kStages * kStageElems);
  static float acc[kWarps][kWarpMTiles][kWarpNTiles][32][4];
  for (auto& w : acc)
    for (auto& i : w)
      for (auto& j : i)
        for (auto& l : j)
          for (float& q : l) q = 0.f;
  const int steps = static_cast<int>((dim + kStageDepth - 1) / kStageDepth);
  for (int step = 0; step < steps; ++step) {
    copy_stage(a_ring, image, rows, dim, row0, step, vectorized);
    copy_stage(b_ring, text, cols, dim, col0, step, vectorized);
    const float* a_stage = a_ring.data() + (step % kStages) * kStageElems;
    const float* b_stage = b_ring.data() + (step % kStages) * kStageElems;
    for (int warp = 0; warp < kWarps; ++warp)
      for (int s = 0; s < kStageDepth / kMmaK; ++s) {
        float a[kWarpMTiles][32][4][2], b[kWarpNTiles][32][2][2];
        for (int i = 0; i < kWarpMTiles; ++i) {
          int address[32];
          for (int lane = 0; lane < 32; ++lane)
            address[lane] = fragment_offset(a_fragment_base(warp, lane), i * kMmaM, s);
          ldmatrix_x4(a_stage, address, a[i]);
        }
        for (int j = 0; j < kWarpNTiles; j += 2) {
          int address[32];
          float pair[32][4][2];
          for (int lane = 0; lane < 32; ++lane)
            address[lane] = fragment_offset(b_fragment_base(warp, lane), j * kMmaN, s);
          ldmatrix_x4(b_stage, address, pair);
          for (int lane = 0; lane < 32; ++lane)
            for (int e = 0; e < 2; ++e) {
              b[j][lane][0][e] = pair[lane][0][e], b[j][lane][1][e] = pair[lane][1][e];
              b[j + 1][lane][0][e] = pair[lane][2][e], b[j + 1][lane][1][e] = pair[lane][3][e];
            }
        }
        for (int i = 0; i < kWarpMTiles; ++i)
          for (int j = 0; j < kWarpNTiles; ++j) mma_16816(a[i], b[j], acc[warp][i][j]);
      }
  }
  std::vector<float> sim(kRowBlock * kSimLd, NAN);
  for (int warp = 0; warp < kWarps; ++warp)
    for (int i = 0; i < kWarpMTiles; ++i)
      for (int j = 0; j < kWarpNTiles; ++j)
        for (int lane = 0; lane < 32; ++lane) {
          const float* q = acc[warp][i][j][lane];
          const int r = warp_row0(warp) + i * kMmaM + acc_row(lane, 0), c = warp_col0(warp) + j * kMmaN + acc_col(lane, 0);
          sim[r * kSimLd + c] = q[0], sim[r * kSimLd + c + 1] = q[1];
          sim[(r + 8) * kSimLd + c] = q[2], sim[(r + 8) * kSimLd + c + 1] = q[3];
        }
  return sim;
}

// 4-byte banks of shared memory: `words` (one per lane) must be 32 different banks.
void expect_distinct_banks(const std::vector<int>& words, const char* what) {
  std::set<int> banks;
  for (int w : words) banks.insert(w % 32);
  if (banks.size() != words.size()) fail(std::string(what) + ": bank conflict");
}

void audit_layout() {
  // ldmatrix: each matrix's 8 rows of 16 bytes in 8 different 16-byte bank groups, for every fragment.
  for (int warp = 0; warp < kWarps; ++warp)
    for (int s = 0; s < kStageDepth / kMmaK; ++s)
      for (int i = 0; i < kWarpMTiles; ++i)
        for (int operand = 0; operand < 2; ++operand)
          for (int j = 0; j < 4; ++j) {
            std::set<int> groups;
            for (int l = 8 * j; l < 8 * j + 8; ++l) {
              const int offset = operand == 0 ? fragment_offset(a_fragment_base(warp, l), i * kMmaM, s)
                                              : fragment_offset(b_fragment_base(warp, l), (i % 2) * 2 * kMmaN, s);
              groups.insert(offset / kChunkElems % 8);
            }
            if (groups.size() != 8) fail("ldmatrix: bank conflict");
          }
  // The accumulators' float2 stores: 16 lanes (one phase of a 64-bit store) cover 32 banks.
  for (int half = 0; half < 2; ++half) {
    std::vector<int> words;
    for (int lane = 16 * half; lane < 16 * half + 16; ++lane) {
      const int w = acc_row(lane, 0) * kSimLd + acc_col(lane, 0);
      words.push_back(w), words.push_back(w + 1);
    }
    expect_distinct_banks(words, "accumulator store");
  }
  // Forward row pass: every entry once; each warp's 32 reads at each k in 32 banks.
  std::vector<int> seen(kRowBlock * kColBlock, 0);
  for (int warp = 0; warp < kWarps; ++warp)
    for (int k = 0; k < kHalfRow; ++k) {
      std::vector<int> words;
      for (int lane = 0; lane < 32; ++lane) {
        const int t = 32 * warp + lane, r = half_row(t), c = half_row_col(t, k);
        if (c < half_row_col0(t) || c >= half_row_col0(t) + kHalfRow) fail("half row leaves its half");
        ++seen[r * kColBlock + c];
        words.push_back(r * kSimLd + c);
      }
      expect_distinct_banks(words, "row pass");
    }
  for (int count : seen)
    if (count != 1) fail("row pass does not visit every entry once");
  // Forward column pass: threads 2c, 2c + 1 cover rows 0 .. 127 of column c once; conflict-free per warp.
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < kColPassRows; ++i) seen[col_pass_row(h, i)] = 0;
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < kColPassRows; ++i) ++seen[col_pass_row(h, i)];
  for (int r = 0; r < kRowBlock; ++r)
    if (seen[r] != 1) fail("column pass does not visit every row once");
  for (int warp = 0; warp < kWarps; ++warp)
    for (int i = 0; i < kColPassRows; ++i) {
      std::vector<int> words;
      for (int lane = 0; lane < 32; ++lane) {
        const int t = 32 * warp + lane;
        words.push_back(col_pass_row(t & 1, i) * kSimLd + (t >> 1));
      }
      expect_distinct_banks(words, "column pass");
    }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s ROWS COLS DIM VECTORIZED IN OUT\n", argv[0]);
    return 2;
  }
  const long rows = std::atol(argv[1]), cols = std::atol(argv[2]), dim = std::atol(argv[3]);
  const bool vectorized = std::atoi(argv[4]) != 0;
  if (vectorized && dim % kChunkElems != 0) fail("the vectorized copies need whole 16-byte chunks");
  audit_layout();
  std::vector<float> image(rows * dim), text(cols * dim), out(rows * cols);
  FILE* in = std::fopen(argv[5], "rb");
  if (!in || std::fread(image.data(), 4, image.size(), in) != image.size() ||
      std::fread(text.data(), 4, text.size(), in) != text.size())
    fail("cannot read the inputs");
  std::fclose(in);
  for (long row0 = 0; row0 < rows; row0 += kRowBlock)
    for (long col0 = 0; col0 < cols; col0 += kColBlock) {
      const std::vector<float> sim = similarity_tile(image, text, rows, cols, dim, row0, col0, vectorized);
      for (long r = row0; r < rows && r < row0 + kRowBlock; ++r)
        for (long c = col0; c < cols && c < col0 + kColBlock; ++c)
          out[r * cols + c] = sim[(r - row0) * kSimLd + (c - col0)];
    }
  FILE* o = std::fopen(argv[6], "wb");
  if (!o || std::fwrite(out.data(), 4, out.size(), o) != out.size()) fail("cannot write the output");
  std::fclose(o);
  return 0;
}
