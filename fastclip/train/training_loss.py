"""The loss as the training loop drives it: one interface for CLIP's softmax loss and SigLIP's sigmoid loss.

What differs between them lives here, not in the loop: which temperature the loss uses (the model's, or
its own learnable scale and bias), which parameters it trains and saves with the model, and what it adds
to the metrics.
"""

from __future__ import annotations

import torch
from torch import nn

from fastclip.loss import ClipLoss, SigLipLoss
from fastclip.train.config import TrainConfig


class TrainingLoss:
    """A loss that uses the model's temperature (CLIP): `loss(images, texts, model_scale, labels)`."""

    curve_label = "contrastive loss"  # the y axis of curves.png

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(
        self, images: torch.Tensor, texts: torch.Tensor, model_scale: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        return self.module(images, texts, model_scale, labels=labels)

    def parameters(self) -> list[nn.Parameter]:
        """The loss's own trainable parameters (none for CLIP)."""
        return list(self.module.parameters())

    @property
    def learned(self) -> nn.Module | None:
        """The module the optimizer and the checkpoints hold beside the model, or None."""
        return None

    def log_scale(self, model: nn.Module) -> nn.Parameter:
        """The log temperature that is trained, clamped after every step and logged."""
        return model.logit_scale

    def metrics(self) -> dict[str, float]:
        """What the loss adds to a metrics row."""
        return {}


class OwnScaleLoss(TrainingLoss):
    """A loss with its own learnable scale and bias (SigLIP): the model's temperature goes unused."""

    curve_label = "sigmoid loss"

    def __call__(
        self, images: torch.Tensor, texts: torch.Tensor, model_scale: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        return self.module(images, texts, labels=labels)

    @property
    def learned(self) -> nn.Module:
        return self.module

    def log_scale(self, model: nn.Module) -> nn.Parameter:
        return self.module.logit_scale

    def metrics(self) -> dict[str, float]:
        return {"logit_bias": self.module.logit_bias.item()}


def build_training_loss(config: TrainConfig, model: nn.Module, device: torch.device) -> TrainingLoss:
    """The loss `config.loss` names, for `model`."""
    if config.loss == "siglip":
        loss = SigLipLoss().to(device)  # SigLIP's init: scale log 10, bias -10
        model.logit_scale.requires_grad_(False)  # unused by the loss: frozen, so DDP sees no unused parameter
        return OwnScaleLoss(loss)
    return TrainingLoss(ClipLoss(weight=config.loss_weight, label_smoothing=config.label_smoothing))


def as_training_loss(loss: TrainingLoss | nn.Module) -> TrainingLoss:
    """`loss` itself when already a TrainingLoss; a bare loss module is adapted by whether it holds its own
    learnable temperature (SigLipLoss does)."""
    if isinstance(loss, TrainingLoss):
        return loss
    owns_scale = isinstance(getattr(loss, "logit_scale", None), nn.Parameter)
    return OwnScaleLoss(loss) if owns_scale else TrainingLoss(loss)
