"""open_clip's loss constructors on fastclip's `ClipLoss` / `SigLipLoss`: the same arguments and calls give
open_clip's loss and gradients (its `loss.py`, loaded by file path, is the oracle), in one process and over
2 gloo ranks; arguments with no fastclip meaning are clear errors."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastclip

N, D = 12, 8


def _open_clip_losses():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.fail("the reference open_clip is not installed: pip install --no-deps open-clip-torch clip-anytorch")
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _features(seed: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image, text = (F.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=-1) for _ in range(2))
    return image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()


def _loss_and_grads(loss_fn, seed: int, *scalars: float, rows: slice = slice(None)):
    image, text = _features(seed, rows)
    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in scalars]
    out = loss_fn(image, text, *leaves, output_dict=True)
    (loss,) = out.values()
    grads = torch.autograd.grad(loss, [image, text, *leaves])
    return list(out), loss.detach(), grads


OPEN_CLIP_CLIP_ARGS = [
    {},
    {"local_loss": True, "gather_with_grad": True, "cache_labels": True, "rank": 0, "world_size": 1},
    {"local_loss": False, "gather_with_grad": False, "use_horovod": False},
]


@pytest.mark.parametrize("kwargs", OPEN_CLIP_CLIP_ARGS)
def test_clip_loss_takes_open_clip_arguments(kwargs: dict) -> None:
    theirs = _open_clip_losses().ClipLoss(**kwargs)
    ours = fastclip.ClipLoss(**kwargs)
    keys, loss, grads = _loss_and_grads(ours, 0, 14.0)
    want_keys, want_loss, want_grads = _loss_and_grads(theirs, 0, 14.0)
    assert keys == want_keys == ["contrastive_loss"]
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dist_impl", [None, "bidir", "shift", "reduce", "gather"])
def test_siglip_loss_takes_open_clip_arguments(dist_impl: str | None) -> None:
    kwargs = {"cache_labels": True, "rank": 0, "world_size": 1, "dist_impl": dist_impl}
    theirs = _open_clip_losses().SigLipLoss(**kwargs)
    ours = fastclip.SigLipLoss(**kwargs)
    scale, bias = math.exp(2.3), -7.5  # open_clip passes the multiplier exp(t') and the bias
    keys, loss, grads = _loss_and_grads(ours, 1, scale, bias)
    want_keys, want_loss, want_grads = _loss_and_grads(theirs, 1, scale, bias)
    assert keys == want_keys
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_open_clip_arguments_without_a_fastclip_meaning_are_errors() -> None:
    with pytest.raises(NotImplementedError, match="use_horovod=True.*torch.distributed"):
        fastclip.ClipLoss(use_horovod=True)
    with pytest.raises(NotImplementedError, match="use_horovod"):
        fastclip.SigLipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="world_size=4 but torch.distributed is not initialized"):
        fastclip.ClipLoss(rank=1, world_size=4)
    with pytest.raises(ValueError, match="rank=1 but"):
        fastclip.SigLipLoss(rank=1)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        fastclip.ClipLoss(world_size=0)
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        fastclip.SigLipLoss(dist_impl="ring")


def _rank_main(rank: int, world: int, store: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        oc = _open_clip_losses()
        rows = slice(rank * N // world, (rank + 1) * N // world)
        args = {"local_loss": True, "gather_with_grad": True, "rank": rank, "world_size": world}
        out = {}
        for name, loss_fn in (("ours", fastclip.ClipLoss(**args)), ("theirs", oc.ClipLoss(**args))):
            _, loss, grads = _loss_and_grads(loss_fn, 2, 14.0, rows=rows)
            out[name] = grads
        try:
            fastclip.ClipLoss(rank=rank, world_size=world + 1)
        except ValueError as error:
            out["mismatch"] = str(error)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_open_clip_data_parallel_arguments_give_its_gradients(tmp_path: Path) -> None:
    """2 gloo ranks, open_clip's usual setting (local_loss + gather_with_grad): the same per-rank gradients."""
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(world, str(tmp_path / "store"), results), nprocs=world, join=True)
        results = dict(results)
    for rank in range(world):  # each rank's own feature rows
        for got, want in zip(results[rank]["ours"][:2], results[rank]["theirs"][:2]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert "world_size=3 but torch.distributed says 2" in results[rank]["mismatch"]
    # logit_scale is a DDP parameter: what counts is its gradient averaged over the ranks
    average = {name: sum(results[r][name][2] for r in range(world)) / world for name in ("ours", "theirs")}
    torch.testing.assert_close(average["ours"], average["theirs"], rtol=1e-9, atol=1e-12)
