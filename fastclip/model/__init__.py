"""CLIP models: the image towers (ViT, modified ResNet), the text transformer, configs and the factory."""

from fastclip.model.clip import CLIP
from fastclip.model.config import CLIPConfig, TextConfig, VisionConfig, get_model_config, list_models, register_model_config
from fastclip.model.factory import create_model, create_model_and_transforms

__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "create_model_and_transforms",
    "get_model_config",
    "list_models",
    "register_model_config",
]
