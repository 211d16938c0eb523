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

from fastclip.commands import device_argument
from fastclip.data.image_folder import ImageFolder
from fastclip.zero_shot import TEMPLATE_SETS, accuracy, build_classifier, classify

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "zero-shot",
        help="classify a folder of images by label names (accuracy when sub-folders are classes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (OpenAI, open_clip, fastclip), a Hugging Face transformers CLIPModel folder, or a released tag with --model")
    parser.add_argument("--model", help="model name or JSON config (default: stored in or inferred from the checkpoint)")
    parser.add_argument("--act", choices=("quick_gelu", "gelu"), help="MLP activation, for state dicts whose config is inferred")
    parser.add_argument("--images", required=True, help="folder of images, optionally one sub-folder per class")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="comma-separated class names")
    labels.add_argument("--labels-file", help="file with one class name per line")
    parser.add_argument("--templates", default="single", help="'single', 'ensemble' or a file with one template per line, each with '{}'")
    parser.add_argument("--top-k", type=int, default=5, help="predictions kept per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-loading processes")
    parser.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), help="weights' dtype (default: bf16 on CUDA, else fp32)")
    parser.add_argument("--attn-backend", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--bpe-path", help="the tokenizer's bpe_simple_vocab_16e6.txt.gz (default: found automatically)")
    parser.add_argument("--output", help="write predictions (and accuracy) to this JSON file")
    parser.set_defaults(run=run)


def read_lines(path: str, what: str) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as error:
        raise ValueError(f"cannot read the {what} file {path!r}: {error}") from error
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"the {what} file {path!r} is empty")
    return lines


def resolve_templates(spec: str) -> list[str]:
    if spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    if not Path(spec).is_file():
        raise ValueError(f"--templates must be one of {sorted(TEMPLATE_SETS)} or a file of templates, got {spec!r}")
    return read_lines(spec, "templates")


def class_mapping(labels: list[str] | None, folders: list[str] | None) -> tuple[list[str], list[int] | None]:
    """(class names, the class index of each sub-folder or None when there are no sub-folders)."""
    if folders is None:
        if labels is None:
            raise ValueError("--images has no class sub-folders, so --labels or --labels-file is required")
        return labels, None
    if labels is None:
        return [name.replace("_", " ") for name in folders], list(range(len(folders)))
    by_name = {label.replace(" ", "_").lower(): i for i, label in enumerate(labels)}
    if all(folder.lower() in by_name for folder in folders):
        return labels, [by_name[folder.lower()] for folder in folders]
    if len(labels) == len(folders):
        return labels, list(range(len(folders)))
    raise ValueError(
        f"the {len(folders)} class sub-folders of --images neither carry the names of the {len(labels)} labels "
        f"nor match them in number (so they cannot be paired in sorted order)"
    )


def parse_labels(args: argparse.Namespace) -> list[str] | None:
    if args.labels_file:
        return read_lines(args.labels_file, "labels")
    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",") if label.strip()]
        if not labels:
            raise ValueError("--labels must name at least one class")
        return labels
    return None


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    from fastclip.model.factory import create_model_and_transforms

    if args.top_k < 1 or args.batch_size < 1 or args.workers < 0:
        raise ValueError("--top-k and --batch-size must be >= 1 and --workers >= 0")
    templates = resolve_templates(args.templates)
    device = torch.device(args.device)
    dtype = PRECISIONS[args.precision] if args.precision else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, preprocess, tokenizer = create_model_and_transforms(
        args.model, args.checkpoint, bpe_path=args.bpe_path, act=args.act, attn_backend=args.attn_backend,
        device=device, dtype=dtype,
    )
    dataset = ImageFolder(args.images, transform=preprocess)
    classnames, folder_to_class = class_mapping(parse_labels(args), dataset.classes)
    classifier = build_classifier(model, tokenizer, classnames, templates, device=device)
    logit_scale = min(model.logit_scale.exp().item(), 100.0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)

    top_k = min(args.top_k, len(classnames))
    all_probs, predictions = [], []
    for images, _ in tqdm(loader, desc="zero-shot", unit="batch", disable=not sys.stderr.isatty()):
        probs = classify(model.encode_image(images.to(device)), classifier, logit_scale).cpu()
        all_probs.append(probs)
    probs = torch.cat(all_probs)
    values, indices = probs.topk(top_k, dim=1)
    for path, row_values, row_indices in zip(dataset.paths, values.tolist(), indices.tolist()):
        predictions.append({
            "image": os.fspath(path.relative_to(dataset.root)),
            "top_k": [{"label": classnames[i], "probability": p} for i, p in zip(row_indices, row_values)],
        })

    report: dict[str, Any] = {
        "checkpoint": args.checkpoint, "model": args.model, "images": args.images, "classes": classnames,
        "templates": templates, "num_images": len(dataset),
    }
    if folder_to_class is not None:
        targets = torch.tensor([folder_to_class[t] for t in dataset.targets])
        for prediction, target in zip(predictions, targets.tolist()):
            prediction["target"] = classnames[target]
        report["accuracy"] = {f"top{k}": v for k, v in accuracy(probs, targets, topk=(1, 5)).items()}
        print(f"{len(dataset)} images, {len(classnames)} classes: "
              + ", ".join(f"{name} accuracy {value:.4f}" for name, value in report["accuracy"].items()))
    else:
        for prediction in predictions:
            best = prediction["top_k"][0]
            print(f"{prediction['image']}\t{best['label']}\t{best['probability']:.4f}")
    report["predictions"] = predictions
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
