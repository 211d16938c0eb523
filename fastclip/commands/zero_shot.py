"""`fastclip zero-shot`: classify a folder of images with label names and prompt templates.

    fastclip zero-shot --checkpoint ViT-B-32.pt --images photos/ --labels cat,dog,car
    fastclip zero-shot --model ViT-B-32 --checkpoint openai --images val/ --labels-file names.txt \\
        --templates ensemble --output predictions.json

With one sub-folder per class the sub-folder is each image's true class and accuracy is reported. Class
names are `--labels`/`--labels-file` when given, else the sub-folder names ("_" read as a space). Labels
are matched to sub-folders by name when every sub-folder is named after a label, else by position in
sorted sub-folder order (ImageNet's wnid folders with a names file), which needs equal counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastclip.commands import add_command
from fastclip.commands._inference import (
    add_backend_arguments,
    add_checkpoint_arguments,
    add_class_name_arguments,
    add_device_arguments,
    class_mapping,
    load_model,
    parse_labels,
    resolve_templates,
)
from fastclip.data.image_folder import ImageFolder
from fastclip.zero_shot import accuracy, build_classifier, classify, logit_scale_of


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands,
        "zero-shot",
        "classify a folder of images by label names (accuracy when sub-folders are classes)",
        __doc__,
        run,
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--images", required=True, help="folder of images, optionally one sub-folder per class")
    add_class_name_arguments(parser, "comma-separated class names", templates="single")
    parser.add_argument("--top-k", type=int, default=5, help="predictions kept per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-loading processes")
    add_device_arguments(
        parser, precision_default=None, precision_help="weights' dtype (default: bf16 on CUDA, else fp32)"
    )
    add_backend_arguments(parser)
    parser.add_argument("--output", help="write predictions (and accuracy) to this JSON file")


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    if args.top_k < 1 or args.batch_size < 1 or args.workers < 0:
        raise ValueError("--top-k and --batch-size must be >= 1 and --workers >= 0")
    templates = resolve_templates(args.templates)
    model, preprocess, tokenizer = load_model(args)
    dataset = ImageFolder(args.images, transform=preprocess)
    classnames, folder_to_class = class_mapping(parse_labels(args), dataset.classes)
    classifier = build_classifier(model, tokenizer, classnames, templates, device=torch.device(args.device))
    probs = _probabilities(model, dataset, classifier, args)
    predictions = _top_k(probs, dataset, classnames, min(args.top_k, len(classnames)))
    report: dict[str, Any] = {
        "checkpoint": args.checkpoint,
        "model": args.model,
        "images": args.images,
        "classes": classnames,
        "templates": templates,
        "num_images": len(dataset),
    }
    if folder_to_class is not None:
        report["accuracy"] = _score(probs, dataset, folder_to_class, classnames, predictions)
    else:
        for prediction in predictions:
            best = prediction["top_k"][0]
            print(f"{prediction['image']}\t{best['label']}\t{best['probability']:.4f}")
    report["predictions"] = predictions
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _probabilities(
    model: torch.nn.Module, dataset: ImageFolder, classifier: torch.Tensor, args: argparse.Namespace
) -> torch.Tensor:
    """Class probabilities [N, C] of every image, on the CPU."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    logit_scale, device = logit_scale_of(model), torch.device(args.device)
    rows = []
    for images, _ in tqdm(loader, desc="zero-shot", unit="batch", disable=not sys.stderr.isatty()):
        rows.append(classify(model.encode_image(images.to(device)), classifier, logit_scale).cpu())
    return torch.cat(rows)


def _top_k(probs: torch.Tensor, dataset: ImageFolder, classnames: list[str], k: int) -> list[dict[str, Any]]:
    """Each image's `k` most probable labels, as the JSON report lists them."""
    values, indices = probs.topk(k, dim=1)
    rows = zip(dataset.paths, values.tolist(), indices.tolist(), strict=True)
    return [
        {
            "image": os.fspath(path.relative_to(dataset.root)),
            "top_k": [{"label": classnames[i], "probability": p} for i, p in zip(labels, chances, strict=True)],
        }
        for path, chances, labels in rows
    ]


def _score(
    probs: torch.Tensor,
    dataset: ImageFolder,
    folder_to_class: list[int],
    classnames: list[str],
    predictions: list[dict[str, Any]],
) -> dict[str, float]:
    """Top-1/top-5 accuracy against the sub-folders (printed); each prediction gets its "target"."""
    targets = torch.tensor([folder_to_class[t] for t in dataset.targets])
    for prediction, target in zip(predictions, targets.tolist(), strict=True):
        prediction["target"] = classnames[target]
    scores = {f"top{k}": v for k, v in accuracy(probs, targets, topk=(1, 5)).items()}
    print(
        f"{len(dataset)} images, {len(classnames)} classes: "
        + ", ".join(f"{name} accuracy {value:.4f}" for name, value in scores.items())
    )
    return scores
