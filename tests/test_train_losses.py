"""The loss family in `fastclip train`: `loss=siglip` (SigLipLoss with its own learnable scale and bias,
optimised, clamped, checkpointed and resumed exactly) and `use_labels` (class ids from the synthetic
shapes, a CSV column or shard `cls` members reach the loss, also across accumulated micro-batches and
ranks). Kept small: every run is a few steps of the tiny model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from test_train import FAST, parse_train_flags, run_torchrun

from fastclip.data.pairs import PairBatch
from fastclip.data.synthetic import HELDOUT_PAIRS, class_index
from fastclip.loss import ClipLoss, SigLipLoss
from fastclip.model.factory import create_model
from fastclip.train import TrainConfig, train
from fastclip.train.loop import _train_step
from fastclip.train.optim import make_optimizer
from fastclip.train.state import Progress, load_training_state, save_training_state

# --- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss": "softmax"}, r"loss must be one of \('clip', 'siglip'\), got 'softmax'"),
        ({"loss": "siglip", "label_smoothing": 0.1}, "label_smoothing applies to loss='clip' only"),
        ({"loss": "siglip", "loss_weight": 0.3}, "loss_weight applies to loss='clip' only"),
        ({"dataset": "csv", "train_data": "x.csv", "use_labels": True, "csv_label_key": ""}, "csv_label_key"),
    ],
)
def test_loss_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_loss_options_from_flags_and_file(tmp_path: Path) -> None:
    assert (TrainConfig().loss, TrainConfig().use_labels) == ("clip", False)
    config = parse_train_flags(["--loss", "siglip", "--use-labels", "--csv-label-key", "cls"])
    assert (config.loss, config.use_labels, config.csv_label_key) == ("siglip", True, "cls")
    path = tmp_path / "run.yaml"
    path.write_text("loss: siglip\nuse_labels: true\n")
    config = parse_train_flags(["--config", str(path), "--no-use-labels"])
    assert (config.loss, config.use_labels) == ("siglip", False)
    path.write_text("loss: sigmoid\n")
    with pytest.raises(ValueError, match="loss must be one of"):
        parse_train_flags(["--config", str(path)])


def test_bad_loss_is_a_one_line_user_error(capsys) -> None:
    from fastclip.cli import main as cli_main

    assert cli_main(["train", "--loss", "infonce"]) == 2
    err = capsys.readouterr().err
    assert "loss must be one of" in err and "infonce" in err and "Traceback" not in err


# --- SigLIP -----------------------------------------------------------------------------------------


def test_siglip_run_learns_its_scale_and_bias(tmp_path: Path) -> None:
    options = dict(FAST, batch_size=16, steps=8, warmup_steps=2, lr=2e-3, eval_samples=4)
    result = train(TrainConfig(**options, loss="siglip", output_dir=str(tmp_path)), show_progress=False)
    first, last = result.losses[0], sum(result.losses[-3:]) / 3
    assert last < 0.6 * first, result.losses  # from ~12 (scale 10, bias -10 at init)
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert set(state["loss"]) == {"logit_scale", "logit_bias"}
    scale, bias = state["loss"]["logit_scale"].item(), state["loss"]["logit_bias"].item()
    assert bias > -10.0 and scale != pytest.approx(math.log(10.0)) and 0.0 <= scale <= math.log(100.0)
    # the model's own scale is frozen, and not in the optimizer; SigLIP's two parameters are (undecayed)
    torch.manual_seed(TrainConfig().seed)
    initial = create_model("tiny-ViT").logit_scale
    assert torch.equal(state["model"]["logit_scale"], initial.detach())
    groups = state["optimizer"]["param_groups"]
    assert groups[-1]["weight_decay"] == 0.0
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["logit_bias"]) == pytest.approx(bias, abs=1e-6)
    assert float(rows[-1]["logit_scale"]) == pytest.approx(math.exp(scale), rel=1e-6)
    assert json.loads((tmp_path / "config.json").read_text())["loss"] == "siglip"


def test_siglip_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    options = dict(
        FAST, steps=4, accum_steps=2, batch_size=8, save_every=2, synthetic_samples=24, eval_samples=4, loss="siglip"
    )
    full = train(TrainConfig(**options, output_dir=str(tmp_path / "full")), show_progress=False)
    # 4 steps x 2 micro-batches x 8 = 64 samples: almost three epochs of 24, so the resume crosses one.
    checkpoint = tmp_path / "full" / "checkpoints" / "step_00000002.pt"
    resumed = train(
        TrainConfig(**options, output_dir=str(tmp_path / "resumed"), resume=str(checkpoint)), show_progress=False
    )
    assert len(resumed.losses) == 2
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[2:]), rtol=1e-6, atol=1e-6)
    ends = [
        torch.load(tmp_path / run / "checkpoints" / "latest.pt", weights_only=True)["loss"]
        for run in ("full", "resumed")
    ]
    assert ends[0]["logit_bias"].item() == pytest.approx(ends[1]["logit_bias"].item(), abs=1e-6)


def test_resume_with_another_loss_is_refused(tmp_path: Path) -> None:
    model = create_model("tiny-ViT")
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    state = dict(
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
    )
    path = save_training_state(tmp_path, progress=Progress(step=1), config={"loss": "clip"}, **state)
    with pytest.raises(ValueError, match="written with loss='clip', not 'siglip'"):
        load_training_state(path, loss=SigLipLoss(), **state)
    siglip = SigLipLoss(init_logit_bias=-3.0)
    path = save_training_state(tmp_path, progress=Progress(step=2), config={"loss": "siglip"}, loss=siglip, **state)
    with pytest.raises(ValueError, match="written with loss='siglip', not 'clip'"):
        load_training_state(path, **state)
    restored = SigLipLoss()
    load_training_state(path, loss=restored, **state)
    assert restored.logit_bias.item() == -3.0


# --- labels -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_accumulation_with_labels_gives_the_full_batch_gradient(loss: str) -> None:
    torch.manual_seed(0)
    model = create_model("tiny-ViT").double()
    images = torch.randn(9, 3, 32, 32, dtype=torch.float64)
    tokens = torch.randint(1, 1000, (9, 77))
    labels = torch.tensor([3, 1, 3, 0, 1, 2, 3, 0, 5])  # positives across micro-batches
    if loss == "siglip":
        loss_fn = SigLipLoss(init_logit_scale=1.5, init_logit_bias=-2.0).double()
        model.logit_scale.requires_grad_(False)
    else:
        loss_fn = ClipLoss(weight=0.4, label_smoothing=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    options = dict(
        device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False), scaler=scaler, ddp=False
    )
    parameters = [*model.named_parameters(), *(("loss." + n, p) for n, p in loss_fn.named_parameters())]
    whole = _train_step(model, loss_fn, [PairBatch(images, tokens, 0, labels)], **options)
    want = {n: p.grad.clone() for n, p in parameters if p.grad is not None}
    for _, p in parameters:
        p.grad = None
    parts = [PairBatch(images[a:b], tokens[a:b], 0, labels[a:b]) for a, b in ((0, 2), (2, 6), (6, 9))]
    accumulated = _train_step(model, loss_fn, parts, **options)
    assert accumulated == pytest.approx(whole, rel=1e-12)
    assert {n for n, p in parameters if p.grad is not None} == set(want)
    for name, param in parameters:
        if param.grad is not None:
            torch.testing.assert_close(param.grad, want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_label_aware_clip_run_on_synthetic_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    real_forward = ClipLoss.forward

    def spy(self, *args, labels=None, **kwargs):
        seen.append(labels)
        return real_forward(self, *args, labels=labels, **kwargs)

    monkeypatch.setattr(ClipLoss, "forward", spy)
    options = dict(FAST, batch_size=16, steps=2, accum_steps=2, eval_samples=4)
    labelled = train(TrainConfig(**options, use_labels=True, output_dir=str(tmp_path / "labels")), show_progress=False)
    assert len(seen) == 2 * 2 and all(s is not None and s.shape == (32,) and s.dtype == torch.long for s in seen)
    heldout = {class_index(*pair) for pair in HELDOUT_PAIRS}
    ids = torch.cat(seen).tolist()
    assert not heldout & set(ids) and all(0 <= i < 40 for i in ids)
    assert len(set(seen[0].tolist())) < 32  # 33 training classes in 32 pairs: some pairs share a class
    seen.clear()
    plain = train(TrainConfig(**dict(options, steps=1), output_dir=str(tmp_path / "plain")), show_progress=False)
    assert seen[0] is None
    # the same images and captions (same seed): only the extra positives change the loss
    assert math.isfinite(labelled.losses[0]) and labelled.losses[0] != pytest.approx(plain.losses[0], rel=1e-6)


def test_csv_label_column_in_training(tmp_path: Path) -> None:
    from PIL import Image

    rows = ["filepath,title,label"]
    for i in range(16):
        Image.new("RGB", (20, 20), (i * 15, 90, 255 - i * 15)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,picture {i},{i % 3}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    options = dict(
        FAST,
        batch_size=8,
        steps=2,
        eval_samples=4,
        dataset="csv",
        train_data=str(tmp_path / "pairs.csv"),
        use_labels=True,
        loss="siglip",
    )
    result = train(TrainConfig(**options, output_dir=str(tmp_path / "run")), show_progress=False)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    rows[5] = "4.png,picture 4,four"
    (tmp_path / "bad.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"bad.csv.*row 5 \(line 6\).*'four'.*label column 'label'"):
        train(
            TrainConfig(**dict(options, train_data=str(tmp_path / "bad.csv")), output_dir=str(tmp_path / "bad")),
            show_progress=False,
        )
    with pytest.raises(ValueError, match=r"no column 'class' \(label_key\)"):
        train(TrainConfig(**options, csv_label_key="class", output_dir=str(tmp_path / "bad")), show_progress=False)


def test_torchrun_siglip_with_labels(tmp_path: Path) -> None:
    """Two CPU ranks: DDP with the frozen model scale, SigLipLoss averaging its own gradients, labels gathered."""
    summary, rows = run_torchrun(
        tmp_path,
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--accum-steps",
        "2",
        "--eval-samples",
        "4",
        "--loss",
        "siglip",
        "--use-labels",
    )
    assert math.isfinite(summary["final_loss"])
    assert [int(r["samples_seen"]) for r in rows] == [32, 64]  # 2 ranks x 2 micro-batches x 8 pairs per step
    assert float(rows[-1]["logit_bias"]) > -10.0
