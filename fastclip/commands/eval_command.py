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
import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastclip.commands import _inference, add_command
from fastclip.commands._inference import (
    add_class_name_arguments,
    class_mapping,
    load_model,
    parse_labels,
    resolve_templates,
)

TASKS = ("zero-shot", "linear-probe", "few-shot", "retrieval")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "eval", "zero-shot, linear-probe, few-shot and retrieval evaluation with JSON and plots", __doc__, run
    )
    _add_model_arguments(parser.add_argument_group("model"))
    _add_data_arguments(parser.add_argument_group("data"))
    _add_task_arguments(parser.add_argument_group("tasks"))
    _add_output_arguments(parser.add_argument_group("output"))


def _add_model_arguments(model: argparse._ArgumentGroup) -> None:
    _inference.add_checkpoint_arguments(model)
    _inference.add_device_arguments(
        model, precision_default="fp32", precision_help="weights' dtype (default fp32; CUDA runs under bf16 autocast)"
    )
    model.add_argument("--no-amp", action="store_true", help="no autocast on CUDA")
    _inference.add_backend_arguments(model)


def _add_data_arguments(data: argparse._ArgumentGroup) -> None:
    data.add_argument("--train", help="training image folder, one sub-folder per class (linear probe, few-shot)")
    data.add_argument("--test", help="test image folder, one sub-folder per class")
    data.add_argument("--captions", help="CSV/TSV of image paths and captions, for retrieval")
    data.add_argument("--csv-image-key", default="filepath", help="caption-file column with image paths")
    data.add_argument("--csv-caption-key", default="title", help="caption-file column with captions")
    add_class_name_arguments(
        data, "comma-separated class names (default: sub-folder names, '_' read as a space)", templates="ensemble"
    )


def _add_task_arguments(tasks: argparse._ArgumentGroup) -> None:
    tasks.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASKS)} (default: all the data allow)")
    tasks.add_argument("--shots", default="1,2,4,8,16", help="few-shot examples per class (default 1,2,4,8,16)")
    tasks.add_argument("--seeds", type=int, default=3, help="few-shot draws per k (seeds 0..N-1, default 3)")
    tasks.add_argument("--C", type=float, help="fixed inverse regularisation strength (default: searched)")
    tasks.add_argument("--C-grid", help="comma-separated C values to search (default: 1e-6..1e6, half-decade steps)")
    tasks.add_argument(
        "--refine-steps", type=int, default=2, help="halvings of the grid step around the best C (default 2)"
    )
    tasks.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of each training class held out to choose C (default 0.2)",
    )
    tasks.add_argument(
        "--metric",
        choices=("top1", "mean-per-class"),
        default="top1",
        help="what the C search maximises (default top1)",
    )
    tasks.add_argument(
        "--solver", choices=("torch", "sklearn"), default="torch", help="L-BFGS in PyTorch (default), or scikit-learn's"
    )
    tasks.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit (default 1000)")
    tasks.add_argument("--recall-k", default="1,5,10", help="retrieval recall@k values (default 1,5,10)")


def _add_output_arguments(output: argparse._ArgumentGroup) -> None:
    output.add_argument(
        "--output-dir",
        default="runs/eval",
        help="where report.json, few_shot.png and predictions.png go (default runs/eval)",
    )
    output.add_argument("--show", type=int, default=3, help="test images whose top-5 are printed (default 3)")
    output.add_argument("--gallery", type=int, default=8, help="test images in predictions.png (default 8; 0: none)")
    output.add_argument(
        "--cache-dir", help="feature cache (default: $FASTCLIP_CACHE_DIR/features or ~/.cache/fastclip/features)"
    )
    output.add_argument("--no-cache", action="store_true", help="encode everything afresh and cache nothing")
    output.add_argument("--batch-size", type=int, default=64)
    output.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-loading processes")


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
    needs = {
        "zero-shot": ("test",),
        "linear-probe": ("train", "test"),
        "few-shot": ("train", "test"),
        "retrieval": ("captions",),
    }
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


def label_space(
    args: argparse.Namespace, train_classes: list[str] | None, test_classes: list[str] | None
) -> tuple[list[str], list[int] | None, list[int] | None]:
    """(class names for the text side, class index of each --train folder, of each --test folder).

    The classes are --train's folders when given (--test's folders must be among them), else --test's.
    """
    folders = train_classes if train_classes is not None else test_classes
    classnames, folder_to_class = class_mapping(parse_labels(args), folders)
    by_folder = dict(zip(folders, folder_to_class, strict=True))
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


@dataclasses.dataclass
class _Evaluation:
    """What the tasks share: the flags, the model, the encoded folders, and the report and table they fill."""

    args: argparse.Namespace
    tasks: list[str]
    templates: list[str]
    shots: list[int]
    recall_ks: list[int]
    C_grid: list[float]
    cache: Path | None
    output: Path
    model: torch.nn.Module | None = None
    preprocess: Callable[..., torch.Tensor] | None = None
    tokenizer: Callable[..., torch.Tensor] | None = None
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    rows: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    train: Any = None  # the ImageFeatures of --train, when a probe runs
    test: Any = None  # the ImageFeatures of --test
    classnames: list[str] = dataclasses.field(default_factory=list)
    train_y: torch.Tensor | None = None  # class index of each --train row
    test_y: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None  # the test predictions shown: zero-shot's, else the linear probe's
    probe: Any = None  # the LinearProbeResult

    @property
    def device(self) -> torch.device:
        return torch.device(self.args.device)


def _plan(args: argparse.Namespace) -> _Evaluation:
    """The tasks and every parsed flag, checked before anything slow starts."""
    from fastclip.checkpoint import cache_dir as default_cache_root
    from fastclip.evaluate import PAPER_C_GRID

    check_args(args)
    tasks = choose_tasks(args)
    templates = resolve_templates(args.templates)
    shots = _int_list(args.shots, "--shots")
    recall_ks = _int_list(args.recall_k, "--recall-k")
    C_grid = _float_list(args.C_grid, "--C-grid") if args.C_grid else list(PAPER_C_GRID)
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_root() / "features"
    return _Evaluation(args, tasks, templates, shots, recall_ks, C_grid, cache, Path(args.output_dir))


def _encode_folders(ev: _Evaluation) -> None:
    """Encode --train and --test as the tasks need them, and map their folders to class indices."""
    from fastclip.evaluate import image_folder_features, image_tower_fingerprint, sample_k_shot

    args = ev.args
    encode = {
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "cache_dir": ev.cache,
        "amp": not args.no_amp,
        "model_id": image_tower_fingerprint(ev.model) if ev.cache is not None else None,
    }
    if "linear-probe" in ev.tasks or "few-shot" in ev.tasks:
        ev.train = image_folder_features(
            ev.model, args.train, ev.preprocess, what="--train", desc="encode --train", **encode
        )
        ev.report["data"]["train"] = _split_report("--train", args.train, ev.train)
    if any(task in ev.tasks for task in ("zero-shot", "linear-probe", "few-shot")):
        ev.test = image_folder_features(
            ev.model, args.test, ev.preprocess, what="--test", desc="encode --test", **encode
        )
        ev.report["data"]["test"] = _split_report("--test", args.test, ev.test)
    if ev.test is None:
        return
    ev.classnames, train_map, test_map = label_space(args, ev.train.classes if ev.train else None, ev.test.classes)
    ev.report["classes"] = ev.classnames
    ev.test_y = torch.tensor(test_map)[ev.test.targets]
    ev.train_y = torch.tensor(train_map)[ev.train.targets] if ev.train is not None else None
    if "few-shot" in ev.tasks:  # k larger than a class: fail now, before any probe runs
        sample_k_shot(ev.train_y, max(ev.shots), 0, classes=ev.classnames)


def _zero_shot(ev: _Evaluation) -> None:
    from fastclip.evaluate import mean_per_class_accuracy
    from fastclip.zero_shot import accuracy, build_classifier, classify, logit_scale_of

    classifier = build_classifier(ev.model, ev.tokenizer, ev.classnames, ev.templates, device=ev.device)
    ev.probabilities = classify(ev.test.features.to(ev.device), classifier, logit_scale_of(ev.model)).cpu()  # (N, C)
    top = accuracy(ev.probabilities, ev.test_y, topk=(1, 5))
    zero_shot = {
        "top1": top[1],
        "top5": top[5],
        "mean_per_class": mean_per_class_accuracy(ev.probabilities, ev.test_y),
        "templates": ev.templates,
    }
    ev.report["zero_shot"] = zero_shot
    ev.rows += [
        ("zero-shot", "top-1", _percent(top[1])),
        ("zero-shot", "top-5", _percent(top[5])),
        ("zero-shot", "mean per-class", _percent(zero_shot["mean_per_class"])),
    ]


def _probe_config(ev: _Evaluation) -> Any:
    """The LinearProbeConfig of the linear probe and of each few-shot probe."""
    from fastclip.evaluate import LinearProbeConfig

    args = ev.args
    return LinearProbeConfig(
        C=args.C,
        C_grid=ev.C_grid,
        refine_steps=args.refine_steps,
        val_fraction=args.val_fraction,
        metric=args.metric.replace("-", "_"),
        solver=args.solver,
        max_iter=args.max_iter,
        device=ev.device,
        num_classes=len(ev.classnames),
    )


def _linear_probe(ev: _Evaluation) -> None:
    from fastclip.evaluate import linear_probe

    ev.probe = probe = linear_probe(
        ev.train.features, ev.train_y, ev.test.features, ev.test_y, config=_probe_config(ev)
    )
    ev.report["linear_probe"] = probe.to_dict()
    ev.rows += [
        ("linear probe", f"top-1 (C={probe.C:.3g})", _percent(probe.top1)),
        ("linear probe", "mean per-class", _percent(probe.mean_per_class)),
    ]
    if ev.probabilities is None:
        ev.probabilities = probe.classifier.predict_proba(ev.test.features).float().cpu()


def _few_shot(ev: _Evaluation) -> None:
    from fastclip.evaluate import few_shot, plot_few_shot

    args, probe = ev.args, ev.probe
    fallback_C = args.C or (probe.C if probe is not None else 1.0)
    curve = few_shot(
        ev.train.features,
        ev.train_y,
        ev.test.features,
        ev.test_y,
        shots=ev.shots,
        seeds=range(args.seeds),
        classes=ev.classnames,
        zero_shot=ev.report.get("zero_shot", {}).get("top1"),
        fallback_C=fallback_C,
        config=_probe_config(ev),
    )
    plot = plot_few_shot(
        curve,
        ev.output / "few_shot.png",
        linear_probe_top1=probe.top1 if probe else None,
        title=f"few-shot linear probes: {Path(args.checkpoint).name}",
    )
    ev.report["few_shot"] = {**curve.to_dict(), "fallback_C": fallback_C, "plot": os.fspath(plot)}
    for k, stats in curve.summary().items():
        ev.rows.append(
            ("few-shot", f"top-1, k={k} ({args.seeds} seeds)", f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}%")
        )


def _retrieval(ev: _Evaluation) -> None:
    from fastclip.evaluate import retrieval_from_csv

    args = ev.args
    retrieval = retrieval_from_csv(
        ev.model,
        ev.preprocess,
        ev.tokenizer,
        args.captions,
        ks=ev.recall_ks,
        image_key=args.csv_image_key,
        caption_key=args.csv_caption_key,
        batch_size=args.batch_size,
        num_workers=args.workers,
        cache_dir=ev.cache,
        amp=not args.no_amp,
    )
    ev.report["retrieval"] = retrieval.to_dict()
    skipped = f", {len(retrieval.skipped_images)} unreadable images skipped" if retrieval.skipped_images else ""
    print(f"--captions: {retrieval.num_images} images, {retrieval.num_captions} captions{skipped}")
    for name, value in retrieval.recall.items():
        ev.rows.append(("retrieval", name.replace("_to_", "->").replace("_R@", " R@"), _percent(value)))


_RUN_TASK: dict[str, Callable[[_Evaluation], None]] = {
    "zero-shot": _zero_shot,
    "linear-probe": _linear_probe,
    "few-shot": _few_shot,
    "retrieval": _retrieval,
}


def _show_predictions(ev: _Evaluation) -> None:
    """The top-5 of a few test images (printed, in the report, and drawn into predictions.png)."""
    from fastclip.evaluate import format_prediction, pick_gallery, save_gallery, top_predictions

    if ev.probabilities is None:
        return
    args = ev.args
    predictions = top_predictions(ev.probabilities, ev.classnames, ev.test.paths, ev.test_y, k=5)
    ev.report["predictions_from"] = "zero-shot" if "zero-shot" in ev.tasks else "linear probe"
    ev.report["predictions"] = [p.to_dict(args.test) for p in predictions]
    for prediction in pick_gallery(predictions, args.show):
        print(format_prediction(prediction, root=args.test))
    if args.gallery:
        gallery = save_gallery(
            pick_gallery(predictions, args.gallery),
            ev.output / "predictions.png",
            title=f"{ev.report['predictions_from']} predictions: {Path(args.checkpoint).name}",
        )
        ev.report["gallery"] = os.fspath(gallery)


def _write_report(ev: _Evaluation) -> None:
    """The table, report.json, and the list of files written."""
    print_table(ev.rows)
    ev.output.mkdir(parents=True, exist_ok=True)
    (ev.output / "report.json").write_text(json.dumps(ev.report, indent=2) + "\n", encoding="utf-8")
    written = [os.fspath(ev.output / "report.json")]
    written += [ev.report["few_shot"]["plot"]] if "few_shot" in ev.report else []
    written += [ev.report["gallery"]] if "gallery" in ev.report else []
    print("wrote " + ", ".join(written))


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    ev = _plan(args)
    ev.model, ev.preprocess, ev.tokenizer = load_model(args)
    ev.report = {
        "checkpoint": args.checkpoint,
        "model": args.model,
        "device": str(ev.device),
        "tasks": ev.tasks,
        "data": {},
    }
    _encode_folders(ev)
    for task in ev.tasks:
        _RUN_TASK[task](ev)
    _show_predictions(ev)
    _write_report(ev)
    return 0
