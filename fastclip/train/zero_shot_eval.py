"""Zero-shot evaluation during and after training: on the synthetic dataset's held-out splits, or on an
image folder with one sub-folder per class."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from fastclip.data.image_folder import ImageFolder
from fastclip.data.transforms import CLIPPreprocess
from fastclip.train.data import LabelledSynthetic
from fastclip.zero_shot import SINGLE_TEMPLATE, accuracy, build_classifier, classify, logit_scale_of

# Prompts for the synthetic shapes, whose captions read "a large red circle on the left" and the like.
SYNTHETIC_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.")

Splits = dict[str, torch.utils.data.Dataset]  # split name -> (image, class index) pairs


@torch.no_grad()
def _split_accuracy(model, dataset, classifier, device, autocast, batch_size: int) -> dict[str, float]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    logit_scale = logit_scale_of(model)
    scores, targets = [], []
    for images, labels in loader:
        with autocast():
            features = model.encode_image(images.to(device))
        scores.append(classify(features.float(), classifier, logit_scale).cpu())
        targets.append(torch.as_tensor(labels))
    top = accuracy(torch.cat(scores), torch.cat(targets), topk=(1, 5))
    return {"top1": top[1], "top5": top[5]}


def _folder_splits(image_folder: str, preprocess: CLIPPreprocess) -> tuple[list[str], Splits]:
    """(class names, {"folder": the images}) of an image folder with one sub-folder per class."""
    dataset = ImageFolder(image_folder, transform=preprocess)
    if dataset.classes is None:
        raise ValueError(f"eval_images {image_folder!r} needs one sub-folder per class")
    return [name.replace("_", " ") for name in dataset.classes], {"folder": dataset}


def _synthetic_splits(samples: int, image_size: int, seed: int, preprocess: CLIPPreprocess) -> tuple[list[str], Splits]:
    """(every colour-shape class, {"seen": pairs shown in training, "unseen": pairs never shown})."""
    from fastclip.data import synthetic

    def labelled(count: int, split: str) -> LabelledSynthetic:
        shapes = synthetic.SyntheticShapes(count, image_size, seed=seed, split=split, transform=preprocess)
        return LabelledSynthetic(shapes, captions=False)

    # "test" draws every pair; keep the pairs that training shows (held-out ones are 7 of 40).
    test = labelled(2 * samples, "test")
    unseen = {synthetic.class_index(*pair) for pair in synthetic.HELDOUT_PAIRS}
    seen = [i for i in range(len(test)) if test.dataset.label_of(i) not in unseen][:samples]
    return synthetic.class_names(), {
        "seen": torch.utils.data.Subset(test, seen),
        "unseen": labelled(samples, "heldout"),
    }


def evaluate_zero_shot(
    model,
    tokenizer,
    *,
    image_folder: str | None,
    synthetic_samples: int,
    seed: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    batch_size: int = 256,
) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy per split, and `chance` (1 / number of classes).

    Synthetic: "seen" = images of colour-shape pairs that occur in training (the "test" stream, minus the
    held-out pairs), "unseen" = only the pairs never shown in training; classes are every pair.
    """
    was_training = model.training
    model.eval()
    preprocess = CLIPPreprocess(model.image_size)
    try:
        if image_folder is not None:
            names, splits = _folder_splits(image_folder, preprocess)
            templates = SINGLE_TEMPLATE
        else:
            names, splits = _synthetic_splits(synthetic_samples, model.image_size, seed, preprocess)
            templates = SYNTHETIC_TEMPLATES
        classifier = build_classifier(model, tokenizer, names, templates, device=device)
        result = {"chance": 1.0 / len(names)}
        for split, dataset in splits.items():
            for key, value in _split_accuracy(model, dataset, classifier, device, autocast, batch_size).items():
                result[f"{split}_{key}"] = value
        return result
    finally:
        model.train(was_training)
