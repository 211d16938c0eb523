"""The memory-efficient PyTorch path of `contrastive_lse`: tiled over rows, nothing N x N stored.

The forward sweeps chunks of rows, each a [chunk, N] similarity tile, keeping the row log-sum-exps and
merging the column log-sum-exps chunk by chunk (online log-sum-exp across chunks). The backward recomputes
each tile instead of saving it. Extra memory is O(chunk * N) with the chunk sized from a byte budget,
so it stays flat as N grows. It runs on any device PyTorch supports and is the CPU default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastclip.ops._checks import accumulate_dtype
from fastclip.ops.first_order import first_order_only

PAIR_CHUNK_BYTES = 4 << 20  # the [rows, D] products of the pair entries, added a few MiB at a time
# On a CPU each tile is made by one GEMM per GEMM_COLS columns, as the C++ sweep does (kColBlock in
# csrc/cpu/tile_sweep_cpu.h): after a GEMM with an N-wide output MKL holds a packing buffer of a wide panel
# of the other operand (about 10 MiB at N = 8192, D = 512), after a 512-wide one about 2 MiB.
GEMM_COLS = 512


def tile_budget_bytes(num_cols: int) -> int:
    """Bytes one [chunk, N] tile may take: 1/32 of the N x N fp32 logits the naive loss makes, within
    [8, 64] MiB (the C++ sweep's rule, csrc/cpu/tile_sweep_cpu.h, which adds a per-thread floor). The
    sweeps hold one or two tiles (tests/test_tile_memory.py), so from N = 8192 at D = 512 the peak stays
    under 5% of the naive loss's, whose fp32 feature gradients alone are 3% of it."""
    return min(max(num_cols * num_cols * 4 // 32, 8 << 20), 64 << 20)


def chunk_rows(num_cols: int, itemsize: int) -> int:
    """Rows per [rows, num_cols] tile so that one tile stays within tile_budget_bytes."""
    return max(1, tile_budget_bytes(num_cols) // (num_cols * itemsize))


def similarity(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The dot products rows @ cols.T, a [rows, N] tile (unscaled): on a CPU one GEMM per GEMM_COLS
    columns, else one. Differentiable where autograd records (out= GEMMs are not)."""
    num_cols = cols.shape[0]
    recording = torch.is_grad_enabled() and (rows.requires_grad or cols.requires_grad)
    if rows.device.type != "cpu" or num_cols <= GEMM_COLS or recording or torch.compiler.is_compiling():
        return rows @ cols.T
    out = rows.new_empty((rows.shape[0], num_cols))
    for c0 in range(0, num_cols, GEMM_COLS):
        torch.mm(rows, cols[c0 : c0 + GEMM_COLS].T, out=out[:, c0 : c0 + GEMM_COLS])
    return out


def diagonal_in_chunk(r0: int, rows: int, num_cols: int, masked_diagonal: int | None, device: torch.device):
    """(tile rows, columns) of the masked entries (i, i + d) that fall in rows r0..r0+rows, or None."""
    if masked_diagonal is None:
        return None
    first, last = max(r0, -masked_diagonal), min(r0 + rows, num_cols - masked_diagonal)  # rows whose j is in range
    if first >= last:
        return None
    rows_hit = torch.arange(first, last, device=device)
    return rows_hit - r0, rows_hit + masked_diagonal


def shared_exp_spread(dtype: torch.dtype) -> float:
    """How far below a tile's reference its exponentials may reach and still share one exponential: three
    quarters of the way to the smallest normal number (fp32: 65), so that every term that matters keeps
    its full precision. (The CUDA kernels' rule, kernels/shared_exponential.cuh, in natural units.)"""
    return -0.75 * math.log(torch.finfo(dtype).tiny)


@dataclass
class KeptTile:
    """A forward's whole similarity tile, handed to the backward, which overwrites it.

    With `reference` set it holds E = exp(S - reference), the shared exponential of both directions
    (reference: the max of S), with the masked entries 0; else S with the masked entries -inf.
    """

    tile: torch.Tensor
    reference: float | None


def tiled_lse(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, masked_diagonal: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward sweep: row (n,) and column (N,) log-sum-exps in the accumulation dtype, no autograd."""
    acc = accumulate_dtype(image.dtype)
    img, txt, scale = image.detach().to(acc), text.detach().to(acc), logit_scale.detach().to(acc).reshape(())
    chunk = chunk_rows(txt.shape[0], txt.element_size())
    spread = shared_exp_spread(acc)
    row_lse = torch.empty(img.shape[0], dtype=acc, device=img.device)
    col_lse = None
    for r0 in range(0, img.shape[0], chunk):
        # (chunk, N); scaling [chunk, D] rows beats a pass over the tile
        sim = similarity(img[r0 : r0 + chunk] * scale, txt)
        masked = diagonal_in_chunk(r0, sim.shape[0], sim.shape[1], masked_diagonal, sim.device)
        row_lse[r0 : r0 + chunk], part, _ = _tile_lse(sim, masked, spread)
        col_lse = part if col_lse is None else torch.logaddexp(col_lse, part)
        del sim  # before the next tile is made: one tile alive at a time
    return row_lse, col_lse


def whole_lse(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, masked_diagonal: int | None
) -> tuple[torch.Tensor, torch.Tensor, KeptTile]:
    """`tiled_lse` in one tile that is kept: (row_lse, col_lse, the tile), for a backward that reads it
    instead of recomputing S (`tiled_loss_gradient`'s `kept`). Deterministic: a second call on the same
    inputs remakes the same tile bit for bit."""
    acc = accumulate_dtype(image.dtype)
    img, txt, scale = image.detach().to(acc), text.detach().to(acc), logit_scale.detach().to(acc).reshape(())
    sim = similarity(img * scale, txt)
    masked = diagonal_in_chunk(0, sim.shape[0], sim.shape[1], masked_diagonal, sim.device)
    row_lse, col_lse, reference = _tile_lse(sim, masked, shared_exp_spread(acc))
    return row_lse, col_lse, KeptTile(sim, reference)


def _tile_lse(
    sim: torch.Tensor, masked: tuple[torch.Tensor, torch.Tensor] | None, spread: float
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """Row log-sum-exps and column partial log-sum-exps of one tile, its `masked` entries left out, and
    the reference of the tile's shared exponential or None (the tile as KeptTile describes it after).

    Where the tile's logits lie within `spread` of its max, one exponential relative to that max serves
    both directions; other tiles take one max and one exponential per direction.
    """
    # The spread before the mask: a bound on the kept entries'.
    lo, hi = torch.aminmax(sim) if _branches_on_data(sim) else (None, None)
    if hi is not None and bool(hi - lo <= spread):  # one host sync per tile, against two passes over it
        exp = sim.sub_(hi).exp_()
        if masked is not None:
            exp[masked] = 0.0
        # a row of zeros (all masked) gives -inf
        return exp.sum(1).log_().add_(hi), exp.sum(0).log_().add_(hi), hi.item()
    if masked is not None:
        sim[masked] = float("-inf")
    return _logsumexp(sim, 1), _logsumexp(sim, 0), None


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.logsumexp's result (a row of -inf gives -inf) in fewer passes over x."""
    top = x.amax(dim, keepdim=True)
    top = torch.where(top == float("-inf"), 0.0, top)  # all -inf: exp(-inf - 0) = 0, log 0 = -inf
    return (x - top).exp_().sum(dim).log_() + top.squeeze(dim)


def _branches_on_data(x: torch.Tensor) -> bool:
    """Whether a sweep may pick its path from x's values: on a CPU (on a GPU each check would stall the
    stream) and outside a traced graph (which cannot branch on data)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _finite_span(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of x's finite values; (inf, -inf) when it has none."""
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return math.inf, -math.inf
    lo, hi = torch.aminmax(finite)
    return lo.item(), hi.item()


def _shared_reference(row_lse: torch.Tensor, col_span: tuple[float, float], spread: float) -> float | None:
    """The reference of a backward tile's shared exponential: the largest finite log-sum-exp among its
    rows and the used columns (col_span: their finite extremes; every logit is at most its row's), or None
    when they spread too far."""
    lo, hi = _finite_span(row_lse)
    lo, hi = min(lo, col_span[0]), max(hi, col_span[1])
    return hi if lo <= hi and hi - lo <= spread else None


class TiledContrastiveLse(torch.autograd.Function):
    """(image [n, D], text [N, D], scale [], d) -> (row_lse [n], col_lse [N]) with a recomputing backward."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, masked_diagonal: int | None):
        row_lse, col_lse = tiled_lse(image, text, logit_scale, masked_diagonal)
        ctx.masked_diagonal = masked_diagonal
        ctx.save_for_backward(image, text, logit_scale, row_lse, col_lse)
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_row: torch.Tensor | None, grad_col: torch.Tensor | None):
        image, text, logit_scale, row_lse, col_lse = ctx.saved_tensors
        acc = row_lse.dtype
        img, txt = image.detach().to(acc), text.detach().to(acc)
        scale = logit_scale.detach().to(acc).reshape(())
        grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row.detach().to(acc)
        grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col.detach().to(acc)
        grad_img = torch.empty_like(img)
        grad_txt = torch.zeros_like(txt)
        grad_dot = torch.zeros((), dtype=acc, device=img.device)  # sum of G * <image_i, text_j>
        chunk = chunk_rows(txt.shape[0], txt.element_size())
        for r0 in range(0, img.shape[0], chunk):
            rows = slice(r0, r0 + chunk)
            sim = similarity(img[rows], txt).mul_(scale)  # (chunk, N)
            # G = gr * P_row + gc * P_col: the gradient of the two log-sum-exps w.r.t. the similarities;
            # P_col is made in place of S, so that two tiles are alive at most.
            grad_sim = (sim - row_lse[rows, None]).exp_().mul_(grad_row[rows, None])
            grad_sim.addcmul_(sim.sub_(col_lse[None, :]).exp_(), grad_col[None, :])
            del sim
            masked = diagonal_in_chunk(r0, grad_sim.shape[0], grad_sim.shape[1], ctx.masked_diagonal, img.device)
            if masked is not None:
                grad_sim[masked] = 0.0  # left out of the forward (and exp(S + inf) would not be 0)
            row_grad = grad_sim @ txt
            grad_dot += torch.dot(img[rows].flatten(), row_grad.flatten())  # sum_j G_ij <I_i, T_j> over the rows
            grad_img[rows] = row_grad.mul_(scale)
            grad_txt.addmm_(grad_sim.T, img[rows], alpha=scale)
            del grad_sim  # before the next tile is made
        anchors = (image, text, logit_scale)
        return (
            first_order_only(grad_img.to(image.dtype), anchors) if ctx.needs_input_grad[0] else None,
            first_order_only(grad_txt.to(text.dtype), anchors) if ctx.needs_input_grad[1] else None,
            first_order_only(grad_dot.to(logit_scale.dtype).reshape(logit_scale.shape), anchors)
            if ctx.needs_input_grad[2]
            else None,
            None,
        )


def contrastive_lse_torch(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, masked_diagonal: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled PyTorch `contrastive_lse` (inputs already checked)."""
    return TiledContrastiveLse.apply(image, text, logit_scale, masked_diagonal)


def tiled_loss_gradient(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    coefficients: tuple[torch.Tensor, ...],
    ids: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    masked_diagonal: int | None,
    *,
    positives_are_pairs: bool = False,
    kept: KeptTile | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tiled PyTorch `contrastive_loss_backward` (see fastclip.ops.contrastive_gradient for the math).

    `coefficients` = (grad_row [n], grad_col [N], grad_positive [n], grad_uniform [], grad_pair [n]) and
    `ids` = (row_ids [n], col_ids [N], partner [n]). `positives_are_pairs`: the caller knows every entry
    with row_ids == col_ids is a pair entry (see LossTerms). `kept`: the whole tile from `whole_lse`, read
    (and overwritten) instead of recomputed. Returns the feature and scale gradients unrounded, in the
    accumulation dtype: the caller rounds each once.
    """
    acc = row_lse.dtype
    grad_row, grad_col, grad_positive, grad_uniform, grad_pair = (c.to(acc) for c in coefficients)
    row_ids, col_ids, partner = ids
    img, txt, scale = image.detach().to(acc), text.detach().to(acc), logit_scale.detach().to(acc).reshape(())
    n, num_cols = img.shape[0], txt.shape[0]
    grad_img, grad_txt = torch.empty_like(img), torch.zeros_like(txt)
    row_rest = torch.empty(n, dtype=acc, device=img.device)  # sum of P_row over the row but its pair entry
    col_rest = torch.zeros(num_cols, dtype=acc, device=img.device)  # the same for P_col down each column
    chunk = n if kept is not None else chunk_rows(num_cols, txt.element_size())
    spread = shared_exp_spread(acc)
    used_cols = grad_col != 0  # SupCon has no column terms: its column log-sum-exps play no part
    from_kept = kept is not None and kept.reference is not None  # the exponential is made: no span needed
    col_span = _finite_span(col_lse[used_cols]) if _branches_on_data(col_lse) and not from_kept else None
    for r0 in range(0, n, chunk):
        rows = slice(r0, r0 + chunk)
        sim = kept.tile if kept is not None else similarity(img[rows] * scale, txt)  # (chunk, N), overwritten below
        # the entries filled in from the rests (pair entries) and the masked ones (exp(S + inf) is not 0)
        masked = diagonal_in_chunk(r0, sim.shape[0], num_cols, masked_diagonal, sim.device)
        left_out = _LeftOut(partner[rows], masked)
        if kept is not None and kept.reference is not None:  # the forward's exponential: no pass to redo
            ref, exp = kept.reference, sim
        else:
            ref = None if col_span is None else _shared_reference(row_lse[rows], col_span, spread)
            exp = None if ref is None else sim.sub_(ref).exp_()
        if ref is not None:
            # One exponential E = exp(S - ref) for both terms: P_row = E a_i, P_col = E b_j.
            left_out.zero(exp)
            # (0 for a log-sum-exp of -inf: every entry of that row or column is left out)
            a = torch.where(torch.isfinite(row_lse[rows]), (ref - row_lse[rows]).exp_(), 0.0)
            b = torch.where(used_cols & torch.isfinite(col_lse), (ref - col_lse).exp_(), 0.0)
            row_rest[rows] = exp.sum(1).mul_(a)
            col_rest.addcmul_(exp.sum(0), b)
            # G = gr P_row + gc P_col - gu (- gp [same class] below), all in fp32 before anything is rounded
            grad_sim = _times_outer_sum(exp, a * grad_row[rows], b * grad_col).sub_(grad_uniform)
        else:
            p_col = (sim - col_lse[None, :]).exp_()
            p_row = sim.sub_(row_lse[rows, None]).exp_()
            left_out.zero(p_row, p_col)
            row_rest[rows] = p_row.sum(1)
            col_rest += p_col.sum(0)
            grad_sim = p_row.mul_(grad_row[rows, None]).addcmul_(p_col, grad_col[None, :]).sub_(grad_uniform)
        if not positives_are_pairs:  # else the term lands on pair entries only, which are set afterwards
            _subtract_positives(grad_sim, row_ids[rows], col_ids, grad_positive[rows])
        left_out.zero(grad_sim)
        grad_img[rows] = (grad_sim @ txt).mul_(scale)
        grad_txt.addmm_(grad_sim.T, img[rows], alpha=scale)
        sim = exp = grad_sim = p_row = p_col = None  # before the next tile is made
    add_pair_entries(img, txt, scale, (grad_row, grad_col, grad_pair), partner, row_rest, col_rest, grad_img, grad_txt)
    # dL/ds = sum_ij G_ij <I_i, T_j> = <I, dL/dI> / s: n * D products instead of a pass over every tile
    grad_scale = torch.dot(img.reshape(-1), grad_img.reshape(-1)) / scale
    return grad_img, grad_txt, grad_scale


def row_steps(tile: torch.Tensor) -> range:
    """Starts of the row steps in which an elementwise pass over `tile` goes: on a CPU steps whose
    temporaries stay cache-sized, so no second tile is allocated; elsewhere one step (a GPU launches a
    kernel per step, and the CUDA op, not this path, is what runs there by default)."""
    if tile.device.type != "cpu":
        return range(0, tile.shape[0], max(1, tile.shape[0]))
    return range(0, tile.shape[0], max(1, (256 << 10) // (tile.shape[1] * tile.element_size())))


def _times_outer_sum(tile: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """tile *= row[:, None] + col[None, :], in place."""
    steps = row_steps(tile)
    for r0 in steps:
        tile[r0 : r0 + steps.step].mul_(row[r0 : r0 + steps.step, None] + col[None, :])
    return tile


def _subtract_positives(tile: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor, amount: torch.Tensor) -> None:
    """tile[i, j] -= amount[i] wherever row_ids[i] == col_ids[j], in place."""
    steps = row_steps(tile)
    for r0 in steps:
        rows = slice(r0, r0 + steps.step)
        tile[rows].sub_(torch.where(row_ids[rows, None] == col_ids[None, :], amount[rows, None], 0.0))


class _LeftOut:
    """The entries of a [chunk, N] tile whose gradient is not the tile formula's: each row's pair entry
    (i, partner_i) where partner_i >= 0, and the masked diagonal. Indexed, never a [chunk, N] mask."""

    def __init__(self, partner: torch.Tensor, masked: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.has_pair = partner >= 0  # (chunk,)
        self.pair_cols = partner.clamp_min(0)[:, None]  # (chunk, 1): column 0 stands in where there is none
        self.masked = masked

    def zero(self, *tiles: torch.Tensor) -> None:
        """Set the left-out entries of each tile to 0, in place."""
        for tile in tiles:
            kept = torch.where(self.has_pair[:, None], 0.0, tile.gather(1, self.pair_cols))
            tile.scatter_(1, self.pair_cols, kept)
            if self.masked is not None:
                tile[self.masked] = 0.0


def add_pair_entries(img, txt, scale, coefficients, partner, row_rest, col_rest, grad_img, grad_txt) -> None:
    """Add the pair entries G_i,partner(i) = grad_pair_i - gr_i row_rest_i - gc_p col_rest_p in place.

    P - 1 at a pair entry is minus the rest of its row (column): a sum of small terms, exact where 1 - P is
    below fp32's spacing near 1 (a nearly solved batch), where exp(S - lse) - 1 would be pure rounding.
    """
    grad_row, grad_col, grad_pair = coefficients
    has_pair = partner >= 0
    target = partner.clamp(min=0)
    pair_grad = grad_pair - grad_row * row_rest - grad_col[target] * col_rest[target]
    weight = (scale * torch.where(has_pair, pair_grad, 0.0))[:, None]  # (n, 1)
    # In row chunks: whole [n, D] products would add about a gradient and a half to the backward's peak.
    step = max(1, PAIR_CHUNK_BYTES // (img.shape[1] * img.element_size()))
    for r0 in range(0, img.shape[0], step):
        rows, rows_target = slice(r0, r0 + step), target[r0 : r0 + step]
        grad_img[rows].add_(txt[rows_target] * weight[rows])
        grad_txt.index_add_(0, rows_target, img[rows] * weight[rows])
