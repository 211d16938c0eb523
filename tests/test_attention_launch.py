"""How the Triton attention kernels are launched: the grid and the device. Pure Python around the
launchers (the kernels are replaced by recorders where a launch would need a GPU), so it runs anywhere
Triton imports; the cuda tests check the same on a GPU.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

triton = pytest.importorskip("triton")
from fastclip.ops import attention_triton as at  # noqa: E402

KERNELS = ("_fwd_tuned", "_bwd_preprocess", "_dkdv_tuned", "_dq_tuned", "_fused_tuned")
# The launches of one forward + backward, per backward path.
LAUNCHES = {
    "split": ["_fwd_tuned", "_bwd_preprocess", "_dkdv_tuned", "_dq_tuned"],
    "fused": ["_fwd_tuned", "_bwd_preprocess", "_fused_tuned"],
}


class _Recorder:
    """Stands in for a kernel: records `kernel[grid](...)` launches instead of running them."""

    def __init__(self, name: str, launches: list) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, grid, kwargs))


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list:
    recorded: list = []
    for name in KERNELS:
        monkeypatch.setattr(at, name, _Recorder(name, recorded))
    return recorded


def _forward_backward(
    batch: int, heads: int, seq: int, head_dim: int = 64, dtype=torch.bfloat16, path: str | None = None
) -> None:
    """One forward and backward of meta tensors laid out as a fused qkv projection (nothing allocated)."""
    qkv = torch.empty(batch, seq, 3, heads, head_dim, dtype=dtype, device="meta")
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    out, lse = at.forward(q, k, v, None, False, head_dim**-0.5)
    at.backward(torch.empty_like(out), None, q, k, v, out, lse, None, False, head_dim**-0.5, path=path)


def _grid(grid, block_m: int, block_n: int, tail: int | None = None) -> tuple[int, ...]:
    """The grid for one config; `tail`: the ragged end's tiles (None: whole blocks, no narrow tiles)."""
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "TAIL_M": tail or block_m, "TAIL_N": tail or block_n}
    return grid(meta) if callable(grid) else tuple(grid)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("batch, heads, seq", [(4096, 16, 257), (5462, 12, 197), (1, 1, 1), (3, 5, 577)])
def test_batch_times_heads_goes_on_grid_axis_0(launches: list, batch: int, heads: int, seq: int, path: str) -> None:
    """ViT-L/14 at batch 4096 (65,536 heads) and ViT-B/16 from batch 5,462 overflow grid axis 1 (65,535)."""
    _forward_backward(batch, heads, seq, path=path)
    assert [name for name, _, _ in launches] == LAUNCHES[path]
    for name, grid, _ in launches:
        for block in (16, 32, 64, 128):
            x, y = _grid(grid, block, block)
            assert x == batch * heads, name
            assert y == triton.cdiv(seq, block if name != "_bwd_preprocess" else at._PREPROCESS_BLOCK), name
            assert y <= at.MAX_GRID_Y
            if name != "_bwd_preprocess":  # the ragged end: one program per 16 positions
                assert _grid(grid, block, block, 16) == (batch * heads, seq // block + triton.cdiv(seq % block, 16))


@pytest.mark.parametrize("block, tail", [(64, 16), (32, 16), (128, 16), (16, 16), (64, 32), (64, None)])
def test_launch_grid_covers_the_sequence_once(block: int, tail: int | None) -> None:
    """The programs of the kernels' rule (whole blocks, then one per `tail` positions of the ragged end) cover
    every position exactly once, and the padding they compute is under one tail (one block without tails)."""
    step = tail or block
    for length in (1, 7, 15, 16, 17, 50, 77, 80, 197, 257, 577):
        _, programs = at.launch_grid(3, length, block, tail)
        full = length // block
        starts = [(p * block, block) if p < full else (full * block + (p - full) * step, step) for p in range(programs)]
        covered = [i for start, size in starts for i in range(start, start + size)]
        assert sorted(covered) == list(range(len(covered))) and len(covered) >= length, (length, starts)
        assert len(covered) - length < step, (length, starts)


def test_launch_grid_limits() -> None:
    assert at.launch_grid(65536, 257, 64) == (65536, 5)
    assert at.launch_grid(at.MAX_GRID_X, 16, 16) == (at.MAX_GRID_X, 1)
    with pytest.raises(ValueError, match="batch \\* heads = 2147483648 exceeds"):
        at.launch_grid(at.MAX_GRID_X + 1, 16, 16)
    with pytest.raises(ValueError, match="needs 65536 blocks of 16"):
        at.launch_grid(1, 16 * 65536, 16)


def test_launches_run_on_the_device_of_q(launches: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every launch happens inside the device guard of q, whatever the current device."""
    entered: list = []

    @contextlib.contextmanager
    def guard(t: torch.Tensor):
        entered.append(t.device)
        count = len(launches)
        yield
        assert len(launches) > count  # the launches happened inside

    monkeypatch.setattr(at, "_device_guard", guard)
    _forward_backward(2, 2, 50)
    assert entered == [torch.device("meta")] * 2  # forward, backward


def test_device_guard_names_the_tensors_gpu() -> None:
    """A tensor on cuda:1 gets torch.cuda.device(1) (constructing it touches no GPU); CPU tensors none."""
    guard = at._device_guard(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(at._device_guard(torch.empty(1)), contextlib.nullcontext)


def _backward_launches(launches: list) -> list[str]:
    _forward_backward(2, 2, 50)
    names = [name for name, _, _ in launches]
    launches.clear()
    return names[2:]  # after the forward and the preprocess


def test_backward_path_rule(launches: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused by default; FASTCLIP_ATTENTION_BACKWARD forces either; torch's deterministic mode takes the
    split (atomic-free) backward whatever the variable says; a table entry overrides the default."""
    monkeypatch.delenv(at.BACKWARD_PATH_ENV, raising=False)
    assert _backward_launches(launches) == ["_fused_tuned"]
    for path in ("split", "fused", "auto"):
        monkeypatch.setenv(at.BACKWARD_PATH_ENV, path)
        assert _backward_launches(launches) == LAUNCHES["fused" if path == "auto" else path][2:]
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert _backward_launches(launches) == LAUNCHES["split"][2:]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    monkeypatch.setenv(at.BACKWARD_PATH_ENV, "auto")
    monkeypatch.setitem(at.BACKWARD_TABLE, (0, torch.bfloat16, 64), "split")  # meta tensors: family 0
    assert _backward_launches(launches) == LAUNCHES["split"][2:]


def test_backward_path_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(at.BACKWARD_PATH_ENV, "atomic")
    q = torch.empty(1, 1, 4, 16, device="meta")
    with pytest.raises(RuntimeError, match="FASTCLIP_ATTENTION_BACKWARD must be 'fused', 'split' or 'auto'"):
        at.backward_path(q, 4)
    with pytest.raises(ValueError, match="path must be one of"):
        at.backward(q, None, q, q, q, q, torch.empty(1, 1, 4, device="meta"), None, False, 0.25, path="both")


@pytest.mark.cuda
def test_cuda_more_heads_than_grid_axis_1_takes() -> None:
    """65,536 (batch, head) pairs launch and match SDPA (grid axis 1 would have refused them)."""
    from fastclip.ops.attention import attention

    q, k, v = (torch.randn(4096, 16, 8, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, backend="triton")
    out.float().sum().backward()
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.cuda
def test_cuda_fp32_goes_to_sdpa() -> None:
    from fastclip.backends import resolve_attention_backend as resolve_backend
    from fastclip.ops.attention import attention

    q = torch.randn(2, 3, 50, 64, device="cuda")
    assert resolve_backend("auto", q) == "torch"
    with pytest.raises(TypeError, match="fp32 kernels would spill"):
        attention(q, q, q, backend="triton")
