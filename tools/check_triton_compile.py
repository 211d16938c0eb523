"""Compile every attention kernel ahead of time for sm_80 and sm_90, without a GPU, and check its resources.

Each Triton kernel of `fastclip.ops.attention_triton` (forward, backward preprocess, the split backward's
dK/dV and dQ, the fused backward) is compiled
per dtype the kernels take on a GPU (bf16, fp16; fp32 goes to SDPA), head dim (32, 64, 80, 128),
causal/mask/lengths variant and autotune config that the runtime's `_prune` keeps for the architecture at
long sequence lengths, with the exact signature the runtime builds: the launchers' arguments are captured
from a CPU call of `forward` and `backward` and specialised by Triton's own rule (pointer alignment,
strides of 1, multiples of 16).

Shared memory comes from the kernel's metadata; registers and spills from the `ptxas -v` report of
Triton's own ptxas run (a compiled kernel's `n_regs`/`n_spills` exist only once it is loaded on a GPU).
Exit 1 on a compile error, on shared memory over the architecture's per-block limit, or on any register
spill (the runtime prunes the configs that spill, so none may be left). Results are recorded per compile
key under --cache-dir (Triton's cache key: source, signature, options, Triton build), so a rerun is fast,
from any checkout of the same kernels.

By default bf16 compiles in every variant (the image towers' plain attention, the text tower's causal
attention with lengths, and causal with mask and lengths, which holds every code path), fp16 in the last
(see `default_matrix`); --full compiles every variant, --quick bf16 only.

    python tools/check_triton_compile.py [--arch 80,90] [--jobs 2] [--quick | --full] [--kernels fused,dq]
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Opt-in shared memory per block (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {80: 166912, 90: 232448}
KERNELS = {
    "fwd": "_fwd_tuned",
    "dkdv": "_dkdv_tuned",
    "dq": "_dq_tuned",
    "fused": "_fused_tuned",
    "pre": "_bwd_preprocess",
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # label: torch dtype
HEAD_DIMS = (32, 64, 80, 128)
# (causal, key padding mask, lengths): the image towers' plain path, the text tower's, and the one that holds
# every masked branch (a causal kernel also has the unmasked full-tile loop, so the first and the last
# together compile every code path).
VARIANTS = ((False, False, False), (True, False, True), (True, True, True))
# A CLIP-like launch: 12 heads, ViT-L/14@336's 577 tokens (long enough that no config is pruned by length).
BATCH, HEADS, SEQ = 2, 12, 577


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: what the report names it by, and the exact `triton.compile` inputs."""

    kernel: str  # fwd | pre | dkdv | dq | fused
    dtype: str  # a DTYPES label
    head_dim: int
    causal: bool
    mask: bool
    lengths: bool
    config: str  # "BLOCK_MxBLOCK_N wW sS" (the preprocess: its fixed block and default options)
    arch: int
    fn_name: str  # the @triton.jit function in attention_triton
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    attrs: tuple[tuple[int, tuple], ...]
    options: tuple[tuple[str, int], ...]

    @property
    def tile(self) -> tuple[int, int]:
        """(BLOCK_M, BLOCK_N); BLOCK_N is 1 for the preprocess, which has none."""
        block_m, _, block_n = self.config.split()[0].partition("x")
        return int(block_m), int(block_n or 1)

    def label(self) -> str:
        variant = (
            ("causal" if self.causal else "-") + (" mask" if self.mask else " -") + (" len" if self.lengths else " -")
        )
        return f"sm_{self.arch} {self.kernel:<5} {self.dtype:<11} d={self.head_dim:<3} {variant:<15} {self.config:<14}"


@dataclasses.dataclass
class Result:
    job: Job
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    wgmma: bool | None = None  # whether the PTX holds Hopper's warpgroup MMA (sm_90: else mma.sync)
    error: str | None = None
    cached: bool = False

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    def failure(self) -> str | None:
        """Why this result fails the check, or None."""
        if self.error:
            return "compile error"
        if self.shared > SHARED_LIMIT[self.job.arch]:
            return f"shared memory {self.shared} B > {SHARED_LIMIT[self.job.arch]} B"
        if self.spills:
            return "spills"
        return None


# ----------------------------------------------------------------------------------- the jobs to compile


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, name: str, launches: list) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, args, kwargs))


def _capture_launches(at, dtype, causal: bool, mask: bool, lengths: bool, head_dim: int) -> list:
    """The kernel launches of one forward + backward on CPU tensors laid out as in a CLIP model."""
    from unittest import mock

    import torch

    launches: list = []
    qkv = torch.empty(BATCH, SEQ, 3, HEADS, head_dim, dtype=dtype).permute(2, 0, 3, 1, 4)  # fused-qkv views
    q, k, v = qkv.unbind(0)
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool) if mask else None
    ends = torch.full((BATCH,), SEQ, dtype=torch.int32) if lengths else None
    scale = head_dim**-0.5
    patches = [mock.patch.object(at, name, _Recorder(name, launches)) for name in KERNELS.values()]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        out, lse = at.forward(q, k, v, padding, causal, scale, lengths=ends)
        for grad_lse in (None, torch.empty_like(lse)):  # the preprocess with and without an lse gradient
            for path in at.BACKWARD_PATHS:  # both backwards: the runtime picks one per call
                at.backward(
                    torch.empty_like(out), grad_lse, q, k, v, out, lse, padding, causal, scale, lengths=ends, path=path
                )
    return launches


def _specialize(fn, bound: dict) -> tuple[dict, dict, dict]:
    """signature, constexprs and attrs as the runtime's binder builds them (JITFunction._pack_args)."""
    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError as error:  # the runtime's own rule is the point: never guess a replacement
        raise SystemExit(f"this Triton has no native_specialize_impl; update _specialize: {error}") from error
    from triton.backends.nvidia.compiler import CUDABackend

    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            kind, spec = "constexpr", None
        else:
            kind, spec = native_specialize_impl(
                CUDABackend,
                value,
                param.is_const,
                not param.do_not_specialize,
                not param.do_not_specialize_on_alignment,
            )
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value
        elif isinstance(spec, str):
            attrs[index] = tuple(tuple(a) for a in CUDABackend.parse_attr(spec))
    return signature, constexprs, attrs


def _config_label(block_m: int, block_n: int | None, warps: int | None, stages: int | None) -> str:
    tile = f"{block_m}x{block_n}" if block_n else f"{block_m}"
    return f"{tile} w{warps or 4} s{stages or 3}"  # 4 warps, 3 stages: Triton's defaults when not given


def build_jobs(
    archs: list[int], matrix: list[tuple[str, int, bool, bool, bool]], *, unpruned: bool = False
) -> list[Job]:
    """Every compile the runtime could need for `matrix` (dtype, head dim, causal, mask, lengths) on `archs`.
    `unpruned`: the configs the spill rules drop as well, to measure those rules again."""
    from unittest import mock

    import torch

    from fastclip.ops import attention_triton as at

    assert not at.INTERPRET, "TRITON_INTERPRET must be unset: the interpreter compiles nothing"
    if unpruned:
        with mock.patch.object(at, "_SPILLS", {}):
            return build_jobs(archs, matrix)
    jobs: dict[tuple, Job] = {}
    for label, head_dim, causal, mask, lengths in matrix:
        launches = _capture_launches(at, getattr(torch, DTYPES[label]), causal, mask, lengths, head_dim)
        for name, args, kwargs in launches:
            short = next(k for k, v in KERNELS.items() if v == name)
            kernel = getattr(at, name)
            tuned = getattr(kernel, "configs", None) is not None
            fn = kernel.fn if tuned else kernel
            named = dict(zip(fn.arg_names, args))
            for arch in archs:
                # The autotuner's own call, early_config_prune(configs, positional args by name, **kwargs),
                # with the GPU family given (the tensors here are on the CPU).
                configs = kernel.early_config_prune(kernel.configs, named, arch=arch, **kwargs) if tuned else [None]
                for config in configs:
                    job = _job(short, label, head_dim, (causal, mask, lengths), arch, fn, args, kwargs, config)
                    key = (job.fn_name, job.arch, job.signature, job.constexprs, job.attrs, job.options)
                    jobs.setdefault(key, job)  # e.g. the preprocess is the same with and without a mask
    return list(jobs.values())


def _job(
    kernel: str, label: str, head_dim: int, variant: tuple[bool, bool, bool], arch: int, fn, args, kwargs, config
) -> Job:
    """The compile of one captured launch with one autotune config (None: a plain launch)."""
    call = dict(kwargs, **(config.all_kwargs() if config else {}))
    options = {k: call.pop(k) for k in ("num_warps", "num_stages") if call.get(k) is not None}
    for k in [k for k in call if k not in fn.arg_names]:
        call.pop(k)  # other launch options (num_ctas, maxnreg, ...) stay at their defaults
    bound = inspect.signature(fn.fn).bind(*args, **call).arguments
    signature, constexprs, attrs = _specialize(fn, bound)
    config_label = _config_label(
        bound["BLOCK_M"], bound.get("BLOCK_N"), options.get("num_warps"), options.get("num_stages")
    )
    return Job(
        kernel=kernel,
        dtype=label,
        head_dim=head_dim,
        causal=variant[0],
        mask=variant[1],
        lengths=variant[2],
        config=config_label + (" dlse" if bound.get("HAS_DLSE") else "") + (" dq0" if bound.get("ZERO_DQ") else ""),
        arch=arch,
        fn_name=fn.fn.__name__,
        signature=tuple(signature.items()),
        constexprs=tuple(constexprs.items()),
        attrs=tuple(attrs.items()),
        options=tuple(sorted(options.items())),
    )


def default_matrix(full: bool) -> list[tuple[str, int, bool, bool, bool]]:
    """(dtype, head dim, causal, mask, lengths) to compile. bf16, what CLIP trains in, in every variant; fp16
    compiled to the same registers as bf16 in every measured case, so it compiles the variant with every
    code path only (compile errors, shared memory); `full`: every variant."""
    return [
        (label, head_dim, *variant)
        for label in DTYPES
        for head_dim in HEAD_DIMS
        for variant in VARIANTS
        if full or label == "bf16" or variant == VARIANTS[-1]
    ]


# ---------------------------------------------------------------------------------------- one compile

_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> tuple[int, int, int] | None:
    """(registers, spill store bytes, spill load bytes) from a `ptxas -v` report, or None if it has none."""
    registers, spills = _PTXAS_REGISTERS.search(log), _PTXAS_SPILLS.search(log)
    if not registers or not spills:
        return None
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def _run_ptxas(ptx: str, arch: int) -> str:
    """`ptxas -v` with the wheel's ptxas for the arch: for a Triton whose compile log could not be read."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        cmd = [
            get_ptxas(arch).path,
            "-v",
            f"--gpu-name={sm_arch_from_capability(arch)}",
            str(src),
            "-o",
            str(src.with_suffix(".o")),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def compile_job(job: Job, records: Path) -> Result:
    """Compile one job (or read its cached result) and measure registers, spills and shared memory."""
    import triton
    from triton import knobs
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.cache import get_cache_key

    from fastclip.ops import attention_triton as at

    fn = getattr(at, job.fn_name)
    target = GPUTarget("cuda", job.arch, 32)
    src = ASTSource(fn, dict(job.signature), dict(job.constexprs), {(i,): [list(a) for a in v] for i, v in job.attrs})
    backend = make_backend(target)
    key = get_cache_key(src, backend, backend.parse_options(dict(job.options)), get_cache_invalidating_env_vars())
    record = records / (hashlib.sha256(key.encode()).hexdigest() + ".json")
    if record.exists():
        values = json.loads(record.read_text())
        if "wgmma" in values:  # a record from before the wgmma field: compile again
            return Result(job, cached=True, **values)

    # Triton runs `ptxas -v` for the cubin anyway: read that very run (its binary and flags). A hit in
    # Triton's own cache would skip it, so compile afresh; the records above make a rerun fast instead.
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=dict(job.options))
    except Exception as error:  # noqa: BLE001  (any compile failure is a result to report)
        return Result(job, error=f"{type(error).__name__}: {str(error).strip()[-2000:]}")
    stats = parse_ptxas(log.getvalue()) or parse_ptxas(_run_ptxas(compiled.asm["ptx"], job.arch))
    if stats is None:
        return Result(job, error="no register report from ptxas -v")
    registers, stores, loads = stats
    values = dict(
        registers=registers,
        spill_stores=stores,
        spill_loads=loads,
        shared=int(compiled.metadata.shared),
        wgmma="wgmma.mma_async" in compiled.asm["ptx"],
    )
    record.write_text(json.dumps(values))
    return Result(job, **values)


def _cost(job: Job) -> tuple:
    """Slowest first, so that no long compile is left running alone at the end: the backward kernels that
    keep a key block (fused, dK/dV) have the most dots, and bigger tiles unroll more."""
    block_m, block_n = job.tile
    return job.kernel in ("fused", "dkdv"), job.kernel == "fused", block_m * block_n


def run_jobs(jobs: list[Job], records: Path, workers: int) -> list[Result]:
    """Compile in `workers` fresh processes (spawned: Triton's compiler state is not fork-safe)."""
    results: list[Result] = []
    step = max(1, len(jobs) // 10)
    with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = [pool.submit(compile_job, job, records) for job in sorted(jobs, key=_cost, reverse=True)]
        for done in futures.as_completed(pending):
            results.append(done.result())
            if len(results) % step == 0:
                print(f"  {len(results)}/{len(jobs)} compiled", file=sys.stderr, flush=True)
    return results


# ------------------------------------------------------------------------------------------------ report


def report(results: list[Result], archs: list[int], seconds: float) -> int:
    """Print one line per compile, the failures and a summary line; the exit status."""
    import triton

    order = {k: i for i, k in enumerate(KERNELS)}
    results.sort(
        key=lambda r: (
            r.job.arch,
            order[r.job.kernel],
            list(DTYPES).index(r.job.dtype),
            r.job.head_dim,
            r.job.causal,
            r.job.mask,
            r.job.lengths,
            r.job.tile,
            r.job.config,
        )
    )
    failures = []
    for r in results:
        why = r.failure()
        if r.error:
            line = f"{r.job.label()} ERROR {r.error.splitlines()[0][:160]}"
        else:
            spill = f"spill {r.spill_stores}/{r.spill_loads} B" if r.spills else "no spill"
            mma = "" if r.job.arch < 90 else "  wgmma" if r.wgmma else "  mma.sync"
            line = f"{r.job.label()} regs {r.registers:>3}  {spill:<17} smem {r.shared:>6} B{mma}"
        print(line + (f"  FAIL: {why}" if why else ""))
        if why:
            failures.append((r, why))
    for r, why in failures:
        print(f"FAILED {r.job.label().strip()}: {why}" + (f"\n{r.error}" if r.error else ""), file=sys.stderr)
    ok = [r for r in results if not r.error]
    spills = sum(r.spills for r in ok)
    over = sum(r.shared > SHARED_LIMIT[r.job.arch] for r in ok)
    print(
        f"triton {triton.__version__}: {len(ok)} kernels compiled for {', '.join(f'sm_{a}' for a in archs)}; "
        f"{spills} spill; max shared {max((r.shared for r in ok), default=0)} B, "
        f"{over} over the limit; {len(results) - len(ok)} errors ({sum(r.cached for r in results)} results cached, "
        f"{seconds:.0f} s)"
    )
    return 1 if failures else 0


def spill_rules(results: list[Result]) -> str:
    """The spilling configs as `attention_triton._SPILLS` lines: (kernel, arch, head-dim lanes) -> configs."""
    from fastclip.ops import attention_triton as at

    rules: dict[tuple[str, int, int], set[tuple[int, ...]]] = {}
    for r in results:
        if r.spills and r.job.kernel in at.autotuned_kernels():
            config = dict(r.job.constexprs)
            lanes = config["BLOCK_D"] + config.get("BLOCK_D1", 0)
            warps, stages = (dict(r.job.options).get(k) for k in ("num_warps", "num_stages"))
            rules.setdefault((r.job.kernel, r.job.arch, lanes), set()).add(
                (config["BLOCK_M"], config["BLOCK_N"], warps, stages)
            )
    return "\n".join(f"    {key!r}: {sorted(rules[key])!r}," for key in sorted(rules))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma separated (default 80,90)")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma separated, of {', '.join(DTYPES)}")
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="comma separated")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma separated, of {', '.join(KERNELS)}")
    parser.add_argument("--full", action="store_true", help="every dtype in every causal/mask/lengths variant")
    parser.add_argument("--quick", action="store_true", help="bf16 only (the spill gate), a few minutes less")
    parser.add_argument(
        "--unpruned",
        action="store_true",
        help="also the configs the spill rules drop, and print the rules these compiles measure (exit 0)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="Triton's cache and the recorded results (default: triton-compile/ in fastclip's cache directory, "
        "$FASTCLIP_CACHE_DIR, else $XDG_CACHE_HOME/fastclip, else ~/.cache/fastclip)",
    )
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in SHARED_LIMIT]
    if unknown:
        parser.error(f"no shared-memory limit known for sm_{unknown[0]} (known: {sorted(SHARED_LIMIT)})")

    import triton

    from fastclip.checkpoint.pretrained import cache_dir

    # Outside the checkout, so that a fresh clone (CI's) on the same machine reuses the records.
    cache = (args.cache_dir or cache_dir() / "triton-compile").resolve() / f"triton-{triton.__version__}"
    (cache / "records").mkdir(parents=True, exist_ok=True)
    # Set before any compile, inherited by the workers. No interpreter: it would compile nothing.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
    # Triton 3.9 warns once per process that its default (fusion on) will change; keep it, quietly.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    start = time.monotonic()
    dtypes = ["bf16"] if args.quick else args.dtypes.split(",")
    if not set(dtypes) <= set(DTYPES):
        parser.error(f"--dtypes: one of {', '.join(DTYPES)}, comma separated")
    head_dims = [int(d) for d in args.head_dims.split(",")]
    matrix = [m for m in default_matrix(args.full) if m[0] in dtypes and m[1] in head_dims]
    kernels = args.kernels.split(",")
    if not set(kernels) <= set(KERNELS):
        parser.error(f"--kernels: one of {', '.join(KERNELS)}, comma separated")
    jobs = [job for job in build_jobs(archs, matrix, unpruned=args.unpruned) if job.kernel in kernels]
    results = run_jobs(jobs, cache / "records", args.jobs)
    status = report(results, archs, time.monotonic() - start)
    if args.unpruned:
        print(f"spill rules measured by triton {triton.__version__}:\n{spill_rules(results)}")
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
