"""`create_model`: a CLIP model from a config name, file or object, optionally with pretrained weights."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastclip.backends import check_attention_backend, parse_dtype
from fastclip.checkpoint import (
    CheckpointError,
    download_pretrained,
    infer_config,
    list_pretrained,
    load_into,
    load_state_dict,
)
from fastclip.model.clip import CLIP
from fastclip.model.config import CLIPConfig, resolve_config

if TYPE_CHECKING:
    from fastclip.data.transforms import CLIPPreprocess
    from fastclip.tokenizer import ClipTokenizer


def create_model(
    name_or_config: str | os.PathLike | CLIPConfig | dict[str, Any] | None,
    *,
    pretrained: str | os.PathLike | None = None,
    attn_backend: str = "auto",
    grad_checkpointing: bool = False,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    act: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> CLIP:
    """Build a CLIP model.

    name_or_config: a name from `list_models()` ("ViT-B-32", "RN50", ...; OpenAI's "ViT-B/32" works
        too), a path to a JSON config, a config dict or a `CLIPConfig`; None takes the config from the
        `pretrained` checkpoint (stored in fastclip files, transformers' config.json, otherwise inferred
        from the tensors' shapes).
    pretrained: a checkpoint file (OpenAI TorchScript or state dict, open_clip, fastclip safetensors), a
        Hugging Face transformers CLIPModel folder (config.json + weights), or a released tag for this
        name (e.g. "openai", see `fastclip.checkpoint.list_pretrained()`), downloaded once into the cache
        (`cache_dir`, default `$FASTCLIP_CACHE_DIR` or ~/.cache/fastclip).
    attn_backend: "auto" (Triton on CUDA, else PyTorch), "triton" or "torch", for every attention call.
    grad_checkpointing: recompute residual blocks in the backward (less memory, ~30% more compute).
    dtype, device: where the parameters live (the model is built directly on `device`).
    act: override the config's MLP activation ("quick_gelu" or "gelu"), e.g. for a state dict whose
        config is inferred (QuickGELU by default, which OpenAI's weights need).

    The model is in training mode, like any new nn.Module: call `.eval()` for inference.
    """
    check_attention_backend(attn_backend)
    dtype = parse_dtype(dtype)
    device = resolve_device(device)
    if name_or_config is None and pretrained is None:
        raise ValueError("create_model needs a model name/config, a pretrained checkpoint, or both")
    if pretrained is not None and device is not None and torch.device(device).type == "meta":
        raise ValueError("pretrained weights cannot be loaded into a model on the meta device (it holds no data)")
    config = resolve_config(name_or_config) if name_or_config is not None else None

    state, source = None, None
    if pretrained is not None:
        path = _resolve_pretrained(name_or_config, pretrained, cache_dir)
        source = f"checkpoint {path}"
        state, stored = load_state_dict(path)
        if stored is not None and config is not None and _without_act(stored) != _without_act(config):
            raise ValueError(
                f"{source} was saved for a different config than the one requested: {_diff(stored, config)}"
            )
        if stored is not None:  # the file knows what its weights were trained with (e.g. the activation)
            config = stored
        elif config is None:
            config = infer_config(state, act=act or "quick_gelu", source=source)
    if act is not None:
        config = dataclasses.replace(config, act=act)

    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = CLIP(config, attn_backend=attn_backend)
    if state is not None:
        load_into(model, state, source=source)
    if dtype is not None:
        model = model.to(dtype)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def load_checkpoint(
    path: str | os.PathLike,
    *,
    config: CLIPConfig | None = None,
    act: str | None = None,
    attn_backend: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> CLIP:
    """A CLIP model with the weights of `path`.

    `path` is a checkpoint file or a Hugging Face transformers CLIPModel folder (config.json and
    model.safetensors or pytorch_model.bin). The config is the one stored with the weights (fastclip's
    format; transformers' config.json), else `config`, else one inferred from the tensors' shapes (see
    `fastclip.checkpoint.infer_config`). A stored config and a different `config` raise. `act` overrides
    the activation: the shapes cannot tell it, and inference assumes QuickGELU, which OpenAI's weights
    need; open_clip's models without "-quickgelu" in their name need act="gelu".
    The model is returned in training mode, as PyTorch creates modules: call `.eval()` for inference.

        model = load_checkpoint("ViT-B-32.pt")            # OpenAI's TorchScript archive: config from the shapes
        model = load_checkpoint("epoch_32.pt")            # open_clip training checkpoint ({"state_dict": ...})
        model = load_checkpoint("clip-vit-base-patch32")  # transformers folder: config.json + weights
        model = load_checkpoint("model.safetensors")      # fastclip's file: config read from it
    """
    return create_model(
        config, pretrained=os.fspath(path), act=act, attn_backend=attn_backend, device=device, dtype=dtype
    )


def create_model_and_transforms(
    name_or_config: str | os.PathLike | CLIPConfig | dict[str, Any] | None,
    pretrained: str | os.PathLike | None = None,
    *,
    bpe_path: str | os.PathLike | None = None,
    **model_kwargs: Any,
) -> tuple[CLIP, "CLIPPreprocess", "ClipTokenizer"]:
    """(model in eval mode, its image preprocessing, its tokenizer): what CLIP evaluation harnesses take.

    Arguments are `create_model`'s; `bpe_path` locates the tokenizer's merges file (see
    `fastclip.tokenizer.find_vocab_file`). The preprocessing resizes to the model's image size and the
    tokenizer pads to its context length.
    """
    from fastclip.data.transforms import CLIPPreprocess
    from fastclip.tokenizer import ClipTokenizer

    model = create_model(name_or_config, pretrained=pretrained, **model_kwargs).eval()
    preprocess = CLIPPreprocess(model.image_size)
    tokenizer = ClipTokenizer(bpe_path, context_length=model.config.text.context_length)
    return model, preprocess, tokenizer


def _resolve_pretrained(name: Any, pretrained: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Path:
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if isinstance(name, str):
        canonical = name.replace("/", "-").replace("@336px", "-336")
        if (canonical, str(pretrained)) in list_pretrained(canonical):  # a released tag wins over a folder
            return download_pretrained(canonical, str(pretrained), root=cache_dir)
        tags = [tag for _, tag in list_pretrained(canonical)]
        if not path.is_dir() and not any(sep in str(pretrained) for sep in ("/", os.sep, ".")):
            raise ValueError(
                f"pretrained={str(pretrained)!r} is neither a file nor a released tag of {name!r} "
                f"(its tags: {tags or 'none'})"
            )
    if path.is_dir():  # a Hugging Face transformers model folder; the checkpoint package says if it is not
        return path
    if path.exists():  # e.g. a socket or a broken device: say so, rather than "does not exist"
        raise CheckpointError(f"pretrained checkpoint {pretrained} is not a regular file")
    raise FileNotFoundError(f"pretrained checkpoint {pretrained} does not exist")


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """`device` as a torch.device (None stays None); ValueError if it is malformed or not on this machine."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0', got {device!r}"
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device '{resolved}' was asked for, but no CUDA device is available here "
            "(torch.cuda.is_available() is False)"
        )
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(
            f"device '{resolved}' was asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return resolved


def _without_act(config: CLIPConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in ("act", "init_logit_scale")}


def _diff(stored: CLIPConfig, requested: CLIPConfig) -> str:
    a, b = stored.to_dict(), requested.to_dict()
    out = []
    for key in a:
        if isinstance(a[key], dict):
            out += [f"{key}.{k}: file {a[key][k]!r} vs {b[key][k]!r}" for k in a[key] if a[key][k] != b[key][k]]
        elif a[key] != b[key] and key not in ("act", "init_logit_scale"):
            out.append(f"{key}: file {a[key]!r} vs {b[key]!r}")
    return "; ".join(out)
