"""One profiled forward + backward of fastclip's fused CLIP loss, for Nsight Compute (`ncu`) or nsys.

    ncu --profile-from-start off ... python tools/profile_loss.py --n 65536 --dim 768 --dtype bf16

Warm-up calls run outside the profiled range (compilation, allocator growth); the one call inside it sits
between cudaProfilerStart and cudaProfilerStop. It also prints the call's time from CUDA events (on a
run without a profiler attached) as TFLOP/s on 8*N^2*D against the bf16/fp32 matmul rate of this GPU.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fastclip
from fastclip.backends import DTYPES, SHORT_DTYPE_NAMES

KERNEL_DTYPES = sorted(name for name in SHORT_DTYPE_NAMES if name != "fp64")  # the CUDA kernel has no float64


def step(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> None:
    loss = fastclip.contrastive_loss(image, text, scale, backend="cuda")
    torch.autograd.grad(loss, (image, text, scale))


def timed_ms(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dtype", choices=KERNEL_DTYPES, default="bf16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=0, help="timed calls after the profiled one (0: none)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    image, text = (
        F.normalize(torch.randn(args.n, args.dim, device="cuda", generator=gen), dim=-1).to(dtype).requires_grad_()
        for _ in range(2)
    )
    scale = torch.tensor(100.0, device="cuda", requires_grad=True)
    run = lambda: step(image, text, scale)  # noqa: E731
    for _ in range(args.warmup):
        run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    if args.reps:
        ms = timed_ms(run, args.reps)
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        mm_ms = timed_ms(lambda: a @ a, 10)
        tflops, mm_tflops = 8 * args.n**2 * args.dim / ms / 1e9, 2 * 8192**3 / mm_ms / 1e9
        print(
            f"N={args.n} D={args.dim} {args.dtype}: forward+backward {ms:.2f} ms, {tflops:.1f} TFLOP/s on 8*N^2*D "
            f"= {100 * tflops / mm_tflops:.1f}% of this GPU's {mm_tflops:.0f} TFLOP/s {args.dtype} matmul"
        )


if __name__ == "__main__":
    main()
