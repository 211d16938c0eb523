"""Argument checks shared by the ops: clear exceptions that name the argument and the expectation."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float_tensor(name: str, t: torch.Tensor, dims: list[str]) -> None:
    """A non-empty floating tensor with one dimension per entry of `dims` (their names, for messages)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(dims):
        raise ValueError(f"{name} must be {len(dims)}-D [{', '.join(dims)}], got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}; {' and '.join(dims)} must be positive")


def check_features(
    image: torch.Tensor, text: torch.Tensor, names: tuple[str, str] = ("image_features", "text_features")
) -> None:
    """Both [rows, D] floating tensors of one dtype and device, non-empty, same D (`names` for messages)."""
    for name, t in zip(names, (image, text), strict=True):
        check_float_tensor(name, t, ["batch", "dim"])
    first, second = names
    if image.dtype != text.dtype:
        raise TypeError(f"{first} and {second} must have the same dtype, got {image.dtype} and {text.dtype}")
    if image.device != text.device:
        raise ValueError(f"{first} and {second} must be on the same device, got {image.device} and {text.device}")
    if image.shape[1] != text.shape[1]:
        raise ValueError(
            f"{first} and {second} must have the same feature dim, got {image.shape[1]} and {text.shape[1]}"
        )


def check_matched_pairs(image: torch.Tensor, text: torch.Tensor, hint: str = "") -> None:
    """Row i of each is pair i: the batch sizes must agree (`hint` ends the message: what to do instead)."""
    if image.shape[0] != text.shape[0]:
        raise ValueError(
            f"image_features and text_features must have the same batch size (pair i is the positive), got "
            f"{image.shape[0]} and {text.shape[0]}{hint}"
        )


def share_hint(share_function: str) -> str:
    return f"; for a rank's rows of a larger batch use {share_function} with offset"


def check_offset(offset: int, rows: int, num_pairs: int) -> None:
    """Rows offset..offset+rows of an num_pairs-row batch."""
    if isinstance(offset, bool) or not (isinstance(offset, int) and 0 <= offset and offset + rows <= num_pairs):
        raise ValueError(f"offset must be an int with 0 <= offset and offset + {rows} <= {num_pairs}, got {offset!r}")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one, with an index-less "cuda" meaning the current CUDA device."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" else 0
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return a.index == b.index


def one_value(
    name: str, value: torch.Tensor | float, device: torch.device, meaning: str
) -> tuple[torch.Tensor, float | None]:
    """`value` as a one-element floating tensor on `device`, and its float (None when it cannot be read)."""
    device = torch.device(device)
    if not isinstance(value, torch.Tensor):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
        number = float(value)
        # a fill on the device, not a copy from host memory (which may wait for the device's queue)
        return torch.full((), number, dtype=torch.float32, device=device), number
    if value.numel() != 1:
        raise ValueError(f"{name} must hold one value ({meaning}), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if not same_device(value.device, device):
        raise ValueError(f"{name} must be on the features' device {device}, got {value.device}")
    if not reads_values(value.device):
        return value, None
    return value, float(value.detach().reshape(()).item())


def reads_values(device: torch.device) -> bool:
    """Whether an argument check may read a tensor's value: on a CPU, outside torch.compile tracing (where
    a data-dependent branch breaks the graph). On a GPU the read would synchronise the host with the
    device on every call: the loss would wait for the whole model's forward before launching anything,
    and the launches of everything after it would no longer overlap the device's work."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def as_logit_scale(logit_scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """The multiplier s as a one-element tensor on `device`; positive and finite (checked where `reads_values`)."""
    logit_scale, value = one_value("logit_scale", logit_scale, device, "the multiplier exp(t)")
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"logit_scale must be positive and finite (it multiplies the cosine similarities), got {value}"
        )
    return logit_scale


def as_logit_bias(logit_bias: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """The bias b as a one-element tensor on `device`; finite (checked where `reads_values`)."""
    logit_bias, value = one_value("logit_bias", logit_bias, device, "the bias added to every logit")
    if value is not None and not math.isfinite(value):
        raise ValueError(f"logit_bias must be finite, got {value}")
    return logit_bias


def check_labels(name: str, labels: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """Integer class labels [size] on `device`, returned as int64 (bool and floating labels refused)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class ids, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must hold integer class ids (int64, int32, ...), got {labels.dtype}")
    if labels.shape != (size,):
        raise ValueError(f"{name} must have shape [{size}] (one label per row), got {tuple(labels.shape)}")
    if not same_device(labels.device, device):
        raise ValueError(f"{name} must be on the features' device {device}, got {labels.device}")
    return labels.long()


def check_index(name: str, value: int) -> None:
    """A Python int (bools refused: True is not an offset)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def check_unit_interval(name: str, value: float, *, upper_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {value}")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; float64 stays float64 (for gradcheck and references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_fake_inputs(
    image: torch.Tensor,
    text: torch.Tensor,
    scalars: dict[str, torch.Tensor],
    rows: dict[str, torch.Tensor] | None = None,
    columns: dict[str, torch.Tensor] | None = None,
) -> None:
    """The shape checks of the compiled pairwise ops, for their fake (meta) kernels.

    `torch._check`, as the C++ checks' twin: a traced graph with mismatched shapes fails at trace time
    instead of inside the kernel, and symbolic sizes stay symbolic. `scalars` hold one value each;
    `rows` are [n] vectors (one per image row), `columns` [N] vectors (one per text row).
    """
    torch._check(
        image.dim() == 2 and text.dim() == 2,
        lambda: f"image and text must be 2-D, got shapes {tuple(image.shape)} and {tuple(text.shape)}",
    )
    torch._check(
        image.shape[1] == text.shape[1],
        lambda: f"feature dims differ: image has D={image.shape[1]}, text has D={text.shape[1]}",
    )
    torch._check(image.dtype == text.dtype, lambda: f"image and text dtypes differ: {image.dtype} and {text.dtype}")
    for name, value in scalars.items():
        torch._check(
            value.numel() == 1, lambda name=name, value=value: f"{name} must hold one value, got {value.shape}"
        )
    for size, vectors in ((image.shape[0], rows or {}), (text.shape[0], columns or {})):
        for name, vector in vectors.items():
            torch._check(
                vector.dim() == 1 and vector.shape[0] == size,
                lambda name=name, vector=vector, size=size: f"{name} must be [{size}], got {tuple(vector.shape)}",
            )
