"""Evaluation beyond zero-shot on real small data written here: scikit-learn's handwritten digits (8x8 scans,
10 classes) saved as PNG image folders, encoded by the tiny ViT, then linear probes (checked against
scikit-learn's LogisticRegression), few-shot draws, retrieval recall on constructed cases, prediction
views and the `fastclip eval` command end to end.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

import fastclip
from fastclip.cli import main
from fastclip.data.transforms import CLIPPreprocess
from fastclip.evaluate import (
    extract_image_features,
    few_shot,
    fit_logistic_regression,
    format_prediction,
    image_folder_features,
    linear_probe,
    pick_gallery,
    plot_few_shot,
    read_caption_csv,
    recall_at_k,
    sample_k_shot,
    save_gallery,
    stratified_split,
    top1_accuracy,
    top_predictions,
)
from fastclip.zero_shot import retrieval_recall

IMAGE_SIZE = 32  # the 8x8 scans upsampled 4x: tiny-ViT's input size
CORRUPT = ("3/corrupt.png", "7/truncated.png")  # written into the training folder, must be skipped
SMALL_GRID = (1e-2, 1.0, 1e2, 1e4)  # a coarse C grid keeps the searches fast on a CPU


def sklearn_accuracy(train_x, train_y, test_x, test_y, C: float, **kwargs) -> float:
    """Test accuracy of scikit-learn's LogisticRegression, the reference (one BLAS thread: these problems
    are small, and on a busy machine more threads make scipy's L-BFGS ~10x slower)."""
    model = LogisticRegression(C=C, **{"max_iter": 1000, **kwargs})
    with threadpool_limits(1):
        model.fit(np.asarray(train_x, np.float64), np.asarray(train_y))
    return float(model.score(np.asarray(test_x, np.float64), np.asarray(test_y)))


# --- data written by the tests ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """The digits, split 80/20 by a fixed permutation: pixel features in [0, 1] and targets."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    test = np.zeros(len(order), dtype=bool)
    test[order[: len(order) // 5]] = True
    pixels = data.images.reshape(len(data.target), -1) / 16.0
    return {"images": data.images, "pixels": pixels, "targets": data.target, "test": test}


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    """root/train/<digit>/<i>.png and root/test/<digit>/<i>.png, plus two unreadable training files."""
    root = tmp_path_factory.mktemp("digits")
    for i, (scan, target, is_test) in enumerate(zip(digits["images"], digits["targets"], digits["test"])):
        folder = root / ("test" if is_test else "train") / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (255 - scan * 255 / 16).astype(np.uint8)  # dark ink on white, like a scan
        Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST).save(folder / f"{i:04d}.png")
    (root / "train" / CORRUPT[0]).write_bytes(b"not a png")
    good = (root / "train" / "7").glob("*.png").__next__().read_bytes()
    (root / "train" / CORRUPT[1]).write_bytes(good[: len(good) // 2])
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    fastclip.save_checkpoint(fastclip.create_model("tiny-ViT"), path)
    return path


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def model_and_transforms(checkpoint: Path):
    return fastclip.create_model_and_transforms(None, checkpoint)


@pytest.fixture(scope="module")
def digit_features(model_and_transforms, digit_folders: Path, feature_cache: Path):
    model, preprocess, _ = model_and_transforms
    kwargs = {"cache_dir": feature_cache, "batch_size": 256, "progress": False}
    return (
        image_folder_features(model, digit_folders / "train", preprocess, **kwargs),
        image_folder_features(model, digit_folders / "test", preprocess, **kwargs),
    )


# --- features ---------------------------------------------------------------------------------------


def test_folder_features_are_unit_norm_skip_unreadable_and_follow_the_files(
    digit_features, digit_folders: Path, digits
) -> None:
    train, test = digit_features
    assert train.classes == test.classes == [str(d) for d in range(10)]
    assert sorted(os.fspath(p.relative_to(digit_folders / "train")) for p in train.skipped) == sorted(CORRUPT)
    assert len(train.paths) == int((~digits["test"]).sum()) and len(test.paths) == int(digits["test"].sum())
    assert train.features.shape == (len(train.paths), 32) and train.features.dtype == torch.float32
    torch.testing.assert_close(train.features.norm(dim=1), torch.ones(len(train.paths)))
    assert all(path.parent.name == train.classes[t] for path, t in zip(train.paths, train.targets.tolist()))


def test_feature_cache_is_keyed_on_weights_files_and_preprocessing(
    model_and_transforms, digit_folders: Path, tmp_path: Path
) -> None:
    model, preprocess, _ = model_and_transforms
    paths = [tmp_path / "images" / f"{i}.png" for i in range(13)] + [tmp_path / "images" / "corrupt.png"]
    paths[0].parent.mkdir()
    for source, path in zip(sorted((digit_folders / "test" / "1").glob("*.png")), paths[:13]):
        path.write_bytes(source.read_bytes())  # copies: this test rewrites one
    paths[13].write_bytes(b"not an image")

    def encode(model=model, preprocess=preprocess, **kwargs):
        return extract_image_features(
            model, paths, preprocess, cache_dir=tmp_path / "cache", batch_size=5, progress=False, **kwargs
        )

    first = encode()
    assert not first.from_cache and len(first.paths) == 13 and len(first.skipped) == 1
    again = encode(num_workers=2)  # worker processes give the same rows; the cache answers anyway
    assert again.from_cache and again.paths == first.paths and again.skipped == first.skipped
    torch.testing.assert_close(again.features, first.features)
    fresh = extract_image_features(model, paths, preprocess, batch_size=4, num_workers=2, progress=False)
    torch.testing.assert_close(fresh.features, first.features)

    assert not encode(preprocess=CLIPPreprocess(IMAGE_SIZE, mean=(0.5, 0.5, 0.5))).from_cache
    changed = type(model)(model.config).eval()  # same config; weights copied, then altered
    changed.load_state_dict(model.state_dict())
    assert encode(model=changed).from_cache  # equal weights, other object: same key
    with torch.no_grad():
        changed.visual.proj.add_(1e-3)
    assert not encode(model=changed).from_cache
    os.utime(paths[0], ns=(1, 1))  # a file rewritten since: its mtime changes the key
    assert not encode().from_cache


def test_an_empty_class_folder_or_an_unreadable_class_is_a_clear_error(model_and_transforms, tmp_path: Path) -> None:
    model, preprocess, _ = model_and_transforms
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['b'\] contain no images"):
        image_folder_features(model, tmp_path, preprocess, progress=False)
    (tmp_path / "b" / "y.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"no image of class\(es\) \['b'\] could be read"):
        image_folder_features(model, tmp_path, preprocess, progress=False)


# --- linear probe -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_linear_probe_on_model_features_agrees_with_sklearn(digit_features) -> None:
    train, test = digit_features
    probe = linear_probe(train.features, train.targets, test.features, test.targets, C_grid=SMALL_GRID, refine_steps=1)
    # Features of a random model sit in a narrow cone: at the large C chosen here the problem is badly
    # conditioned and scikit-learn's default tol (1e-4) stops ~2 points short of the optimum (measured),
    # so the reference runs to convergence.
    reference = sklearn_accuracy(
        train.features, train.targets, test.features, test.targets, probe.C, tol=1e-8, max_iter=3000
    )
    assert abs(probe.top1 - reference) <= 0.01, (probe.top1, reference, probe.C)
    assert probe.top1 > 0.5  # random tiny-ViT features still separate the digits well above chance (0.1)
    assert probe.num_train == len(train.paths) and probe.num_test == len(test.paths)  # refit on train + validation
    # The search: the grid in increasing C, then one refinement at half the step around the best.
    tried = [trial["C"] for trial in probe.search]
    assert tried[: len(SMALL_GRID)] == list(SMALL_GRID) and len(tried) == len(SMALL_GRID) + 2
    best = max(probe.search, key=lambda t: (t["score"], -t["loss"]))
    assert probe.C == best["C"]


def test_linear_probe_on_pixels_is_accurate_and_solvers_agree(digits) -> None:
    x, y, test = digits["pixels"], digits["targets"], digits["test"]
    ours = linear_probe(x[~test], y[~test], x[test], y[test], C_grid=SMALL_GRID, refine_steps=2)
    theirs = linear_probe(x[~test], y[~test], x[test], y[test], C_grid=SMALL_GRID, refine_steps=2, solver="sklearn")
    assert ours.top1 > 0.93 and theirs.top1 > 0.93
    assert abs(ours.top1 - theirs.top1) <= 0.01
    assert abs(ours.top1 - sklearn_accuracy(x[~test], y[~test], x[test], y[test], ours.C)) <= 0.01
    assert 0.9 < ours.mean_per_class <= 1.0


@pytest.mark.parametrize("C", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize(("classes", "dim"), [(2, 1), (3, 5), (10, 64)])
def test_fit_matches_sklearn_on_awkward_shapes(C: float, classes: int, dim: int) -> None:
    generator = torch.Generator().manual_seed(classes * 100 + dim)
    centres = 2 * torch.randn(classes, dim, generator=generator)
    y = torch.arange(150) % classes
    x = centres[y] + torch.randn(150, dim, generator=generator)
    test_y = torch.arange(90) % classes
    test_x = centres[test_y] + torch.randn(90, dim, generator=generator)
    ours = top1_accuracy(fit_logistic_regression(x, y, C).logits(test_x), test_y)
    sk = fit_logistic_regression(x, y, C, solver="sklearn")
    assert abs(ours - sklearn_accuracy(x, y, test_x, test_y, C)) <= 0.012  # one test sample of 90
    assert abs(ours - top1_accuracy(sk.logits(test_x), test_y)) <= 0.012
    probabilities = sk.predict_proba(test_x)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(90, dtype=torch.float64))


def test_torch_solver_reaches_the_optimum_of_sklearns_objective() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=generator, dtype=torch.float64) + 3.0  # off-centre, like CLIP features
    y = torch.randint(0, 4, (200,), generator=generator)
    C = 0.5
    ours = fit_logistic_regression(x, y, C)
    sk = fit_logistic_regression(x, y, C, solver="sklearn", tol=1e-10)
    weight, bias = ours.weight.clone().requires_grad_(True), ours.bias.clone().requires_grad_(True)

    def objective(weight, bias):
        return torch.nn.functional.cross_entropy(x @ weight + bias, y) + weight.square().sum() / (2 * C * len(y))

    # Autograd checks the solver's closed-form gradient: ~0 at the optimum (the solver works on centred
    # features, where its tolerance is 1e-6; here the offset of 3 scales the bias' share into dW).
    objective(weight, bias).backward()
    assert weight.grad.abs().max() < 1e-5 and bias.grad.abs().max() < 1e-6
    assert objective(ours.weight, ours.bias) <= objective(sk.weight, sk.bias) + 1e-10
    torch.testing.assert_close(ours.predict_proba(x), sk.predict_proba(x), atol=1e-5, rtol=0)


def test_stratified_split_keeps_every_class_on_both_sides() -> None:
    targets = torch.tensor([0] * 10 + [1] * 2 + [2] * 5)
    train, val = stratified_split(targets, 0.2, seed=3)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(17))
    assert torch.bincount(targets[val]).tolist() == [2, 1, 1]
    assert torch.bincount(targets[train]).tolist() == [8, 1, 4]
    with pytest.raises(ValueError, match="class 1 has 1 training example"):
        stratified_split(torch.tensor([0, 0, 1]), 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"C": -1.0}, "C must be a positive finite number"),
        ({"solver": "adam"}, "solver must be one of"),
        ({"metric": "f1"}, "metric must be one of"),
        ({"C_grid": ()}, "C_grid must be non-empty"),
    ],
)
def test_linear_probe_argument_errors(kwargs: dict, message: str) -> None:
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    with pytest.raises(ValueError, match=message):
        linear_probe(x, y, x, y, **kwargs)


def test_linear_probe_data_errors() -> None:
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    with pytest.raises(ValueError, match="test classes \\[2\\] have no training examples"):
        linear_probe(x, y, x[:3], torch.tensor([0, 1, 2]), C=1.0)
    with pytest.raises(ValueError, match="same width"):
        linear_probe(x, y, torch.randn(4, 2), y[:4], C=1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        linear_probe(x.clone().fill_(float("nan")), y, x, y, C=1.0)


# --- few-shot ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_k_shot_samples_exactly_k_per_class(k: int, digits) -> None:
    targets = torch.as_tensor(digits["targets"][~digits["test"]])
    first = sample_k_shot(targets, k, seed=0)
    assert torch.bincount(targets[first]).tolist() == [k] * 10
    assert len(set(first.tolist())) == 10 * k  # without replacement
    assert torch.equal(first, sample_k_shot(targets, k, seed=0))  # a seed is a draw
    assert not torch.equal(first, sample_k_shot(targets, k, seed=1))


def test_few_shot_runs_use_the_sizes_asked_for_and_plot(digits, tmp_path: Path) -> None:
    x, y, test = digits["pixels"], digits["targets"], digits["test"]
    result = few_shot(
        x[~test],
        y[~test],
        x[test],
        y[test],
        shots=(1, 2, 4),
        seeds=(0, 1),
        zero_shot=0.3,
        C_grid=SMALL_GRID,
        refine_steps=0,
        fallback_C=10.0,
    )
    assert [(run["k"], run["seed"], run["num_train"]) for run in result.runs] == [
        (k, seed, 10 * k) for k in (1, 2, 4) for seed in (0, 1)
    ]
    assert all(run["C"] == 10.0 for run in result.runs if run["k"] == 1)  # no validation split at k = 1
    summary = result.summary()
    for k in (1, 2, 4):
        values = [run["top1"] for run in result.runs if run["k"] == k]
        assert summary[k]["mean"] == pytest.approx(np.mean(values))
        assert summary[k]["std"] == pytest.approx(np.std(values, ddof=1))
    assert summary[4]["mean"] > summary[1]["mean"] > 0.3  # more shots, better probe; far above chance
    path = plot_few_shot(result, tmp_path / "plots" / "few_shot.png", linear_probe_top1=0.95, title="digits")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_k_larger_than_a_class_is_a_clear_error() -> None:
    targets = torch.tensor([0] * 5 + [1] * 3 + [2] * 5)
    with pytest.raises(ValueError, match="k=4 shots per class is more than class 'cat' has \\(3 training images\\)"):
        sample_k_shot(targets, 4, seed=0, classes=["dog", "cat", "bird"])
    with pytest.raises(ValueError, match="k=4 shots per class is more than class 1 has"):
        few_shot(torch.randn(13, 4), targets, torch.randn(3, 4), torch.tensor([0, 1, 2]), shots=(1, 4))


# --- retrieval --------------------------------------------------------------------------------------


def test_recall_on_a_constructed_case_is_exact() -> None:
    e = torch.eye(5)
    images = e[:4]
    # Image 0 has captions 0 and 1, image 1 caption 2, image 2 caption 3, image 3 captions 4 and 5.
    # Cosines: caption 1 is 0.45 to image 0 but 0.89 to image 2; caption 3 is 0.45 to image 2 but 0.89 to
    # image 3; caption 5 is 0.32 to image 3 and 0 to the rest.
    texts = torch.stack([e[0], 0.5 * e[0] + e[2], e[1], e[2] + 2 * e[3], e[3], e[3] + 3 * e[4]])
    owner = [0, 0, 1, 2, 3, 3]
    recall = recall_at_k(images, texts, owner, ks=(1, 2, 3))
    assert recall["image_to_text_R@1"] == 0.75  # image 2 finds caption 1 (of image 0) first
    assert recall["image_to_text_R@2"] == 1.0
    assert recall["text_to_image_R@1"] == pytest.approx(4 / 6)  # captions 1 and 3 find another image first
    assert recall["text_to_image_R@2"] == 1.0


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize(("num_images", "captions_per_image"), [(1, 1), (7, 3), (50, 5)])
def test_recall_matches_the_sorting_implementation(chunk_size: int, num_images: int, captions_per_image: int) -> None:
    generator = torch.Generator().manual_seed(num_images)
    images = torch.randn(num_images, 16, generator=generator)
    owner = torch.arange(num_images).repeat_interleave(captions_per_image)
    texts = images[owner] + 1.5 * torch.randn(len(owner), 16, generator=generator)
    ours = recall_at_k(images, texts, owner, ks=(1, 5, 10), chunk_size=chunk_size)
    assert ours == pytest.approx(retrieval_recall(images, texts, owner, ks=(1, 5, 10)))


def test_recall_errors() -> None:
    with pytest.raises(ValueError, match="every image needs a caption"):
        recall_at_k(torch.eye(3), torch.eye(3)[:2], [0, 1])
    with pytest.raises(ValueError, match="indices into the 3 images"):
        recall_at_k(torch.eye(3), torch.eye(3), [0, 1, 3])


def test_caption_csv_groups_captions_by_image(tmp_path: Path) -> None:
    rows = [("a.png", "first a"), ("b.png", "only b"), ("a.png", "second a"), ("c.png", " "), ("", "lost")]
    with open(tmp_path / "pairs.csv", "w", newline="") as file:
        csv.writer(file).writerows([("filepath", "title"), *rows])
    pairs = read_caption_csv(tmp_path / "pairs.csv")
    assert pairs.images == [tmp_path / "a.png", tmp_path / "b.png"]
    assert pairs.captions == ["first a", "only b", "second a"] and pairs.text_to_image == [0, 1, 0]
    assert pairs.skipped_rows == 2


def test_caption_csv_paths_fall_back_to_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """open_clip writes paths relative to where training runs: the CSV's folder first, then the cwd."""
    (tmp_path / "lists").mkdir()
    (tmp_path / "images").mkdir()
    for name in ("images/x.png", "lists/y.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    with open(tmp_path / "lists" / "pairs.csv", "w", newline="") as file:
        csv.writer(file).writerows([("filepath", "title"), ("images/x.png", "x"), ("y.png", "y"), ("gone.png", "z")])
    monkeypatch.chdir(tmp_path)
    pairs = read_caption_csv(tmp_path / "lists" / "pairs.csv")
    assert [p.resolve() for p in pairs.images] == [
        (tmp_path / "images/x.png").resolve(),
        (tmp_path / "lists/y.png").resolve(),
        (tmp_path / "lists/gone.png").resolve(),
    ]


# --- prediction views -------------------------------------------------------------------------------


def test_predictions_rank_the_true_label_and_draw_a_gallery(digit_folders: Path, tmp_path: Path) -> None:
    probabilities = torch.tensor([[0.1, 0.5, 0.3, 0.06, 0.04, 0.0], [0.9, 0.02, 0.02, 0.02, 0.02, 0.02]])
    names = ["zero", "one", "two", "three", "four", "five"]
    images = sorted((digit_folders / "test" / "2").glob("*.png"))[:2]
    predictions = top_predictions(probabilities, names, images, [0, 0], k=5)
    first, second = predictions
    assert first.labels == ["one", "two", "zero", "three", "four"] and first.rank == 3 and not first.correct
    assert first.probabilities == pytest.approx([0.5, 0.3, 0.1, 0.06, 0.04])
    assert second.rank == 1 and second.correct
    text = format_prediction(first, root=digit_folders / "test")
    assert text.splitlines()[0] == f"2/{images[0].name}  correct label: zero, ranked 3 out of 6"
    assert text.splitlines()[3].startswith("  3. zero ") and text.splitlines()[3].endswith("<- correct")
    assert first.to_dict(digit_folders / "test")["rank"] == 3
    path = save_gallery(predictions, tmp_path / "gallery.png", columns=2, title="test")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 200
    assert len(pick_gallery(predictions * 3, 4)) == 4


# --- the command ------------------------------------------------------------------------------------


def test_eval_command_writes_json_and_plots(
    checkpoint: Path, digit_folders: Path, feature_cache: Path, digit_features, tmp_path: Path, capsys
) -> None:
    """End to end; `digit_features` filled the feature cache, which the command must find and use."""
    test_images = sorted((digit_folders / "test").rglob("*.png"))[::12]
    with open(tmp_path / "pairs.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "title"])
        for path in test_images:
            digit = path.parent.name
            writer.writerows([(path, f"a photo of the digit {digit}"), (path, f"a scan of a handwritten {digit}")])
        writer.writerow([digit_folders / "train" / CORRUPT[0], "unreadable"])
    output = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--checkpoint",
            str(checkpoint),
            "--train",
            str(digit_folders / "train"),
            "--test",
            str(digit_folders / "test"),
            "--captions",
            str(tmp_path / "pairs.csv"),
            "--output-dir",
            str(output),
            "--cache-dir",
            str(feature_cache),
            "--workers",
            "0",
            "--shots",
            "1,2,4",
            "--seeds",
            "2",
            "--C-grid",
            "1e-1,1e1,1e3",
            "--refine-steps",
            "1",
            "--show",
            "2",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    report = json.loads((output / "report.json").read_text())
    assert report["tasks"] == ["zero-shot", "linear-probe", "few-shot", "retrieval"]
    assert report["data"]["train"]["num_skipped"] == 2 and report["data"]["test"]["num_skipped"] == 0
    assert report["classes"] == [str(d) for d in range(10)]
    assert 0.0 <= report["zero_shot"]["top1"] <= report["zero_shot"]["top5"] <= 1.0
    assert report["linear_probe"]["top1"] > 0.5 and report["linear_probe"]["C"] > 0
    runs = report["few_shot"]["runs"]
    assert [(run["k"], run["num_train"]) for run in runs] == [(k, 10 * k) for k in (1, 2, 4) for _ in range(2)]
    assert report["few_shot"]["zero_shot"] == report["zero_shot"]["top1"]
    retrieval = report["retrieval"]
    assert retrieval["num_images"] == len(test_images) and retrieval["num_captions"] == 2 * len(test_images)
    assert len(retrieval["skipped_images"]) == 1
    assert set(retrieval["recall"]) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert len(report["predictions"]) == report["data"]["test"]["images"]
    assert all(1 <= p["rank"] <= 10 and len(p["top_k"]) == 5 for p in report["predictions"])
    for name in ("few_shot.png", "predictions.png"):
        with Image.open(output / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
    assert "ranked" in out and "out of 10" in out and "linear probe" in out and "few-shot" in out
    assert "2 unreadable, skipped" in out and "[cached features]" in out


def _eval(*argv: str) -> int:
    return main(["eval", "--workers", "0", *argv])


def test_eval_command_errors(
    checkpoint: Path, digit_folders: Path, feature_cache: Path, tmp_path: Path, capsys
) -> None:
    common = ["--checkpoint", str(checkpoint), "--cache-dir", str(feature_cache), "--output-dir", str(tmp_path / "out")]
    train, test = str(digit_folders / "train"), str(digit_folders / "test")

    def error(*argv: str) -> str:
        assert _eval(*common, *argv) == 2
        return capsys.readouterr().err

    assert "k=500 shots per class is more than class" in error("--train", train, "--test", test, "--shots", "1,500")
    assert "neither carry the names of the 3 labels" in error("--test", test, "--labels", "zero,one,two")
    assert "task retrieval needs --captions" in error("--test", test, "--tasks", "retrieval")
    assert "task few-shot needs --train" in error("--test", test, "--tasks", "few-shot")
    assert "--train" in error("--train", str(tmp_path / "missing"), "--test", test)
    assert "nothing to evaluate" in error()
    (tmp_path / "small" / "0").mkdir(parents=True)
    (tmp_path / "small" / "x").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "small" / "0" / "a.png")
    assert "class folder(s) ['x'] contain no images" in error("--test", str(tmp_path / "small"))
    (tmp_path / "small" / "x").rmdir()
    (tmp_path / "small" / "x9").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "small" / "x9" / "b.png")
    assert "class folder(s) ['x9'] of --test are not classes of --train" in error(
        "--train", train, "--test", str(tmp_path / "small"), "--tasks", "linear-probe", "--C", "1"
    )
