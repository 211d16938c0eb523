"""Where the losses keep the similarity matrix from the forward for the backward, and where they do not.

Correctness of both backwards is checked against float64 math by every test over LOSS_TARGETS (the
`-recompute` targets force the recomputing one); here: the size rule, what the kept tile holds (the
shared exponential, or S where the logits spread too wide for one), and that a retained graph's second
backward gives the same gradient although the first overwrote the tile.
"""

from __future__ import annotations

import pytest
import torch
from loss_helpers import CLIP_SCALE, features, no_cpp, scale_tensor

import fastclip
from fastclip.ops import contrastive_gradient
from fastclip.ops.contrastive_gradient import loss_lse
from fastclip.ops.reference import contrastive_lse_reference

CPU_BACKENDS = [pytest.param("torch"), pytest.param("cpp", marks=no_cpp)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_small_matrix_is_kept_and_exact(backend: str, dtype: torch.dtype) -> None:
    image, text = features(37, 19, dtype).detach(), features(53, 19, dtype).detach()
    scale = torch.tensor(CLIP_SCALE)
    row_lse, col_lse, kept = loss_lse(image, text, scale, backend, None, differentiable=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert kept is not None and kept.tile.dtype == acc and kept.tile.shape == (37, 53)
    want_sim = CLIP_SCALE * image.double() @ text.double().T
    # logits within 2 * CLIP_SCALE of each other: one exponential serves both directions, and is kept
    assert kept.reference == pytest.approx(want_sim.max().item(), rel=1e-5)
    torch.testing.assert_close(kept.tile.double(), (want_sim - kept.reference).exp(), rtol=1e-4, atol=0)
    want_row, want_col = contrastive_lse_reference(image.double(), text.double(), torch.tensor(CLIP_SCALE).double())
    torch.testing.assert_close(row_lse.double(), want_row, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(col_lse.double(), want_col, rtol=1e-6, atol=1e-5)


def test_masked_diagonal_is_left_out_of_the_kept_forward_only() -> None:
    x = features(41, 8, torch.float32).detach()
    scale = torch.tensor(5.0)
    row_lse, col_lse, kept = loss_lse(x, x, scale, "torch", 0, differentiable=True)
    logits = 5.0 * x.double() @ x.double().T
    logits.fill_diagonal_(float("-inf"))
    want_row, want_col = logits.logsumexp(1), logits.logsumexp(0)
    torch.testing.assert_close(row_lse.double(), want_row, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(col_lse.double(), want_col, rtol=1e-6, atol=1e-5)
    # the kept exponential leaves the diagonal out (0), as the backward does
    torch.testing.assert_close(kept.tile.double(), (logits - kept.reference).exp(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("diagonal", [None, 0])
def test_wide_logits_keep_the_masked_similarity(diagonal: int | None) -> None:
    """Logits spread wider than one exponential covers (s = 100): the tile keeps S, masked entries -inf."""
    x = features(29, 8, torch.float32).detach()
    _, _, kept = loss_lse(x, x, torch.tensor(100.0), "torch", diagonal, differentiable=True)
    want = 100.0 * x.double() @ x.double().T
    if diagonal is not None:
        want.fill_diagonal_(float("-inf"))
    assert kept.reference is None
    torch.testing.assert_close(kept.tile.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("backend", "differentiable", "budget", "kept"),
    [
        ("torch", True, None, True),
        ("torch", False, None, False),  # no backward to feed
        ("torch", True, 37 * 53 * 4 - 1, False),  # one byte over the budget
        ("torch", True, 37 * 53 * 4, True),
        pytest.param("cpp", True, None, True, marks=no_cpp),
    ],
)
def test_size_rule(backend: str, differentiable: bool, budget: int | None, kept: bool, monkeypatch) -> None:
    if budget is not None:
        monkeypatch.setattr(contrastive_gradient, "KEPT_SIMILARITY_BYTES", budget)
    image, text = features(37, 19, torch.float32).detach(), features(53, 19, torch.float32).detach()
    *_, tile = loss_lse(image, text, torch.tensor(3.0), backend, None, differentiable)
    assert (tile is not None) == kept


@pytest.mark.recompute_similarity
def test_recompute_mark_forces_the_recomputing_backward() -> None:
    image = features(8, 4, torch.float32).detach()
    *_, kept = loss_lse(image, image, torch.tensor(3.0), "torch", None, differentiable=True)
    assert kept is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale_value", [CLIP_SCALE, 100.0], ids=["shared-exponential", "wide-logits"])
def test_retained_graph_gives_the_same_gradient_twice(backend: str, scale_value: float) -> None:
    """The first backward overwrites the kept tile; the second remakes it, to the same bits."""
    image, text, scale = features(33, 16, torch.float32), features(33, 16, torch.float32), scale_tensor(scale_value)
    loss = fastclip.contrastive_loss(image, text, scale, label_smoothing=0.1, backend=backend)
    first = torch.autograd.grad(loss, (image, text, scale), retain_graph=True)
    second = torch.autograd.grad(loss, (image, text, scale))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
