"""Where an attention call's time goes on a GPU: kernel time against wall time, per competitor.

    python tools/profile_attention.py [--shape text] [--competitors fastclip,sdpa_flash] [--reps 20]

Runs bench_attention.py's inputs and competitors (the model's strided q/k/v views, the backward to the packed
qkv leaf) under torch.profiler and prints, per competitor: wall time per forward + backward, the GPU kernels'
summed time in it, and the busiest kernels. Kernel time far below wall time means the call is bound by host
work (Python, dispatch, launches), which faster kernels cannot fix.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_attention  # noqa: E402

from fastclip.backends import DTYPES  # noqa: E402


def profiled(fn, inputs: bench_attention.Inputs, reps: int) -> tuple[float, float, list[tuple[str, float]]]:
    """(wall ms, kernel ms, [(kernel, ms)] busiest first), each per forward + backward."""

    def step():
        out = bench_attention.merge_heads(fn(*bench_attention.split_heads(inputs.qkv)))
        return torch.autograd.grad(out, inputs.qkv, inputs.grad_out)

    for _ in range(3):  # autotuning and lazy initialisation stay out of the profile
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / reps
    kernels = [
        (event.key, event.self_device_time_total / 1e3 / reps)
        for event in prof.key_averages()
        if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0
    ]
    kernels.sort(key=lambda item: -item[1])
    return wall_ms, sum(ms for _, ms in kernels), kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="text", choices=sorted(bench_attention.SHAPES))
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--competitors", default="fastclip,fastclip_dense,sdpa,sdpa_flash")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--top", type=int, default=6, help="kernels listed per competitor")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_attention.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    shape = bench_attention.SHAPES[args.shape]
    inputs = bench_attention.make_inputs(shape, DTYPES[args.dtype], "cuda")
    available = bench_attention.competitors(shape, inputs, "cuda")
    wanted = args.competitors.split(",")
    unknown = [name for name in wanted if name not in available]
    if unknown:
        parser.error(f"unknown competitors {unknown}; this shape has {sorted(available)}")
    print(f"{args.shape} {shape}, {args.dtype}: per forward + backward, {args.reps} reps under the profiler")
    for name in wanted:
        wall_ms, kernel_ms, kernels = profiled(available[name], inputs, args.reps)
        busy = 100 * kernel_ms / wall_ms
        print(f"{name:16s} wall {wall_ms:8.3f} ms  kernels {kernel_ms:8.3f} ms  ({busy:5.1f}% busy)")
        for kernel, ms in kernels[: args.top]:
            print(f"{'':18s}{ms:8.3f} ms  {kernel[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
