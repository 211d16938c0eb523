"""Which backend runs each fastclip op: backend names, what is built and usable here, the GPU rule, dtype names.

The one place these facts live; the ops, the models, the command line and the benchmarks ask this module.

- Loss ops (`contrastive_lse`, `pairwise_sigmoid` and the losses built on them): "cuda" (the fused CUDA
  kernels, CUDA tensors), "cpp" (the C++ CPU kernels), "torch" (tiled PyTorch, any device). "auto" takes
  the CUDA kernel for CUDA tensors on a supported GPU when it is built, the C++ kernel for CPU tensors
  where `CPU_AUTO` says the CPU benchmark found it faster and it is built, else "torch".
- Attention: "triton" (the fused Triton kernels) and "torch" (SDPA). "auto" takes Triton for CUDA tensors
  on a supported GPU when Triton imports and the kernels cover the inputs (fp16/bf16, head dim <= 128).
- Supported GPU: compute capability 8.0 or newer (bf16 and TF32 tensor cores).
Forcing a backend that cannot run raises, saying why; nothing falls back silently.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from fastclip import _extension

LOSS_BACKENDS = ("auto", "cuda", "cpp", "torch")
ATTENTION_BACKENDS = ("auto", "triton", "torch")

# The backend "auto" takes for CPU tensors, per loss op, when the extension is built: the faster path
# of `bench_loss --device cpu` (fp32, D = 512, N = 1024-16384; benchmarks/results/cpu-2core/): for CLIP
# (bench_loss_fused.json) the C++ op ahead of the tiled PyTorch path or within 2% of it at every N; for
# SigLIP's one pass (bench_loss_siglip.json) the C++ op 1.0-1.3x the PyTorch path's speed at 26-72% of
# its memory. Ops not listed (pairwise_sigmoid alone: a forward without gradient, not compared) take the
# tiled PyTorch path.
CPU_AUTO = {"contrastive_lse": "cpp", "pairwise_sigmoid_with_grad": "cpp"}

# bf16 and TF32 tensor cores, which the CUDA loss kernels and the Triton attention's bf16 dots need
# (A100 = 8.0). Newer GPUs than the built architectures run the kernels from the PTX the build embeds.
MIN_CAPABILITY = (8, 0)

TRITON_DTYPES = (torch.float16, torch.bfloat16)  # on a GPU: fp32 kernels spill registers at every tile size
INTERPRETER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # CPU tensors under TRITON_INTERPRET (tests)
TRITON_MAX_HEAD_DIM = 128  # = attention_triton.MAX_HEAD_DIM, repeated here so dispatch never imports Triton

# Names a user may give for a dtype (command line, configs, `create_model(precision=...)`).
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}
SHORT_DTYPE_NAMES = ("fp32", "bf16", "fp16", "fp64")  # the names the command line and the benchmarks offer


# ------------------------------------------------------------------------------------------------ names


def check_backend(backend: Any, choices: tuple[str, ...], argument: str = "backend") -> str:
    """`backend` if it is one of `choices`; else a ValueError naming `argument`."""
    if backend not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {backend!r}")
    return backend


def check_loss_backend(backend: Any) -> str:
    return check_backend(backend, LOSS_BACKENDS)


def check_attention_backend(backend: Any, argument: str = "attn_backend") -> str:
    return check_backend(backend, ATTENTION_BACKENDS, argument)


def parse_dtype(dtype: torch.dtype | str | None, argument: str = "dtype") -> torch.dtype | None:
    """A torch.dtype from a dtype or one of the names in DTYPES; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"{argument} must be a torch.dtype or one of {sorted(DTYPES)}, got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of `dtype` ("bf16"), as the command line and the benchmark records write it."""
    for name in SHORT_DTYPE_NAMES:
        if DTYPES[name] == dtype:
            return name
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------- the GPU rule


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
    return (
        f"{device} has compute capability {major}.{minor}; "
        f"the fused kernels need {wanted} or newer (bf16/TF32 tensor cores)"
    )


# ------------------------------------------------------------------------------------------------- Triton


@functools.cache
def triton_import_error() -> str | None:
    """Why Triton does not import here, or None when it does."""
    try:
        import triton  # noqa: F401  (importability is the question)
    except ImportError as error:  # not only ModuleNotFoundError: a broken install counts as unavailable
        return str(error)
    return None


@torch.compiler.assume_constant_result  # fixed for the process: torch.compile evaluates it at trace time
def triton_available() -> bool:
    return triton_import_error() is None


@torch.compiler.assume_constant_result
def triton_interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter (so the kernels take CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# ------------------------------------------------------------------------------------------------ dispatch


def resolve_loss_backend(backend: str, device: torch.device, dtype: torch.dtype, op: str = "contrastive_lse") -> str:
    """The backend that will run the compiled op fastclip::`op` for tensors on `device`; raises if a forced
    one cannot."""
    check_backend(backend, LOSS_BACKENDS)
    cuda_ok = device.type == "cuda" and dtype != torch.float64 and _extension.has_kernel(op, "CUDA")
    if backend == "auto":
        if cuda_ok and supports_fused_kernels(device):
            return "cuda"
        cpu_ok = device.type == "cpu" and _extension.has_kernel(op, "CPU")
        return CPU_AUTO.get(op, "torch") if cpu_ok else "torch"
    if backend == "cuda" and cuda_ok and not supports_fused_kernels(device):
        raise RuntimeError(f"backend='cuda' cannot run here: {unsupported_reason(device)}; use backend='torch'")
    if backend == "cuda" and not cuda_ok:
        raise RuntimeError(
            f"backend='cuda' cannot run here: tensors are on {device} with dtype {dtype}; the CUDA kernel needs "
            f"CUDA tensors in float32/bfloat16/float16 and a CUDA build of fastclip._C "
            f"(CUDA kernel built: {_extension.has_kernel(op, 'CUDA')}). See `python -m fastclip info`."
        )
    if backend == "cpp" and not (device.type == "cpu" and _extension.has_kernel(op, "CPU")):
        raise RuntimeError(
            f"backend='cpp' cannot run here: it needs CPU tensors (got {device}) and fastclip._C "
            f"(load error: {_extension.load_error()}). See `python -m fastclip info`."
        )
    return backend


def resolve_attention_backend(backend: str, q: torch.Tensor) -> str:
    """The attention backend that will run for `q` (already checked); raises if a forced one cannot."""
    check_backend(backend, ATTENTION_BACKENDS)
    if backend == "torch":
        return "torch"
    head_dim = q.shape[-1]
    dtypes = INTERPRETER_DTYPES if q.device.type == "cpu" else TRITON_DTYPES
    covered = q.dtype in dtypes and head_dim <= TRITON_MAX_HEAD_DIM
    if backend == "auto":  # the one rule: CUDA tensor on a supported GPU + Triton + inputs the kernel covers
        return "triton" if covered and supports_fused_kernels(q.device) and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(
            f"backend='triton' cannot run here: Triton does not import ({triton_import_error()}). "
            "Install it with `pip install triton` (or the `fastclip[triton]` extra), or use backend='torch'."
        )
    if q.device.type != "cuda" and not (q.device.type == "cpu" and triton_interpreting()):
        raise RuntimeError(
            f"backend='triton' cannot run here: the tensors are on {q.device}; the Triton kernel needs CUDA "
            "tensors, or CPU tensors with TRITON_INTERPRET=1 set before Triton kernels are defined (testing only)."
        )
    if q.device.type == "cuda" and not supports_fused_kernels(q.device):
        raise RuntimeError(f"backend='triton' cannot run here: {unsupported_reason(q.device)}; use backend='torch'")
    if q.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        why = " (its fp32 kernels would spill registers; autocast to bf16 runs it)" if q.device.type == "cuda" else ""
        raise TypeError(
            f"backend='triton' supports {names} inputs on {q.device.type}{why}, got {q.dtype}; use backend='torch'"
        )
    if head_dim > TRITON_MAX_HEAD_DIM:
        raise ValueError(
            f"backend='triton' supports head_dim <= {TRITON_MAX_HEAD_DIM} (q, k, v's last dim), got {head_dim}; "
            "use backend='torch'"
        )
    return "triton"
