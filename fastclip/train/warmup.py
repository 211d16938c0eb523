"""Autotune the Triton attention kernels for every shape a run will meet, before its first step.

Triton autotunes a kernel the first time it meets a new key (the power-of-two buckets of the sequence
lengths, head dim, causal, masks, dtype). The text tower trims each batch to its longest caption, so
new buckets would otherwise turn up at random steps, on each rank at a different one: the other ranks
wait at the next all-reduce while one benchmarks tiles. One forward and backward per bucket at the
start, on every rank at the same time and at the run's batch size, moves that cost to one place.
Each rank times the tiles itself, so two ranks can pick different configs for a shape (the timings are
close and noisy) and then compute it with different rounding: `share_tuned_configs` gives every rank
rank 0's choices.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist

from fastclip.backends import resolve_attention_backend
from fastclip.model.transformer import MultiheadSelfAttention

START_OF_TEXT, END_OF_TEXT = 49406, 49407


def runs_triton_attention(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the model's attention resolves to the Triton kernels for `dtype` tensors on `device`."""
    attention = next((m for m in model.modules() if isinstance(m, MultiheadSelfAttention)), None)
    if attention is None:
        return False
    head_dim = attention.in_proj_weight.shape[1] // attention.heads
    probe = torch.empty(1, 1, 1, head_dim, device=device, dtype=dtype)
    try:
        return resolve_attention_backend(attention.backend, probe) == "triton"
    except (RuntimeError, TypeError, ValueError):  # a forced backend that cannot run fails in the first step
        return False


def text_lengths_to_tune(context_length: int) -> list[int]:
    """One trimmed length per power-of-two bucket a batch can fall in: 2, 4, 8, ... and the context."""
    lengths, length = [], 2
    while length < context_length:
        lengths.append(length)
        length *= 2
    return lengths + [context_length]


def _captions(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Token rows of exactly `length` tokens: start, ordinary ids, end-of-text last."""
    text = torch.full((batch, length), 320, dtype=torch.long, device=device)
    text[:, 0], text[:, -1] = START_OF_TEXT, END_OF_TEXT
    return text


def warm_up_attention(
    model: torch.nn.Module,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    dtype: torch.dtype,
) -> int:
    """Run each tower forward and backward once per attention shape, leaving no gradient behind.

    `dtype` is what the attention sees (the autocast dtype, else the model's). Returns the number of
    passes run: 0 where the attention is not Triton's (nothing to tune).
    """
    if not runs_triton_attention(model, device, dtype):
        return 0
    image = torch.zeros(batch_size, 3, model.image_size, model.image_size, device=device)
    inputs: list[tuple[Callable, torch.Tensor]] = [(model.encode_image, image)]
    lengths = text_lengths_to_tune(model.context_length)
    inputs += [(model.encode_text, _captions(batch_size, n, device)) for n in lengths]
    training = model.training
    model.eval()  # batch norm (the modified ResNet) must not learn running statistics from these batches
    try:
        for encode, batch in inputs:
            with autocast():
                features = encode(batch)
            if features.requires_grad:  # a locked (frozen) image tower runs the forward only
                features.float().sum().backward()
    finally:
        model.train(training)
        model.zero_grad(set_to_none=True)
    return len(inputs)


def share_tuned_configs() -> int:
    """In a distributed run, replace every rank's autotuned attention configs by rank 0's (a collective:
    every rank calls it). Returns the number of choices rank 0 shared; 0 outside a distributed run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    from fastclip.ops import attention_triton

    kernels = attention_triton.autotuned_kernels()
    choices = [{name: dict(kernel.cache) for name, kernel in kernels.items()} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choices, src=0)
    for name, cache in choices[0].items():
        kernels[name].cache.update(cache)
    return sum(len(cache) for cache in choices[0].values())
