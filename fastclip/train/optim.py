"""AdamW with CLIP's weight-decay exclusions, and the cosine learning-rate schedule with linear warm-up."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn


def decays(name: str, parameter: nn.Parameter) -> bool:
    """Weight decay applies to matrices and kernels only: not to gains and biases (1-D), embeddings
    (token, positional, class) or logit_scale, as in CLIP and open_clip."""
    if parameter.ndim < 2:
        return False
    return "embedding" not in name and "logit_scale" not in name


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    extra: nn.Module | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in a decayed and an undecayed group.

    `extra`: a module trained alongside the model (SigLipLoss's scale and bias), named "loss.<name>"."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if extra is not None:
        named += [(f"loss.{n}", p) for n, p in extra.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def cosine_with_warmup(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warm-up from 1/warmup, then a
    cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    rule = functools.partial(cosine_with_warmup, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, rule)
