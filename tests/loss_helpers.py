"""Shared pieces of the contrastive-loss tests: inputs, the same-dtype naive baseline, error bounds, a counter
of live tensor memory.

Tolerance rule (stated once): float32 and float64 results must match the float64 reference to a relative
error of `RELATIVE_TOLERANCE[dtype]`; bfloat16/float16 results follow flash-attention's rule, their error
against the float64 reference is at most twice that of the plain same-dtype PyTorch computation, plus
the fp32 tolerance and a rounding of the output (slack the plain computation may escape by luck on tiny
shapes). Quantities that vanish exactly are compared against their natural size instead of 0.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastclip import _extension
from fastclip.ops.reference import contrastive_loss_reference, naive_clip_loss

no_cpp = pytest.mark.skipif(not _extension.has_kernel("contrastive_lse", "CPU"), reason="fastclip._C not built")
recompute = pytest.mark.recompute_similarity  # the backward past the size that keeps the similarity
LOSS_TARGETS = [  # (backend, device) of every contrastive-loss path
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("torch", "cpu"), id="torch-cpu-recompute", marks=recompute),
    pytest.param(("cpp", "cpu"), id="cpp-cpu", marks=no_cpp),
    pytest.param(("cpp", "cpu"), id="cpp-cpu-recompute", marks=(no_cpp, recompute)),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.cuda),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.cuda),
]

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


def pair(
    n: int, dim: int, dtype: torch.dtype, device: str = "cpu", *, scale: float = CLIP_SCALE, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image [rows or n, dim], text [n, dim], logit_scale): the usual inputs of one test case."""
    image = features(n if rows is None else rows, dim, dtype, device)
    return image, features(n, dim, dtype, device), scale_tensor(scale, dtype, device)


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
        return naive_clip_loss(i, t, s, weight=weight, label_smoothing=label_smoothing, scale_logits=True)

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
    actual: LossAndGrads,
    expected: LossAndGrads,
    dtype: torch.dtype,
    naive: LossAndGrads | None = None,
    *,
    tolerance: float | None = None,
    rounded_tiles: bool = False,
) -> None:
    """Loss and all three gradients of `actual` agree with the float64 `expected`.

    With `naive` given: the 2x rule against that same-dtype computation; else the relative `tolerance`
    (default: the dtype's RELATIVE_TOLERANCE; bfloat16/float16 need one of the two). `rounded_tiles`: the
    op rounds s * G to the input dtype for its tensor-core GEMMs (the CUDA op), one rounding of each term
    of a gradient row, which may then cancel against terms autograd adds: up to ~2 s / sqrt(N) per row,
    20x the natural size, before they do.
    """
    names = ("loss", "grad_image", "grad_text", "grad_logit_scale")
    for i, (name, got, want) in enumerate(zip(names, actual.all(), expected.all())):
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        size = max(want.double().norm().item(), _natural_size(name, want, expected.logit_scale))
        err = error(got, want)
        if naive is not None:
            # plus what fp32 accumulation and one rounding to the output's dtype may add on their own
            slack = max(RELATIVE_TOLERANCE[torch.float32], 4 * torch.finfo(got.dtype).eps) * size
            if rounded_tiles and name.startswith("grad_"):
                slack += 20 * torch.finfo(got.dtype).eps / 2 * size
            bound = 2 * error(naive.all()[i], want) + slack
        else:
            assert tolerance is not None or dtype in RELATIVE_TOLERANCE, f"{dtype} needs `naive` or `tolerance`"
            bound = (RELATIVE_TOLERANCE[dtype] if tolerance is None else tolerance) * size
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (|expected| = {size:.3e}, {dtype})"


def chunked_reference(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float,
    *,
    weight: float = 0.5,
    label_smoothing: float = 0.0,
    chunk: int = 4096,
    dtype: torch.dtype = torch.float64,
) -> LossAndGrads:
    """The loss and its analytic gradients for N too large for a dense N x N reference, in `dtype`.

    Two sweeps over row chunks of S = s * I @ T.T (exact logsumexp per chunk): the first gives the row and
    column log-sum-exps, the second dL/dS = (1/N)[w P_row + (1 - w) P_col - (1 - eps) Y - eps / N] chunk by
    chunk and its products with T and I. Checked against the dense reference in the CPU tests.
    """
    img, txt = image.detach().to(dtype), text.detach().to(dtype)
    n, s = img.shape[0], float(logit_scale)
    row_lse = torch.empty(n, dtype=dtype, device=img.device)
    col_parts = []
    for r0 in range(0, n, chunk):
        sim = s * (img[r0 : r0 + chunk] @ txt.T)
        row_lse[r0 : r0 + chunk] = sim.logsumexp(1)
        col_parts.append(sim.logsumexp(0))
    col_lse = torch.stack(col_parts).logsumexp(0)
    positives = s * (img * txt).sum()
    total = s * (img.sum(0) @ txt.sum(0))
    loss = (
        weight * row_lse.sum()
        + (1 - weight) * col_lse.sum()
        - (1 - label_smoothing) * positives
        - (label_smoothing / n) * total
    ) / n
    grad_img, grad_txt = torch.empty_like(img), torch.zeros_like(txt)
    grad_scale = torch.zeros((), dtype=dtype, device=img.device)
    for r0 in range(0, n, chunk):
        rows = slice(r0, r0 + chunk)
        sim = s * (img[rows] @ txt.T)  # (chunk, N)
        grad_sim = weight * (sim - row_lse[rows, None]).exp() + (1 - weight) * (sim - col_lse[None, :]).exp()
        grad_sim -= label_smoothing / n
        diagonal = torch.arange(r0, r0 + grad_sim.shape[0], device=img.device)
        grad_sim[diagonal - r0, diagonal] -= 1 - label_smoothing
        grad_sim /= n
        grad_img[rows] = s * (grad_sim @ txt)
        grad_txt += s * (grad_sim.T @ img[rows])
        grad_scale += (grad_sim * sim).sum() / s
    return LossAndGrads(loss, (grad_img, grad_txt, grad_scale), s)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive: `live` now, `peak` at most."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._counted: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: not new memory.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._counted:
                continue
            self._counted.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out
