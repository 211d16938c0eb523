"""CLIP: an image tower (`visual`), the text tower and a learned temperature (`logit_scale`).

State-dict names are OpenAI's: `visual.*`, then the text tower's at the top level (`token_embedding`,
`positional_embedding`, `transformer.*`, `ln_final`, `text_projection`), and `logit_scale`.
"""

from __future__ import annotations

import torch
from torch import nn

from fastclip.backends import check_attention_backend
from fastclip.model.config import CLIPConfig
from fastclip.model.convnet import ConvNet
from fastclip.model.modified_resnet import AttentionPool2d, ModifiedResNet
from fastclip.model.text_transformer import TextTransformer
from fastclip.model.transformer import MultiheadSelfAttention, Transformer
from fastclip.model.vision_transformer import VisionTransformer

MAX_LOGIT_SCALE = 100.0  # s = exp(logit_scale) is clamped to this in `logits`, as in CLIP training


class CLIP(TextTransformer):
    def __init__(self, config: CLIPConfig, *, attn_backend: str = "auto") -> None:
        check_attention_backend(attn_backend)
        super().__init__(config.text, config.embed_dim, act=config.act, backend=attn_backend)
        self.config = config
        if config.vision.is_convnet:
            self.visual = ConvNet(config.vision, config.embed_dim)
        elif config.vision.is_resnet:
            self.visual = ModifiedResNet(config.vision, config.embed_dim, backend=attn_backend)
        else:
            self.visual = VisionTransformer(config.vision, config.embed_dim, act=config.act, backend=attn_backend)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images (B, 3, R, R), normalised as CLIP's preprocessing does -> (B, embed_dim), L2-normalised
        unless `normalize=False`."""
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
        x = self.visual(image.to(self.dtype))
        return nn.functional.normalize(x, dim=-1) if normalize else x

    # encode_text(text, normalize=True, trim=True) comes from TextTransformer.

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised image features (B, D), normalised text features (B', D), exp(logit_scale)), as
        open_clip's CLIP returns them for a contrastive loss (e.g. `fastclip.contrastive_loss`)."""
        return self.encode_image(image), self.encode_text(text), self.logit_scale.exp()

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image (B, B'), logits_per_text (B', B)) = s * cosine similarities, s <= 100."""
        image_features, text_features, scale = self(image, text)
        logits_per_image = scale.clamp(max=MAX_LOGIT_SCALE) * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    def set_attn_backend(self, backend: str) -> None:
        """Backend of every attention call: "auto" (Triton on CUDA, else PyTorch), "triton" or "torch"."""
        check_attention_backend(backend)
        for module in self.modules():
            if isinstance(module, (MultiheadSelfAttention, AttentionPool2d)):
                module.backend = backend

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block in the backward instead of storing its activations."""
        for module in self.modules():
            if isinstance(module, (Transformer, ModifiedResNet)):
                module.grad_checkpointing = enable
