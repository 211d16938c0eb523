"""CLIP models: the image towers (ViT, modified ResNet), the text transformer, configs and the factory."""

from fastclip.model.clip import CLIP
from fastclip.model.config import (
    CLIPConfig,
    TextConfig,
    VisionConfig,
    get_model_config,
    list_models,
    register_model_config,
)

_FACTORY = ("create_model", "create_model_and_transforms", "load_checkpoint")


def __getattr__(name: str):
    # The factory builds models from checkpoints, and fastclip.checkpoint reads configs from this package:
    # loading the factory on first use keeps `import fastclip.checkpoint` from needing it half-built.
    if name in _FACTORY:
        from fastclip.model import factory

        return getattr(factory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "create_model_and_transforms",
    "get_model_config",
    "list_models",
    "load_checkpoint",
    "register_model_config",
]
