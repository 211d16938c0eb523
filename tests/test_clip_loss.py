"""`ClipLoss`: single process against the float64 reference, and data parallel over 2 and 3 gloo
processes against one process over the whole batch (loss and parameter gradients after DDP's averaging)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from distributed_helpers import make_problem

from fastclip import ClipLoss
from fastclip.distributed import all_reduce_logsumexp, gather_rows
from fastclip.ops.reference import contrastive_loss_reference

CASES = [  # (dtype, weight, label_smoothing)
    (torch.float64, 0.3, 0.0),
    (torch.float64, 0.5, 0.1),
    (torch.float32, 0.8, 0.05),
]


def loss_and_grads(problem, rows: slice, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = {k: problem[k].clone().requires_grad_() for k in ("image_proj", "text_proj", "log_scale")}
    image = F.normalize(problem["image_in"][rows] @ params["image_proj"].T, dim=-1)
    text = F.normalize(problem["text_in"][rows] @ params["text_proj"].T, dim=-1)
    loss = loss_fn(image, text, params["log_scale"].exp())
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in params.items()}


def _worker(rank: int, world: int, sizes: list[int], init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start = sum(sizes[:rank])
        results = []
        for case, (dtype, weight, smoothing) in enumerate(CASES):
            problem = make_problem(sum(sizes), dtype, seed=case)
            loss, grads = loss_and_grads(problem, slice(start, start + sizes[rank]), ClipLoss(weight, smoothing))
            for grad in grads.values():  # what DDP does to parameter gradients
                dist.all_reduce(grad)
                grad /= world
            results.append((loss, grads))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[3, 5], [4, 1, 6]], ids=["2-ranks", "3-ranks"])
def test_distributed_matches_one_process(sizes: list[int], tmp_path: Path) -> None:
    world = len(sizes)
    mp.spawn(_worker, args=(world, sizes, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for case, ((dtype, weight, smoothing), (loss, grads)) in enumerate(zip(CASES, results)):
            problem = make_problem(sum(sizes), torch.float64, seed=case)  # same draws, in float64
            reference = lambda i, t, s: contrastive_loss_reference(i, t, s, weight=weight, label_smoothing=smoothing)
            want_loss, want_grads = loss_and_grads(problem, slice(None), reference)
            tol = {"rtol": 1e-9, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
            torch.testing.assert_close(loss.double(), want_loss, **tol)
            for name, grad in grads.items():
                torch.testing.assert_close(grad.double(), want_grads[name], **tol, msg=f"rank {rank} {name}")


def _collectives_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(7)
        rows = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (2, 1, 4)]
        partial = torch.randn(world, 5, generator=gen, dtype=torch.float64)
        partial[:, 0] = float("-inf") if world > 1 else partial[:, 0]  # a column no rank has rows for
        weights = torch.randn(sum(r.shape[0] for r in rows), 3, generator=gen, dtype=torch.float64)
        mine = rows[rank].clone().requires_grad_()
        gathered, offset = gather_rows(mine)
        (gathered * weights).sum().backward()
        lse_in = partial[rank].clone().requires_grad_()
        merged = all_reduce_logsumexp(lse_in)
        merged[1:].sum().backward()
        torch.save((gathered.detach(), offset, mine.grad, merged.detach(), lse_in.grad), Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_collectives(tmp_path: Path) -> None:
    world = 3
    mp.spawn(_collectives_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (2, 1, 4)]
    partial = torch.randn(world, 5, generator=gen, dtype=torch.float64)
    partial[:, 0] = float("-inf")
    weights = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    for rank in range(world):
        gathered, offset, grad_rows, merged, grad_lse = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        torch.testing.assert_close(gathered, torch.cat(rows))
        assert offset == [0, 2, 3][rank]
        # Each rank's gradient is the sum over the world's identical losses: world x its slice of weights.
        torch.testing.assert_close(grad_rows, world * weights[offset : offset + rows[rank].shape[0]])
        torch.testing.assert_close(merged[1:], torch.logsumexp(partial[:, 1:], dim=0))
        assert merged[0] == float("-inf")
        softmax = torch.softmax(partial[:, 1:], dim=0)[rank]
        torch.testing.assert_close(grad_lse[1:], world * softmax)
        assert grad_lse[0] == 0  # no gradient (and no nan) for a column with no rows


def _mismatch_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dim = 4 + rank  # rank 1 holds wider features than rank 0
        features = F.normalize(torch.randn(3, dim), dim=-1)
        try:
            ClipLoss()(features, features, torch.tensor(10.0))
            message = "no error"
        except ValueError as error:
            message = str(error)
        (Path(out_dir) / f"{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_feature_sizes_all_raise(tmp_path: Path) -> None:
    mp.spawn(_mismatch_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert "[4, 5] elements per row" in (tmp_path / f"{rank}.txt").read_text()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_single_process_matches_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(13, 9, generator=gen), dim=-1).to(dtype).requires_grad_()
    text = F.normalize(torch.randn(13, 9, generator=gen), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(20.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
    loss = ClipLoss(weight=0.3, label_smoothing=0.1)(image, text, scale)
    loss.backward()
    leaves = [
        image.detach().double().requires_grad_(),
        text.detach().double().requires_grad_(),
        scale.detach().double().requires_grad_(),
    ]
    want = contrastive_loss_reference(*leaves, weight=0.3, label_smoothing=0.1)
    want.backward()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), want, rtol=tol, atol=tol)
    for got, leaf in zip((image.grad, text.grad, scale.grad), leaves):
        torch.testing.assert_close(got.double(), leaf.grad, rtol=tol, atol=tol)


def test_output_dict_and_repr() -> None:
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    loss_fn = ClipLoss(weight=0.25)
    out = loss_fn(image, text, torch.tensor(10.0), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], loss_fn(image, text, torch.tensor(10.0)))
    assert "weight=0.25" in repr(loss_fn)


@pytest.mark.parametrize("kwargs, match", [({"weight": 1.5}, "weight"), ({"label_smoothing": -0.1}, "label_smoothing")])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClipLoss(**kwargs)


def test_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="same batch size"):
        ClipLoss()(torch.randn(4, 3), torch.randn(5, 3), torch.tensor(1.0))
