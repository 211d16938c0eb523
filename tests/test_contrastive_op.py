"""The registered op `fastclip::contrastive_lse`: opcheck, torch.compile, and the argument errors."""

from __future__ import annotations

import math

import pytest
import torch
from loss_helpers import CLIP_SCALE, assert_matches, features, loss_and_grads, pair, reference, scale_tensor

import fastclip
from fastclip import _extension
from fastclip.functional import contrastive_loss_from_lse, contrastive_lse

needs_extension = pytest.mark.skipif(not _extension.is_loaded(), reason="fastclip._C not built")


@needs_extension
@pytest.mark.parametrize(
    "device, dtype",
    [("cpu", dtype) for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)]
    + [pytest.param("cuda", dtype, marks=pytest.mark.cuda) for dtype in (torch.float32, torch.bfloat16)],
    ids=str,
)
def test_opcheck(device: str, dtype: torch.dtype) -> None:
    image, text, scale = pair(21, 9, dtype, device, rows=13)
    torch.library.opcheck(torch.ops.fastclip.contrastive_lse.default, (image, text, scale))
    row_lse, col_lse = torch.ops.fastclip.contrastive_lse(image, text, scale)
    grads = (torch.randn_like(row_lse), torch.randn_like(col_lse))
    backward_args = (*grads, image.detach(), text.detach(), scale.detach(), row_lse.detach(), col_lse.detach())
    torch.library.opcheck(torch.ops.fastclip.contrastive_lse_backward.default, backward_args)


@pytest.mark.parametrize(
    "backend, device",
    [
        ("torch", "cpu"),
        pytest.param("cpp", "cpu", marks=needs_extension),
        pytest.param("cuda", "cuda", marks=pytest.mark.cuda),
    ],
)
def test_torch_compile_fullgraph(backend: str, device: str) -> None:
    """The whole loss traces into one graph (no breaks) and gives the eager result and gradients."""
    torch._dynamo.reset()
    image, text, scale = pair(45, 24, torch.float32, device)

    @torch.compile(fullgraph=True)
    def loss_fn(i, t, s):
        return fastclip.contrastive_loss(i, t, s, weight=0.3, label_smoothing=0.1, backend=backend)

    got = loss_and_grads(loss_fn, image, text, scale)
    assert_matches(got, reference(image, text, scale, weight=0.3, label_smoothing=0.1), torch.float32)


def test_auto_backend_on_cpu_is_the_faster_cpu_path() -> None:
    """The C++ op where it is built (the CPU benchmark's faster path), the tiled PyTorch path without it,
    and the tiled PyTorch path for the op the table does not list."""
    from fastclip.backends import resolve_loss_backend as resolve_backend

    cpu = torch.device("cpu")
    built = _extension.has_kernel("contrastive_lse", "CPU")
    assert resolve_backend("auto", cpu, torch.float32) == ("cpp" if built else "torch")
    assert resolve_backend("auto", cpu, torch.float32, "pairwise_sigmoid_with_grad") == ("cpp" if built else "torch")
    assert resolve_backend("auto", cpu, torch.float32, "pairwise_sigmoid") == "torch"


def test_python_number_logit_scale() -> None:
    image, text = features(10, 8, torch.float32), features(10, 8, torch.float32)
    got = fastclip.contrastive_loss(image, text, 5.0)
    want = reference(image, text, scale_tensor(5.0)).loss
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def _good() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return features(4, 3, torch.float32), features(4, 3, torch.float32), scale_tensor(CLIP_SCALE)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(image=torch.randn(4, 3, 1)), ValueError, "image_features must be 2-D"),
        (dict(text=torch.randn(3)), ValueError, "text_features must be 2-D"),
        (dict(image=torch.randn(0, 3)), ValueError, "image_features is empty"),
        (dict(text=torch.randn(4, 0)), ValueError, "text_features is empty"),
        (dict(text=torch.randn(5, 3)), ValueError, "same batch size"),
        (dict(text=torch.randn(4, 2)), ValueError, "same feature dim"),
        (dict(text=torch.randn(4, 3, dtype=torch.float64)), TypeError, "same dtype"),
        (dict(image=torch.ones(4, 3, dtype=torch.int64)), TypeError, "image_features must be float32"),
        (dict(text=torch.randn(4, 3, device="meta")), ValueError, "same device"),
        (dict(image=[[1.0]]), TypeError, "image_features must be a torch.Tensor"),
        (dict(scale=torch.tensor(0.0)), ValueError, "logit_scale must be positive and finite"),
        (dict(scale=torch.tensor(-2.0)), ValueError, "logit_scale must be positive and finite"),
        (dict(scale=torch.tensor(math.inf)), ValueError, "logit_scale must be positive and finite"),
        (dict(scale=torch.tensor(math.nan)), ValueError, "logit_scale must be positive and finite"),
        (dict(scale=math.nan), ValueError, "logit_scale must be positive and finite"),
        (dict(scale=torch.ones(2)), ValueError, "logit_scale must hold one value"),
        (dict(scale=torch.tensor(3)), TypeError, "logit_scale must be a floating tensor"),
        (dict(scale="14"), TypeError, "logit_scale must be a tensor or a number"),
        (dict(scale=torch.tensor(3.0, device="meta")), ValueError, "logit_scale must be on the features' device"),
        (dict(weight=1.5), ValueError, "weight must be in [0, 1]"),
        (dict(weight=-0.1), ValueError, "weight must be in [0, 1]"),
        (dict(label_smoothing=2.0), ValueError, "label_smoothing must be in [0, 1]"),
        (dict(backend="triton"), ValueError, "backend must be one of"),
        (dict(backend="cuda"), RuntimeError, "backend='cuda' cannot run here"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_input_raises_clear_error(change: dict, error: type, message: str) -> None:
    image, text, scale = _good()
    args = dict(image=image, text=text, scale=scale)
    options = {k: change.pop(k) for k in ("weight", "label_smoothing", "backend") if k in change}
    args.update(change)
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        fastclip.contrastive_loss(args["image"], args["text"], args["scale"], **options)


def test_cpp_backend_needs_cpu_tensors() -> None:
    image = torch.randn(4, 3, device="meta")
    with pytest.raises(RuntimeError, match="backend='cpp' cannot run here"):
        contrastive_lse(image, image, torch.tensor(2.0, device="meta"), backend="cpp")


@pytest.mark.parametrize(
    "offset, row_shape, col_shape, message",
    [
        (-1, (3,), (8,), "offset must be an int"),
        (6, (3,), (8,), "offset must be an int"),
        (1.0, (3,), (8,), "offset must be an int"),
        (0, (4,), (8,), r"row_lse must be \[3\]"),
        (0, (3,), (7,), r"col_lse \[8\]"),
    ],
)
def test_offset_form_errors(offset, row_shape, col_shape, message: str) -> None:
    image, text = features(3, 5, torch.float32), features(8, 5, torch.float32)
    with pytest.raises(ValueError, match=message):
        contrastive_loss_from_lse(image, text, 2.0, torch.zeros(row_shape), torch.zeros(col_shape), offset=offset)
