// The device-agnostic driver of pairwise_sigmoid_with_grad's chunked path (chunked_sigmoid.h).
#include "chunked/chunked_sigmoid.h"

#include <optional>
#include <vector>

#include "chunked/chunk_blocks.h"

namespace fastclip {
namespace chunked {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_sigmoid_with_grad(
    const at::Tensor& grad_row, const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
    const at::Tensor& logit_bias, const at::Tensor& row_labels, const at::Tensor& col_labels,
    const Epilogue& epilogue, int64_t budget_bytes) {
  const auto img = image.detach().contiguous(), txt = text.detach().contiguous();
  const auto acc_type = accumulate_type_of(img);
  const auto g = as_acc(grad_row, acc_type);
  const auto scale = as_acc(logit_scale, acc_type).reshape({}), bias = as_acc(logit_bias, acc_type).reshape({});
  const auto rl = row_labels.contiguous(), cl = col_labels.contiguous();
  auto row_loss = at::zeros({img.size(0)}, img.options().dtype(acc_type));

  std::optional<TileScaling> scaling;
  // |s * G_ij| = |s| * |g_i| * sigmoid(-z L) <= |s| * max |g|, as a sigmoid is at most 1.
  if (img.scalar_type() == at::kHalf) scaling = fp16_tile_scaling(scale.abs() * g.abs().max());
  at::Tensor scratch;
  std::vector<at::Tensor> scale_partials, bias_partials;
  const auto fill = [&](const BlockSpan& b) {
    SigmoidChunk c;
    const auto grid = plan_epilogue(b.rows, b.cols, epilogue.target_units(img));
    static_cast<Dots&>(c) = Dots{block_dots(scratch, b.image, b.text), scale, std::nullopt, grid};
    c.bias = bias, c.grad_row = g.narrow(0, b.r0, b.rows);
    c.row_labels = rl.narrow(0, b.r0, b.rows), c.col_labels = cl.narrow(0, b.c0, b.cols);
    c.grad_tile = b.grad_tile;
    if (scaling) c.tile_scale = scaling->factor;
    c.row_loss = at::empty({grid.col_tiles, b.rows}, scale.options());
    c.scale_partial = at::empty({grid.units()}, scale.options()), c.bias_partial = at::empty_like(c.scale_partial);
    epilogue.sigmoid(c);
    row_loss.narrow(0, b.r0, b.rows).add_(c.row_loss.sum(0));
    scale_partials.push_back(c.scale_partial), bias_partials.push_back(c.bias_partial);
  };
  auto [grad_img, grad_txt] =
      backward_through_blocks(img, txt, scaling, backward_budget(img, budget_bytes), fill, /*keep_fp32=*/true);
  // Summed in double in a fixed order: deterministic whatever the blocks.
  const auto total = [&](const std::vector<at::Tensor>& parts) { return at::cat(parts).sum(at::kDouble).to(acc_type); };
  return {row_loss, grad_img, grad_txt, total(scale_partials), total(bias_partials)};
}

}  // namespace chunked
}  // namespace fastclip
