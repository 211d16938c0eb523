"""bf16/fp16 feature gradients of the contrastive losses are rounded once, from fp32 math.

The positive-pair and label-smoothing terms of dL/dS nearly cancel the log-sum-exp terms on a nearly
solved batch (P_ii -> 1), so they must be folded into the gradient before its one rounding to the input
dtype, with the positive entries' P - 1 taken as minus the rest of their row (column): exact where
1 - P underflows fp32's spacing near 1. Property tests (hypothesis, derandomized) over alignments from
random (eps = 1) to nearly solved (text = normalize(image + eps * noise), eps down to 1e-4), logit scales
up to 100, sizes from 1 up: the gradients against float64 math on the same rounded inputs must be

  - within ROUNDINGS roundings of each row's size (or of the fp32 size of the terms the row sums, where
    those cancel: at the positives of rows with several, P - y is an fp32 difference), plus the dtype's
    underflow, and
  - never worse than the naive loss in the same dtype (logits in the input dtype, softmax in fp32, as
    under autocast) by more than NAIVE_FACTOR, plus one rounding.

The CUDA op rounds s * G to the input dtype for its tensor-core GEMMs: there each term of a row carries
one rounding of the dtype instead of fp32's (`rounded_tiles`). CUDA targets run under `-m cuda`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from loss_helpers import LOSS_TARGETS
from test_properties import fixed_settings

import fastclip
from fastclip import _extension
from fastclip.functional import contrastive_lse
from fastclip.ops import contrastive_lse_torch
from fastclip.ops.reference import contrastive_loss_reference as label_contrastive_loss_reference
from fastclip.ops.reference import supcon_loss_reference

DTYPES = (torch.bfloat16, torch.float16)
ROUNDINGS = 4  # the output's own rounding is one; fp32 products and sums add well under one more
NAIVE_FACTOR = 2  # flash-attention's rule
FP32_TERMS = 64 * torch.finfo(torch.float32).eps  # fp32 error relative to the size of a row's terms


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def underflow(dtype: torch.dtype) -> float:
    """Absolute error a value may carry from the dtype's (and fp32's) gradual underflow."""
    info = torch.finfo(dtype)
    return 2 * info.smallest_normal * info.eps + 1e3 * torch.finfo(torch.float32).smallest_normal


def aligned_pairs(gen: torch.Generator, rows: int, dim: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows and their partners normalize(x + noise * e): noise 1 is random, 1e-4 nearly solved."""
    x = F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)
    y = F.normalize(x + noise * torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)
    return x, y


def gradients(loss_fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    return list(torch.autograd.grad(loss_fn(*leaves), leaves))


def minus_rest(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """P - Y by rows, with P - 1 at a row's only positive written as minus the rest of the row: float64's
    own P - 1 keeps ~1e-16 of it, all there is when 1 - P is ~1e-15 (the references' autograd does that)."""
    diff = p - y
    rows, cols = (y == 1).nonzero(as_tuple=True)  # rows whose one positive takes all the target
    others = p.masked_fill(y == 1, 0.0).sum(1)
    diff[rows, cols] = -others[rows]
    return diff


def shared_targets(y: torch.Tensor) -> torch.Tensor:
    """The targets of rows with several positives: there P - y is an fp32 difference of two terms of this
    size (no rest of the row to take it from), exact only to fp32's resolution of each (ties make it ~0)."""
    return y * (y < 1)


def clip_reference(image, text, scale, labels, weight: float, smoothing: float):
    """Float64 dL/dS of the CLIP loss on the rounded inputs, and the feature gradients (s G T, s G^T I)."""
    i, t, s = image.double().cpu(), text.double().cpu(), float(scale)
    n = i.shape[0]
    logits = s * i @ t.T
    same = (
        torch.eye(n, dtype=torch.float64)
        if labels is None
        else (labels.cpu()[:, None] == labels.cpu()[None, :]).double()
    )
    y = same / same.sum(1, keepdim=True)
    d_row = minus_rest(logits.softmax(1), y)
    d_col = minus_rest(logits.softmax(0).T, y.T).T
    smooth = smoothing * (y - 1.0 / n)
    g = (weight * (d_row + smooth) + (1 - weight) * (d_col + smooth)) / n
    size = g.abs() + shared_targets(y) / n
    return g, [s * g @ t, s * g.T @ i], [s * size @ t.norm(dim=1), s * size.T @ i.norm(dim=1)]


def supcon_reference(features, labels, temperature: float):
    """Float64 dL/dS of SupCon / NT-Xent on the rounded inputs, and the feature gradient s (G + G^T) f."""
    f, s = features.double().cpu(), 1.0 / temperature
    m = f.shape[0]
    ids = torch.arange(m // 2).repeat(2) if labels is None else labels.cpu()
    self_mask = torch.eye(m, dtype=torch.bool)
    logits = (s * f @ f.T).masked_fill(self_mask, float("-inf"))
    positive = ((ids[:, None] == ids[None, :]) & ~self_mask).double()
    count = positive.sum(1, keepdim=True)
    y = positive / count.clamp(min=1)
    kept = (count > 0).double()
    g = kept * minus_rest(logits.softmax(1), y) / kept.sum().clamp(min=1)
    g = g.masked_fill(self_mask, 0.0)
    sym = g + g.T
    size = sym.abs() + kept * (shared_targets(y) + shared_targets(y).T) / kept.sum().clamp(min=1)
    return g, [s * sym @ f], [s * size @ f.norm(dim=1)]


def check_rounded_once(
    got: list[torch.Tensor],
    want: list[torch.Tensor],
    naive: list[torch.Tensor],
    terms: list[torch.Tensor],
    dtype: torch.dtype,
    rounded_tiles: bool,
) -> tuple[float, float]:
    """The two bounds of the module docstring; returns the worst (error / row size, error / naive error).

    `rounded_tiles`: the op rounds each s * G_ij to the input dtype for its tensor-core GEMMs (the CUDA
    op), one rounding of each term, so the terms' fp32 allowance becomes the dtype's.
    """
    u, floor = unit_roundoff(dtype), underflow(dtype)
    term_error = u + FP32_TERMS if rounded_tiles else FP32_TERMS
    worst_rows, worst_naive = 0.0, 0.0
    for index, (g, w, nv, t) in enumerate(zip(got, want, naive, terms)):
        assert g.dtype == dtype and torch.isfinite(g).all(), (
            f"gradient {index}: {g.dtype}, finite {torch.isfinite(g).all()}"
        )
        err_rows = (g.double() - w).norm(dim=1)
        size_rows = w.norm(dim=1)
        bound_rows = ROUNDINGS * u * size_rows + term_error * t + floor * math.sqrt(w.shape[1])
        ratio = err_rows / bound_rows
        worst = int(ratio.argmax())
        assert (err_rows <= bound_rows).all(), (
            f"gradient {index} row {worst}: error {err_rows[worst]:.3e} > bound {bound_rows[worst]:.3e} "
            f"(row norm {size_rows[worst]:.3e}, terms {t[worst]:.3e}, {dtype})"
        )
        err, err_naive = (g.double() - w).norm().item(), (nv.double() - w).norm().item()
        slack = u * w.norm().item() + term_error * t.norm().item() + floor * math.sqrt(w.numel())
        assert err <= NAIVE_FACTOR * err_naive + slack, (
            f"gradient {index}: error {err:.3e} > {NAIVE_FACTOR} x naive {err_naive:.3e} + {slack:.3e} ({dtype})"
        )
        worst_rows = max(worst_rows, (err_rows / (u * size_rows.clamp(min=1e-300))).max().item())
        worst_naive = max(worst_naive, err / max(err_naive, 1e-300))
    return worst_rows, worst_naive


# ------------------------------------------------------------------------------------ CLIP
def clip_case(data, device: str):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    n = data.draw(st.one_of(st.sampled_from([1, 2, 3, 7]), st.integers(1, 48)), label="n")
    dim = data.draw(st.integers(1, 48), label="dim")
    noise = 10.0 ** data.draw(st.floats(-4.0, 0.0), label="log10 noise")
    scale = data.draw(st.floats(1.0, 100.0), label="scale")
    weight = data.draw(st.sampled_from([0.5, 0.0, 1.0, 0.3]), label="weight")
    smoothing = data.draw(st.sampled_from([0.0, 0.0, 0.1, 0.37]), label="label_smoothing")
    with_labels = data.draw(st.booleans(), label="labels")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    image, text = (x.to(dtype).to(device) for x in aligned_pairs(gen, n, dim, noise))
    labels = None
    if with_labels:  # mostly distinct classes, so that singleton classes (solved pairs) and shared ones mix
        labels = torch.randint(0, max(1, 2 * n), (n,), generator=gen).to(device)
    return dtype, image, text, torch.tensor(scale, device=device), labels, weight, smoothing


def clip_naive(labels, weight: float, smoothing: float):
    """Logits in the input dtype, cross-entropy in fp32: the naive loss under autocast."""

    def loss(i, t, s):
        logits = ((i @ t.T) * s.to(i.dtype)).float()
        n = logits.shape[0]
        same = torch.eye(n, device=i.device) if labels is None else (labels[:, None] == labels[None, :]).float()
        targets = same / same.sum(1, keepdim=True)
        per_image = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        per_text = F.cross_entropy(logits.T, targets, label_smoothing=smoothing)
        return weight * per_image + (1 - weight) * per_text

    return loss


def run_clip_case(backend: str, case) -> tuple[float, float]:
    dtype, image, text, scale, labels, weight, smoothing = case

    def fused(i, t):
        return fastclip.contrastive_loss(
            i, t, scale, weight=weight, label_smoothing=smoothing, labels=labels, backend=backend
        )

    inputs = [image, text]
    got = [g.cpu() for g in gradients(fused, inputs)]
    naive = [g.cpu() for g in gradients(lambda i, t: clip_naive(labels, weight, smoothing)(i, t, scale), inputs)]
    _, want, terms = clip_reference(image, text, scale.item(), labels, weight, smoothing)
    return check_rounded_once(got, want, naive, terms, dtype, rounded_tiles=backend == "cuda")


@pytest.mark.parametrize("target", LOSS_TARGETS)
@fixed_settings(80)
@given(data=st.data())
def test_clip_gradients_rounded_once(target, data) -> None:
    backend, device = target
    run_clip_case(backend, clip_case(data, device))


# ------------------------------------------------------------------------------------ SupCon / NT-Xent
def supcon_case(data, device: str):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    half = data.draw(st.one_of(st.sampled_from([1, 2, 3]), st.integers(1, 24)), label="images")
    dim = data.draw(st.integers(1, 48), label="dim")
    noise = 10.0 ** data.draw(st.floats(-4.0, 0.0), label="log10 noise")
    temperature = data.draw(st.floats(0.01, 1.0), label="temperature")
    with_labels = data.draw(st.booleans(), label="labels")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    first, second = aligned_pairs(gen, half, dim, noise)
    features = torch.cat([first, second]).to(dtype).to(device)
    labels = None
    if with_labels:  # classes of the images, shared by both views
        labels = torch.randint(0, max(1, 2 * half), (half,), generator=gen).repeat(2).to(device)
    return dtype, features, labels, temperature


def supcon_naive(labels, temperature: float):
    def loss(f):
        m = f.shape[0]
        ids = torch.arange(m // 2, device=f.device).repeat(2) if labels is None else labels
        self_mask = torch.eye(m, dtype=torch.bool, device=f.device)
        logits = (
            ((f @ f.T) * torch.tensor(1 / temperature, dtype=f.dtype)).float().masked_fill(self_mask, float("-inf"))
        )
        log_prob = logits - logits.logsumexp(1, keepdim=True)
        positive = (ids[:, None] == ids[None, :]) & ~self_mask
        count = positive.sum(1)
        per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(1) / count.clamp(min=1)
        kept = count > 0
        return per_anchor[kept].sum() / kept.sum().clamp(min=1)

    return loss


def run_supcon_case(backend: str, case) -> tuple[float, float]:
    dtype, features, labels, temperature = case
    got = gradients(lambda f: fastclip.supcon_loss(f, labels, temperature=temperature, backend=backend), [features])
    naive = gradients(supcon_naive(labels, temperature), [features])
    _, want, terms = supcon_reference(features, labels, temperature)
    return check_rounded_once(
        [g.cpu() for g in got], want, [g.cpu() for g in naive], terms, dtype, rounded_tiles=backend == "cuda"
    )


@pytest.mark.parametrize("target", LOSS_TARGETS)
@fixed_settings(60)
@given(data=st.data())
def test_supcon_gradients_rounded_once(target, data) -> None:
    backend, device = target
    run_supcon_case(backend, supcon_case(data, device))


# ------------------------------------------------------------------------------------ a solved batch
@pytest.mark.parametrize("target", LOSS_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_solved_batch(target, dtype: torch.dtype) -> None:
    """N = 512 pairs at noise 1e-4 and scale 100 (loss ~1e-30): each gradient row within a few roundings."""
    backend, device = target
    gen = torch.Generator().manual_seed(3)
    image, text = (x.to(dtype).to(device) for x in aligned_pairs(gen, 512, 64, 1e-4))
    case = (dtype, image, text, torch.tensor(100.0, device=device), None, 0.5, 0.0)
    run_clip_case(backend, case)


# ------------------------------------------------------------------------------------ the references
@pytest.mark.parametrize("labels", [None, torch.tensor([0, 1, 1, 2, 3, 3, 3])], ids=["pairs", "labels"])
def test_references_match_autograd(labels) -> None:
    """The analytic float64 gradients above are the references' own where nothing cancels."""
    gen = torch.Generator().manual_seed(5)
    image, text = aligned_pairs(gen, 7, 5, 1.0)
    _, grads, _ = clip_reference(image, text, 4.0, labels, 0.3, 0.1)
    want = gradients(
        lambda i, t: label_contrastive_loss_reference(i, t, 4.0, labels, weight=0.3, label_smoothing=0.1), [image, text]
    )
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    features = torch.cat([image, text])
    ids = None if labels is None else labels.repeat(2)
    _, (grad,), _ = supcon_reference(features, ids, 0.5)
    (want,) = gradients(lambda f: supcon_loss_reference(f, ids, 0.5), [features])
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------ the fused op
needs_op = pytest.mark.skipif(
    not hasattr(torch.ops.fastclip, "contrastive_loss_backward") if _extension.is_loaded() else True,
    reason="fastclip._C (with contrastive_loss_backward) not built",
)


def op_arguments(
    n: int, num_cols: int, dim: int, dtype: torch.dtype, device: str, masked_diagonal: int | None, scale: float = 7.0
):
    """Inputs of fastclip::contrastive_loss_backward with arbitrary coefficients, some pairs, some classes."""
    gen = torch.Generator().manual_seed(n + num_cols)
    image = F.normalize(torch.randn(n, dim, generator=gen), dim=-1).to(dtype).to(device)
    text = F.normalize(torch.randn(num_cols, dim, generator=gen), dim=-1).to(dtype).to(device)
    scale = torch.tensor(scale, device=device)
    row_lse, col_lse = contrastive_lse(image, text, scale, masked_diagonal=masked_diagonal, backend="torch")
    acc = row_lse.dtype
    coefficient = lambda size: torch.rand(size, generator=gen, dtype=acc).to(device)  # noqa: E731
    col_ids = torch.randint(0, 5, (num_cols,), generator=gen).to(device)
    row_ids = torch.randint(0, 5, (n,), generator=gen).to(device)
    partner = torch.randint(-1, num_cols, (n,), generator=gen).to(device)  # -1: no pair entry
    coefficients = (coefficient(n), coefficient(num_cols), coefficient(n), coefficient(()), coefficient(n))
    return (*coefficients, image, text, scale, row_lse, col_lse, row_ids, col_ids, partner, masked_diagonal)


@needs_op
@pytest.mark.parametrize("shape, masked_diagonal", [((150, 600), None), ((150, 600), 3), ((1, 1), None), ((70, 9), -2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_op_matches_tiled_twin(monkeypatch, shape, masked_diagonal, dtype: torch.dtype) -> None:
    """The C++ op (row blocks of 64, column tiles of 512) against the tiled PyTorch twin (forced to chunks of
    16 rows): pair entries, classes, masks and the rests across block, tile and chunk boundaries."""
    monkeypatch.setattr(contrastive_lse_torch, "chunk_rows", lambda *args: 16)
    args = op_arguments(*shape, 12, dtype, "cpu", masked_diagonal)
    got = torch.ops.fastclip.contrastive_loss_backward(*args)
    coefficients, (image, text, scale, row_lse, col_lse), ids = args[:5], args[5:10], args[10:13]
    want = contrastive_lse_torch.tiled_loss_gradient(
        image, text, scale, row_lse, col_lse, coefficients, ids, masked_diagonal
    )
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == row_lse.dtype
        torch.testing.assert_close(g, w, **tolerance)


@needs_op
@pytest.mark.parametrize(
    "device, dtype",
    [("cpu", dtype) for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)]
    + [pytest.param("cuda", dtype, marks=pytest.mark.cuda) for dtype in (torch.float32, torch.bfloat16, torch.float16)],
    ids=str,
)
def test_opcheck(device: str, dtype: torch.dtype) -> None:
    args = op_arguments(13, 21, 9, dtype, device, 2)
    torch.library.opcheck(torch.ops.fastclip.contrastive_loss_backward.default, args)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["chunked", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [7.0, 100.0], ids=lambda s: f"scale={s}")
def test_cuda_op_matches_tiled_twin(monkeypatch, path: str, dtype: torch.dtype, scale: float) -> None:
    """Both CUDA paths' pair entries, classes and rests across their tiles (128 x 128 for the fused
    kernel, whose shared exponential covers every tile at s = 7 and few at s = 100), against the twin."""
    monkeypatch.setenv("FASTCLIP_CUDA_LOSS_PATH", path)
    args = op_arguments(150, 600, 40, dtype, "cuda", 3, scale)
    got = torch.ops.fastclip.contrastive_loss_backward(*args)
    coefficients, (image, text, scale, row_lse, col_lse), ids = args[:5], args[5:10], args[10:13]
    want = contrastive_lse_torch.tiled_loss_gradient(image, text, scale, row_lse, col_lse, coefficients, ids, 3)
    for g, w in zip(got, want):  # tf32/bf16 tiles of G: a rounding of each entry, fp32 sums
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


@pytest.mark.parametrize("target", LOSS_TARGETS)
@pytest.mark.parametrize("loss", ["clip", "supcon"])
def test_double_backward_is_refused(target, loss: str) -> None:
    backend, device = target
    image = F.normalize(torch.randn(6, 5, dtype=torch.float32, device=device), dim=-1).requires_grad_()
    if loss == "clip":
        value = fastclip.contrastive_loss(image, image.flip(0), 5.0, label_smoothing=0.1, backend=backend)
    else:
        value = fastclip.supcon_loss(image, backend=backend)
    (grad,) = torch.autograd.grad(value, image, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order only"):
        grad.square().sum().backward()
