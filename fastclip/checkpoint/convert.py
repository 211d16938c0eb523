"""From a stored state dict to fastclip's: unwrap, rename, infer the config, load strictly.

fastclip's parameter names are OpenAI's, and open_clip's `CLIP` uses the same ones, so converting is
mostly removing things: training wrappers (`{"state_dict": ...}`), the `module.` prefix of DDP (and the
`_orig_mod.` of torch.compile), and non-parameter entries (OpenAI's TorchScript `input_resolution`,
`context_length`, `vocab_size`; open_clip's `attn_mask` buffer). open_clip's `CustomTextCLIP` keeps the
text tower under `text.`; that prefix is removed when the tower is the standard CLIP text transformer.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from fastclip.checkpoint.files import CheckpointError
from fastclip.model.config import CLIPConfig, TextConfig, VisionConfig

NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
TEXT_TOWER_PREFIXES = (
    "token_embedding.",
    "positional_embedding",
    "transformer.resblocks.",
    "ln_final.",
    "text_projection",
)
_SHOW = 5  # keys listed in an error message


def first_keys(keys: list[str]) -> str:
    """The first few of `keys` for an error message, with their count when some are left out."""
    shown = ", ".join(keys[:_SHOW])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _SHOW else shown


def raise_key_problems(what: str, problems: dict[str, list[str]]) -> None:
    """A CheckpointError "`what`: label: keys; ..." for each non-empty list of keys, if any."""
    found = [f"{label}: {first_keys(keys)}" for label, keys in problems.items() if keys]
    if found:
        raise CheckpointError(f"{what}: " + "; ".join(found))


def to_fastclip_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A state dict in fastclip's (= OpenAI's) names from what a checkpoint file held."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # open_clip training checkpoints
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            f"{source} does not hold a state dict (a non-empty dict of tensors), got {type(obj).__name__}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source} is not a state dict: these entries are not named tensors: {first_keys(bad)}")
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):  # DDP, torch.compile (possibly both)
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    state = _from_custom_text(state, source)
    state = {k: v for k, v in state.items() if k not in NON_PARAMETER_KEYS}
    scale = state.get("logit_scale")
    if scale is not None and scale.dim() != 0 and scale.numel() == 1:  # some open_clip versions store shape [1]
        state["logit_scale"] = scale.reshape(())
    return state


def _from_custom_text(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """open_clip's CustomTextCLIP: `text.<name>` -> `<name>` when the text tower is CLIP's transformer."""
    text_keys = [k for k in state if k.startswith("text.")]
    if not text_keys or "token_embedding.weight" in state:
        return state
    renamed = {k[len("text.") :] for k in text_keys} - {"attn_mask"}
    foreign = sorted(k for k in renamed if not k.startswith(TEXT_TOWER_PREFIXES) or k.startswith("text_projection."))
    if foreign:
        raise CheckpointError(
            f"{source} has a text tower fastclip does not implement (open_clip CustomTextCLIP with e.g. a Hugging Face "
            f"or custom text model); unsupported keys: {first_keys(['text.' + k for k in foreign])}"
        )
    return {(k[len("text.") :] if k.startswith("text.") else k): v for k, v in state.items() if k != "text.attn_mask"}


def _indices(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many distinct `<prefix><i>.` blocks the state dict has."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def infer_config(state: dict[str, torch.Tensor], *, act: str = "quick_gelu", source: str = "checkpoint") -> CLIPConfig:
    """The config of a CLIP state dict (fastclip/OpenAI names), from its tensors' shapes, as OpenAI's
    `build_model` does. Heads cannot be seen in shapes: they are taken 64 channels wide, as in every
    OpenAI and most open_clip models. The activation cannot be seen either: QuickGELU, OpenAI's, by default.
    """
    vit = "visual.proj" in state
    needed = ["token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"]
    if vit:
        needed += ["visual.conv1.weight", "visual.positional_embedding"]
    else:
        needed += ["visual.attnpool.positional_embedding", "visual.layer1.0.conv1.weight"]
    absent = [k for k in needed if k not in state]
    if absent:
        raise CheckpointError(
            f"cannot infer a CLIP config from {source}: keys {first_keys(absent)} are missing "
            f"(is it a CLIP checkpoint? its first keys are {first_keys(list(state))})"
        )
    try:
        if vit:
            width, _, patch, _ = state["visual.conv1.weight"].shape
            grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            layers = _indices(state, "visual.transformer.resblocks.")
            mlp = state.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
            vision = VisionConfig(
                image_size=patch * grid,
                layers=layers,
                width=width,
                patch_size=patch,
                mlp_ratio=mlp.shape[0] / width if mlp is not None else 4.0,
            )
        else:
            tokens = state["visual.attnpool.positional_embedding"].shape[0]
            grid = round((tokens - 1) ** 0.5)
            if grid**2 + 1 != tokens:
                raise CheckpointError(f"visual.attnpool.positional_embedding has {tokens} rows, not a square grid + 1")
            layers = tuple(_indices(state, f"visual.layer{i}.") for i in range(1, 5))
            vision = VisionConfig(
                image_size=grid * 32, layers=layers, width=state["visual.layer1.0.conv1.weight"].shape[0]
            )
        text_width = state["ln_final.weight"].shape[0]
        mlp = state.get("transformer.resblocks.0.mlp.c_fc.weight")
        text = TextConfig(
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            width=text_width,
            heads=max(text_width // 64, 1),
            layers=_indices(state, "transformer.resblocks."),
            mlp_ratio=mlp.shape[0] / text_width if mlp is not None else 4.0,
        )
        return CLIPConfig(embed_dim=state["text_projection"].shape[1], vision=vision, text=text, act=act)
    except (ValueError, TypeError, IndexError) as error:
        raise CheckpointError(
            f"cannot infer a CLIP config from {source} ({error}); pass the model config explicitly"
        ) from error


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy `state` into `model`, all or nothing: missing, unexpected or misshapen keys raise first."""
    expected = model.state_dict()
    # BatchNorm's step counter is bookkeeping, not a weight: take the model's when a file lacks it.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    # load_state_dict would silently round integer tensors into float parameters: a foreign file
    wrong_dtype = [
        f"{k} {v.dtype} in the file, {expected[k].dtype} in the model"
        for k, v in state.items()
        if k in expected and expected[k].is_floating_point() and not v.is_floating_point()
    ]
    raise_key_problems(
        f"{source} does not fit the model",
        {
            "missing keys": missing,
            "unexpected keys": unexpected,
            "shape mismatches": mismatched,
            "non-floating tensors for floating parameters": wrong_dtype,
        },
    )
    # NaN/inf weights (e.g. saved after a diverged step) would make every feature NaN, and a zero-shot
    # argmax over NaN silently picks class 0: refuse them here, naming the tensors.
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise CheckpointError(f"{source} holds NaN or infinite values in {first_keys(non_finite)}")
    full = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state}
    model.load_state_dict(full, strict=True)
