// The CUDA epilogue of the chunked path (chunked_epilogue_cuda.h): each call turns the driver's tensors
// into the raw arguments of one kernel of kernels/chunked_epilogue.cu, launched on the current stream.
// The driver holds the device guard; the dots are fp32 (CUDA features are fp32, bf16 or fp16).
#include "cuda/chunked_epilogue_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "chunked_epilogue.cuh"
#include "cuda/cuda_glue.h"

namespace fastclip {
namespace {

constexpr const char* kOp = "contrastive_lse (chunked)";

cuda::ChunkShape shape_of(const chunked::Dots& d) {
  cuda::ChunkShape s{};
  s.dots = d.dots.data_ptr<float>();
  s.rows = d.dots.size(0), s.cols = d.dots.size(1);
  s.scale = d.scale.data_ptr<float>();
  s.mask_diagonal = d.diagonal.has_value();
  s.diagonal = d.diagonal.value_or(0);
  s.col_tiles = d.grid.col_tiles, s.row_splits = d.grid.row_splits, s.rows_per_split = d.grid.rows_per_split;
  return s;
}

cuda::ChunkBackwardArgs backward_args(const chunked::BackwardChunk& c) {
  cuda::ChunkBackwardArgs a{};
  a.shape = shape_of(c);
  a.grad_row = c.grad_row.data_ptr<float>(), a.row_lse = c.row_lse.data_ptr<float>();
  a.grad_col = c.grad_col.data_ptr<float>(), a.col_lse = c.col_lse.data_ptr<float>();
  a.grad_tile = c.grad_tile.data_ptr();
  a.tile_scale = c.tile_scale ? c.tile_scale->data_ptr<float>() : nullptr;
  a.scale_partial = c.scale_partial.data_ptr<float>();
  return a;
}

class CudaEpilogue final : public chunked::Epilogue {
 public:
  // Every warp of every core resident once, about: enough loads in flight to stream the dots at full
  // memory bandwidth, while each unit still walks many rows (the column states stay in registers).
  int64_t target_units(const at::Tensor& like) const override {
    return 32 * glue::device_attribute(cudaDevAttrMultiProcessorCount, like.get_device());
  }

  void forward(const chunked::ForwardChunk& c) const override {
    cuda::ChunkForwardArgs a{};
    a.shape = shape_of(c);
    a.row_max = c.row_max.data_ptr<float>(), a.row_sum = c.row_sum.data_ptr<float>();
    a.col_max = c.col_max.data_ptr<float>(), a.col_sum = c.col_sum.data_ptr<float>();
    C10_CUDA_CHECK(cuda::launch_chunk_forward(a, c10::cuda::getCurrentCUDAStream()));
  }

  void lse_backward(const chunked::BackwardChunk& c) const override {
    C10_CUDA_CHECK(cuda::launch_chunk_backward(glue::element_type(c.grad_tile, kOp), backward_args(c),
                                               c10::cuda::getCurrentCUDAStream()));
  }

  void loss_backward(const chunked::LossChunk& c) const override {
    cuda::ChunkLossArgs a{};
    a.base = backward_args(c);
    a.grad_positive = c.grad_positive.data_ptr<float>(), a.grad_uniform = c.grad_uniform.data_ptr<float>();
    a.row_ids = c.row_ids.data_ptr<int64_t>(), a.col_ids = c.col_ids.data_ptr<int64_t>();
    a.partner = c.partner.data_ptr<int64_t>(), a.col_offset = c.col_offset;
    a.row_rest = c.row_rest.data_ptr<float>(), a.col_rest = c.col_rest.data_ptr<float>();
    a.pair_dot = c.pair_dot.data_ptr<float>();
    C10_CUDA_CHECK(cuda::launch_chunk_loss_backward(glue::element_type(c.grad_tile, kOp), a,
                                                    c10::cuda::getCurrentCUDAStream()));
  }

  void sigmoid(const chunked::SigmoidChunk& c) const override {
    cuda::ChunkSigmoidArgs a{};
    a.shape = shape_of(c);
    a.bias = c.bias.data_ptr<float>(), a.grad_row = c.grad_row.data_ptr<float>();
    a.row_labels = c.row_labels.data_ptr<int64_t>(), a.col_labels = c.col_labels.data_ptr<int64_t>();
    a.grad_tile = c.grad_tile.data_ptr();
    a.tile_scale = c.tile_scale ? c.tile_scale->data_ptr<float>() : nullptr;
    a.row_loss = c.row_loss.data_ptr<float>();
    a.scale_partial = c.scale_partial.data_ptr<float>(), a.bias_partial = c.bias_partial.data_ptr<float>();
    C10_CUDA_CHECK(cuda::launch_chunk_sigmoid(glue::element_type(c.grad_tile, "pairwise_sigmoid_with_grad"), a,
                                              c10::cuda::getCurrentCUDAStream()));
  }
};

}  // namespace

const chunked::Epilogue& cuda_chunk_epilogue() {
  static const CudaEpilogue epilogue;
  return epilogue;
}

}  // namespace fastclip
