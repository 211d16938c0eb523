"""Property-based tests (hypothesis) of the ops against their float64 references, extremes included.

Each example draws shapes, a dtype, the logit scale (up to CLIP's clamp of 100), the direction weight,
label smoothing, a memory layout (contiguous, column-major, strided, expanded, tied rows) and, for the
data-parallel form, a split of the batch into ranks; the inputs come from a drawn seed. The op's value
and every gradient (w.r.t. the op's inputs: the strided or expanded views themselves) are compared
with the float64 reference evaluated on the very same rounded inputs.

Tolerances, derived rather than fitted:
- Contrastive loss. Every backend upcasts bf16/fp16 inputs to fp32 and accumulates there, so against
  the float64 reference on the rounded inputs the only errors are fp32 arithmetic (`accumulate`:
  loss_helpers' fp32 tolerance, growing with the largest logit) and, for the feature gradients, which
  are returned in the input dtype, their rounding (`Contributions`: eps/2 per element for each use of
  the tensor, the uses summed by autograd in that dtype). The loss and the logit-scale gradient are
  fp32 results and get no low-precision allowance at all, even at logit_scale 100 with bf16 inputs.
  A quantity that cancels to ~0 (a batch of one, tied rows) is measured against the size of the terms
  that cancel (`natural_sizes`).
- Attention. fp32/fp64: absolute error within 1e-5 (1e-10) of the tensor's scale. fp16/bf16: the
  kernels round probabilities to the input dtype before the P @ V products, so the design's rule
  (flash-attention's) applies: at most twice the error of the plain same-dtype computation, plus one
  eps of the dtype times the products that get rounded (`product_magnitudes`: what rounding P, dP and
  dS costs on its own; on tiny shapes the plain computation can be exact by luck).

Runs are deterministic (`derandomize=True`, no example database); `--hypothesis-show-statistics`
reports the examples run per test. The Triton kernel runs under TRITON_INTERPRET=1 (set by conftest)
on few, small examples; the same properties run on CUDA tensors under `-m cuda`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loss_helpers import CLIP_SCALE, LOSS_TARGETS, RELATIVE_TOLERANCE

import fastclip
from fastclip.backends import TRITON_DTYPES, triton_available
from fastclip.functional import attention, contrastive_loss_from_lse, contrastive_lse
from fastclip.ops.attention_reference import (
    attention_reference,
    attention_scores_reference,
)
from fastclip.ops.reference import contrastive_loss_reference, contrastive_lse_reference

MAX_SCALE = 100.0  # CLIP clamps exp(t) to 100: the largest logits the loss meets in training
LOSS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def accumulate(dtype: torch.dtype, max_logit: float) -> float:
    """Relative error of the fp32 (float64 for float64 inputs) arithmetic: loss_helpers' tolerance, or
    8 eps x the largest |logit| when that is larger. A logit S is rounded to ~eps * |S|, and exp() turns
    that into a relative error of each probability P: with logits of 900 (features of norm 3 at scale
    100) fp32 cannot do better than ~1e-4, and where a gradient cancels to 0 (ties) this is what remains."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return max(RELATIVE_TOLERANCE[acc], 8 * torch.finfo(acc).eps * max_logit)


def fixed_settings(examples: int) -> settings:
    """Deterministic: the same examples on every run and machine (no database, derandomized)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def dtypes_for(backend: str) -> tuple[torch.dtype, ...]:
    return LOSS_DTYPES[:3] if backend == "cuda" else LOSS_DTYPES  # the CUDA kernel takes no float64


# ------------------------------------------------------------------------------------------ loss inputs

LAYOUTS = ("contiguous", "column-major", "strided", "expanded", "tied")


@dataclass
class Features:
    """A leaf tensor (what gradients are taken against) and how the op's [rows, dim] input is viewed from it."""

    leaf: torch.Tensor
    view: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, leaf: torch.Tensor | None = None) -> torch.Tensor:
        return self.view(self.leaf if leaf is None else leaf)


def make_features(
    generator: torch.Generator, rows: int, dim: int, dtype: torch.dtype, device: str, layout: str, norm: float
) -> Features:
    """[rows, dim] features of the given layout; unit rows times `norm` (rounded to `dtype` afterwards)."""

    def draw(*shape: int) -> torch.Tensor:
        x = F.normalize(torch.randn(*shape, dim, generator=generator, dtype=torch.float64), dim=-1) * norm
        return x

    if layout == "contiguous":
        leaf, view = draw(rows), lambda t: t
    elif layout == "column-major":  # [dim, rows] storage, seen transposed: stride (1, rows)
        leaf, view = draw(rows).T.contiguous(), lambda t: t.T
    elif layout == "strided":  # every other column of a [rows, 2 * dim] tensor
        leaf = torch.stack([draw(rows), draw(rows)], dim=-1).reshape(rows, 2 * dim)
        view = lambda t: t[:, ::2]
    elif layout == "expanded":  # one row seen `rows` times (stride 0): every pair ties
        leaf, view = draw(1), lambda t: t.expand(rows, dim)
    elif layout == "tied":  # rows drawn from a few distinct ones: ties inside the batch
        index = torch.randint(0, max(1, rows // 3), (rows,), generator=generator)
        leaf, view = draw(max(1, rows // 3)), lambda t: t[index.to(t.device)]
    else:
        raise AssertionError(layout)
    return Features(leaf.to(device=device, dtype=dtype), view)


def scale_leaf(value: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    """logit_scale as models keep it: a trainable fp32 tensor (float64 beside float64 features)."""
    return torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)


def evaluate(
    fn, image: Features, text: Features, scale: torch.Tensor, *, as_float64: bool = False
) -> list[torch.Tensor]:
    """[value, grad w.r.t. the image input, the text input, the scale] of fn(image, text, scale).

    The gradients are those of the op's inputs, i.e. of the (possibly strided or expanded) views; the
    views' own backward (a sum over expanded rows) is PyTorch's, not the op's.
    """
    leaves = [image.leaf, text.leaf, scale]
    if as_float64:
        leaves = [x.double() for x in leaves]
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    inputs = [image(leaves[0]), text(leaves[1]), leaves[2]]
    value = fn(*inputs)
    grads = torch.autograd.grad(value, inputs)
    return [value.detach(), *(g.detach() for g in grads)]


@dataclass
class Contributions:
    """How the backends build a feature gradient: one rounded gradient per use of the tensor, summed by autograd.

    `contrastive_loss` uses each feature tensor twice (the fused log-sum-exp op, and the O(N * D) terms
    assembled in fp32), and each use returns its gradient rounded to the input dtype; the data-parallel
    form uses them 2 * ranks times. With m uses summed in the input dtype the result is within
    m * eps/2 * sum_k |c_k| of the exact gradient (elementwise, c_k the exact contributions): a bound in
    the size of the parts, which can be far larger than their sum when they cancel.

    The CUDA kernel also writes s * G (G = dL/dS) for a block of rows in the input dtype before its
    GEMMs with the features (as Liger's and QuACK's fused cross-entropies do), which costs another
    eps/2 * s * (|G| @ |T|) (image; |G|^T @ |I| for the text): `tile_image`, `tile_text`.
    """

    image: torch.Tensor  # sum over uses of |contribution|, float64, the shape of the image input
    text: torch.Tensor
    uses: int
    tile_image: torch.Tensor  # s * |G| @ |T| summed over the fused ops, float64
    tile_text: torch.Tensor


def contributions(image, text, scale, ranks, weight: float, smoothing: float, pick: int | None = None) -> Contributions:
    """The exact (float64) per-use contributions, for the loss of all `ranks` (or of rank `pick` alone)."""
    image, text, scale = (x.detach().double() for x in (image, text, scale))
    num_pairs = text.shape[0]
    lse_uses = [(image[lo:hi].clone().requires_grad_(), text.clone().requires_grad_()) for lo, hi in ranks]
    rest_uses = [(image[lo:hi].clone().requires_grad_(), text.clone().requires_grad_()) for lo, hi in ranks]
    logits = [scale * (i @ t.T) for i, t in lse_uses]  # (n_k, N): what each fused op computes
    lses = [(x.logsumexp(1), x.logsumexp(0)) for x in logits]
    col_lse = torch.stack([col for _, col in lses]).logsumexp(0)
    shares = []
    for (lo, hi), (row_lse, _), (i, t) in zip(ranks, lses, rest_uses):
        lse_terms = weight * row_lse.sum() + (1 - weight) * col_lse[lo:hi].sum()
        positives = scale * (i * t[lo:hi]).sum()
        total = scale * (i.sum(0) @ t.sum(0))
        shares.append((lse_terms - (1 - smoothing) * positives - smoothing / num_pairs * total) / num_pairs)
    uses = [x for pair in lse_uses + rest_uses for x in pair]
    grads = torch.autograd.grad(sum(shares) if pick is None else shares[pick], uses + logits, allow_unused=True)
    abs_image, abs_text = torch.zeros_like(image), torch.zeros_like(text)
    for k, (lo, hi) in enumerate([*ranks, *ranks]):
        g_image, g_text = grads[2 * k], grads[2 * k + 1]
        if g_image is not None:
            abs_image[lo:hi] += g_image.abs()
        if g_text is not None:
            abs_text += g_text.abs()
    tile_image, tile_text = torch.zeros_like(image), torch.zeros_like(text)
    for (lo, hi), g_logits in zip(ranks, grads[len(uses) :]):
        if g_logits is not None:
            tile_image[lo:hi] += scale * g_logits.abs() @ text.abs()
            tile_text += scale * g_logits.abs().T @ image[lo:hi].abs()
    return Contributions(abs_image, abs_text, 2 * len(ranks), tile_image, tile_text)


def assert_loss_close(
    got: list[torch.Tensor],
    want: list[torch.Tensor],
    dtype: torch.dtype,
    floors: list[float],
    parts: Contributions,
    max_logit: float,
    backend: str,
) -> None:
    """The module docstring's bound: fp32 accumulation, plus the rounding of feature gradients to `dtype`."""
    names = ("loss", "grad_image", "grad_text", "grad_logit_scale")
    eps = 0.0 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
    for name, g, w, floor in zip(names, got, want, floors):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        w_norm = w.double().norm().item()
        tol = accumulate(dtype, max_logit)
        bound = tol * max(w_norm, floor)
        if name in ("grad_image", "grad_text"):
            assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected the input's {dtype}"
            size = (parts.image if name == "grad_image" else parts.text).norm().item()
            bound += parts.uses * eps / 2 * size * (1 + parts.uses * eps) + tol * eps * size
            if eps:  # below the smallest normal number (fp16: 6e-5) rounding is absolute: half a subnormal step
                bound += parts.uses * torch.finfo(dtype).smallest_normal * eps / 2 * math.sqrt(g.numel())
            if backend == "cuda":  # the gradient tile, in the input dtype (see Contributions)
                bound += eps / 2 * (parts.tile_image if name == "grad_image" else parts.tile_text).norm().item()
        err = (g.double() - w.double().to(g.device)).norm().item()
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (|expected| {w_norm:.3e}, {dtype})"


def natural_sizes(scale: float, norm: float, rows: int, loss_size: float | None = None) -> list[float]:
    """Floors for quantities that cancel to ~0 (a batch of one, ties): the size of the terms that cancel.

    A logit is s * norm^2 * cosine; the loss subtracts logits of that size, a feature-gradient row is
    (s/N) sum_j (P - Y)_ij t_j (norm ~ s * norm / sqrt(N) over the batch), the scale's gradient is a sum
    of (P - Y) * norm^2 * cosine. The 0.1 is loss_helpers' (quantities rarely reach their full size).
    """
    logit = max(1.0, scale * norm**2)
    grad = 0.1 * logit / (max(norm, 1e-3) * math.sqrt(rows))
    return [logit if loss_size is None else loss_size, grad, grad, 0.1 * max(1.0, norm**2)]


scales = st.one_of(st.sampled_from([1.0, CLIP_SCALE, MAX_SCALE]), st.floats(0.01, MAX_SCALE))
unit_interval = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0))
seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------------------------------- loss properties


def check_loss(backend: str, device: str, dtype, n, dim, scale, weight, smoothing, layouts, norm, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    image = make_features(generator, n, dim, dtype, device, layouts[0], norm)
    text = make_features(generator, n, dim, dtype, device, layouts[1], norm)
    logit_scale = scale_leaf(scale, dtype, device)
    options = dict(weight=weight, label_smoothing=smoothing)
    got = evaluate(
        lambda i, t, s: fastclip.contrastive_loss(i, t, s, backend=backend, **options), image, text, logit_scale
    )
    want = evaluate(
        lambda i, t, s: contrastive_loss_reference(i, t, s, **options), image, text, logit_scale, as_float64=True
    )
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got[0].dim() == 0
    parts = contributions(image(), text(), logit_scale, [(0, n)], weight, smoothing)
    assert_loss_close(
        got, want, dtype, natural_sizes(scale, norm, n), parts, max_logit=scale * norm**2, backend=backend
    )


@pytest.mark.parametrize("target", LOSS_TARGETS)
@fixed_settings(150)
@given(
    data=st.data(),
    n=st.integers(1, 64),
    dim=st.integers(1, 48),
    scale=scales,
    weight=unit_interval,
    smoothing=unit_interval,
    layouts=st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)),
    norm=st.sampled_from([1.0, 1.0, 0.25, 3.0]),
    seed=seeds,
)
def test_contrastive_loss_matches_reference(
    target, data, n, dim, scale, weight, smoothing, layouts, norm, seed
) -> None:
    """Loss and gradients of `contrastive_loss` against the float64 reference on the same rounded inputs."""
    backend, device = target
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    check_loss(backend, device, dtype, n, dim, scale, weight, smoothing, layouts, norm, seed)


EXTREMES = [  # (n, dim, scale, weight, smoothing, layouts)
    pytest.param(37, 24, MAX_SCALE, 0.5, 0.0, ("contiguous", "contiguous"), id="scale100"),
    pytest.param(1, 16, MAX_SCALE, 0.5, 0.1, ("contiguous", "contiguous"), id="batch-of-one"),
    pytest.param(9, 1, MAX_SCALE, 0.3, 0.0, ("contiguous", "contiguous"), id="dim-1"),
    pytest.param(9, 16, CLIP_SCALE, 0.5, 0.0, ("expanded", "expanded"), id="all-rows-tie"),
    pytest.param(12, 16, MAX_SCALE, 1.0, 1.0, ("tied", "column-major"), id="ties-full-smoothing"),
]


@pytest.mark.parametrize(
    "target, dtype",
    [
        pytest.param(t.values[0], dtype, id=f"{t.id}-{str(dtype)[6:]}", marks=t.marks)
        for t in LOSS_TARGETS
        for dtype in dtypes_for(t.values[0][0])
    ],
)
@pytest.mark.parametrize("n, dim, scale, weight, smoothing, layouts", EXTREMES)
def test_contrastive_loss_extremes(target, dtype, n, dim, scale, weight, smoothing, layouts) -> None:
    """Always run, in every dtype: logit_scale 100 (no overflow or NaN in bf16/fp16), a batch of one, D = 1, ties."""
    backend, device = target
    check_loss(backend, device, dtype, n, dim, scale, weight, smoothing, layouts, 1.0, seed=n * dim)


@pytest.mark.parametrize("target", LOSS_TARGETS)
@fixed_settings(60)
@given(
    data=st.data(),
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    dim=st.integers(1, 32),
    scale=scales,
    seed=seeds,
)
def test_contrastive_lse_matches_reference(
    target, data, rows: int, cols: int, dim: int, scale: float, seed: int
) -> None:
    """The op itself, n != N rows: both log-sum-exps, and gradients through a random mix of them."""
    backend, device = target
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    generator = torch.Generator().manual_seed(seed)
    image = make_features(generator, rows, dim, dtype, device, "contiguous", 1.0)
    text = make_features(generator, cols, dim, dtype, device, "contiguous", 1.0)
    mix_row = torch.randn(rows, generator=generator, dtype=torch.float64).to(device)
    mix_col = torch.randn(cols, generator=generator, dtype=torch.float64).to(device)

    def mixed(lse_fn):
        def fn(i, t, s):
            row_lse, col_lse = lse_fn(i, t, s)
            assert row_lse.shape == (rows,) and col_lse.shape == (cols,)
            return (row_lse.double() * mix_row).sum() + (col_lse.double() * mix_col).sum()

        return fn

    logit_scale = scale_leaf(scale, dtype, device)
    got = evaluate(mixed(lambda i, t, s: contrastive_lse(i, t, s, backend=backend)), image, text, logit_scale)
    want = evaluate(mixed(contrastive_lse_reference), image, text, logit_scale, as_float64=True)
    # one use of each input: one rounding of its gradient; G = dL/dS mixes the row and column softmaxes
    i64, t64 = image().detach().double(), text().detach().double()
    logits = scale * (i64 @ t64.T)
    grad_logits = (mix_row[:, None] * logits.softmax(1) + mix_col[None, :] * logits.softmax(0)).abs()
    parts = Contributions(
        want[1].abs(), want[2].abs(), 1, scale * grad_logits @ t64.abs(), scale * grad_logits.T @ i64.abs()
    )
    # an lse is ~ s + log N, mixed in with standard-normal weights; its gradients are mixes of s * features
    # (rows) and of cosines (the scale), weighted by the same weights
    weights = torch.cat([mix_row, mix_col]).cpu()
    lse_size = (max(1.0, scale) + math.log(rows * cols + 1)) * weights.norm().item()
    grad = 0.1 * max(1.0, scale) * weights.norm().item()
    floors = [lse_size, grad, grad, 0.1 * weights.abs().sum().item()]
    assert_loss_close(got, want, dtype, floors, parts, max_logit=scale, backend=backend)


def reference_shares(image, text, scale, ranks, weight: float, smoothing: float) -> list[torch.Tensor]:
    """Each rank's share as documented (its rows' log-sum-exps, positives and part of the smoothing sum),
    from the materialised float64 logits: w * row_lse_i + (1 - w) * col_lse_i - (1 - eps) * S_ii
    - (eps / N) * sum_j S_ij summed over the rank's rows i, over N. For eps = 0 it is the rank's pairs'
    cross-entropies; the smoothing term of a column belongs to no single rank, so this split is a choice."""
    logits = scale * (image @ text.T)  # (N, N)
    num_pairs = logits.shape[0]
    per_row = (
        weight * logits.logsumexp(1)
        + (1 - weight) * logits.logsumexp(0)
        - (1 - smoothing) * logits.diagonal()
        - smoothing / num_pairs * logits.sum(1)
    )
    return [per_row[lo:hi].sum() / num_pairs for lo, hi in ranks]


@pytest.mark.parametrize("target", LOSS_TARGETS)
@fixed_settings(60)
@given(
    data=st.data(),
    sizes=st.lists(st.integers(1, 24), min_size=1, max_size=4),
    dim=st.integers(1, 32),
    scale=scales,
    weight=unit_interval,
    smoothing=unit_interval,
    seed=seeds,
)
def test_offset_shares_match_reference(target, data, sizes, dim, scale, weight, smoothing, seed) -> None:
    """Data-parallel form: rank k holds image rows offset..offset+n_k against all N texts.

    Each rank's `contrastive_loss_from_lse` share (its row lse from `contrastive_lse`, the column lse
    merged over ranks) equals the float64 share (see `reference_shares`), with gradients; the shares
    add up to the loss of the whole batch, gradients included.
    """
    backend, device = target
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    ranks, num_pairs = list(itertools.pairwise(offsets)), offsets[-1]
    pick = data.draw(st.integers(0, len(ranks) - 1), label="rank checked alone")
    generator = torch.Generator().manual_seed(seed)
    image = make_features(generator, num_pairs, dim, dtype, device, "contiguous", 1.0)
    text = make_features(generator, num_pairs, dim, dtype, device, "contiguous", 1.0)
    logit_scale = scale_leaf(scale, dtype, device)
    options = dict(weight=weight, label_smoothing=smoothing)

    def shares(i, t, s):
        lses = [contrastive_lse(i[lo:hi], t, s, backend=backend) for lo, hi in ranks]
        col_lse = torch.stack([col for _, col in lses]).logsumexp(0)  # what all_reduce_logsumexp computes
        return [
            contrastive_loss_from_lse(i[lo:hi], t, s, row, col_lse, offset=lo, **options)
            for (lo, hi), (row, _) in zip(ranks, lses)
        ]

    lo, hi = ranks[pick]
    got = evaluate(lambda *x: shares(*x)[pick], image, text, logit_scale)
    want = evaluate(
        lambda *x: reference_shares(*x, ranks, weight, smoothing)[pick], image, text, logit_scale, as_float64=True
    )
    parts = contributions(image(), text(), logit_scale, ranks, weight, smoothing, pick=pick)
    share_size = max(1.0, scale) * (hi - lo) / num_pairs
    floors = natural_sizes(scale, 1.0, num_pairs, loss_size=share_size)
    assert_loss_close(got, want, dtype, floors, parts, max_logit=scale, backend=backend)
    got = evaluate(lambda *x: sum(shares(*x)), image, text, logit_scale)
    want = evaluate(
        lambda i, t, s: contrastive_loss_reference(i, t, s, **options), image, text, logit_scale, as_float64=True
    )
    parts = contributions(image(), text(), logit_scale, ranks, weight, smoothing)
    assert_loss_close(got, want, dtype, natural_sizes(scale, 1.0, num_pairs), parts, max_logit=scale, backend=backend)


@pytest.mark.parametrize("target", LOSS_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_batch_on_the_tiled_paths(target, dtype: torch.dtype) -> None:
    """N = 3000, D = 8 at logit_scale 100: several row chunks / column tiles, against the dense reference."""
    backend, device = target
    check_loss(backend, device, dtype, 3000, 8, MAX_SCALE, 0.3, 0.1, ("contiguous", "contiguous"), 1.0, seed=3000)


# ----------------------------------------------------------------------------------- attention properties

interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or not triton_available(),
    reason="Triton interpreter tests run on machines without a GPU (there the cuda tests run the compiled kernels)",
)
CUDA_ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ATTENTION_LAYOUTS = ("contiguous", "fused-qkv", "expanded-batch")


def attention_leaves(generator, batch, heads, seq_q, seq_k, head_dim, dtype, device, layout):
    """(leaves, view) with view(leaves) -> (q, k, v) of the given layout."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    if layout == "fused-qkv":  # views of one [B, S, 3 * H * D] projection (needs seq_q == seq_k)
        leaves = [randn(batch, seq_q, 3 * heads * head_dim)]
        return leaves, lambda x: tuple(x[0].view(batch, seq_q, 3, heads, head_dim).permute(2, 0, 3, 1, 4))
    if layout == "expanded-batch":  # one sequence seen by every batch entry (stride 0)
        leaves = [randn(1, heads, s, head_dim) for s in (seq_q, seq_k, seq_k)]
        return leaves, lambda x: tuple(t.expand(batch, -1, -1, -1) for t in x)
    leaves = [randn(batch, heads, s, head_dim) for s in (seq_q, seq_k, seq_k)]
    return leaves, lambda x: tuple(x)


def attention_results(backend, leaves, view, grad_out, compute_dtype, **kwargs) -> list[torch.Tensor]:
    """[out, dq, dk, dv] (gradients of the op's inputs, the views themselves): `backend` None runs the
    reference with everything cast to `compute_dtype`."""
    q, k, v = view([x.detach().to(compute_dtype).requires_grad_() for x in leaves])
    if backend is None:
        out = attention_reference(q, k, v, **kwargs)
    else:
        out = attention(q, k, v, backend=backend, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out.to(compute_dtype))]


def product_magnitudes(leaves, view, grad_out, *, causal, key_padding_mask, scale) -> list[float]:
    """max |.| of the products the kernels round, per output: P|V| (out), P^T|dO| (dv) and, with
    |dS| + P(|dP| + |delta|) for the softmax backward's terms, that times |K| (dq) or |Q| (dk), in float64.

    One rounding of P, dP or dS to the input dtype moves an output by at most eps/2 of these sums; they
    exceed the outputs themselves where the outputs cancel."""
    q, k, v = (t.double() for t in view([x.detach() for x in leaves]))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores, has_key = attention_scores_reference(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    probs = scores.masked_fill(~has_key, 0.0).softmax(-1).masked_fill(~has_key, 0.0)  # (B, H, Sq, Sk)
    d_probs = grad_out.double() @ v.transpose(-2, -1)  # (B, H, Sq, Sk)
    delta = (probs * d_probs).sum(-1, keepdim=True)
    terms = (probs * (d_probs - delta)).abs() + probs * (d_probs.abs() + delta.abs())
    return [
        (probs @ v.abs()).max().item(),
        (scale * terms @ k.abs()).max().item(),
        (scale * terms.transpose(-2, -1) @ q.abs()).max().item(),
        (probs.transpose(-2, -1) @ grad_out.double().abs()).max().item(),
    ]


def check_attention(backend: str, device: str, dtypes: tuple[torch.dtype, ...], data: st.DataObject) -> None:
    """Output and input gradients of `attention` against the float64 reference on the same rounded inputs."""
    small = backend == "triton" and device == "cpu"
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    batch, heads = data.draw(st.integers(1, 2), label="batch"), data.draw(st.integers(1, 2), label="heads")
    seq_q = data.draw(st.integers(1, 24 if small else 80), label="seq_q")
    seq_k = data.draw(st.one_of(st.just(seq_q), st.integers(1, 24 if small else 80)), label="seq_k")
    head_dim = data.draw(st.sampled_from([1, 16, 32, 80] if small else [1, 7, 16, 32, 64, 80]), label="head_dim")
    causal = data.draw(st.booleans(), label="causal")
    layout = data.draw(st.sampled_from(ATTENTION_LAYOUTS if seq_q == seq_k else ATTENTION_LAYOUTS[::2]), label="layout")
    mask_kind = data.draw(st.sampled_from(["none", "random", "one-entry-all-padded", "strided"]), label="mask")
    # None: 1/sqrt(head_dim); else a multiple of it (scores of CLIP-like size; the kernels see the product)
    factor = data.draw(st.one_of(st.none(), st.floats(0.1, 2.0)), label="scale / default")
    scale = None if factor is None else factor / math.sqrt(head_dim)
    generator = torch.Generator().manual_seed(data.draw(seeds, label="seed"))

    leaves, view = attention_leaves(generator, batch, heads, seq_q, seq_k, head_dim, dtype, device, layout)
    mask = None
    if mask_kind != "none":
        width = 2 * seq_k if mask_kind == "strided" else seq_k
        mask = (torch.rand(batch, width, generator=generator) < 0.3).to(device)
        mask = mask[:, ::2] if mask_kind == "strided" else mask
        if mask_kind == "one-entry-all-padded":
            mask[-1] = True  # rows that see no key: output 0, no gradient, never NaN
    grad_out = torch.randn(batch, heads, seq_q, head_dim, generator=generator, dtype=torch.float64).to(
        device=device, dtype=dtype
    )
    kwargs = dict(causal=causal, key_padding_mask=mask, scale=scale)

    got = attention_results(backend, leaves, view, grad_out, dtype, **kwargs)
    truth = attention_results(None, leaves, view, grad_out, torch.float64, **kwargs)
    plain = (
        attention_results(None, leaves, view, grad_out, dtype, **kwargs)
        if dtype in (torch.float16, torch.bfloat16)
        else None
    )
    magnitudes = product_magnitudes(leaves, view, grad_out, **kwargs) if plain is not None else None
    for i, (g, t) in enumerate(zip(got, truth)):
        name = ("out", "dq", "dk", "dv")[i]
        assert g.shape == t.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        size = max(1.0, t.abs().max().item())
        err = (g.double() - t).abs().max().item()
        if plain is None:
            bound = (1e-10 if dtype == torch.float64 else 1e-5) * size
        else:
            bound = 2 * (plain[i].double() - t).abs().max().item() + torch.finfo(dtype).eps * max(size, magnitudes[i])
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} ({dtype}, {layout}, mask {mask_kind})"


@pytest.mark.parametrize(
    "backend, device, dtypes",
    [
        pytest.param("torch", "cpu", (torch.float32, torch.float64, torch.bfloat16, torch.float16), id="torch-cpu"),
        # fp32 inputs are refused by the compiled kernels (tests/test_capability.py checks the error)
        pytest.param("triton", "cuda", TRITON_DTYPES, id="triton-cuda", marks=pytest.mark.cuda),
        pytest.param("torch", "cuda", CUDA_ATTENTION_DTYPES, id="torch-cuda", marks=pytest.mark.cuda),
    ],
)
@fixed_settings(150)
@given(data=st.data())
def test_attention_matches_reference(backend: str, device: str, dtypes, data) -> None:
    """`attention` on random shapes, masks, scales and layouts (fused-qkv and expanded views)."""
    check_attention(backend, device, dtypes, data)


@interpreted
@fixed_settings(30)
@given(data=st.data())
def test_triton_attention_interpreted_matches_reference(data) -> None:
    """The Triton kernels under TRITON_INTERPRET=1: fp32/fp16 only (the interpreter gives garbage for
    bf16, see docs/design.md), few and small examples (it is slow)."""
    check_attention("triton", "cpu", (torch.float32, torch.float16), data)
