"""Property-based tests (hypothesis) of the loss family against the float64 references: label-aware
CLIP, SupCon / NT-Xent and SigLIP over drawn sizes, feature dims, label layouts (from one class to all
distinct), scales, temperatures and biases, on every backend, in float32 and float64.

Each example draws a seed for the inputs; the loss and every gradient are compared with the float64
reference on the same rounded inputs. Tolerance: the fp32 (float64) arithmetic error of
test_properties.accumulate, which grows with the largest logit, relative to the quantity's size or,
where it cancels to ~0, to the size of the terms that cancel. bf16/fp16 are covered by the grids of
test_loss_family (they need a same-dtype baseline, not a relative bound). Deterministic
(derandomize=True); the CUDA targets run under `-m cuda`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from loss_helpers import LOSS_TARGETS
from test_properties import accumulate, fixed_settings

import fastclip
from fastclip.ops.reference import contrastive_loss_reference as label_contrastive_loss_reference
from fastclip.ops.reference import sigmoid_loss_reference, supcon_loss_reference

DTYPES = (torch.float32, torch.float64)


def draw_inputs(data, target, rows_max: int):
    backend, device = target
    dtype = data.draw(st.sampled_from(DTYPES[:1] if backend == "cuda" else DTYPES), label="dtype")
    n = data.draw(st.integers(1, rows_max), label="n")
    dim = data.draw(st.integers(1, 40), label="dim")
    classes = data.draw(st.integers(1, n), label="classes")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    labels = torch.randint(0, classes, (n,), generator=gen).to(device)

    def unit_rows(rows: int) -> torch.Tensor:
        x = F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)
        return x.to(dtype).to(device)

    return backend, device, dtype, n, labels, unit_rows


def assert_close_to_reference(fn, reference, inputs, dtype, max_logit: float, floors: list[float]) -> None:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    got = fn(*leaves)
    got_grads = torch.autograd.grad(got, leaves, allow_unused=True)
    ref_leaves = [x.detach().double().requires_grad_() for x in inputs]
    want = reference(*ref_leaves)
    want_grads = torch.autograd.grad(want, ref_leaves, allow_unused=True)
    tolerance = accumulate(dtype, max_logit)
    for index, (g, w, floor) in enumerate(zip((got, *got_grads), (want, *want_grads), floors)):
        g = torch.zeros_like(inputs[index - 1]) if g is None else g
        w = torch.zeros_like(ref_leaves[index - 1]) if w is None else w
        assert torch.isfinite(g).all(), f"output {index} is not finite"
        size = max(w.norm().item(), floor)
        err = (g.double() - w).norm().item()
        assert err <= tolerance * size, f"output {index}: error {err:.3e} > {tolerance:.1e} x {size:.3e}"


scales = st.one_of(st.sampled_from([1.0, 14.3, 100.0]), st.floats(0.01, 100.0))


@pytest.mark.parametrize("target", LOSS_TARGETS)
@fixed_settings(40)
@given(data=st.data(), scale=scales, weight=st.floats(0, 1), smoothing=st.sampled_from([0.0, 0.1]))
def test_label_clip(target, data, scale: float, weight: float, smoothing: float) -> None:
    backend, device, dtype, n, labels, unit_rows = draw_inputs(data, target, 300)
    image, text = unit_rows(n), unit_rows(n)
    logit_scale = torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    options = dict(weight=weight, label_smoothing=smoothing)
    grad_floor = 0.1 * max(1.0, scale) / math.sqrt(n)
    assert_close_to_reference(
        lambda i, t, s: fastclip.contrastive_loss(i, t, s, labels=labels, backend=backend, **options),
        lambda i, t, s: label_contrastive_loss_reference(i, t, s, labels, **options),
        (image, text, logit_scale),
        dtype,
        scale,
        [max(1.0, scale), grad_floor, grad_floor, 0.1],
    )


@pytest.mark.parametrize("target", LOSS_TARGETS)
@fixed_settings(40)
@given(data=st.data(), temperature=st.floats(0.02, 2.0), use_labels=st.booleans())
def test_supcon(target, data, temperature: float, use_labels: bool) -> None:
    backend, device, dtype, n, labels, unit_rows = draw_inputs(data, target, 300)
    features = unit_rows(2 * n)
    labels = torch.cat([labels, labels]) if use_labels else None
    scale = 1 / temperature
    assert_close_to_reference(
        lambda f: fastclip.supcon_loss(f, labels, temperature=temperature, backend=backend),
        lambda f: supcon_loss_reference(f, labels, temperature),
        (features,),
        dtype,
        scale,
        [max(1.0, scale), max(1.0, scale) / math.sqrt(2 * n)],
    )


@pytest.mark.parametrize("target", LOSS_TARGETS)
@fixed_settings(40)
@given(data=st.data(), scale=scales, bias=st.floats(-15.0, 5.0), use_labels=st.booleans())
def test_siglip(target, data, scale: float, bias: float, use_labels: bool) -> None:
    backend, device, dtype, n, labels, unit_rows = draw_inputs(data, target, 300)
    image, text = unit_rows(n), unit_rows(n)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logit_scale, logit_bias = (
        torch.tensor(scale, dtype=acc, device=device),
        torch.tensor(bias, dtype=acc, device=device),
    )
    labels = labels if use_labels else None
    logit = scale + abs(bias)
    floor = max(1.0, logit) / math.sqrt(n)
    assert_close_to_reference(
        lambda i, t, s, b: fastclip.sigmoid_loss(i, t, s, b, labels=labels, backend=backend),
        lambda i, t, s, b: sigmoid_loss_reference(i, t, s, b, labels),
        (image, text, logit_scale, logit_bias),
        dtype,
        logit,
        [max(1.0, logit), floor, floor, 1.0, 1.0],
    )
