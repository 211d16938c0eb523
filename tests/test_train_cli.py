"""`fastclip train` and `fastclip demo` as a user meets them: one run per output folder (--overwrite deletes
only fastclip's files), Ctrl-C and SIGTERM saving a checkpoint and printing the command that resumes it,
only the newest checkpoints kept, no zero-shot numbers for data they say nothing about, unreadable files
logged once each, unreadable data stopping the run with one error, and every command-line mistake as one
line with exit status 2. Every run is a few steps of the tiny model."""

from __future__ import annotations

import csv
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastclip.train.loop as loop
from fastclip.cli import main as cli_main
from fastclip.commands._interrupted import resume_command
from fastclip.train import TrainConfig, TrainingInterrupted, train
from fastclip.train.state import prune_checkpoints

TINY = [
    "--model",
    "tiny-ViT",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--eval-samples",
    "20",
    "--synthetic-samples",
    "80",
    "--log-every",
    "1",
    "--device",
    "cpu",
]
FAST = dict(model="tiny-ViT", batch_size=8, workers=0, eval_samples=20, synthetic_samples=80, log_every=1, device="cpu")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
INTERRUPTED_LINE = re.compile(
    r"^fastclip (train|demo): interrupted after step (\d+); checkpoint saved to (\S+); "
    r"resume with: (.+ --resume latest)$"
)


def logged_steps(output_dir: Path) -> list[int]:
    with open(output_dir / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def wait_for(condition, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll `condition` until it holds (or the process ended, or `timeout` seconds passed)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline and (process is None or process.poll() is None):
        time.sleep(0.05)


def step_files(output_dir: Path, folder: str = "checkpoints") -> list[str]:
    return sorted(p.name for p in (output_dir / folder).glob("step_*.pt") if p.name != "step_mine.pt")


# --- one run per output folder ------------------------------------------------------------------------


def test_rerun_into_a_used_folder_is_refused_naming_the_ways_out(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli_main(["train", *TINY, "--steps", "2", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert cli_main(["train", *TINY, "--steps", "2", "--output-dir", str(out)]) == 2
    (line,) = stderr_lines(capsys)
    assert line.startswith("fastclip train: error: output folder") and str(out) in line
    assert "--resume latest" in line and "--overwrite" in line
    assert logged_steps(out) == [1, 2]  # the first run's files are untouched
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")  # anything in the folder counts, not only a run
    assert cli_main(["train", *TINY, "--steps", "1", "--output-dir", str(users)]) == 2
    assert "notes.txt" in stderr_lines(capsys)[0]


def test_overwrite_starts_clean_and_keeps_the_users_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(TrainConfig(**FAST, steps=3, save_every=1, tensorboard=False, output_dir=str(out)), show_progress=False)
    mine = {"notes.txt": "my notes", "checkpoints/mine.pt": "my file", "run.yaml": "steps: 3\n"}
    for name, text in mine.items():
        (out / name).write_text(text)
    result = train(TrainConfig(**FAST, steps=2, overwrite=True, output_dir=str(out)), show_progress=False)
    assert logged_steps(out) == [1, 2] and [row["step"] for row in result.evals] == [2]
    with open(out / "eval.csv", newline="") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [2]
    assert step_files(out) == ["step_00000002.pt"]  # the first run's step_1..3 are gone
    assert all((out / name).read_text() == text for name, text in mine.items())


def test_a_config_json_fastclip_did_not_write_is_never_overwritten(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text('{"experiment": "mine"}')
    for extra in ([], ["--overwrite"]):
        assert cli_main(["train", *TINY, "--steps", "1", "--output-dir", str(tmp_path), *extra]) == 2
        assert "config.json that fastclip did not write" in stderr_lines(capsys)[0]
    assert (tmp_path / "config.json").read_text() == '{"experiment": "mine"}'


def test_a_run_that_failed_before_its_first_step_does_not_block_the_next(tmp_path: Path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(loop, "_train_step", fail)
    with pytest.raises(RuntimeError):
        train(TrainConfig(**FAST, steps=1, output_dir=str(tmp_path)), show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    monkeypatch.undo()
    assert len(train(TrainConfig(**FAST, steps=1, output_dir=str(tmp_path)), show_progress=False).losses) == 1


# --- checkpoints kept -----------------------------------------------------------------------------------


def test_keep_checkpoints_keeps_the_newest_and_resume_finds_them(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(TrainConfig(**FAST, steps=5, save_every=1, output_dir=str(out)), show_progress=False)
    assert step_files(out) == ["step_00000004.pt", "step_00000005.pt"]  # the default keeps 2
    assert (out / "checkpoints" / "latest.pt").is_file() and (out / "model.safetensors").is_file()
    (out / "checkpoints" / "latest.pt").unlink()  # resume latest then takes the newest step file
    resumed = train(
        TrainConfig(**FAST, steps=6, save_every=1, resume="latest", output_dir=str(out)), show_progress=False
    )
    assert len(resumed.losses) == 1 and logged_steps(out) == [1, 2, 3, 4, 5, 6]
    assert step_files(out) == ["step_00000005.pt", "step_00000006.pt"]


@pytest.mark.parametrize("keep, left", [(0, [2, 9, 10, 11]), (1, [9]), (3, [9, 10, 11])])
def test_pruning_keeps_the_newest_and_the_one_just_written(tmp_path: Path, keep: int, left: list[int]) -> None:
    for step in (2, 9, 10, 11):
        (tmp_path / f"step_{step:08d}.pt").write_bytes(b"x")
    (tmp_path / "latest.pt").write_bytes(b"x")
    (tmp_path / "step_mine.pt").write_bytes(b"x")  # not a name fastclip writes
    prune_checkpoints(tmp_path, keep, newest=tmp_path / "step_00000009.pt")  # a resumed run wrote step 9 again
    assert step_files(tmp_path, folder=".") == sorted(f"step_{k:08d}.pt" for k in left)
    assert (tmp_path / "latest.pt").exists() and (tmp_path / "step_mine.pt").exists()


# --- Ctrl-C and SIGTERM ---------------------------------------------------------------------------------


def test_ctrl_c_saves_and_the_printed_command_resumes(tmp_path: Path) -> None:
    """A real SIGINT to the whole process group, as a terminal's Ctrl-C sends it, DataLoader workers included."""
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "fastclip",
        "train",
        *TINY,
        "--workers",
        "2",
        "--steps",
        "60",
        "--output-dir",
        str(out),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True
    )
    try:
        wait_for(lambda: (out / "metrics.csv").is_file() and len(logged_steps(out)) >= 3, 240, process)
        assert process.poll() is None, "the run ended before it could be interrupted: make it longer"
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    match = INTERRUPTED_LINE.match(lines[0])
    assert match, lines[0]
    step, checkpoint = int(match.group(2)), Path(match.group(3))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["progress"]["step"] == step and 3 <= step < 60 and logged_steps(out)[-1] == step

    resumed = subprocess.run(shlex.split(match.group(4)), capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(out) == list(range(1, 61))  # continued at step + 1: nothing re-done, nothing missing
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert int(rows[step]["samples_seen"]) == (step + 1) * 8


def _signal_at_call(monkeypatch: pytest.MonkeyPatch, call: int, signum: int) -> None:
    """Deliver `signum` to this process during the `call`-th training step (1-based)."""
    real_step, calls = loop._train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", step)


def test_more_signals_during_the_save_do_not_break_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    _signal_at_call(monkeypatch, 2, signal.SIGINT)
    real_save = loop.save_training_state

    def save_while_signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the second and third signals arrive mid-save: they must wait
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(loop, "save_training_state", save_while_signalled)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(TrainConfig(**FAST, steps=10, output_dir=str(tmp_path)), show_progress=False)
    assert stopped.value.step == 2 and stopped.value.checkpoint == tmp_path / "checkpoints" / "step_00000002.pt"
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    assert state["progress"]["step"] == 2 and {"model", "optimizer", "scheduler"} <= set(state)
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back


def test_sigterm_stops_the_demo_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    _signal_at_call(monkeypatch, 3, signal.SIGTERM)
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--steps",
        "50",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--eval-samples",
        "4",
        "--output-dir",
        str(out),
    ]
    assert cli_main(argv) == 130
    (line,) = stderr_lines(capsys)
    match = INTERRUPTED_LINE.match(line)
    assert match and match.group(1) == "demo" and match.group(2) == "3", line
    assert shlex.split(match.group(4))[-8:] == [*argv[1:], "--resume", "latest"][-8:]
    assert step_files(out) == ["step_00000003.pt"]


def test_a_third_signal_quits_at_once_without_saving(tmp_path: Path, monkeypatch) -> None:
    real_step, calls = loop._train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # a step that hangs, and a user who presses Ctrl-C three times
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", step)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(TrainConfig(**FAST, steps=10, output_dir=str(tmp_path)), show_progress=False)
    assert not isinstance(stopped.value, TrainingInterrupted) and len(calls) == 2
    assert not (tmp_path / "checkpoints").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_before_training_starts_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "create_model", interrupted)  # Ctrl-C while a large model is being built
    assert cli_main(["train", *TINY, "--steps", "1", "--output-dir", str(tmp_path)]) == 130
    assert stderr_lines(capsys) == ["fastclip train: interrupted"]


def test_demo_checkpoints_at_every_evaluation() -> None:
    import argparse

    from fastclip.commands import demo

    commands = argparse.ArgumentParser().add_subparsers()
    demo.add_parser(commands)
    config = demo.demo_config(commands.choices["demo"].parse_args([]))
    assert config.save_every == config.eval_every == 120 and config.keep_checkpoints == 2
    # the recipe that learns shapes within the demo's steps: the ConvNet tower, class-aware positives, no
    # augmentation of the fresh images
    assert config.model == "demo-CNN" and config.use_labels and config.crop_scale == 1.0 and config.jitter == 0.0
    # every shape also in the training-only colours (the held-out pairs still never occur: test_datasets.py)
    assert config.synthetic_extra_colours


def test_resume_command_drops_overwrite_and_an_earlier_resume() -> None:
    argv = ["train", "--steps", "9", "--overwrite", "--resume", "old.pt", "--resume=x", "--output-dir", "a b"]
    command = shlex.split(resume_command(argv))
    assert command[-7:] == ["train", "--steps", "9", "--output-dir", "a b", "--resume", "latest"]
    assert "--overwrite" not in command and "old.pt" not in command
    assert shlex.split(resume_command(["train", "--config", "run.yaml"], overwrite=True))[-5:] == [
        "--config",
        "run.yaml",
        "--no-overwrite",
        "--resume",
        "latest",
    ]


# --- what is evaluated ----------------------------------------------------------------------------------


def write_pairs(folder: Path, count: int, *, bad: dict[int, str] | None = None) -> Path:
    """pairs.csv with `count` small images; rows in `bad` point at a missing file or hold broken bytes."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["filepath,title"]
    for i in range(count):
        kind = (bad or {}).get(i)
        if kind == "corrupt":
            (folder / f"{i}.png").write_bytes(b"not a png")
        elif kind != "missing":
            Image.new("RGB", (20, 20), (i * 12 % 256, 90, 200)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,picture {i}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def test_a_csv_run_evaluates_only_its_eval_images(tmp_path: Path, capfd) -> None:
    pairs = write_pairs(tmp_path / "data", 16)
    options = dict(FAST, dataset="csv", train_data=str(pairs), steps=2, eval_every=1)
    result = train(TrainConfig(**options, output_dir=str(tmp_path / "plain")), show_progress=False)
    assert result.evals == [] and not (tmp_path / "plain" / "eval.csv").exists()
    err = capfd.readouterr().err
    assert err.count("no zero-shot evaluation") == 1 and "--eval-images" in err
    from PIL import Image

    for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (tmp_path / "eval" / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), colour).save(tmp_path / "eval" / name / "0.png")
    result = train(
        TrainConfig(**options, eval_images=str(tmp_path / "eval"), output_dir=str(tmp_path / "folder")),
        show_progress=False,
    )
    assert [row["step"] for row in result.evals] == [1, 2] and "folder_top1" in result.evals[-1]
    assert "no zero-shot evaluation" not in capfd.readouterr().err


# --- unreadable data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_files_are_logged_once_each(tmp_path: Path, caplog, workers: int) -> None:
    pairs = write_pairs(tmp_path / "data", 8, bad={3: "missing", 5: "corrupt"})
    config = TrainConfig(
        **dict(FAST, batch_size=4, workers=workers),
        dataset="csv",
        train_data=str(pairs),
        steps=6,
        output_dir=str(tmp_path / "run"),
    )
    with caplog.at_level(logging.WARNING):
        result = train(config, show_progress=False)  # 6 steps of 4 = 3 epochs of 8
    warnings = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert any("'3.png' not found" in w for w in warnings) and any("5.png" in w for w in warnings)
    assert result.skipped >= 6  # both files, in each of 3+ epochs: counted every time, logged once


def test_mostly_unreadable_data_stops_naming_the_first_failure(tmp_path: Path) -> None:
    pairs = write_pairs(tmp_path / "data", 8, bad={i: "missing" for i in range(8) if i % 4})  # 6 of 8 missing
    options = dict(FAST, batch_size=4, dataset="csv", train_data=str(pairs), steps=3)  # past the first epoch's end
    with pytest.raises(
        ValueError,
        match=r"of the first \d+ training samples could not be read .*max_skip_fraction=0\.5"
        r".*the first: pairs\.csv item \d+: image '\d+\.png' not found.*looked up in",
    ):
        train(TrainConfig(**options, output_dir=str(tmp_path / "stopped")), show_progress=False)
    result = train(
        TrainConfig(**options, max_skip_fraction=1.0, output_dir=str(tmp_path / "allowed")), show_progress=False
    )
    assert len(result.losses) == 3


def test_a_csv_whose_images_are_all_missing_fails_fast(tmp_path: Path) -> None:
    """It used to retry the skipped samples forever; now one error, and exit status 2, in seconds."""
    (tmp_path / "pairs.csv").write_text(
        "filepath\ttitle\n" + "".join(f"imgs/{i}.jpg\tpicture {i}\n" for i in range(200))
    )
    command = [
        sys.executable,
        "-m",
        "fastclip",
        "train",
        "--model",
        "tiny-ViT",
        "--dataset",
        "csv",
        "--train-data",
        str(tmp_path / "pairs.csv"),
        "--batch-size",
        "16",
        "--workers",
        "2",
        "--steps",
        "5",
        "--device",
        "cpu",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fastclip train: error: none of the first") and "Traceback" not in done.stderr
    assert "image 'imgs/" in last and "the CSV file's folder" in last
    assert "skipping sample" not in done.stderr  # one error, not a page of warnings before it


# --- command-line mistakes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: command"),
        (["zero-shot", "--checkpoint", "m.pt", "--images", "x", "--device", "cuda:99"], "device 'cuda:99'"),
        (["zero-shot", "--images", "x"], "the following arguments are required: --checkpoint"),
        (["demo", "--steps", "many"], "argument --steps: invalid int value"),
        (["eval", "--checkpoint", "m.pt", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["train", "--keep-checkpoints", "-1"], "keep_checkpoints must be >= 0"),
        (["train", "--resume", "latest", "--overwrite"], "resume and overwrite contradict"),
        (["train", "--max-skip-fraction", "2"], "max_skip_fraction must lie in"),
        (["train", "--csv-separator", ";;"], "separator must be one character"),
    ],
)
def test_every_command_line_mistake_is_one_line_with_status_2(argv: list[str], message: str, capsys) -> None:
    try:
        code = cli_main(argv)
    except SystemExit as exit_:  # argparse's errors exit from inside parse_args
        code = exit_.code
    lines = stderr_lines(capsys)
    assert code == 2 and len(lines) == 1, lines
    assert re.match(r"fastclip( [a-z-]+)?: error: ", lines[0]) and message in lines[0], lines[0]
