"""The chunked path of the contrastive-loss ops (csrc/chunked/): GEMMs plus one epilogue pass per chunk.

On a GPU it is the CUDA ops' path (FASTCLIP_CUDA_LOSS_PATH picks it or the fused kernels); on a CPU the
C++ backend runs the very same driver with the epilogue's CPU twin when FASTCLIP_CPU_LOSS_PATH=chunked.
These tests select it that way and force tiny chunks (FASTCLIP_LOSS_CHUNK_BYTES), so that chunk and
block boundaries, the masked diagonal's offset in each chunk, the epilogue's column tiles and row splits
and the merges of their partials all run on awkward shapes, and compare against float64 math on the
same (rounded) inputs: float64 to ~1e-10, float32 to the fp32 tolerance, bf16/fp16 by the 2x rule
against the same computation in plain PyTorch with the inputs' dtype (tests/loss_helpers.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import LOW_PRECISION, RELATIVE_TOLERANCE, assert_matches, loss_and_grads, naive_same_dtype, pair
from loss_helpers import reference as loss_reference

import fastclip
from fastclip import _extension
from fastclip.ops import contrastive_lse_torch

pytestmark = pytest.mark.skipif(
    not (_extension.is_loaded() and hasattr(torch.ops.fastclip, "contrastive_loss_backward")),
    reason="fastclip._C not built",
)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Scratch budgets: one GEMM row-chunk of 32 rows and 32 x 32 backward blocks; blocks of ~290 x 290 (more
# than one 256-column epilogue tile per block); the default (one chunk at these sizes).
BUDGETS = ["2048", "600000", None]
SHAPES = [(1, 1, 3), (1, 9, 4), (9, 1, 4), (13, 21, 9), (150, 600, 12), (301, 37, 5)]  # (n, N, D)


@pytest.fixture(params=BUDGETS, ids=lambda b: f"budget={b or 'default'}")
def chunked(request, monkeypatch):
    monkeypatch.setenv("FASTCLIP_CPU_LOSS_PATH", "chunked")
    if request.param is None:
        monkeypatch.delenv("FASTCLIP_LOSS_CHUNK_BYTES", raising=False)
    else:
        monkeypatch.setenv("FASTCLIP_LOSS_CHUNK_BYTES", request.param)
    return request.param


def inputs(n: int, N: int, dim: int, dtype: torch.dtype, seed: int):
    """Unit features in `dtype`, a logit scale, and random upstream gradients (fresh for every case)."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    text = F.normalize(torch.randn(N, dim, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    scale = torch.tensor(11.0 + 80 * torch.rand((), generator=gen, dtype=torch.float64).item())
    grads = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(N, generator=gen, dtype=torch.float64)
    return image, text, scale, grads


def similarities(image, text, scale, masked_diagonal, dtype=torch.float64):
    """S = s * image @ text^T in `dtype`, with the masked entries (i, i + d) at -inf."""
    logits = float(scale) * (image.to(dtype) @ text.to(dtype).T)
    if masked_diagonal is not None:
        n, N = logits.shape
        rows = torch.arange(n)
        keep = (rows + masked_diagonal >= 0) & (rows + masked_diagonal < N)
        logits[rows[keep], rows[keep] + masked_diagonal] = float("-inf")
    return logits


def lse_backward_math(image, text, scale, grad_row, grad_col, row_lse, col_lse, masked_diagonal, dtype):
    """(grad_image, grad_text, grad_scale) of contrastive_lse_backward (csrc/ops/contrastive_lse.h) in
    `dtype`; with a 16-bit dtype, G and the products are rounded as plain PyTorch in that dtype would."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = similarities(image, text, scale, masked_diagonal, acc)
    g = grad_row.to(acc)[:, None] * (logits - row_lse.to(acc)[:, None]).exp()
    g = g + grad_col.to(acc)[None, :] * (logits - col_lse.to(acc)[None, :]).exp()
    g = g.nan_to_num(0.0)  # fully masked rows (lse -inf) have no entries
    dots = image.to(acc) @ text.to(acc).T
    grad_scale = (g * dots).sum()
    g = g.to(dtype)
    return float(scale) * (g @ text.to(dtype)), float(scale) * (g.T @ image.to(dtype)), grad_scale


def scale_gradient_terms(image, text, scale, grad_row, grad_col, row_lse, col_lse, masked_diagonal) -> float:
    """sum |G * dot|: the size of the terms that the logit_scale gradient sums (they cancel in part, so
    its error is relative to them, not to the sum)."""
    logits = similarities(image, text, scale, masked_diagonal)
    g = grad_row[:, None] * (logits - row_lse[:, None]).exp() + grad_col[None, :] * (logits - col_lse[None, :]).exp()
    return (g.nan_to_num(0.0) * (image.double() @ text.double().T)).abs().sum().item()


def check(got, want, naive, dtype, names, sizes=None) -> None:
    """Each result within the dtype's tolerance of float64 math, or (16-bit) twice the naive error; `sizes`
    gives the natural size of results that are sums of cancelling terms."""
    for name, g, w, nv in zip(names, got, want, naive):
        g, w = g.double(), w.double()
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        finite = torch.isfinite(w)
        assert torch.equal(torch.isfinite(g), finite) and torch.equal(g[~finite], w[~finite]), f"{name}: non-finite"
        err, size = (g[finite] - w[finite]).norm().item(), max(w[finite].norm().item(), 1e-3)
        size = max(size, (sizes or {}).get(name, 0.0))
        if dtype in LOW_PRECISION:
            slack = max(RELATIVE_TOLERANCE[torch.float32], 4 * torch.finfo(dtype).eps) * size
            bound = 2 * (nv.double()[finite] - w[finite]).norm().item() + slack
        else:
            bound = RELATIVE_TOLERANCE[dtype] * size
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (|want| {size:.3e}, {dtype})"


DIAGONALS = [None, 0, 2, -3, 40]  # 40 misses the small shapes altogether


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked_diagonal", DIAGONALS, ids=lambda d: f"diag={d}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lse_forward_and_backward(chunked, shape, masked_diagonal, dtype: torch.dtype) -> None:
    n, N, dim = shape
    image, text, scale, (grad_row, grad_col) = inputs(n, N, dim, dtype, seed=n * 1000 + N + (masked_diagonal or 0))
    logits = similarities(image, text, scale, masked_diagonal)
    want_lse = logits.logsumexp(1), logits.logsumexp(0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    naive_logits = similarities(image, text, scale, masked_diagonal, dtype).float()
    naive_lse = naive_logits.logsumexp(1), naive_logits.logsumexp(0)

    got_lse = torch.ops.fastclip.contrastive_lse(image, text, scale.to(acc), masked_diagonal)
    assert all(t.dtype == acc for t in got_lse)
    check(got_lse, want_lse, naive_lse, dtype, ("row_lse", "col_lse"))

    row_lse, col_lse = (t.to(acc) for t in want_lse)  # the backward at the exact log-sum-exps
    got = torch.ops.fastclip.contrastive_lse_backward(
        grad_row.to(acc), grad_col.to(acc), image, text, scale.to(acc), row_lse, col_lse, masked_diagonal
    )
    want = lse_backward_math(
        image, text, scale, grad_row, grad_col, want_lse[0], want_lse[1], masked_diagonal, torch.float64
    )
    naive = lse_backward_math(image, text, scale, grad_row, grad_col, want_lse[0], want_lse[1], masked_diagonal, dtype)
    assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == acc
    terms = scale_gradient_terms(image, text, scale, grad_row, grad_col, *want_lse, masked_diagonal)
    check(got, want, naive, dtype, ("grad_image", "grad_text", "grad_logit_scale"), {"grad_logit_scale": terms})


def loss_backward_arguments(n: int, N: int, dim: int, dtype: torch.dtype, masked_diagonal, seed: int):
    """Inputs of fastclip::contrastive_loss_backward: arbitrary coefficients, classes, pairs (-1: none)."""
    gen = torch.Generator().manual_seed(seed)
    image, text, scale, _ = inputs(n, N, dim, dtype, seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = similarities(image, text, scale, masked_diagonal)
    row_lse, col_lse = logits.logsumexp(1).to(acc), logits.logsumexp(0).to(acc)
    coefficient = lambda *size: torch.rand(size, generator=gen, dtype=torch.float64).to(acc)  # noqa: E731
    row_ids, col_ids = torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 4, (N,), generator=gen)
    partner = torch.randint(-1, N, (n,), generator=gen)
    coefficients = (coefficient(n), coefficient(N), coefficient(n), coefficient(), coefficient(n))
    return (*coefficients, image, text, scale.to(acc), row_lse, col_lse, row_ids, col_ids, partner, masked_diagonal)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("masked_diagonal", DIAGONALS, ids=lambda d: f"diag={d}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_loss_backward_matches_tiled_twin(chunked, shape, masked_diagonal, dtype: torch.dtype) -> None:
    """contrastive_loss_backward on the chunked path against the tiled PyTorch twin in float64 on the same
    inputs: pair entries, classes, masks and the rests across chunk, block, tile and split boundaries."""
    args = loss_backward_arguments(*shape, dtype, masked_diagonal, seed=sum(shape))
    got = torch.ops.fastclip.contrastive_loss_backward(*args)
    exact = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    coefficients, (image, text, scale, row_lse, col_lse), ids = exact[:5], exact[5:10], exact[10:13]
    want = contrastive_lse_torch.tiled_loss_gradient(
        image, text, scale, row_lse, col_lse, coefficients, ids, masked_diagonal
    )
    assert all(g.dtype == args[8].dtype for g in got)  # unrounded: the accumulation dtype
    # the logit_scale gradient sums terms G * dot of either sign, so its error is relative to their size:
    # over 1e-2 per entry here (|grad_uniform * dot| alone, coefficients uniform in [0, 1), |dot| ~ D^-1/2)
    check(
        got,
        want,
        [None] * 3,
        dtype,
        ("grad_image", "grad_text", "grad_logit_scale"),
        {"grad_logit_scale": shape[0] * shape[1] * 1e-2},
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("labels", [False, True], ids=["pairs", "labels"])
@pytest.mark.parametrize("n, dim", [(1, 4), (7, 5), (150, 16)])
def test_clip_loss(chunked, n: int, dim: int, labels: bool, dtype: torch.dtype) -> None:
    """The whole CLIP loss and its gradients (contrastive_lse + contrastive_loss_backward, C++ backend)."""
    image, text, scale = pair(n, dim, dtype)
    label_ids = torch.randint(0, max(1, n // 2), (n,)) if labels else None
    kwargs = dict(weight=0.3, label_smoothing=0.1)

    def loss_fn(i, t, s):
        return fastclip.contrastive_loss(i, t, s, labels=label_ids, backend="cpp", **kwargs)

    got = loss_and_grads(loss_fn, image, text, scale)
    want = loss_reference(image, text, scale, labels=label_ids, **kwargs)
    naive = None
    if dtype in LOW_PRECISION and label_ids is None:
        naive = naive_same_dtype(image, text, scale, **kwargs)
    # with labels there is no same-dtype baseline: 16-bit results get a fixed tolerance (G's rounding)
    tolerance = 3e-2 if dtype in LOW_PRECISION and naive is None else None
    assert_matches(got, want, dtype, naive, tolerance=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_supcon_loss(chunked, dtype: torch.dtype) -> None:
    """SupCon (masked_diagonal 0, no column terms) through the chunked path matches the default path."""
    gen = torch.Generator().manual_seed(7)
    features = F.normalize(torch.randn(70, 6, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    labels = torch.randint(0, 9, (70,), generator=gen)
    leaf = features.clone().requires_grad_()
    value = fastclip.supcon_loss(leaf, labels, temperature=0.2, backend="cpp")
    (grad,) = torch.autograd.grad(value, leaf)
    from fastclip.ops.reference import supcon_loss_reference

    leaf64 = features.double().requires_grad_()
    want = supcon_loss_reference(leaf64, labels, 0.2)
    (want_grad,) = torch.autograd.grad(want, leaf64)
    tolerance = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(value.double(), want.detach(), **tolerance)
    torch.testing.assert_close(grad.double(), want_grad, **tolerance)


def test_chunked_and_fused_cpu_paths_agree(monkeypatch) -> None:
    """The switch changes the implementation, not the answer (float64: the arithmetic alone)."""
    image, text, scale, (grad_row, grad_col) = inputs(97, 130, 7, torch.float64, seed=11)
    results = {}
    for path in ("fused", "chunked"):
        monkeypatch.setenv("FASTCLIP_CPU_LOSS_PATH", path)
        monkeypatch.setenv("FASTCLIP_LOSS_CHUNK_BYTES", "4096")
        row_lse, col_lse = torch.ops.fastclip.contrastive_lse(image, text, scale.double(), 1)
        grads = torch.ops.fastclip.contrastive_lse_backward(
            grad_row, grad_col, image, text, scale.double(), row_lse, col_lse, 1
        )
        results[path] = (row_lse, col_lse, *grads)
    for a, b in zip(results["fused"], results["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("FASTCLIP_CPU_LOSS_PATH", "tiles", "FASTCLIP_CPU_LOSS_PATH must be 'chunked' or 'fused'"),
        ("FASTCLIP_CPU_LOSS_PATH", "Chunked", "FASTCLIP_CPU_LOSS_PATH must be 'chunked' or 'fused'"),
        ("FASTCLIP_LOSS_CHUNK_BYTES", "0", "FASTCLIP_LOSS_CHUNK_BYTES must be a positive number of bytes"),
        ("FASTCLIP_LOSS_CHUNK_BYTES", "1MB", "FASTCLIP_LOSS_CHUNK_BYTES must be a positive number of bytes"),
    ],
)
def test_bad_environment_value_raises(monkeypatch, variable: str, value: str, message: str) -> None:
    if variable == "FASTCLIP_LOSS_CHUNK_BYTES":
        monkeypatch.setenv("FASTCLIP_CPU_LOSS_PATH", "chunked")
    monkeypatch.setenv(variable, value)
    image, text, scale, _ = inputs(4, 5, 3, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastclip.contrastive_lse(image, text, scale, None)


def test_empty_environment_values_are_unset(monkeypatch) -> None:
    monkeypatch.setenv("FASTCLIP_CPU_LOSS_PATH", "")
    monkeypatch.setenv("FASTCLIP_LOSS_CHUNK_BYTES", "")
    image, text, scale, _ = inputs(4, 5, 3, torch.float64, seed=2)
    row_lse, col_lse = torch.ops.fastclip.contrastive_lse(image, text, scale.double(), None)
    logits = similarities(image, text, scale, None)
    torch.testing.assert_close(row_lse, logits.logsumexp(1))
    torch.testing.assert_close(col_lse, logits.logsumexp(0))


# ------------------------------------------------------------------------------------ on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("path", ["chunked", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("masked_diagonal", [None, 0, -3], ids=lambda d: f"diag={d}")
@pytest.mark.parametrize("logit_scale", [None, 4.0, 100.0], ids=lambda s: f"scale={s}")
@pytest.mark.parametrize("dim", [40, 13], ids=lambda d: f"D={d}")
def test_cuda_paths(monkeypatch, path: str, dtype: torch.dtype, masked_diagonal, logit_scale, dim: int) -> None:
    """Both CUDA paths (FASTCLIP_CUDA_LOSS_PATH), with tiny chunks, against float64 math. A small scale
    keeps every fused tile's logits within the shared-exponential spread, s = 100 (cosines of 40-dim
    random features spread over about +-0.6) takes the two-exponential fallback in most tiles. D = 13
    rows are not 16-byte aligned: the fused kernels copy them element by element."""
    monkeypatch.setenv("FASTCLIP_CUDA_LOSS_PATH", path)
    monkeypatch.setenv("FASTCLIP_LOSS_CHUNK_BYTES", "600000")
    n, N = 301, 613
    image, text, scale, (grad_row, grad_col) = inputs(n, N, dim, dtype, seed=5)
    if logit_scale is not None:
        scale = torch.tensor(logit_scale, dtype=torch.float64)
    logits = similarities(image, text, scale, masked_diagonal)
    want_lse = logits.logsumexp(1), logits.logsumexp(0)
    cuda = lambda t: t.cuda()  # noqa: E731
    got_lse = torch.ops.fastclip.contrastive_lse(cuda(image), cuda(text), cuda(scale.float()), masked_diagonal)
    for g, w in zip(got_lse, want_lse):  # tf32 / 16-bit similarities: ~1e-3 of s
        torch.testing.assert_close(g.cpu().double(), w, rtol=0, atol=2e-2 * float(scale) * 1e-2 + 1e-3)
    rl, cl = (cuda(t.float()) for t in want_lse)
    got = torch.ops.fastclip.contrastive_lse_backward(
        cuda(grad_row.float()),
        cuda(grad_col.float()),
        cuda(image),
        cuda(text),
        cuda(scale.float()),
        rl,
        cl,
        masked_diagonal,
    )
    want = lse_backward_math(image, text, scale, grad_row, grad_col, *want_lse, masked_diagonal, torch.float64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


@pytest.mark.cuda
def test_cuda_bad_path_value_raises(monkeypatch) -> None:
    monkeypatch.setenv("FASTCLIP_CUDA_LOSS_PATH", "fast")
    image, text, scale, _ = inputs(4, 5, 3, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="FASTCLIP_CUDA_LOSS_PATH must be 'chunked' or 'fused'"):
        torch.ops.fastclip.contrastive_lse(image.cuda(), text.cuda(), scale.cuda(), None)
