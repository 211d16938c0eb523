"""The Vision Transformer image tower (Dosovitskiy et al. 2020) as CLIP uses it.

patches (conv, no bias) -> [class token; patches] + positional embedding -> ln_pre -> transformer
-> ln_post on the class token -> projection to the joint embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from fastclip.model.config import VisionConfig
from fastclip.model.transformer import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, *, act: str = "quick_gelu", backend: str = "auto") -> None:
        super().__init__()
        if cfg.is_resnet:
            raise ValueError(f"VisionTransformer needs an int vision.layers, got {list(cfg.layers)} (a ResNet config)")
        self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
        width, scale = cfg.width, cfg.width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid_size**2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(
            width, cfg.layers, cfg.heads, mlp_ratio=cfg.mlp_ratio, act=act, causal=False, backend=backend
        )
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))
        self.transformer.init_weights()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, R, R) -> features (B, embed_dim), not normalised."""
        _check_image(image, self.image_size)
        x = self.conv1(image)  # (B, W, G, G)
        x = x.flatten(2).transpose(1, 2)  # (B, G*G, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + G*G, W)
        x = self.transformer(self.ln_pre(x))  # (B, 1 + G*G, W)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, embed_dim)


def _check_image(image: torch.Tensor, size: int) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() != 4 or image.shape[1] != 3 or tuple(image.shape[2:]) != (size, size):
        raise ValueError(
            f"image must have shape [batch, 3, {size}, {size}] (this model's image_size is {size}), "
            f"got {tuple(image.shape)}"
        )
    if image.shape[0] == 0:
        raise ValueError("image batch is empty")
