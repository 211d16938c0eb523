// CPU implementation of fastclip::pairwise_sigmoid (SigLIP's loss, row by row) and its backward.
//
// For L = s * image @ text^T + b and z_ij = +1 where the labels agree (-1 elsewhere):
//  - forward: rows in blocks (in parallel) sweep the dot-product tiles, summing softplus(-z * L) per row;
//  - backward: per chunk of rows, the gradient tile G = -g_i * z * sigmoid(-z * L), then two GEMMs.
// The tiles come from the machinery shared with contrastive_lse (tile_sweep_cpu.h); nothing N x N is
// stored. Positives are decided inside the tile, so each term is computed directly in its stable form.
// pairwise_sigmoid_with_grad runs the chunked path's one pass (chunked/chunked_sigmoid.h) with its CPU
// epilogue.
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "chunked/chunked_sigmoid.h"
#include "chunked/loss_path.h"
#include "cpu/chunked_epilogue_cpu.h"
#include "cpu/tile_sweep_cpu.h"
#include "ops/pairwise_sigmoid.h"

namespace fastclip {
namespace {

// softplus(u) = log(1 + e^u), without overflow for large u or loss of precision for very negative u.
template <typename T>
inline T softplus(T u) {
  return std::max(u, T(0)) + std::log1p(std::exp(-std::abs(u)));
}

template <typename T>
inline T sigmoid(T u) {
  const T e = std::exp(-std::abs(u));  // in (0, 1]: no overflow for either sign
  return u >= 0 ? 1 / (1 + e) : e / (1 + e);
}

struct Labels {
  const int64_t* rows;
  const int64_t* cols;
  // z_ij as +1 / -1
  template <typename T>
  T sign(int64_t i, int64_t j) const { return rows[i] == cols[j] ? T(1) : T(-1); }
};

template <typename acc_t>
void forward_rows(const at::Tensor& img, const at::Tensor& txt, acc_t scale, acc_t bias, Labels labels,
                  acc_t* row_loss) {
  cpu::sweep_row_blocks<acc_t>(img, txt, 0, img.size(0), static_cast<acc_t*>(nullptr), [&](int64_t, int64_t r0, int64_t rows, auto visit_tiles) {
    double sums[cpu::kMaxRowBlock] = {};  // double: a row sums N terms
    visit_tiles([&](int64_t c0, int64_t tc, const acc_t* tile) {
      for (int64_t i = 0; i < rows; ++i) {
        acc_t sum = 0;
        for (int64_t j = 0; j < tc; ++j)
          sum += softplus(-labels.sign<acc_t>(r0 + i, c0 + j) * (scale * tile[i * tc + j] + bias));
        sums[i] += sum;
      }
    });
    for (int64_t i = 0; i < rows; ++i) row_loss[r0 + i] = static_cast<acc_t>(sums[i]);
  });
}

template <typename acc_t>
void backward_chunk(const at::Tensor& img, const at::Tensor& txt, acc_t scale, acc_t bias, Labels labels,
                    const acc_t* grad_row, int64_t row_begin, int64_t row_end, acc_t* grad_tile, double* dot_partial,
                    double* sum_partial) {
  const int64_t cols = txt.size(0);
  cpu::sweep_row_blocks<acc_t>(img, txt, row_begin, row_end, grad_tile, [&](int64_t b, int64_t r0, int64_t rows, auto visit_tiles) {
    double g_dot = 0, g_sum = 0;  // partials of the logit_scale and logit_bias gradients
    visit_tiles([&](int64_t c0, int64_t tc, const acc_t* tile) {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = r0 + i;
        acc_t* g_row = grad_tile + (r - row_begin) * cols + c0;
        for (int64_t j = 0; j < tc; ++j) {
          const acc_t dot = tile[i * tc + j], z = labels.sign<acc_t>(r, c0 + j);
          const acc_t g = -grad_row[r] * z * sigmoid(-z * (scale * dot + bias));
          g_row[j] = g;
          g_dot += g * dot;
          g_sum += g;
        }
      }
    });
    dot_partial[b] = g_dot, sum_partial[b] = g_sum;
  });
}

std::tuple<at::Tensor, at::Tensor> prepared(const at::Tensor& image, const at::Tensor& text) {
  // Detached: the GEMMs run in parallel_for worker threads, which do not inherit grad mode.
  const auto acc_type = cpu::accumulate_type(image.scalar_type());
  return {image.detach().to(acc_type).contiguous(), text.detach().to(acc_type).contiguous()};
}

at::Tensor pairwise_sigmoid_cpu(const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
                                const at::Tensor& logit_bias, const at::Tensor& row_labels,
                                const at::Tensor& col_labels) {
  check_sigmoid_inputs(image, text, logit_scale, logit_bias, row_labels, col_labels);
  const auto [img, txt] = prepared(image, text);
  const auto rl = row_labels.contiguous(), cl = col_labels.contiguous();
  auto row_loss = at::empty({img.size(0)}, img.options());
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "pairwise_sigmoid_cpu", [&] {
    forward_rows<scalar_t>(img, txt, static_cast<scalar_t>(logit_scale.item<double>()),
                           static_cast<scalar_t>(logit_bias.item<double>()),
                           Labels{rl.data_ptr<int64_t>(), cl.data_ptr<int64_t>()}, row_loss.data_ptr<scalar_t>());
  });
  return row_loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_sigmoid_backward_cpu(
    const at::Tensor& grad_row_loss, const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
    const at::Tensor& logit_bias, const at::Tensor& row_labels, const at::Tensor& col_labels) {
  check_sigmoid_inputs(image, text, logit_scale, logit_bias, row_labels, col_labels);
  check_sigmoid_backward_inputs(grad_row_loss, image);
  const auto [img, txt] = prepared(image, text);
  const auto gr = grad_row_loss.to(img.scalar_type()).contiguous();
  const auto rl = row_labels.contiguous(), cl = col_labels.contiguous();
  auto grad_img = at::empty_like(img), grad_txt = at::zeros_like(txt);
  at::Tensor grad_scale, grad_bias;
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "pairwise_sigmoid_backward_cpu", [&] {
    const auto scale = static_cast<scalar_t>(logit_scale.item<double>());
    const auto bias = static_cast<scalar_t>(logit_bias.item<double>());
    const Labels labels{rl.data_ptr<int64_t>(), cl.data_ptr<int64_t>()};
    std::vector<double> dot_partials, sum_partials;
    cpu::backward_through_gradient_tiles<scalar_t>(img, txt, scale, grad_img, grad_txt, [&](int64_t r0, int64_t r1, scalar_t* g) {
      std::vector<double> dots(cpu::row_blocks(r1 - r0)), sums(dots.size());
      backward_chunk<scalar_t>(img, txt, scale, bias, labels, gr.data_ptr<scalar_t>(), r0, r1, g, dots.data(), sums.data());
      dot_partials.insert(dot_partials.end(), dots.begin(), dots.end());
      sum_partials.insert(sum_partials.end(), sums.begin(), sums.end());
    });
    grad_scale = at::full_like(logit_scale, cpu::ordered_sum(dot_partials));
    grad_bias = at::full_like(logit_bias, cpu::ordered_sum(sum_partials));
  });
  return {grad_img.to(image.scalar_type()), grad_txt.to(text.scalar_type()), grad_scale, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_sigmoid_with_grad_cpu(
    const at::Tensor& grad_row_loss, const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
    const at::Tensor& logit_bias, const at::Tensor& row_labels, const at::Tensor& col_labels) {
  check_sigmoid_inputs(image, text, logit_scale, logit_bias, row_labels, col_labels);
  check_sigmoid_backward_inputs(grad_row_loss, image);
  // In the accumulation dtype throughout: the CPU's GEMMs take fp32 operands anyway, so a 16-bit gradient
  // tile (the GPU's tensor-core input) would only round G.
  const auto [img, txt] = prepared(image, text);
  return chunked::pairwise_sigmoid_with_grad(grad_row_loss, img, txt, logit_scale, logit_bias, row_labels,
                                             col_labels, cpu_chunk_epilogue(),
                                             chunk_budget_bytes(cpu::scratch_budget_bytes(text.size(0))));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CPU, m) {
  m.impl("pairwise_sigmoid", &pairwise_sigmoid_cpu);
  m.impl("pairwise_sigmoid_backward", &pairwise_sigmoid_backward_cpu);
  m.impl("pairwise_sigmoid_with_grad", &pairwise_sigmoid_with_grad_cpu);
}

}  // namespace fastclip
