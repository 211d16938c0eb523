"""Zero-shot evaluation during and after training: on the synthetic dataset's held-out splits, or on an
image folder with one sub-folder per class."""

from __future__ import annotations

import contextlib

import torch

from fastclip.data.image_folder import ImageFolder
from fastclip.data.transforms import CLIPPreprocess
from fastclip.zero_shot import SINGLE_TEMPLATE, accuracy, build_classifier, classify

# Prompts for the synthetic shapes, whose captions read "a large red circle on the left" and the like.
SYNTHETIC_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.")


@torch.no_grad()
def _split_accuracy(model, dataset, classifier, device, autocast, batch_size: int) -> dict[str, float]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    logit_scale = min(model.logit_scale.exp().item(), 100.0)
    scores, targets = [], []
    for images, labels in loader:
        with autocast():
            features = model.encode_image(images.to(device))
        scores.append(classify(features.float(), classifier, logit_scale).cpu())
        targets.append(torch.as_tensor(labels))
    top = accuracy(torch.cat(scores), torch.cat(targets), topk=(1, 5))
    return {"top1": top[1], "top5": top[5]}


class _Labelled(torch.utils.data.Dataset):
    """(image, class index) pairs of the synthetic dataset, for accuracy."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, _ = self.dataset[index]
        return image, self.dataset.label_of(index)


def evaluate_zero_shot(model, tokenizer, *, image_folder: str | None, synthetic_samples: int, seed: int,
                       device: torch.device, autocast=contextlib.nullcontext, batch_size: int = 256) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy per split, and `chance` (1 / number of classes).

    Synthetic: "seen" = images of colour-shape pairs that occur in training (the "test" stream, minus the
    held-out pairs), "unseen" = only the pairs never shown in training; classes are every pair.
    """
    was_training = model.training
    model.eval()
    preprocess = CLIPPreprocess(model.image_size)
    try:
        if image_folder is not None:
            dataset = ImageFolder(image_folder, transform=preprocess)
            if dataset.classes is None:
                raise ValueError(f"eval_images {image_folder!r} needs one sub-folder per class")
            names = [name.replace("_", " ") for name in dataset.classes]
            classifier = build_classifier(model, tokenizer, names, SINGLE_TEMPLATE, device=device)
            splits = {"folder": dataset}
        else:
            from fastclip.data import synthetic

            names = synthetic.class_names()
            classifier = build_classifier(model, tokenizer, names, SYNTHETIC_TEMPLATES, device=device)
            # "test" draws every pair; keep the pairs that training shows (held-out ones are 7 of 40).
            test = _Labelled(synthetic.SyntheticShapes(2 * synthetic_samples, model.image_size, seed=seed, split="test", transform=preprocess))
            unseen = {synthetic.class_index(*pair) for pair in synthetic.HELDOUT_PAIRS}
            seen = [i for i in range(len(test)) if test.dataset.label_of(i) not in unseen][:synthetic_samples]
            splits = {
                "seen": torch.utils.data.Subset(test, seen),
                "unseen": _Labelled(synthetic.SyntheticShapes(synthetic_samples, model.image_size, seed=seed, split="heldout", transform=preprocess)),
            }
        result = {"chance": 1.0 / len(names)}
        for split, dataset in splits.items():
            for key, value in _split_accuracy(model, dataset, classifier, device, autocast, batch_size).items():
                result[f"{split}_{key}"] = value
        return result
    finally:
        model.train(was_training)
