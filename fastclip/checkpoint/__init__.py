"""Checkpoint files: read OpenAI's, open_clip's, Hugging Face transformers' and fastclip's state dicts and
configs; write fastclip's (safetensors + config) and transformers' (a CLIPModel folder).

This package knows state dicts and configs only; `fastclip.load_checkpoint` (the model factory) builds a
model from them:

    state, config = load_state_dict("ViT-B-32.pt")  # OpenAI's TorchScript archive: config None (inferred)
    state, config = load_state_dict("clip-vit-base-patch32")  # transformers folder: config.json + weights
    save_checkpoint(model, "model.safetensors")     # weights + config, written atomically
    save_transformers(model, "exported/")           # for CLIPModel / CLIPProcessor.from_pretrained
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastclip.checkpoint.convert import infer_config, load_into, to_fastclip_state_dict
from fastclip.checkpoint.files import CheckpointError, read_checkpoint, save_checkpoint
from fastclip.checkpoint.pretrained import PRETRAINED, cache_dir, download_pretrained, list_pretrained
from fastclip.checkpoint.transformers_folder import read_transformers_file, read_transformers_folder, save_transformers
from fastclip.checkpoint.transformers_format import is_transformers_state_dict
from fastclip.model.config import CLIPConfig

__all__ = [
    "PRETRAINED",
    "CheckpointError",
    "cache_dir",
    "download_pretrained",
    "infer_config",
    "list_pretrained",
    "load_into",
    "load_state_dict",
    "save_checkpoint",
    "save_transformers",
]


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CLIPConfig | None]:
    """(state dict in fastclip's names, the config stored with it or None) for any supported file, or
    for a transformers model folder (whose config.json gives the config)."""
    if Path(path).expanduser().is_dir():
        return read_transformers_folder(path)
    obj, config = read_checkpoint(path)
    if config is None and is_transformers_state_dict(obj):  # a weights file taken out of a transformers folder
        return read_transformers_file(path, obj)
    return to_fastclip_state_dict(obj, source=f"checkpoint {path}"), config
