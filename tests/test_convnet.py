"""The plain ConvNet image tower (`vision.conv_widths`): config, forward against a float64 functional
reference, checkpoints, and the exports that cannot hold it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastclip.checkpoint import CheckpointError, save_checkpoint
from fastclip.checkpoint.transformers_format import config_to_transformers
from fastclip.model import CLIPConfig, create_model, get_model_config
from fastclip.model.convnet import ConvNet

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CONFIG = {"embed_dim": 24, "vision": {"image_size": 20, "conv_widths": [4, 6, 8]}, "text": TEXT}


def test_config_sets_the_derived_fields_and_round_trips() -> None:
    config = CLIPConfig.from_dict(CONFIG)
    vision = config.vision
    assert vision.is_convnet and not vision.is_resnet
    assert vision.conv_widths == (4, 6, 8) and vision.layers == 3 and vision.width == 8 and vision.patch_size is None
    assert vision.grid_size == 2  # 20 -> 10 -> 5 -> 2
    assert CLIPConfig.from_dict(config.to_dict()) == config
    assert CLIPConfig.from_dict(__import__("json").loads(config.to_json())) == config
    assert config.to_dict()["vision"]["conv_widths"] == [4, 6, 8]
    demo = get_model_config("demo-CNN")
    assert demo.vision.is_convnet and demo.vision.conv_widths == (16, 32, 64, 128)


@pytest.mark.parametrize(
    ("vision", "match"),
    [
        ({"image_size": 20, "conv_widths": []}, "non-empty list"),
        ({"image_size": 20, "conv_widths": 8}, "non-empty list"),
        ({"image_size": 20, "conv_widths": [4, 0]}, r"conv_widths\[i\] must be a positive int"),
        ({"image_size": 20, "conv_widths": [4, 2.5]}, r"conv_widths\[i\] must be a positive int"),
        ({"image_size": 4, "conv_widths": [4, 4, 4]}, "too small for 3 stages"),
    ],
)
def test_config_rejects_bad_conv_widths(vision, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CLIPConfig.from_dict({**CONFIG, "vision": vision})


def reference_encode_image(sd: dict[str, torch.Tensor], widths, image: torch.Tensor) -> torch.Tensor:
    """The tower's math with torch's functional ops, from the state dict (BatchNorm in eval mode)."""
    x = image
    for i in range(len(widths)):
        p = f"visual.stages.{i}."
        x = F.conv2d(x, sd[p + "conv.weight"], padding=1)
        x = F.batch_norm(x, sd[p + "bn.running_mean"], sd[p + "bn.running_var"], sd[p + "bn.weight"], sd[p + "bn.bias"])
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.mean(dim=(2, 3)), sd["visual.proj.weight"], sd["visual.proj.bias"])


def test_forward_matches_a_float64_functional_reference() -> None:
    torch.manual_seed(0)
    model = create_model(CONFIG, dtype=torch.float64).eval()
    assert isinstance(model.visual, ConvNet)
    with torch.no_grad():  # non-default weights and statistics, so that wrong wiring shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    image = torch.randn(3, 3, 20, 20, dtype=torch.float64)
    with torch.no_grad():
        got = model.encode_image(image, normalize=False)
        want = reference_encode_image(model.state_dict(), CONFIG["vision"]["conv_widths"], image)
    assert got.shape == (3, 24)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    features, _, _ = model(image, torch.zeros(3, 16, dtype=torch.long))
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3, dtype=torch.float64))


def test_trains_and_checkpoints_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model(CONFIG)
    image_features, _, _ = model(torch.randn(4, 3, 20, 20), torch.zeros(4, 16, dtype=torch.long))
    image_features.sum().backward()
    assert all(p.grad is not None for p in model.visual.parameters())
    path = save_checkpoint(model.eval(), tmp_path / "convnet.safetensors")
    loaded = create_model(None, pretrained=path).eval()
    assert loaded.config == model.config and isinstance(loaded.visual, ConvNet)
    image = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(image), model.encode_image(image), rtol=0, atol=0)


def test_wrong_image_size_and_transformers_export_fail_clearly() -> None:
    model = create_model(CONFIG)
    with pytest.raises(ValueError, match=r"image must have shape \[batch, 3, 20, 20\]"):
        model.encode_image(torch.randn(1, 3, 24, 24))
    with pytest.raises(CheckpointError, match="no ConvNet image tower"):
        config_to_transformers(model.config)
