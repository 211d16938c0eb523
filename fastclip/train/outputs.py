"""The output folder of a run: one run per folder, and --overwrite deletes only what fastclip wrote.

A new run (no resume) needs an empty folder, so two runs never mix their metrics.csv, eval.csv and
curves. `overwrite` starts clean by deleting fastclip's own files, by name, and nothing else: a user's
notes, data or configs in the folder stay. A config.json is fastclip's only when it reads as one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# What a run writes at the top of its output folder, and inside its sub-folders.
RUN_FILES = ("metrics.csv", "eval.csv", "curves.png", "model.safetensors", "config.json")
RUN_FOLDERS = {"checkpoints": ("step_*.pt", "latest.pt", ".*.tmp"), "tensorboard": ("events.out.tfevents.*",)}
CONFIG = "config.json"


def is_fastclip_config(path: Path) -> bool:
    """Whether `path` is a config.json that fastclip wrote: a JSON mapping of TrainConfig options."""
    from fastclip.train.config import TrainConfig

    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    return isinstance(values, dict) and "model" in values and set(values) <= known


def _in_use(folder: Path) -> list[str]:
    """The names in `folder` that make it hold a run (or someone's files); empty when a new run may start."""
    if not folder.is_dir():
        return []
    names = sorted(entry.name for entry in folder.iterdir())
    # A run that failed before its first log row or checkpoint left only its config: nothing to lose.
    if names == [CONFIG] and is_fastclip_config(folder / CONFIG):
        return []
    return names


def refuse_reused_folder(folder: Path, *, resume: str | None, overwrite: bool) -> None:
    """Raise ValueError when a run would mix with what `folder` holds; checks only, deletes nothing."""
    config = folder / CONFIG
    if config.exists() and not is_fastclip_config(config):
        raise ValueError(
            f"output folder {folder} holds a {CONFIG} that fastclip did not write, and a run writes its "
            f"own there: move that file, or choose another --output-dir"
        )
    if resume or overwrite:
        return
    names = _in_use(folder)
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(
            f"output folder {folder} is not empty ({shown}): continue its run with --resume latest, or "
            f"start over with --overwrite (deletes only the files fastclip writes there)"
        )


def clear_previous_run(folder: Path) -> list[Path]:
    """Delete fastclip's files from `folder` (and its sub-folders when they end up empty); returns them."""
    removed = [folder / name for name in RUN_FILES if (folder / name).is_file()]
    removed = [path for path in removed if path.name != CONFIG or is_fastclip_config(path)]
    for sub, patterns in RUN_FOLDERS.items():
        if (folder / sub).is_dir():
            removed += [path for pattern in patterns for path in (folder / sub).glob(pattern) if path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    for sub in RUN_FOLDERS:
        try:
            (folder / sub).rmdir()  # only when empty: a user's file in it keeps it
        except OSError:
            pass
    return removed


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """config.json: the options of the run (resume and overwrite are how it started, not what it is)."""
    values = {**config, "resume": None, "overwrite": False}
    (folder / CONFIG).write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
