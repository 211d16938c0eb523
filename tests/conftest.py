"""Test configuration: GPU tests (`@pytest.mark.cuda`) are skipped where no CUDA device exists."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels take CPU tensors only in the interpreter, which must be chosen before any kernel is
    # defined: set here, first, whatever order the test modules are imported in.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Only the absence of a GPU skips: on a GPU machine a missing CUDA kernel must fail, not hide.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="cuda test: no CUDA device here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Fresh but reproducible random inputs per test."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _recompute_similarity(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the `recompute_similarity` mark the losses take the backward they use past the size where
    they keep the similarity (fastclip.ops.contrastive_gradient.loss_lse), on the tests' small inputs."""
    if request.node.get_closest_marker("recompute_similarity"):
        monkeypatch.setattr("fastclip.ops.contrastive_gradient.KEPT_SIMILARITY_BYTES", -1)
