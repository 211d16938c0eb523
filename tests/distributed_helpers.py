"""The problem behind the data-parallel loss tests: inputs and the parameters of two projections that every
rank shares (as DDP replicas would), drawn from a seed so each process and the float64 reference see the
same draws."""

from __future__ import annotations

import torch

IMAGE_IN, TEXT_IN, EMBED = 11, 6, 7  # unequal input dims and an odd embedding dim
CLASSES = 3  # few classes: most pairs share their label with pairs on other ranks


def make_problem(num_pairs: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Inputs, projections, a log-scale and a bias in `dtype`, and integer labels from CLASSES classes."""
    gen = torch.Generator().manual_seed(seed)
    problem = {
        "image_in": torch.randn(num_pairs, IMAGE_IN, generator=gen, dtype=torch.float64),
        "text_in": torch.randn(num_pairs, TEXT_IN, generator=gen, dtype=torch.float64),
        "image_proj": torch.randn(EMBED, IMAGE_IN, generator=gen, dtype=torch.float64),
        "text_proj": torch.randn(EMBED, TEXT_IN, generator=gen, dtype=torch.float64),
        "log_scale": 2.0 + torch.rand((), generator=gen, dtype=torch.float64),
        "bias": -2.0 - torch.rand((), generator=gen, dtype=torch.float64),
    }
    problem = {name: value.to(dtype) for name, value in problem.items()}
    problem["labels"] = torch.randint(0, CLASSES, (num_pairs,), generator=gen)
    return problem
