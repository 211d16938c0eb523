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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file, however this is run
import common  # noqa: E402
from bench_train import EOT_ID, random_batch  # noqa: E402
from common import ByDevice  # noqa: E402

from fastclip.backends import DTYPES  # noqa: E402
from fastclip.model.clip import CLIP  # noqa: E402
from fastclip.model.factory import create_model  # noqa: E402

TOWERS = {"image": "images/s", "text": "captions/s"}
SOT_ID = 49406  # start of text; word ids lie below it, the end-of-text id EOT_ID = 49407 above


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
    lengths = common.caption_lengths(batch, context)
    tokens = caption_tokens(lengths, context).to(device)
    return (lambda: model.encode_text(tokens)), {"caption_lengths": common.length_summary(lengths)}


def measure_tower(model: CLIP, tower: str, batch: int, backends: list[str], args: argparse.Namespace) -> dict:
    """Throughput of every backend on the same inputs, the ratio to torch, and the embeddings' agreement."""
    embed, inputs = encoder(model, tower, batch, args.device)
    row: dict = {"tower": tower, "batch": batch, **inputs, "results": {}}
    outputs = {}
    for backend in backends:
        model.set_attn_backend(backend)
        with torch.inference_mode():
            outputs[backend] = embed().float()  # untimed: lazy init and autotuning
            timing = common.time_fn(
                embed, args.device, warmup=args.warmup, reps=args.reps, budget_s=args.budget_s, warmed=True
            )
        row["results"][backend] = {**timing, "per_s": batch / (timing["median_ms"] / 1e3)}
    if "torch" in outputs:
        for backend, result in row["results"].items():
            result["ratio_vs_torch"] = result["per_s"] / row["results"]["torch"]["per_s"]
            result["max_abs_diff_vs_torch"] = (outputs[backend] - outputs["torch"]).abs().max().item()
    return row


def run_model(name: str, args: argparse.Namespace, record: common.Record) -> None:
    """All towers and batch sizes of one model (built once: every backend shares its weights)."""
    torch.manual_seed(0)
    model = create_model(name, dtype=DTYPES[args.precision], device=args.device).eval()
    for tower in args.towers:
        for batch in args.batch_sizes:
            row = {"model": name, **measure_tower(model, tower, batch, args.backends, args)}
            record.add(row, format_row(row))
    del model
    common.free_memory(args.device)


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
            panels.append(
                {"title": f"{model} encode_{tower}", "xlabel": "batch", "ylabel": TOWERS[tower], "series": series}
            )
    return common.plot_lines(path, panels, ncols=2, title=title)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.benchmark_parser(__doc__)
    common.add_device_argument(parser)
    parser.add_argument(
        "--models",
        type=common.name_list,
        default=ByDevice(["ViT-B-16", "ViT-L-14"], ["tiny-ViT", "demo-ViT"]),
        help="comma-separated config names (default: %(default)s)",
    )
    parser.add_argument("--towers", type=common.name_list, default="image,text", help="comma-separated of image,text")
    parser.add_argument(
        "--batch-sizes",
        type=common.int_list,
        default=ByDevice([64, 256, 1024], [8, 32]),
        help="comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp16", "fp32"),
        default=ByDevice("bf16", "fp32"),
        help="parameter dtype (default: %(default)s)",
    )
    parser.add_argument(
        "--backends",
        type=common.name_list,
        default=ByDevice(["triton", "torch"], ["torch"]),
        help="comma-separated of triton,torch (default: %(default)s)",
    )
    common.add_timing_arguments(parser, warmup=ByDevice(5, 1), reps=ByDevice(20, 5), budget_s=ByDevice(3.0, 1.0))
    common.add_out_argument(parser)
    args = common.parse_benchmark_args(parser, argv)
    if args.device == "cpu" and "triton" in args.backends:
        parser.error("the triton backend needs --device cuda (on a CPU it only runs in the slow interpreter)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the payload written to bench_model.json."""
    args = parse_args(argv)
    header = common.environment_header()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["inputs"] = (
        f"randn images; caption token rows (start 49406, ids uniform in [1, 49406), end-of-text 49407 at length - 1, "
        f"zeros after) with lengths {common.CAPTION_LENGTHS}"
    )
    payload = {"benchmark": "model_inference", "environment": header, "config": config, "rows": []}
    record = common.Record(args.out, "bench_model", payload)
    print(f"device: {header['device']}; {args.precision}; backends {args.backends}")
    for name in args.models:
        run_model(name, args, record)
    title = f"CLIP embedding throughput, {args.precision}, on {header['device']}"
    record.finish(lambda path: plot(record.rows, path, title))
    return payload


if __name__ == "__main__":
    main()
