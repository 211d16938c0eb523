"""Audit: every public entry point given bad input raises a clear exception naming the argument.

docs/design.md ("Errors"): bad input gets a Python exception naming the argument and what was expected,
never a crash deep inside, a silent NaN or a wrong answer. Each table row is one call, the exception
type it must raise and a pattern its message must contain. Inputs that are unusual but valid
(expanded, strided, transposed or shared-storage tensors) must instead give the reference's answer.
Data files are the exception to raising: one unreadable sample or shard in a training set is skipped
and counted (the datasets' contract), which the shard cases check. The command line turns user errors
into exit code 2 and one line on stderr, without a traceback.

Many rows repeat checks of the per-module tests on purpose: this file is the one list to read.
"""

from __future__ import annotations

import gzip
import math
import pickle
import re
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import no_cpp
from PIL import Image

import fastclip
from fastclip.backends import triton_available
from fastclip.checkpoint import CheckpointError
from fastclip.cli import main as cli_main
from fastclip.data import (
    CaptionCsvDataset,
    CLIPPreprocess,
    ImageFolder,
    TarShardDataset,
    load_image,
)
from fastclip.functional import attention, contrastive_loss_from_lse, contrastive_lse
from fastclip.ops.attention_reference import attention_reference
from fastclip.ops.reference import contrastive_loss_reference, contrastive_lse_reference
from fastclip.tokenizer import NUM_MERGES, ClipTokenizer

TINY = {  # a CLIP small enough to build in milliseconds
    "embed_dim": 16,
    "vision": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


def tiny(**changes: Any) -> dict[str, Any]:
    """TINY with `changes` applied; "vision.mlp_ratio"-style keys reach into a tower."""
    config = {"embed_dim": TINY["embed_dim"], "vision": dict(TINY["vision"]), "text": dict(TINY["text"])}
    for key, value in changes.items():
        tower, _, field = key.partition(".")
        if field:
            config[tower][field] = value
        else:
            config[key] = value
    return config


def unit(rows: int, dim: int = 8, **kwargs) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, **kwargs), dim=-1)


def qkv(**kwargs) -> torch.Tensor:
    return torch.randn(2, 3, 5, 16, **kwargs)


@dataclass
class Case:
    """One row of an audit table: `call(files)` must raise `error` with `match` in its message."""

    call: Callable[[SimpleNamespace], Any]
    error: type[BaseException]
    match: str


def table(cases: dict[str, Case]) -> list:
    return [pytest.param(case, id=name) for name, case in cases.items()]


def check(case: Case, files: SimpleNamespace | None = None) -> None:
    with pytest.raises(case.error, match=case.match) as info:
        case.call(files)
    # the message names things, not a bare type: the file, the argument or the expectation
    assert len(str(info.value)) > 15, str(info.value)


def loss(image=None, text=None, scale=10.0, **kwargs):
    image = unit(4) if image is None else image
    return fastclip.contrastive_loss(image, unit(4) if text is None else text, scale, **kwargs)


def lse(image=None, text=None, scale=10.0, **kwargs):
    image = unit(3) if image is None else image
    return contrastive_lse(image, unit(5) if text is None else text, scale, **kwargs)


def share(offset=0, row=None, col=None, image=None, **kwargs):
    image, text = (unit(3) if image is None else image), unit(8)
    row = torch.zeros(3) if row is None else row
    col = torch.zeros(8) if col is None else col
    return contrastive_loss_from_lse(image, text, 10.0, row, col, offset=offset, **kwargs)


def attend(q=None, k=None, v=None, **kwargs):
    return attention(qkv() if q is None else q, qkv() if k is None else k, qkv() if v is None else v, **kwargs)


META = dict(device="meta")


# ------------------------------------------------------------------------------------------------ ops

OP_CASES = {
    # contrastive_loss: features
    "loss-image-3d": Case(lambda f: loss(image=torch.randn(4, 8, 1)), ValueError, r"image_features must be 2-D"),
    "loss-text-1d": Case(lambda f: loss(text=torch.randn(8)), ValueError, r"text_features must be 2-D"),
    "loss-image-list": Case(
        lambda f: loss(image=[[1.0] * 8] * 4), TypeError, r"image_features must be a torch\.Tensor"
    ),
    "loss-empty-batch": Case(
        lambda f: loss(image=torch.randn(0, 8), text=torch.randn(0, 8)), ValueError, r"image_features is empty"
    ),
    "loss-empty-dim": Case(
        lambda f: loss(image=torch.randn(4, 0), text=torch.randn(4, 0)), ValueError, r"image_features is empty"
    ),
    "loss-batch-mismatch": Case(lambda f: loss(text=unit(5)), ValueError, r"same batch size.*4 and 5"),
    "loss-dim-mismatch": Case(lambda f: loss(text=unit(4, 7)), ValueError, r"same feature dim, got 8 and 7"),
    "loss-mixed-dtypes": Case(
        lambda f: loss(text=unit(4).half()), TypeError, r"same dtype, got torch\.float32 and torch\.float16"
    ),
    "loss-int-features": Case(
        lambda f: loss(image=torch.ones(4, 8, dtype=torch.long)), TypeError, r"image_features must be float32"
    ),
    "loss-complex-features": Case(lambda f: loss(text=unit(4).cfloat()), TypeError, r"text_features must be float32"),
    "loss-bool-features": Case(
        lambda f: loss(image=torch.ones(4, 8, dtype=torch.bool)), TypeError, r"image_features must be float32"
    ),
    "loss-meta-vs-cpu": Case(lambda f: loss(text=unit(4, **META)), ValueError, r"same device, got cpu and meta"),
    # contrastive_loss: logit_scale
    "loss-scale-zero": Case(
        lambda f: loss(scale=0.0), ValueError, r"logit_scale must be positive and finite.*got 0\.0"
    ),
    "loss-scale-negative": Case(
        lambda f: loss(scale=torch.tensor(-2.0)), ValueError, r"logit_scale must be positive and finite"
    ),
    "loss-scale-inf": Case(lambda f: loss(scale=math.inf), ValueError, r"logit_scale must be positive and finite.*inf"),
    "loss-scale-nan-tensor": Case(
        lambda f: loss(scale=torch.tensor(math.nan)), ValueError, r"logit_scale must be positive and finite.*nan"
    ),
    "loss-scale-two-values": Case(lambda f: loss(scale=torch.ones(2)), ValueError, r"logit_scale must hold one value"),
    "loss-scale-int-tensor": Case(
        lambda f: loss(scale=torch.tensor(3)), TypeError, r"logit_scale must be a floating tensor"
    ),
    "loss-scale-str": Case(lambda f: loss(scale="14"), TypeError, r"logit_scale must be a tensor or a number, got str"),
    "loss-scale-bool": Case(
        lambda f: loss(scale=True), TypeError, r"logit_scale must be a tensor or a number, got bool"
    ),
    "loss-scale-none": Case(
        lambda f: loss(scale=None), TypeError, r"logit_scale must be a tensor or a number, got NoneType"
    ),
    "loss-scale-on-meta": Case(
        lambda f: loss(scale=torch.tensor(3.0, **META)), ValueError, r"logit_scale must be on the features' device cpu"
    ),
    # contrastive_loss: options
    "loss-weight-above-1": Case(lambda f: loss(weight=1.5), ValueError, r"weight must be in \[0, 1\], got 1\.5"),
    "loss-weight-negative": Case(lambda f: loss(weight=-0.1), ValueError, r"weight must be in \[0, 1\]"),
    "loss-weight-nan": Case(lambda f: loss(weight=math.nan), ValueError, r"weight must be in \[0, 1\], got nan"),
    "loss-weight-str": Case(lambda f: loss(weight="0.5"), TypeError, r"weight must be a float, got str"),
    "loss-weight-bool": Case(lambda f: loss(weight=True), TypeError, r"weight must be a float, got bool"),
    "loss-smoothing-above-1": Case(
        lambda f: loss(label_smoothing=2.0), ValueError, r"label_smoothing must be in \[0, 1\]"
    ),
    "loss-smoothing-negative": Case(
        lambda f: loss(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\]"
    ),
    "loss-backend-unknown": Case(lambda f: loss(backend="flash"), ValueError, r"backend must be one of .*'flash'"),
    "loss-backend-none": Case(lambda f: loss(backend=None), ValueError, r"backend must be one of .*None"),
    "loss-backend-triton": Case(lambda f: loss(backend="triton"), ValueError, r"backend must be one of"),
    "loss-cuda-on-cpu-tensors": Case(
        lambda f: loss(backend="cuda"), RuntimeError, r"backend='cuda' cannot run here: tensors are on cpu"
    ),
    "loss-cpp-on-meta-tensors": Case(
        lambda f: loss(unit(4, **META), unit(4, **META), torch.tensor(2.0, **META), backend="cpp"),
        RuntimeError,
        r"backend='cpp' cannot run here: it needs CPU tensors \(got meta\)",
    ),
    # contrastive_lse (n != N is fine; the rest as contrastive_loss)
    "lse-image-3d": Case(lambda f: lse(image=torch.randn(3, 8, 2)), ValueError, r"image_features must be 2-D"),
    "lse-empty-text": Case(lambda f: lse(text=torch.randn(0, 8)), ValueError, r"text_features is empty"),
    "lse-dim-mismatch": Case(lambda f: lse(text=unit(5, 4)), ValueError, r"same feature dim, got 8 and 4"),
    "lse-mixed-dtypes": Case(lambda f: lse(image=unit(3).double()), TypeError, r"same dtype"),
    "lse-meta-vs-cpu": Case(lambda f: lse(image=unit(3, **META)), ValueError, r"same device"),
    "lse-scale-zero": Case(
        lambda f: lse(scale=torch.tensor(0.0)), ValueError, r"logit_scale must be positive and finite"
    ),
    "lse-backend-unknown": Case(lambda f: lse(backend="fused"), ValueError, r"backend must be one of"),
    "lse-cuda-on-cpu-tensors": Case(lambda f: lse(backend="cuda"), RuntimeError, r"backend='cuda' cannot run here"),
    # contrastive_loss_from_lse: a rank's share
    "share-offset-negative": Case(
        lambda f: share(offset=-1), ValueError, r"offset must be an int with 0 <= offset and offset \+ 3 <= 8, got -1"
    ),
    "share-offset-past-end": Case(lambda f: share(offset=6), ValueError, r"offset must be an int .* got 6"),
    "share-offset-float": Case(lambda f: share(offset=1.0), ValueError, r"offset must be an int .* got 1\.0"),
    "share-offset-bool": Case(lambda f: share(offset=True), ValueError, r"offset must be an int .* got True"),
    "share-row-lse-shape": Case(
        lambda f: share(row=torch.zeros(4)), ValueError, r"row_lse must be \[3\] and col_lse \[8\], got \(4,\)"
    ),
    "share-col-lse-shape": Case(
        lambda f: share(col=torch.zeros(8, 1)), ValueError, r"col_lse \[8\], got .* and \(8, 1\)"
    ),
    "share-row-lse-list": Case(lambda f: share(row=[0.0] * 3), TypeError, r"row_lse must be a torch\.Tensor"),
    "share-col-lse-int": Case(
        lambda f: share(col=torch.zeros(8, dtype=torch.long)), TypeError, r"col_lse must be a floating tensor"
    ),
    "share-row-lse-on-meta": Case(
        lambda f: share(row=torch.zeros(3, **META)), ValueError, r"row_lse must be on the features' device cpu"
    ),
    "share-weight": Case(lambda f: share(weight=2.0), ValueError, r"weight must be in \[0, 1\]"),
    "share-image-3d": Case(lambda f: share(image=torch.randn(3, 8, 1)), ValueError, r"image_features must be 2-D"),
    # attention
    "attn-q-3d": Case(
        lambda f: attend(q=torch.randn(3, 5, 16)), ValueError, r"q must be 4-D \[batch, heads, seq, head_dim\]"
    ),
    "attn-k-5d": Case(lambda f: attend(k=torch.randn(1, 2, 3, 5, 16)), ValueError, r"k must be 4-D"),
    "attn-v-list": Case(lambda f: attend(v=[[1.0]]), TypeError, r"v must be a torch\.Tensor, got list"),
    "attn-int-q": Case(lambda f: attend(q=torch.ones(2, 3, 5, 16, dtype=torch.int32)), TypeError, r"q must be float32"),
    "attn-empty-seq": Case(lambda f: attend(q=torch.randn(2, 3, 0, 16)), ValueError, r"q is empty"),
    "attn-empty-batch": Case(
        lambda f: attend(*(torch.randn(0, 3, 5, 16) for _ in range(3))), ValueError, r"q is empty"
    ),
    "attn-mixed-dtypes": Case(lambda f: attend(k=qkv().half()), TypeError, r"q, k and v must have the same dtype"),
    "attn-meta-vs-cpu": Case(lambda f: attend(v=qkv(**META)), ValueError, r"q, k and v must be on the same device"),
    "attn-k-v-shapes": Case(
        lambda f: attend(v=torch.randn(2, 3, 6, 16)), ValueError, r"k and v must have the same shape"
    ),
    "attn-heads-mismatch": Case(
        lambda f: attend(k=torch.randn(2, 4, 5, 16), v=torch.randn(2, 4, 5, 16)),
        ValueError,
        r"agree in batch, heads and head_dim",
    ),
    "attn-head-dim-mismatch": Case(
        lambda f: attend(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)),
        ValueError,
        r"agree in batch, heads and head_dim",
    ),
    "attn-causal-int": Case(lambda f: attend(causal=1), TypeError, r"causal must be a bool, got int"),
    "attn-mask-float": Case(
        lambda f: attend(key_padding_mask=torch.zeros(2, 5)), TypeError, r"key_padding_mask must be a bool tensor"
    ),
    "attn-mask-shape": Case(
        lambda f: attend(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)),
        ValueError,
        r"key_padding_mask must have shape \[batch, seq_k\] = \[2, 5\]",
    ),
    "attn-mask-3d": Case(
        lambda f: attend(key_padding_mask=torch.zeros(2, 1, 5, dtype=torch.bool)),
        ValueError,
        r"key_padding_mask must have shape",
    ),
    "attn-mask-on-meta": Case(
        lambda f: attend(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool, **META)),
        ValueError,
        r"key_padding_mask must be on the device of q",
    ),
    "attn-mask-list": Case(
        lambda f: attend(key_padding_mask=[[True] * 5] * 2),
        TypeError,
        r"key_padding_mask must be a torch\.Tensor or None",
    ),
    "attn-scale-zero": Case(lambda f: attend(scale=0.0), ValueError, r"scale must be positive and finite"),
    "attn-scale-negative": Case(lambda f: attend(scale=-1.0), ValueError, r"scale must be positive and finite"),
    "attn-scale-nan": Case(lambda f: attend(scale=math.nan), ValueError, r"scale must be positive and finite"),
    "attn-scale-inf": Case(lambda f: attend(scale=math.inf), ValueError, r"scale must be positive and finite"),
    "attn-scale-tensor": Case(lambda f: attend(scale=torch.tensor(0.5)), TypeError, r"scale must be a float or None"),
    "attn-scale-bool": Case(lambda f: attend(scale=True), TypeError, r"scale must be a float or None"),
    "attn-backend-unknown": Case(
        lambda f: attend(backend="cuda"), ValueError, r"backend must be one of \('auto', 'triton', 'torch'\)"
    ),
    "attn-triton-on-meta": Case(
        lambda f: attend(*(qkv(**META) for _ in range(3)), backend="triton"),
        RuntimeError,
        r"backend='triton' cannot run here",
    ),
}
TRITON_CASES = {  # need Triton importable (and, on a CPU, the interpreter conftest selects)
    "attn-triton-float64": Case(
        lambda f: attend(*(qkv(dtype=torch.float64) for _ in range(3)), backend="triton"),
        TypeError,
        r"supports float32, float16, bfloat16 inputs on cpu, got torch\.float64",
    ),
    "attn-triton-head-dim-160": Case(
        lambda f: attend(*(torch.randn(1, 1, 4, 160) for _ in range(3)), backend="triton"),
        ValueError,
        r"head_dim <= 128 .* got 160",
    ),
}
CLIP_LOSS_CASES = {
    "cliploss-weight": Case(lambda f: fastclip.ClipLoss(weight=1.5), ValueError, r"weight must be in \[0, 1\]"),
    "cliploss-weight-str": Case(lambda f: fastclip.ClipLoss(weight="half"), TypeError, r"weight must be a float"),
    "cliploss-smoothing": Case(
        lambda f: fastclip.ClipLoss(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\]"
    ),
    "cliploss-backend": Case(
        lambda f: fastclip.ClipLoss(backend="nccl"), ValueError, r"backend must be one of .*'nccl'"
    ),
    "cliploss-mismatched-rows": Case(
        lambda f: fastclip.ClipLoss()(unit(4), unit(3), 10.0), ValueError, r"same batch size.*4 and 3"
    ),
    "cliploss-scale": Case(
        lambda f: fastclip.ClipLoss()(unit(4), unit(4), torch.tensor(0.0)), ValueError, r"logit_scale must be positive"
    ),
    "cliploss-features-1d": Case(
        lambda f: fastclip.ClipLoss()(torch.randn(4), unit(4), 10.0), ValueError, r"image_features must be 2-D"
    ),
}


@pytest.mark.parametrize("case", table(OP_CASES) + table(CLIP_LOSS_CASES))
def test_ops_reject_bad_input(case: Case) -> None:
    check(case)


@pytest.mark.skipif(not triton_available(), reason="Triton does not import here")
@pytest.mark.parametrize("case", table(TRITON_CASES))
def test_triton_backend_rejects_what_it_cannot_run(case: Case) -> None:
    check(case)


# ------------------------------------------------- unusual but valid layouts: the reference's answer

LOSS_BACKENDS = ["torch", pytest.param("cpp", marks=no_cpp)]
VIEWS = {  # name -> (image, text) of 6 rows
    "expanded-rows": lambda base: (base[:1].expand(6, 8), base[6:]),  # stride 0: one image row seen 6 times
    "column-major": lambda base: (base[:6].T.contiguous().T, base[6:].T.contiguous().T),
    "strided-columns": lambda base: (torch.cat([base[:6], base[6:]], 1)[:, ::2], base[6:]),
    "every-other-row": lambda base: (base[::2], base[1::2]),
    "same-tensor-twice": lambda base: (base[:6], base[:6]),  # image and text share storage
    "overlapping-windows": lambda base: (base.as_strided((6, 8), (8, 1), 0), base.as_strided((6, 8), (8, 1), 4)),
}


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("view", VIEWS)
def test_loss_views_give_the_reference_answer(view: str, backend: str) -> None:
    """Non-contiguous, expanded and overlapping inputs are read through their strides, not misread."""
    base = unit(12).requires_grad_()
    image, text = VIEWS[view](base)
    scale = torch.tensor(10.0, requires_grad=True)
    got = fastclip.contrastive_loss(image, text, scale, weight=0.3, label_smoothing=0.1, backend=backend)
    got_grads = torch.autograd.grad(got, (base, scale))
    base64, scale64 = base.detach().double().requires_grad_(), scale.detach().double().requires_grad_()
    want = contrastive_loss_reference(*VIEWS[view](base64), scale64, weight=0.3, label_smoothing=0.1)
    want_grads = torch.autograd.grad(want, (base64, scale64))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_lse_of_expanded_text_gives_the_reference_answer(backend: str) -> None:
    image, text = unit(5), unit(1).expand(7, 8)  # every column the same: col lse's tie
    got = contrastive_lse(image, text, 20.0, backend=backend)
    want = contrastive_lse_reference(image.double(), text.double(), 20.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


ATTENTION_BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no Triton")),
]
ATTENTION_VIEWS = {  # name -> (q, k, v, key_padding_mask) views of a [2, 9, 3 * 2 * 16] base
    "fused-qkv": lambda base, mask: (*base.view(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4), None),
    "expanded-batch": lambda base, mask: (
        *(
            base[:1, :, i * 32 : i * 32 + 32].reshape(1, 9, 2, 16).transpose(1, 2).expand(2, -1, -1, -1)
            for i in range(3)
        ),
        None,
    ),
    "head-dim-stride-2": lambda base, mask: (
        *(base[..., i::3].reshape(2, 9, 2, 16).transpose(1, 2) for i in range(3)),
        None,
    ),
    "same-tensor-thrice": lambda base, mask: (
        *(base[..., :32].reshape(2, 9, 2, 16).transpose(1, 2) for _ in range(3)),
        None,
    ),
    "strided-and-expanded-mask": lambda base, mask: (*base.view(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4), mask),
}


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("view", ATTENTION_VIEWS)
def test_attention_views_give_the_reference_answer(view: str, backend: str) -> None:
    base = torch.randn(2, 9, 96, requires_grad=True)
    mask = torch.tensor([True, False, False, True] + [False] * 14)[::2].expand(2, 9)  # strided and expanded
    q, k, v, key_padding_mask = ATTENTION_VIEWS[view](base, mask)
    out = attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, backend=backend)
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, base, grad_out)
    base64 = base.detach().double().requires_grad_()
    q, k, v, key_padding_mask = ATTENTION_VIEWS[view](base64, mask)
    want_out = attention_reference(q, k, v, causal=True, key_padding_mask=key_padding_mask)
    (want,) = torch.autograd.grad(want_out, base64, grad_out.double())
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- non-finite features: NaN out, never a number


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_features_give_nan_not_a_number(backend: str, bad: float) -> None:
    """Features are not scanned (a sync per step); a NaN/inf in them must surface as a NaN loss, never
    as a finite wrong value that training would happily follow."""
    image = unit(6)
    image[2, 3] = bad
    assert torch.isnan(fastclip.contrastive_loss(image, unit(6), 10.0, backend=backend))
    row_lse, _ = contrastive_lse(image, unit(6), 10.0, backend=backend)
    assert not torch.isfinite(row_lse[2]) and torch.isfinite(row_lse[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("which", ["k", "v"])
def test_non_finite_keys_or_values_give_nan(backend: str, which: str) -> None:
    q, k, v = qkv(), qkv(), qkv()
    (k if which == "k" else v)[0, 1, 2, 3] = math.nan
    out = attention(q, k, v, backend=backend)
    hit = out[0, 1] if which == "k" else out[0, 1, :, 3]  # a NaN key spoils every score of its head
    assert hit.isnan().all() and out.isnan().sum() == hit.numel()


# --------------------------------------------------------------------------------- models and configs


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Good and broken files, written once: checkpoints, configs, vocab, CSVs, shards, images."""
    root = tmp_path_factory.mktemp("bad-input")
    torch.manual_seed(0)
    model = fastclip.create_model(TINY)
    state = model.state_dict()
    f = SimpleNamespace(root=root, missing=root / "missing.pt")

    def write(name: str, data: bytes | str) -> Path:
        path = root / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return path

    def save(name: str, obj: Any, **kwargs) -> Path:
        torch.save(obj, root / name, **kwargs)
        return root / name

    f.good = fastclip.save_checkpoint(model, root / "good.safetensors")
    f.state_dict = save("state.pt", state)
    raw = f.good.read_bytes()
    f.truncated_safetensors = write("truncated.safetensors", raw[: len(raw) // 2])
    f.truncated_zip = write("truncated.pt", f.state_dict.read_bytes()[:-200])
    f.empty = write("empty.pt", b"")
    f.text = write("notes.pt", "these are not weights\n")
    with open(root / "pickle.pt", "wb") as out:
        pickle.dump({"weights": [1, 2, 3]}, out, protocol=2)  # a plain pickle: not loadable with weights_only
    f.pickle = root / "pickle.pt"
    with zipfile.ZipFile(root / "foreign.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    f.foreign_zip = root / "foreign.zip"
    f.tensor = save("tensor.pt", torch.zeros(3))
    f.empty_dict = save("empty_dict.pt", {})
    f.not_tensors = save("not_tensors.pt", {"visual.proj": [1.0, 2.0]})
    f.missing_key = save("missing_key.pt", {k: v for k, v in state.items() if k != "text_projection"})
    f.unexpected_key = save("unexpected_key.pt", {**state, "visual.extra.weight": torch.zeros(2)})
    f.wrong_shape = save("wrong_shape.pt", {**state, "ln_final.weight": torch.zeros(7)})
    f.integer_weights = save(
        "integer_weights.pt", {k: v.long() if v.is_floating_point() else v for k, v in state.items()}
    )
    f.nan_weights = save(
        "nan_weights.pt", {**state, "ln_final.bias": torch.full_like(state["ln_final.bias"], math.nan)}
    )
    f.bad_json = write("bad.json", "{not json")
    f.list_json = write("list.json", "[1, 2]")
    f.binary_json = write("binary.json", b"\x89PNG\r\n\x1a\n\x00\xff")
    # a vocab file of the right form (for the tokenizer's argument checks when open_clip's is absent)
    f.vocab = root / "vocab.txt.gz"
    with gzip.open(f.vocab, "wt", encoding="utf-8") as out:
        out.write("#version: test\n" + "".join(f"a{i} b{i}\n" for i in range(NUM_MERGES)))
    f.not_gzip = write("vocab.gz", "a b\n")
    f.short_vocab = root / "short.txt.gz"
    with gzip.open(f.short_vocab, "wt") as out:
        out.write("#version\na b\n")
    # data
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "good.png")
    f.good_image = root / "good.png"
    f.bad_image = write("bad.jpg", "not an image")
    png = f.good_image.read_bytes()
    f.truncated_image = write("truncated.png", png[: len(png) // 2])
    f.csv_empty = write("empty.csv", "")
    f.csv_header_only = write("header.csv", "filepath,title\n")
    f.csv_columns = write("columns.csv", "path,caption\ngood.png,a red square\n")
    f.csv_semicolons = write("semicolons.csv", "filepath;title\ngood.png;a red square\n")
    f.csv_binary = write("binary.csv", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    f.csv_good = write("good.csv", "filepath,title\ngood.png,a red square\n")
    with tarfile.open(root / "empty.tar", "w"):
        pass
    f.empty_tar = root / "empty.tar"
    f.zero_byte_tar = write("zero.tar", b"")
    f.text_tar = write("text.tar", "not a tar file")
    (root / "no_images").mkdir()
    (root / "no_images" / "notes.txt").write_text("no images here")
    f.no_images = root / "no_images"
    (root / "classes" / "red").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "classes" / "red" / "0.png")
    f.classes = root / "classes"
    (root / "mixed" / "red").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(root / "mixed" / "top.png")
    Image.new("RGB", (40, 40)).save(root / "mixed" / "red" / "0.png")
    f.mixed = root / "mixed"
    f.model = model
    return f


MODEL_CASES = {
    "unknown-model-name": Case(
        lambda f: fastclip.create_model("ViT-Q-99"),
        ValueError,
        r"unknown model 'ViT-Q-99'; available models: .*ViT-B-32",
    ),
    "model-name-int": Case(
        lambda f: fastclip.create_model(32), TypeError, r"expected a CLIPConfig, a dict or a JSON path, got int"
    ),
    "no-name-no-weights": Case(
        lambda f: fastclip.create_model(None),
        ValueError,
        r"needs a model name/config, a pretrained checkpoint, or both",
    ),
    "bad-attn-backend": Case(
        lambda f: fastclip.create_model(TINY, attn_backend="flash"),
        ValueError,
        r"attn_backend must be one of .*'flash'",
    ),
    "bad-dtype": Case(
        lambda f: fastclip.create_model(TINY, dtype="fp8"),
        ValueError,
        r"dtype must be a torch\.dtype or one of .*'fp8'",
    ),
    "bad-device-string": Case(
        lambda f: fastclip.create_model(TINY, device="gpu0"),
        ValueError,
        r"device must be a torch\.device or a device string .*'gpu0'",
    ),
    "absent-cuda-device": Case(
        lambda f: fastclip.create_model(TINY, device="cuda:99"), ValueError, r"device 'cuda:99' was asked for"
    ),
    "weights-into-meta": Case(
        lambda f: fastclip.create_model(TINY, pretrained=f.good, device="meta"), ValueError, r"meta device"
    ),
    "bad-act-override": Case(
        lambda f: fastclip.create_model(TINY, act="relu"), ValueError, r"act must be one of .*'relu'"
    ),
    "config-file-missing": Case(
        lambda f: fastclip.create_model(str(f.root / "absent.json")),
        FileNotFoundError,
        r"model config file .*absent\.json does not exist",
    ),
    "config-path-is-a-folder": Case(
        lambda f: fastclip.create_model(f.root), FileNotFoundError, r"model config file .* is not a file"
    ),
    "config-invalid-json": Case(
        lambda f: fastclip.create_model(str(f.bad_json)), ValueError, r"model config .*bad\.json is not valid JSON"
    ),
    "config-binary-file": Case(
        lambda f: fastclip.create_model(str(f.binary_json)),
        ValueError,
        r"model config .*binary\.json is not valid JSON",
    ),
    "config-json-list": Case(
        lambda f: fastclip.create_model(str(f.list_json)), ValueError, r"list\.json must hold a JSON object, got list"
    ),
    "config-unknown-key": Case(
        lambda f: fastclip.create_model(tiny(depth=3)), ValueError, r"unknown config keys \['depth'\]"
    ),
    "config-unknown-vision-key": Case(
        lambda f: fastclip.create_model(tiny(**{"vision.heads": 3})),
        ValueError,
        r"unknown vision config keys \['heads'\]",
    ),
    "config-vision-list": Case(
        lambda f: fastclip.create_model(tiny(vision=[1, 2])),
        ValueError,
        r"config\.vision must be a VisionConfig or a dict",
    ),
    "config-text-str": Case(
        lambda f: fastclip.create_model(tiny(text="bert")), ValueError, r"config\.text must be a TextConfig or a dict"
    ),
    "config-embed-dim-zero": Case(
        lambda f: fastclip.create_model(tiny(embed_dim=0)),
        ValueError,
        r"config\.embed_dim must be a positive int, got 0",
    ),
    "config-layers-str": Case(
        lambda f: fastclip.create_model(tiny(**{"vision.layers": "12"})),
        ValueError,
        r"vision\.layers must be a positive int, got '12'",
    ),
    "config-resnet-3-stages": Case(
        lambda f: fastclip.create_model(tiny(**{"vision.layers": [1, 1, 1]})),
        ValueError,
        r"vision\.layers must be an int \(ViT\) or 4 ints",
    ),
    "config-mlp-ratio-negative": Case(
        lambda f: fastclip.create_model(tiny(**{"vision.mlp_ratio": -1.0})),
        ValueError,
        r"vision\.mlp_ratio must be a positive finite number, got -1\.0",
    ),
    "config-mlp-ratio-str": Case(
        lambda f: fastclip.create_model(tiny(**{"text.mlp_ratio": "4"})),
        ValueError,
        r"text\.mlp_ratio must be a positive finite number, got '4'",
    ),
    "config-mlp-ratio-nan": Case(
        lambda f: fastclip.create_model(tiny(**{"text.mlp_ratio": math.nan})),
        ValueError,
        r"text\.mlp_ratio must be a positive finite number",
    ),
    "config-patch-not-dividing": Case(
        lambda f: fastclip.create_model(tiny(**{"vision.patch_size": 5})),
        ValueError,
        r"image_size \(32\) must be a multiple of patch_size \(5\)",
    ),
    "config-heads-not-dividing": Case(
        lambda f: fastclip.create_model(tiny(**{"text.heads": 5})),
        ValueError,
        r"text\.width \(32\) must be a multiple of text\.heads \(5\)",
    ),
    "config-act": Case(lambda f: fastclip.create_model(tiny(act="swish")), ValueError, r"act must be one of .*'swish'"),
    "config-logit-scale-nan": Case(
        lambda f: fastclip.create_model(tiny(init_logit_scale=math.nan)),
        ValueError,
        r"init_logit_scale must be a finite number",
    ),
    "config-logit-scale-str": Case(
        lambda f: fastclip.create_model(tiny(init_logit_scale="2.6")),
        ValueError,
        r"init_logit_scale must be a finite number",
    ),
    # the model's forward
    "encode-text-floats": Case(
        lambda f: f.model.encode_text(torch.zeros(2, 8)),
        TypeError,
        r"text must hold integer token ids, got torch\.float32",
    ),
    "encode-text-3d": Case(
        lambda f: f.model.encode_text(torch.zeros(2, 8, 1, dtype=torch.long)),
        ValueError,
        r"text must be a non-empty \[batch, seq\] tensor",
    ),
    "encode-text-too-long": Case(
        lambda f: f.model.encode_text(torch.ones(2, 9, dtype=torch.long)),
        ValueError,
        r"9 tokens per row, more than this model's context_length 8",
    ),
    "encode-text-id-out-of-vocab": Case(
        lambda f: f.model.encode_text(torch.tensor([[1, 100]])),
        ValueError,
        r"token ids must lie in \[0, 100\), got ids from 1 to 100",
    ),
    "encode-text-negative-id": Case(
        lambda f: f.model.encode_text(torch.tensor([[-1, 5]])), ValueError, r"token ids must lie in \[0, 100\)"
    ),
    "encode-text-list": Case(
        lambda f: f.model.encode_text([[1, 2]]), TypeError, r"text must be a tensor of token ids, got list"
    ),
    "encode-image-size": Case(
        lambda f: f.model.encode_image(torch.zeros(2, 3, 64, 64)),
        ValueError,
        r"image must have shape \[batch, 3, 32, 32\]",
    ),
    "encode-image-channels": Case(
        lambda f: f.model.encode_image(torch.zeros(2, 1, 32, 32)),
        ValueError,
        r"image must have shape \[batch, 3, 32, 32\]",
    ),
    "encode-image-empty": Case(
        lambda f: f.model.encode_image(torch.zeros(0, 3, 32, 32)), ValueError, r"image batch is empty"
    ),
    "encode-image-array": Case(
        lambda f: f.model.encode_image([[0.0]]), TypeError, r"image must be a torch\.Tensor, got list"
    ),
}
CHECKPOINT_CASES = {
    "checkpoint-missing": Case(
        lambda f: fastclip.load_checkpoint(f.missing),
        FileNotFoundError,
        r"pretrained checkpoint .*missing\.pt does not exist",
    ),
    "pretrained-missing": Case(
        lambda f: fastclip.create_model(TINY, pretrained=f.missing), FileNotFoundError, r"missing\.pt does not exist"
    ),
    "pretrained-unknown-tag": Case(
        lambda f: fastclip.create_model("ViT-B-32", pretrained="laion9b"),
        ValueError,
        r"pretrained='laion9b' is neither a file nor a released tag of 'ViT-B-32' \(its tags: \['openai'\]\)",
    ),
    "checkpoint-is-a-folder": Case(
        lambda f: fastclip.load_checkpoint(f.root), CheckpointError, r"checkpoint .* is not a regular file"
    ),
    "checkpoint-empty-file": Case(
        lambda f: fastclip.load_checkpoint(f.empty),
        CheckpointError,
        r"empty\.pt is not a checkpoint: .*starts with b''",
    ),
    "checkpoint-text-file": Case(
        lambda f: fastclip.load_checkpoint(f.text), CheckpointError, r"notes\.pt is not a checkpoint"
    ),
    "checkpoint-plain-pickle": Case(
        lambda f: fastclip.load_checkpoint(f.pickle), CheckpointError, r"could not read checkpoint .*pickle\.pt"
    ),
    "checkpoint-foreign-zip": Case(
        lambda f: fastclip.load_checkpoint(f.foreign_zip), CheckpointError, r"could not read checkpoint .*foreign\.zip"
    ),
    "checkpoint-truncated-safetensors": Case(
        lambda f: fastclip.load_checkpoint(f.truncated_safetensors),
        CheckpointError,
        r"truncated\.safetensors: the file is truncated or corrupt",
    ),
    "checkpoint-truncated-torch-save": Case(
        lambda f: fastclip.load_checkpoint(f.truncated_zip),
        CheckpointError,
        r"truncated\.pt: the file is truncated or corrupt",
    ),
    "checkpoint-a-tensor": Case(
        lambda f: fastclip.load_checkpoint(f.tensor),
        CheckpointError,
        r"tensor\.pt does not hold a state dict .*got Tensor",
    ),
    "checkpoint-empty-dict": Case(
        lambda f: fastclip.load_checkpoint(f.empty_dict), CheckpointError, r"empty_dict\.pt does not hold a state dict"
    ),
    "checkpoint-non-tensor-entries": Case(
        lambda f: fastclip.load_checkpoint(f.not_tensors),
        CheckpointError,
        r"not_tensors\.pt is not a state dict: .*visual\.proj",
    ),
    "checkpoint-missing-key": Case(
        lambda f: fastclip.create_model(TINY, pretrained=f.missing_key),
        CheckpointError,
        r"missing_key\.pt does not fit the model: missing keys: text_projection",
    ),
    "checkpoint-missing-key-inferred": Case(
        lambda f: fastclip.load_checkpoint(f.missing_key),
        CheckpointError,
        r"cannot infer a CLIP config .* keys text_projection are missing",
    ),
    "checkpoint-unexpected-key": Case(
        lambda f: fastclip.create_model(TINY, pretrained=f.unexpected_key),
        CheckpointError,
        r"unexpected keys: visual\.extra\.weight",
    ),
    "checkpoint-wrong-shape": Case(
        lambda f: fastclip.create_model(TINY, pretrained=f.wrong_shape),
        CheckpointError,
        r"shape mismatches: ln_final\.weight \(7,\) in the file, \(32,\) in the model",
    ),
    "checkpoint-integer-weights": Case(
        lambda f: fastclip.create_model(TINY, pretrained=f.integer_weights),
        CheckpointError,
        r"non-floating tensors for floating parameters: .*torch\.int64 in the file",
    ),
    "checkpoint-nan-weights": Case(
        lambda f: fastclip.create_model(TINY, pretrained=f.nan_weights),
        CheckpointError,
        r"holds NaN or infinite values in ln_final\.bias",
    ),
    "checkpoint-other-config": Case(
        lambda f: fastclip.create_model(tiny(embed_dim=8), pretrained=f.good),
        ValueError,
        r"saved for a different config .*embed_dim: file 16 vs 8",
    ),
}
TOKENIZER_CASES = {
    "tokenize-int": Case(
        lambda f: ClipTokenizer(f.vocab)(123), TypeError, r"texts must be a str or a list of str, got int"
    ),
    "tokenize-none": Case(
        lambda f: ClipTokenizer(f.vocab)(None), TypeError, r"texts must be a str or a list of str, got NoneType"
    ),
    "tokenize-bytes": Case(lambda f: ClipTokenizer(f.vocab)(b"a cat"), TypeError, r"got bytes"),
    "tokenize-list-with-int": Case(
        lambda f: ClipTokenizer(f.vocab)(["a cat", 3]), TypeError, r"texts\[1\] must be a str, got int"
    ),
    "tokenize-generator": Case(lambda f: ClipTokenizer(f.vocab)(t for t in ["a cat"]), TypeError, r"got generator"),
    "tokenize-context-0": Case(
        lambda f: ClipTokenizer(f.vocab)("a cat", context_length=0), ValueError, r"context_length must be >= 2 .*got 0"
    ),
    "tokenize-context-1": Case(
        lambda f: ClipTokenizer(f.vocab, context_length=1), ValueError, r"context_length must be >= 2"
    ),
    "tokenize-context-float": Case(
        lambda f: ClipTokenizer(f.vocab)("a cat", context_length=7.0),
        TypeError,
        r"context_length must be an int, got float",
    ),
    "tokenize-context-bool": Case(
        lambda f: ClipTokenizer(f.vocab)("a cat", context_length=True),
        TypeError,
        r"context_length must be an int, got bool",
    ),
    "tokenizer-cache-size": Case(
        lambda f: ClipTokenizer(f.vocab, cache_size="big"), ValueError, r"cache_size must be a positive int, got 'big'"
    ),
    "tokenizer-vocab-missing": Case(
        lambda f: ClipTokenizer(f.root / "absent.txt.gz"),
        FileNotFoundError,
        r"CLIP BPE vocab file not found at .*absent\.txt\.gz.* \(from the bpe_path argument\)",
    ),
    "tokenizer-vocab-is-a-folder": Case(
        lambda f: ClipTokenizer(f.root), FileNotFoundError, r"CLIP BPE vocab file not found at"
    ),
    "tokenizer-vocab-not-gzip": Case(
        lambda f: ClipTokenizer(f.not_gzip), ValueError, r"vocab\.gz is not CLIP's BPE merges file .*cannot read it"
    ),
    "tokenizer-vocab-too-short": Case(
        lambda f: ClipTokenizer(f.short_vocab),
        ValueError,
        r"short\.txt\.gz is not CLIP's BPE merges file .*expected 48894 merge pairs",
    ),
    "tokenizer-encode-int": Case(lambda f: ClipTokenizer(f.vocab).encode(5), TypeError, r"text must be a str, got int"),
    "tokenizer-decode-out-of-vocab": Case(
        lambda f: ClipTokenizer(f.vocab).decode([10**9]),
        ValueError,
        r"ids must be ints in \[0, 49408\), got 1000000000",
    ),
}
DATA_CASES = {
    "csv-missing": Case(
        lambda f: CaptionCsvDataset(f.root / "absent.csv", CLIPPreprocess(32)),
        FileNotFoundError,
        r"caption file .*absent\.csv' does not exist",
    ),
    "csv-is-a-folder": Case(
        lambda f: CaptionCsvDataset(f.root, CLIPPreprocess(32)), FileNotFoundError, r"caption file .* is not a file"
    ),
    "csv-empty": Case(
        lambda f: CaptionCsvDataset(f.csv_empty, CLIPPreprocess(32)),
        ValueError,
        r"empty\.csv' is empty \(expected a header row\)",
    ),
    "csv-header-only": Case(
        lambda f: CaptionCsvDataset(f.csv_header_only, CLIPPreprocess(32)),
        ValueError,
        r"header\.csv' has a header but no rows",
    ),
    "csv-missing-image-column": Case(
        lambda f: CaptionCsvDataset(f.csv_columns, CLIPPreprocess(32)),
        ValueError,
        r"has no column 'filepath' \(image_key\); columns present: \['path', 'caption'\]",
    ),
    "csv-missing-caption-column": Case(
        lambda f: CaptionCsvDataset(f.csv_columns, CLIPPreprocess(32), image_key="path"),
        ValueError,
        r"has no column 'title' \(caption_key\)",
    ),
    "csv-other-separator": Case(
        lambda f: CaptionCsvDataset(f.csv_semicolons, CLIPPreprocess(32)),
        ValueError,
        r"columns present: \['filepath;title'\] \(separator ','; pass separator=",
    ),
    "csv-binary-file": Case(
        lambda f: CaptionCsvDataset(f.csv_binary, CLIPPreprocess(32)),
        ValueError,
        r"binary\.csv' is not a readable UTF-8 CSV/TSV file",
    ),
    "csv-two-char-separator": Case(
        lambda f: CaptionCsvDataset(f.csv_good, CLIPPreprocess(32), separator=";;"),
        ValueError,
        r"separator must be one character, got ';;'",
    ),
    "csv-transform-none": Case(lambda f: CaptionCsvDataset(f.csv_good, None), TypeError, r"transform must be callable"),
    "shards-glob-matches-nothing": Case(
        lambda f: TarShardDataset(str(f.root / "*.tgz"), CLIPPreprocess(32)),
        FileNotFoundError,
        r"shards: pattern .*\*\.tgz' matches no file",
    ),
    "shards-braces-missing": Case(
        lambda f: TarShardDataset(str(f.root / "part-{0..2}.tar"), CLIPPreprocess(32)),
        FileNotFoundError,
        r"shards: 3 of 3 shard files do not exist",
    ),
    "shards-empty-list": Case(lambda f: TarShardDataset([], CLIPPreprocess(32)), ValueError, r"shards: no shard given"),
    "shards-int": Case(
        lambda f: TarShardDataset(7, CLIPPreprocess(32)),
        TypeError,
        r"shards must be a path, a pattern or a list of them, got int",
    ),
    "shards-list-with-int": Case(
        lambda f: TarShardDataset([str(f.empty_tar), 7], CLIPPreprocess(32)),
        TypeError,
        r"shards must be paths or patterns \(str\), got int",
    ),
    "shards-a-folder": Case(
        lambda f: TarShardDataset(str(f.root), CLIPPreprocess(32)),
        FileNotFoundError,
        r"do not exist \(or are not files\)",
    ),
    "shards-transform-none": Case(
        lambda f: TarShardDataset(str(f.empty_tar), None), TypeError, r"transform must be callable"
    ),
    "shards-rank-too-big": Case(
        lambda f: TarShardDataset(str(f.empty_tar), CLIPPreprocess(32), rank=1, world_size=1),
        ValueError,
        r"rank must be < world_size=1, got 1",
    ),
    "shards-fewer-than-ranks": Case(
        lambda f: TarShardDataset(str(f.empty_tar), CLIPPreprocess(32), rank=0, world_size=2),
        ValueError,
        r"1 shards cannot be split across world_size=2",
    ),
    "shards-negative-seed": Case(
        lambda f: TarShardDataset(str(f.empty_tar), CLIPPreprocess(32), seed=-1),
        ValueError,
        r"seed must be an int >= 0, got -1",
    ),
    "image-folder-missing": Case(
        lambda f: ImageFolder(f.root / "absent"),
        FileNotFoundError,
        r"image folder .*absent' does not exist or is not a directory",
    ),
    "image-folder-is-a-file": Case(
        lambda f: ImageFolder(f.good_image), FileNotFoundError, r"good\.png' does not exist or is not a directory"
    ),
    "image-folder-no-images": Case(lambda f: ImageFolder(f.no_images), ValueError, r"no_images' contains no images"),
    "image-folder-mixed-layout": Case(
        lambda f: ImageFolder(f.mixed), ValueError, r"both at its top level and in sub-folders"
    ),
    "load-image-not-an-image": Case(lambda f: load_image(f.bad_image), ValueError, r"cannot read image .*bad\.jpg"),
    "load-image-truncated": Case(
        lambda f: load_image(f.truncated_image), ValueError, r"cannot read image .*truncated\.png"
    ),
    "load-image-missing": Case(
        lambda f: load_image(f.root / "absent.png"), ValueError, r"cannot read image .*absent\.png"
    ),
    "load-image-folder": Case(lambda f: load_image(f.root), ValueError, r"cannot read image"),
    "load-image-none": Case(
        lambda f: load_image(None),
        TypeError,
        r"path must be a file path \(str or os\.PathLike\) or a binary file object, got NoneType",
    ),
    "preprocess-size-zero": Case(lambda f: CLIPPreprocess(0), ValueError, r"image_size must be a positive int, got 0"),
    "preprocess-float-tensor": Case(
        lambda f: CLIPPreprocess(32)(torch.rand(3, 40, 40)), TypeError, r"image tensors must be uint8"
    ),
    "preprocess-path": Case(
        lambda f: CLIPPreprocess(32)(str(f.good_image)),
        TypeError,
        r"image must be a PIL\.Image\.Image or a uint8 torch\.Tensor, got str",
    ),
}


@pytest.mark.parametrize(
    "case", table(MODEL_CASES) + table(CHECKPOINT_CASES) + table(TOKENIZER_CASES) + table(DATA_CASES)
)
def test_library_rejects_bad_input(case: Case, files: SimpleNamespace) -> None:
    check(case, files)


def test_tokenize_function_rejects_bad_input(files: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fastclip.tokenize` checks its arguments like the tokenizer it wraps."""
    monkeypatch.setattr("fastclip.tokenizer.get_tokenizer", lambda: ClipTokenizer(files.vocab))
    with pytest.raises(TypeError, match=r"texts must be a str or a list of str, got int"):
        fastclip.tokenize(3)
    with pytest.raises(ValueError, match=r"context_length must be >= 2"):
        fastclip.tokenize("a cat", context_length=1)


def test_vocab_from_the_environment_must_exist(files: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTCLIP_BPE_PATH", str(files.root / "absent.txt.gz"))
    with pytest.raises(FileNotFoundError, match=r"not found at .*absent\.txt\.gz.* \(from \$FASTCLIP_BPE_PATH\)"):
        ClipTokenizer()


@pytest.mark.parametrize("shard, samples", [("empty_tar", []), ("zero_byte_tar", [None]), ("text_tar", [None])])
def test_unreadable_or_empty_shards_are_skipped_not_raised(files: SimpleNamespace, shard: str, samples: list) -> None:
    """The datasets' contract: a broken shard ends with one None (counted as skipped by collate_pairs),
    an empty one yields nothing; neither stops a training run."""
    assert list(TarShardDataset(str(getattr(files, shard)), CLIPPreprocess(32), shuffle=False)) == samples


def test_unreadable_csv_rows_are_skipped_not_raised(files: SimpleNamespace, tmp_path: Path) -> None:
    table_path = tmp_path / "pairs.csv"
    table_path.write_text(
        f"filepath,title\n{files.bad_image},broken\n{files.good_image},\n,no image\n{files.good_image},fine\n"
    )
    dataset = CaptionCsvDataset(table_path, CLIPPreprocess(32))
    samples = [dataset[i] for i in range(len(dataset))]
    assert samples[:3] == [None, None, None] and samples[3][1] == "fine"


# ----------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli_files(files: SimpleNamespace) -> SimpleNamespace:
    f = SimpleNamespace(**vars(files))
    tiny_config = f.root / "tiny.json"
    tiny_config.write_text(__import__("json").dumps(TINY))
    f.tiny_config = tiny_config
    return f


def cli_cases() -> list:
    """(command line built from the files, message on stderr) pairs; every one exits with code 2."""
    cases = {
        # zero-shot
        "zero-shot-no-arguments": (
            lambda f: ["zero-shot"],
            r"the following arguments are required: --checkpoint, --images",
        ),
        "zero-shot-missing-checkpoint": (
            lambda f: ["zero-shot", "--checkpoint", f.missing, "--images", f.classes],
            r"missing\.pt does not exist",
        ),
        "zero-shot-text-checkpoint": (
            lambda f: ["zero-shot", "--checkpoint", f.text, "--images", f.classes],
            r"notes\.pt is not a checkpoint",
        ),
        "zero-shot-truncated-checkpoint": (
            lambda f: ["zero-shot", "--checkpoint", f.truncated_safetensors, "--images", f.classes],
            r"truncated or corrupt",
        ),
        "zero-shot-misfit-checkpoint": (
            lambda f: ["zero-shot", "--model", f.tiny_config, "--checkpoint", f.wrong_shape, "--images", f.classes],
            r"shape mismatches",
        ),
        "zero-shot-unknown-model": (
            lambda f: ["zero-shot", "--model", "ViT-Q-99", "--checkpoint", f.good, "--images", f.classes],
            r"unknown model 'ViT-Q-99'",
        ),
        "zero-shot-missing-images": (
            lambda f: ["zero-shot", "--checkpoint", f.good, "--images", f.root / "absent"],
            r"image folder .*absent' does not exist",
        ),
        "zero-shot-no-images": (
            lambda f: ["zero-shot", "--checkpoint", f.good, "--images", f.no_images, "--labels", "red"],
            r"contains no images",
        ),
        "zero-shot-missing-labels-file": (
            lambda f: [
                "zero-shot",
                "--checkpoint",
                f.good,
                "--images",
                f.classes,
                "--labels-file",
                f.root / "absent.txt",
            ],
            r"cannot read the labels file",
        ),
        "zero-shot-missing-vocab": (
            lambda f: ["zero-shot", "--checkpoint", f.good, "--images", f.classes, "--bpe-path", f.root / "absent.gz"],
            r"vocab file not found",
        ),
        "zero-shot-broken-vocab": (
            lambda f: ["zero-shot", "--checkpoint", f.good, "--images", f.classes, "--bpe-path", f.not_gzip],
            r"is not CLIP's BPE merges file",
        ),
        "zero-shot-top-k-text": (
            lambda f: ["zero-shot", "--checkpoint", f.good, "--images", f.classes, "--top-k", "five"],
            r"argument --top-k: invalid int value: 'five'",
        ),
        "zero-shot-absent-gpu": (
            lambda f: ["zero-shot", "--checkpoint", f.good, "--images", f.classes, "--device", "cuda:99"],
            r"device 'cuda:99' was asked for",
        ),
        # eval
        "eval-missing-checkpoint": (
            lambda f: ["eval", "--checkpoint", f.missing, "--test", f.classes],
            r"missing\.pt does not exist",
        ),
        "eval-text-checkpoint": (
            lambda f: ["eval", "--checkpoint", f.text, "--test", f.classes],
            r"notes\.pt is not a checkpoint",
        ),
        "eval-missing-test-folder": (
            lambda f: ["eval", "--checkpoint", f.good, "--test", f.root / "absent"],
            r"--test .*absent' does not exist",
        ),
        "eval-missing-captions": (
            lambda f: ["eval", "--checkpoint", f.good, "--captions", f.root / "absent.csv"],
            r"--captions .*absent\.csv' does not exist",
        ),
        "eval-captions-without-columns": (
            lambda f: ["eval", "--checkpoint", f.good, "--captions", f.csv_columns],
            r"has no column 'filepath'",
        ),
        "eval-nothing-to-do": (lambda f: ["eval", "--checkpoint", f.good], r"nothing to evaluate"),
        # train
        "train-missing-csv": (
            lambda f: ["train", "--dataset", "csv", "--train-data", f.root / "absent.csv"],
            r"caption file .*absent\.csv' does not exist",
        ),
        "train-header-only-csv": (
            lambda f: ["train", "--dataset", "csv", "--train-data", f.csv_header_only],
            r"has a header but no rows",
        ),
        "train-missing-shards": (
            lambda f: ["train", "--dataset", "shards", "--train-data", f.root / "part-{0..1}.tar"],
            r"shards: 2 of 2 shard files do not exist",
        ),
        "train-csv-without-data": (lambda f: ["train", "--dataset", "csv"], r"needs train_data"),
        "train-missing-pretrained": (
            lambda f: ["train", "--model", f.tiny_config, "--pretrained", f.missing],
            r"missing\.pt does not exist",
        ),
        "train-text-pretrained": (
            lambda f: ["train", "--model", f.tiny_config, "--pretrained", f.text],
            r"notes\.pt is not a checkpoint",
        ),
        "train-missing-resume": (
            lambda f: ["train", "--model", f.tiny_config, "--resume", f.missing],
            r"resume checkpoint .*missing\.pt does not exist",
        ),
        "train-missing-config-file": (
            lambda f: ["train", "--config", f.root / "absent.yaml"],
            r"config file .*absent\.yaml does not exist",
        ),
        "train-unknown-model": (lambda f: ["train", "--model", "ViT-Q-99"], r"unknown model 'ViT-Q-99'"),
        "train-steps-text": (lambda f: ["train", "--steps", "many"], r"argument --steps: invalid int value: 'many'"),
    }
    return [pytest.param(argv, message, id=name) for name, (argv, message) in cases.items()]


COMMON = {"zero-shot": ["--workers", "0"], "eval": ["--workers", "0"], "train": ["--steps", "1", "--workers", "0"]}


@pytest.mark.parametrize("argv, message", cli_cases())
def test_cli_user_errors_exit_2_with_one_line(
    argv, message: str, cli_files: SimpleNamespace, tmp_path: Path, capsys
) -> None:
    """Exit code 2, no traceback, and the error as the last line of stderr, prefixed with the command."""
    args = [str(a) for a in argv(cli_files)]
    command = args[0]
    if command == "train" and "--steps" not in args and "--config" not in args:
        args += COMMON["train"] + ["--output-dir", str(tmp_path / "run")]
    elif command in ("zero-shot", "eval") and len(args) > 1:
        args += COMMON[command] + (["--output-dir", str(tmp_path / "eval")] if command == "eval" else [])
        if "--bpe-path" not in args:  # a vocab file of the right form, so no case depends on open_clip's
            args += ["--bpe-path", str(cli_files.vocab)]
    try:
        code = cli_main(args)
    except SystemExit as exit_:  # argparse's own errors (usage line + error line)
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and re.match(rf"fastclip {re.escape(command)}: error: ", lines[-1]), err
    assert re.search(message, lines[-1]), lines[-1]
    if not err.startswith("usage:"):  # runtime errors: exactly one line
        assert len(lines) == 1, err


def test_same_device_reads_an_index_less_cuda_as_the_current_one() -> None:
    """The features' device check compares devices, not their spellings (`cuda` is the current GPU)."""
    from fastclip.ops._checks import same_device

    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert same_device(cpu, torch.device("cpu")) and not same_device(cpu, meta)
    assert same_device(torch.device("cuda:1"), torch.device("cuda:1"))
    assert not same_device(torch.device("cuda:0"), torch.device("cuda:1"))
    assert not same_device(torch.device("cuda:0"), cpu)
    if torch.cuda.is_available():
        current = torch.cuda.current_device()
        assert same_device(torch.device("cuda"), torch.device(f"cuda:{current}"))
        assert not same_device(torch.device("cuda"), torch.device(f"cuda:{current + 1}"))
