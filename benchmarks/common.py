"""The benchmark harness: timing, peak memory, the out-of-memory sweep, the environment header, a matmul
reference rate, the shared command-line arguments, and the output (JSON record, console table, plots).

Used by the `bench_*.py` scripts next to this file, which keep only what they measure (competitors, shapes,
targets); every helper works on a CPU and on a CUDA device. Run as a script only by `cpu_peak_extra_bytes`,
to measure one call's memory in a fresh process.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # fastclip from the checkout, installed or not

from fastclip.backends import DTYPES, SHORT_DTYPE_NAMES, dtype_name  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "local"  # gitignored


# --------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call, including the device work it queued."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _cuda_events_ms(fn: Callable[[], Any], warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _within_budget(calls_that_fit: float, reps: int, warmup: int, min_reps: int) -> tuple[int, int]:
    """(reps, warmup) cut so that about `calls_that_fit` calls run in all, never fewer than `min_reps` timed."""
    fit = int(calls_that_fit)
    reps = max(min_reps, min(reps, fit))
    return reps, min(warmup, max(0, fit - reps))


def time_fn(
    fn: Callable[[], Any],
    device: str | torch.device,
    warmup: int = 5,
    reps: int = 20,
    *,
    budget_s: float | None = None,
    min_reps: int = 3,
    warmed: bool = False,
) -> dict:
    """Median and min time of `fn()` in ms, after one untimed call (lazy init, autotuning) and `warmup` more.

    `warmed=True` says `fn` already ran once here, so on CUDA the lazy-init call is skipped (slow calls).
    With `budget_s`, slow calls get fewer repetitions (never fewer than `min_reps`) so one measurement
    takes about `budget_s` seconds. On CUDA: `triton.testing.do_bench` (L2 flushed between runs) for calls
    under 100 ms when Triton imports, else CUDA events; on CPU: `time.perf_counter`.
    """
    device = torch.device(device)
    estimate = _once_ms(fn, device)  # first call: lazy init, compilation, allocator warm-up
    if device.type == "cuda" and not warmed:
        estimate = _once_ms(fn, device)  # the first is no estimate on a GPU (context, cuBLAS handles)
    if budget_s is not None:
        reps, warmup = _within_budget(budget_s * 1e3 / max(estimate, 1e-3), reps, warmup, min_reps)
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        times = [_once_ms(fn, device) for _ in range(reps)]
        return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps, "timer": "perf_counter"}
    if estimate < 100:
        try:
            from triton.testing import do_bench

            median, fastest = do_bench(fn, warmup=max(1, warmup) * estimate, rep=reps * estimate, quantiles=[0.5, 0.0])
            return {"median_ms": median, "min_ms": fastest, "reps": reps, "timer": "triton.do_bench"}
        except Exception:  # no Triton, or an API it does not match: CUDA events below
            pass
    times = _cuda_events_ms(fn, warmup, reps)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps, "timer": "cuda_events"}


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    warmup: int = 1,
    reps: int = 5,
    *,
    budget_s: float | None = None,
    min_reps: int = 3,
) -> dict[str, dict]:
    """`time_fn`'s result per name, for competitors on a CPU timed in turns: after one untimed round (lazy
    init, and the estimate), each round calls every function once, in a rotated order. A drift of the
    machine's speed (other work, clock changes) then falls on all of them alike instead of on whichever ran
    while it lasted, so their ratios hold where separate timings on a shared two-core machine spread by
    10% and more.

    With `budget_s`, slow rounds get fewer repetitions (never fewer than `min_reps`): about `budget_s`
    seconds per competitor, as `time_fn` gives each.
    """
    names = list(fns)
    if not names:
        return {}
    round_ms = sum(_once_ms(fns[name], torch.device("cpu")) for name in names)
    if budget_s is not None:
        reps, warmup = _within_budget(budget_s * 1e3 * len(names) / max(round_ms, 1e-3), reps, warmup, min_reps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(warmup + reps):
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:  # no competitor always first (or last) in a round
            elapsed = _once_ms(fns[name], torch.device("cpu"))
            if turn >= warmup:
                times[name].append(elapsed)
    return {
        name: {"median_ms": statistics.median(t), "min_ms": min(t), "reps": reps, "timer": "perf_counter, interleaved"}
        for name, t in times.items()
    }


# --------------------------------------------------------------------------------------------- inputs

CAPTION_MEAN_TOKENS = 18.0  # start + text + end-of-text: the mean CLIP caption fills ~18 of its 77 positions
CAPTION_LOG_SIGMA = 0.5  # spread of log(length): 90% of captions 7-36 tokens, a thin tail of long ones
CAPTION_LENGTHS = (
    f"log-normal, mean {CAPTION_MEAN_TOKENS:g} tokens (start and end-of-text included), sigma {CAPTION_LOG_SIGMA:g} "
    "in log space, rounded and clipped to [2, context]; seed 0"
)


def caption_lengths(batch: int, context: int = 77, seed: int = 0) -> torch.Tensor:
    """Token counts of `batch` realistic captions (CPU int64, [batch]): see CAPTION_LENGTHS.

    Log-normal because caption lengths are positive and right-skewed (many short captions, a few long ones);
    a symmetric normal would put the mean at the mode. Mean ~18 of 77 is what CLIP's text tower sees, so a
    benchmark at full length would time ~4x the useful work. Fixed seed: every run and competitor gets the same
    rows (the realised mean of a small batch strays from 18: report it, see `length_summary`).
    """
    generator = torch.Generator().manual_seed(seed)
    log_mean = math.log(CAPTION_MEAN_TOKENS) - CAPTION_LOG_SIGMA**2 / 2  # so that E[length] = CAPTION_MEAN_TOKENS
    lengths = (torch.randn(batch, generator=generator, dtype=torch.float64) * CAPTION_LOG_SIGMA + log_mean).exp()
    return lengths.round().clamp(2, context).long()


def length_summary(lengths: torch.Tensor) -> dict:
    """Mean, min and max of a lengths tensor, and the distribution they were drawn from (for the JSON)."""
    values = lengths.double()
    return {
        "mean": values.mean().item(),
        "min": int(values.min()),
        "max": int(values.max()),
        "distribution": CAPTION_LENGTHS,
    }


# --------------------------------------------------------------------------------------------- memory


def is_oom(error: BaseException) -> bool:
    """A CUDA or CPU allocation failure (as opposed to a bug)."""
    text = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def cuda_peak_extra_bytes(fn: Callable[[], Any], warm: bool = True) -> int:
    """Peak bytes the CUDA caching allocator handed out during `fn()` beyond what was allocated before it.

    `warm` runs `fn` once first: lazily allocated workspaces (cuBLAS, autotuning) are not the call's own memory.
    """
    if warm:
        fn()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_peak_extra_bytes(
    factory: Callable[..., Callable[[], Any]],
    kwargs: dict,
    warmup_kwargs: dict | None = None,
    timeout_s: float = 600,
) -> int | None:
    """Peak RSS growth of one call of `factory(**kwargs)()`, measured in a fresh process; None if unmeasurable.

    `factory` must be a module-level function (the child imports its file) that builds its inputs and
    returns the zero-argument callable to measure. The child first runs `factory(**warmup_kwargs)()` (small
    sizes: loads lazy libraries and thread pools), resets the kernel's high-water mark (writes 5 to
    /proc/self/clear_refs), and reports VmHWM after the call minus VmRSS before it. glibc's mmap threshold
    is pinned in the child so freed blocks go back to the OS and the mark tracks live memory, not caching.
    """
    if not (os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")):
        return None
    spec = {
        "file": inspect.getfile(factory),
        "factory": factory.__name__,
        "kwargs": kwargs,
        "warmup_kwargs": warmup_kwargs,
        "threads": torch.get_num_threads(),
    }
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = None
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--rss-child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            cwd=REPO,
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
    except (subprocess.SubprocessError, OSError, ValueError, IndexError, KeyError):
        reason = proc.stderr[-500:] if proc is not None else "timed out or did not start"
        print(f"cpu_peak_extra_bytes: the child failed: {reason}", file=sys.stderr)
        return None


def _rss_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    module_spec = importlib.util.spec_from_file_location("_bench_child", spec["file"])
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    factory = getattr(module, spec["factory"])
    if spec["warmup_kwargs"] is not None:
        factory(**spec["warmup_kwargs"])()
    fn = factory(**spec["kwargs"])
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current RSS
        before = _proc_status_kb("VmRSS")
    except OSError:
        print(json.dumps({"peak_extra_bytes": None}))
        return
    fn()
    print(json.dumps({"peak_extra_bytes": (_proc_status_kb("VmHWM") - before) * 1024}))


# --------------------------------------------------------------------------------------------- sweeps


def free_memory(device: str) -> None:
    """Give back what the last point allocated, so that the next one starts from an empty cache."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure_or_oom(measure: Callable[[], dict], device: str) -> dict:
    """`measure()`'s row, or {"status": "oom", "reason": ...} when it ran out of memory; memory given back."""
    reason = None
    try:
        row = measure()
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not is_oom(error):
            raise
        reason = str(error).splitlines()[0][:200]
    # outside the except block: the traceback (and the tensors its frames hold) is gone by now
    free_memory(device)
    if reason is not None:
        return {"status": "oom", "reason": reason}
    return row


def doubled(sizes: list[int], limit: int) -> list[int]:
    """`sizes` up to `limit`, extended by doubling the last one while that stays within `limit`."""
    sizes = [n for n in sizes if n <= limit]
    while sizes and sizes[-1] * 2 <= limit:
        sizes.append(sizes[-1] * 2)
    return sizes


def sweep_until_oom(sizes: list[int], fits: Callable[[int], bool], refine: int = 0, multiple: int = 1) -> None:
    """Run `fits(size)` (False: out of memory) over `sizes` until one does not fit, as a larger one would not
    either; then `refine` bisection steps between the last size that fit and the first that did not (sizes
    multiples of `multiple`) narrow the largest size down from the sweep's step."""
    largest, too_big = None, None
    for size in sizes:
        if not fits(size):
            too_big = size
            break
        largest = size
    for _ in range(refine if largest and too_big else 0):
        size = (largest + too_big) // 2 // multiple * multiple
        if size <= largest:
            break
        if fits(size):
            largest = size
        else:
            too_big = size


# ---------------------------------------------------------------------------------------- environment


def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_header() -> dict:
    """Where and with what a result was measured (no hostname)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import fastclip

        fastclip_info = fastclip.info()
    except Exception as error:  # a broken build must not stop the header
        fastclip_info = {"error": repr(error)}
    cuda = torch.cuda.is_available()
    commit = _run(["git", "rev-parse", "HEAD"])
    # dirty = changes to anything but results (untracked code counts: it is part of what ran)
    status = _run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/results"])
    return {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other work on the machine skews CPU timings: the 1/5/15-minute load when the run started
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "gpu_driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "fastclip": fastclip_info,
    }


@functools.lru_cache(maxsize=None)
def _matmul_rate(device: str, dtype: torch.dtype, n: int, tf32: bool) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    timing = time_fn(lambda: a @ b, device, warmup=3, reps=10 if device == "cuda" else 5)
    return 2 * n**3 / (timing["median_ms"] / 1e3) / 1e12


def matmul_rate_tflops(device: str | torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured TFLOP/s of an n x n @ n x n matmul (8192 on a GPU, 2048 on a CPU): the arithmetic reference.

    fp32 on CUDA follows `torch.backends.cuda.matmul.allow_tf32`, as the benchmarked code does.
    """
    device = torch.device(device).type
    n = n or (8192 if device == "cuda" else 2048)
    return _matmul_rate(device, dtype, n, torch.backends.cuda.matmul.allow_tf32)


# ---------------------------------------------------------------------------------------- command line


class ByDevice(NamedTuple):
    """An argument's default that depends on --device; `parse_benchmark_args` puts in the chosen device's."""

    cuda: Any
    cpu: Any

    def __str__(self) -> str:  # in --help, through %(default)s
        return f"{_shown(self.cuda)} on cuda, {_shown(self.cpu)} on cpu"


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def int_list(value: str) -> list[int]:
    """A comma-separated list of integers (argparse type)."""
    return [int(x) for x in value.split(",")]


def name_list(value: str) -> list[str]:
    """A comma-separated list of names (argparse type)."""
    return value.split(",")


def dtype_list(value: str) -> list[str]:
    """A comma-separated list of fastclip's dtype names (argparse type), each as its short name ("bf16")."""
    unknown = [name for name in value.split(",") if name not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtypes {unknown}; choose from {','.join(SHORT_DTYPE_NAMES)}")
    return [dtype_name(DTYPES[name]) for name in value.split(",")]


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """A parser that shows the script's docstring: its first paragraph, then (after the usage) the rest."""
    summary, _usage, details = doc.split("\n\n", 2)
    return argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_device_argument(parser: argparse.ArgumentParser, *, auto: bool = False) -> None:
    """--device: cuda when a GPU is visible, else cpu; with `auto`, that choice is the value "auto"."""
    if auto:
        parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    else:
        parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")


def add_timing_arguments(
    parser: argparse.ArgumentParser,
    warmup: Any,
    reps: Any,
    budget_s: Any = None,
    *,
    unit: str = "calls",
    reps_flag: str = "--reps",
) -> None:
    """--warmup, --reps (or `reps_flag`) and, given its default, --budget-s: `time_fn`'s settings per point."""
    parser.add_argument(
        "--warmup", type=int, default=warmup, help=f"untimed {unit} before the timed ones (default: %(default)s)"
    )
    parser.add_argument(reps_flag, type=int, default=reps, help=f"timed {unit} per point (default: %(default)s)")
    if budget_s is not None:
        parser.add_argument(
            "--budget-s",
            type=float,
            default=budget_s,
            help=f"fewer timed {unit} (at least 3) for slow points, to take about this many "
            "seconds (default: %(default)s)",
        )


def add_cpu_memory_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-cpu-memory",
        dest="cpu_memory",
        action="store_false",
        help="on a CPU, skip the peak-memory measurement (a fresh process per point, seconds each)",
    )


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`: the device resolved ("auto": cuda when visible) and checked, ByDevice defaults filled in."""
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    for name, value in list(vars(args).items()):
        if isinstance(value, ByDevice):
            setattr(args, name, getattr(value, args.device))
    return args


# --------------------------------------------------------------------------------------------- output


def write_results(out_dir: str | Path, name: str, payload: dict) -> Path:
    """Write `<out_dir>/<name>.json` (pretty; the environment header first unless given) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    if "environment" not in payload:
        payload = {"environment": environment_header(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


class Record:
    """One run's `<out_dir>/<name>.json`: the payload, whose `rows` list grows a row per point, rewritten after
    every point (a killed run keeps its data); at the end the path and the plot `<name>.png` are reported."""

    def __init__(self, out_dir: str | Path, name: str, payload: dict, rows: str | None = "rows") -> None:
        self.out_dir, self.name, self.payload = Path(out_dir), name, payload
        self.rows: list[dict] = payload[rows] if rows is not None else []

    def add(self, row: dict, *lines: str) -> None:
        """Keep `row`, print its console `lines` (above a progress bar if one is shown) and rewrite the file."""
        self.rows.append(row)
        for line in lines:
            tqdm.write(line)
        sys.stdout.flush()  # a log piped to a file shows each point as it is measured
        self.save()

    def save(self) -> Path:
        return write_results(self.out_dir, self.name, self.payload)

    def finish(self, plot: Callable[[Path], Path | None]) -> Path:
        """Write the file a last time, then `plot(<name>.png path)`; print where both went."""
        path = self.save()
        print(f"results: {path}")
        png = plot(self.out_dir / f"{self.name}.png")
        if png is not None:
            print(f"plot: {png}")
        return path


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    spec: str = ""  # format spec of a number in this column, e.g. ".2f"
    align: str = ">"


class Table:
    """A fixed-width console table: a header line, then one line per row of values."""

    def __init__(self, *columns: Column, indent: str = "") -> None:
        self.columns, self.indent = columns, indent

    def header(self) -> str:
        return self.indent + " ".join(f"{c.title:{c.align}{c.width}}" for c in self.columns)

    def line(self, *values: Any) -> str:
        """The first len(values) cells: numbers in their column's spec, None as n/a, text as it is."""
        return self.indent + " ".join(_cell(c, v) for c, v in zip(self.columns, values, strict=False))


def _cell(column: Column, value: Any) -> str:
    if value is None:
        text = "n/a"
    elif isinstance(value, str):
        text = value
    else:
        text = format(value, column.spec)
    return f"{text:{column.align}{column.width}}"


def status_line(head: str, row: dict) -> str:
    """The console line of a point that did not run: its `head` cells, its status and why."""
    return f"{head} {row['status']}: {row.get('reason', '')}"[:170]


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None (said on stderr) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    return plt


def _save_figure(plt: Any, fig: Any, path: str | Path, title: str | None = None) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lines(path: str | Path, panels: list[dict], *, ncols: int = 2, title: str | None = None) -> Path | None:
    """Line plots to a PNG, one panel per dict; None when matplotlib is missing.

    A panel: {"title", "xlabel", "ylabel", "series": {label: (xs, ys)}, optional "styles": {label: plot kwargs},
    "logx"/"logy" (default True)}. A label keeps its colour across panels.
    """
    plt = _pyplot()
    if plt is None:
        return None
    labels = list(dict.fromkeys(label for panel in panels for label in panel["series"]))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):  # a last row may have more axes than panels
        for label, (xs, ys) in panel["series"].items():
            points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if points:
                style = {"marker": "o", "color": colours[label], **panel.get("styles", {}).get(label, {})}
                ax.plot(*zip(*points, strict=True), label=label, **style)
        if panel.get("logx", True):
            ax.set_xscale("log", base=2)
        if panel.get("logy", True):
            ax.set_yscale("log")
        ax.set(title=panel.get("title", ""), xlabel=panel.get("xlabel", ""), ylabel=panel.get("ylabel", ""))
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel where nothing was measured has no legend
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    return _save_figure(plt, fig, path, title)


def plot_bars(
    path: str | Path,
    groups: list[str],
    series: dict[str, list[float]],
    *,
    ylabel: str,
    title: str,
    logy: bool = False,
    reference: float | None = None,
) -> Path | None:
    """Grouped bars to a PNG: per group (x tick) one bar of each series; None when matplotlib is missing.

    `series` maps a label to one value per group (0 where it does not apply); `reference` draws a level line.
    """
    plt = _pyplot()
    if plt is None or not groups or not series:
        return None
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 4.5))
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=label)
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=8)
    if logy:
        ax.set_yscale("log")
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8 if len(series) <= 4 else 6, ncol=-(-len(series) // 4))
    return _save_figure(plt, fig, path)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
    _rss_child(sys.argv[2])
