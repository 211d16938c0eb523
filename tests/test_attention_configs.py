"""The autotune candidates of the Triton attention kernels: what `_prune` keeps per GPU family, head dim,
dtype and sequence length. Pure Python over the config tables (no kernel is compiled or run), so it runs
anywhere Triton imports; the registers behind the rules are measured by tools/check_triton_compile.py.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from fastclip.ops import attention_triton as at  # noqa: E402

TUNED = {"fwd": at._fwd_tuned, "dkdv": at._dkdv_tuned, "dq": at._dq_tuned, "fused": at._fused_tuned}
TABLES = {"fwd": at._FWD_CONFIGS, "dkdv": at._DKDV_CONFIGS, "dq": at._DQ_CONFIGS, "fused": at._FUSED_CONFIGS}
FAMILIES = (80, 90)
HEAD_DIMS = (32, 64, 80, 128)
CLIP_LENGTHS = (50, 77, 197, 257, 577)  # ViT-B/32, text, ViT-B/16, ViT-L/14, ViT-L/14@336
ALL_LENGTHS = (1, 7, 16, 33, *CLIP_LENGTHS, 4096)


def pieces(kernel: str, head_dim: int) -> dict[str, int]:
    """BLOCK_D and BLOCK_D1 as the launchers pass them to `kernel`."""
    return at._pieces_kwargs(head_dim, "fwd" if kernel == "fwd" else "bwd")


def lanes(kernel: str, head_dim: int) -> int:
    """The head-dim lanes the kernel's dots compute (the spill rules' key): the forward's 80 as 64 + 16."""
    return sum(pieces(kernel, head_dim).values())


def prune(kernel: str, arch: int | None, head_dim: int, seq: int, dtype: torch.dtype = torch.bfloat16) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, warps, stages) kept for one launch, through the autotuner's own prune hook."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in TABLES[kernel]]
    named = {
        "Q": torch.empty(1, dtype=dtype),
        "SEQ_Q_BUCKET": triton.next_power_of_2(seq),
        "SEQ_K_BUCKET": triton.next_power_of_2(seq),
    }
    kept = TUNED[kernel].early_config_prune(configs, named, arch=arch, HEAD_DIM=head_dim, **pieces(kernel, head_dim))
    return [at._config_key(c) for c in kept]


# (kernel, head-dim lanes) where no config with a 64-row resident block compiles without spilling on sm_90
# (tools/check_triton_compile.py --unpruned, Triton 3.9): those run mma.sync configs there.
SM90_WITHOUT_WGMMA = {("dkdv", 128), ("fused", 128)}


def resident_rows(kernel: str, config: tuple) -> int:
    """The M of the program's dots: BLOCK_N for dK/dV and the fused backward (a key block), BLOCK_M otherwise."""
    return config[1] if kernel in ("dkdv", "fused") else config[0]


def area(config: tuple) -> int:
    return config[0] * config[1]


def test_every_rule_names_a_real_config() -> None:
    """A rule naming a config that is not in its table (a typo, a retuned table) would silently drop nothing."""
    for (kernel, family, bd), configs in at._SPILLS.items():
        assert kernel in TABLES and family in FAMILIES and bd in {lanes(kernel, d) for d in HEAD_DIMS}, (
            kernel,
            family,
            bd,
        )
        assert configs and configs <= set(TABLES[kernel]), (kernel, family, bd, configs - set(TABLES[kernel]))


@pytest.mark.parametrize("kernel", TABLES)
@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_no_ruled_out_config_is_ever_kept(kernel: str, arch: int, dtype: torch.dtype) -> None:
    """Neither the length rule nor its fallback (a sequence shorter than every usable tile) brings back a
    config that spills, or on sm_90 one that falls back to mma.sync unless every wgmma config spills; and
    something is always left to launch."""
    for head_dim in HEAD_DIMS:
        ruled_out = at._SPILLS.get((kernel, arch, lanes(kernel, head_dim)), set())
        for seq in ALL_LENGTHS:
            kept = prune(kernel, arch, head_dim, seq, dtype)
            assert kept, (head_dim, seq)
            assert not set(kept) & ruled_out, (head_dim, seq, set(kept) & ruled_out)
            if arch == 90 and (kernel, lanes(kernel, head_dim)) not in SM90_WITHOUT_WGMMA:
                assert all(resident_rows(kernel, c) >= 64 for c in kept), (head_dim, seq, kept)


@pytest.mark.parametrize("kernel", TABLES)
@pytest.mark.parametrize("arch", [None, *FAMILIES])
def test_tiles_fit_the_sequence_or_the_smallest_runs(kernel: str, arch: int | None) -> None:
    """No tile longer than the (bucketed) sequence, except one smallest tile when nothing else fits."""
    for head_dim in HEAD_DIMS:
        usable = prune(kernel, arch, head_dim, 1 << 20)  # an endless sequence: only the non-length rules
        for seq in ALL_LENGTHS:
            bucket = max(16, triton.next_power_of_2(seq))
            kept = prune(kernel, arch, head_dim, seq)
            fitting = [c for c in usable if c[0] <= bucket and c[1] <= bucket]
            if fitting:
                assert kept == fitting, (head_dim, seq)
            else:
                assert kept == [min(usable, key=area)], (head_dim, seq)


@pytest.mark.parametrize("kernel", TABLES)
@pytest.mark.parametrize("arch", [None, *FAMILIES])
def test_no_tile_over_two_64x64_at_head_dim_128(kernel: str, arch: int | None) -> None:
    for head_dim in (80, 128):
        assert all(area(c) <= 2 * 64 * 64 for c in prune(kernel, arch, head_dim, 4096))


@pytest.mark.parametrize("kernel", TABLES)
@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autotuning_keeps_a_choice_at_clip_lengths(kernel: str, arch: int, head_dim: int, dtype: torch.dtype) -> None:
    """At CLIP's lengths the autotuner still has at least two configs to time, with different tiles. The
    measured exception, where every other config spills: sm_90 dK/dV at 128 lanes (head dims 80 and 128 in
    the backward) keeps 64x32 with 4 warps."""
    for seq in CLIP_LENGTHS:
        kept = prune(kernel, arch, head_dim, seq, dtype)
        if (kernel, arch, lanes(kernel, head_dim)) == ("dkdv", 90, 128):
            assert kept == [(64, 32, 4, 3)], (seq, kept)
        else:
            assert len({c[:2] for c in kept}) >= 2, (seq, kept)


def test_sm90_keeps_wgmma_blocks_only() -> None:
    """Measured in the PTX: 32-row query blocks (forward, dQ) and 32-key blocks (dK/dV) use mma.sync on sm_90."""
    assert (32, 64, 4, 3) in prune("fwd", 80, 64, 577) and (32, 64, 4, 3) not in prune("fwd", 90, 64, 577)
    assert (64, 32, 4, 3) in prune("fwd", 90, 64, 577)  # 64 query rows, 32-key blocks: wgmma
    assert (64, 32, 4, 3) not in prune("dkdv", 90, 64, 577) and (32, 64, 4, 3) in prune("dkdv", 90, 64, 577)


def test_cpu_tensors_get_no_gpu_rules() -> None:
    """The interpreter (CPU tensors) keeps the plain length rule: no family, so no spill rule applies."""
    assert at._arch_family(torch.empty(1)) == 0
    assert at._arch_family(None) == 0
    for kernel in TABLES:
        assert prune(kernel, None, 64, 4096) == prune(kernel, 0, 64, 4096) == list(TABLES[kernel])


def test_spill_rules_follow_the_family() -> None:
    """The measured differences between the families are kept: what spills on one may run on the other."""
    assert (64, 64, 8, 2) not in prune("dkdv", 80, 64, 577)  # 255 registers + 288 B spilled on sm_80
    assert (64, 64, 8, 2) in prune("dkdv", 90, 64, 577)  # fits on sm_90 (wgmma accumulates elsewhere)
    assert (32, 32, 4, 2) not in prune("fwd", 90, 128, 577)
    # A 16-token sequence at head dim 128 on sm_90: the smallest tiles spill or miss wgmma, so 64x32 runs.
    assert prune("fwd", 90, 128, 16) == [(64, 32, 4, 3)]


@pytest.mark.cuda
def test_family_of_this_gpu() -> None:
    assert at._arch_family(torch.empty(1, device="cuda")) in FAMILIES
