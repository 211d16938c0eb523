"""The loss family on every backend against float64 references written from the formulas: label-aware
CLIP (UniCL positives), SupCon / NT-Xent, SigLIP's sigmoid loss, and the fused ops beneath them
(`contrastive_lse` with a masked diagonal, `pairwise_sigmoid`): loss and every gradient, the offset
(per-rank) forms, gradcheck, opcheck, torch.compile and the argument errors."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import LOSS_TARGETS, LOW_PRECISION, RELATIVE_TOLERANCE, _natural_size, error, features, scale_tensor

import fastclip
from fastclip import _extension
from fastclip.functional import (
    contrastive_loss_from_lse,
    contrastive_lse,
    pairwise_sigmoid,
    sigmoid_loss_share,
    supcon_loss_share,
)
from fastclip.ops.reference import contrastive_loss_reference as label_contrastive_loss_reference
from fastclip.ops.reference import sigmoid_loss_reference, supcon_loss_reference
from fastclip.ops.supcon_loss import as_temperature_scale

TARGETS = LOSS_TARGETS
FLOAT64_TARGETS = [t for t in TARGETS if t.id != "cuda"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_extension = pytest.mark.skipif(not _extension.is_loaded(), reason="fastclip._C not built")


def label_pattern(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """Label layouts that matter: all distinct, all equal, pairs, singletons beside large classes."""
    if kind == "distinct":
        return torch.randperm(n, generator=gen) * 7 - 3  # arbitrary (negative, sparse) ids
    if kind == "equal":
        return torch.full((n,), 5)
    if kind == "pairs":
        return torch.arange(n).div(2, rounding_mode="floor")[torch.randperm(n, generator=gen)]
    big = torch.randint(0, 2, (n,), generator=gen)  # two large classes ...
    singles = torch.rand(n, generator=gen) < 0.3
    return torch.where(singles, 100 + torch.arange(n), big)  # ... and ~30% singletons


PATTERNS = ("distinct", "equal", "pairs", "mixed")


def grads_of(fn: Callable, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """[value, d value / d tensor ...] on fresh leaves (None gradients become zeros)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    value = fn(*leaves)
    grads = torch.autograd.grad(value.sum(), leaves, allow_unused=True)
    return [value.detach()] + [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def as_float64(tensors) -> list[torch.Tensor]:
    return [t.detach().double() for t in tensors]


def assert_family_matches(got, want, names, dtype, scale: float, naive=None, grad_floor: float | None = None) -> None:
    """Each output within the dtype's tolerance of the float64 reference (2x the same-dtype naive error
    plus slack for bf16/fp16), relative to its size or, where it vanishes, its natural size (`grad_floor`
    for the feature gradients when given)."""
    for i, (name, g, w) in enumerate(zip(names, got, want)):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        floor = _natural_size(name if name in ("loss", "grad_logit_scale") else "grad_image", w, scale)
        if grad_floor is not None and name.startswith("grad_features"):
            floor = grad_floor
        size = max(w.double().norm().item(), floor)
        if dtype in LOW_PRECISION:
            # The fused op hands back its feature gradient in the input dtype and the O(N D) positive
            # term's gradient is added to it: two roundings of terms of the natural size, where the naive
            # code cancels them in fp32 first (visible when they cancel exactly, as at M = 2).
            slack = max(RELATIVE_TOLERANCE[torch.float32], 4 * torch.finfo(g.dtype).eps) * size
            bound = 2 * error(naive[i], w) + slack
        else:
            bound = RELATIVE_TOLERANCE[dtype] * size
        err = error(g, w)
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (|expected| = {size:.3e}, {dtype})"


def same_dtype_logits(i: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """What a user writes without fastclip: the logits in the input dtype, upcast for the loss."""
    return ((i @ t.T) * s.to(i.dtype)).float()


# ------------------------------------------------------------------------------------ label-aware CLIP
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, dim", [(1, 5), (2, 1), (7, 17), (64, 64), (257, 33)])
def test_label_clip_matches_reference(n: int, dim: int, dtype: torch.dtype, target) -> None:
    backend, device = target
    gen = torch.Generator().manual_seed(n * 31 + dim)
    image, text, scale = (
        features(n, dim, dtype, device),
        features(n, dim, dtype, device),
        scale_tensor(14.3, dtype, device),
    )
    names = ("loss", "grad_image", "grad_text", "grad_logit_scale")
    for kind, (weight, smoothing) in itertools.product(PATTERNS, [(0.5, 0.0), (0.3, 0.1), (1.0, 0.0)]):
        labels = label_pattern(kind, n, gen).to(device)
        opts = dict(weight=weight, label_smoothing=smoothing)
        got = grads_of(
            lambda i, t, s: fastclip.contrastive_loss(i, t, s, labels=labels, backend=backend, **opts),
            image,
            text,
            scale,
        )
        assert got[0].dtype == torch.float32 and got[1].dtype == dtype
        want = grads_of(
            lambda i, t, s: label_contrastive_loss_reference(i, t, s, labels, **opts), *as_float64((image, text, scale))
        )
        naive = None
        if dtype in LOW_PRECISION:

            def naive_fn(i, t, s):
                logits = same_dtype_logits(i, t, s)
                targets = (labels[:, None] == labels[None, :]).float()
                targets /= targets.sum(1, keepdim=True)
                ce = lambda x: F.cross_entropy(x, targets, label_smoothing=smoothing)
                return weight * ce(logits) + (1 - weight) * ce(logits.T)

            naive = grads_of(naive_fn, image, text, scale)
        assert_family_matches(got, want, names, dtype, 14.3, naive)


@pytest.mark.parametrize("target", FLOAT64_TARGETS)
def test_label_clip_without_labels_or_distinct_labels_is_clip(target) -> None:
    backend, device = target
    image, text, scale = features(40, 9, torch.float64, device), features(40, 9, torch.float64, device), 11.0
    plain = fastclip.contrastive_loss(image, text, scale, weight=0.3, backend=backend)
    distinct = fastclip.contrastive_loss(
        image, text, scale, weight=0.3, labels=torch.arange(40, device=device) * 3, backend=backend
    )
    assert plain.item() == pytest.approx(distinct.item(), rel=1e-12)
    assert fastclip.contrastive_loss(image, text, scale, labels=None, backend=backend).item() == pytest.approx(
        fastclip.contrastive_loss(image, text, scale, backend=backend).item(), rel=0
    )


@pytest.mark.parametrize("target", FLOAT64_TARGETS)
def test_label_clip_rank_shares_add_up(target) -> None:
    """Offset form: per-rank shares with the global labels and merged column lse sum to the loss."""
    backend, device = target
    gen = torch.Generator().manual_seed(3)
    image, text = features(23, 6, torch.float64, device), features(23, 6, torch.float64, device)
    scale = scale_tensor(9.0, torch.float64, device)
    labels = label_pattern("mixed", 23, gen).to(device)
    total = 0
    parts = [(0, 5), (5, 1), (6, 17)]
    partial_cols = []
    row_lses = []
    for offset, rows in parts:
        row_lse, col_lse = contrastive_lse(image[offset : offset + rows], text, scale, backend=backend)
        row_lses.append(row_lse), partial_cols.append(col_lse)
    col_lse = torch.stack(partial_cols).logsumexp(0)
    for (offset, rows), row_lse in zip(parts, row_lses):
        total = total + contrastive_loss_from_lse(
            image[offset : offset + rows],
            text,
            scale,
            row_lse,
            col_lse,
            offset=offset,
            weight=0.3,
            label_smoothing=0.1,
            labels=labels,
        )
    want = label_contrastive_loss_reference(image, text, scale, labels, weight=0.3, label_smoothing=0.1)
    got_grads = torch.autograd.grad(total, (image, text, scale))
    want_grads = torch.autograd.grad(want, (image, text, scale))
    torch.testing.assert_close(total, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------ SupCon / NT-Xent
def supcon_naive(labels, temperature):
    """The usual SupCon code in the input dtype (Khosla et al.'s reference, with their masking)."""

    def fn(f):
        logits = (f @ f.T).float() / temperature
        eye = torch.eye(f.shape[0], dtype=torch.bool, device=f.device)
        logits = logits.masked_fill(eye, float("-inf"))
        log_prob = logits - logits.logsumexp(1, keepdim=True)
        positive = (labels[:, None] == labels[None, :]) & ~eye
        count = positive.sum(1)
        per_anchor = -log_prob.masked_fill(~positive, 0).sum(1) / count.clamp(min=1)
        return per_anchor[count > 0].mean() if (count > 0).any() else (f * 0).sum().float()

    return fn


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, dim", [(2, 3), (8, 1), (14, 17), (130, 64), (514, 33)])
def test_supcon_matches_reference(m: int, dim: int, dtype: torch.dtype, target) -> None:
    backend, device = target
    gen = torch.Generator().manual_seed(m + dim)
    feats = features(m, dim, dtype, device)
    names = ("loss", "grad_features")
    for kind, temperature in itertools.product((None, *PATTERNS), (0.1, 0.5)):
        labels = None if kind is None else label_pattern(kind, m, gen).to(device)
        got = grads_of(lambda f: fastclip.supcon_loss(f, labels, temperature=temperature, backend=backend), feats)
        assert got[0].dtype == torch.float32 and got[1].dtype == dtype
        want = grads_of(lambda f: supcon_loss_reference(f, labels, temperature), *as_float64((feats,)))
        naive = None
        if dtype in LOW_PRECISION:
            ids = torch.arange(m // 2, device=device).repeat(2) if labels is None else labels
            naive = grads_of(supcon_naive(ids, temperature), feats)
        # Anchor i's gradient is (s/M)(sum_j P_ij f_j - mean of its positives) plus its share in the
        # others' rows: terms of norm ~ s/M per row, s/sqrt(M) over the batch, that cancel exactly at M = 2.
        assert_family_matches(got, want, names, dtype, 1 / temperature, naive, grad_floor=(1 / temperature) / m**0.5)


@pytest.mark.parametrize("target", FLOAT64_TARGETS)
def test_supcon_anchors_without_positives_leave_the_mean(target) -> None:
    backend, device = target
    feats = features(9, 4, torch.float64, device)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 5], device=device)  # 4 singletons
    got = fastclip.supcon_loss(feats, labels, temperature=0.2, backend=backend)
    kept = [fastclip.supcon_loss(feats[:5], labels[:5], temperature=0.2, backend=backend)]  # not the same batch ...
    assert got.item() == pytest.approx(supcon_loss_reference(feats, labels, 0.2).item(), rel=1e-12)
    assert got.item() != pytest.approx(kept[0].item())  # ... the singletons still sit in every denominator
    alone = features(5, 4, torch.float64, device)
    loss = fastclip.supcon_loss(alone, torch.arange(5, device=device), backend=backend)  # nobody has a positive
    assert loss.item() == 0
    (grad,) = torch.autograd.grad(loss, alone)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("target", FLOAT64_TARGETS)
def test_supcon_rank_shares_add_up(target) -> None:
    backend, device = target
    feats = features(17, 5, torch.float64, device)
    labels = label_pattern("mixed", 17, torch.Generator().manual_seed(1)).to(device)
    scale = as_temperature_scale(0.3, device, torch.float64)
    total = 0
    for offset, rows in [(0, 6), (6, 1), (7, 10)]:
        mine = feats[offset : offset + rows]
        row_lse, _ = contrastive_lse(mine, feats, scale, masked_diagonal=offset, backend=backend)
        total = total + supcon_loss_share(mine, feats, scale, row_lse, labels, offset=offset)
    want = supcon_loss_reference(feats, labels, 0.3)
    torch.testing.assert_close(total, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(total, feats)[0], torch.autograd.grad(want, feats)[0], rtol=1e-9, atol=1e-12
    )


# ------------------------------------------------------------------------------------ SigLIP
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, dim", [(1, 5), (2, 1), (7, 17), (64, 64), (257, 33)])
def test_siglip_matches_reference(n: int, dim: int, dtype: torch.dtype, target) -> None:
    backend, device = target
    gen = torch.Generator().manual_seed(n + 7 * dim)
    image, text = features(n, dim, dtype, device), features(n, dim, dtype, device)
    names = ("loss", "grad_image", "grad_text", "grad_logit_scale", "grad_logit_scale")  # bias: same natural size
    for kind, (scale_value, bias_value) in itertools.product((None, *PATTERNS), [(10.0, -10.0), (30.0, -3.0)]):
        labels = None if kind is None else label_pattern(kind, n, gen).to(device)
        scale, bias = scale_tensor(scale_value, dtype, device), scale_tensor(bias_value, dtype, device)
        got = grads_of(
            lambda i, t, s, b: fastclip.sigmoid_loss(i, t, s, b, labels=labels, backend=backend),
            image,
            text,
            scale,
            bias,
        )
        assert got[0].dtype == torch.float32 and got[1].dtype == dtype
        want = grads_of(
            lambda i, t, s, b: sigmoid_loss_reference(i, t, s, b, labels), *as_float64((image, text, scale, bias))
        )
        naive = None
        if dtype in LOW_PRECISION:
            ids = torch.arange(n, device=device) if labels is None else labels
            z = (ids[:, None] == ids[None, :]).float() * 2 - 1
            naive = grads_of(
                lambda i, t, s, b: -F.logsigmoid(z * (same_dtype_logits(i, t, s) + b)).sum() / n,
                image,
                text,
                scale,
                bias,
            )
        assert_family_matches(got, want, names, dtype, scale_value, naive)


@pytest.mark.parametrize("target", FLOAT64_TARGETS)
def test_siglip_is_stable_far_from_zero(target) -> None:
    """Positives at logit +90 and negatives at -90: the terms are e^-90, not 0 - 0 cancellation noise."""
    backend, device = target
    image = torch.eye(4, dtype=torch.float64, device=device)
    loss = fastclip.sigmoid_loss(image, image, 100.0, -10.0, backend=backend)
    want = sigmoid_loss_reference(image, image, 100.0, -10.0)
    assert 0 < loss.item() and loss.item() == pytest.approx(want.item(), rel=1e-10)


@pytest.mark.parametrize("target", FLOAT64_TARGETS)
def test_siglip_rank_shares_add_up(target) -> None:
    backend, device = target
    image, text = features(19, 6, torch.float64, device), features(19, 6, torch.float64, device)
    labels = label_pattern("pairs", 19, torch.Generator().manual_seed(2)).to(device)
    scale, bias = scale_tensor(10.0, torch.float64, device), scale_tensor(-5.0, torch.float64, device)
    total = sum(
        sigmoid_loss_share(image[o : o + r], text, scale, bias, offset=o, labels=labels, backend=backend)
        for o, r in [(0, 4), (4, 15)]
    )
    want = sigmoid_loss_reference(image, text, scale, bias, labels)
    torch.testing.assert_close(total, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(
        torch.autograd.grad(total, (image, text, scale, bias)), torch.autograd.grad(want, (image, text, scale, bias))
    ):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------ the fused ops
@pytest.mark.parametrize("target", FLOAT64_TARGETS)
@pytest.mark.parametrize(
    "rows, cols, diagonal",
    [(1, 1, 0), (5, 5, 0), (70, 600, 3), (70, 600, -20), (9, 4, 7), (4, 9, 100), (600, 70, -530)],
)
def test_masked_lse_matches_dense(rows: int, cols: int, diagonal: int, target) -> None:
    backend, device = target
    image, text = features(rows, 7, torch.float64, device), features(cols, 7, torch.float64, device)
    scale = scale_tensor(6.0, torch.float64, device)

    def dense(i, t, s):
        logits = s * i @ t.T
        r = torch.arange(rows, device=device)
        keep = r + diagonal < cols
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[r[keep & (r + diagonal >= 0)], (r + diagonal)[keep & (r + diagonal >= 0)]] = True
        logits = logits.masked_fill(mask, float("-inf"))
        return logits.logsumexp(1), logits.logsumexp(0)

    got_row, got_col = contrastive_lse(image, text, scale, masked_diagonal=diagonal, backend=backend)
    want_row, want_col = dense(image, text, scale)
    torch.testing.assert_close(got_row, want_row, rtol=1e-12, atol=0)  # -inf where a row is fully masked
    torch.testing.assert_close(got_col, want_col, rtol=1e-12, atol=0)
    weights = (
        torch.rand(rows, dtype=torch.float64, device=device),
        torch.rand(cols, dtype=torch.float64, device=device),
    )

    def weighted(lses):  # finite entries only: a fully masked row/column carries no gradient
        return sum((w * torch.where(torch.isfinite(x), x, 0)).sum() for w, x in zip(weights, lses))

    got = torch.autograd.grad(weighted((got_row, got_col)), (image, text, scale))
    want = torch.autograd.grad(weighted(dense(image, text, scale)), (image, text, scale))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("target", FLOAT64_TARGETS)
def test_pairwise_sigmoid_rows_match_dense(target) -> None:
    backend, device = target
    image, text = features(70, 9, torch.float64, device), features(600, 9, torch.float64, device)
    row_labels, col_labels = torch.randint(0, 5, (70,), device=device), torch.randint(0, 5, (600,), device=device)
    scale, bias = scale_tensor(12.0, torch.float64, device), scale_tensor(-4.0, torch.float64, device)
    got = grads_of(
        lambda i, t, s, b: (
            pairwise_sigmoid(i, t, s, b, row_labels, col_labels, backend=backend)
            * torch.linspace(0.5, 2, 70, dtype=torch.float64, device=device)
        ),
        image,
        text,
        scale,
        bias,
    )

    def dense(i, t, s, b):
        z = (row_labels[:, None] == col_labels[None, :]).double() * 2 - 1
        rows = F.softplus(-z * (s * i @ t.T + b)).sum(1)
        return rows * torch.linspace(0.5, 2, 70, dtype=torch.float64, device=device)

    for g, w in zip(got, grads_of(dense, image, text, scale, bias)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("target", FLOAT64_TARGETS)
def test_gradcheck(target) -> None:
    backend, device = target
    gen = torch.Generator().manual_seed(5)
    image, text = features(6, 3, torch.float64, device), features(6, 3, torch.float64, device)
    scale, bias = scale_tensor(3.0, torch.float64, device), scale_tensor(-1.0, torch.float64, device)
    labels = label_pattern("pairs", 6, gen).to(device)
    checks = [
        (
            lambda i, t, s: fastclip.contrastive_loss(i, t, s, labels=labels, label_smoothing=0.1, backend=backend),
            (image, text, scale),
        ),
        (
            lambda i, t, s, b: fastclip.sigmoid_loss(i, t, s, b, labels=labels, backend=backend),
            (image, text, scale, bias),
        ),
        (lambda f, t: fastclip.supcon_loss(f, labels, temperature=t, backend=backend), (image, scale)),
        (lambda f: fastclip.supcon_loss(f, backend=backend), (image,)),
        (lambda i, t, s: contrastive_lse(i, t, s, masked_diagonal=1, backend=backend), (image, text, scale)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(dtype: torch.dtype) -> None:
    image, text = features(13, 9, dtype), features(21, 9, dtype)
    scale, bias = scale_tensor(8.0, dtype), scale_tensor(-3.0, dtype)
    rows, cols = torch.randint(0, 4, (13,)), torch.randint(0, 4, (21,))
    torch.library.opcheck(torch.ops.fastclip.pairwise_sigmoid.default, (image, text, scale, bias, rows, cols))
    grad = torch.randn(13, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    args = (grad, image.detach(), text.detach(), scale.detach(), bias.detach(), rows, cols)
    torch.library.opcheck(torch.ops.fastclip.pairwise_sigmoid_backward.default, args)
    torch.library.opcheck(torch.ops.fastclip.contrastive_lse.default, (image, text, scale, 2))
    row_lse, col_lse = torch.ops.fastclip.contrastive_lse(image, text, scale, 2)
    args = (
        torch.randn_like(row_lse),
        torch.randn_like(col_lse),
        image.detach(),
        text.detach(),
        scale.detach(),
        row_lse.detach(),
        col_lse.detach(),
        2,
    )
    torch.library.opcheck(torch.ops.fastclip.contrastive_lse_backward.default, args)


@needs_extension
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_double_backward_is_refused(loss: str) -> None:
    """The fused backward ops are first-order: a gradient penalty through them raises instead of being wrong."""
    image, text = features(13, 9, torch.float64), features(13, 9, torch.float64)
    if loss == "clip":
        value = fastclip.contrastive_loss(image, text, 5.0, backend="cpp")
    else:
        value = fastclip.sigmoid_loss(image, text, 5.0, -2.0, backend="cpp")
    (grad,) = torch.autograd.grad(value, image, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order only"):
        grad.square().sum().backward()


@pytest.mark.parametrize("op", ["contrastive_lse", "pairwise_sigmoid"])
def test_tiled_op_double_backward_is_refused(op: str) -> None:
    """The tiled PyTorch ops' backwards hold their log-sum-exps fixed and work in place: first order too."""
    image, text = features(13, 9, torch.float64), features(13, 9, torch.float64)
    if op == "contrastive_lse":
        row_lse, col_lse = contrastive_lse(image, text, 5.0, backend="torch")
        value = row_lse.sum() + col_lse.sum()
    else:
        labels = torch.arange(13) // 2
        value = pairwise_sigmoid(image, text, 5.0, -2.0, labels, labels, backend="torch").sum()
    (grad,) = torch.autograd.grad(value, image, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order only"):
        grad.square().sum().backward()


@pytest.mark.parametrize(
    "backend, device",
    [
        ("torch", "cpu"),
        pytest.param("cpp", "cpu", marks=needs_extension),
        pytest.param("cuda", "cuda", marks=pytest.mark.cuda),
    ],
)
def test_torch_compile_fullgraph(backend: str, device: str) -> None:
    """Each loss traces into one graph (labels included) and gives the eager loss and gradients."""
    torch._dynamo.reset()
    image, text = features(30, 16, torch.float32, device), features(30, 16, torch.float32, device)
    scale, bias = scale_tensor(10.0, device=device), scale_tensor(-5.0, device=device)
    labels = label_pattern("mixed", 30, torch.Generator().manual_seed(4)).to(device)
    losses = [
        (lambda i, t, s, b: fastclip.contrastive_loss(i, t, s, labels=labels, backend=backend)),
        (lambda i, t, s, b: fastclip.sigmoid_loss(i, t, s, b, labels=labels, backend=backend)),
        (lambda i, t, s, b: fastclip.supcon_loss(torch.cat([i, t]), torch.cat([labels, labels]), backend=backend)),
        (lambda i, t, s, b: fastclip.supcon_loss(torch.cat([i, t]), temperature=0.2, backend=backend)),
    ]
    for loss_fn in losses:
        eager = grads_of(loss_fn, image, text, scale, bias)
        compiled = grads_of(torch.compile(loss_fn, fullgraph=True), image, text, scale, bias)
        for c, e in zip(compiled, eager):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda x: fastclip.contrastive_loss(x, x, 1.0, labels=torch.zeros(3, dtype=torch.long)),
            ValueError,
            r"labels must have shape \[4\]",
        ),
        (lambda x: fastclip.contrastive_loss(x, x, 1.0, labels=torch.zeros(4)), TypeError, "labels must hold integer"),
        (
            lambda x: fastclip.contrastive_loss(x, x, 1.0, labels=torch.zeros(4, dtype=torch.bool)),
            TypeError,
            "labels must hold integer",
        ),
        (
            lambda x: fastclip.contrastive_loss(x, x, 1.0, labels=[0, 1, 2, 3]),
            TypeError,
            "labels must be a torch.Tensor",
        ),
        (
            lambda x: fastclip.contrastive_loss(x, x, 1.0, labels=torch.zeros(4, dtype=torch.long, device="meta")),
            ValueError,
            "labels must be on",
        ),
        (
            lambda x: fastclip.sigmoid_loss(x, x, 1.0, -1.0, labels=torch.zeros(4, 1, dtype=torch.long)),
            ValueError,
            r"labels must have shape \[4\]",
        ),
        (lambda x: fastclip.sigmoid_loss(x, x, 1.0, float("nan")), ValueError, "logit_bias must be finite"),
        (lambda x: fastclip.sigmoid_loss(x, x, 1.0, torch.zeros(2)), ValueError, "logit_bias must hold one value"),
        (lambda x: fastclip.sigmoid_loss(x, x[:3], 1.0, 0.0), ValueError, "same batch size"),
        (lambda x: fastclip.supcon_loss(x[:3]), ValueError, "even number of rows"),
        (lambda x: fastclip.supcon_loss(x, temperature=0.0), ValueError, "temperature must be positive"),
        (lambda x: fastclip.supcon_loss(x, temperature="hot"), TypeError, "temperature must be a tensor or a number"),
        (
            lambda x: fastclip.supcon_loss(x, torch.zeros(5, dtype=torch.long)),
            ValueError,
            r"labels must have shape \[4\]",
        ),
        (lambda x: fastclip.supcon_loss(x[0]), ValueError, "features must be 2-D"),
        (lambda x: contrastive_lse(x, x, 1.0, masked_diagonal=True), TypeError, "masked_diagonal must be an int"),
        (
            lambda x: pairwise_sigmoid(
                x, x, 1.0, 0.0, torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long)
            ),
            ValueError,
            r"col_labels must have shape \[4\]",
        ),
        (lambda x: sigmoid_loss_share(x, x, 1.0, 0.0, offset=2), ValueError, "offset must be an int"),
        (
            lambda x: fastclip.SigLipLoss(init_logit_bias=float("inf")),
            ValueError,
            "init_logit_bias must be a finite number",
        ),
        (lambda x: fastclip.SigLipLoss()(x, x, logit_scale=2.0), ValueError, "pass both logit_scale and logit_bias"),
        (lambda x: fastclip.SupConLoss(temperature=-1.0), ValueError, "temperature must be positive"),
        (lambda x: fastclip.SupConLoss(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_raises_clear_error(call, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call(torch.randn(4, 3))


def test_modules_single_process_match_functions() -> None:
    image, text = features(12, 5, torch.float64), features(12, 5, torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 4, 5, 6, 6])
    siglip = fastclip.SigLipLoss().double()
    assert siglip.logit_scale.item() == pytest.approx(2.302585093) and siglip.logit_bias.item() == -10
    got = siglip(image, text, labels=labels)
    torch.testing.assert_close(got, sigmoid_loss_reference(image, text, 10.0, -10.0, labels))
    torch.testing.assert_close(
        siglip(image, text, torch.tensor(3.0, dtype=torch.float64), -1.0, output_dict=True)["contrastive_loss"],
        sigmoid_loss_reference(image, text, 3.0, -1.0),
    )
    got.backward()
    assert siglip.logit_scale.grad is not None and siglip.logit_bias.grad is not None
    torch.testing.assert_close(fastclip.SupConLoss(0.2)(image, labels), supcon_loss_reference(image, labels, 0.2))
    torch.testing.assert_close(
        fastclip.ClipLoss(0.3)(image, text, 7.0, labels=labels),
        label_contrastive_loss_reference(image, text, 7.0, labels, weight=0.3),
    )
