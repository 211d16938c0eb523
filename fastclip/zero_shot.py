"""Zero-shot classification and retrieval as in the CLIP paper.

A classifier is the text embedding of every class name put into prompt templates: one template ("a photo
of a {}.") or an ensemble whose embeddings are averaged per class and re-normalised. Images are classified
by cosine similarity, scaled by the model's logit scale for probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fastclip.model.clip import MAX_LOGIT_SCALE

SINGLE_TEMPLATE = ("a photo of a {}.",)
# The 7-template ensemble OpenAI selected for ImageNet (CLIP repository, "Prompt_Engineering_for_ImageNet").
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
TEMPLATE_SETS = {"single": SINGLE_TEMPLATE, "ensemble": ENSEMBLE_TEMPLATES}


def _check_templates(classnames: Sequence[str], templates: Sequence[str]) -> None:
    if isinstance(classnames, str) or not classnames or not all(isinstance(c, str) and c for c in classnames):
        raise ValueError(f"classnames must be a non-empty list of non-empty strings, got {classnames!r}")
    if len(set(classnames)) != len(classnames):
        raise ValueError(f"classnames must be unique, got duplicates in {list(classnames)!r}")
    if isinstance(templates, str) or not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError(f"templates must be a non-empty list of strings each containing '{{}}', got {templates!r}")


@torch.no_grad()
def build_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] = SINGLE_TEMPLATE,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Unit-norm class embeddings [D, C] from `templates` filled with each class name (ensemble-averaged)."""
    _check_templates(classnames, templates)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prompts = [template.format(name) for name in classnames for template in templates]  # class-major
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size]).to(device)
        embeddings.append(model.encode_text(tokens, normalize=True).float())
    per_prompt = torch.cat(embeddings).view(len(classnames), len(templates), -1)  # (C, templates, D)
    return F.normalize(per_prompt.mean(1), dim=-1).T.contiguous()  # (D, C)


def logit_scale_of(model: torch.nn.Module) -> float:
    """The model's temperature exp(logit_scale) for `classify`, capped at MAX_LOGIT_SCALE as its logits are."""
    return min(model.logit_scale.exp().item(), MAX_LOGIT_SCALE)


def classify(
    image_features: torch.Tensor, classifier: torch.Tensor, logit_scale: float = MAX_LOGIT_SCALE
) -> torch.Tensor:
    """Class probabilities [B, C]: softmax of scaled cosine similarities (features are re-normalised)."""
    if image_features.dim() != 2 or classifier.dim() != 2 or image_features.shape[1] != classifier.shape[0]:
        raise ValueError(
            f"image_features must be [B, D] and classifier [D, C] with the same D, "
            f"got {tuple(image_features.shape)} and {tuple(classifier.shape)}"
        )
    logits = logit_scale * F.normalize(image_features.float(), dim=-1) @ classifier.float()
    return logits.softmax(dim=-1)


def accuracy(scores: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy for each k (k larger than the number of classes counts every sample as correct)."""
    if scores.dim() != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [B, C] and targets [B], got {tuple(scores.shape)} and {tuple(targets.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("accuracy needs at least one sample")
    ranked = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices  # (B, k)
    hits = ranked == targets[:, None]
    return {k: hits[:, :k].any(1).float().mean().item() for k in topk}


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image->text and text->image recall@k; `text_to_image[j]` is the image that caption j describes.

    An image may have several captions: it counts as retrieved at k when any of them is in its top k.
    """
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    in_range = num_texts > 0 and 0 <= int(text_to_image.min()) and int(text_to_image.max()) < num_images
    if text_to_image.shape != (num_texts,) or not in_range:
        raise ValueError(f"text_to_image must be [{num_texts}] indices into the {num_images} images")
    similarity = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    matches = text_to_image[None, :] == torch.arange(num_images, device=similarity.device)[:, None]  # (I, T)
    if not matches.any(1).all():
        missing = (~matches.any(1)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"every image needs at least one caption; images without one include {missing}")
    # Rank of the best-ranked true caption per image, and of the true image per caption (0 = first).
    text_order = similarity.argsort(dim=1, descending=True)
    image_rank = matches.gather(1, text_order).float().argmax(1)
    image_order = similarity.T.argsort(dim=1, descending=True)
    text_rank = (image_order == text_to_image[:, None]).float().argmax(1)
    result = {}
    for k in ks:
        result[f"image_to_text_R@{k}"] = (image_rank < k).float().mean().item()
        result[f"text_to_image_R@{k}"] = (text_rank < k).float().mean().item()
    return result
