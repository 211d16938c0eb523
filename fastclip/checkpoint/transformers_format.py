"""Hugging Face transformers' CLIP layout <-> fastclip's: the config.json fields and the tensor names.

transformers' `CLIPModel` is OpenAI's ViT CLIP under other names: `text_model.*` and `vision_model.*`
towers whose attention has separate q/k/v projections (fastclip, like OpenAI, has one fused
`in_proj_weight` with rows q, k, v), `nn.Linear` projections (weights stored transposed against
OpenAI's `x @ proj` matrices) and `pre_layrnorm` (sic) / `post_layernorm` / `final_layer_norm`. One
table of name pairs (`_pairs`) serves both directions. No I/O here: see `transformers_folder.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fastclip.checkpoint.convert import first_keys, raise_key_problems
from fastclip.checkpoint.files import CheckpointError
from fastclip.model.config import ACTIVATIONS, CLIPConfig, TextConfig, VisionConfig

MODEL_TYPE = "clip"  # config.json's model_type for transformers' CLIPModel
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which every fastclip LayerNorm uses
# transformers' defaults for fields a config.json may omit (CLIPTextConfig / CLIPVisionConfig / CLIPConfig,
# the same in transformers 4.x and 5.x).
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": LAYER_NORM_EPS,
    "eos_token_id": 49407,
}
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": LAYER_NORM_EPS,
}
CLIP_DEFAULTS: dict[str, Any] = {"projection_dim": 512, "logit_scale_init_value": 2.6592}
# transformers' pooling when eos_token_id is 2: the argmax of the ids, as OpenAI's (and fastclip's).
LEGACY_EOS_TOKEN_ID = 2
# Buffers that older transformers versions saved with the weights; they hold arange(n), not weights.
IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

_TOP = {  # transformers name -> fastclip name, copied as they are
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_BLOCK = {  # per residual block, for .weight and .bias
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV = ("q", "k", "v")  # the order of the rows of fastclip's in_proj_weight


@dataclass(frozen=True)
class _Pair:
    hf: str  # transformers' name
    ours: str  # fastclip's name
    how: str  # "copy", "transpose", or "q"/"k"/"v": that third of a fused in_proj tensor


def _pairs(config: CLIPConfig) -> list[_Pair]:
    """Every tensor of a ViT CLIP with `config`, named both ways."""
    pairs = [_Pair(hf, ours, "copy") for hf, ours in _TOP.items()]
    pairs += [_Pair(hf, ours, "transpose") for hf, ours in _TRANSPOSED.items()]
    towers = (
        ("text_model.encoder.layers.", "transformer.resblocks.", config.text.layers),
        ("vision_model.encoder.layers.", "visual.transformer.resblocks.", config.vision.layers),
    )
    for hf_prefix, our_prefix, layers in towers:
        for i in range(layers):
            hf, ours = f"{hf_prefix}{i}.", f"{our_prefix}{i}."
            for param in ("weight", "bias"):
                pairs += [_Pair(f"{hf}{a}.{param}", f"{ours}{b}.{param}", "copy") for a, b in _BLOCK.items()]
                pairs += [_Pair(f"{hf}self_attn.{p}_proj.{param}", f"{ours}attn.in_proj_{param}", p) for p in _QKV]
    return pairs


def is_transformers_state_dict(obj: Any) -> bool:
    """Whether `obj` holds transformers-named CLIP tensors (`text_model.*`, `vision_model.*`)."""
    return isinstance(obj, dict) and any(
        isinstance(k, str) and k.startswith(("text_model.", "vision_model.")) for k in obj
    )


def from_transformers_state_dict(
    state: dict[str, torch.Tensor], config: CLIPConfig, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """fastclip's state dict from a transformers `CLIPModel` one; missing or foreign keys raise, by name."""
    pairs = _pairs(config)
    names = {p.hf for p in pairs}
    missing = [p.hf for p in pairs if p.hf not in state]
    unexpected = [k for k in state if k not in names and k not in IGNORED_KEYS]
    raise_key_problems(
        f"{source} does not fit its config.json as a transformers CLIPModel",
        {
            "missing keys": missing,
            "keys fastclip's CLIP has no place for": unexpected,
        },
    )
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for p in pairs:
        tensor = state[p.hf]
        if p.how == "copy":
            out[p.ours] = tensor
        elif p.how == "transpose":  # nn.Linear's (out, in) weight -> OpenAI's (in, out) matrix
            if tensor.dim() != 2:
                raise CheckpointError(f"{source}: {p.hf} has shape {tuple(tensor.shape)}, not a matrix")
            out[p.ours] = tensor.t()
        else:
            fused.setdefault(p.ours, {})[p.how] = tensor
    for name, parts in fused.items():
        shapes = {tuple(t.shape) for t in parts.values()}
        if len(shapes) != 1:  # the model's shape check (load_into) would only see a failed concatenation
            raise CheckpointError(
                f"{source}: the q, k and v projections of {name} have different shapes {sorted(shapes)}"
            )
        out[name] = torch.cat([parts[p] for p in _QKV])
    if out["logit_scale"].dim() != 0 and out["logit_scale"].numel() == 1:
        out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def to_transformers_state_dict(state: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """A transformers `CLIPModel` state dict from fastclip's: contiguous CPU copies sharing no storage
    (safetensors refuses tensors that share memory, as q/k/v views of one in_proj tensor would)."""
    pairs = _pairs(config)
    unmapped = sorted(set(state) - {p.ours for p in pairs})
    if unmapped:  # a fastclip feature transformers' CLIPModel lacks: refuse rather than drop weights
        raise CheckpointError(f"these tensors have no place in a transformers CLIPModel: {first_keys(unmapped)}")
    out = {}
    for p in pairs:
        tensor = state[p.ours].detach()
        if p.how == "transpose":
            tensor = tensor.t()
        elif p.how in _QKV:
            tensor = tensor.chunk(3)[_QKV.index(p.how)]
        out[p.hf] = tensor.to("cpu").clone(memory_format=torch.contiguous_format)
    return out


# ------------------------------------------------------------------------------------------------ config


def config_from_transformers(data: dict[str, Any], source: str = "config.json") -> CLIPConfig:
    """fastclip's config for a transformers `CLIPConfig` dict (a config.json); what fastclip's CLIP
    cannot compute the same way raises CheckpointError naming the field."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{source} must hold a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type != MODEL_TYPE and not (model_type is None and "text_config" in data and "vision_config" in data):
        hint = (
            " (it looks like fastclip's own config: pass the weights file next to it, e.g. model.safetensors)"
            if {"vision", "text"} <= set(data)
            else ""
        )
        raise CheckpointError(
            f"{source} is not a transformers CLIP config: model_type is {model_type!r}, fastclip loads "
            f"{MODEL_TYPE!r} (CLIPModel) checkpoints only{hint}"
        )
    text = _tower(data, "text", TEXT_DEFAULTS)
    vision = _tower(data, "vision", VISION_DEFAULTS)
    top = {**CLIP_DEFAULTS, **{k: data[k] for k in CLIP_DEFAULTS if data.get(k) is not None}}
    _check_supported(text, vision, source)
    image_size = _square(vision["image_size"], "vision_config.image_size", source)
    patch_size = _square(vision["patch_size"], "vision_config.patch_size", source)
    try:
        config = CLIPConfig(
            embed_dim=top["projection_dim"],
            vision=VisionConfig(
                image_size=image_size,
                layers=vision["num_hidden_layers"],
                width=vision["hidden_size"],
                patch_size=patch_size,
                head_width=_head_width(vision, "vision_config", source),
                mlp_ratio=_mlp_ratio(vision, "vision_config", source),
            ),
            text=TextConfig(
                context_length=text["max_position_embeddings"],
                vocab_size=text["vocab_size"],
                width=text["hidden_size"],
                heads=text["num_attention_heads"],
                layers=text["num_hidden_layers"],
                mlp_ratio=_mlp_ratio(text, "text_config", source),
            ),
            act=text["hidden_act"],
            init_logit_scale=float(top["logit_scale_init_value"]),
        )
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{source}: fastclip cannot represent this CLIP config ({error})") from error
    return config


def _check_supported(text: dict[str, Any], vision: dict[str, Any], source: str) -> None:
    """Raise, naming the field, for what fastclip's CLIP would compute differently from transformers'."""

    def unsupported(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{source}: {field} is {why}")

    towers = (("text_config", text), ("vision_config", vision))
    for tower, cfg in towers:
        if cfg["hidden_act"] not in ACTIVATIONS:
            raise unsupported(
                f"{tower}.hidden_act",
                f"{cfg['hidden_act']!r}; fastclip's CLIP supports {' and '.join(map(repr, ACTIVATIONS))}",
            )
    if text["hidden_act"] != vision["hidden_act"]:
        raise unsupported(
            "text_config.hidden_act",
            f"{text['hidden_act']!r} but vision_config.hidden_act is "
            f"{vision['hidden_act']!r}; fastclip's CLIP uses one activation in both towers",
        )
    for tower, cfg in towers:
        eps = cfg["layer_norm_eps"]
        if not isinstance(eps, (int, float)) or not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
            raise unsupported(f"{tower}.layer_norm_eps", f"{eps!r}; fastclip's LayerNorms use {LAYER_NORM_EPS}")
    if vision["num_channels"] != 3:
        raise unsupported(
            "vision_config.num_channels", f"{vision['num_channels']!r}; fastclip's CLIP takes RGB images (3)"
        )
    eos = text["eos_token_id"]
    highest = text["vocab_size"] - 1 if isinstance(text["vocab_size"], int) else None
    if eos not in (LEGACY_EOS_TOKEN_ID, highest):
        # fastclip pools each text at its highest id (OpenAI's rule); transformers pools at the first
        # eos_token_id, which is the same token only when eos is the highest id of the vocabulary
        raise unsupported(
            "text_config.eos_token_id",
            f"{eos!r}, not the highest id of the vocabulary ({highest}); "
            f"fastclip pools each text at its highest id, as OpenAI's CLIP",
        )


def config_to_transformers(config: CLIPConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A transformers `CLIPConfig` dict (config.json) for a fastclip ViT CLIP with `config`."""
    if config.vision.is_resnet:
        raise CheckpointError(
            "transformers' CLIPModel has no ResNet image tower; "
            f"this model's vision.layers is {list(config.vision.layers)}"
        )
    if config.vision.is_convnet:
        raise CheckpointError(
            "transformers' CLIPModel has no ConvNet image tower; "
            f"this model's vision.conv_widths is {list(config.vision.conv_widths)}"
        )
    text, vision = config.text, config.vision
    eot = text.vocab_size - 1  # fastclip's end-of-text token is the highest id
    return {
        "architectures": ["CLIPModel"],
        "model_type": MODEL_TYPE,
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.init_logit_scale,
        # "torch_dtype": what transformers 4.x reads, and 5.x still accepts (it renamed it "dtype")
        "torch_dtype": str(dtype).removeprefix("torch."),
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio),  # as fastclip's MLP computes its width
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": config.act,
            "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": config.embed_dim,
            # pooling at the first eos_token_id = at the highest id, as fastclip; padding with it too,
            # as OpenAI's tokenizer files on the Hub do
            "bos_token_id": max(eot - 1, 0),
            "eos_token_id": eot,
            "pad_token_id": eot,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "num_channels": 3,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": config.act,
            "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": config.embed_dim,
        },
    }


def _tower(data: dict[str, Any], tower: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """One tower's fields over transformers' defaults. A `<tower>_config_dict` (configs saved by early
    transformers versions) takes precedence over `<tower>_config`, as in transformers' CLIPConfig."""
    given = data.get(f"{tower}_config_dict") or data.get(f"{tower}_config") or {}
    if not isinstance(given, dict):
        raise CheckpointError(f"{tower}_config must be a JSON object, got {type(given).__name__}")
    return {**defaults, **{k: v for k, v in given.items() if k in defaults and v is not None}}


def _square(value: Any, field: str, source: str) -> Any:
    """An int, or the int of a [n, n] pair (transformers accepts both for image and patch sizes)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(
                f"{source}: {field} is {list(value)}; fastclip's CLIP needs square images and patches"
            )
        return value[0]
    return value


def _head_width(cfg: dict[str, Any], tower: str, source: str) -> int:
    width, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if not isinstance(width, int) or not isinstance(heads, int) or heads <= 0 or width % heads:
        raise CheckpointError(f"{source}: {tower}.num_attention_heads ({heads!r}) must divide hidden_size ({width!r})")
    return width // heads


def _mlp_ratio(cfg: dict[str, Any], tower: str, source: str) -> float:
    width, hidden = cfg["hidden_size"], cfg["intermediate_size"]
    if not isinstance(width, int) or not isinstance(hidden, int) or width <= 0 or hidden <= 0:
        raise CheckpointError(
            f"{source}: {tower}.hidden_size and intermediate_size must be positive ints, got {width!r} and {hidden!r}"
        )
    ratio = hidden / width
    if int(width * ratio) != hidden:  # fastclip sizes its MLP as int(width * mlp_ratio)
        raise CheckpointError(
            f"{source}: {tower}.intermediate_size {hidden} is not representable as a ratio of {width}"
        )
    return ratio
