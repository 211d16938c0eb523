// The CUDA epilogue of the chunked path (chunked/chunked_loss.h): the kernels of
// kernels/chunked_epilogue.cu behind the device-agnostic driver's interface.
#pragma once

#include "chunked/chunked_loss.h"

namespace fastclip {

const chunked::Epilogue& cuda_chunk_epilogue();

}  // namespace fastclip
