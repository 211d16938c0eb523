"""The dtype a model computes in, and the autocast that gives it: one rule for training and evaluation.

The dtype names come from `fastclip.backends`, the one place they are defined.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from fastclip.backends import DTYPES, SHORT_DTYPE_NAMES

# The dtypes a model may run in from the command line; fp64 is the backends' reference dtype, not a run's.
COMPUTE_DTYPE_NAMES = tuple(name for name in SHORT_DTYPE_NAMES if name != "fp64")
PRECISIONS = ("auto", *COMPUTE_DTYPE_NAMES)  # what `fastclip train --precision` accepts
COMPUTE_DTYPES = {name: DTYPES[name] for name in COMPUTE_DTYPE_NAMES}


def compute_dtype(precision: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the matmuls run in: a dtype, or one of PRECISIONS; "auto" is bf16 on CUDA, fp32 elsewhere."""
    if isinstance(precision, torch.dtype):
        return precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return COMPUTE_DTYPES[precision]


def autocast_for(precision: str | torch.dtype, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A context-manager factory: autocast to `precision`'s dtype (see `compute_dtype`), or nothing for fp32."""
    dtype = compute_dtype(precision, device)
    if dtype == torch.float32:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtype)
