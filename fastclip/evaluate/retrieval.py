"""Image-text retrieval: recall@k both ways from a CSV of image/caption pairs (several captions per image).

The CSV is open_clip's format (a header, one image path and one caption per row); an image with several
captions simply appears on several rows. Image->text: an image counts as retrieved at k when any of its
captions is among its k most similar captions. Text->image: a caption counts when its image is among its
k most similar images. A candidate outranks the truth only when strictly more similar (ties go to the
truth), and similarities are computed in chunks, so no images x captions matrix is ever held whole.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fastclip.data.pairs import CaptionCsvDataset
from fastclip.evaluate.features import extract_image_features, extract_text_features

DEFAULT_KS = (1, 5, 10)


@dataclasses.dataclass
class CaptionSet:
    images: list[Path]  # distinct image files, in order of first appearance
    captions: list[str]  # every caption kept
    text_to_image: list[int]  # for each caption, the index of its image in `images`
    skipped_rows: int = 0  # rows left out for an empty caption or an empty image path


def read_caption_csv(
    path: str | os.PathLike,
    *,
    image_key: str = "filepath",
    caption_key: str = "title",
    separator: str | None = None,
    root: str | os.PathLike | None = None,
) -> CaptionSet:
    """Group a caption CSV by image. A relative image path is looked up under `root` (default: the CSV's
    folder), then in the working directory."""
    table = CaptionCsvDataset(
        path,
        transform=lambda image: image,
        image_key=image_key,
        caption_key=caption_key,
        separator=separator,
        root=root,
    )
    index: dict[str, int] = {}
    images, captions, text_to_image, skipped = [], [], [], 0
    for row, (image, caption) in enumerate(zip(table.images, table.captions)):
        image, caption = image.strip(), caption.strip()
        if not image or not caption:
            skipped += 1
            continue
        if image not in index:
            index[image] = len(images)
            # the CSV's folder (or root), then the working directory, as training resolves paths; a
            # missing image keeps its first candidate, so the error that follows names a real place
            images.append(table.image_path(row) or table.root / image)
        captions.append(caption)
        text_to_image.append(index[image])
    if not captions:
        raise ValueError(f"caption file {os.fspath(path)!r} has no row with both an image and a caption")
    return CaptionSet(images, captions, text_to_image, skipped)


@torch.no_grad()
def recall_at_k(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """{"image_to_text_R@k", "text_to_image_R@k"} for each k; features are compared by cosine similarity.

    Keys match `fastclip.zero_shot.retrieval_recall`, which gives the same numbers when there are no ties.
    """
    images = torch.nn.functional.normalize(torch.as_tensor(image_features).float(), dim=-1)  # (I, D)
    texts = torch.nn.functional.normalize(torch.as_tensor(text_features).float(), dim=-1)  # (T, D)
    owner = torch.as_tensor(text_to_image, dtype=torch.int64).to(texts.device)  # (T,)
    if images.dim() != 2 or texts.dim() != 2 or images.shape[1] != texts.shape[1] or not len(images) or not len(texts):
        raise ValueError(
            f"image_features [I, D] and text_features [T, D] must be non-empty with one D, "
            f"got {tuple(images.shape)} and {tuple(texts.shape)}"
        )
    if owner.shape != (len(texts),) or int(owner.min()) < 0 or int(owner.max()) >= len(images):
        raise ValueError(f"text_to_image must be [{len(texts)}] indices into the {len(images)} images")
    captioned = torch.bincount(owner, minlength=len(images)) > 0
    if not captioned.all():
        raise ValueError(
            f"every image needs a caption; images without one include {(~captioned).nonzero().flatten()[:5].tolist()}"
        )
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be ints >= 1, got {list(ks)!r}")

    image_rank = torch.empty(len(images), dtype=torch.int64)
    for start in range(0, len(images), chunk_size):
        similarity = images[start : start + chunk_size] @ texts.T  # (B, T)
        mine = owner[None, :] == torch.arange(start, start + len(similarity), device=owner.device)[:, None]  # (B, T)
        best_true = similarity.masked_fill(~mine, float("-inf")).max(dim=1).values  # (B,)
        image_rank[start : start + len(similarity)] = (similarity > best_true[:, None]).sum(1).cpu()
    text_rank = torch.empty(len(texts), dtype=torch.int64)
    for start in range(0, len(texts), chunk_size):
        similarity = texts[start : start + chunk_size] @ images.T  # (B, I)
        true = similarity.gather(1, owner[start : start + chunk_size, None])  # (B, 1)
        text_rank[start : start + len(similarity)] = (similarity > true).sum(1).cpu()
    result = {f"image_to_text_R@{k}": (image_rank < k).double().mean().item() for k in ks}
    result.update({f"text_to_image_R@{k}": (text_rank < k).double().mean().item() for k in ks})
    return result


@dataclasses.dataclass
class RetrievalResult:
    recall: dict[str, float]
    num_images: int  # readable images evaluated
    num_captions: int  # their captions
    skipped_images: list[Path]  # unreadable images (their captions are left out too)
    skipped_rows: int  # rows without a caption or an image path

    def to_dict(self) -> dict[str, Any]:
        return {
            "recall": self.recall,
            "num_images": self.num_images,
            "num_captions": self.num_captions,
            "skipped_images": [os.fspath(p) for p in self.skipped_images],
            "skipped_rows": self.skipped_rows,
        }


def retrieval_from_csv(
    model: torch.nn.Module,
    preprocess: Callable[[Any], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    csv_path: str | os.PathLike,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    image_key: str = "filepath",
    caption_key: str = "title",
    separator: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    amp: bool = True,
) -> RetrievalResult:
    """Encode the images and captions of a caption CSV and compute recall@k both ways."""
    pairs = read_caption_csv(csv_path, image_key=image_key, caption_key=caption_key, separator=separator)
    encoded = extract_image_features(
        model,
        pairs.images,
        preprocess,
        batch_size=batch_size,
        num_workers=num_workers,
        cache_dir=cache_dir,
        progress=progress,
        amp=amp,
        desc="encode CSV images",
    )
    # Unreadable images drop out with their captions; the rest are renumbered to the kept rows.
    row_of = {path: row for row, path in enumerate(encoded.paths)}
    kept = [
        (caption, row_of[pairs.images[i]])
        for caption, i in zip(pairs.captions, pairs.text_to_image)
        if pairs.images[i] in row_of
    ]
    texts = extract_text_features(
        model,
        tokenizer,
        [caption for caption, _ in kept],
        cache_dir=cache_dir,
        progress=progress,
        amp=amp,
        desc="encode captions",
    )
    recall = recall_at_k(encoded.features, texts, [row for _, row in kept], ks)
    return RetrievalResult(recall, len(encoded.paths), len(kept), encoded.skipped, pairs.skipped_rows)
