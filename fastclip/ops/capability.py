"""Which CUDA GPUs fastclip's fused kernels run on: one rule for the CUDA loss kernels and the Triton attention."""

from __future__ import annotations

import torch

# bf16 and TF32 tensor cores, which the CUDA loss kernels and the Triton attention's bf16 dots need
# (A100 = 8.0). Newer GPUs than the built architectures run the kernels from the PTX the build embeds.
MIN_CAPABILITY = (8, 0)


def capability(device: torch.device) -> tuple[int, int]:
    """The compute capability (major, minor) of CUDA `device`."""
    return tuple(torch.cuda.get_device_capability(device))


@torch.compiler.assume_constant_result  # fixed per GPU: torch.compile evaluates it at trace time
def _supported(index: int) -> bool:
    return capability(torch.device("cuda", index)) >= MIN_CAPABILITY


def supports_fused_kernels(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU that the fused kernels support (compute capability >= 8.0)."""
    if device.type != "cuda":
        return False
    return _supported(torch.cuda.current_device() if device.index is None else device.index)


def unsupported_reason(device: torch.device) -> str:
    major, minor = capability(device)
    wanted = ".".join(map(str, MIN_CAPABILITY))
    return f"{device} has compute capability {major}.{minor}; the fused kernels need {wanted} or newer (bf16/TF32 tensor cores)"
