"""Registers, spills and shared memory of every kernel instantiation, from `ptxas -v` logs.

Usage: python tools/ptxas_report.py [--fail-on sm_80,sm_90] [--jit "sm_100 sm_120"] LOG...
(LOG: the stderr of nvcc -Xptxas -v, or of ptxas -v)

Prints one table per GPU architecture and a one-line summary. Exits 1 if a bf16/fp16 kernel spills on
an architecture of --fail-on (default: all): those are the fast paths, a spill there is a performance
bug. fp32 spills, and any on the --jit architectures (code the driver's JIT builds from PTX), are
reported only.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
USAGE = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")
# Template arguments as the demangler writes them -> short names.
SHORT = {
    "float": "fp32",
    "__half": "fp16",
    "__nv_bfloat16": "bf16",
    "true": "vec16",
    "false": "scalar",
    "(fastclip::cuda::Float32Mode)0": "tf32",
    "(fastclip::cuda::Float32Mode)1": "3xtf32",  # Float32Mode's values
}
LOW_PRECISION = ("bf16", "fp16")


@dataclass
class Kernel:
    arch: str
    mangled: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    name: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores + self.spill_loads > 0

    @property
    def low_precision(self) -> bool:
        return any(t in self.name for t in LOW_PRECISION)


def parse(lines: list[str]) -> list[Kernel]:
    kernels: list[Kernel] = []
    current: Kernel | None = None
    for line in lines:
        if m := ENTRY.search(line):
            current = Kernel(arch=m[2], mangled=m[1])
        elif current and (m := SPILLS.search(line)):
            current.spill_stores, current.spill_loads = int(m[1]), int(m[2])
        elif current and (m := USAGE.search(line)):
            current.registers = int(m[1])
            current.smem = int(s[1]) if (s := SMEM.search(line)) else 0
            kernels.append(current)
            current = None
    return kernels


def demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def shorten(demangled: str) -> str:
    """`ns::lse_backward_kernel<float, (ns::Float32Mode)1, true>(Args)` -> `lse_backward<fp32, 3xtf32, vec16>`.

    bf16/fp16 names leave out the float32 mode, which only fp32 uses.
    """
    m = re.search(r"(\w+)<(.*)>\(", demangled)
    if not m:
        return demangled
    name = m[1].removesuffix("_kernel")
    args = [SHORT.get(a.strip(), a.strip()) for a in m[2].split(",")]
    if args and args[0] in LOW_PRECISION:
        args = [a for a in args if a not in ("tf32", "3xtf32")]
    return f"{name}<{', '.join(args)}>"


def report(kernels: list[Kernel], fail_on: set[str] | None, jit: set[str]) -> int:
    for kernel, full in zip(kernels, demangle([k.mangled for k in kernels])):
        kernel.name = shorten(full)
    archs = sorted({k.arch for k in kernels}, key=lambda a: int(re.sub(r"\D", "", a)))
    width = max((len(k.name) for k in kernels), default=6)
    for arch in archs:
        origin = " (JIT from PTX)" if arch in jit else ""
        print(f"ptxas -v, {arch}{origin}: registers per thread; spill stores/loads, static shared memory (bytes)")
        print(f"  {'kernel':<{width}}  regs  spill st/ld   smem")
        for k in sorted((k for k in kernels if k.arch == arch), key=lambda k: k.name):
            flag = "  <- spills" if k.spills else ""
            print(f"  {k.name:<{width}}  {k.registers:4d}  {k.spill_stores:5d}/{k.spill_loads:<5d} {k.smem:6d}{flag}")
    enforced = [k for k in kernels if k.low_precision and (fail_on is None or k.arch in fail_on)]
    bad = [k for k in enforced if k.spills]
    reported = [k for k in kernels if k.spills and k not in bad]
    counts = {a: sum(k.arch == a for k in reported) for a in archs}
    per_arch = ", ".join(f"{a}: {count}" for a, count in counts.items() if count)
    registers = [k.registers for k in kernels]
    print(
        f"ptxas summary: {len({k.name for k in kernels})} kernels x {len(archs)} archs ({', '.join(archs)}); "
        f"registers {min(registers)}-{max(registers)}, smem <= {max(k.smem for k in kernels)} B; "
        f"bf16/fp16 spills on {', '.join(sorted({k.arch for k in enforced}))}: {len(bad) or 'none'}; "
        f"reported spills: {f'{len(reported)} ({per_arch})' if reported else 'none'}"
    )
    for k in bad:
        where = f"{k.spill_stores} B stored, {k.spill_loads} B loaded"
        print(f"error: {k.name} spills on {k.arch} ({where}); see the table above", file=sys.stderr)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--fail-on", help="comma-separated archs whose bf16/fp16 spills fail (default: all)")
    parser.add_argument("--jit", default="", help="space-separated archs built from PTX (labelled in the tables)")
    args = parser.parse_args()
    lines: list[str] = []
    for path in args.logs:
        with open(path) as f:
            lines += f.read().splitlines()
    kernels = parse(lines)
    if not kernels:
        print("error: no kernel found in the ptxas logs", file=sys.stderr)
        return 1
    fail_on = set(args.fail_on.split(",")) if args.fail_on else None
    return report(kernels, fail_on, set(args.jit.split()))


if __name__ == "__main__":
    sys.exit(main())
