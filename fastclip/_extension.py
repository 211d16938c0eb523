"""Loads the compiled extension `fastclip._C` lazily and degrades gracefully when it is missing.

Without `_C` every op still works through its PyTorch path; one warning says so. Set
`FASTCLIP_EXTENSION_ERRORS=1` to get the full import error raised instead.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """Import `fastclip._C` once; return None on success, else the reason it failed."""
    try:
        from fastclip import _C  # noqa: F401  (importing registers the ops with the dispatcher)
    except ImportError as error:
        if os.environ.get("FASTCLIP_EXTENSION_ERRORS", "0") == "1":
            raise
        warnings.warn(
            f"fastclip._C could not be loaded ({error}); fastclip falls back to its PyTorch paths. "
            "Reinstall with `pip install --no-build-isolation -e .`, or set FASTCLIP_EXTENSION_ERRORS=1 "
            "for the full error.",
            RuntimeWarning,
            stacklevel=3,
        )
        return str(error)
    return None


@torch.compiler.assume_constant_result  # fixed once loaded: torch.compile evaluates it at trace time
def is_loaded() -> bool:
    return load_error() is None


@torch.compiler.assume_constant_result
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `fastclip::<op>` has a compiled kernel for `dispatch_key` ("CPU" or "CUDA")."""
    return is_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastclip::{op}", dispatch_key)
