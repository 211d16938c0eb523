"""Training logs: CSV files (metrics.csv per logged step, eval.csv per evaluation), optional TensorBoard,
and a PNG of the loss and zero-shot accuracy curves."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends rows to <folder>/<name>.csv (header from the first row; resumed runs append)."""

    def __init__(self, folder: Path, *, tensorboard: bool = False) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard") from error
            self.writer = SummaryWriter(str(folder / "tensorboard"))

    def write(self, name: str, row: dict[str, Any]) -> None:
        path = self.folder / f"{name}.csv"
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{name}/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def drop_rows_after(folder: Path, step: int, names: tuple[str, ...] = ("metrics", "eval")) -> None:
    """Forget the rows logged after `step` in <folder>/<name>.csv: a run resumed from step k re-logs the
    steps after k, and the rows of the abandoned attempt would make the curves zig-zag."""
    for name in names:
        path = folder / f"{name}.csv"
        if not path.is_file():
            continue
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames, list(reader)
        kept = [row for row in rows if _step_of(row) <= step]
        if fields is None or len(kept) == len(rows):
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        tmp.replace(path)  # atomic: a crash now leaves the old file, never half of one


def _step_of(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0  # not a row of ours: keep it


def read_csv(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def plot_curves(folder: Path, path: Path | None = None, *, loss_name: str = "contrastive loss") -> Path:
    """curves.png: training loss (left) and zero-shot top-1 accuracy of each eval split (right) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, evals = read_csv(folder / "metrics.csv"), read_csv(folder / "eval.csv")
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot([r["step"] for r in metrics], [r["loss"] for r in metrics])
    loss_ax.set(xlabel="step", ylabel=loss_name, title="training loss", yscale="log")
    for key in sorted({k for r in evals for k in r if k.endswith("top1")}):
        rows = [r for r in evals if key in r]
        acc_ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", label=key)
    chance = [r["chance"] for r in evals if "chance" in r]
    if chance:
        acc_ax.axhline(chance[-1], color="gray", linestyle="--", label="chance")
    acc_ax.set(xlabel="step", ylabel="accuracy", title="zero-shot accuracy", ylim=(0, 1))
    if evals:
        acc_ax.legend()
    fig.tight_layout()
    path = path or folder / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
