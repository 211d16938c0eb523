"""`pairwise_sigmoid_with_grad`: SigLIP's row losses and every gradient from one pass, against float64 math.

The op returns the gradients of sum_i g_i * row_loss_i unrounded (accumulation dtype), for any row weights
g. Checked on every backend over awkward shapes (1, odd sizes, more than one chunk and block, forced with a
tiny scratch budget), label patterns, signs of g and dtypes: each output within the accumulation dtype's
tolerance of the size of the terms it sums. The CUDA path rounds s * G to the input dtype for its
tensor-core GEMMs, so its bf16/fp16 feature gradients may also carry one rounding of the dtype per term,
plus fp16's underflow below its scaled range; the C++ and PyTorch paths keep G in fp32. `sigmoid_loss`'s
gradient (the same pass, scaled by the upstream gradient and rounded once) is checked against the dtype's
naive computation in tests/test_loss_family.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import RELATIVE_TOLERANCE

import fastclip
from fastclip import _extension
from fastclip.ops.pairwise_sigmoid import dispatch_pairwise_sigmoid_with_grad

has_op = _extension.has_kernel("pairwise_sigmoid_with_grad", "CPU")
no_cpp = pytest.mark.skipif(not has_op, reason="fastclip._C not built")
TARGETS = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("cpp", "cpu"), id="cpp-cpu", marks=no_cpp),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.cuda),
]
NAMES = ("row_loss", "grad_image", "grad_text", "grad_logit_scale", "grad_logit_bias")
DTYPE_SEEDS = {torch.float32: 0, torch.bfloat16: 10, torch.float16: 20, torch.float64: 30}
SHAPES = [(1, 1, 1), (1, 7, 3), (5, 1, 2), (37, 53, 7), (130, 301, 33), (257, 515, 64)]


def reference(g, image, text, scale, bias, row_labels, col_labels) -> tuple[list[torch.Tensor], dict]:
    """The five outputs in float64 autograd on the same (rounded) inputs, and the sizes of the terms each
    sums: |s| |G| @ |text| and |s| |G|^T @ |image| per feature-gradient entry, sum |G * dot| and sum |G|
    for the scale and bias gradients (their terms have both signs), max |s| |g| for fp16's tile scaling."""
    i, t, s, b = (x.detach().double().requires_grad_() for x in (image, text, scale, bias))
    z = (row_labels[:, None] == col_labels[None, :]).double() * 2 - 1
    logits = s * i @ t.T + b
    row = -F.logsigmoid(z * logits).sum(1)  # exact: softplus switches to x above x = 20
    (row * g.double()).sum().backward()
    with torch.no_grad():
        G = -g.double()[:, None] * z * torch.sigmoid(-z * logits)
        sizes = {
            "row_loss": row.abs().max(),
            "grad_image": s.abs() * G.abs() @ t.abs(),
            "grad_text": s.abs() * G.abs().T @ i.abs(),
            "grad_logit_scale": (G * (i @ t.T)).abs().sum(),
            "grad_logit_bias": G.abs().sum(),
            "tile_bound": s.abs() * g.abs().max().double(),
        }
    return [row.detach(), i.grad, t.grad, s.grad, b.grad], {k: v.cpu() for k, v in sizes.items()}


def inputs(n: int, N: int, dim: int, dtype: torch.dtype, device: str, gen: torch.Generator, labels: str):
    image = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1).to(dtype).to(device)
    text = F.normalize(torch.randn(N, dim, generator=gen, dtype=torch.float64), dim=-1).to(dtype).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(10 + 20 * torch.rand((), generator=gen).item(), dtype=acc, device=device)
    bias = torch.tensor(-10 * torch.rand((), generator=gen).item(), dtype=acc, device=device)
    if labels == "diagonal":
        col_labels = torch.arange(N, device=device)
        row_labels = col_labels[:n] if n <= N else torch.arange(n, device=device)
    else:  # a few classes: many positives per row
        row_labels = torch.randint(0, 3, (n,), generator=gen).to(device)
        col_labels = torch.randint(0, 3, (N,), generator=gen).to(device)
    g = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 0.5).to(acc).to(device)  # both signs
    return g, image, text, scale, bias, row_labels, col_labels


def check(got, want, sizes: dict, dtype: torch.dtype, rounded_tiles: bool) -> None:
    """Each output within the accumulation dtype's tolerance of the size of its terms; with `rounded_tiles`
    the feature gradients also carry one rounding of the dtype per s * G term, and fp16's underflow below
    its scaled tile range (unit features: each term at most 2^-38 * max |s g| off)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, x, w in zip(NAMES, got, want):
        assert x.dtype == acc, name
        assert x.shape == w.shape, f"{name}: shape {tuple(x.shape)} != {tuple(w.shape)}"
        err = (x.double().cpu() - w.cpu()).abs()
        bound = RELATIVE_TOLERANCE[acc] * sizes[name]
        if name in ("grad_image", "grad_text"):
            bound = bound + RELATIVE_TOLERANCE[acc] * w.abs().max().cpu()
            if rounded_tiles:
                terms = got[2].shape[0] if name == "grad_image" else got[1].shape[0]
                per_term = torch.finfo(dtype).eps / 2 + RELATIVE_TOLERANCE[torch.float32]
                bound = bound + per_term * sizes[name] + 2.0**-38 * sizes["tile_bound"] * terms
        worst = (err / bound.clamp_min(1e-300)).max().item()
        assert worst <= 1, f"{name}: error {worst:.2f}x its bound ({dtype})"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("labels", ["diagonal", "classes"])
@pytest.mark.parametrize("budget", [None, 4096], ids=["one-block", "many-blocks"])
def test_one_pass_matches_float64(target, dtype, labels, budget, monkeypatch) -> None:
    backend, device = target
    if dtype == torch.float64 and device == "cuda":
        pytest.skip("the CUDA op takes fp32/bf16/fp16")
    if budget is not None:
        monkeypatch.setenv("FASTCLIP_LOSS_CHUNK_BYTES", str(budget))  # blocks of 32 rows and columns
    gen = torch.Generator().manual_seed(DTYPE_SEEDS[dtype] + (labels == "classes"))
    for n, N, dim in SHAPES:
        args = inputs(n, N, dim, dtype, device, gen, labels)
        got = dispatch_pairwise_sigmoid_with_grad(*args, backend)
        want, sizes = reference(*args)
        check(got, want, sizes, dtype, rounded_tiles=backend == "cuda" and dtype in (torch.bfloat16, torch.float16))


@pytest.mark.parametrize("target", TARGETS)
def test_loss_backward_scales_and_rounds_the_one_pass(target) -> None:
    """The loss's gradient is the pass's times the upstream gradient, rounded once: 3 * loss gives 3x the
    gradients, a retained graph gives the same twice, and inputs that need none get none."""
    backend, device = target
    gen = torch.Generator().manual_seed(3)
    _, image, text, scale, bias, *_ = inputs(40, 40, 16, torch.float32, device, gen, "diagonal")
    image.requires_grad_(), text.requires_grad_(), scale.requires_grad_()
    loss = fastclip.sigmoid_loss(image, text, scale, bias, backend=backend)
    once = torch.autograd.grad(loss, (image, text, scale), retain_graph=True)
    again = torch.autograd.grad(loss, (image, text, scale), retain_graph=True)
    tripled = torch.autograd.grad(3 * loss, (image, text, scale))
    for a, b, c in zip(once, again, tripled):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, 3 * a, rtol=1e-6, atol=0)
    assert bias.grad is None and not bias.requires_grad
    with torch.no_grad():
        plain = fastclip.sigmoid_loss(image, text, scale, bias, backend=backend)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, loss.detach(), rtol=1e-6, atol=0)  # the value from either pass


@no_cpp
def test_one_pass_bad_input_names_the_argument() -> None:
    g, image, text, scale, bias, rows, cols = inputs(4, 5, 3, torch.float32, "cpu", torch.Generator(), "diagonal")
    with pytest.raises(RuntimeError, match="grad_row_loss must be \\[4\\]"):
        torch.ops.fastclip.pairwise_sigmoid_with_grad(g[:3], image, text, scale, bias, rows, cols)
    with pytest.raises(RuntimeError, match="col_labels must be \\[5\\]"):
        torch.ops.fastclip.pairwise_sigmoid_with_grad(g, image, text, scale, bias, rows, cols[:4])


@no_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype: torch.dtype) -> None:
    args = inputs(9, 11, 5, dtype, "cpu", torch.Generator().manual_seed(0), "classes")
    torch.library.opcheck(torch.ops.fastclip.pairwise_sigmoid_with_grad.default, args)


@pytest.mark.parametrize("target", TARGETS)
def test_nan_feature_gives_nan_row_loss(target) -> None:
    """A NaN similarity makes its row's loss NaN (not a finite sum that skipped it), and the gradients NaN."""
    backend, device = target
    args = list(inputs(6, 300, 4, torch.float32, device, torch.Generator().manual_seed(1), "diagonal"))
    args[1] = args[1].clone()
    args[1][2, 0] = float("nan")
    row_loss, grad_image, *_ = dispatch_pairwise_sigmoid_with_grad(*args, backend)
    assert torch.isnan(row_loss[2]) and torch.isfinite(row_loss[[0, 1, 3, 4, 5]]).all()
    assert torch.isnan(grad_image[2]).all()
