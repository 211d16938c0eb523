"""Checkpoints: load OpenAI's, open_clip's, Hugging Face transformers' and fastclip's; save fastclip's
(safetensors + config) and transformers' (a CLIPModel folder).

    model = load_checkpoint("ViT-B-32.pt")          # OpenAI's TorchScript archive: config from the shapes
    model = load_checkpoint("epoch_32.pt")          # open_clip training checkpoint ({"state_dict": ...})
    model = load_checkpoint("clip-vit-base-patch32")  # transformers folder: config.json + weights
    save_checkpoint(model, "model.safetensors")     # weights + config, written atomically
    model = load_checkpoint("model.safetensors")    # config read from the file
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
    "load_checkpoint",
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


def load_checkpoint(
    path: str | os.PathLike,
    *,
    config: CLIPConfig | None = None,
    act: str | None = None,
    attn_backend: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """A CLIP model with the weights of `path`.

    `path` is a checkpoint file or a Hugging Face transformers CLIPModel folder (config.json and
    model.safetensors or pytorch_model.bin). The config is the one stored with the weights (fastclip's
    format; transformers' config.json), else `config`, else one inferred from the tensors' shapes (see
    `infer_config`). A stored config and a different `config` raise. `act` overrides the activation:
    the shapes cannot tell it, and inference assumes QuickGELU, which OpenAI's weights need; open_clip's
    models without "-quickgelu" in their name need act="gelu".
    The model is returned in training mode, as PyTorch creates modules: call `.eval()` for inference.
    """
    from fastclip.model.factory import create_model

    return create_model(
        config, pretrained=os.fspath(path), act=act, attn_backend=attn_backend, device=device, dtype=dtype
    )
