"""The whole feature gradient of a contrastive loss in one fused backward, rounded once.

Every loss built on `contrastive_lse` (CLIP, label-aware CLIP, label smoothing, SupCon / NT-Xent) has,
per unit upstream gradient, dL/dS of the form

    G_ij = a_i P_row_ij + b_j P_col_ij - y_i [row_ids_i == col_ids_j] - u        (masked entries: 0)

with P_row = exp(S - row_lse), P_col = exp(S - col_lse): the log-sum-exp terms (a, b) and the target
terms (y for the positives, u for label smoothing). Adding the target terms after the log-sum-exp
backward, in the input dtype, loses everything on a nearly solved batch: at the positive entries
P -> 1 and the two nearly cancel, each rounded to bf16/fp16 first. Here the fused backward
(`fastclip::contrastive_loss_backward`, and its tiled PyTorch twin) builds the whole G in fp32 and
returns unrounded gradients, which are rounded once.

fp32 alone is not enough at a pair entry, a row's only positive (CLIP without labels, a singleton class,
NT-Xent's other view): there P - 1 = -(the rest of the row), and 1 - P falls below fp32's spacing near 1
long before the loss reaches 0, while every other entry of the row still carries its relative accuracy.
So for rows with a `partner` column (the entry (i, partner_i) is the only positive of row i and of that
column) the op leaves the entry out of the tile and adds, after the sweep,

    G_i,partner_i = e_i - a_i * sum_{j != partner_i} P_row_ij - b_p * sum_{k: partner_k != p} P_col_kp

with e_i = a_i + b_p - y_i - u given exactly by the caller (e.g. eps (N - 1) / N^2 for CLIP, 0 for
SupCon): no cancellation left. Rows with several positives take the fp32 entries of G.

The loss value comes from the unchanged forward arithmetic; `attach_fused_gradient` gives it this
gradient. First order only, like the fused ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastclip import _extension
from fastclip.ops._checks import accumulate_dtype, check_fake_inputs
from fastclip.ops.contrastive_lse import dispatch_contrastive_lse
from fastclip.ops.contrastive_lse_torch import KeptTile, tiled_loss_gradient, whole_lse
from fastclip.ops.first_order import first_order_only, register_first_order_only
from fastclip.ops.positives import class_ids

OP = "contrastive_loss_backward"
# The largest similarity matrix (fp32 or float64 bytes) a loss keeps from its forward for its backward:
# the whole fp32 matrix up to N = 2048, where saving the backward's recompute decides whether the fused loss
# beats the naive one on a CPU (loss_lse).
KEPT_SIMILARITY_BYTES = 16 << 20


@dataclass(frozen=True)
class LossTerms:
    """The coefficients of G per unit upstream gradient (module docstring), in the accumulation dtype."""

    row: torch.Tensor  # a [n]
    col: torch.Tensor  # b [N]
    positive: torch.Tensor  # y [n]
    uniform: torch.Tensor  # u []
    pair: torch.Tensor  # e [n] (read only where partner >= 0)
    row_ids: torch.Tensor  # [n] int64
    col_ids: torch.Tensor  # [N] int64
    partner: torch.Tensor  # [n] int64: the row's only positive column, or -1
    masked_diagonal: int | None = None
    # Every positive entry is a pair entry (CLIP without labels): the same-class term can be skipped,
    # since the pair entries are set afterwards anyway.
    positives_are_pairs: bool = False


def clip_terms(
    num_pairs: int,
    labels: torch.Tensor | None,
    weight: float,
    label_smoothing: float,
    acc: torch.dtype,
    device: torch.device,
) -> LossTerms:
    """CLIP's loss (module docstring of contrastive_loss) for N matched pairs, one process."""
    n, eps = num_pairs, label_smoothing
    full = lambda size, value: torch.full((size,), value, dtype=acc, device=device)  # noqa: E731
    rows = torch.arange(n, device=device)
    if labels is None:
        ids, positive, partner = rows, full(n, (1.0 - eps) / n), rows
    else:  # rows and columns share the labels: a singleton class pairs row i with column i
        ids, counts = class_ids(labels)
        size = counts[ids]
        positive = (1.0 - eps) / n / size.to(acc)
        partner = torch.where(size == 1, rows, -1)
    # a + b - y - u at a pair entry, worked out in float64: w/N + (1-w)/N - (1-eps)/N - eps/N^2
    pair = full(n, eps * (n - 1) / n**2)
    uniform = torch.full((), eps / n**2, dtype=acc, device=device)
    row, col = full(n, weight / n), full(n, (1.0 - weight) / n)
    return LossTerms(row, col, positive, uniform, pair, ids, ids, partner, positives_are_pairs=labels is None)


def supcon_terms(labels: torch.Tensor, acc: torch.dtype) -> LossTerms:
    """SupCon over M rows with self-pairs masked: a_i = y_i |P(i)| = 1/K for anchors with positives."""
    ids, counts = class_ids(labels)
    positives = counts[ids] - 1  # |P(i)|
    kept = positives > 0
    per_anchor = kept.to(acc) / kept.sum().clamp(min=1).to(acc)  # 1/K or 0
    zeros = torch.zeros_like(per_anchor)
    return LossTerms(
        row=per_anchor,
        col=zeros,
        positive=per_anchor / positives.clamp(min=1).to(acc),
        uniform=zeros.new_zeros(()),
        pair=zeros,  # a - y = 1/K - 1/K
        row_ids=ids,
        col_ids=ids,
        partner=torch.where(positives == 1, other_member(ids), -1),
        masked_diagonal=0,
    )


def other_member(ids: torch.Tensor) -> torch.Tensor:
    """For every row, another row with its id (meaningful for ids held by exactly two rows)."""
    sorted_ids, order = ids.sort(stable=True)
    next_same = torch.cat([sorted_ids[1:] == sorted_ids[:-1], sorted_ids.new_zeros(1, dtype=torch.bool)])
    neighbour = torch.where(next_same, order.roll(-1), order.roll(1))  # the pair's other slot in sorted order
    return torch.empty_like(order).scatter_(0, order, neighbour)


def loss_lse(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    backend: str,
    masked_diagonal: int | None,
    differentiable: bool,
) -> tuple[torch.Tensor, torch.Tensor, KeptTile | None]:
    """(row_lse, col_lse, the similarity tile kept for the backward or None) for a loss's forward.

    On the PyTorch and C++ backends a similarity matrix of at most KEPT_SIMILARITY_BYTES is kept: the
    backward's recompute is then a quarter of the loss's matmul work saved (at N = 1024, D = 512 this
    decides whether the fused loss beats the naive one, which keeps its logits too). The price is memory:
    up to that size the backward holds the whole matrix (and a second one where the column term needs its
    own exponential), more than the tiled backward just past it, still well below the naive loss. Where
    one exponential serves both directions the tile holds it, so the backward does not redo it either.
    """
    acc = accumulate_dtype(image.dtype)
    size = image.shape[0] * text.shape[0] * torch.finfo(acc).bits // 8
    # (not while tracing: a retained graph's second backward would see the tile the first overwrote)
    keep = differentiable and backend in ("torch", "cpp") and not torch.compiler.is_compiling()
    if keep and size <= KEPT_SIMILARITY_BYTES:
        return whole_lse(image, text, logit_scale, masked_diagonal)
    return (*dispatch_contrastive_lse(image, text, logit_scale, backend, masked_diagonal), None)


def wants_gradient(*inputs: torch.Tensor) -> bool:
    """Whether autograd will ask for a gradient of any of `inputs`."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in inputs)


def loss_gradient(backend: str, image, text, logit_scale, row_lse, col_lse, coefficients, terms: LossTerms, kept=None):
    """(grad_image, grad_text, grad_scale) in the accumulation dtype from the chosen backend, or from the
    tiled PyTorch backward where the forward `kept` its similarity tile (which the backward overwrites)."""
    ids = (terms.row_ids, terms.col_ids, terms.partner)
    if backend == "torch" or kept is not None:
        return tiled_loss_gradient(
            image,
            text,
            logit_scale,
            row_lse,
            col_lse,
            coefficients,
            ids,
            terms.masked_diagonal,
            positives_are_pairs=terms.positives_are_pairs,
            kept=kept,
        )
    return torch.ops.fastclip.contrastive_loss_backward(
        *coefficients, image, text, logit_scale, row_lse, col_lse, *ids, terms.masked_diagonal
    )


class _FusedLossGradient(torch.autograd.Function):
    """value -> value, with the gradient of the loss it was computed from (module docstring).

    `text` None: the features meet themselves (SupCon); their gradient is the sum of both sides, added
    before the one rounding.
    """

    @staticmethod
    def forward(ctx, value, image, text, logit_scale, row_lse, col_lse, kept, terms: LossTerms, backend: str):
        ctx.terms, ctx.backend, ctx.same = terms, backend, text is None
        # The kept tile is neither an input nor an output: held on ctx, handed to the first backward,
        # which overwrites it; a retained graph's later backward remakes it (the same bits).
        ctx.kept, ctx.remake = kept, kept is not None
        ctx.save_for_backward(image, image if text is None else text, logit_scale, row_lse, col_lse)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value):
        image, text, logit_scale, row_lse, col_lse = ctx.saved_tensors
        t = ctx.terms
        kept, ctx.kept = ctx.kept, None
        if kept is None and ctx.remake:
            *_, kept = whole_lse(image, text, logit_scale, t.masked_diagonal)
        g = grad_value.to(row_lse.dtype)
        coefficients = (g * t.row, g * t.col, g * t.positive, g * t.uniform, g * t.pair)
        grad_img, grad_txt, grad_scale = loss_gradient(
            ctx.backend, image, text, logit_scale, row_lse, col_lse, coefficients, t, kept
        )
        del kept  # the tile's memory goes before the roundings below
        if ctx.same:
            grad_img, grad_txt = grad_img + grad_txt, None
        anchor = (image, text, logit_scale)
        # Each unrounded sum is dropped as soon as it is rounded: at N = 1M the fp32 sums are the backward's
        # peak memory, and holding both through both roundings would add a rounded copy on top.
        grad_img = first_order_only(grad_img.to(image.dtype), anchor)
        if grad_txt is not None:
            grad_txt = first_order_only(grad_txt.to(text.dtype), anchor)
        grad_scale = first_order_only(grad_scale.to(logit_scale.dtype).reshape(logit_scale.shape), anchor)
        return None, grad_img, grad_txt, grad_scale, None, None, None, None, None


def attach_fused_gradient(
    value: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor | None,
    logit_scale: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    terms: Callable[[], LossTerms],
    backend: str,
    kept: KeptTile | None = None,
) -> torch.Tensor:
    """`value` (computed without autograd) as a differentiable function of the features and the scale.

    `terms` builds the loss's LossTerms, only when a gradient is wanted; `backend` is a resolved one;
    `kept` the tile `loss_lse` kept.
    """
    inputs = (image, logit_scale) if text is None else (image, text, logit_scale)
    if not wants_gradient(*inputs):
        return value
    return _FusedLossGradient.apply(value, image, text, logit_scale, row_lse, col_lse, kept, terms(), backend)


def _register_compiled_op() -> None:
    """Fake kernel and first-order-only autograd of the C++/CUDA op."""

    @torch.library.register_fake(f"fastclip::{OP}")
    def _(
        grad_row,
        grad_col,
        grad_positive,
        grad_uniform,
        grad_pair,
        image,
        text,
        logit_scale,
        row_lse,
        col_lse,
        row_ids,
        col_ids,
        partner,
        masked_diagonal=None,
    ):
        check_fake_inputs(
            image,
            text,
            {"logit_scale": logit_scale, "grad_uniform": grad_uniform},
            rows={
                "grad_row": grad_row,
                "grad_positive": grad_positive,
                "grad_pair": grad_pair,
                "row_lse": row_lse,
                "row_ids": row_ids,
                "partner": partner,
            },
            columns={"grad_col": grad_col, "col_lse": col_lse, "col_ids": col_ids},
        )
        acc = accumulate_dtype(image.dtype)
        return (
            image.new_empty(image.shape, dtype=acc),
            text.new_empty(text.shape, dtype=acc),
            logit_scale.new_empty((), dtype=acc),
        )

    register_first_order_only(OP)


if _extension.is_loaded() and hasattr(torch.ops.fastclip, OP):  # absent from a stale build of _C
    _register_compiled_op()
