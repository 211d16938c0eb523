"""`ClipLoss`: the contrastive loss as a module for training loops, single process or data parallel."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fastclip.distributed import all_reduce_logsumexp, gather_rows, world_size
from fastclip.ops import contrastive_loss, contrastive_loss_from_lse, contrastive_lse
from fastclip.ops._checks import check_unit_interval
from fastclip.ops.contrastive_lse import BACKENDS


class ClipLoss(nn.Module):
    """CLIP's symmetric contrastive loss over the global batch, computed by the fused op.

    Single process: `contrastive_loss(image, text, logit_scale)`. Under `torch.distributed` (NCCL or
    gloo, one rank per process) each rank passes its own rows; the text features of all ranks are
    gathered, each rank computes its image rows against every text column with the fused op (O(N * D)
    memory, no N x N matrix), the column log-sum-exps are merged across ranks, and gradients flow back
    to the ranks that own the features. The returned value is the loss of the whole batch, identical on
    every rank; its gradient is scaled so that DDP's averaging of parameter gradients yields the exact
    gradient of that loss (as open_clip's gather-with-grad does). Ranks may hold different row counts.
    """

    def __init__(
        self,
        weight: float = 0.5,
        label_smoothing: float = 0.0,
        *,
        backend: str = "auto",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        check_unit_interval("weight", weight)
        check_unit_interval("label_smoothing", label_smoothing)
        if backend not in BACKENDS:  # checked here too, so a typo fails at construction, not at the first step
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.weight, self.label_smoothing, self.backend, self.group = weight, label_smoothing, backend, group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Loss for this rank's matched rows (`image_features[i]` with `text_features[i]`), [n, D] each."""
        ranks = world_size(self.group)
        if ranks == 1:
            loss = contrastive_loss(
                image_features,
                text_features,
                logit_scale,
                weight=self.weight,
                label_smoothing=self.label_smoothing,
                backend=self.backend,
            )
        else:
            loss = self._distributed(image_features, text_features, logit_scale, ranks)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(
        self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float, ranks: int
    ) -> torch.Tensor:
        if image.shape[0] != text.shape[0]:
            raise ValueError(
                f"image_features and text_features must have the same number of rows on each rank, got "
                f"{image.shape[0]} and {text.shape[0]}"
            )
        all_text, offset = gather_rows(text, self.group)
        row_lse, partial_col_lse = contrastive_lse(image, all_text, logit_scale, backend=self.backend)
        col_lse = all_reduce_logsumexp(partial_col_lse, self.group)
        share = contrastive_loss_from_lse(
            image,
            all_text,
            logit_scale,
            row_lse,
            col_lse,
            offset=offset,
            weight=self.weight,
            label_smoothing=self.label_smoothing,
        )
        total = share.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        # Value: the global loss. Gradient: ranks x d(share), because each rank's backward already
        # collects every rank's dependence on its features and DDP then divides by the world size.
        scaled = share * ranks
        return scaled - scaled.detach() + total

    def extra_repr(self) -> str:
        return f"weight={self.weight}, label_smoothing={self.label_smoothing}, backend={self.backend!r}"
