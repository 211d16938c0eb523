"""What the commands that run a trained model (`zero-shot`, `eval`) share: the flags that choose and load
the model, and the class names and prompt templates of a zero-shot classifier."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from fastclip.backends import ATTENTION_BACKENDS
from fastclip.commands import device_argument
from fastclip.train.precision import COMPUTE_DTYPES, compute_dtype
from fastclip.zero_shot import TEMPLATE_SETS


def add_checkpoint_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--checkpoint, --model and --act: which weights, and the model they fit."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint file (fastclip, OpenAI, open_clip), a Hugging Face transformers CLIPModel "
        "folder, or a released tag with --model",
    )
    parser.add_argument(
        "--model", help="model name or JSON config (default: stored in or inferred from the checkpoint)"
    )
    parser.add_argument(
        "--act", choices=("quick_gelu", "gelu"), help="MLP activation, for state dicts whose config is inferred"
    )


def add_device_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, precision_default: str | None, precision_help: str
) -> None:
    """--device and --precision (the weights' dtype)."""
    parser.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=tuple(COMPUTE_DTYPES), default=precision_default, help=precision_help)


def add_backend_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--attn-backend and --bpe-path."""
    parser.add_argument("--attn-backend", default="auto", choices=ATTENTION_BACKENDS)
    parser.add_argument(
        "--bpe-path", help="the tokenizer's bpe_simple_vocab_16e6.txt.gz (default: found automatically)"
    )


# (model, preprocess, tokenizer)
Loaded = tuple[torch.nn.Module, Callable[..., torch.Tensor], Callable[..., torch.Tensor]]


def load_model(args: argparse.Namespace) -> Loaded:
    """(model, preprocess, tokenizer) as the flags above say; no --precision: bf16 on CUDA, else fp32."""
    from fastclip.model.factory import create_model_and_transforms

    device = torch.device(args.device)
    return create_model_and_transforms(
        args.model,
        args.checkpoint,
        bpe_path=args.bpe_path,
        act=args.act,
        attn_backend=args.attn_backend,
        device=device,
        dtype=compute_dtype(args.precision or "auto", device),
    )


def read_lines(path: str, what: str) -> list[str]:
    """The non-blank lines of a text file; an unreadable or empty file is a ValueError naming `what`."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as error:
        raise ValueError(f"cannot read the {what} file {path!r}: {error}") from error
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"the {what} file {path!r} is empty")
    return lines


def resolve_templates(spec: str) -> list[str]:
    """--templates: a named set ("single", "ensemble") or a file of templates."""
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


def add_class_name_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, labels_help: str, templates: str
) -> None:
    """--labels / --labels-file (one of them) and --templates, whose default is `templates`."""
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", help=labels_help)
    labels.add_argument("--labels-file", help="file with one class name per line")
    others = " or ".join(f"'{name}'" for name in ("single", "ensemble") if name != templates)
    parser.add_argument(
        "--templates",
        default=templates,
        help=f"'{templates}' (default), {others} or a file with one template per line, each with '{{}}'",
    )


def parse_labels(args: argparse.Namespace) -> list[str] | None:
    """--labels or --labels-file, or None when neither is given."""
    if args.labels_file:
        return read_lines(args.labels_file, "labels")
    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",") if label.strip()]
        if not labels:
            raise ValueError("--labels must name at least one class")
        return labels
    return None
