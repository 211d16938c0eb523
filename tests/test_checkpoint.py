"""Checkpoints: OpenAI's layouts (plain state dict, TorchScript archive) and open_clip's (DDP prefix,
training wrapper, attn_mask buffer, CustomTextCLIP's `text.` tower) written by the tests themselves load
back with the same features; the inferred config equals the original; fastclip's safetensors format
round-trips and is written atomically; bad files give clear errors; the pretrained cache never touches
the network here.

Tolerance: reloaded weights are bit-identical copies, so features are compared exactly (atol 0), on the
same backend and dtype.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch

import fastclip.checkpoint.files as files_module
import fastclip.checkpoint.pretrained as pretrained_module
from fastclip.checkpoint import (
    PRETRAINED,
    CheckpointError,
    download_pretrained,
    infer_config,
    load_state_dict,
    save_checkpoint,
)
from fastclip.model import CLIP, create_model, load_checkpoint

TINY = ("tiny-ViT", "tiny-RN")
EOT = 49407


def random_model(name: str) -> CLIP:
    """A tiny model with every weight and BatchNorm statistic perturbed away from its init, in eval mode."""
    model = create_model(name, attn_backend="torch")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif n.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model.eval()


def features(model: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, model.image_size, model.image_size, generator=gen)
    text = torch.randint(1, EOT - 1, (3, 77), generator=gen)
    for row, n in enumerate((4, 11, 7)):
        text[row, n - 1], text[row, n:] = EOT, 0
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(text)


def assert_same_model(loaded: CLIP, original: CLIP) -> None:
    loaded.eval()
    assert loaded.config == original.config
    for got, want in zip(features(loaded), features(original)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def openai_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


class _Holder(torch.nn.Module):
    """Holds named tensors at dotted paths, like OpenAI's CLIP module does, for a TorchScript archive."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in tensors.items():
            *path, leaf = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            if value.is_floating_point() and value.dim() > 0:
                module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
            else:
                module.register_buffer(leaf, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.logit_scale


def write_torchscript(state: dict[str, torch.Tensor], path: Path, resolution: int) -> None:
    # OpenAI's archives also hold these three non-parameter entries in their state dict
    extra = {
        "input_resolution": torch.tensor(resolution),
        "context_length": torch.tensor(77),
        "vocab_size": torch.tensor(49408),
    }
    with warnings.catch_warnings():  # TorchScript is deprecated; OpenAI's files still are TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_Holder({**state, **extra})), str(path))


# ------------------------------------------------------------------------------------------ OpenAI layout


@pytest.mark.parametrize("name", TINY)
def test_openai_state_dict_loads_with_inferred_config(name: str, tmp_path: Path) -> None:
    model = random_model(name)
    path = tmp_path / "openai.pt"
    torch.save(openai_state_dict(model), path)
    loaded = load_checkpoint(path, attn_backend="torch")
    assert_same_model(loaded, model)  # includes: inferred config == original config
    assert infer_config(openai_state_dict(model)) == model.config
    assert_same_model(create_model(name, pretrained=path, attn_backend="torch"), model)


@pytest.mark.parametrize("name", TINY)
def test_openai_torchscript_archive_loads(name: str, tmp_path: Path) -> None:
    model = random_model(name)
    path = tmp_path / f"{name}.pt"
    write_torchscript(openai_state_dict(model), path, model.image_size)
    loaded = load_checkpoint(path, attn_backend="torch")
    assert_same_model(loaded, model)


def test_fp16_openai_weights_load_into_an_fp32_model(tmp_path: Path) -> None:
    """OpenAI's archives store fp16 weights; they load (converted) into the model's dtype."""
    model = random_model("tiny-ViT")
    path = tmp_path / "fp16.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    loaded = load_checkpoint(path)
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, model.state_dict()[key].half().float(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- open_clip layout


@pytest.mark.parametrize("name", TINY)
def test_open_clip_training_checkpoint_loads(name: str, tmp_path: Path) -> None:
    model = random_model(name)
    state = openai_state_dict(model)
    state["attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)  # open_clip's (older) persistent buffer
    state["logit_scale"] = state["logit_scale"].reshape(1)  # some open_clip versions: shape [1]
    checkpoint = {"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in state.items()}}
    path = tmp_path / "epoch_3.pt"
    torch.save(checkpoint, path)
    assert_same_model(load_checkpoint(path, attn_backend="torch"), model)
    assert_same_model(create_model(name, pretrained=str(path), attn_backend="torch"), model)


def test_open_clip_custom_text_layout_loads(tmp_path: Path) -> None:
    model = random_model("tiny-ViT")
    text_names = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    state = {("text." + k if k.startswith(text_names) else k): v for k, v in openai_state_dict(model).items()}
    state["text.attn_mask"] = torch.zeros(77, 77)
    torch.save(state, tmp_path / "custom_text.pt")
    assert_same_model(load_checkpoint(tmp_path / "custom_text.pt", attn_backend="torch"), model)
    # a text tower fastclip does not have (Hugging Face) is refused by name, not loaded partially
    state["text.transformer.embeddings.word_embeddings.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "hf_text.pt")
    with pytest.raises(CheckpointError, match="text tower fastclip does not implement.*text.transformer.embeddings"):
        load_checkpoint(tmp_path / "hf_text.pt")


# ------------------------------------------------------------------------------------------ fastclip format


@pytest.mark.parametrize("name", TINY)
def test_safetensors_round_trip(name: str, tmp_path: Path) -> None:
    model = random_model(name)
    model.config.act = "gelu"  # a config detail the shapes cannot tell: the file must carry it
    model = create_model(model.config, attn_backend="torch").eval()
    path = save_checkpoint(model, tmp_path / "model.safetensors", metadata={"note": "test"})
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left
    loaded = load_checkpoint(path, attn_backend="torch")
    assert loaded.config.act == "gelu"
    assert_same_model(loaded, model)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["note"] == "test" and json.loads(metadata["fastclip_config"])["act"] == "gelu"
    # the named config agrees with the file: fine; a different architecture: a clear error
    assert_same_model(create_model(name, pretrained=path, attn_backend="torch"), model)
    other = "tiny-RN" if name == "tiny-ViT" else "tiny-ViT"
    with pytest.raises(ValueError, match="saved for a different config"):
        create_model(other, pretrained=path)


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    first = random_model("tiny-ViT")
    save_checkpoint(first, path)
    before = path.read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(random_model("tiny-ViT"), path)
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # and the partial one is gone
    monkeypatch.undo()
    second = random_model("tiny-ViT")
    save_checkpoint(second, path)  # overwriting works
    assert_same_model(load_checkpoint(path, attn_backend="torch"), second)


# ---------------------------------------------------------------------------------------------- bad files


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path: Path) -> None:
    state = openai_state_dict(random_model("tiny-ViT"))
    cases = {
        "missing keys: visual.ln_post.bias": {k: v for k, v in state.items() if k != "visual.ln_post.bias"},
        "unexpected keys: visual.extra_head.weight": {**state, "visual.extra_head.weight": torch.zeros(2)},
        r"shape mismatches: ln_final.weight \(64,\) in the file, \(128,\) in the model": {
            **state,
            "ln_final.weight": torch.ones(64),
        },
    }
    for message, broken in cases.items():
        path = tmp_path / "broken.pt"
        torch.save(broken, path)
        with pytest.raises(CheckpointError, match=f"{path}.*{message}"):
            create_model("tiny-ViT", pretrained=path)
    # loading a ViT checkpoint into a ResNet lists the first few of the many keys, never a partial load
    torch.save(state, tmp_path / "vit.pt")
    expected = r"missing keys: visual\.bn1\.weight.*\(\d+ in all\); unexpected keys: visual\.class_embedding"
    with pytest.raises(CheckpointError, match=expected):
        create_model("tiny-RN", pretrained=tmp_path / "vit.pt")


@pytest.mark.parametrize("kind", ["torch.save", "torchscript", "safetensors"])
def test_truncated_file_is_named_in_the_error(kind: str, tmp_path: Path) -> None:
    model = random_model("tiny-ViT")
    path = tmp_path / f"model.{kind}"
    if kind == "torch.save":
        torch.save(model.state_dict(), path)
    elif kind == "torchscript":
        write_torchscript(model.state_dict(), path, model.image_size)
    else:
        save_checkpoint(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"could not read checkpoint {path}: the file is truncated or corrupt"):
        load_checkpoint(path)


def test_non_checkpoint_files_give_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello, this is not a model\n")
    with pytest.raises(CheckpointError, match=f"{text} is not a checkpoint"):
        load_checkpoint(text)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(empty)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_checkpoint(listing)
    other = tmp_path / "resnet_classifier.pt"
    torch.save({"conv.weight": torch.zeros(2, 3, 1, 1), "fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(CheckpointError, match="cannot infer a CLIP config.*token_embedding.weight"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("tiny-ViT", pretrained=tmp_path / "nowhere.pt")


def test_load_state_dict_returns_fastclip_names(tmp_path: Path) -> None:
    model = random_model("tiny-RN")
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "a.pt")
    state, config = load_state_dict(tmp_path / "a.pt")
    assert config is None and set(state) == set(model.state_dict())


# -------------------------------------------------------------------------------------- released weights


def test_released_openai_table() -> None:
    for name in ("RN50", "RN101", "RN50x4", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"):
        url, sha256 = PRETRAINED[(name, "openai")]
        assert url.startswith("https://openaipublic.azureedge.net/clip/models/") and sha256 in url
        assert len(sha256) == 64 and int(sha256, 16) >= 0


@pytest.fixture
def fake_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A ("tiny-ViT", "test") release whose file is a tiny model's weights; downloads are forbidden."""
    source = tmp_path / "source.pt"
    model = random_model("tiny-ViT")
    torch.save(openai_state_dict(model), source)
    sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setitem(PRETRAINED, ("tiny-ViT", "test"), (f"https://example.invalid/{sha256}/tiny.pt", sha256))
    cache = tmp_path / "cache"
    monkeypatch.setenv("FASTCLIP_CACHE_DIR", str(cache))

    def no_network(url: str, dest: Path) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(pretrained_module, "_download", no_network)
    return model, source, cache / "test" / "tiny.pt"


def test_pretrained_tag_uses_a_verified_cached_file(fake_release) -> None:
    model, source, cached = fake_release
    cached.parent.mkdir(parents=True)
    cached.write_bytes(source.read_bytes())  # placed by hand: no download needed
    assert_same_model(create_model("tiny-ViT", pretrained="test", attn_backend="torch"), model)


def test_pretrained_download_without_network_is_a_clear_error(fake_release) -> None:
    _, _, cached = fake_release
    with pytest.raises(RuntimeError, match=f"could not download the test weights of tiny-ViT.*put it at {cached}"):
        create_model("tiny-ViT", pretrained="test")
    assert not any(cached.parent.iterdir())  # no partial file left in the cache


def test_pretrained_download_is_verified(fake_release, monkeypatch: pytest.MonkeyPatch) -> None:
    model, source, cached = fake_release
    monkeypatch.setattr(pretrained_module, "_download", lambda url, dest: Path(dest).write_bytes(b"garbage"))
    with pytest.raises(RuntimeError, match="sha256"):
        download_pretrained("tiny-ViT", "test")
    assert not cached.exists()
    monkeypatch.setattr(pretrained_module, "_download", lambda url, dest: Path(dest).write_bytes(source.read_bytes()))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"stale")  # a corrupt cached copy is replaced
    assert download_pretrained("tiny-ViT", "test") == cached
    assert_same_model(create_model("tiny-ViT", pretrained="test", attn_backend="torch"), model)


def test_unknown_pretrained_tag_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"neither a file nor a released tag of 'ViT-B-32' \(its tags: \['openai'\]\)"):
        create_model("ViT-B-32", pretrained="laion9000")


def test_files_module_has_no_network_code() -> None:
    assert not hasattr(files_module, "urllib")
