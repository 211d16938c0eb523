"""Argument checks shared by the ops: clear exceptions that name the argument and the expectation."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_features(image: torch.Tensor, text: torch.Tensor) -> None:
    """Both [rows, D] floating tensors of one dtype and device, non-empty, same D."""
    for name, t in (("image_features", image), ("text_features", text)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}; the batch and feature dim must be positive")
    if image.dtype != text.dtype:
        raise TypeError(f"image_features and text_features must have the same dtype, got {image.dtype} and {text.dtype}")
    if image.device != text.device:
        raise ValueError(
            f"image_features and text_features must be on the same device, got {image.device} and {text.device}"
        )
    if image.shape[1] != text.shape[1]:
        raise ValueError(
            f"image_features and text_features must have the same feature dim, got {image.shape[1]} and {text.shape[1]}"
        )


def as_logit_scale(logit_scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """The multiplier s as a one-element tensor on `device`; positive and finite (checked in eager mode)."""
    if not isinstance(logit_scale, torch.Tensor):
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
            raise TypeError(f"logit_scale must be a tensor or a number, got {type(logit_scale).__name__}")
        logit_scale = torch.tensor(float(logit_scale), dtype=torch.float32, device=device)
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must hold one value (the multiplier exp(t)), got shape {tuple(logit_scale.shape)}")
    if not logit_scale.is_floating_point():
        raise TypeError(f"logit_scale must be a floating tensor, got {logit_scale.dtype}")
    if logit_scale.device != device:
        raise ValueError(f"logit_scale must be on the features' device {device}, got {logit_scale.device}")
    # A value check reads the scalar (one host-device sync on a GPU); it is skipped while tracing for
    # torch.compile, where a data-dependent branch would break the graph, and on meta tensors (no data).
    if not torch.compiler.is_compiling() and logit_scale.device.type != "meta":
        value = float(logit_scale.detach().reshape(()).item())
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"logit_scale must be positive and finite (it multiplies the cosine similarities), got {value}")
    return logit_scale


def check_unit_interval(name: str, value: float, *, upper_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {value}")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; float64 stays float64 (for gradcheck and references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
