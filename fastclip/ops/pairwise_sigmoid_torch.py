"""The memory-efficient PyTorch path of `pairwise_sigmoid`: tiled over rows, nothing N x N stored.

Same structure as the tiled `contrastive_lse`: the forward sums softplus(-z * L) row chunk by row chunk,
the backward recomputes each [chunk, N] tile of L = s * image @ text.T + b instead of saving it.
`pairwise_sigmoid_with_grad_torch` makes the row losses and the gradients in one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclip.ops._checks import accumulate_dtype
from fastclip.ops.contrastive_lse_torch import chunk_rows, row_steps, similarity
from fastclip.ops.first_order import first_order_only


def _signed_logits(img, txt, scale, bias, row_labels, col_labels) -> torch.Tensor:
    """z * L for one [rows, N] tile, L = s * image @ text.T + b, z = +1 where the labels agree, -1
    elsewhere; one tile, signed in place."""
    return _times_signs(similarity(img, txt).mul_(scale).add_(bias), row_labels, col_labels)


def _times_signs(tile: torch.Tensor, row_labels: torch.Tensor, col_labels: torch.Tensor) -> torch.Tensor:
    """tile *= z in place (z = +1 where the labels agree, -1 elsewhere), a few rows at a time."""
    steps = row_steps(tile)
    for r0 in steps:
        rows = slice(r0, r0 + steps.step)
        tile[rows].mul_(torch.where(row_labels[rows, None] == col_labels[None, :], 1.0, -1.0).to(tile.dtype))
    return tile


def _softplus_row_sums(neg_zl: torch.Tensor) -> torch.Tensor:
    """sum_j softplus(x_ij) per row of the tile x = -z L (= -log sigmoid(z L)), a few rows at a time."""
    sums = neg_zl.new_empty(neg_zl.shape[0])
    steps = row_steps(neg_zl)
    for r0 in steps:
        sums[r0 : r0 + steps.step] = F.softplus(neg_zl[r0 : r0 + steps.step]).sum(1)
    return sums


class TiledPairwiseSigmoid(torch.autograd.Function):
    """(image [n, D], text [N, D], scale [], bias [], row_labels [n], col_labels [N]) -> row_loss [n].
    First order: its backward's gradients refuse to be differentiated again."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, row_labels, col_labels):
        acc = accumulate_dtype(image.dtype)
        img, txt = image.to(acc), text.to(acc)
        scale, bias = logit_scale.to(acc).reshape(()), logit_bias.to(acc).reshape(())
        chunk = chunk_rows(txt.shape[0], txt.element_size())
        row_loss = torch.empty(img.shape[0], dtype=acc, device=img.device)
        for r0 in range(0, img.shape[0], chunk):
            rows = slice(r0, r0 + chunk)
            zl = _signed_logits(img[rows], txt, scale, bias, row_labels[rows], col_labels)
            row_loss[rows] = _softplus_row_sums(zl.neg_())  # -log sigmoid(z * L)
            del zl  # before the next tile is made
        ctx.save_for_backward(image, text, logit_scale, logit_bias, row_labels, col_labels)
        return row_loss

    @staticmethod
    def backward(ctx, grad_row):
        image, text, logit_scale, logit_bias, row_labels, col_labels = ctx.saved_tensors
        _, grad_img, grad_txt, grad_dot, grad_bias = _sweep(
            grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels, with_loss=False
        )
        needs, anchors = ctx.needs_input_grad, (image, text, logit_scale, logit_bias)
        grads = (
            grad_img.to(image.dtype),
            grad_txt.to(text.dtype),
            grad_dot.to(logit_scale.dtype).reshape(logit_scale.shape),
            grad_bias.to(logit_bias.dtype).reshape(logit_bias.shape),
        )
        return *(first_order_only(g, anchors) if need else None for g, need in zip(grads, needs)), None, None


def pairwise_sigmoid_with_grad_torch(
    grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels
) -> tuple[torch.Tensor, ...]:
    """`pairwise_sigmoid_with_grad` in tiled PyTorch: (row_loss, grad_image, grad_text, grad_logit_scale,
    grad_logit_bias) of sum_i grad_row[i] * row_loss[i], from one pass over the tiles, unrounded in the
    accumulation dtype (inputs already checked)."""
    return _sweep(grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels, with_loss=True)


def _sweep(grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels, *, with_loss: bool):
    """One pass over the tiles: (row_loss or None, grad_image, grad_text, grad_logit_scale, grad_logit_bias)
    of sum_i grad_row[i] * row_loss[i], in the accumulation dtype, with one tile alive at a time (its
    temporaries cache-sized on a CPU). Not recorded by autograd."""
    acc = accumulate_dtype(image.dtype)
    img, txt = image.detach().to(acc), text.detach().to(acc)
    scale, bias = logit_scale.detach().to(acc).reshape(()), logit_bias.detach().to(acc).reshape(())
    grad_row = grad_row.detach().to(acc)
    row_loss = torch.empty(img.shape[0], dtype=acc, device=img.device) if with_loss else None
    grad_img, grad_txt = torch.empty_like(img), torch.zeros_like(txt)
    grad_dot = torch.zeros((), dtype=acc, device=img.device)  # sum of G * <image_i, text_j>
    grad_bias = torch.zeros((), dtype=acc, device=img.device)
    chunk = chunk_rows(txt.shape[0], txt.element_size())
    for r0 in range(0, img.shape[0], chunk):
        rows = slice(r0, r0 + chunk)
        tile = _signed_logits(img[rows], txt, scale, bias, row_labels[rows], col_labels).neg_()  # -z L
        if with_loss:
            row_loss[rows] = _softplus_row_sums(tile)
        # d softplus(-z L) / dL = -z * sigmoid(-z L) (z * z = 1), made in place of -z L
        grad = _times_signs(tile.sigmoid_(), row_labels[rows], col_labels).mul_(grad_row[rows, None]).neg_()
        grad_bias += grad.sum()
        row_grad = grad @ txt
        grad_dot += torch.dot(img[rows].flatten(), row_grad.flatten())  # sum_j G_ij <I_i, T_j> over the rows
        grad_img[rows] = row_grad.mul_(scale)
        grad_txt.addmm_(grad.T, img[rows], alpha=scale)
        del tile, grad  # before the next tile is made
    return row_loss, grad_img, grad_txt, grad_dot, grad_bias


def pairwise_sigmoid_torch(image, text, logit_scale, logit_bias, row_labels, col_labels) -> torch.Tensor:
    """Tiled PyTorch `pairwise_sigmoid` (inputs already checked)."""
    return TiledPairwiseSigmoid.apply(image, text, logit_scale, logit_bias, row_labels, col_labels)
