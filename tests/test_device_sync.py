"""The losses never make the host wait for the GPU.

A read of a device tensor's value (an argument check's `.item()`) or a copy from pageable host memory
synchronises: the loss would wait for the whole model's forward before launching its first kernel, and
nothing after it would overlap the device's work again that step. Argument values are therefore checked
only where reading them is free (Python numbers, CPU tensors); on a GPU, CUDA's sync debug mode turns any
synchronising call in a loss's forward or backward into an error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip.ops._checks import as_logit_bias, as_logit_scale, reads_values


def test_values_are_read_on_the_cpu_only() -> None:
    assert reads_values(torch.device("cpu"))
    for device in ("cuda", "cuda:1", "meta"):
        assert not reads_values(torch.device(device))


def test_numbers_are_checked_without_a_tensor_read(monkeypatch) -> None:
    def no_read(self):
        raise AssertionError("a number's check read a tensor")

    monkeypatch.setattr(torch.Tensor, "item", no_read)
    scale = as_logit_scale(2.5, torch.device("cpu"))
    with pytest.raises(ValueError, match="logit_scale must be positive and finite"):
        as_logit_scale(-1.0, torch.device("cpu"))
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        as_logit_bias(float("inf"), torch.device("cpu"))
    monkeypatch.undo()
    assert scale.dtype == torch.float32 and scale.shape == () and scale.item() == 2.5


def test_cpu_tensors_are_still_checked() -> None:
    with pytest.raises(ValueError, match="logit_scale must be positive and finite"):
        as_logit_scale(torch.tensor(0.0), torch.device("cpu"))
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        as_logit_bias(torch.tensor(float("nan")), torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("loss", ["clip", "clip_smoothing", "siglip", "supcon"])
def test_loss_step_does_not_synchronise(loss: str) -> None:
    n, dim = 300, 64
    image = F.normalize(torch.randn(n, dim, device="cuda"), dim=-1).bfloat16().requires_grad_()
    text = F.normalize(torch.randn(n, dim, device="cuda"), dim=-1).bfloat16().requires_grad_()
    scale = torch.tensor(14.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
    steps = {
        "clip": lambda: fastclip.contrastive_loss(image, text, scale),
        "clip_smoothing": lambda: fastclip.contrastive_loss(image, text, scale, label_smoothing=0.1),
        "siglip": lambda: fastclip.sigmoid_loss(image, text, scale, bias),
        "supcon": lambda: fastclip.supcon_loss(image, temperature=0.1),
    }
    steps[loss]().backward()  # first call: lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps[loss]().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
