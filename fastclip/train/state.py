"""Training checkpoints: everything an exact resume needs, written atomically.

A checkpoint holds the model's weights (without any DDP wrapper), the optimizer, scheduler and
GradScaler states, the step, the data position (epoch, batches consumed in it), the RNG states and the
config, and with loss=siglip the loss module's learnable scale and bias ("loss"). It is written to a
temporary file in the same folder and moved into place with os.replace, so an interrupted save leaves the
previous checkpoint intact, never a half-written file.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LATEST = "latest.pt"
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")  # save_training_state's names: step_<k>.pt


@dataclass
class Progress:
    """Where training stands: optimizer steps done, and the data position they consumed."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    samples_seen: int = 0  # pairs, over all ranks
    skipped: int = 0  # unreadable samples dropped so far (this rank)
    nonfinite_skipped: int = 0  # updates dropped because the loss was not finite (nonfinite="skip")


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _replace_with_link(source: Path, target: Path) -> None:
    """Atomically make `target` the same file as `source` (a hard link; a copy where links are unsupported)."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def check_output_folder(folder: Path, needed_bytes: int) -> None:
    """Fail before training, not at its first save: `folder` must be writable and hold `needed_bytes`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output folder {folder} is not writable: {error}") from error
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ValueError(
            f"output folder {folder} has {free / 2**20:.0f} MiB free; checkpoints and the final model need about "
            f"{needed_bytes / 2**20:.0f} MiB"
        )


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of saves that never finished (the process was killed mid-write)."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def weight_bytes(model) -> int:
    """Size of the model's state dict."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def checkpoint_bytes(model, optimizer) -> int:
    """Size of one training checkpoint: the weights plus the optimizer's per-parameter state (AdamW: 2x)."""
    weights = weight_bytes(model)
    per_parameter = sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    return weights + 2 * per_parameter


def save_training_state(
    folder: Path, *, model, optimizer, scheduler, scaler, progress: Progress, config: dict, loss=None
) -> Path:
    """Write checkpoints/step_<k>.pt and point checkpoints/latest.pt at the same file; `loss`: a loss
    module with learnable parameters (SigLipLoss), saved with them."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": vars(progress).copy(),
        "config": config,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    if loss is not None:
        state["loss"] = loss.state_dict()
    path = folder / f"step_{progress.step:08d}.pt"
    atomic_save(state, path)
    _replace_with_link(path, folder / LATEST)
    return path


def step_checkpoints(folder: Path) -> list[Path]:
    """The step_<k>.pt files in `folder`, oldest step first."""
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir() if (match := STEP_FILE.match(path.name))]
    return [path for _, path in sorted(found)]


def prune_checkpoints(folder: Path, keep: int, newest: Path) -> list[Path]:
    """Delete all step_<k>.pt files but `newest` (just written) and the next newest ones, `keep` in all
    (keep 0: delete none); latest.pt is a link of its own, so it never dangles. Returns what was deleted."""
    if keep <= 0:
        return []
    older = [path for path in step_checkpoints(folder) if path != newest]
    doomed = older[: max(0, len(older) - (keep - 1))]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def saved_checkpoints_at_peak(keep: int, saves: int) -> int:
    """How many step checkpoints exist at once during a run of `saves` saves keeping `keep` (0: all): the
    kept ones plus the one being written."""
    return saves if keep <= 0 else min(keep + 1, saves)


def resolve_resume(resume: str, folder: Path) -> Path:
    """The checkpoint to resume: a path, or for "latest" `folder`'s latest.pt, else its newest step_<k>.pt."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume checkpoint {path} does not exist")
        return path
    if (folder / LATEST).is_file():
        return folder / LATEST
    steps = step_checkpoints(folder)
    if not steps:
        raise FileNotFoundError(f"resume checkpoint {folder / LATEST} does not exist (and {folder} holds no step_*.pt)")
    return steps[-1]


def load_training_state(path: Path, *, model, optimizer, scheduler, scaler, loss=None) -> tuple[Progress, dict]:
    """Restore every state in place (with `loss`, that module's parameters too); returns (progress, the
    config the checkpoint was written with)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which and why
        raise ValueError(f"cannot read training checkpoint {path}: {error}") from error
    missing = {"model", "optimizer", "scheduler", "scaler", "progress", "config"} - set(state)
    if missing:
        raise ValueError(f"{path} is not a fastclip training checkpoint (missing {sorted(missing)})")
    if (loss is None) != ("loss" not in state):
        written = (state["config"] or {}).get("loss", "siglip" if "loss" in state else "clip")
        wanted = "clip" if loss is None else "siglip"
        raise ValueError(
            f"{path} was written with loss={written!r}, not {wanted!r}: resume with the loss it was trained with"
        )
    if loss is not None:
        loss.load_state_dict(state["loss"])
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return Progress(**state["progress"]), state["config"]
