"""CLIP inference: image and text embedding throughput per attention backend.

    python benchmarks/bench_model.py [--models ViT-B-16,ViT-L-14] [--towers image,text] [--batch-sizes 64,256,1024]
                                     [--precision bf16] [--backends triton,torch] [--device cuda] [--out DIR]

For every model, tower and batch size, times `model.encode_image(images)` (images/s) and
`model.encode_text(tokens)` (captions/s) under torch.inference_mode, with every attention call on:
  triton  fastclip's fused Triton kernel (CUDA only; autotuned in an untimed first call),
  torch   F.scaled_dot_product_attention (which picks its own kernel).
The model is in eval mode with its parameters in --precision (bf16 on CUDA, fp32 on a CPU), the same
weights for every backend. Inputs: random images; token rows as the tokenizer makes them for realistic
captions: lengths from `common.caption_lengths` (log-normal, mean ~18 of 77 tokens, clipped to [2, 77]), each
row the start token 49406, random ids in [1, 49406), the end-of-text id 49407 at its length - 1, zeros after.
So encode_text runs what it runs on real captions: the batch trimmed to its longest caption, and each row's
attention ended at its own end-of-text token (the `lengths` the text tower passes). Time: median of
`common.time_fn`. Reports the ratio triton / torch and the largest difference between the two backends'
(normalised) embeddings. Writes bench_model.json and bench_model.png into --out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fastclip from a checkout

from bench_train import EOT_ID, random_batch
from common import (
    CAPTION_LENGTHS,
    DEFAULT_OUT,
    DTYPES,
    caption_lengths,
    environment_header,
    length_summary,
    plot_lines,
    time_fn,
    write_results,
)

from fastclip.model.clip import CLIP
from fastclip.model.factory import create_model

TOWERS = {"image": "images/s", "text": "captions/s"}
SOT_ID = 49406  # start of text; word ids lie below it, the end-of-text id EOT_ID = 49407 above
DEFAULTS = {
    "cuda": {"models": "ViT-B-16,ViT-L-14", "batch_sizes": "64,256,1024", "precision": "bf16",
             "backends": "triton,torch"},
    "cpu": {"models": "tiny-ViT,demo-ViT", "batch_sizes": "8,32", "precision": "fp32", "backends": "torch"},
}


def caption_tokens(lengths: torch.Tensor, context: int, seed: int = 0) -> torch.Tensor:
    """[B, context] int64 rows as the tokenizer writes captions of `lengths` tokens (start and end included):
    SOT_ID, random word ids, EOT_ID at position length - 1, then zeros. Made on the CPU from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    batch = lengths.numel()
    tokens = torch.randint(1, SOT_ID, (batch, context), generator=generator)
    tokens[:, 0] = SOT_ID
    tokens[torch.arange(context)[None, :] >= lengths[:, None]] = 0
    tokens[torch.arange(batch), lengths - 1] = EOT_ID
    return tokens


def encoder(model: CLIP, tower: str, batch: int, device: str) -> tuple[Callable[[], torch.Tensor], dict]:
    """A zero-argument call embedding one batch with `tower` (inputs made once, outside the timing), and a
    description of its inputs for the row (text: the caption lengths)."""
    context = model.config.text.context_length
    if tower == "image":
        images, _ = random_batch(batch, model.image_size, context, device)
        images = images.to(model.dtype)  # encode_image would cast them in every call
        return (lambda: model.encode_image(images)), {}
    lengths = caption_lengths(batch, context)
    tokens = caption_tokens(lengths, context).to(device)
    return (lambda: model.encode_text(tokens)), {"caption_lengths": length_summary(lengths)}


def measure_tower(model: CLIP, tower: str, batch: int, backends: list[str], args: argparse.Namespace) -> dict:
    """Throughput of every backend on the same inputs, the ratio to torch, and the embeddings' agreement."""
    embed, inputs = encoder(model, tower, batch, args.device)
    row: dict = {"tower": tower, "batch": batch, **inputs, "results": {}}
    outputs = {}
    for backend in backends:
        model.set_attn_backend(backend)
        with torch.inference_mode():
            outputs[backend] = embed().float()  # untimed: lazy init and autotuning
            timing = time_fn(embed, args.device, warmup=args.warmup, reps=args.reps, budget_s=args.budget_s,
                             warmed=True)
        row["results"][backend] = {**timing, "per_s": batch / (timing["median_ms"] / 1e3)}
    if "torch" in outputs:
        for backend, result in row["results"].items():
            result["ratio_vs_torch"] = result["per_s"] / row["results"]["torch"]["per_s"]
            result["max_abs_diff_vs_torch"] = (outputs[backend] - outputs["torch"]).abs().max().item()
    return row


def run_model(name: str, args: argparse.Namespace, rows: list[dict]) -> None:
    """All towers and batch sizes of one model (built once: every backend shares its weights)."""
    torch.manual_seed(0)
    model = create_model(name, dtype=DTYPES[args.precision], device=args.device).eval()
    for tower in args.towers:
        for batch in args.batch_sizes:
            row = {"model": name, **measure_tower(model, tower, batch, args.backends, args)}
            rows.append(row)
            print(format_row(row), flush=True)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()


def format_row(row: dict) -> str:
    """One printed line: every backend's time and throughput, with its ratio to torch."""
    cells = []
    for backend, r in row["results"].items():
        ratio = ""
        if backend != "torch" and "ratio_vs_torch" in r:
            ratio = f" ({r['ratio_vs_torch']:.2f}x, diff {r['max_abs_diff_vs_torch']:.1e})"
        cells.append(f"{backend} {r['median_ms']:8.2f} ms {r['per_s']:9.1f} {TOWERS[row['tower']]}{ratio}")
    lengths = row.get("caption_lengths")
    note = f"  (captions: mean {lengths['mean']:.1f} tokens, trimmed to {lengths['max']})" if lengths else ""
    return f"{row['model']:>10} {row['tower']:>5} {row['batch']:>5}  " + " | ".join(cells) + note


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Throughput versus batch size, one panel per model and tower, one line per backend."""
    panels = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for tower in dict.fromkeys(r["tower"] for r in rows):
            mine = [r for r in rows if (r["model"], r["tower"]) == (model, tower)]
            backends = dict.fromkeys(b for r in mine for b in r["results"])
            series = {b: ([r["batch"] for r in mine], [r["results"][b]["per_s"] for r in mine]) for b in backends}
            panels.append({"title": f"{model} encode_{tower}", "xlabel": "batch", "ylabel": TOWERS[tower],
                           "series": series})
    return plot_lines(path, panels, ncols=2, title=title)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    parser.add_argument("--models", help="comma-separated config names "
                                           "(default: ViT-B-16,ViT-L-14 on cuda, tiny-ViT,demo-ViT on cpu)")
    parser.add_argument("--towers", default="image,text", help="comma-separated of image,text")
    parser.add_argument("--batch-sizes", help="comma-separated (default: 64,256,1024 on cuda, 8,32 on cpu)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"),
                        help="parameter dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--backends", help="comma-separated of triton,torch (default: both on cuda, torch on cpu)")
    parser.add_argument("--warmup", type=int, help="untimed calls before the timed ones (default: 5 cuda, 1 cpu)")
    parser.add_argument("--reps", type=int, help="timed calls per point (default: 20 cuda, 5 cpu)")
    parser.add_argument("--budget-s", type=float, help="fewer reps (at least 3) for slow points, to take about this "
                                                       "many seconds (default: 3 cuda, 1 cpu)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA device visible")
    gpu, defaults = args.device == "cuda", DEFAULTS[args.device]
    args.models = (args.models or defaults["models"]).split(",")
    args.towers = args.towers.split(",")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or defaults["batch_sizes"]).split(",")]
    args.precision = args.precision or defaults["precision"]
    args.backends = (args.backends or defaults["backends"]).split(",")
    if not gpu and "triton" in args.backends:
        parser.error("the triton backend needs --device cuda (on a CPU it only runs in the slow interpreter)")
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.reps = args.reps if args.reps is not None else (20 if gpu else 5)
    args.budget_s = args.budget_s if args.budget_s is not None else (3.0 if gpu else 1.0)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the payload written to bench_model.json."""
    args = parse_args(argv)
    header = environment_header()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["inputs"] = (
        f"randn images; caption token rows (start 49406, ids uniform in [1, 49406), end-of-text 49407 at length - 1, "
        f"zeros after) with lengths {CAPTION_LENGTHS}"
    )
    rows: list[dict] = []
    payload = {"benchmark": "model_inference", "environment": header, "config": config, "rows": rows}
    print(f"device: {header['device']}; {args.precision}; backends {args.backends}")
    for name in args.models:
        run_model(name, args, rows)
        write_results(args.out, "bench_model", payload)  # after every model: a killed run keeps its data
    path = write_results(args.out, "bench_model", payload)
    print(f"results: {path}")
    title = f"CLIP embedding throughput, {args.precision}, on {header['device']}"
    png = plot(rows, Path(args.out) / "bench_model.png", title)
    if png:
        print(f"plot: {png}")
    return payload


if __name__ == "__main__":
    main()
