"""Dispatch on GPUs the fused kernels do not cover: "auto" picks PyTorch, a forced fused backend raises.

No GPU is needed: the compute capability and the availability of the kernels are mocked.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastclip import _extension, backends
from fastclip.backends import resolve_attention_backend, resolve_loss_backend


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA GPU whose compute capability the test sets, with every fused kernel available."""
    state = {"capability": (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_extension, "has_kernel", lambda op, key: True)
    monkeypatch.setattr(backends, "triton_available", lambda: True)
    return state


@pytest.mark.parametrize(
    "cc, fused",
    [
        ((7, 0), False),
        ((7, 5), False),
        ((8, 0), True),
        ((8, 6), True),
        ((9, 0), True),
        ((10, 0), True),
        ((12, 0), True),
    ],
)
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_loss_auto_backend_follows_capability(gpu, cc, fused, device) -> None:
    gpu["capability"] = cc
    for op in ("contrastive_lse", "pairwise_sigmoid"):
        got = resolve_loss_backend("auto", torch.device(device), torch.bfloat16, op)
        assert got == ("cuda" if fused else "torch"), (op, cc)
        if not fused:
            with pytest.raises(RuntimeError, match=rf"compute capability {cc[0]}\.{cc[1]}.*8\.0 or newer"):
                resolve_loss_backend("cuda", torch.device(device), torch.bfloat16, op)


@pytest.mark.parametrize("cc, fused", [((7, 5), False), ((8, 0), True), ((9, 0), True), ((12, 0), True)])
def test_attention_auto_backend_follows_capability(gpu, cc, fused) -> None:
    gpu["capability"] = cc
    q = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(2, 12, 197, 64))
    assert resolve_attention_backend("auto", q) == ("triton" if fused else "torch")
    if not fused:
        with pytest.raises(RuntimeError, match=r"compute capability 7\.5"):
            resolve_attention_backend("triton", q)


@pytest.mark.parametrize(
    "dtype, auto",
    [(torch.bfloat16, "triton"), (torch.float16, "triton"), (torch.float32, "torch"), (torch.float64, "torch")],
    ids=str,
)
def test_attention_dtypes_on_a_gpu(gpu, dtype, auto) -> None:
    """On a GPU the Triton kernels take fp16/bf16 only (compiled for fp32 they spill registers): "auto"
    sends fp32 to SDPA and a forced "triton" says why it cannot run it."""
    gpu["capability"] = (9, 0)
    q = SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(2, 12, 197, 64))
    assert resolve_attention_backend("auto", q) == auto
    if auto == "torch":
        with pytest.raises(
            TypeError, match=r"supports float16, bfloat16 inputs on cuda \(its fp32 kernels would spill"
        ):
            resolve_attention_backend("triton", q)


def test_cpu_tensors_never_ask_for_a_capability(monkeypatch) -> None:
    def no_gpu(device=None):
        raise AssertionError("a CPU tensor asked for a CUDA capability")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu)
    assert not backends.supports_fused_kernels(torch.device("cpu"))
    assert resolve_loss_backend("auto", torch.device("cpu"), torch.float32) in ("cpp", "torch")
