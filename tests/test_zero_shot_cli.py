"""`fastclip zero-shot` and `create_model_and_transforms` end to end, on a tiny model trained here.

The tiny ViT is trained for a few steps to pair solid-colour images with "a photo of a <colour>." captions;
zero-shot classification of fresh noisy images of each colour must then name the right colour, read
back through the checkpoint file, the image folder and the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import fastclip
from fastclip.cli import main
from fastclip.commands._inference import class_mapping
from fastclip.data import ImageFolder

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}


def colour_images(colour: str, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 [count, 3, size, size]: the colour plus pixel noise."""
    base = torch.tensor(COLOURS[colour], dtype=torch.float32).view(3, 1, 1)
    noise = 25 * torch.randn(count, 3, size, size, generator=generator)
    return (base + noise).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model, preprocess, tokenizer = fastclip.create_model_and_transforms("tiny-ViT")
    model.train()
    captions = tokenizer([f"a photo of a {colour}." for colour in COLOURS])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(40):
        images = preprocess(torch.cat([colour_images(c, 1, model.image_size, generator) for c in COLOURS]))
        loss = fastclip.contrastive_loss(*model(images, captions))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"the tiny model did not learn the colours (loss {loss.item():.3f})"
    path = tmp_path_factory.mktemp("checkpoint") / "colours.safetensors"
    fastclip.save_checkpoint(model, path)
    return path


def write_images(folder: Path, colour: str, count: int, generator: torch.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(colour_images(colour, count, 40, generator)):  # 40 px: resized and cropped to 32
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"{colour}_{i}.png")


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    generator = torch.Generator().manual_seed(2)
    for colour in COLOURS:
        write_images(tmp_path / "images" / colour, colour, 3, generator)
    return tmp_path / "images"


def test_loader_returns_eval_model_matching_preprocess_and_tokenizer() -> None:
    model, preprocess, tokenizer = fastclip.create_model_and_transforms("tiny-RN")
    assert not model.training
    assert preprocess.image_size == model.image_size == 64
    assert tokenizer.context_length == model.config.text.context_length
    image = preprocess(Image.new("RGB", (80, 70), (10, 20, 30))).unsqueeze(0)
    with torch.no_grad():
        features = model.encode_image(image)
        text = model.encode_text(tokenizer(["a photo of a cat."]))
    assert features.shape == text.shape == (1, model.config.embed_dim)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(1))


def test_zero_shot_on_class_folders_reports_accuracy(
    trained_checkpoint: Path, class_folders: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "out" / "predictions.json"
    code = main(
        [
            "zero-shot",
            "--checkpoint",
            str(trained_checkpoint),
            "--images",
            str(class_folders),
            "--workers",
            "0",
            "--batch-size",
            "5",
            "--top-k",
            "2",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    report = json.loads(output.read_text())
    assert report["classes"] == sorted(COLOURS)  # sub-folder names, sorted
    assert report["num_images"] == len(report["predictions"]) == 3 * len(COLOURS)
    for prediction in report["predictions"]:
        assert prediction["image"].startswith(prediction["target"] + "/")
        assert prediction["top_k"][0]["label"] == prediction["target"]
        assert len(prediction["top_k"]) == 2
        assert prediction["top_k"][0]["probability"] >= prediction["top_k"][1]["probability"]
    assert report["accuracy"]["top1"] == 1.0
    assert "top1 accuracy 1.0000" in capsys.readouterr().out


def test_zero_shot_flat_folder_prints_predictions(trained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    generator = torch.Generator().manual_seed(3)
    for colour in ("blue", "red"):
        write_images(tmp_path / "flat", colour, 2, generator)
    code = main(
        [
            "zero-shot",
            "--checkpoint",
            str(trained_checkpoint),
            "--images",
            str(tmp_path / "flat"),
            "--labels",
            "red, green ,blue,yellow",
            "--templates",
            "ensemble",
            "--workers",
            "0",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    for line in lines:
        image, label, probability = line.split("\t")
        assert image.startswith(label + "_") and 0.0 < float(probability) <= 1.0


def test_labels_pair_with_folders_by_name_or_sorted_position() -> None:
    assert class_mapping(None, ["golden_retriever", "tabby"]) == (["golden retriever", "tabby"], [0, 1])
    assert class_mapping(["tabby", "golden retriever", "car"], ["golden_retriever", "tabby"]) == (
        ["tabby", "golden retriever", "car"],
        [1, 0],
    )
    assert class_mapping(["tench", "goldfish"], ["n01440764", "n01443537"]) == (["tench", "goldfish"], [0, 1])
    assert class_mapping(["a", "b"], None) == (["a", "b"], None)
    with pytest.raises(ValueError, match="neither carry the names"):
        class_mapping(["tench"], ["n01440764", "n01443537"])
    with pytest.raises(ValueError, match="--labels or --labels-file is required"):
        class_mapping(None, None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--templates", "nonsense"], "--templates must be one of"),
        (["--labels", " , "], "--labels must name at least one class"),
        (["--top-k", "0"], "--top-k and --batch-size must be >= 1"),
    ],
)
def test_cli_argument_errors(
    trained_checkpoint: Path, class_folders: Path, extra: list[str], message: str, capsys
) -> None:
    code = main(
        ["zero-shot", "--checkpoint", str(trained_checkpoint), "--images", str(class_folders), "--workers", "0", *extra]
    )
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_data_errors(trained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    def run(images: Path, *extra: str) -> str:
        assert (
            main(
                [
                    "zero-shot",
                    "--checkpoint",
                    str(trained_checkpoint),
                    "--images",
                    str(images),
                    "--workers",
                    "0",
                    *extra,
                ]
            )
            == 2
        )
        return capsys.readouterr().err

    generator = torch.Generator().manual_seed(4)
    write_images(tmp_path / "flat", "red", 1, generator)
    assert "--labels or --labels-file is required" in run(tmp_path / "flat")
    assert "does not exist" in run(tmp_path / "missing", "--labels", "red")
    (tmp_path / "empty").mkdir()
    assert "contains no images" in run(tmp_path / "empty", "--labels", "red")
    (tmp_path / "flat" / "broken.png").write_bytes(b"not a png")
    error = run(tmp_path / "flat", "--labels", "red,blue")
    assert "cannot read image" in error and "broken.png" in error
    (tmp_path / "flat" / "broken.png").unlink()
    assert (
        main(
            [
                "zero-shot",
                "--checkpoint",
                str(tmp_path / "none.pt"),
                "--images",
                str(tmp_path / "flat"),
                "--labels",
                "red",
            ]
        )
        == 2
    )
    assert "none.pt does not exist" in capsys.readouterr().err


def test_image_folder_rejects_mixed_layout(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(5)
    write_images(tmp_path / "mixed", "red", 1, generator)
    write_images(tmp_path / "mixed" / "blue", "blue", 1, generator)
    with pytest.raises(ValueError, match="both at its top level and in sub-folders"):
        ImageFolder(tmp_path / "mixed")
    dataset = ImageFolder(tmp_path / "mixed" / "blue")
    assert dataset.classes is None and len(dataset) == 1 and dataset[0][1] == -1
