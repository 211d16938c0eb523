"""Few-shot linear probes: k labelled images per class, several random draws, against zero-shot.

The CLIP paper (figure 6) fits a logistic-regression probe on k = 1, 2, 4, 8, 16 examples per class
and compares it with zero-shot CLIP, which uses no example at all. Each (k, seed) run draws k training
examples of every class without replacement, fits a probe (`linear_probe`, with its C search when every
class has two or more examples; with one example per class there is nothing to validate on, so
`fallback_C` is used) and scores it on the whole test set.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastclip.evaluate.linear_probing import LinearProbeConfig, _as_features, _as_targets, linear_probe

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = (0, 1, 2)


def sample_k_shot(targets: torch.Tensor, k: int, seed: int, *, classes: Sequence[str] | None = None) -> torch.Tensor:
    """Sorted indices of exactly `k` examples of every class in `targets`, drawn without replacement.

    A class with fewer than `k` examples raises ValueError naming it (by `classes[c]` when given).
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (shots per class) must be an int >= 1, got {k!r}")
    targets = torch.as_tensor(targets)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in targets.unique().tolist():
        members = (targets == c).nonzero().flatten()
        if len(members) < k:
            name = repr(classes[c]) if classes is not None and c < len(classes) else str(c)
            raise ValueError(
                f"k={k} shots per class is more than class {name} has ({len(members)} training "
                f"images): lower the largest k or add images"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


@dataclasses.dataclass
class FewShotResult:
    shots: list[int]
    seeds: list[int]
    runs: list[dict[str, float]]  # one per (k, seed): {"k", "seed", "num_train", "C", "top1", "mean_per_class"}
    zero_shot: float | None = None  # the zero-shot top-1 accuracy to compare with, when known

    def summary(self, metric: str = "top1") -> dict[int, dict[str, float]]:
        """{k: {"mean", "std"}} of `metric` over the seeds (std is the sample std; 0 for one seed)."""
        out = {}
        for k in self.shots:
            values = [run[metric] for run in self.runs if run["k"] == k]
            out[k] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "shots": self.shots,
            "seeds": self.seeds,
            "zero_shot": self.zero_shot,
            "summary": {str(k): v for k, v in self.summary().items()},
            "runs": self.runs,
        }


def few_shot(
    train_features: Any,
    train_targets: Any,
    test_features: Any,
    test_targets: Any,
    *,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    classes: Sequence[str] | None = None,
    zero_shot: float | None = None,
    fallback_C: float = 1.0,
    config: LinearProbeConfig | None = None,
    **options: Any,
) -> FewShotResult:
    """Few-shot probe accuracy for each k in `shots` and each seed in `seeds`.

    Each probe is fitted as `config` (a LinearProbeConfig) says, its fields replaced by keyword `options`
    (C, C_grid, solver, device, ...); the seed of each draw also seeds its validation split. C None
    searches C per run where possible (k >= 2), else uses `fallback_C` (a good choice is the C the full
    linear probe picked); a number fixes C for every run. Every class of the training set must have at
    least max(shots) examples.
    """
    config = LinearProbeConfig.of(config, options)
    if not shots or any(not isinstance(k, int) or k < 1 for k in shots):
        raise ValueError(f"shots must be ints >= 1, got {list(shots)!r}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    train_x = _as_features(train_features, "train_features")
    train_y = _as_targets(train_targets, train_x.shape[0], "train_targets")
    _check_shots(train_y, max(shots), classes)
    num_classes = config.num_classes or int(max(train_y.max(), torch.as_tensor(test_targets).max())) + 1
    runs = []
    for k in sorted(set(shots)):
        for seed in seeds:
            indices = sample_k_shot(train_y, k, seed, classes=classes)
            run_C = config.C if config.C is not None else (None if k >= 2 else fallback_C)
            run = dataclasses.replace(config, C=run_C, num_classes=num_classes, seed=seed)
            result = linear_probe(train_x[indices], train_y[indices], test_features, test_targets, config=run)
            runs.append(
                {
                    "k": k,
                    "seed": seed,
                    "num_train": len(indices),
                    "C": result.C,
                    "top1": result.top1,
                    "mean_per_class": result.mean_per_class,
                }
            )
    return FewShotResult(shots=sorted(set(shots)), seeds=list(seeds), runs=runs, zero_shot=zero_shot)


def _check_shots(train_y: torch.Tensor, k: int, classes: Sequence[str] | None) -> None:
    """A ValueError naming the smallest class when it has fewer than `k` examples."""
    counts = torch.bincount(train_y)
    present = counts > 0
    smallest = int(counts[present].min())
    if k > smallest:
        c = int(torch.nonzero(present & (counts == smallest))[0])
        name = repr(classes[c]) if classes is not None and c < len(classes) else str(c)
        raise ValueError(
            f"k={k} shots per class is more than class {name} has ({smallest} training images): "
            f"lower the largest k or add images"
        )


def plot_few_shot(
    result: FewShotResult,
    path: str | os.PathLike,
    *,
    linear_probe_top1: float | None = None,
    title: str | None = None,
    metric: str = "top1",
) -> Path:
    """Save a PNG of accuracy against shots per class (the paper's figure 6); returns its path.

    The x axis is the shot count, evenly spaced; mean ± std over seeds is a line with a band; zero-shot
    sits at "0" as a star with a dashed reference line, the probe on all training data as a dotted line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = result.summary(metric)
    positions = list(range(1, len(result.shots) + 1))  # 0 is zero-shot's column
    means = [100 * summary[k]["mean"] for k in result.shots]
    stds = [100 * summary[k]["std"] for k in result.shots]

    figure = Figure(figsize=(5.2, 3.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.plot(positions, means, "o-", color="tab:blue", label=f"linear probe, k shots ({len(result.seeds)} seeds)")
    axes.fill_between(
        positions,
        [m - s for m, s in zip(means, stds, strict=True)],
        [m + s for m, s in zip(means, stds, strict=True)],
        color="tab:blue",
        alpha=0.2,
        linewidth=0,
    )
    if result.zero_shot is not None:
        axes.axhline(100 * result.zero_shot, color="tab:purple", linestyle="--", linewidth=1)
        axes.plot([0], [100 * result.zero_shot], "*", color="tab:purple", markersize=14, label="zero-shot")
    if linear_probe_top1 is not None:
        axes.axhline(
            100 * linear_probe_top1,
            color="tab:green",
            linestyle=":",
            linewidth=1.5,
            label="linear probe, all training data",
        )
    axes.set_xticks([0, *positions], ["0", *[str(k) for k in result.shots]])
    axes.set_xlim(-0.4, positions[-1] + 0.4)
    axes.set_xlabel("labelled training examples per class")
    axes.set_ylabel("top-1 accuracy (%)" if metric == "top1" else "mean per-class accuracy (%)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
