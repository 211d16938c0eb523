"""Reading and writing checkpoint files.

Read: OpenAI's TorchScript archives (`torch.jit.load(...).state_dict()`), `torch.save` files (zip or
legacy pickle, loaded with `weights_only=True`) and safetensors files; the format is recognised from the
file's first bytes, not its name. Write: fastclip's own format, a safetensors file holding the weights
and, in its metadata, the model config as JSON. Writes are atomic: a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastclip.model.config import CLIPConfig

CONFIG_METADATA_KEY = "fastclip_config"
_SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit on the JSON header size


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, or whose tensors do not fit the model."""


def read_checkpoint(path: str | os.PathLike) -> tuple[Any, CLIPConfig | None]:
    """The object stored in `path` (usually a state dict) and the config it carries (fastclip files), or None."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    with open(path, "rb") as f:
        head = f.read(9)
    try:
        if head[:4] == b"PK\x03\x04":  # a zip: TorchScript archive or torch.save's default format
            return _read_zip(path), None
        if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < _SAFETENSORS_MAX_HEADER:
            return _read_safetensors(path)
        if head[:1] == b"\x80":  # a pickle: torch.save with _use_new_zipfile_serialization=False
            return torch.load(path, map_location="cpu", weights_only=True), None
    except CheckpointError:
        raise
    except Exception as error:  # each reader raises its own types for truncated or corrupt data
        raise CheckpointError(
            f"could not read checkpoint {path}: the file is truncated or corrupt ({type(error).__name__}: {error})"
        ) from error
    raise CheckpointError(
        f"{path} is not a checkpoint: it is neither a safetensors file, a TorchScript archive nor a torch.save file "
        f"(it starts with {head!r})"
    )


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:  # BadZipFile here when the end of the file is missing
        names = archive.namelist()
    if any("/code/" in name or name.endswith("constants.pkl") for name in names):  # TorchScript
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is how OpenAI released CLIP
            warnings.simplefilter("ignore", DeprecationWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], CLIPConfig | None]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        state_dict = {key: f.get_tensor(key) for key in f.keys()}
    config = None
    if CONFIG_METADATA_KEY in metadata:
        try:
            config = CLIPConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"checkpoint {path} carries an invalid fastclip config: {error}") from error
    return state_dict, config


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write `model` (a fastclip CLIP) to `path` as safetensors with its config; atomic. Returns the path.

    The file is written next to its destination under a temporary name, flushed to disk (fsync) and
    renamed over `path` (os.replace), so an interrupted save leaves the old file or none, never half.
    """
    from safetensors.torch import save_file

    from fastclip.version import __version__

    config = getattr(model, "config", None)
    if not isinstance(config, CLIPConfig):
        raise TypeError(f"save_checkpoint needs a fastclip CLIP model (with a .config), got {type(model).__name__}")
    extra = dict(metadata or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
    meta = {**extra, "format": "pt", CONFIG_METADATA_KEY: config.to_json(), "fastclip_version": __version__}
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}

    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save checkpoint {path}: directory {path.parent} does not exist")
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a temporary file next to `path`, flush it to disk and rename it to `path`.

    The rename (os.replace) is atomic, so an interrupted write leaves the old file or none, never half.
    """
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
