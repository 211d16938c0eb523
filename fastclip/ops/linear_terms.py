"""The linear (O(N * D)) terms of the contrastive loss, summed in row chunks: no whole fp32 copy.

For image rows I [n, D] (rows offset..offset+n of the batch) and text rows T [N, D]:

    positives = sum_i <I_i, T_{offset+i}>                          (labels=None: the matching pairs)
    positives = sum_i w_i sum_{j: id_j = id_{offset+i}} <I_i, T_j>   (class ids, row weights w = 1/|P(i)|)
    total     = <sum_i I_i, sum_j T_j>

Both accumulate in fp32 (or float64) over row chunks of a fixed byte budget, so bf16/fp16 features are
never copied whole to fp32. A custom autograd function keeps the memory bounded across backward too:
plain autograd would save every chunk's fp32 copy until backward (a whole copy again), this saves only
the inputs themselves and writes the gradients chunk by chunk in the input dtype. With class ids the
per-class sums ([N, D] in the accumulation dtype, one class per id) are built while needed, never saved.
"""

from __future__ import annotations

import torch

# Working set of one chunk of one operand in the accumulation dtype. Small beside the [N, D] copies it
# replaces where those matter (1/64 of one at N = 2^20, D = 512); large enough that a typical batch
# (N = 32k, D = 512: 64 MiB in fp32) takes two chunks, so the loop adds few kernel launches on a GPU.
CHUNK_BYTES = 32 << 20


def row_chunks(rows: int, dim: int, acc: torch.dtype) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most CHUNK_BYTES each when held in `acc`."""
    step = max(1, CHUNK_BYTES // (dim * acc.itemsize))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def column_sum(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """[D]: the sum of the rows of `x`, accumulated in `acc`."""
    total = x.new_zeros(x.shape[1], dtype=acc)
    for start, stop in row_chunks(x.shape[0], x.shape[1], acc):
        total = total + x[start:stop].to(acc).sum(0)
    return total


def class_sums(
    x: torch.Tensor, ids: torch.Tensor, num_ids: int, acc: torch.dtype, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """[num_ids, D]: row k sums (weights_i *) x_i over the rows i with ids[i] == k, in `acc`."""
    sums = x.new_zeros((num_ids, x.shape[1]), dtype=acc)
    for start, stop in row_chunks(x.shape[0], x.shape[1], acc):
        rows = x[start:stop].to(acc)
        if weights is not None:
            rows = rows * weights[start:stop, None]
        sums.index_add_(0, ids[start:stop], rows)
    return sums


class _LinearTerms(torch.autograd.Function):
    """(positives, total) of the module docstring; `col_ids`/`row_weights` None for matched pairs."""

    @staticmethod
    def forward(ctx, image, text, offset, acc, col_ids, row_weights):
        n, dim = image.shape
        sum_image, sum_text = image.new_zeros(dim, dtype=acc), column_sum(text, acc)
        positives = image.new_zeros((), dtype=acc)
        partners = None if col_ids is None else class_sums(text, col_ids, text.shape[0], acc)
        for start, stop in row_chunks(n, dim, acc):
            rows = image[start:stop].to(acc)
            sum_image = sum_image + rows.sum(0)
            if partners is None:
                dots = torch.dot(rows.flatten(), text[offset + start : offset + stop].to(acc).flatten())
            else:
                row_ids = col_ids[offset + start : offset + stop]
                dots = ((rows * partners[row_ids]).sum(1) * row_weights[start:stop]).sum()
            positives = positives + dots
        ctx.offset, ctx.acc = offset, acc
        ctx.save_for_backward(image, text, sum_image, sum_text, col_ids, row_weights)
        return positives, sum_image @ sum_text

    @staticmethod
    def backward(ctx, grad_positives, grad_total):
        image, text, sum_image, sum_text, col_ids, row_weights = ctx.saved_tensors
        offset, acc = ctx.offset, ctx.acc
        n, dim = image.shape
        grad_image = grad_text = None
        if ctx.needs_input_grad[0]:  # g_pos * partner_i + g_total * sum_j T_j
            grad_image = torch.empty_like(image)
            base = grad_total * sum_text
            partners = None if col_ids is None else class_sums(text, col_ids, text.shape[0], acc)
            for start, stop in row_chunks(n, dim, acc):
                if partners is None:
                    partner = text[offset + start : offset + stop].to(acc)
                else:
                    partner = partners[col_ids[offset + start : offset + stop]] * row_weights[start:stop, None]
                grad_image[start:stop] = torch.addcmul(base, grad_positives, partner).to(image.dtype)
        if ctx.needs_input_grad[1]:  # g_pos * (the image rows paired with T_j) + g_total * sum_i I_i
            grad_text = torch.empty_like(text)
            base = grad_total * sum_image
            if col_ids is None:
                grad_text[:offset] = base.to(text.dtype)  # the columns outside this rank's rows
                grad_text[offset + n :] = base.to(text.dtype)
                for start, stop in row_chunks(n, dim, acc):
                    rows = torch.addcmul(base, grad_positives, image[start:stop].to(acc))
                    grad_text[offset + start : offset + stop] = rows.to(text.dtype)
            else:
                row_ids = col_ids[offset : offset + n]
                partners = class_sums(image, row_ids, text.shape[0], acc, row_weights)
                for start, stop in row_chunks(text.shape[0], dim, acc):
                    partner = partners[col_ids[start:stop]]
                    grad_text[start:stop] = torch.addcmul(base, grad_positives, partner).to(text.dtype)
        return grad_image, grad_text, None, None, None, None


def linear_terms(
    image: torch.Tensor,
    text: torch.Tensor,
    offset: int,
    acc: torch.dtype,
    col_ids: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, total) in `acc`, differentiable in both features (see the module docstring).

    `col_ids` [N] are class ids in [0, N) of the text rows (`fastclip.ops.positives.class_ids`) and
    `row_weights` [n] (in `acc`) weigh each image row's positive sum; both None for matched pairs.
    """
    return _LinearTerms.apply(image, text, offset, acc, col_ids, row_weights)
