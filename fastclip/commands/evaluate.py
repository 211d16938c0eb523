"""`fastclip eval`: zero-shot, linear probe, few-shot and retrieval evaluation of a checkpoint, as in the CLIP paper.

    fastclip eval --checkpoint model.safetensors --train digits/train --test digits/test --output-dir eval/
    fastclip eval --model ViT-B-32 --checkpoint openai --test val/ --captions pairs.csv --tasks zero-shot,retrieval

--train and --test are image folders with one sub-folder per class; --captions is a CSV of image paths
and captions (open_clip's format; an image with several captions appears on several rows). By default
every task the data allow runs: zero-shot (needs --test), linear-probe and few-shot (need --train and
--test), retrieval (needs --captions). Prints a table and the top-5 predictions of a few test images;
writes report.json, few_shot.png and predictions.png into --output-dir. Image features are cached
(--cache-dir), so a second run with other probe settings does not re-encode the images. Unreadable
images are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from fastclip.commands import device_argument
from fastclip.commands.zero_shot import PRECISIONS, class_mapping, parse_labels, resolve_templates

TASKS = ("zero-shot", "linear-probe", "few-shot", "retrieval")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="zero-shot, linear-probe, few-shot and retrieval evaluation with JSON and plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", required=True,
                       help="checkpoint file (fastclip, OpenAI, open_clip), a Hugging Face transformers CLIPModel folder, or a released tag with --model")
    model.add_argument("--model", help="model name or JSON config (default: stored in or inferred from the checkpoint)")
    model.add_argument("--act", choices=("quick_gelu", "gelu"),
                       help="MLP activation, for state dicts whose config is inferred")
    model.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                       help="weights' dtype (default fp32; CUDA runs under bf16 autocast)")
    model.add_argument("--no-amp", action="store_true", help="no autocast on CUDA")
    model.add_argument("--attn-backend", default="auto", choices=("auto", "triton", "torch"))
    model.add_argument("--bpe-path", help="the tokenizer's bpe_simple_vocab_16e6.txt.gz (default: found automatically)")

    data = parser.add_argument_group("data")
    data.add_argument("--train", help="training image folder, one sub-folder per class (linear probe, few-shot)")
    data.add_argument("--test", help="test image folder, one sub-folder per class")
    data.add_argument("--captions", help="CSV/TSV of image paths and captions, for retrieval")
    data.add_argument("--csv-image-key", default="filepath", help="caption-file column with image paths")
    data.add_argument("--csv-caption-key", default="title", help="caption-file column with captions")
    labels = data.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="comma-separated class names (default: sub-folder names, '_' read as a space)")
    labels.add_argument("--labels-file", help="file with one class name per line")
    data.add_argument("--templates", default="ensemble",
                      help="'single', 'ensemble' (default) or a file with one template per line, each with '{}'")

    tasks = parser.add_argument_group("tasks")
    tasks.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASKS)} (default: all the data allow)")
    tasks.add_argument("--shots", default="1,2,4,8,16", help="few-shot examples per class (default 1,2,4,8,16)")
    tasks.add_argument("--seeds", type=int, default=3, help="few-shot draws per k (seeds 0..N-1, default 3)")
    tasks.add_argument("--C", type=float, help="fixed inverse regularisation strength (default: searched)")
    tasks.add_argument("--C-grid", help="comma-separated C values to search (default: 1e-6..1e6, half-decade steps)")
    tasks.add_argument("--refine-steps", type=int, default=2,
                       help="halvings of the grid step around the best C (default 2)")
    tasks.add_argument("--val-fraction", type=float, default=0.2,
                       help="share of each training class held out to choose C (default 0.2)")
    tasks.add_argument("--metric", choices=("top1", "mean-per-class"), default="top1",
                       help="what the C search maximises (default top1)")
    tasks.add_argument("--solver", choices=("torch", "sklearn"), default="torch",
                       help="L-BFGS in PyTorch (default), or scikit-learn's")
    tasks.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit (default 1000)")
    tasks.add_argument("--recall-k", default="1,5,10", help="retrieval recall@k values (default 1,5,10)")

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", default="runs/eval",
                        help="where report.json, few_shot.png and predictions.png go (default runs/eval)")
    output.add_argument("--show", type=int, default=3, help="test images whose top-5 are printed (default 3)")
    output.add_argument("--gallery", type=int, default=8, help="test images in predictions.png (default 8; 0: none)")
    output.add_argument("--cache-dir",
                        help="feature cache (default: $FASTCLIP_CACHE_DIR/features or ~/.cache/fastclip/features)")
    output.add_argument("--no-cache", action="store_true", help="encode everything afresh and cache nothing")
    output.add_argument("--batch-size", type=int, default=64)
    output.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-loading processes")
    parser.set_defaults(run=run)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{flag} must be comma-separated integers >= 1, got {text!r}")
    return values


def _float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ValueError(f"{flag} must be comma-separated positive numbers, got {text!r}")
    return values


def choose_tasks(args: argparse.Namespace) -> list[str]:
    """The requested tasks (or all that the data allow), each checked against the data given."""
    needs = {"zero-shot": ("test",), "linear-probe": ("train", "test"), "few-shot": ("train", "test"),
             "retrieval": ("captions",)}
    if args.tasks is None:
        tasks = [task for task in TASKS if all(getattr(args, need) for need in needs[task])]
        if not tasks:
            raise ValueError("nothing to evaluate: give --test (zero-shot), --train and --test (probes) or --captions")
        return tasks
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks must be a comma-separated subset of {','.join(TASKS)}, got {args.tasks!r}")
    for task in tasks:
        missing = [f"--{need}" for need in needs[task] if not getattr(args, need)]
        if missing:
            raise ValueError(f"task {task} needs {' and '.join(missing)}")
    return [task for task in TASKS if task in tasks]


def check_args(args: argparse.Namespace) -> None:
    """Argument errors that need no model or data, reported before anything slow starts."""
    if args.batch_size < 1 or args.workers < 0 or args.show < 0 or args.gallery < 0:
        raise ValueError("--batch-size must be >= 1 and --workers, --show, --gallery >= 0")
    if args.seeds < 1 or args.refine_steps < 0 or args.max_iter < 1:
        raise ValueError("--seeds and --max-iter must be >= 1 and --refine-steps >= 0")
    if not 0.0 < args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
    if args.C is not None and not (math.isfinite(args.C) and args.C > 0):
        raise ValueError(f"--C must be a positive number, got {args.C}")
    for flag in ("train", "test", "captions"):
        path = getattr(args, flag)
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"--{flag} {path!r} does not exist")


def label_space(args: argparse.Namespace, train_classes: list[str] | None, test_classes: list[str] | None
                ) -> tuple[list[str], list[int] | None, list[int] | None]:
    """(class names for the text side, class index of each --train folder, of each --test folder).

    The classes are --train's folders when given (--test's folders must be among them), else --test's.
    """
    folders = train_classes if train_classes is not None else test_classes
    classnames, folder_to_class = class_mapping(parse_labels(args), folders)
    by_folder = dict(zip(folders, folder_to_class))
    train_map = [by_folder[name] for name in train_classes] if train_classes is not None else None
    test_map = None
    if test_classes is not None:
        unknown = [name for name in test_classes if name not in by_folder]
        if unknown:
            raise ValueError(f"class folder(s) {unknown} of --test are not classes of --train (folders: {folders})")
        test_map = [by_folder[name] for name in test_classes]
    return classnames, train_map, test_map


def _split_report(name: str, path: str, encoded: Any) -> dict[str, Any]:
    skipped = [os.fspath(p) for p in encoded.skipped]
    note = f" ({len(skipped)} unreadable, skipped)" if skipped else ""
    cached = " [cached features]" if encoded.from_cache else ""
    classes = f", {len(encoded.classes)} classes" if encoded.classes is not None else ""
    print(f"{name}: {len(encoded.paths)} images{classes}{note}{cached}")
    return {"folder": path, "images": len(encoded.paths), "skipped": skipped, "num_skipped": len(skipped)}


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def print_table(rows: list[tuple[str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows + [("task", "metric", "value")]) for i in range(3)]
    for row in [("task", "metric", "value"), *rows]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}")


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    from fastclip.checkpoint import cache_dir as default_cache_root
    from fastclip.evaluate import (
        PAPER_C_GRID,
        few_shot,
        format_prediction,
        image_folder_features,
        image_tower_fingerprint,
        linear_probe,
        mean_per_class_accuracy,
        pick_gallery,
        plot_few_shot,
        retrieval_from_csv,
        sample_k_shot,
        save_gallery,
        top_predictions,
    )
    from fastclip.model.factory import create_model_and_transforms
    from fastclip.zero_shot import accuracy, build_classifier, classify

    check_args(args)
    tasks = choose_tasks(args)
    templates = resolve_templates(args.templates)
    shots = _int_list(args.shots, "--shots")
    recall_ks = _int_list(args.recall_k, "--recall-k")
    C_grid = _float_list(args.C_grid, "--C-grid") if args.C_grid else list(PAPER_C_GRID)
    metric = args.metric.replace("-", "_")
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_root() / "features"
    output = Path(args.output_dir)

    device = torch.device(args.device)
    model, preprocess, tokenizer = create_model_and_transforms(
        args.model, args.checkpoint, bpe_path=args.bpe_path, act=args.act, attn_backend=args.attn_backend,
        device=device, dtype=PRECISIONS[args.precision],
    )
    encode = {"batch_size": args.batch_size, "num_workers": args.workers, "cache_dir": cache, "amp": not args.no_amp,
              "model_id": image_tower_fingerprint(model) if cache is not None else None}
    report: dict[str, Any] = {"checkpoint": args.checkpoint, "model": args.model, "device": str(device), "tasks": tasks,
                              "data": {}}
    rows: list[tuple[str, str, str]] = []

    train = test = None
    if "linear-probe" in tasks or "few-shot" in tasks:
        train = image_folder_features(model, args.train, preprocess, what="--train", desc="encode --train", **encode)
        report["data"]["train"] = _split_report("--train", args.train, train)
    if any(task in tasks for task in ("zero-shot", "linear-probe", "few-shot")):
        test = image_folder_features(model, args.test, preprocess, what="--test", desc="encode --test", **encode)
        report["data"]["test"] = _split_report("--test", args.test, test)
    if test is not None:
        classnames, train_map, test_map = label_space(args, train.classes if train else None, test.classes)
        report["classes"] = classnames
        test_y = torch.tensor(test_map)[test.targets]
        train_y = torch.tensor(train_map)[train.targets] if train is not None else None
        if "few-shot" in tasks:  # k larger than a class: fail now, before any probe runs
            sample_k_shot(train_y, max(shots), 0, classes=classnames)

    probabilities = None
    if "zero-shot" in tasks:
        classifier = build_classifier(model, tokenizer, classnames, templates, device=device)
        logit_scale = min(model.logit_scale.exp().item(), 100.0)
        probabilities = classify(test.features.to(device), classifier, logit_scale).cpu()  # (N, C)
        top = accuracy(probabilities, test_y, topk=(1, 5))
        zero_shot = {"top1": top[1], "top5": top[5], "mean_per_class": mean_per_class_accuracy(probabilities, test_y),
                     "templates": templates}
        report["zero_shot"] = zero_shot
        rows += [("zero-shot", "top-1", _percent(top[1])), ("zero-shot", "top-5", _percent(top[5])),
                 ("zero-shot", "mean per-class", _percent(zero_shot["mean_per_class"]))]

    probe_kwargs = {"C_grid": C_grid, "refine_steps": args.refine_steps, "val_fraction": args.val_fraction,
                    "metric": metric, "solver": args.solver, "max_iter": args.max_iter, "device": device,
                    "num_classes": len(classnames) if test is not None else None}
    probe = None
    if "linear-probe" in tasks:
        probe = linear_probe(train.features, train_y, test.features, test_y, C=args.C, **probe_kwargs)
        report["linear_probe"] = probe.to_dict()
        rows += [("linear probe", f"top-1 (C={probe.C:.3g})", _percent(probe.top1)),
                 ("linear probe", "mean per-class", _percent(probe.mean_per_class))]
        if probabilities is None:
            probabilities = probe.classifier.predict_proba(test.features).float().cpu()

    if "few-shot" in tasks:
        fallback_C = args.C or (probe.C if probe is not None else 1.0)
        curve = few_shot(train.features, train_y, test.features, test_y, shots=shots, seeds=range(args.seeds),
                         classes=classnames, zero_shot=report.get("zero_shot", {}).get("top1"), C=args.C,
                         fallback_C=fallback_C, **probe_kwargs)
        plot = plot_few_shot(curve, output / "few_shot.png", linear_probe_top1=probe.top1 if probe else None,
                             title=f"few-shot linear probes: {Path(args.checkpoint).name}")
        report["few_shot"] = {**curve.to_dict(), "fallback_C": fallback_C, "plot": os.fspath(plot)}
        for k, stats in curve.summary().items():
            rows.append(("few-shot", f"top-1, k={k} ({args.seeds} seeds)",
                         f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}%"))

    if "retrieval" in tasks:
        retrieval = retrieval_from_csv(model, preprocess, tokenizer, args.captions, ks=recall_ks,
                                       image_key=args.csv_image_key, caption_key=args.csv_caption_key,
                                       batch_size=args.batch_size, num_workers=args.workers, cache_dir=cache,
                                       amp=not args.no_amp)
        report["retrieval"] = retrieval.to_dict()
        skipped = f", {len(retrieval.skipped_images)} unreadable images skipped" if retrieval.skipped_images else ""
        print(f"--captions: {retrieval.num_images} images, {retrieval.num_captions} captions{skipped}")
        for name, value in retrieval.recall.items():
            rows.append(("retrieval", name.replace("_to_", "->").replace("_R@", " R@"), _percent(value)))

    if probabilities is not None:
        predictions = top_predictions(probabilities, classnames, test.paths, test_y, k=5)
        report["predictions_from"] = "zero-shot" if "zero-shot" in tasks else "linear probe"
        report["predictions"] = [p.to_dict(args.test) for p in predictions]
        for prediction in pick_gallery(predictions, args.show):
            print(format_prediction(prediction, root=args.test))
        if args.gallery:
            gallery = save_gallery(pick_gallery(predictions, args.gallery), output / "predictions.png",
                                   title=f"{report['predictions_from']} predictions: {Path(args.checkpoint).name}")
            report["gallery"] = os.fspath(gallery)

    print_table(rows)
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    written = [os.fspath(output / "report.json")]
    written += [report["few_shot"]["plot"]] if "few_shot" in report else []
    written += [report["gallery"]] if "gallery" in report else []
    print("wrote " + ", ".join(written))
    return 0
