"""The training loop and its commands: configuration, optimizer groups and schedule, learning on the
synthetic data, exact resume, exact gradient accumulation, atomic checkpoints, a frozen image tower,
corrupt training data, torchrun with gloo, and `fastclip demo` / `fastclip train` end to end."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastclip.cli import main as cli_main
from fastclip.data.pairs import PairBatch
from fastclip.model.factory import create_model
from fastclip.train import TrainConfig, train
from fastclip.train.config import add_config_arguments, config_from_args
from fastclip.train.loop import _train_step
from fastclip.train.optim import cosine_with_warmup, decays, make_optimizer
from fastclip.train.state import Progress, load_training_state, save_training_state

# Small, quick runs for the mechanics; the learning test uses demo-ViT (the earlier demo model), which learns within
# 80 steps.
FAST = dict(model="tiny-ViT", batch_size=32, workers=0, lr=1e-3, warmup_steps=5, eval_samples=40, log_every=1)


def parse_train_flags(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


# --- configuration ----------------------------------------------------------------------------------


def test_config_precedence_flags_over_file_over_defaults(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("steps: 50\nlr: 1e-3\nbatch_size: 16\nlock_image: true\n")  # YAML 1.1 reads 1e-3 as a string
    config = parse_train_flags(["--config", str(path), "--batch-size", "8", "--no-lock-image"])
    assert (config.steps, config.lr, config.batch_size, config.lock_image) == (50, 1e-3, 8, False)
    assert config.weight_decay == TrainConfig().weight_decay
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"precision": "bf16", "accum_steps": 4}))
    config = parse_train_flags(["--config", str(json_path), "--steps", "7"])
    assert (config.precision, config.accum_steps, config.steps) == ("bf16", 4, 7)


@pytest.mark.parametrize(
    "text, match",
    [("stepz: 5\n", "unknown options"), ("steps: many\n", "'steps'.*int"), ("- 1\n", "mapping"), ("lr: -1.0\n", "lr")],
)
def test_config_file_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        parse_train_flags(["--config", str(path)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"dataset": "csv"}, "train_data"),
        ({"precision": "fp8"}, "precision"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"loss_weight": 2.0}, "loss_weight"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"crop_scale": 0.0}, "crop_scale"),
        ({"crop_scale": 1.5}, "crop_scale"),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_crop_scale_flag_sets_the_training_crop() -> None:
    from fastclip.tokenizer import ClipTokenizer
    from fastclip.train.data import build_train_data

    config = parse_train_flags(["--crop-scale", "0.8", "--workers", "0"])
    data = build_train_data(config, 32, ClipTokenizer(context_length=32), rank=0, world_size=1)
    assert config.crop_scale == 0.8 and data.seeded.dataset.transform.scale == (0.8, 1.0)
    assert TrainConfig().crop_scale == 0.5  # the default crop is unchanged for every other run


def test_missing_config_file_is_a_user_error(tmp_path: Path, capsys) -> None:
    assert cli_main(["train", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml does not exist" in capsys.readouterr().err


# --- optimizer and schedule -------------------------------------------------------------------------


def test_weight_decay_exclusions() -> None:
    model = create_model("tiny-ViT")
    named = dict(model.named_parameters())
    assert not decays("logit_scale", named["logit_scale"])
    assert not decays("token_embedding.weight", named["token_embedding.weight"])
    undecayed = [n for n, p in named.items() if not decays(n, p)]
    assert all(p.ndim < 2 or "embedding" in n or n == "logit_scale" for n, p in named.items() if n in undecayed)
    assert any(n.endswith(".bias") for n in undecayed) and any("ln" in n for n in undecayed)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    decayed_ids = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] == 0.2 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert decayed_ids == {id(p) for n, p in named.items() if decays(n, p)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named)


def test_cosine_schedule_with_warmup() -> None:
    rule = lambda step: cosine_with_warmup(step, warmup_steps=10, total_steps=110)
    assert rule(0) == pytest.approx(0.1) and rule(9) == pytest.approx(1.0)
    assert rule(10) == pytest.approx(1.0) and rule(60) == pytest.approx(0.5) and rule(110) == pytest.approx(0.0)
    values = [rule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# --- training ---------------------------------------------------------------------------------------


def test_short_run_learns_and_writes_its_outputs(tmp_path: Path) -> None:
    options = dict(FAST, model="demo-ViT", steps=80, eval_every=40)
    result = train(TrainConfig(**options, output_dir=str(tmp_path)), show_progress=False)
    first, last = result.losses[0], sum(result.losses[-10:]) / 10
    # Below log(batch) is more than a collapse to uniform logits: pairs are being told apart.
    assert last < math.log(FAST["batch_size"]) - 0.3 < first, result.losses
    assert [row["step"] for row in result.evals] == [40, 80]
    for name in ("metrics.csv", "eval.csv", "curves.png", "model.safetensors", "config.json", "checkpoints/latest.pt"):
        assert (tmp_path / name).is_file(), name
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 80 and float(rows[-1]["loss"]) == pytest.approx(result.losses[-1])
    assert 0 < float(rows[-1]["logit_scale"]) <= 100


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    options = dict(FAST, steps=8, accum_steps=2, batch_size=16, workers=2, save_every=4, synthetic_samples=96)
    full = train(TrainConfig(**options, output_dir=str(tmp_path / "full")), show_progress=False)
    # 8 steps x 2 micro-batches x 16 = 256 samples: three epochs of 96, so resume crosses an epoch.
    checkpoint = tmp_path / "full" / "checkpoints" / "step_00000004.pt"
    resumed = train(
        TrainConfig(**options, output_dir=str(tmp_path / "resumed"), resume=str(checkpoint)), show_progress=False
    )
    assert len(resumed.losses) == 4
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[4:]), rtol=1e-6, atol=1e-6)


def test_accumulation_gives_the_full_batch_gradient() -> None:
    torch.manual_seed(0)
    model = create_model("tiny-ViT").double()
    images = torch.randn(10, 3, 32, 32, dtype=torch.float64)
    tokens = torch.randint(1, 1000, (10, 77))
    from fastclip.loss import ClipLoss

    loss_fn, scaler = ClipLoss(weight=0.4), torch.amp.GradScaler("cpu", enabled=False)
    options = dict(
        device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False), scaler=scaler, ddp=False
    )
    whole = _train_step(model, loss_fn, [PairBatch(images, tokens, 0)], **options)
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    parts = [PairBatch(images[a:b], tokens[a:b], 0) for a, b in ((0, 3), (3, 7), (7, 10))]  # unequal micro-batches
    accumulated = _train_step(model, loss_fn, parts, **options)
    assert accumulated == pytest.approx(whole, rel=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_checkpoint_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_model("tiny-ViT")
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, config={})
    folder = tmp_path / "checkpoints"
    save_training_state(folder, progress=Progress(step=1), **state)
    real_save = torch.save

    def crash_halfway(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_training_state(folder, progress=Progress(step=2), **state)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "step_00000001.pt"]  # no partial files
    progress, _ = load_training_state(folder / "latest.pt", **{k: v for k, v in state.items() if k != "config"})
    assert progress.step == 1
    (folder / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt"):
        load_training_state(folder / "broken.pt", **{k: v for k, v in state.items() if k != "config"})


def test_lock_image_trains_only_the_text_tower(tmp_path: Path) -> None:
    torch.manual_seed(TrainConfig().seed)
    before = create_model("tiny-ViT").state_dict()  # train() seeds the same way, so these are its initial weights
    train(TrainConfig(**FAST, steps=3, lock_image=True, output_dir=str(tmp_path)), show_progress=False)
    from safetensors.torch import load_file

    after = load_file(tmp_path / "model.safetensors")
    visual = [k for k in before if k.startswith("visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert not torch.equal(before["text_projection"], after["text_projection"])


def test_corrupt_training_images_are_skipped_and_counted(tmp_path: Path) -> None:
    from PIL import Image

    rows = []
    for i in range(40):
        path = tmp_path / f"{i}.png"
        if i % 10 == 3:
            path.write_bytes(b"not a png")
        else:
            Image.new("RGB", (40, 36), (i * 6, 255 - i * 6, 90)).save(path)
        rows.append(f"{path.name},a picture number {i}")
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    result = train(
        TrainConfig(
            **dict(FAST, batch_size=8),
            dataset="csv",
            train_data=str(tmp_path / "pairs.csv"),
            steps=5,
            output_dir=str(tmp_path / "run"),
        ),
        show_progress=False,
    )
    assert result.skipped >= 1 and len(result.losses) == 5
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        assert int(list(csv.DictReader(f))[-1]["skipped"]) == result.skipped


def run_torchrun(output_dir: Path, *flags: str) -> tuple[dict, list[dict]]:
    """`fastclip train` on two CPU ranks (gloo) of the tiny model: the printed summary and metrics.csv rows."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "fastclip",
        "train",
        "--model",
        "tiny-ViT",
        "--workers",
        "0",
        "--synthetic-samples",
        "64",
        "--log-every",
        "1",
        "--output-dir",
        str(output_dir),
        "--device",
        "cpu",
        *flags,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(output_dir / "metrics.csv", newline="") as f:
        return json.loads(done.stdout[done.stdout.index("{") :]), list(csv.DictReader(f))


def test_torchrun_with_gloo(tmp_path: Path) -> None:
    """Two CPU ranks under torchrun: DDP + distributed ClipLoss, rank 0 writes the outputs."""
    summary, rows = run_torchrun(tmp_path, "--steps", "3", "--batch-size", "8", "--eval-samples", "20")
    assert math.isfinite(summary["final_loss"])
    assert [int(r["samples_seen"]) for r in rows] == [16, 32, 48]  # 2 ranks x 8 pairs per step


# --- commands ---------------------------------------------------------------------------------------


def test_demo_command_end_to_end(tmp_path: Path, capsys) -> None:
    code = cli_main(
        [
            "demo",
            "--steps",
            "4",
            "--batch-size",
            "16",
            "--workers",
            "0",
            "--eval-samples",
            "40",
            "--output-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "zero-shot accuracy on held-out images, 40 classes" in out and "chance 2.5%" in out
    assert "pairs never seen in training" in out
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "predictions.png").is_file() and f"predictions: {tmp_path / 'predictions.png'}" in out


def test_train_command_with_config_file(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: tiny-ViT\nsteps: 3\nbatch_size: 8\nworkers: 0\neval_samples: 20\noutput_dir: {tmp_path / 'run'}\n"
    )
    assert cli_main(["train", "--config", str(config), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{") :])
    assert len(summary["evals"]) == 1 and summary["evals"][0]["step"] == 2
    resumed = cli_main(["train", "--config", str(config), "--resume", "latest"])  # continues to step 3
    assert resumed == 0
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)][-1] == 3


def test_gradient_checkpointing_trains_identically(tmp_path: Path) -> None:
    options = dict(FAST, steps=3, eval_samples=20)
    plain = train(TrainConfig(**options, output_dir=str(tmp_path / "plain")), show_progress=False)
    recomputed = train(
        TrainConfig(**options, grad_checkpointing=True, output_dir=str(tmp_path / "ckpt")), show_progress=False
    )
    torch.testing.assert_close(torch.tensor(recomputed.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "command", [["train"], ["demo"], ["zero-shot", "--checkpoint", "m.pt", "--images", "x", "--labels", "a"]]
)
def test_bad_device_is_a_one_line_user_error(command: list[str], capsys) -> None:
    try:
        code = cli_main([*command, "--device", "gpu9"])
    except SystemExit as exit:  # argparse's own argument errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and "gpu9" in err and "Traceback" not in err
