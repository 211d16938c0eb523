"""The losses as modules for training loops, single process or data parallel: `ClipLoss`, `SigLipLoss`,
`SupConLoss`.

Under `torch.distributed` each rank passes its own rows; the columns (and labels) of all ranks are
gathered, each rank computes its rows against every column with a fused op (O(N * D) memory, no N x N
matrix) and its share of the global loss, and gradients flow back to the ranks that own the features.
Every module returns the loss of the whole batch, identical on every rank, with its gradient scaled so
that DDP's averaging of parameter gradients yields the exact gradient of that loss.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from fastclip.backends import check_loss_backend
from fastclip.distributed import all_reduce_logsumexp, average_gradient, gather_rows, row_counts, world_size
from fastclip.functional import (
    contrastive_loss,
    contrastive_loss_from_lse,
    contrastive_lse,
    sigmoid_loss,
    sigmoid_loss_share,
)
from fastclip.ops._checks import check_labels, check_matched_pairs, check_unit_interval
from fastclip.ops.supcon_loss import as_temperature_scale, supcon_loss, supcon_loss_share, view_labels

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")  # open_clip's exchange strategies, one loss


def _check_open_clip_args(
    module: str, rank: int | None, world_size: int | None, use_horovod: bool, group: dist.ProcessGroup | None
) -> None:
    """open_clip's constructor arguments, so that switching a script to fastclip is a one-line change.

    fastclip always computes the exact loss of the global batch and its exact gradient, so open_clip's
    switches between equivalent computations (local_loss, gather_with_grad, cache_labels, dist_impl) change
    nothing here. The ranks come from torch.distributed; a rank or world size that disagrees is an error.
    """
    if use_horovod:
        raise NotImplementedError(f"{module}(use_horovod=True): fastclip runs on torch.distributed only (NCCL or gloo)")
    for name, value in (("rank", rank), ("world_size", world_size)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < (name == "world_size")
        ):
            raise ValueError(
                f"{module}: {name} must be a {'positive' if name == 'world_size' else 'non-negative'} int, "
                f"got {value!r}"
            )
    initialized = dist.is_available() and dist.is_initialized()
    actual = (dist.get_rank(group), dist.get_world_size(group)) if initialized else (0, 1)
    for name, given, real in (("world_size", world_size, actual[1]), ("rank", rank, actual[0])):
        if given is not None and given != real:
            where = "torch.distributed says" if initialized else "torch.distributed is not initialized, so it is"
            raise ValueError(
                f"{module}: {name}={given} but {where} {real}; fastclip takes the ranks from torch.distributed "
                "(call init_process_group before building the loss)"
            )


def _gather_with_labels(
    features: torch.Tensor, labels: torch.Tensor | None, group
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """Every rank's features [n_r, D] and labels [n_r] (if given), concatenated in rank order, and this
    rank's offset; one exchange of row counts serves both gathers."""
    counts = row_counts(features, group)
    gathered, offset = gather_rows(features, group, counts)
    return gathered, offset, None if labels is None else _gather_labels(labels, features, counts, group)


def _gather_labels(labels: torch.Tensor, features: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """Every rank's labels, one per row of its `features` (whose row `counts` are known), in rank order."""
    labels = check_labels("labels", labels, features.shape[0], features.device)
    return gather_rows(labels[:, None], group, counts)[0][:, 0]


def _global_value(share: torch.Tensor, ranks: int, group) -> torch.Tensor:
    """The sum of every rank's `share` as the value; ranks x d(share) as the gradient.

    Each rank's backward already collects every rank's dependence on its own features (through the
    gathers), and DDP then divides parameter gradients by the world size.
    """
    total = share.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    scaled = share * ranks
    return scaled - scaled.detach() + total


class ClipLoss(nn.Module):
    """CLIP's symmetric contrastive loss over the global batch, computed by the fused op.

    Single process: `contrastive_loss(image, text, logit_scale)`. Under `torch.distributed` (NCCL or
    gloo, one rank per process) the text features of all ranks are gathered, each rank computes its
    image rows against every text column, the column log-sum-exps are merged across ranks, and gradients
    flow back to the ranks that own the features (as open_clip's gather-with-grad does). With `labels`
    (this rank's [n] integer class ids) every pair of equal labels in the global batch is a positive.
    Ranks may hold different row counts.

    open_clip's constructor arguments are accepted (`local_loss`, `gather_with_grad`, `cache_labels`,
    `rank`, `world_size`, `use_horovod`): see `_check_open_clip_args` for what each means here.
    """

    def __init__(
        self,
        weight: float = 0.5,
        label_smoothing: float = 0.0,
        *,
        backend: str = "auto",
        group: dist.ProcessGroup | None = None,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        use_horovod: bool = False,
    ) -> None:
        super().__init__()
        _check_open_clip_args("ClipLoss", rank, world_size, use_horovod, group)
        check_unit_interval("weight", weight)
        check_unit_interval("label_smoothing", label_smoothing)
        check_loss_backend(backend)  # at construction, so a typo fails there, not at the first step
        self.weight, self.label_smoothing, self.backend, self.group = weight, label_smoothing, backend, group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        output_dict: bool = False,
        *,
        labels: torch.Tensor | None = None,
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
                labels=labels,
                backend=self.backend,
            )
        else:
            loss = self._distributed(image_features, text_features, logit_scale, labels, ranks)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor | float,
        labels: torch.Tensor | None,
        ranks: int,
    ) -> torch.Tensor:
        check_matched_pairs(image, text, " on this rank")
        all_text, offset, labels = _gather_with_labels(text, labels, self.group)
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
            labels=labels,
        )
        return _global_value(share, ranks, self.group)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, label_smoothing={self.label_smoothing}, backend={self.backend!r}"


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss over the global batch, with its learnable temperature and bias.

    Holds `logit_scale` (log-space, t' = log 10 at init) and `logit_bias` (b = -10 at init), as SigLIP
    does; pass `logit_scale` (the multiplier exp(t')) and `logit_bias` to `forward` to use a model's own
    instead. Under `torch.distributed` each rank's image rows meet the gathered text columns of every rank
    (O(N * D) memory per rank, no N x N matrix at any world size); the value is the global loss on every
    rank, and the module's own scale and bias get the same (exact) gradient on every rank. With `labels`
    (this rank's [n] class ids) every pair of equal labels is a positive.

    open_clip's constructor arguments are accepted (`cache_labels`, `rank`, `world_size`, `dist_impl`,
    `use_horovod`): see `_check_open_clip_args` for what each means here.
    """

    def __init__(
        self,
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float = -10.0,
        *,
        backend: str = "auto",
        group: dist.ProcessGroup | None = None,
        cache_labels: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        dist_impl: str | None = None,
        use_horovod: bool = False,
    ) -> None:
        super().__init__()
        _check_open_clip_args("SigLipLoss", rank, world_size, use_horovod, group)
        if dist_impl is not None and dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"SigLipLoss: dist_impl must be one of {SIGLIP_DIST_IMPLS} or None, got {dist_impl!r}")
        for name, value in (("init_logit_scale", init_logit_scale), ("init_logit_bias", init_logit_bias)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        check_loss_backend(backend)  # at construction, so a typo fails there, not at the first step
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.backend, self.group = backend, group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float | None = None,
        logit_bias: torch.Tensor | float | None = None,
        output_dict: bool = False,
        *,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Loss for this rank's matched rows, [n, D] each; scale and bias are the module's unless given."""
        if (logit_scale is None) != (logit_bias is None):
            raise ValueError("pass both logit_scale and logit_bias, or neither (to use the module's own)")
        ranks = world_size(self.group)
        if logit_scale is None:
            own_scale, own_bias = self.logit_scale, self.logit_bias
            if ranks > 1:  # not DDP parameters: every rank must see the summed gradient itself
                own_scale, own_bias = average_gradient(own_scale, self.group), average_gradient(own_bias, self.group)
            logit_scale, logit_bias = own_scale.exp(), own_bias
        if ranks == 1:
            loss = sigmoid_loss(
                image_features, text_features, logit_scale, logit_bias, labels=labels, backend=self.backend
            )
        else:
            check_matched_pairs(image_features, text_features, " on this rank")
            all_text, offset, labels = _gather_with_labels(text_features, labels, self.group)
            share = sigmoid_loss_share(
                image_features, all_text, logit_scale, logit_bias, offset=offset, labels=labels, backend=self.backend
            )
            loss = _global_value(share, ranks, self.group)
        return {"contrastive_loss": loss} if output_dict else loss  # open_clip's key for both losses

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class SupConLoss(nn.Module):
    """The supervised contrastive loss (SupCon, L_out), or SimCLR's NT-Xent without labels.

    `forward(features, labels=None)`: `features` [m, D] are this rank's rows (two augmented views
    stacked as [view1; view2] for NT-Xent), `labels` their [m] class ids. Under `torch.distributed` the
    features of all ranks are gathered and every rank's anchors meet the whole batch (NT-Xent pairs stay
    within each rank's [view1; view2]). Anchors without a positive are left out of the mean.
    """

    def __init__(
        self, temperature: float = 0.1, *, backend: str = "auto", group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        as_temperature_scale(temperature, torch.device("cpu"), torch.float32)  # validates
        check_loss_backend(backend)  # at construction, so a typo fails there, not at the first step
        self.temperature, self.backend, self.group = temperature, backend, group

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of the global batch of anchors; this rank's `features` [m, D] and `labels` [m]."""
        ranks = world_size(self.group)
        if ranks == 1:
            return supcon_loss(features, labels, temperature=self.temperature, backend=self.backend)
        counts = row_counts(features, self.group)
        all_features, offset = gather_rows(features, self.group, counts)
        if labels is None:  # each rank's own views; ids shifted by the rank's offset to stay unique
            labels = view_labels(features.shape[0], features.device) + offset
        all_labels = _gather_labels(labels, features, counts, self.group)
        scale = as_temperature_scale(self.temperature, features.device, features.dtype)
        row_lse, _ = contrastive_lse(features, all_features, scale, masked_diagonal=offset, backend=self.backend)
        share = supcon_loss_share(features, all_features, scale, row_lse, all_labels, offset=offset)
        return _global_value(share, ranks, self.group)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"
