"""`TrainConfig`: every option of `fastclip train`, from defaults, a YAML/JSON file and command-line flags.

Precedence: flags given on the command line > the config file (`--config run.yaml`) > the defaults here.
Each field becomes a flag (`batch_size` -> `--batch-size`); its comment below is the flag's help.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from fastclip.train.precision import PRECISIONS

DATASETS = ("synthetic", "csv", "shards")
NONFINITE_POLICIES = ("stop", "skip")
LOSSES = ("clip", "siglip")


@dataclasses.dataclass
class TrainConfig:
    # --- model
    model: str = "demo-ViT"  # model name (see fastclip.list_models()) or a JSON config file
    pretrained: str | None = None  # start from these weights (checkpoint file or released tag)
    attn_backend: str = "auto"  # attention backend: auto (Triton on CUDA), triton or torch
    grad_checkpointing: bool = False  # recompute residual blocks in the backward (less memory)
    lock_image: bool = False  # freeze the image tower (LiT-style: train the text tower only)
    # --- data
    dataset: str = "synthetic"  # synthetic (built in, no download), csv (a CSV/TSV of paths and captions) or shards
    # (tar shards)
    train_data: str | None = None  # the CSV/TSV file, or the shard pattern ("data/{00000..00099}.tar")
    csv_image_key: str = "filepath"  # CSV column with image paths (relative ones: to the CSV's folder, else the working
    # directory)
    csv_caption_key: str = "title"  # CSV column with captions
    csv_separator: str | None = None  # CSV column separator: one character, or tab as "tab" or "\t" (default: read from
    # the header line, tab or comma)
    use_labels: bool = False  # class-aware positives: pairs with equal class ids are positives (synthetic: colour-shape
    # class; csv: csv_label_key; shards: each sample's cls member)
    csv_label_key: str = "label"  # CSV column with integer class ids (read with use_labels)
    synthetic_samples: int = 50_000  # samples per epoch of the synthetic dataset
    synthetic_extra_colours: bool = False  # synthetic: also train on every shape in colours that no evaluation class
    # names (fastclip.data.synthetic.EXTRA_COLOURS); the held-out pairs still never occur
    jitter: float = 0.4  # colour-jitter strength of the training augmentation (0 disables it)
    crop_scale: float = 0.5  # smallest area share of the training random resized crop, in (0, 1] (1: whole image)
    batch_size: int = 64  # pairs per device per optimizer step (before accumulation)
    accum_steps: int = 1  # micro-batches per step: the loss still sees the whole accumulated batch
    workers: int = 2  # DataLoader worker processes per device
    max_skip_fraction: float = 0.5  # stop when more than this share of the first 10 batches' samples is unreadable (1:
    # never; an epoch with no readable sample always stops)
    # --- optimisation
    steps: int = 1000  # optimizer steps in total
    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.2  # AdamW weight decay (not on gains, biases, embeddings or logit_scale)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0  # clip the gradient norm to this (0 disables)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16 (with a GradScaler)
    loss: str = "clip"  # clip (softmax contrastive, the model's logit_scale) or siglip (sigmoid loss with its own
    # learnable scale and bias)
    loss_weight: float = 0.5  # weight of the image->text direction in the loss (loss=clip only)
    label_smoothing: float = 0.0  # (loss=clip only)
    nonfinite: str = "stop"  # on a non-finite loss: stop (raise, naming the step) or skip (drop that update)
    # --- evaluation, checkpoints, logs
    eval_every: int = 0  # zero-shot evaluation every this many steps (0: only at the end)
    eval_images: str | None = None  # image folder with one sub-folder per class (default: synthetic runs use its
    # held-out splits, csv and shards runs evaluate nothing)
    eval_samples: int = 1000  # synthetic images per zero-shot evaluation split
    save_every: int = 0  # checkpoint every this many steps (0: only at the end, or when stopped by Ctrl-C/SIGTERM)
    keep_checkpoints: int = 2  # newest checkpoints/step_*.pt kept, older ones deleted (0: keep all); model.safetensors
    # is always kept
    output_dir: str = "runs/fastclip"  # checkpoints, metrics.csv, eval.csv, curves.png, model.safetensors; must be
    # empty unless resume or overwrite
    resume: str | None = None  # continue from a checkpoint file, or "latest" in output_dir
    overwrite: bool = False  # start over in a non-empty output_dir: first delete the files fastclip writes there
    # (metrics.csv, eval.csv, curves.png, model.safetensors, config.json, checkpoints/, tensorboard/), never any other
    # file
    log_every: int = 10  # steps between metric rows
    tensorboard: bool = False  # also write TensorBoard event files (needs the tensorboard package)
    seed: int = 0
    device: str | None = None  # default: cuda (this rank's GPU) when available, else cpu

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset != "synthetic" and not self.train_data:
            raise ValueError(f"dataset={self.dataset!r} needs train_data (the CSV file or shard pattern)")
        from fastclip.model.factory import resolve_device

        resolve_device(self.device)  # a malformed device, or cuda where there is none, fails before any work
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        positive = ("batch_size", "accum_steps", "steps", "log_every", "synthetic_samples", "eval_samples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip", "jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(
                f"crop_scale must lie in (0, 1] (the smallest crop's share of the image area), got {self.crop_scale}"
            )
        if not 0.0 <= self.loss_weight <= 1.0 or not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError("loss_weight and label_smoothing must lie in [0, 1]")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "siglip":
            for name in ("loss_weight", "label_smoothing"):
                if getattr(self, name) != getattr(TrainConfig, name):
                    raise ValueError(
                        f"{name} applies to loss='clip' only; loss='siglip' has no {name} "
                        f"(leave it at {getattr(TrainConfig, name)})"
                    )
        if self.use_labels and self.dataset == "csv" and not self.csv_label_key:
            raise ValueError("use_labels with dataset='csv' needs csv_label_key (the column of integer class ids)")
        self._check_outputs_and_data()

    def _check_outputs_and_data(self) -> None:
        """The options added for output folders, checkpoints and unreadable data."""
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be >= 0 (0 keeps every checkpoint), got {self.keep_checkpoints}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must lie in [0, 1], got {self.max_skip_fraction}")
        if self.resume and self.overwrite:
            raise ValueError(
                "resume and overwrite contradict each other: resume continues the run in output_dir, "
                "overwrite deletes it; give one of them"
            )
        if self.csv_separator is not None:
            from fastclip.data.pairs import normalize_separator

            normalize_separator(self.csv_separator)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for name, hint in hints.items():
        if isinstance(hint, types.UnionType):  # `X | None`
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        out[name] = hint
    return out


def _field_help() -> dict[str, str]:
    """The trailing comment of each field in this file's source: one place documents both. A long comment
    goes on in the comment lines right below its field, up to the next field or section header ("# ---")."""
    import inspect

    helps: dict[str, str] = {}
    continued = None  # the field whose comment a comment line on its own continues
    for line in inspect.getsource(TrainConfig).splitlines():
        text = line.strip()
        if continued and text.startswith("#") and not text.startswith("# ---"):
            helps[continued] += " " + text[1:].strip()
            continue
        continued = None
        name, sep, rest = text.partition(":")
        if sep and "#" in rest and name.isidentifier():
            helps[name] = rest.split("#", 1)[1].strip()
            continued = name
    return helps


# open_clip's spellings of the same options, accepted too so that its command lines carry over.
FLAG_ALIASES = {"csv_image_key": ("--csv-img-key",)}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (defaults suppressed, so only flags actually given override)."""
    parser.add_argument("--config", help="a YAML or JSON file of TrainConfig fields")
    helps = _field_help()
    for name, kind in _field_types().items():
        flags = ["--" + name.replace("_", "-"), *FLAG_ALIASES.get(name, ())]
        default = getattr(TrainConfig, name, None)
        text = helps.get(name, "")
        if "default:" not in text:  # fields whose default needs words say it themselves
            text = f"{text} (default: {default})".strip()
        text = text.replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(
                *flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        else:
            parser.add_argument(
                *flags, dest=name, type=kind, default=argparse.SUPPRESS, help=text, metavar=name.upper()
            )


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path} has unknown options {unknown}; known: {sorted(known)}")
    return {name: _coerce(name, value, path) for name, value in values.items()}


def _coerce(name: str, value: Any, source: Path) -> Any:
    """YAML reads `lr: 1e-3` as a string (YAML 1.1 floats need a dot): convert numbers, check the rest."""
    kind = _field_types()[name]
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind in (int, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ValueError(f"option {name!r} in {source} must be a {kind.__name__}, got {value!r}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = read_config_file(args.config) if getattr(args, "config", None) else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})
    return TrainConfig(**values)
