"""Model configs: typed dataclasses read from JSON, and the registry of named configs in `configs/`.

A config file looks like

    {"embed_dim": 512, "act": "quick_gelu",
     "vision": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
     "text": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}

`vision.layers` decides the image tower: an int is a Vision Transformer, four ints are the modified
ResNet's stage depths; `vision.conv_widths` (a list of channel counts) instead makes a plain ConvNet,
a small tower for small images (the demo's), with no released weights. open_clip's spelling (`vision_cfg`,
`text_cfg`, `quick_gelu`) is read too, so its model_configs/*.json files work as they are (as long as they
only use the options fastclip has).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"
ACTIVATIONS = ("quick_gelu", "gelu")


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


def _check_positive_number(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}.{name} must be a positive finite number, got {value!r}")


@dataclass
class VisionConfig:
    image_size: int = 224  # input height = width in pixels
    layers: int | tuple[int, int, int, int] = 12  # int: ViT depth; 4 ints: ResNet blocks per stage
    width: int = 768  # ViT: token width; ResNet: stem width (stage widths are 1, 2, 4, 8 x 4 x width)
    patch_size: int | None = 32  # ViT only (None for a ResNet)
    head_width: int = 64  # channels per attention head (ViT blocks and the ResNet's attention pool)
    mlp_ratio: float = 4.0  # ViT MLP hidden width / token width
    # Set: a plain ConvNet tower instead (fastclip.model.convnet), one 3x3 conv-BN-ReLU-max-pool stage per
    # width; then `layers` and `width` are set from it (stages, last width) and patch_size is None.
    conv_widths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.conv_widths is not None:
            self._check_convnet()
            return
        for name in ("image_size", "width", "head_width"):
            _check_positive_int("vision", name, getattr(self, name))
        _check_positive_number("vision", "mlp_ratio", self.mlp_ratio)
        if isinstance(self.layers, (list, tuple)):
            self.layers = tuple(self.layers)
            if len(self.layers) != 4:
                raise ValueError(f"vision.layers must be an int (ViT) or 4 ints (ResNet), got {list(self.layers)}")
            for depth in self.layers:
                _check_positive_int("vision", "layers[i]", depth)
            self.patch_size = None  # a ResNet has none; open_clip's files say null
        else:
            _check_positive_int("vision", "layers", self.layers)
            _check_positive_int("vision", "patch_size", self.patch_size)
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"vision.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
                )
        if self.is_resnet and self.image_size % 32:
            raise ValueError(
                f"a ResNet's vision.image_size must be a multiple of 32 (its total stride), got {self.image_size}"
            )
        if self.embed_width % self.head_width:
            raise ValueError(f"vision width {self.embed_width} is not a multiple of head_width {self.head_width}")

    def _check_convnet(self) -> None:
        if not isinstance(self.conv_widths, (list, tuple)) or not self.conv_widths:
            raise ValueError(f"vision.conv_widths must be a non-empty list of ints, got {self.conv_widths!r}")
        self.conv_widths = tuple(self.conv_widths)
        for width in self.conv_widths:
            _check_positive_int("vision", "conv_widths[i]", width)
        _check_positive_int("vision", "image_size", self.image_size)
        if self.image_size < 2 ** len(self.conv_widths):
            raise ValueError(
                f"vision.image_size ({self.image_size}) is too small for {len(self.conv_widths)} stages "
                f"that each halve it (at least {2 ** len(self.conv_widths)})"
            )
        self.layers, self.width, self.patch_size = len(self.conv_widths), self.conv_widths[-1], None

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def is_convnet(self) -> bool:
        return self.conv_widths is not None

    @property
    def embed_width(self) -> int:
        """Width of the tokens that the attention layers see (ResNet: the last stage's channels)."""
        return self.width * 32 if self.is_resnet else self.width

    @property
    def heads(self) -> int:
        return self.embed_width // self.head_width

    @property
    def grid_size(self) -> int:
        """Side of the token grid: patches per side (ViT) or the final feature map side (ResNet, ConvNet)."""
        if self.is_convnet:
            return self.image_size // 2 ** len(self.conv_widths)
        return self.image_size // (32 if self.is_resnet else self.patch_size)


@dataclass
class TextConfig:
    context_length: int = 77  # maximum tokens per text (start + text + end)
    vocab_size: int = 49408  # CLIP's BPE vocabulary; the end-of-text token is the highest id
    width: int = 512  # token width
    heads: int = 8  # attention heads
    layers: int = 12  # transformer depth
    mlp_ratio: float = 4.0  # MLP hidden width / token width

    def __post_init__(self) -> None:
        for name in ("context_length", "vocab_size", "width", "heads", "layers"):
            _check_positive_int("text", name, getattr(self, name))
        _check_positive_number("text", "mlp_ratio", self.mlp_ratio)
        if self.width % self.heads:
            raise ValueError(f"text.width ({self.width}) must be a multiple of text.heads ({self.heads})")


@dataclass
class CLIPConfig:
    embed_dim: int = 512  # joint embedding size (output of both projections)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    act: str = "quick_gelu"  # MLP activation: "quick_gelu" (what OpenAI's weights need) or "gelu"
    init_logit_scale: float = math.log(1 / 0.07)  # initial log temperature, as in the paper

    def __post_init__(self) -> None:
        _check_positive_int("config", "embed_dim", self.embed_dim)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        for name, cls in (("vision", VisionConfig), ("text", TextConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(
                    f"config.{name} must be a {cls.__name__} or a dict of its fields, got {getattr(self, name)!r}"
                )
        if not isinstance(self.act, str) or self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        value = self.init_logit_scale
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"config.init_logit_scale must be a finite number (the log of the initial scale), got {value!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("layers", "conv_widths"):
            if isinstance(out["vision"][key], tuple):
                out["vision"][key] = list(out["vision"][key])
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        """From fastclip's JSON layout or open_clip's (`vision_cfg`, `text_cfg`, `quick_gelu`)."""
        data = dict(data)
        if "vision_cfg" in data or "text_cfg" in data:  # open_clip's model_configs/*.json
            data["vision"] = data.pop("vision_cfg", {})
            data["text"] = data.pop("text_cfg", {})
            data["act"] = "quick_gelu" if data.pop("quick_gelu", False) else "gelu"
        towers = {key: data[key] for key in ("vision", "text") if data.get(key) is not None}
        return cls(**_known(cls, data, "config"), **towers)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CLIPConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"model config {path} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"model config {path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def _known(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """The scalar fields of `cls` in `data`; unknown keys raise (a typo must not be silently ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {where} keys {unknown}; known: {sorted(names)}")
    sub = {"vision": VisionConfig, "text": TextConfig}
    for key, sub_cls in sub.items():
        if isinstance(data.get(key), dict):
            sub_names = {f.name for f in dataclasses.fields(sub_cls)}
            bad = sorted(set(data[key]) - sub_names)
            if bad:
                raise ValueError(f"unknown {key} config keys {bad}; known: {sorted(sub_names)}")
    return {k: v for k, v in data.items() if k not in sub}


# ------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, CLIPConfig] = {}  # configs added at run time with register_model_config()


def list_models() -> list[str]:
    """Names accepted by `create_model`: the bundled configs/*.json plus registered ones, sorted."""
    names = {p.stem for p in CONFIG_DIR.glob("*.json")} | set(_REGISTRY)
    return sorted(names, key=lambda n: [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", n)])


def register_model_config(name: str, config: CLIPConfig | dict[str, Any] | str | os.PathLike) -> None:
    """Make `name` available to `create_model` (a config, its dict form, or a JSON file)."""
    _REGISTRY[name] = _as_config(config)


def get_model_config(name: str) -> CLIPConfig:
    """A fresh copy of the named config (mutating it does not change the registry)."""
    if name in _REGISTRY:
        return CLIPConfig.from_dict(_REGISTRY[name].to_dict())
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        alias = name.replace("/", "-").replace("@336px", "-336")  # OpenAI's spelling: "ViT-B/32", "ViT-L/14@336px"
        if alias != name:
            return get_model_config(alias)
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    return CLIPConfig.from_json(path)


def _as_config(value: CLIPConfig | dict[str, Any] | str | os.PathLike) -> CLIPConfig:
    if isinstance(value, CLIPConfig):
        return CLIPConfig.from_dict(value.to_dict())
    if isinstance(value, dict):
        return CLIPConfig.from_dict(value)
    if isinstance(value, (str, os.PathLike)):
        return CLIPConfig.from_json(value)
    raise TypeError(f"expected a CLIPConfig, a dict or a JSON path, got {type(value).__name__}")


def resolve_config(name_or_config: CLIPConfig | dict[str, Any] | str | os.PathLike) -> CLIPConfig:
    """A registered name, a path to a JSON file, a dict or a CLIPConfig -> a fresh CLIPConfig."""
    if isinstance(name_or_config, str) and not name_or_config.endswith(".json"):
        return get_model_config(name_or_config)
    if isinstance(name_or_config, (str, os.PathLike)) and not Path(name_or_config).is_file():
        what = "is not a file" if Path(name_or_config).exists() else "does not exist"
        raise FileNotFoundError(f"model config file {name_or_config} {what}")
    return _as_config(name_or_config)
