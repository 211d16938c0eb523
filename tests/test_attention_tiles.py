"""The Triton attention's tiling of ragged ends and head dims: narrow tiles for the last partial block (in the
inner loops and as extra programs of the grid), and head dims held as two power-of-two pieces (80 = 64 + 16).
Interpreted kernels against float64 math on fresh random inputs, forward and both backwards, with tilings
forced so that every loop (whole blocks, causal diagonal, narrow tail) and both kinds of program run.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before anything defines the Triton kernels (see test_attention.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
from fastclip.ops import attention_triton as at  # noqa: E402
from fastclip.ops.attention_reference import attention_reference  # noqa: E402

interpreted = pytest.mark.skipif(not at.INTERPRET, reason="interpreter tests (on a GPU the cuda tests run)")


# ------------------------------------------------------------------------------------------ head-dim pieces


@pytest.mark.parametrize(
    "head_dim, pieces",
    [
        (80, (64, 16)),
        (96, (64, 32)),
        (48, (32, 16)),
        (40, (32, 16)),
        (72, (64, 16)),
        (64, (64, 0)),
        (128, (128, 0)),
        (112, (128, 0)),
        (32, (32, 0)),
        (24, (32, 0)),
        (16, (16, 0)),
        (8, (16, 0)),
        (1, (16, 0)),
    ],
)
def test_head_dim_pieces(head_dim: int, pieces: tuple[int, int]) -> None:
    assert at.head_dim_pieces(head_dim) == pieces


def test_head_dim_pieces_cover_with_fewest_lanes() -> None:
    """Powers of two of at least 16, covering the head dim, never more lanes than one power-of-two block."""
    for head_dim in range(1, at.MAX_HEAD_DIM + 1):
        first, second = at.head_dim_pieces(head_dim)
        whole = max(16, triton.next_power_of_2(head_dim))
        assert first >= 16 and first & (first - 1) == 0, head_dim
        assert second == 0 or (second >= 16 and second & (second - 1) == 0 and second <= first), head_dim
        assert head_dim <= first + second <= whole, head_dim
        assert (second == 0) == (first + second == whole), head_dim  # split exactly where it saves lanes


# ---------------------------------------------------------------------------------- kernels against float64

# (batch, heads, seq_q, seq_k, head_dim, causal, masked, lengths, block): block = (BLOCK_M, BLOCK_N, TAIL_M,
# TAIL_N). Lengths chosen so that whole blocks, the causal diagonal, narrow inner tiles and narrow programs all
# run: 1, odd, one past a block, not a multiple of 16, shorter than a block, cross attention both ways.
CASES = [
    (1, 2, 197, 197, 80, False, False, None, (64, 64, 16, 16)),
    (1, 2, 197, 197, 80, True, False, None, (64, 64, 16, 16)),
    (2, 1, 77, 77, 80, True, True, [77, 19], (32, 64, 16, 16)),
    (2, 1, 65, 65, 48, False, True, None, (64, 32, 16, 16)),
    (1, 1, 1, 1, 80, True, False, None, (64, 64, 16, 16)),
    (1, 1, 7, 7, 96, True, False, None, (32, 32, 16, 16)),
    (1, 1, 50, 50, 64, True, False, [33], (32, 32, 16, 16)),
    (2, 1, 33, 70, 80, True, True, [20, 33], (32, 64, 16, 32)),
    (1, 2, 70, 33, 40, False, False, None, (64, 32, 32, 16)),
    (1, 1, 81, 81, 32, True, False, None, (16, 16, 16, 16)),  # no narrow tiles: tails as wide as the blocks
]


def _ids(case: tuple) -> str:
    batch, heads, seq_q, seq_k, head_dim, causal, masked, lengths, block = case
    return (
        f"q{seq_q}-k{seq_k}-d{head_dim}-{'causal' if causal else 'full'}{'-mask' if masked else ''}"
        f"{'-len' if lengths else ''}-{'x'.join(map(str, block))}"
    )


def _run(case: tuple, dtype: torch.dtype, path: str):
    """The kernels' out, dq, dk, dv (the backward with head-dim pieces too) and the reference at a dtype."""
    batch, heads, seq_q, seq_k, head_dim, causal, masked, lengths, block = case
    q = torch.randn(batch, heads, seq_q, head_dim).to(dtype)
    k, v = (torch.randn(batch, heads, seq_k, head_dim).to(dtype) for _ in range(2))
    mask = torch.rand(batch, seq_k) < 0.3 if masked else None
    lengths = None if lengths is None else torch.tensor(lengths)
    scale = head_dim**-0.5
    out, lse = at.forward(q, k, v, mask, causal, scale, block=block, lengths=lengths)
    grad_out = torch.randn_like(out)
    with pytest.MonkeyPatch.context() as patch:  # the launchers' choice aside, the backward's pieces work
        patch.setitem(at.PIECES, "bwd", True)
        grads = at.backward(
            grad_out, None, q, k, v, out, lse, mask, causal, scale, block=block, lengths=lengths, path=path
        )
    kwargs = dict(key_padding_mask=mask, causal=causal, scale=scale, lengths=lengths)

    def reference(cast: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.to(cast).requires_grad_(True) for t in (q, k, v)]
        ref = attention_reference(*leaves, **kwargs)
        return [ref.detach(), *torch.autograd.grad(ref, leaves, grad_out.to(cast))]

    return [out, *grads], reference


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item()


@interpreted
@pytest.mark.parametrize("path", at.BACKWARD_PATHS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_ragged_tiles_and_head_dim_pieces_fp32(case: tuple, path: str) -> None:
    got, reference = _run(case, torch.float32, path)
    for name, g, t in zip(("out", "dq", "dk", "dv"), got, reference(torch.float64)):
        assert torch.isfinite(g).all(), name
        bound = 1e-5 * max(1.0, t.abs().max().item())
        assert _err(g, t) <= bound, f"{name}: error {_err(g, t):.3g} > {bound:.3g}"


@interpreted
@pytest.mark.parametrize("case", CASES[:4], ids=_ids)
def test_ragged_tiles_and_head_dim_pieces_fp16(case: tuple) -> None:
    """fp16 inputs (fp16 dot operands, fp32 sums): error at most 2x plain fp16 math's (flash-attention's rule)."""
    got, reference = _run(case, torch.float16, "fused")
    truth, plain = reference(torch.float64), reference(torch.float16)
    for name, g, t, p in zip(("out", "dq", "dk", "dv"), got, truth, plain):
        allowed = 2 * _err(p, t) + 1e-4 * max(1.0, t.abs().max().item())
        assert _err(g, t) <= allowed, f"{name}: error {_err(g, t):.3g} > {allowed:.3g}"


@interpreted
def test_narrow_tiles_change_no_result_beyond_rounding() -> None:
    """The same inputs with and without narrow tiles (tails as wide as the blocks) agree to fp32 rounding."""
    case = (2, 1, 197, 197, 80, True, True, [197, 150], (64, 64, 16, 16))
    torch.manual_seed(1)
    narrow, _ = _run(case, torch.float32, "split")
    torch.manual_seed(1)
    wide, _ = _run(case[:-1] + ((64, 64, 64, 64),), torch.float32, "split")
    for a, b in zip(narrow, wide):
        assert _err(a, b) <= 1e-5 * max(1.0, b.abs().max().item())


def test_launchers_pass_pieces_where_the_rule_says() -> None:
    """The forward holds head dim 80 as 64 + 16; the backward as PIECES says (one padded block unless set)."""
    assert at._pieces_kwargs(80, "fwd") == {"BLOCK_D": 64, "BLOCK_D1": 16}
    expected = {"BLOCK_D": 64, "BLOCK_D1": 16} if at.PIECES["bwd"] else {"BLOCK_D": 128, "BLOCK_D1": 0}
    assert at._pieces_kwargs(80, "bwd") == expected
    assert at._pieces_kwargs(64, "fwd") == at._pieces_kwargs(64, "bwd") == {"BLOCK_D": 64, "BLOCK_D1": 0}
