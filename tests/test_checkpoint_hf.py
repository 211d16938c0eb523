"""Hugging Face transformers CLIP checkpoints, both ways, against transformers' own CLIPModel.

Load: tiny random `CLIPModel`s built and saved by transformers (QuickGELU and GELU, safetensors, a
pytorch_model.bin and shards) load into fastclip with the features of transformers'
`get_image_features` / `get_text_features`. Export: a random fastclip model written by
`save_transformers` loads with `CLIPModel.from_pretrained` with the same features, and its tokenizer
files give fastclip's token ids through transformers' `CLIPTokenizer`. Configs fastclip cannot run
the same way are refused, naming the field.

Tolerance: 1e-4 absolute on unnormalised fp32 features of magnitude ~1: the two implementations run
the same arithmetic in different orders (fused vs separate q/k/v projections, attention kernels), so
they agree to float32 rounding (measured 0 to 1.5e-6), not always bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers import CLIPConfig as HFCLIPConfig

import fastclip
from fastclip.checkpoint import CheckpointError, save_transformers
from fastclip.cli import main as cli_main
from fastclip.data import CLIPPreprocess
from fastclip.model import CLIP, create_model, load_checkpoint

ATOL = 1e-4
CONTEXT = 16
CAPTIONS = [
    "a photo of a cat",
    "Two DOGS playing   in the snow, at night!",
    "it's 3 o'clock: naïve café in 東京",
    "x",
]


def hf_model(act: str = "quick_gelu", **text_overrides) -> CLIPModel:
    """A tiny transformers CLIPModel with every weight randomised (its init zeroes biases and sets
    LayerNorms to identity, which would hide a swapped bias or LayerNorm), in eval mode."""
    config = HFCLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT,
            hidden_act=act,
            **text_overrides,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=32,
            patch_size=8,
            hidden_act=act,
        ),
        projection_dim=24,
    )
    model = CLIPModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def hf_features(model: CLIPModel, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        image = model.get_image_features(pixel_values=images)
        text = model.get_text_features(input_ids=ids)
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projected feature;
    # 4.x returned the tensor itself
    return getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)


def fastclip_features(model: CLIP, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(images, normalize=False), model.encode_text(ids, normalize=False)


def inputs(image_size: int, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(3, 3, image_size, image_size)
    ids = fastclip.ClipTokenizer(context_length=context_length)(CAPTIONS)  # 0-padded after the end token
    return images, ids


def assert_same_features(ours: CLIP, theirs: CLIPModel, ids: torch.Tensor | None = None) -> float:
    """Compare unnormalised image and text features; returns the largest absolute difference."""
    images, default_ids = inputs(ours.image_size, ours.config.text.context_length)
    ids = default_ids if ids is None else ids
    diffs = []
    for got, want in zip(fastclip_features(ours, images, ids), hf_features(theirs, images, ids)):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        diffs.append((got - want).abs().max().item())
    return max(diffs)


def random_fastclip(config) -> CLIP:
    model = create_model(config, attn_backend="torch")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_transformers_folder_loads_with_transformers_features(act: str, tmp_path: Path) -> None:
    reference = hf_model(act)
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = load_checkpoint(tmp_path, attn_backend="torch").eval()
    assert model.config.act == act
    assert model.config.embed_dim == 24 and model.config.text.context_length == CONTEXT
    assert (model.config.vision.width, model.config.vision.heads, model.config.vision.patch_size) == (48, 3, 8)
    assert (model.config.text.width, model.config.text.heads, model.config.text.mlp_ratio) == (32, 4, 2.5)
    assert_same_features(model, reference)
    assert model.logit_scale.item() == reference.logit_scale.item()
    # the weights file itself, with config.json beside it, and create_model's pretrained= are the same
    for loaded in (
        load_checkpoint(tmp_path / "model.safetensors", attn_backend="torch"),
        create_model(None, pretrained=tmp_path, attn_backend="torch"),
    ):
        assert loaded.config == model.config
        assert_same_features(loaded.eval(), reference)


def test_pytorch_model_bin_and_shards_load(tmp_path: Path) -> None:
    reference = hf_model("gelu")
    bin_folder = tmp_path / "bin"
    reference.config.save_pretrained(bin_folder)
    torch.save(reference.state_dict(), bin_folder / "pytorch_model.bin")  # what transformers 4.x wrote
    assert_same_features(load_checkpoint(bin_folder, attn_backend="torch").eval(), reference)
    assert_same_features(load_checkpoint(bin_folder / "pytorch_model.bin", attn_backend="torch").eval(), reference)
    # the reference reads that folder too: it is a real transformers checkpoint
    loaded_by_transformers = CLIPModel.from_pretrained(bin_folder).eval()
    assert_same_features(load_checkpoint(bin_folder, attn_backend="torch").eval(), loaded_by_transformers)

    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    assert_same_features(load_checkpoint(sharded, attn_backend="torch").eval(), reference)


def test_legacy_configs_load(tmp_path: Path) -> None:
    """What configs saved by early transformers versions (openai/clip-vit-* on the Hub) hold: eos_token_id 2,
    meaning "pool at the argmax of the ids", and `text_config_dict`, which overrides `text_config`."""
    reference = hf_model(eos_token_id=2)
    reference.save_pretrained(tmp_path)
    assert_same_features(load_checkpoint(tmp_path, attn_backend="torch").eval(), reference)
    data = json.loads((tmp_path / "config.json").read_text())
    data["text_config_dict"] = dict(data["text_config"])  # over transformers' defaults, not over text_config
    data["text_config"]["hidden_size"] = 999
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert CLIPModel.from_pretrained(tmp_path).config.text_config.hidden_size == 32  # transformers' reading
    assert_same_features(load_checkpoint(tmp_path, attn_backend="torch").eval(), reference)


def test_fp16_transformers_weights_load_into_fp32(tmp_path: Path) -> None:
    reference = hf_model().half()
    reference.save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path, attn_backend="torch").eval()
    assert model.dtype == torch.float32
    assert_same_features(model, reference.float())


# ---------------------------------------------------------------------------------------------- export


EXPORTED = [
    "tiny-ViT",  # QuickGELU, 77 tokens, 64-channel heads
    {  # GELU, non-default head width and MLP ratios
        "embed_dim": 24,
        "act": "gelu",
        "vision": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 16, "head_width": 16, "mlp_ratio": 2.5},
        "text": {
            "context_length": CONTEXT,
            "vocab_size": 49408,
            "width": 32,
            "heads": 4,
            "layers": 2,
            "mlp_ratio": 3.0,
        },
    },
]


@pytest.mark.parametrize("config", EXPORTED, ids=["tiny-ViT", "gelu-small"])
def test_export_loads_in_transformers_with_the_same_features(config, tmp_path: Path) -> None:
    model = random_fastclip(config)
    assert save_transformers(model, tmp_path / "out") == tmp_path / "out"
    reference = CLIPModel.from_pretrained(tmp_path / "out").eval()
    assert reference.config.text_config.hidden_act == reference.config.vision_config.hidden_act == model.config.act
    assert_same_features(model, reference)
    # ids as transformers' tokenizer pads them (with the end token, not 0) give the same features too
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "out")
    padded = tokenizer(
        CAPTIONS,
        padding="max_length",
        truncation=True,
        max_length=model.config.text.context_length,
        return_tensors="pt",
    )["input_ids"]
    assert_same_features(model, reference, ids=padded)
    assert reference.logit_scale.item() == model.logit_scale.item()
    # and back: the same config, bit-identical weights
    loaded = load_checkpoint(tmp_path / "out", attn_backend="torch")
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_exported_tokenizer_gives_fastclip_ids(tmp_path: Path) -> None:
    model = random_fastclip("tiny-ViT")
    save_transformers(model, tmp_path)
    theirs = CLIPTokenizer.from_pretrained(tmp_path)
    ours = fastclip.ClipTokenizer()
    assert theirs.model_max_length == 77
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.sot_token_id, ours.eot_token_id) == (49406, 49407)
    for caption in CAPTIONS:
        expected = ours([caption])[0]
        assert theirs(caption)["input_ids"] == expected[: int((expected != 0).sum())].tolist(), caption
    # CLIPProcessor reads the folder too, and its image processing is fastclip's preprocessing: the PIL
    # backend resizes with PIL's bicubic filter as fastclip does (the torchvision one differs slightly)
    image_processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    for height, width in ((32, 32), (40, 56)):  # as it is; resized (short side) and centre-cropped
        image = Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy())
        pixels = image_processor(images=image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixels, CLIPPreprocess(32)(image)[None], rtol=0, atol=1e-5)
    batch = CLIPProcessor.from_pretrained(tmp_path)(text=["a cat"], images=image, return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert batch["input_ids"].tolist() == [[49406, 320, 2368, 49407]]


def test_export_refuses_what_transformers_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no ResNet image tower"):
        save_transformers(create_model("tiny-RN"), tmp_path / "rn")
    small_vocab = {**EXPORTED[1], "text": {**EXPORTED[1]["text"], "vocab_size": 1000}}
    model = random_fastclip(small_vocab)
    with pytest.raises(ValueError, match="vocab_size is 1000.*processor=False"):
        save_transformers(model, tmp_path / "vocab")
    assert not (tmp_path / "vocab").exists()  # refused before writing anything
    save_transformers(model, tmp_path / "vocab", processor=False)  # weights and config only
    assert sorted(p.name for p in (tmp_path / "vocab").iterdir()) == ["config.json", "model.safetensors"]
    ids = torch.tensor([[998, 5, 17, 999, 0], [998, 3, 999, 0, 0]])  # the end token is the highest id, 999
    assert_same_features(model, CLIPModel.from_pretrained(tmp_path / "vocab").eval(), ids=ids)
    with pytest.raises(TypeError, match="needs a fastclip CLIP model"):
        save_transformers(torch.nn.Linear(2, 2), tmp_path / "linear")


# ---------------------------------------------------------------------------------------------- errors


def edit_config(folder: Path, **changes) -> None:
    """Apply "tower.field"-style changes to a saved config.json."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        *tower, field = key.split(".")
        (data[tower[0]] if tower else data)[field] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"text_config.hidden_act": "gelu_new", "vision_config.hidden_act": "gelu_new"},
            r"text_config\.hidden_act is 'gelu_new'; fastclip's CLIP supports 'quick_gelu' and 'gelu'",
        ),
        ({"vision_config.hidden_act": "gelu"}, r"one activation in both towers"),
        (
            {"vision_config.layer_norm_eps": 1e-6},
            r"vision_config\.layer_norm_eps is 1e-06; fastclip's LayerNorms use 1e-05",
        ),
        ({"text_config.eos_token_id": 7}, r"text_config\.eos_token_id is 7, not the highest id"),
        ({"vision_config.num_channels": 1}, r"vision_config\.num_channels is 1"),
        ({"vision_config.patch_size": [8, 4]}, r"vision_config\.patch_size is \[8, 4\]"),
        ({"model_type": "siglip"}, r"not a transformers CLIP config: model_type is 'siglip'"),
    ],
    ids=["activation", "mixed-activations", "layer-norm-eps", "eos-token", "channels", "patch", "model-type"],
)
def test_unsupported_configs_name_the_field(changes: dict, message: str, tmp_path: Path) -> None:
    hf_model().save_pretrained(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_folder_and_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hf = tmp_path / "hf"
    hf_model().save_pretrained(hf)
    # a folder without config.json: one clear line, from the API and from the command line
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = (
        f"checkpoint {empty} is not a regular file, nor a Hugging Face transformers model folder "
        "(it has no config.json)"
    )
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(empty)
    assert str(error.value) == expected
    capsys.readouterr()  # drop transformers' progress bars
    assert cli_main(["zero-shot", "--checkpoint", str(empty), "--images", str(empty), "--labels", "a,b"]) == 2
    assert capsys.readouterr().err == f"fastclip zero-shot: error: {expected}\n"
    # weights taken out of their folder
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(hf / "model.safetensors", alone)
    message = r"transformers CLIP weights .* config\.json .* does not exist: pass the model folder"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(alone / "model.safetensors")
    # config.json without weights
    shutil.copy(hf / "config.json", alone / "config.json")
    (alone / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no PyTorch weights .*it holds: config\.json"):
        load_checkpoint(alone)
    # fastclip's own config.json (a training run's folder) is not mistaken for transformers'
    (alone / "config.json").write_text(create_model("tiny-ViT").config.to_json())
    with pytest.raises(CheckpointError, match="looks like fastclip's own config"):
        load_checkpoint(alone)
    # a missing and a foreign tensor are named in transformers' terms
    state = load_file(hf / "model.safetensors")
    del state["vision_model.post_layernorm.bias"]
    state["vision_model.head.weight"] = torch.zeros(2)
    save_file(state, hf / "model.safetensors", metadata={"format": "pt"})
    message = (
        r"missing keys: vision_model\.post_layernorm\.bias; "
        r"keys fastclip's CLIP has no place for: vision_model\.head\.weight"
    )
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(hf)


def test_requested_config_must_match_the_folder(tmp_path: Path) -> None:
    hf_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="saved for a different config"):
        create_model("tiny-ViT", pretrained=tmp_path)


def test_zero_shot_command_reads_a_transformers_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hf_model().save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 36), (200 * i, 30, 90)).save(images / f"{i}.png")
    code = cli_main(
        [
            "zero-shot",
            "--checkpoint",
            str(tmp_path / "model"),
            "--images",
            str(images),
            "--labels",
            "red,blue",
            "--workers",
            "0",
        ]
    )
    assert code == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # one prediction line per image
