// The CPU twin of the chunked path's CUDA epilogue (chunked/chunked_loss.h): the same units of work and
// arithmetic, so that the device-agnostic driver runs on CPU tensors and the CPU tests check it.
#pragma once

#include "chunked/chunked_loss.h"

namespace fastclip {

const chunked::Epilogue& cpu_chunk_epilogue();

}  // namespace fastclip
