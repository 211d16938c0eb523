"""Released weights: a (model name, tag) table of download URLs with their sha256, and a local cache.

The cache is `$FASTCLIP_CACHE_DIR`, else `$XDG_CACHE_HOME/fastclip`, else `~/.cache/fastclip`. A file
there is used when its sha256 matches (so a file copied in by hand works offline); otherwise it is
downloaded, verified, and moved into place atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

_log = logging.getLogger(__name__)

_OPENAI = "https://openaipublic.azureedge.net/clip/models"
# OpenAI's released CLIP weights (openai/CLIP clip/clip.py `_MODELS`); the URL's folder is the file's sha256.
_OPENAI_FILES = {
    "RN50": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B-32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B-16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L-14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L-14-336": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}

# (model name, tag) -> (url, sha256 of the file)
PRETRAINED: dict[tuple[str, str], tuple[str, str]] = {
    (name, "openai"): (f"{_OPENAI}/{path}", path.split("/")[0]) for name, path in _OPENAI_FILES.items()
}


def list_pretrained(name: str | None = None) -> list[tuple[str, str]]:
    """(model name, tag) pairs with released weights, for `name` only when given."""
    return sorted(key for key in PRETRAINED if name is None or key[0] == name)


def cache_dir() -> Path:
    if os.environ.get("FASTCLIP_CACHE_DIR"):
        return Path(os.environ["FASTCLIP_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastclip"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path) -> None:
    """Fetch `url` into the file `dest` (tests replace this function: they never use the network)."""
    with urllib.request.urlopen(url, timeout=60) as source, open(dest, "wb") as out:
        while chunk := source.read(1 << 20):
            out.write(chunk)


def download_pretrained(name: str, tag: str, *, root: str | os.PathLike | None = None) -> Path:
    """The local path of the released weights (`name`, `tag`), downloading them into the cache if needed."""
    if (name, tag) not in PRETRAINED:
        known = ", ".join(f"{n}:{t}" for n, t in list_pretrained()) or "none"
        raise ValueError(f"no released weights {tag!r} for model {name!r}; known (model:tag): {known}")
    url, sha256 = PRETRAINED[(name, tag)]
    folder = Path(root).expanduser() if root is not None else cache_dir()
    target = folder / tag / url.rsplit("/", 1)[-1]
    if target.is_file():
        if sha256_of(target) == sha256:
            return target
        _log.warning("%s exists but its sha256 does not match; downloading it again", target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RuntimeError(
            f"cannot create the cache folder {target.parent} ({error}); set FASTCLIP_CACHE_DIR"
        ) from error
    partial = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.partial"
    try:
        _log.info("downloading %s to %s", url, target)
        try:
            _download(url, partial)
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            raise RuntimeError(
                f"could not download the {tag} weights of {name} from {url} ({type(error).__name__}: {error}). "
                f"Without network access, fetch that file elsewhere and put it at {target} (its sha256 is checked), "
                f"or pass pretrained=<path to the file>."
            ) from error
        got = sha256_of(partial)
        if got != sha256:
            raise RuntimeError(
                f"the download of {url} has sha256 {got}, expected {sha256}: the file is corrupt or incomplete"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
