"""Render one results folder's benchmark JSON as Markdown tables, for the README's GPU results block.

    python tools/results_table.py benchmarks/results/NVIDIA_H200 [--readme README.md] [--check]

Reads whichever of these the folder holds (a missing one gets no section): bench_loss.json (CLIP loss),
bench_loss_siglip.json, attention_cuda.json (or attention_cpu.json),
bench_train.json and bench_model.json. Every figure in the output is read from them; the script only
formats and orders. Without --readme the Markdown goes to stdout; with it, the lines strictly between the
`<!-- gpu-results:begin` and `<!-- gpu-results:end` marker lines are replaced (markers kept); --check then
writes nothing and exits 1 when that block differs from the rendering. Exit 2: a missing folder, no JSON in
it, unreadable JSON, or markers missing or repeated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

BEGIN = "<!-- gpu-results:begin"
END = "<!-- gpu-results:end"

# section -> the file names that hold it, the first present one wins
SOURCES: dict[str, tuple[str, ...]] = {
    "loss": ("bench_loss.json",),
    "siglip": ("bench_loss_siglip.json",),
    "attention": ("attention_cuda.json", "attention_cpu.json"),  # bench_attention.py names it by device type
    "train": ("bench_train.json",),
    "model": ("bench_model.json",),
}
LOSS_TITLES = {"clip": "Contrastive loss (CLIP)", "siglip": "SigLIP sigmoid loss", "supcon": "SupCon loss"}
DASH = "–"


class UsageError(Exception):
    """A problem with the inputs rather than with this script: one line on stderr, exit 2."""


# --------------------------------------------------------------------------------------------- numbers


def sig(value: float | None) -> str:
    """`value` to 3 significant figures in plain notation (1573.4 -> "1570", 0.03954 -> "0.0395")."""
    if value is None or isinstance(value, bool) or not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    rounded = float(f"{value:.3g}")  # round first: 99.96 becomes 100, which then needs no decimals
    decimals = max(0, 2 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:.{decimals}f}"


def size(count: int | None) -> str:
    """A byte count in MiB below 1 GiB, else in GiB; n/a when not measured."""
    if count is None:
        return "n/a"
    if count < 2**30:
        return f"{sig(count / 2**20)} MiB"
    return f"{sig(count / 2**30)} GiB"


def times(ratio: float | None) -> str:
    return DASH if ratio is None else f"{sig(ratio)}×"


def limit(value: float) -> str:
    """A configured threshold as written in the benchmark (1.3, not 1.30)."""
    return f"{value:g}"


def percent(fraction: float | None) -> str:
    return DASH if fraction is None else f"{sig(100 * fraction)}%"


# --------------------------------------------------------------------------------------------- input


def load_results(folder: Path) -> dict[str, dict]:
    """Section name -> its parsed JSON, for the sections whose file the folder holds."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such results folder")
    payloads = {}
    for section, names in SOURCES.items():
        path = next((folder / name for name in names if (folder / name).is_file()), None)
        if path is None:
            continue
        try:
            payloads[section] = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"{path}: not readable JSON ({error})") from error
    if not payloads:
        wanted = ", ".join(name for names in SOURCES.values() for name in names)
        raise UsageError(f"{folder}: none of {wanted}")
    return payloads


# ---------------------------------------------------------------------------------------- environment


def describe_environment(env: dict) -> str:
    """Device and software versions, and the commit measured (a dirty tree said so)."""
    versions = [
        f"{label} {env[key]}"
        for label, key in (("driver", "gpu_driver"), ("CUDA", "torch_cuda"), ("torch", "torch"), ("Triton", "triton"))
        if env.get(key)
    ]
    text = f"**{env.get('device', 'unknown device')}**" + (f" ({', '.join(versions)})" if versions else "")
    commit = env.get("git_commit")
    if commit:
        text += f", commit `{commit[:7]}`" + (" with uncommitted changes" if env.get("git_dirty") else "")
    return text


def matmul_rates(payloads: dict[str, dict]) -> str:
    """The measured matmul rates of the loss runs (each loss file measures its own)."""
    texts = {}
    for section in ("loss", "siglip"):
        rates = payloads.get(section, {}).get("matmul_tflops") or {}
        if rates:
            texts[section] = ", ".join(f"{dtype} {sig(rate)} TFLOP/s" for dtype, rate in rates.items())
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return "; ".join(f"{text} ({section} run)" for section, text in texts.items())


def header_line(payloads: dict[str, dict]) -> str:
    """The line above the tables: where, with what and when everything was measured."""
    envs = [p.get("environment") or {} for p in payloads.values()]
    dates = sorted({env["timestamp_utc"][:10] for env in envs if env.get("timestamp_utc")})
    line = f"Measured on {describe_environment(envs[0])}"
    if dates:
        line += f", {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "")
    rates = matmul_rates(payloads)
    if rates:
        line += f"; measured matmul rate {rates}"
    return line + "."


def environment_note(payload: dict, first: dict) -> list[str]:
    """A line under a section measured elsewhere than the header says (another commit, other versions)."""
    described = describe_environment(payload.get("environment") or {})
    if described == describe_environment(first.get("environment") or {}):
        return []
    return [f"_This table: measured on {described}._", ""]


# --------------------------------------------------------------------------------------------- tables


def table(head: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A Markdown table; `align` has an "l" (text) or "r" (numbers) per column."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in (head, rule, *rows)]


def ordered_points(payload: dict) -> list[dict]:
    """The loss points grouped by (dtype, D, N) in the order they ran, backends in the config's order."""
    backends = list(payload.get("config", {}).get("backends", []))
    points = payload.get("points", [])
    groups = list(dict.fromkeys((p["dtype"], p["d"], p["n"]) for p in points))

    def rank(point: dict) -> tuple[int, int]:
        backend = point["backend"]
        return groups.index((point["dtype"], point["d"], point["n"])), (
            backends.index(backend) if backend in backends else len(backends)
        )

    return sorted(points, key=rank)  # stable: an unlisted backend keeps its place after the listed ones


def loss_row(point: dict) -> list[str]:
    """One point: fwd+bwd time, rate, share of the matmul rate, peak extra memory, speed-up over naive."""
    head = [point["dtype"], str(point["d"]), str(point["n"]), f"`{point['backend']}`"]
    if point.get("status") != "ok":
        return [*head, point.get("status", "unknown"), DASH, DASH, DASH, DASH]
    if point.get("check") and not point["check"].get("ok", True):
        head[-1] += " (check failed)"  # a figure of a wrong result must not pass unnoticed
    fb = point["fwd_bwd"]
    return [
        *head,
        sig(fb["median_ms"]),
        sig(fb.get("tflops")),
        percent(fb.get("matmul_fraction")),
        size(point.get("peak_extra_bytes")),
        times(fb.get("speedup_vs_naive")),
    ]


def siglip_target_line(target: dict) -> list[str]:
    """The SigLIP target's verdict, when the run reached its point."""
    if not target or target.get("fused_status") is None:
        return []
    where = f"{target['dtype']}, D = {target['d']}, N = {target['n']}, `{target['backend']}`"
    memory = f"{limit(100 * target['max_memory_fraction'])}%"
    wanted = f"≥ {limit(target['min_speedup'])}× naive's speed at < {memory} of its memory"
    measured = (
        f"{times(target.get('fwd_bwd_speedup_vs_naive'))} at {percent(target.get('memory_vs_naive'))} of its memory"
    )
    if target.get("fused_status") != "ok":
        measured = target["fused_status"]
    verdict = {True: "met", False: "**missed**", None: target.get("note") or "undecided"}[target.get("met")]
    return ["", f"Target ({where}): {wanted}; measured {measured}: {verdict}."]


def loss_section(payload: dict) -> list[str]:
    """Forward + backward of every backend at every (dtype, D, N)."""
    loss = payload.get("config", {}).get("loss", "clip")
    lines = [
        f"#### {LOSS_TITLES.get(loss, loss)}: forward + backward",
        "",
        "TFLOP/s counts 8·N²·D per step for every backend; % is of the measured matmul rate above; memory is the "
        "peak allocated beyond the inputs; × naive is the materialised-logits loss's time over this one's.",
        "",
    ]
    rows = [loss_row(point) for point in ordered_points(payload)]
    head = ["dtype", "D", "N", "backend", "fwd+bwd ms", "TFLOP/s", "% matmul", "peak extra memory", "× naive"]
    return lines + table(head, rows, "llll" + "r" * 5) + siglip_target_line(payload.get("target") or {})


def shape_cell(row: dict) -> str:
    """An attention shape: its name and sizes, causal and the realised caption lengths when they apply."""
    parts = [f"B {row['batch']}", f"H {row['heads']}", f"S {row['seq']}", f"d {row['head_dim']}"]
    if row.get("causal"):
        parts.append("causal")
    if row.get("length_stats"):
        parts.append(f"captions mean {sig(row['length_stats']['mean'])} tokens")
    return f"{row['shape']} ({', '.join(parts)})"


def target_cell(row: dict) -> str:
    """fastclip's target on this shape: met, missed, or why it was not judged."""
    target = row.get("target")
    if not target:
        return ""
    verdict = {True: "met", False: "**missed**", None: target.get("note") or "undecided"}[target.get("met")]
    return f"≥ {limit(target['min_speedup'])}×: {verdict}"


def attention_rows(row: dict) -> list[list[str]]:
    """One line per competitor on one shape and dtype; the shape named on its first line only."""
    best = row.get("best_sdpa")
    ratios = row.get("speedups_vs_best_sdpa") or {}
    lines = []
    for label, result in row.get("results", {}).items():
        name = f"`{label}`" + (" (best SDPA)" if label == best else "")
        if "fwd_bwd" not in result:
            cells = ["skipped" if "skipped" in result else "n/a", DASH, DASH, ""]
        else:
            fb = result["fwd_bwd"]
            cells = [sig(fb["median_ms"]), sig(fb.get("tflops")), times(ratios.get(label))]
            cells.append(target_cell(row) if label == "fastclip" else "")
        first = not lines
        lines.append([shape_cell(row) if first else "", row["dtype"] if first else "", name, *cells])
    return lines


def attention_section(payload: dict) -> list[str]:
    """Forward + backward of every competitor per shape, and fastclip's speed-up over the best SDPA one."""
    lines = [
        "#### Attention on CLIP's shapes: forward + backward",
        "",
        "TFLOP/s counts the useful FLOPs (text: only the causal pairs inside each caption); × best SDPA is the "
        "fastest SDPA competitor's time over this one's.",
        "",
    ]
    rows = [line for row in payload.get("rows", []) for line in attention_rows(row)]
    head = ["shape", "dtype", "competitor", "fwd+bwd ms", "TFLOP/s", "× best SDPA", "target"]
    return lines + table(head, rows, "lllrrrl")


def train_side(row: dict | None) -> str:
    if row is None:
        return DASH
    return sig(row["samples_per_s"]) if row.get("status") == "ok" else row.get("status", "unknown")


def train_rows(rows: list[dict], sides: list[str], with_mfu: bool) -> list[list[str]]:
    """Per batch: each side's samples/s (or why it has none), their ratio, and the MFU where recorded."""
    by_batch: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_batch.setdefault(row["batch"], {})[row["impl"]] = row
    lines = []
    for batch in sorted(by_batch):
        mine = by_batch[batch]
        ok = {side: mine[side] for side in sides if mine.get(side, {}).get("status") == "ok"}
        ratio = None
        if len(ok) == 2:
            ratio = ok["fastclip"]["samples_per_s"] / ok["baseline"]["samples_per_s"]
        cells = [str(batch), *(train_side(mine.get(side)) for side in sides), times(ratio)]
        if with_mfu:  # "mfu" is a fraction of the device's peak rate
            cells += [percent(ok[side].get("mfu")) if side in ok else DASH for side in sides]
        lines.append(cells)
    return lines


def largest_batch_line(rows: list[dict], sides: list[str], summary: dict) -> str:
    """Each side's largest batch that fit, and where it first ran out of memory (or that it never did)."""
    parts = []
    for side in sides:
        fit = [r["batch"] for r in rows if r["impl"] == side and r.get("status") == "ok"]
        oom = [r["batch"] for r in rows if r["impl"] == side and r.get("status") == "oom"]
        limit = f"out of memory at {min(oom)}" if oom else "never out of memory: the sweep stopped first"
        parts.append(f"{side} {max(fit) if fit else 'none'} ({limit})")
    line = "Largest batch that fit: " + ", ".join(parts)
    if summary.get("largest_batch_ratio") is not None:
        line += f"; fastclip / baseline {times(summary['largest_batch_ratio'])}"
    return line + "."


def train_targets_line(summary: dict) -> list[str]:
    """The training targets and whether the run met them (as bench_train.py judged)."""
    targets = summary.get("targets")
    if not targets:
        return []
    verdict = {True: "met", False: "**missed**", None: "undecided"}
    at = summary.get("throughput_ratio_at")
    ratio = (summary.get("throughput_ratio") or {}).get(str(at))
    throughput = f"{times(ratio)} at batch {at}" if at is not None else "no batch where both ran"
    return [
        "",
        f"Targets: ≥ {limit(targets['throughput_ratio'])}× the baseline's samples/s at the largest batch both fit: "
        f"{throughput}, {verdict[summary.get('throughput_target_met')]}; ≥ {limit(targets['largest_batch_ratio'])}× "
        f"its largest batch: {times(summary.get('largest_batch_ratio'))}, "
        f"{verdict[summary.get('largest_batch_target_met')]}"
        + (
            f"; fastclip's MFU ≥ {percent(targets['mfu'])} there: {percent(summary.get('fastclip_mfu'))}, "
            f"{verdict[summary.get('mfu_target_met')]}."
            if "mfu" in targets
            else "."
        ),
    ]


def train_section(payload: dict) -> list[str]:
    """Training-step throughput of fastclip and the baseline per batch, and how large a batch each fit."""
    config, rows, summary = payload.get("config", {}), payload.get("rows", []), payload.get("summary") or {}
    sides = ["baseline", "fastclip"]
    checkpointing = ", gradient checkpointing" if config.get("grad_checkpointing") else ""
    resolved = config.get("fastclip_resolved_backends") or {}
    lines = [
        f"#### Training step: {config.get('model', '?')}, {config.get('precision', '?')}{checkpointing}",
        "",
        "Samples/s of forward, loss, backward and AdamW step; fastclip: its attention"
        + (f" (`{resolved['attention']}`)" if resolved.get("attention") else "")
        + " and fused loss; baseline: SDPA and the materialised-logits loss.",
        "",
    ]
    with_mfu = any("mfu" in row for row in rows if row.get("status") == "ok")
    head = ["batch", "baseline samples/s", "fastclip samples/s", "fastclip / baseline"]
    head += ["baseline MFU", "fastclip MFU"] if with_mfu else []
    lines += table(head, train_rows(rows, sides, with_mfu), "l" + "r" * (len(head) - 1))
    return [*lines, "", largest_batch_line(rows, sides, summary), *train_targets_line(summary)]


def model_section(payload: dict) -> list[str]:
    """Embedding throughput per model, tower and batch, one column per attention backend."""
    config, rows = payload.get("config", {}), payload.get("rows", [])
    found = list(dict.fromkeys(b for row in rows for b in row.get("results", {})))
    listed = config.get("backends", [])
    backends = [b for b in listed if b in found] + [b for b in found if b not in listed]
    compared = [b for b in backends if b != "torch" and "torch" in backends]
    units = {"image": "images/s", "text": "captions/s"}
    lines = [
        f"#### Inference: embedding throughput, {config.get('precision', '?')}",
        "",
        "Images/s of `encode_image` and captions/s of `encode_text`, with every attention call on each backend.",
        "",
    ]
    head = ["model", "tower", "batch", *(f"`{b}`" for b in backends), *(f"`{b}` / `torch`" for b in compared)]
    body = []
    for row in rows:
        results = row.get("results", {})
        tower = f"{row['tower']} ({units.get(row['tower'], 'per s')})"
        if row.get("caption_lengths"):
            tower += f", captions mean {sig(row['caption_lengths']['mean'])} tokens"
        cells = [row["model"], tower, str(row["batch"])]
        cells += [sig(results[b]["per_s"]) if b in results else DASH for b in backends]
        cells += [times(results.get(b, {}).get("ratio_vs_torch")) for b in compared]
        body.append(cells)
    return lines + table(head, body, "ll" + "r" * (len(head) - 2))


SECTIONS: dict[str, Callable[[dict], list[str]]] = {
    "loss": loss_section,
    "siglip": loss_section,
    "attention": attention_section,
    "train": train_section,
    "model": model_section,
}


def render(payloads: dict[str, dict], source: str) -> str:
    """The whole Markdown: the environment line, then a table per benchmark present."""
    first = next(iter(payloads.values()))
    lines = [header_line(payloads), "", f"Generated from `{source}` by `tools/results_table.py`."]
    for section, payload in payloads.items():
        lines += ["", *environment_note(payload, first), *SECTIONS[section](payload)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- README


def shown_path(folder: Path, base: Path) -> str:
    """`folder` relative to `base` when inside it, else as given: the same text however it was spelled."""
    folder_abs, base_abs = folder.resolve(), base.resolve()
    if folder_abs.is_relative_to(base_abs):
        return folder_abs.relative_to(base_abs).as_posix()
    return folder.as_posix()


def split_readme(text: str, name: str) -> tuple[str, str, str]:
    """(through the begin marker line, the block between the markers, from the end marker line on)."""
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.lstrip().startswith(BEGIN)]
    ends = [i for i, line in enumerate(lines) if line.lstrip().startswith(END)]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise UsageError(f"{name}: needs one '{BEGIN} ...' line followed by one '{END} ...' line")
    begin, end = begins[0], ends[0]
    return "".join(lines[: begin + 1]), "".join(lines[begin + 1 : end]), "".join(lines[end:])


def block_for(markdown: str) -> str:
    """The block's text: blank lines around the Markdown, so the tables never touch the comment lines."""
    return "\n" + markdown + "\n"


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="results folder, e.g. benchmarks/results/NVIDIA_H200")
    parser.add_argument("--readme", type=Path, help="replace the gpu-results block of this file instead of printing")
    parser.add_argument("--check", action="store_true", help="with --readme: exit 1 if its block is stale")
    args = parser.parse_args(argv)
    if args.check and args.readme is None:
        parser.error("--check needs --readme")
    return args


def run(args: argparse.Namespace) -> int:
    payloads = load_results(args.folder)
    if args.readme is None:
        sys.stdout.write(render(payloads, shown_path(args.folder, Path.cwd())))
        return 0
    try:
        with open(args.readme, newline="") as readme:  # newline="": keep the file's line endings
            text = readme.read()
    except OSError as error:
        raise UsageError(f"{args.readme}: {error.strerror or error}") from error
    before, current, after = split_readme(text, str(args.readme))
    block = block_for(render(payloads, shown_path(args.folder, args.readme.parent)))
    if before.endswith("\r\n"):  # a README with Windows line endings keeps them in the block too
        block = block.replace("\n", "\r\n")
    if args.check:
        if current != block:
            print(
                f"{args.readme}: the gpu-results block is stale; run "
                f"python tools/results_table.py {args.folder} --readme {args.readme}",
                file=sys.stderr,
            )
            return 1
        return 0
    with open(args.readme, "w", newline="") as readme:
        readme.write(before + block + after)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        print(f"results_table: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
