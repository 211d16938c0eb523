// The device-agnostic driver of the chunked path (chunked_loss.h): chunk planning, the GEMMs, the masked
// diagonal's offset in each chunk, and the merges of the epilogue's partials.
#include "chunked/chunked_loss.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "chunked/chunk_blocks.h"
#include "common.h"

namespace fastclip {
namespace chunked {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// A diagonal that misses the n x N matrix altogether masks nothing; dropping it keeps every offset the
// epilogue sees (d + r0 - c0) far from int64 overflow: |d| < n + N.
std::optional<int64_t> effective_diagonal(std::optional<int64_t> d, int64_t n, int64_t N) {
  if (d && *d > -n && *d < N) return d;
  return std::nullopt;
}

// The mask in a chunk or block whose first entry is (r0, c0) of the matrix: local (i, j) is (r0 + i,
// c0 + j), so j == i + d + r0 - c0.
std::optional<int64_t> local_diagonal(std::optional<int64_t> d, int64_t r0, int64_t c0) {
  if (!d) return std::nullopt;
  return *d + r0 - c0;
}

// Fold partials (max, sum) [k, cols] into running (max, sum) [cols], in place. A max of -inf (nothing
// seen yet, or every entry masked) shifts by 0 instead, so that no -inf - -inf turns into NaN.
void merge_into(at::Tensor& run_max, at::Tensor& run_sum, const at::Tensor& part_max, const at::Tensor& part_sum) {
  const auto m = at::maximum(run_max, std::get<0>(part_max.max(0)));
  const auto shift = at::where(m == kNegInf, at::zeros_like(m), m);
  run_sum = run_sum * (run_max - shift).exp() + (part_sum * (part_max - shift).exp()).sum(0);
  run_max = m;
}

// What every backward block reads besides its dots: both log-sum-exps' upstream gradients and values
// (accumulation dtype), the scale, the whole matrix's masked diagonal and the fp16 tile scaling.
struct BackwardInputs {
  at::Tensor grad_row, row_lse, grad_col, col_lse, scale;
  std::optional<int64_t> diagonal;
  std::optional<TileScaling> scaling;
};

// Set the fields of `c` that both backward ops share, for block `b`, and return its epilogue grid.
EpilogueGrid set_backward_chunk(BackwardChunk& c, const BlockSpan& b, const BackwardInputs& in,
                                at::Tensor& scratch, int64_t target_units) {
  const auto grid = plan_epilogue(b.rows, b.cols, target_units);
  static_cast<Dots&>(c) =
      Dots{block_dots(scratch, b.image, b.text), in.scale, local_diagonal(in.diagonal, b.r0, b.c0), grid};
  c.grad_row = in.grad_row.narrow(0, b.r0, b.rows), c.row_lse = in.row_lse.narrow(0, b.r0, b.rows);
  c.grad_col = in.grad_col.narrow(0, b.c0, b.cols), c.col_lse = in.col_lse.narrow(0, b.c0, b.cols);
  c.grad_tile = b.grad_tile;
  if (in.scaling) c.tile_scale = in.scaling->factor;
  c.scale_partial = at::empty({grid.units()}, in.scale.options());
  return grid;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> contrastive_lse(const at::Tensor& image, const at::Tensor& text,
                                                   const at::Tensor& logit_scale,
                                                   std::optional<int64_t> masked_diagonal, const Epilogue& epilogue,
                                                   int64_t budget_bytes) {
  const auto img = image.detach().contiguous(), txt = text.detach().contiguous();
  const auto acc_type = accumulate_type_of(img);
  const auto acc = img.options().dtype(acc_type);
  const int64_t n = img.size(0), N = txt.size(0);
  const auto diagonal = effective_diagonal(masked_diagonal, n, N);
  const auto scale = as_acc(logit_scale, acc_type).reshape({});

  auto row_lse = at::empty({n}, acc);
  auto col_max = at::full({N}, kNegInf, acc), col_sum = at::zeros({N}, acc);
  const int64_t chunk = rows_per_chunk(n, static_cast<int64_t>(c10::elementSize(acc_type)) * N, kChunkRows, budget_bytes);
  at::Tensor scratch;
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    const auto grid = plan_epilogue(rows, N, epilogue.target_units(img));
    ForwardChunk c;
    static_cast<Dots&>(c) = Dots{block_dots(scratch, img.narrow(0, r0, rows), txt), scale,
                                 local_diagonal(diagonal, r0, 0), grid};
    c.row_max = at::empty({grid.col_tiles, rows}, acc), c.row_sum = at::empty_like(c.row_max);
    c.col_max = at::empty({grid.row_splits, N}, acc), c.col_sum = at::empty_like(c.col_max);
    epilogue.forward(c);
    // A fully masked row has only (-inf, 0) partials: merge_partial_lse gives -inf, not NaN.
    row_lse.narrow(0, r0, rows).copy_(merge_partial_lse(c.row_max, c.row_sum, 0));
    merge_into(col_max, col_sum, c.col_max, c.col_sum);
  }
  return {row_lse, merge_partial_lse(col_max.unsqueeze(0), col_sum.unsqueeze(0), 0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_lse_backward(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& logit_scale, const at::Tensor& row_lse, const at::Tensor& col_lse,
    std::optional<int64_t> masked_diagonal, const Epilogue& epilogue, int64_t budget_bytes) {
  const auto img = image.detach().contiguous(), txt = text.detach().contiguous();
  const auto acc_type = accumulate_type_of(img);
  const auto gr = as_acc(grad_row, acc_type), gc = as_acc(grad_col, acc_type);
  const auto rl = as_acc(row_lse, acc_type), cl = as_acc(col_lse, acc_type);
  const auto scale = as_acc(logit_scale, acc_type).reshape({});
  const auto diagonal = effective_diagonal(masked_diagonal, img.size(0), txt.size(0));

  BackwardInputs in{gr, rl, gc, cl, scale, diagonal, std::nullopt};
  // |s * G_ij| = |s| * |gr_i * P_row + gc_j * P_col| <= |s| * (max |gr| + max |gc|), as P_row, P_col <= 1.
  if (img.scalar_type() == at::kHalf) in.scaling = fp16_tile_scaling(scale.abs() * (gr.abs().max() + gc.abs().max()));
  at::Tensor scratch;
  std::vector<at::Tensor> partials;
  const auto fill = [&](const BlockSpan& b) {
    BackwardChunk c;
    set_backward_chunk(c, b, in, scratch, epilogue.target_units(img));
    epilogue.lse_backward(c);
    partials.push_back(c.scale_partial);
  };
  auto [grad_img, grad_txt] = backward_through_blocks(img, txt, in.scaling, backward_budget(img, budget_bytes), fill);
  // grad_logit_scale = sum(G * S) / s = sum(G * dot), summed in double in a fixed order (deterministic).
  auto grad_scale = at::cat(partials).sum(at::kDouble).to(logit_scale.scalar_type()).reshape(logit_scale.sizes());
  return {grad_img, grad_txt, grad_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_backward(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& grad_positive,
    const at::Tensor& grad_uniform, const at::Tensor& grad_pair, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& logit_scale, const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& row_ids,
    const at::Tensor& col_ids, const at::Tensor& partner, std::optional<int64_t> masked_diagonal,
    const Epilogue& epilogue, int64_t budget_bytes) {
  const auto img = image.detach().contiguous(), txt = text.detach().contiguous();
  const auto acc_type = accumulate_type_of(img);
  const auto acc = img.options().dtype(acc_type);
  const auto gr = as_acc(grad_row, acc_type), gc = as_acc(grad_col, acc_type);
  const auto gp = as_acc(grad_positive, acc_type), ge = as_acc(grad_pair, acc_type);
  const auto gu = as_acc(grad_uniform, acc_type).reshape({});
  const auto rl = as_acc(row_lse, acc_type), cl = as_acc(col_lse, acc_type);
  const auto scale = as_acc(logit_scale, acc_type).reshape({});
  const auto rid = row_ids.contiguous(), cid = col_ids.contiguous(), pid = partner.contiguous();
  const int64_t n = img.size(0), N = txt.size(0);
  const auto diagonal = effective_diagonal(masked_diagonal, n, N);
  auto row_rest = at::zeros({n}, acc), col_rest = at::zeros({N}, acc), pair_dot = at::zeros({n}, acc);

  BackwardInputs in{gr, rl, gc, cl, scale, diagonal, std::nullopt};
  // |s * G_ij| <= |s| * (max |gr| + max |gc| + max |gp| + |gu|), as P_row, P_col <= 1.
  if (img.scalar_type() == at::kHalf)
    in.scaling = fp16_tile_scaling(scale.abs() * (gr.abs().max() + gc.abs().max() + gp.abs().max() + gu.abs()));
  at::Tensor scratch;
  std::vector<at::Tensor> partials;
  const auto fill = [&](const BlockSpan& b) {
    LossChunk c;
    const auto grid = set_backward_chunk(c, b, in, scratch, epilogue.target_units(img));
    c.grad_positive = gp.narrow(0, b.r0, b.rows), c.grad_uniform = gu;
    c.row_ids = rid.narrow(0, b.r0, b.rows), c.col_ids = cid.narrow(0, b.c0, b.cols);
    c.partner = pid.narrow(0, b.r0, b.rows), c.col_offset = b.c0;
    c.row_rest = at::empty({grid.col_tiles, b.rows}, acc), c.col_rest = at::empty({grid.row_splits, b.cols}, acc);
    c.pair_dot = pair_dot.narrow(0, b.r0, b.rows);
    epilogue.loss_backward(c);
    partials.push_back(c.scale_partial);
    row_rest.narrow(0, b.r0, b.rows).add_(c.row_rest.sum(0));
    col_rest.narrow(0, b.c0, b.cols).add_(c.col_rest.sum(0));
  };
  auto [grad_img, grad_txt] =
      backward_through_blocks(img, txt, in.scaling, backward_budget(img, budget_bytes), fill, /*keep_fp32=*/true);
  auto grad_scale = at::cat(partials).sum(at::kDouble);
  // 16-bit features promote to the accumulation dtype inside (row by row), no whole upcast copy.
  grad_scale += add_pair_entries(img, txt, scale, gr, gc, ge, pid, row_rest, col_rest, pair_dot, grad_img, grad_txt);
  // Unrounded (accumulation dtype): the caller rounds each gradient once, after any sums of its own.
  return {grad_img, grad_txt, grad_scale.to(acc_type)};
}

}  // namespace chunked
}  // namespace fastclip
