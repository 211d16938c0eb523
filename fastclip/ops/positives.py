"""Label-aware positives in O(N * D): sums over every pair with equal labels, no N x N mask.

Each positive term the losses need is linear in the similarities, so for rows i of a batch whose columns
carry labels, sum_{j: label_j = label_i} <x_i, y_j> = <x_i, C[label_i]> with C the per-class sums of the
columns. Class ids come from a sort (static shapes, so torch.compile traces it without a graph break).
"""

from __future__ import annotations

import torch


def class_ids(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N], counts [N]): ids in [0, N) equal exactly where the labels are equal; counts[id] is the
    number of labels with that id (0 for unused ids)."""
    sorted_labels, order = labels.sort()
    starts = torch.ones_like(sorted_labels, dtype=torch.long)
    starts[1:] = (sorted_labels[1:] != sorted_labels[:-1]).long()
    starts[0] = 0
    ids = torch.empty_like(order).scatter_(0, order, starts.cumsum(0))
    counts = torch.zeros_like(ids).index_add_(0, ids, torch.ones_like(ids))
    return ids, counts


def class_sums(features: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, D] per-class sums of the rows of `features` (in `dtype`), indexed by class id."""
    sums = features.new_zeros((ids.shape[0], features.shape[1]), dtype=dtype)
    return sums.index_add(0, ids, features.to(dtype))


def same_label_dots(
    rows: torch.Tensor, columns: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """[n]: sum over columns j with col_ids[j] == row_ids[i] of <rows_i, columns_j>, in `dtype`."""
    return (rows.to(dtype) * class_sums(columns, col_ids, dtype)[row_ids]).sum(1)
