"""A plain convolutional image tower, for small images and short runs.

Per stage a 3x3 convolution (no bias), BatchNorm, ReLU and a 2x2 max-pool, the first stage at the full
input resolution; then a global average pool and a linear projection to the joint embedding. It is no
CLIP release architecture (no released weights use it): it is the tower that learns the shapes of
`fastclip demo` within its few hundred CPU steps, where a ViT or the modified ResNet of the same cost
learn colour at once but shape only slowly (both downsample 4-8x before their first wide layer, and
the ResNet's residual branches start at zero, which AdamW grows only by about lr per step).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from fastclip.model.config import VisionConfig
from fastclip.model.vision_transformer import _check_image


class ConvNet(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        if not cfg.is_convnet:
            raise ValueError("ConvNet needs vision.conv_widths (the channels of each stage)")
        self.image_size = cfg.image_size
        stages, channels = [], 3
        for width in cfg.conv_widths:
            stages.append(
                nn.Sequential(
                    OrderedDict(
                        [
                            ("conv", nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False)),
                            ("bn", nn.BatchNorm2d(width)),
                            ("relu", nn.ReLU(inplace=True)),
                            ("pool", nn.MaxPool2d(2)),
                        ]
                    )
                )
            )
            channels = width
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(channels, embed_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, R, R) -> features (B, embed_dim), not normalised."""
        _check_image(image, self.image_size)
        x = self.stages(image)  # (B, C, R / 2**stages, R / 2**stages)
        return self.proj(x.mean(dim=(2, 3)))
