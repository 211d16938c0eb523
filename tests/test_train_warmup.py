"""The attention warm-up before training: one pass per shape the run will meet, only where Triton runs."""

from __future__ import annotations

import pytest
import torch

from fastclip.model.factory import create_model
from fastclip.train import warmup
from fastclip.train.precision import autocast_for


def test_text_lengths_cover_every_bucket() -> None:
    assert warmup.text_lengths_to_tune(77) == [2, 4, 8, 16, 32, 64, 77]
    assert warmup.text_lengths_to_tune(32) == [2, 4, 8, 16, 32]
    assert warmup.text_lengths_to_tune(2) == [2]
    # every trimmed length a batch can have (2..context) falls in the power-of-two bucket of one of them
    for context in (5, 32, 77):
        buckets = {1 << (n - 1).bit_length() for n in warmup.text_lengths_to_tune(context)}
        assert all(1 << (n - 1).bit_length() in buckets for n in range(2, context + 1))


def test_nothing_runs_where_attention_is_not_triton() -> None:
    model = create_model("tiny-ViT")
    assert not warmup.runs_triton_attention(model, torch.device("cpu"), torch.float32)
    assert (
        warmup.warm_up_attention(
            model, 4, torch.device("cpu"), autocast_for("fp32", torch.device("cpu")), torch.float32
        )
        == 0
    )


@pytest.mark.parametrize("name", ["tiny-ViT", "tiny-RN"])
def test_one_pass_per_shape_and_no_gradient_left(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Forced on (the CPU has no Triton kernels to tune): each tower runs forward and backward, the text
    tower once per length bucket, and the model is left as it was: no gradients, same weights and batch
    norm statistics, same train/eval mode."""
    model = create_model(name).train()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    monkeypatch.setattr(warmup, "runs_triton_attention", lambda *args: True)
    seen: list[tuple[str, tuple[int, ...]]] = []
    for tower in ("encode_image", "encode_text"):
        original = getattr(model, tower)
        monkeypatch.setattr(model, tower, lambda x, _o=original, _t=tower: seen.append((_t, tuple(x.shape))) or _o(x))
    runs = warmup.warm_up_attention(
        model, 3, torch.device("cpu"), autocast_for("fp32", torch.device("cpu")), torch.float32
    )
    lengths = warmup.text_lengths_to_tune(model.context_length)
    assert runs == 1 + len(lengths)
    assert seen == [("encode_image", (3, 3, model.image_size, model.image_size))] + [
        ("encode_text", (3, n)) for n in lengths
    ]
    assert all(p.grad is None for p in model.parameters()) and model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_captions_end_with_end_of_text() -> None:
    text = warmup._captions(2, 5, torch.device("cpu"))
    assert text[:, 0].eq(49406).all() and text[:, -1].eq(49407).all() and text.argmax(-1).eq(4).all()


def _share_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Each rank starts from its own autotune choices (rank 0 alone has one for a second key), shares, and
    records what its kernels' caches then hold."""
    import json

    import torch.distributed as dist
    import triton

    from fastclip.ops import attention_triton

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    kernels = attention_triton.autotuned_kernels()
    for kernel in kernels.values():
        kernel.cache.clear()
    common, rank0_only = (256, 64, "torch.bfloat16"), (128, 64, "torch.float16")
    kernels["fwd"].cache[common] = triton.Config(
        {"BLOCK_M": 64 * (rank + 1), "BLOCK_N": 64}, num_warps=4 + 4 * rank, num_stages=2 + rank
    )
    if rank == 0:
        kernels["dq"].cache[rank0_only] = triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3)
    shared = warmup.share_tuned_configs()
    held = {
        name: {repr(key): [config.kwargs, config.num_warps, config.num_stages] for key, config in kernel.cache.items()}
        for name, kernel in kernels.items()
    }
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"shared": shared, "held": held}, f)
    dist.destroy_process_group()


def test_every_rank_takes_rank_0s_configs(tmp_path) -> None:
    """Two gloo ranks that tuned a shape differently end with rank 0's config for it, and with rank 0's
    choice for a shape only rank 0 had met."""
    import json

    import torch.multiprocessing as mp

    pytest.importorskip("triton")
    mp.spawn(_share_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["shared"] for r in results] == [2, 2]
    assert results[0]["held"] == results[1]["held"]
    assert results[1]["held"]["fwd"] == {"(256, 64, 'torch.bfloat16')": [{"BLOCK_M": 64, "BLOCK_N": 64}, 4, 2]}
    assert results[1]["held"]["dq"] == {"(128, 64, 'torch.float16')": [{"BLOCK_M": 32, "BLOCK_N": 128}, 8, 3]}


def test_nothing_is_shared_outside_a_distributed_run() -> None:
    assert warmup.share_tuned_configs() == 0
