"""Shared pieces of the contrastive-loss tests: inputs, the same-dtype naive baseline, error bounds.

Tolerance rule (stated once): float32 and float64 results must match the float64 reference to a relative
error of `RELATIVE_TOLERANCE[dtype]`; bfloat16/float16 results follow flash-attention's rule, their error
against the float64 reference is at most twice that of the plain same-dtype PyTorch computation, plus
the fp32 tolerance and a rounding of the output (slack the plain computation may escape by luck on tiny
shapes). Quantities that vanish exactly are compared against their natural size instead of 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastclip.ops.reference import contrastive_loss_reference

LOW_PRECISION = (torch.bfloat16, torch.float16)
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}
CLIP_SCALE = 1 / 0.07  # CLIP's initial logit scale


def features(rows: int, dim: int, dtype: torch.dtype, device: str = "cpu", *, normalize: bool = True) -> torch.Tensor:
    """Random [rows, dim] features (unit rows like CLIP's, unless `normalize=False`), as a leaf in `dtype`."""
    x = torch.randn(rows, dim, dtype=torch.float64, device=device)
    if normalize:
        x = F.normalize(x, dim=-1)
    return x.to(dtype).requires_grad_()


def scale_tensor(value: float, features_dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """logit_scale as a trainable fp32 tensor, as models keep it (float64 beside float64 features)."""
    dtype = torch.float64 if features_dtype == torch.float64 else torch.float32
    return torch.tensor(value, dtype=dtype, device=device, requires_grad=True)


@dataclass
class LossAndGrads:
    loss: torch.Tensor
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # image, text, logit_scale
    logit_scale: float  # the value of s, the size of the logits the loss subtracts from each other

    def all(self) -> tuple[torch.Tensor, ...]:
        return (self.loss, *self.grads)


def loss_and_grads(loss_fn, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> LossAndGrads:
    """Evaluate `loss_fn(image, text, scale)` and its gradients on fresh leaves of the given tensors."""
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale)]
    loss = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return LossAndGrads(loss.detach(), tuple(g.detach() for g in grads), float(scale.detach()))


def reference(image, text, scale, **kwargs) -> LossAndGrads:
    """The float64 reference on the very same (already rounded) inputs."""
    return loss_and_grads(
        lambda i, t, s: contrastive_loss_reference(i, t, s, **kwargs),
        image.detach().double(),
        text.detach().double(),
        scale.detach().double(),
    )


def naive_same_dtype(image, text, scale, *, weight: float = 0.5, label_smoothing: float = 0.0) -> LossAndGrads:
    """What a user writes without fastclip: logits in the input dtype, cross-entropy in fp32 (as autocast does)."""

    def loss_fn(i, t, s):
        logits = (i @ t.T) * s.to(i.dtype)  # (N, N) in the input dtype
        target = torch.arange(i.shape[0])
        per_image = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
        per_text = F.cross_entropy(logits.float().T, target, label_smoothing=label_smoothing)
        return weight * per_image + (1 - weight) * per_text

    return loss_and_grads(loss_fn, image, text, scale)


def _natural_size(name: str, value: torch.Tensor, logit_scale: float) -> float:
    """A fraction of the size a quantity has when nothing cancels: the floor of the relative error.

    Values that vanish exactly (N = 1, tied rows) are differences of terms of this size, so they are exact
    only to its precision: a loss of 0 is lse - S with S ~ s; a feature gradient row is (s/N) sum (P - Y) t,
    of norm ~ s / sqrt(N) over the batch; the logit_scale gradient is a sum of (P - Y) * cosine, ~ 1.
    """
    s = max(1.0, logit_scale)
    if name == "loss":
        return s
    if name == "grad_logit_scale":
        return 0.1
    return 0.1 * s / value.shape[0] ** 0.5


def error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).norm().item()


def assert_matches(
    actual: LossAndGrads, expected: LossAndGrads, dtype: torch.dtype, naive: LossAndGrads | None = None
) -> None:
    """Loss and all three gradients of `actual` agree with the float64 `expected` under the dtype's rule."""
    names = ("loss", "grad_image", "grad_text", "grad_logit_scale")
    for i, (name, got, want) in enumerate(zip(names, actual.all(), expected.all())):
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        size = max(want.double().norm().item(), _natural_size(name, want, expected.logit_scale))
        err = error(got, want)
        if dtype in LOW_PRECISION:
            assert naive is not None, "low-precision checks need the naive same-dtype baseline"
            # plus what fp32 accumulation and one rounding to the output's dtype may add on their own
            slack = max(RELATIVE_TOLERANCE[torch.float32], 4 * torch.finfo(got.dtype).eps) * size
            bound = 2 * error(naive.all()[i], want) + slack
        else:
            bound = RELATIVE_TOLERANCE[dtype] * size
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (|expected| = {size:.3e}, {dtype})"
