"""CLIP's modified ResNet image tower.

Differences from torchvision's ResNet (as in OpenAI's CLIP): a 3-convolution stem with an average pool
instead of one convolution and a max pool; anti-aliased downsampling (an average pool before every
strided step, the convolutions themselves have stride 1); and attention pooling (one query, the mean
token, over the final feature map) instead of global average pooling.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastclip.backends import check_attention_backend
from fastclip.model.config import VisionConfig
from fastclip.model.vision_transformer import _check_image
from fastclip.ops.attention import attention


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()  # anti-aliased stride
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride > 1 or inplanes != out:
            # "-1" holds no parameters, so the state-dict names stay downsample.0 / downsample.1
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                        ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                        ("1", nn.BatchNorm2d(out)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean token over [mean; feature map] + positional embedding."""

    def __init__(self, grid: int, width: int, heads: int, output_dim: int, backend: str = "auto") -> None:
        super().__init__()
        self.heads, self.backend = heads, check_attention_backend(backend)
        self.positional_embedding = nn.Parameter(torch.randn(grid**2 + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, G, G) -> (B, output_dim)."""
        batch, width = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, G*G, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1 + G*G, C)
        x = x + self.positional_embedding.to(x.dtype)
        dh = width // self.heads
        q = (
            self.q_proj(x[:, :1]).view(batch, 1, self.heads, dh).transpose(1, 2)
        )  # (B, H, 1, Dh): only the mean token asks
        k = self.k_proj(x).view(batch, -1, self.heads, dh).transpose(1, 2)  # (B, H, 1 + G*G, Dh)
        v = self.v_proj(x).view(batch, -1, self.heads, dh).transpose(1, 2)  # (B, H, 1 + G*G, Dh)
        out = attention(q, k, v, backend=self.backend)  # (B, H, 1, Dh)
        return self.c_proj(out.transpose(1, 2).reshape(batch, width))  # (B, output_dim)


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, *, backend: str = "auto") -> None:
        super().__init__()
        if not cfg.is_resnet:
            raise ValueError(f"ModifiedResNet needs 4 vision.layers, got {cfg.layers!r} (a ViT config)")
        self.image_size, width = cfg.image_size, cfg.width
        self.grad_checkpointing = False
        # the 3-layer stem: /2 by the first conv, /2 by the average pool
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, depth in enumerate(cfg.layers):  # stages 2..4 halve the resolution: /32 in all
            planes = width * 2**i
            blocks = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            blocks += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, depth)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes * Bottleneck.expansion
        self.attnpool = AttentionPool2d(cfg.grid_size, cfg.embed_width, cfg.heads, embed_dim, backend)
        self._init_weights()

    def _init_weights(self) -> None:
        """OpenAI's init: attention pool projections std width^-0.5, each block's last BN scale 0."""
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for block in self.blocks():
            nn.init.zeros_(block.bn3.weight)  # every residual block starts as the identity

    def blocks(self) -> list[Bottleneck]:
        return [block for i in range(1, 5) for block in getattr(self, f"layer{i}")]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, R, R) -> features (B, embed_dim), not normalised."""
        _check_image(image, self.image_size)
        x = F.relu(self.bn1(self.conv1(image)))  # (B, w/2, R/2, R/2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))  # (B, w, R/4, R/4)
        for block in self.blocks():  # -> (B, 32w, R/32, R/32)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = _checkpoint_with_batchnorm(block, x)
            else:
                x = block(x)
        return self.attnpool(x)


def _checkpoint_with_batchnorm(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gradient-checkpoint `block`, keeping BatchNorm running statistics exact.

    The backward re-runs the block; in training mode that would update the running mean/var a second
    time. The re-run restores them, so a checkpointed step leaves the same statistics as a plain one.
    """
    calls = 0

    def run(inp: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1 or not block.training:
            return block(inp)
        norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
        try:
            return block(inp)
        finally:  # also when the re-run is stopped early (checkpoint's early stop raises inside it)
            with torch.no_grad():
                for m, (mean, var, count) in zip(norms, saved):
                    m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)

    return checkpoint(run, x, use_reentrant=False)
