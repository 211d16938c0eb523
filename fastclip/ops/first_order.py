"""First-order only: fastclip's fused and tiled backwards give gradients that cannot be differentiated again
(they hold the log-sum-exps fixed, run in C++/CUDA, or overwrite their tiles in place), so a second-order
use (a gradient penalty) raises instead of being silently wrong."""

from __future__ import annotations

import torch

MESSAGE = "first-order only: double backward through fastclip's losses is not supported"


class _FirstOrderOnly(torch.autograd.Function):
    """grad, *anchors -> grad, differentiable in the anchors only to refuse."""

    @staticmethod
    def forward(ctx, grad, *anchors):
        return grad.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"fastclip's loss gradients are {MESSAGE}")


def first_order_only(grad: torch.Tensor, anchors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`grad` as computed in a backward; under create_graph, a tensor whose own backward raises."""
    # Grad mode is on in a backward only under create_graph=True.
    if torch.is_grad_enabled() and any(a.requires_grad for a in anchors):
        return _FirstOrderOnly.apply(grad, *anchors)
    return grad


def register_first_order_only(op: str) -> None:
    """Give the backward op fastclip::`op` an autograd kernel that refuses double backward.

    Without one, PyTorch's fallback warns on every differentiable call ("silently incorrect") and would
    treat the gradients as constants.
    """

    def backward(ctx, *grads):
        raise RuntimeError(f"fastclip::{op} is {MESSAGE}")

    torch.library.register_autograd(f"fastclip::{op}", backward)
