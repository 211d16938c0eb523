"""Differentiable collectives for the data-parallel contrastive loss.

Both work with any `torch.distributed` backend (NCCL on GPUs, gloo on CPUs) and with ranks that hold
different numbers of rows (the last batch of an epoch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in `group`, 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def row_counts(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[int]:
    """The number of rows of `x` on every rank of `group`; raises if the ranks' row sizes differ."""
    shape = torch.tensor([x.shape[0], x.shape[1:].numel()], device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    counts, widths = torch.stack(shapes).T.tolist()  # one device-to-host copy, not one per rank
    if len(set(widths)) > 1:  # every rank must say so, rather than hang or fail inside the collective
        raise ValueError(f"the ranks' features differ in size: {widths} elements per row on ranks 0..{len(widths) - 1}")
    return counts


class _GatherRows(torch.autograd.Function):
    """all_gather of [n_r, ...] tensors of per-rank length n_r; the gradient goes back to each owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
        # all_gather needs equal shapes: pad every rank to the longest and trim afterwards.
        longest = max(counts)
        if x.shape[0] == longest:
            padded = x.contiguous()
        else:
            padded = x.new_zeros((longest, *x.shape[1:]))
            padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=group)
        start = sum(counts[: dist.get_rank(group)])
        ctx.group, ctx.start, ctx.stop = group, start, start + x.shape[0]
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Every rank's loss depends on every gathered row: sum their gradients, keep our own rows.
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.stop], None, None


def gather_rows(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, counts: list[int] | None = None
) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's `x` along dim 0 (ranks may differ in length) and return it with the
    offset of this rank's rows. Differentiable: each rank receives the summed gradient of its rows.
    `counts` (from `row_counts`) saves the exchange of row counts when another tensor with the same rows
    per rank was gathered already."""
    if counts is None:
        counts = row_counts(x, group)
    return _GatherRows.apply(x, counts, group), sum(counts[: dist.get_rank(group)])


class _AllReduceLogSumExp(torch.autograd.Function):
    """Elementwise log(sum_r exp(x_r)) over ranks, computed stably (max first)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        peak = x.detach().clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        total = torch.exp(x - peak)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        out = peak + torch.log(total)
        ctx.group = group
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, out = ctx.saved_tensors
        # d out / d x_r = exp(x_r - out); the upstream gradient is the sum of every rank's.
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        # nan_to_num: a column with no rows anywhere has x = out = -inf and no gradient.
        return grad * torch.exp(x - out).nan_to_num(0.0), None


def all_reduce_logsumexp(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Merge per-rank partial log-sum-exps into the global one, differentiably."""
    return _AllReduceLogSumExp.apply(x, group)


class _AverageGradient(torch.autograd.Function):
    """Identity forward; the backward averages the gradient over ranks (for parameters outside DDP)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


def average_gradient(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """`x` unchanged, whose gradient becomes the mean over ranks: a loss's own parameters then get the
    same gradient everywhere (and DDP averaging it again, if they are also DDP's, changes nothing)."""
    return _AverageGradient.apply(x, group)
