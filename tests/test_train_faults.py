"""Faults during training: a run SIGKILLed at a random moment resumes to the uninterrupted run's results
with no corrupted file; an unwritable or full output folder fails before training; a non-finite loss
stops the run naming the step, or skips that update."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import fastclip.train.loop as loop
from fastclip.train import TrainConfig, train
from fastclip.train.state import load_training_state

STEPS = 40
RUN = [
    "--model",
    "tiny-ViT",
    "--steps",
    str(STEPS),
    "--save-every",
    "4",
    "--log-every",
    "1",
    "--batch-size",
    "16",
    "--workers",
    "0",
    "--eval-samples",
    "20",
    "--synthetic-samples",
    "80",
    "--device",
    "cpu",
]
# One thread: the runs being compared must do the same floating-point work in the same order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def launch(output_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "fastclip", "train", *RUN, "--output-dir", str(output_dir), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(process: subprocess.Popen) -> None:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]


def logged_losses(output_dir: Path) -> dict[int, float]:
    """Step -> loss from metrics.csv; a resumed run re-logs the steps after its checkpoint: keep the last."""
    with open(output_dir / "metrics.csv", newline="") as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    finish(launch(output_dir))
    return logged_losses(output_dir)


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_a_random_moment_then_resume(tmp_path: Path, uninterrupted: dict[int, float], seed: int) -> None:
    delay = random.Random(seed).uniform(0.0, 1.0)  # after the first checkpoint: mid-step or mid-save
    process = launch(tmp_path)
    first = tmp_path / "checkpoints" / "step_00000004.pt"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    assert process.poll() is None, "the run ended before it could be killed: make it longer"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    killed_at = max(logged_losses(tmp_path))

    for path in sorted((tmp_path / "checkpoints").glob("*.pt")):  # every checkpoint left behind is whole
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "progress"} <= set(state), path

    finish(launch(tmp_path, "--resume", "latest"))
    resumed = logged_losses(tmp_path)
    assert killed_at < STEPS
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, STEPS + 1)), f"killed after step {killed_at}"
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), f"step {step} (killed after step {killed_at})"
    assert not list((tmp_path / "checkpoints").glob(".*.tmp")), "a temporary file of a killed save was left"


def test_unwritable_output_folder_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="not writable"):
        train(
            TrainConfig(model="tiny-ViT", steps=1, batch_size=8, workers=0, output_dir=str(blocker / "run")),
            show_progress=False,
        )
    if os.geteuid() != 0:  # root ignores permission bits, so a read-only folder only stops other users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            train(
                TrainConfig(model="tiny-ViT", steps=1, batch_size=8, workers=0, output_dir=str(locked)),
                show_progress=False,
            )


def test_full_disk_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("fastclip.train.state.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    started = []
    monkeypatch.setattr(loop, "_train_step", lambda *args, **kwargs: started.append(1) or 1.0)
    with pytest.raises(ValueError, match="MiB free"):
        train(
            TrainConfig(model="tiny-ViT", steps=1, batch_size=8, workers=0, output_dir=str(tmp_path)),
            show_progress=False,
        )
    assert not started


def _nan_at(steps_to_poison: set[int], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the loss non-finite on the given (1-based) calls of the training step; returns the call log."""
    real_step, calls = loop._train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return float("nan") if len(calls) in steps_to_poison else loss

    monkeypatch.setattr(loop, "_train_step", step)
    return calls


def test_nonfinite_loss_stops_naming_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at({3}, monkeypatch)
    with pytest.raises(FloatingPointError, match="at step 3"):
        train(
            TrainConfig(model="tiny-ViT", steps=5, batch_size=8, workers=0, eval_samples=20, output_dir=str(tmp_path)),
            show_progress=False,
        )


def test_nonfinite_loss_skip_drops_only_that_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _nan_at({2, 3}, monkeypatch)
    config = TrainConfig(
        model="tiny-ViT",
        steps=4,
        batch_size=8,
        workers=0,
        eval_samples=20,
        log_every=1,
        nonfinite="skip",
        output_dir=str(tmp_path),
    )
    result = train(config, show_progress=False)
    assert len(calls) == 6 and len(result.losses) == 4  # 4 updates made, 2 dropped
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and int(rows[-1]["nonfinite_skipped"]) == 2
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert state["progress"]["nonfinite_skipped"] == 2 and state["progress"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nonfinite_skip_gives_up_when_every_loss_is_bad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at(set(range(1, 100)), monkeypatch)
    with pytest.raises(FloatingPointError, match="nonfinite=skip"):
        train(
            TrainConfig(
                model="tiny-ViT",
                steps=2,
                batch_size=8,
                workers=0,
                nonfinite="skip",
                synthetic_samples=400,
                output_dir=str(tmp_path),
            ),
            show_progress=False,
        )


def test_stale_temporary_files_are_removed_on_start(tmp_path: Path) -> None:
    options = dict(model="tiny-ViT", batch_size=8, workers=0, eval_samples=20, output_dir=str(tmp_path))
    train(TrainConfig(**options, steps=1), show_progress=False)
    folder = tmp_path / "checkpoints"
    stale = folder / ".step_00000002.pt.0123abcd.tmp"  # as a run killed while saving step 2 leaves it
    stale.write_bytes(b"half a checkpoint")
    train(TrainConfig(**options, steps=2, resume="latest"), show_progress=False)
    assert not stale.exists()
    progress, _ = load_training_state(folder / "latest.pt", **_fresh_state())
    assert progress.step == 2


def _fresh_state() -> dict:
    from fastclip.model.factory import create_model
    from fastclip.train.optim import make_optimizer

    model = create_model("tiny-ViT")
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    return dict(
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
    )
