"""What fastclip has built and can use here: `fastclip.info()` / `python -m fastclip info`."""

from __future__ import annotations

import platform

import torch

from fastclip import _extension
from fastclip.version import __version__


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def info() -> dict:
    """Versions, the compiled extension's state, and which backend each op can use on this machine."""
    cuda_device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "fastclip": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "cuda_device": cuda_device,
        "extension_loaded": _extension.is_loaded(),
        "extension_error": _extension.load_error(),
        **{op: _compiled_op_state(op, cuda_device) for op in ("contrastive_lse", "pairwise_sigmoid")},
        "attention": {
            "triton": _triton_attention_state(cuda_device),
            "torch": "usable (SDPA)",
        },
    }


def _compiled_op_state(op: str, cuda_device: str | None) -> dict[str, str]:
    """Which backends of the compiled op `op` can run here."""
    cpu_kernel, cuda_kernel = _extension.has_kernel(op, "CPU"), _extension.has_kernel(op, "CUDA")
    return {
        "cuda": "usable" if cuda_kernel and cuda_device else ("built, no GPU" if cuda_kernel else "not built"),
        "cpp": "usable" if cpu_kernel else "not built",
        "torch": "usable",
    }


def _triton_attention_state(cuda_device: str | None) -> str:
    from fastclip.backends import triton_available, triton_interpreting

    if not triton_available():
        return "Triton not installed"
    if cuda_device:
        return "usable"
    return "interpreter (TRITON_INTERPRET=1, CPU tensors)" if triton_interpreting() else "no GPU"


def format_info(report: dict) -> str:
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {name:<8} {state}" for name, state in value.items()]
        else:
            lines.append(f"{key:<18} {value}")
    return "\n".join(lines)
