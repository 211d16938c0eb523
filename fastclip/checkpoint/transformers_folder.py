"""Hugging Face transformers model folders: read a CLIPModel's, write one from a fastclip CLIP.

A folder holds `config.json` and the weights: `model.safetensors` or `pytorch_model.bin`, or shards of
either listed in `model.safetensors.index.json` / `pytorch_model.bin.index.json` (safetensors first, as
transformers prefers them). `save_transformers` writes config.json and model.safetensors, plus, for
`CLIPProcessor.from_pretrained`, the tokenizer files (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json) built from fastclip's BPE vocabulary and preprocessor_config.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fastclip.checkpoint.convert import first_keys
from fastclip.checkpoint.files import CheckpointError, read_checkpoint, write_atomically
from fastclip.checkpoint.transformers_format import (
    config_from_transformers,
    config_to_transformers,
    from_transformers_state_dict,
    to_transformers_state_dict,
)
from fastclip.model.config import CLIPConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
# What transformers' from_pretrained looks for, in its order of preference
WEIGHT_FILES = (SAFETENSORS_FILE, "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# transformers' spelling of the special tokens (fastclip's vocabulary calls them <start_of_text>, <end_of_text>)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"  # the first line of the merges.txt files on the Hub; readers skip it


def read_transformers_folder(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """(state dict in fastclip's names, config) of a transformers CLIPModel folder."""
    folder = Path(folder).expanduser()
    if not (folder / CONFIG_FILE).is_file():
        # "is not a regular file": what fastclip said of any folder before it read transformers' ones
        raise CheckpointError(
            f"checkpoint {folder} is not a regular file, nor a Hugging Face transformers model folder "
            f"(it has no {CONFIG_FILE})"
        )
    config = read_transformers_config(folder / CONFIG_FILE)
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        present = first_keys(sorted(p.name for p in folder.iterdir()))
        raise CheckpointError(
            f"transformers model folder {folder} has no PyTorch weights ({' or '.join(WEIGHT_FILES)}); "
            f"it holds: {present}"
        )
    state = _read_shards(weights) if weights.name.endswith(".index.json") else _read_weights(weights)
    return from_transformers_state_dict(state, config, source=f"checkpoint {weights}"), config


def read_transformers_file(
    path: str | os.PathLike, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """(fastclip state dict, config) for the transformers-named tensors `state` read from `path`, whose
    architecture is in the config.json next to it."""
    path = Path(path).expanduser()
    config_path = path.parent / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{path} holds Hugging Face transformers CLIP weights (text_model.*, vision_model.*), whose "
            f"architecture is in the {CONFIG_FILE} beside them, but {config_path} does not exist: pass the model folder"
        )
    config = read_transformers_config(config_path)
    return from_transformers_state_dict(state, config, source=f"checkpoint {path}"), config


def read_transformers_config(path: Path) -> CLIPConfig:
    return config_from_transformers(_read_json(path), source=str(path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    obj, _ = read_checkpoint(path)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict (a dict of tensors)")
    return obj


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    """The tensors of every shard that a transformers `*.index.json` names."""
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map: it is not a transformers shard index")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_read_weights(index.parent / shard))
    return state


# -------------------------------------------------------------------------------------------------- write


def save_transformers(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    *,
    processor: bool = True,
    bpe_path: str | os.PathLike | None = None,
) -> Path:
    """Write `model` (a fastclip ViT CLIP) as a Hugging Face transformers CLIPModel folder; returns it.

    `CLIPModel.from_pretrained(folder)` then computes the same features. With `processor` (the default)
    the folder also gets the tokenizer and image-processor files of `CLIPProcessor.from_pretrained`,
    built from fastclip's BPE merges (`bpe_path`, see `fastclip.tokenizer.find_vocab_file`). The folder
    is created if needed; each file is written atomically, config.json last.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, CLIPConfig):
        raise TypeError(f"save_transformers needs a fastclip CLIP model (with a .config), got {type(model).__name__}")
    from safetensors.torch import save_file

    hf_config = config_to_transformers(config, dtype=next(model.parameters()).dtype)
    tensors = to_transformers_state_dict(model.state_dict(), config)
    # everything is built (and checked) before the first file is written
    texts = processor_files(config, bpe_path=bpe_path) if processor else {}
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    # transformers refuses safetensors files without metadata format "pt"
    write_atomically(folder / SAFETENSORS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    for name, text in texts.items():
        _write_text(folder / name, text)
    _write_text(folder / CONFIG_FILE, _json(hf_config))
    return folder


def processor_files(config: CLIPConfig, *, bpe_path: str | os.PathLike | None = None) -> dict[str, str]:
    """{file name: text} of transformers' CLIPTokenizer and CLIPImageProcessor files for fastclip's
    tokenizer (with the model's context length) and preprocessing (with its image size)."""
    from fastclip.data.transforms import CLIP_MEAN, CLIP_STD
    from fastclip.tokenizer import EOT, SOT, find_vocab_file, load_vocab

    encoder, ranks = load_vocab(find_vocab_file(bpe_path).resolve())
    if config.text.vocab_size != len(encoder):
        raise ValueError(
            f"the model's text vocab_size is {config.text.vocab_size}, but CLIP's BPE tokenizer has {len(encoder)} "
            f"tokens: its files would not fit this model; pass processor=False"
        )
    # same ids; only the names of the two special tokens differ
    vocab = {{SOT: BOS, EOT: EOS}.get(token, token): i for token, i in encoder.items()}
    merges = "\n".join([MERGES_HEADER, *(" ".join(pair) for pair in sorted(ranks, key=ranks.__getitem__))]) + "\n"
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": config.text.context_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    size = config.vision.image_size
    image_processor = {  # fastclip's CLIPPreprocess: bicubic resize of the short side, centre crop, normalise
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # PIL's BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }
    return {
        "vocab.json": _json(vocab),
        "merges.txt": merges,
        "tokenizer_config.json": _json(tokenizer_config),
        "special_tokens_map.json": _json(specials),
        "preprocessor_config.json": _json(image_processor),
    }


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _write_text(path: Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
