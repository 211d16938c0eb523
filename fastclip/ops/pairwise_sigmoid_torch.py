"""The memory-efficient PyTorch path of `pairwise_sigmoid`: tiled over rows, nothing N x N stored.

Same structure as the tiled `contrastive_lse`: the forward sums softplus(-z * L) row chunk by row chunk,
the backward recomputes each [chunk, N] tile of L = s * image @ text.T + b instead of saving it.
`pairwise_sigmoid_with_grad_torch` makes the row losses and the gradients in one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclip.ops._checks import accumulate_dtype
from fastclip.ops.contrastive_lse_torch import chunk_rows, similarity


def _tile(img, txt, scale, bias, row_labels, col_labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, dots, z * L) for one tile: z = +1 where the labels agree, -1 elsewhere; dots = image @ text.T."""
    z = (row_labels[:, None] == col_labels[None, :]).to(img.dtype).mul_(2).sub_(1)
    dots = similarity(img, txt)
    return z, dots, (dots * scale).add_(bias).mul_(z)


class TiledPairwiseSigmoid(torch.autograd.Function):
    """(image [n, D], text [N, D], scale [], bias [], row_labels [n], col_labels [N]) -> row_loss [n]."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, row_labels, col_labels):
        acc = accumulate_dtype(image.dtype)
        img, txt = image.to(acc), text.to(acc)
        scale, bias = logit_scale.to(acc).reshape(()), logit_bias.to(acc).reshape(())
        chunk = chunk_rows(txt.shape[0], txt.element_size())
        row_loss = torch.empty(img.shape[0], dtype=acc, device=img.device)
        for r0 in range(0, img.shape[0], chunk):
            rows = slice(r0, r0 + chunk)
            _, _, zl = _tile(img[rows], txt, scale, bias, row_labels[rows], col_labels)
            row_loss[rows] = F.softplus(zl.neg_()).sum(1)  # -log sigmoid(z * L)
            del zl  # before the next tile is made
        ctx.save_for_backward(image, text, logit_scale, logit_bias, row_labels, col_labels)
        return row_loss

    @staticmethod
    def backward(ctx, grad_row):
        image, text, logit_scale, logit_bias, row_labels, col_labels = ctx.saved_tensors
        _, grad_img, grad_txt, grad_dot, grad_bias = _sweep(
            grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels, with_loss=False
        )
        needs = ctx.needs_input_grad
        return (
            grad_img.to(image.dtype) if needs[0] else None,
            grad_txt.to(text.dtype) if needs[1] else None,
            grad_dot.to(logit_scale.dtype).reshape(logit_scale.shape) if needs[2] else None,
            grad_bias.to(logit_bias.dtype).reshape(logit_bias.shape) if needs[3] else None,
            None,
            None,
        )


def pairwise_sigmoid_with_grad_torch(
    grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels
) -> tuple[torch.Tensor, ...]:
    """`pairwise_sigmoid_with_grad` in tiled PyTorch: (row_loss, grad_image, grad_text, grad_logit_scale,
    grad_logit_bias) of sum_i grad_row[i] * row_loss[i], from one pass over the tiles, unrounded in the
    accumulation dtype (inputs already checked)."""
    return _sweep(grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels, with_loss=True)


def _sweep(grad_row, image, text, logit_scale, logit_bias, row_labels, col_labels, *, with_loss: bool):
    """One pass over the tiles: (row_loss or None, grad_image, grad_text, grad_logit_scale, grad_logit_bias)
    of sum_i grad_row[i] * row_loss[i], in the accumulation dtype. Plain differentiable ops: under
    create_graph the backward of `TiledPairwiseSigmoid` stays differentiable."""
    acc = accumulate_dtype(image.dtype)
    img, txt = image.to(acc), text.to(acc)
    scale, bias = logit_scale.to(acc).reshape(()), logit_bias.to(acc).reshape(())
    grad_row = grad_row.to(acc)
    row_loss = torch.empty(img.shape[0], dtype=acc, device=img.device) if with_loss else None
    grad_img, grad_txt = torch.empty_like(img), torch.zeros_like(txt)
    grad_dot = torch.zeros((), dtype=acc, device=img.device)  # sum of G * <image_i, text_j>
    grad_bias = torch.zeros((), dtype=acc, device=img.device)
    chunk = chunk_rows(txt.shape[0], txt.element_size())
    for r0 in range(0, img.shape[0], chunk):
        rows = slice(r0, r0 + chunk)
        z, dots, zl = _tile(img[rows], txt, scale, bias, row_labels[rows], col_labels)
        if with_loss:
            row_loss[rows] = F.logsigmoid(zl).sum(1).neg_()
        # d softplus(-z L) / dL = -z * sigmoid(-z L)
        grad = torch.sigmoid(zl.neg_()).mul_(z).mul_(grad_row[rows, None]).neg_()
        grad_bias += grad.sum()
        grad_dot += (grad * dots).sum()
        grad_img[rows] = (grad @ txt).mul_(scale)
        grad_txt.addmm_(grad.T, img[rows] * scale)
        del z, dots, zl, grad  # before the next tile is made
    return row_loss, grad_img, grad_txt, grad_dot, grad_bias


def pairwise_sigmoid_torch(image, text, logit_scale, logit_bias, row_labels, col_labels) -> torch.Tensor:
    """Tiled PyTorch `pairwise_sigmoid` (inputs already checked)."""
    return TiledPairwiseSigmoid.apply(image, text, logit_scale, logit_bias, row_labels, col_labels)
