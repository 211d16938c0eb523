"""Label-aware `ClipLoss`, `SigLipLoss` and `SupConLoss` data parallel over 2 and 3 gloo processes, against
one float64 process over the whole batch: loss, projection gradients after DDP's averaging, and the
SigLIP module's own scale and bias gradients (which must come out whole and equal on every rank)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from distributed_helpers import make_problem

from fastclip import ClipLoss, SigLipLoss, SupConLoss
from fastclip.ops.reference import contrastive_loss_reference as label_contrastive_loss_reference
from fastclip.ops.reference import sigmoid_loss_reference, supcon_loss_reference

DTYPES = (torch.float64, torch.float32)


def run(problem: dict, rows: slice, kind: str, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One loss over `rows` of the problem; gradients of the projections (and of the loss's parameters)."""
    params = {k: problem[k].clone().requires_grad_() for k in ("image_proj", "text_proj", "log_scale", "bias")}
    image = F.normalize(problem["image_in"][rows] @ params["image_proj"].T, dim=-1)
    text = F.normalize(problem["text_in"][rows] @ params["text_proj"].T, dim=-1)
    labels = problem["labels"][rows]
    if kind == "clip":
        loss = loss_fn(image, text, params["log_scale"].exp(), labels=labels)
    elif kind == "siglip":
        loss = loss_fn(image, text, labels=labels)
    elif kind == "supcon":
        loss = loss_fn(torch.cat([image, text]), torch.cat([labels, labels]))
    else:  # nt-xent: this slice's [view1; view2]
        loss = loss_fn(torch.cat([image, text]))
    loss.backward()
    grads = {k: p.grad for k, p in params.items() if p.grad is not None}
    if kind == "siglip":
        grads.update(own_scale=loss_fn.logit_scale.grad, own_bias=loss_fn.logit_bias.grad)
    return loss.detach(), grads


def distributed_module(kind: str, problem: dict):
    if kind == "clip":
        return ClipLoss(weight=0.3, label_smoothing=0.05)
    if kind == "siglip":
        return SigLipLoss(float(problem["log_scale"]), float(problem["bias"]))
    return SupConLoss(temperature=0.3)


def reference_module(kind: str, problem: dict, sizes: list[int]):
    """The float64 dense reference over the whole batch, called like the module."""
    if kind == "clip":
        return lambda i, t, s, labels: label_contrastive_loss_reference(
            i, t, s, labels, weight=0.3, label_smoothing=0.05
        )
    if kind == "siglip":
        loss = SigLipLoss(float(problem["log_scale"]), float(problem["bias"])).double()

        def siglip(i, t, labels):
            out = sigmoid_loss_reference(i, t, loss.logit_scale.exp(), loss.logit_bias, labels)
            siglip.logit_scale, siglip.logit_bias = loss.logit_scale, loss.logit_bias
            return out

        return siglip
    if kind == "supcon":
        return lambda f, labels: supcon_loss_reference(f, labels, 0.3)

    def nt_xent(f):  # the whole batch as the ranks lay it out: [v1_r; v2_r] per rank, paired within
        half = f.shape[0] // 2
        image, text = f[:half].split(sizes), f[half:].split(sizes)
        stacked = torch.cat([torch.cat(pair) for pair in zip(image, text)])
        ids = torch.cat([torch.arange(n).repeat(2) + 2 * sum(sizes[:r]) for r, n in enumerate(sizes)])
        return supcon_loss_reference(stacked, ids, 0.3)

    return nt_xent


KINDS = ("clip", "siglip", "supcon", "nt-xent")


def _worker(rank: int, world: int, sizes: list[int], init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start = sum(sizes[:rank])
        results = {}
        for kind in KINDS:
            for dtype in DTYPES:
                problem = make_problem(sum(sizes), dtype, seed=KINDS.index(kind))
                module = distributed_module(kind, problem).to(dtype)
                loss, grads = run(problem, slice(start, start + sizes[rank]), kind, module)
                for name, grad in grads.items():
                    if not name.startswith("own_"):  # what DDP does to the model's parameter gradients
                        dist.all_reduce(grad)
                        grad /= world
                results[f"{kind}-{dtype}"] = (loss, grads)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[3, 5], [4, 1, 6]], ids=["2-ranks", "3-ranks"])
def test_distributed_matches_one_process(sizes: list[int], tmp_path: Path) -> None:
    world = len(sizes)
    mp.spawn(_worker, args=(world, sizes, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    for kind in KINDS:
        problem = make_problem(sum(sizes), torch.float64, seed=KINDS.index(kind))
        reference = reference_module(kind, problem, sizes)
        want_loss, want_grads = run(problem, slice(None), kind, reference)
        if kind == "siglip":
            want_grads.update(own_scale=reference.logit_scale.grad, own_bias=reference.logit_bias.grad)
        for rank in range(world):
            results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
            for dtype in DTYPES:
                loss, grads = results[f"{kind}-{dtype}"]
                tol = {"rtol": 1e-9, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
                where = f"{kind} {dtype} rank {rank}"
                torch.testing.assert_close(
                    loss.double(), want_loss, **tol, msg=f"{where}: loss {loss.item()} vs {want_loss.item()}"
                )
                assert set(grads) == set(want_grads), where
                for name, grad in grads.items():
                    torch.testing.assert_close(grad.double(), want_grads[name].double(), **tol, msg=f"{where}: {name}")
    assert not math.isnan(want_loss)
