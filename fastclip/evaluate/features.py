"""Frozen features for evaluation: batched encoding of images and texts, L2-normalised, cached on disk.

A sweep (linear probes over C, few-shot seeds, several commands over one dataset) encodes each dataset once:
features are stored under `cache_dir` in a safetensors file named by a hash of everything that decides
them: the weights of the tower that made them (and the model config), the file list (path, size,
modification time of each file), the preprocessing, and the precision. Change any of these and the
key changes; nothing is ever invalidated by hand.

Unreadable images are skipped, not fatal: `ImageFeatures.skipped` lists them and rows exist only for the
readable ones (`paths`, `targets` follow the rows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastclip.data.image_folder import ImageFolder
from fastclip.data.pairs import warn_skipped
from fastclip.data.transforms import load_image
from fastclip.train.precision import autocast_for

logger = logging.getLogger(__name__)
CACHE_VERSION = "1"  # bump when the stored layout or the encoding procedure changes


@dataclasses.dataclass
class ImageFeatures:
    """Encoded images: one row per readable image."""

    features: torch.Tensor  # (N, D) float32, unit rows, on the CPU
    paths: list[Path]  # the file of each row
    targets: torch.Tensor | None  # (N,) int64 class index of each row, None without classes
    classes: list[str] | None  # class names (sub-folder names) indexed by `targets`
    skipped: list[Path]  # unreadable files, left out of the rows
    from_cache: bool = False


# --- fingerprints: what the cache key is made of


def weights_fingerprint(tensors: Mapping[str, torch.Tensor], *extra: str) -> str:
    """A hash of tensors (names, shapes, dtypes and bytes) and `extra` strings.

    Hashing the weights rather than naming the checkpoint file means the same weights loaded from two
    paths share a cache, and a checkpoint overwritten in place (a training run) does not.
    """
    digest = hashlib.blake2b(digest_size=16)
    for item in extra:
        digest.update(item.encode() + b"\0")
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\0".encode())
        flat = tensor.reshape(-1).contiguous().cpu()
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def image_tower_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of what decides image features: the image tower's weights and the model config."""
    visual = {name: t for name, t in model.state_dict().items() if name.startswith("visual.")}
    return weights_fingerprint(visual, _config_json(model))


def text_tower_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of the text tower (every weight outside `visual.`, except the temperature)."""
    text = {n: t for n, t in model.state_dict().items() if not n.startswith("visual.") and n != "logit_scale"}
    return weights_fingerprint(text, _config_json(model))


def _config_json(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return config.to_json() if hasattr(config, "to_json") else type(model).__name__


def files_fingerprint(paths: Sequence[Path]) -> str:
    """Hash of each file's resolved path, size and modification time (content hashing costs a decode)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\0".encode())
        except OSError:  # a vanished file is unreadable: it is skipped, and that must be part of the key
            digest.update(f"{Path(path).resolve()}|missing\0".encode())
    return digest.hexdigest()


def describe_preprocess(preprocess: Callable[[Any], torch.Tensor]) -> str:
    """A string naming the preprocessing, including CLIPPreprocess's size, mean and std."""
    parts = [type(preprocess).__qualname__, repr(preprocess)]
    for name in ("image_size", "mean", "std"):
        value = getattr(preprocess, name, None)
        if value is not None:
            parts.append(f"{name}={value.flatten().tolist() if isinstance(value, torch.Tensor) else value}")
    return "|".join(parts)


# --- the on-disk cache


def _cache_path(cache_dir: str | os.PathLike, kind: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / f"{kind}-{key}.safetensors"


def _load_cached(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except Exception as error:  # a truncated or foreign file: recompute rather than fail the evaluation
        logger.warning("ignoring unreadable feature cache %s: %s", path, error)
        return None


def _save_cached(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: a concurrent reader never sees half a file.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _key(*parts: str) -> str:
    return hashlib.blake2b("\0".join((CACHE_VERSION, *parts)).encode(), digest_size=16).hexdigest()


# --- encoding


def _amp_dtype(device: torch.device, amp: bool) -> torch.dtype:
    """bf16 on CUDA (fp16 where bf16 is unsupported) when `amp`; plain fp32, no autocast, elsewhere."""
    if amp and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class _Encoder:
    """What encoding images and encoding texts share: where the model runs and in which precision, the
    cache file of a key, the progress bar, and eval mode with L2-normalised fp32 rows on the CPU."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        amp: bool,
        cache_dir: str | os.PathLike | None,
        progress: bool | None,
        desc: str,
    ) -> None:
        self.model, self.cache_dir, self.desc = model, cache_dir, desc
        self.device = next(model.parameters()).device
        self.use_amp = amp and self.device.type == "cuda"
        self.autocast = autocast_for(_amp_dtype(self.device, self.use_amp), self.device)
        self.show = sys.stderr.isatty() if progress is None else progress

    def cache_file(self, kind: str, key_parts: Callable[[], Sequence[str]]) -> Path | None:
        """The cache file of `kind` ("image", "text") for the key `key_parts()` names, or None without a
        cache (the parts, hashes of weights and files, are computed only then)."""
        if self.cache_dir is None:
            return None
        return _cache_path(self.cache_dir, kind, _key(kind, *key_parts(), f"amp={self.use_amp}"))

    def bar(self, batches: Iterable) -> Iterable:
        return tqdm(batches, desc=self.desc, unit="batch", disable=not self.show)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """The model in eval mode, and back in its former mode afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def rows(self, encode: Callable[..., torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """`encode(inputs)` (inputs on the model's device) as unit rows (B, D), normalised in fp32, on the CPU."""
        with self.autocast():
            encoded = encode(inputs, normalize=False)
        return F.normalize(encoded.float(), dim=-1).cpu()


class _ReadableImages(torch.utils.data.Dataset):
    """(index, preprocessed image) or (index, None) for an unreadable file, so one bad file never stops a run."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None]:
        try:
            image = load_image(self.paths[index])
        except ValueError as error:  # load_image names the file
            warn_skipped(str(error))  # logs the first few per process, not one line per broken file
            return index, None
        return index, self.transform(image)


Batch = tuple[list[int], torch.Tensor | None, list[int]]  # (kept indices, their images, unreadable indices)


def _collate_readable(samples: list[tuple[int, torch.Tensor | None]]) -> Batch:
    kept = [(i, image) for i, image in samples if image is not None]
    images = torch.stack([image for _, image in kept]) if kept else None
    return [i for i, _ in kept], images, [i for i, image in samples if image is None]


@torch.no_grad()
def extract_image_features(
    model: torch.nn.Module,
    paths: Sequence[str | os.PathLike],
    preprocess: Callable[[Any], torch.Tensor],
    *,
    targets: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    amp: bool = True,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    progress: bool | None = None,
    desc: str = "encode images",
) -> ImageFeatures:
    """Encode image files with `model.encode_image` into unit-norm float32 features [N, D] on the CPU.

    The model runs where its parameters are (under bf16 autocast on CUDA when `amp`). `targets` (one per
    path) follow the readable rows. With `cache_dir`, features are read from / written to the cache;
    `model_id` replaces the weight hash in the key when the caller has one already (see
    `image_tower_fingerprint`). `progress` None shows a tqdm bar when stderr is a terminal.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("paths must name at least one image file")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    if targets is not None and len(targets) != len(paths):
        raise ValueError(f"targets must have one entry per path ({len(paths)}), got {len(targets)}")
    encoder = _Encoder(model, amp=amp, cache_dir=cache_dir, progress=progress, desc=desc)
    path = encoder.cache_file(
        "image",
        lambda: (model_id or image_tower_fingerprint(model), files_fingerprint(paths), describe_preprocess(preprocess)),
    )
    cached = _load_cached(path) if path is not None else None
    if cached is not None and {"features", "kept"} <= cached[0].keys():
        kept, skipped = cached[0]["kept"].tolist(), json.loads(cached[1].get("skipped", "[]"))
        return _image_features(cached[0]["features"], kept, skipped, paths, targets, classes, from_cache=True)
    loader = torch.utils.data.DataLoader(
        _ReadableImages(paths, preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate_readable,
        pin_memory=encoder.device.type == "cuda",
    )
    rows, kept, skipped = [], [], []
    with encoder.evaluating():
        for indices, images, bad in encoder.bar(loader):
            skipped += bad
            if images is None:
                continue
            rows.append(encoder.rows(model.encode_image, images.to(encoder.device, non_blocking=True)))
            kept += indices
    if not kept:
        raise ValueError(f"none of the {len(paths)} images could be read (first: {os.fspath(paths[0])!r})")
    features = torch.cat(rows)
    if path is not None:
        _save_cached(
            path,
            {"features": features, "kept": torch.tensor(kept, dtype=torch.int64)},
            {"skipped": json.dumps(skipped), "count": str(len(paths))},
        )
    return _image_features(features, kept, skipped, paths, targets, classes, from_cache=False)


def _image_features(
    features: torch.Tensor,
    kept: list[int],
    skipped: list[int],
    paths: list[Path],
    targets: Sequence[int] | None,
    classes: Sequence[str] | None,
    *,
    from_cache: bool,
) -> ImageFeatures:
    row_targets = torch.as_tensor([targets[i] for i in kept], dtype=torch.int64) if targets is not None else None
    return ImageFeatures(
        features=features,
        paths=[paths[i] for i in kept],
        targets=row_targets,
        classes=list(classes) if classes is not None else None,
        skipped=[paths[i] for i in skipped],
        from_cache=from_cache,
    )


def image_folder_features(
    model: torch.nn.Module,
    root: str | os.PathLike,
    preprocess: Callable[[Any], torch.Tensor],
    *,
    what: str = "image folder",
    **kwargs: Any,
) -> ImageFeatures:
    """Features of an image folder with one sub-folder per class (see `extract_image_features` for kwargs).

    An empty class folder, or a class none of whose images can be read, raises ValueError: a class
    without examples cannot be probed or scored. `what` names the folder in errors (e.g. "--train").
    """
    listing = ImageFolder(root)  # raises for a missing folder or one without images
    if listing.classes is None:
        raise ValueError(f"{what} {os.fspath(root)!r} needs one sub-folder per class, found images at its top level")
    sub_folders = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    empty = [name for name in sub_folders if name not in listing.classes]
    if empty:
        raise ValueError(
            f"{what} {os.fspath(root)!r}: class folder(s) {empty} contain no images "
            f"(remove them, or add images with extensions of fastclip.data.IMAGE_EXTENSIONS)"
        )
    result = extract_image_features(
        model, listing.paths, preprocess, targets=listing.targets, classes=listing.classes, **kwargs
    )
    present = set(result.targets.tolist())
    unreadable = [name for i, name in enumerate(listing.classes) if i not in present]
    if unreadable:
        raise ValueError(f"{what} {os.fspath(root)!r}: no image of class(es) {unreadable} could be read")
    return result


@torch.no_grad()
def extract_text_features(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    amp: bool = True,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    progress: bool | None = None,
    desc: str = "encode texts",
) -> torch.Tensor:
    """Unit-norm float32 text features [T, D] on the CPU, cached like image features (the keyword
    arguments mean what they mean for `extract_image_features`)."""
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoder = _Encoder(model, amp=amp, cache_dir=cache_dir, progress=progress, desc=desc)

    def key_parts() -> tuple[str, ...]:
        texts_hash = hashlib.blake2b("\0".join(texts).encode(), digest_size=16).hexdigest()
        tokenizer_id = f"{type(tokenizer).__qualname__}|{getattr(tokenizer, 'context_length', '')}"
        return model_id or text_tower_fingerprint(model), texts_hash, tokenizer_id

    path = encoder.cache_file("text", key_parts)
    cached = _load_cached(path) if path is not None else None
    if cached is not None and "features" in cached[0] and cached[0]["features"].shape[0] == len(texts):
        return cached[0]["features"]
    rows = []
    with encoder.evaluating():
        for start in encoder.bar(range(0, len(texts), batch_size)):
            tokens = tokenizer(texts[start : start + batch_size]).to(encoder.device)
            rows.append(encoder.rows(model.encode_text, tokens))
    features = torch.cat(rows)
    if path is not None:
        _save_cached(path, {"features": features}, {"count": str(len(texts))})
    return features
