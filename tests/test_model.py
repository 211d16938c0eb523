"""The CLIP model: configs and registry, forward shapes, agreement with an independent float64 functional
reference of OpenAI's CLIP, text trimming, the Triton attention backend, gradient checkpointing, errors.

Tolerances (stated once): float64 comparisons of mathematically identical computations use 1e-10
absolute error on unit-scale features; fp32 Triton-vs-PyTorch uses 1e-4 (measured ~3e-7).

As in test_attention.py, on a machine without a GPU this module sets TRITON_INTERPRET=1 before the Triton
kernels are first defined, so `attn_backend="triton"` runs the kernels on CPU tensors.
"""

from __future__ import annotations

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastclip.model.config as config_module  # noqa: E402
from fastclip.backends import triton_available  # noqa: E402
from fastclip.model import CLIP, CLIPConfig, create_model, get_model_config, list_models, register_model_config  # noqa: E402
from fastclip.model.text_transformer import trimmed_length  # noqa: E402
from fastclip.model.transformer import QuickGELU  # noqa: E402

TINY = ("tiny-ViT", "tiny-RN")
EOT = 49407
F64_ATOL = 1e-10
# Parameter counts (millions, 2 decimals) of OpenAI's models, as open_clip's model table lists them.
PARAMS_M = {
    "RN50": 102.01,
    "RN101": 119.69,
    "RN50x4": 178.30,
    "RN50x16": 290.98,
    "RN50x64": 623.26,
    "ViT-B-32": 151.28,
    "ViT-B-16": 149.62,
    "ViT-L-14": 427.62,
    "ViT-L-14-336": 427.94,
}


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every weight and BatchNorm statistic: default inits (zero biases, zero last-BN scales,
    unit statistics) would hide wrong wiring."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model


def tiny_model(name: str, dtype: torch.dtype = torch.float64, **kwargs) -> CLIP:
    return randomize_(create_model(name, dtype=dtype, **kwargs)).eval()


def make_text(lengths: list[int], context: int = 77) -> torch.Tensor:
    """Token ids like the tokenizer's: random words, the end-of-text id last, then zero padding."""
    text = torch.randint(1, EOT - 1, (len(lengths), context))
    for row, n in enumerate(lengths):
        text[row, n - 1] = EOT
        text[row, n:] = 0
    return text


def images(model: CLIP, batch: int = 3, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, model.image_size, model.image_size, dtype=dtype)


# ------------------------------------------------------------- an independent reference (OpenAI's math)


def _ln(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"])


def _ref_transformer(x, sd, prefix, heads, act, causal):
    """x (S, B, W), OpenAI's layout; attention by torch's own multi_head_attention_forward."""
    mask = torch.full((x.shape[0],) * 2, float("-inf"), dtype=x.dtype).triu(1) if causal else None
    i = 0
    while f"{prefix}resblocks.{i}.ln_1.weight" in sd:
        p = f"{prefix}resblocks.{i}."
        h = _ln(x, sd, p + "ln_1")
        x = (
            x
            + F.multi_head_attention_forward(
                h,
                h,
                h,
                h.shape[-1],
                heads,
                sd[p + "attn.in_proj_weight"],
                sd[p + "attn.in_proj_bias"],
                None,
                None,
                False,
                0.0,
                sd[p + "attn.out_proj.weight"],
                sd[p + "attn.out_proj.bias"],
                training=False,
                need_weights=False,
                attn_mask=mask,
            )[0]
        )
        h = F.linear(_ln(x, sd, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h) if act == "quick_gelu" else F.gelu(h)
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        i += 1
    return x


def ref_encode_text(sd, cfg: CLIPConfig, text):
    """Untrimmed: all context positions, OpenAI's additive causal mask."""
    x = sd["token_embedding.weight"][text] + sd["positional_embedding"][: text.shape[1]]
    x = _ref_transformer(x.transpose(0, 1), sd, "transformer.", cfg.text.heads, cfg.act, True).transpose(0, 1)
    x = _ln(x, sd, "ln_final")
    return x[torch.arange(len(text)), text.argmax(-1)] @ sd["text_projection"]


def ref_encode_image_vit(sd, cfg: CLIPConfig, image):
    x = F.conv2d(image, sd["visual.conv1.weight"], stride=cfg.vision.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre").transpose(0, 1)
    x = _ref_transformer(x, sd, "visual.transformer.", cfg.vision.heads, cfg.act, False)
    return _ln(x[0], sd, "visual.ln_post") @ sd["visual.proj"]


def ref_encode_image_resnet(sd, cfg: CLIPConfig, image):
    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"])

    x = F.relu(bn(F.conv2d(image, sd["visual.conv1.weight"], stride=2, padding=1), "visual.bn1"))
    x = F.relu(bn(F.conv2d(x, sd["visual.conv2.weight"], padding=1), "visual.bn2"))
    x = F.avg_pool2d(F.relu(bn(F.conv2d(x, sd["visual.conv3.weight"], padding=1), "visual.bn3")), 2)
    for stage, depth in enumerate(cfg.vision.layers, start=1):
        for j in range(depth):
            p, stride = f"visual.layer{stage}.{j}.", 2 if stage > 1 and j == 0 else 1
            out = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"]), p + "bn1"))
            out = F.relu(bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), p + "bn2"))
            out = bn(F.conv2d(F.avg_pool2d(out, stride), sd[p + "conv3.weight"]), p + "bn3")
            if p + "downsample.0.weight" in sd:
                x = bn(F.conv2d(F.avg_pool2d(x, stride), sd[p + "downsample.0.weight"]), p + "downsample.1")
            x = F.relu(out + x)
    x = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
    x = torch.cat([x.mean(0, keepdim=True), x]) + sd["visual.attnpool.positional_embedding"][:, None]
    a = "visual.attnpool."
    out = F.multi_head_attention_forward(
        x[:1],
        x,
        x,
        x.shape[-1],
        cfg.vision.heads,
        None,
        torch.cat([sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"]]),
        None,
        None,
        False,
        0.0,
        sd[a + "c_proj.weight"],
        sd[a + "c_proj.bias"],
        training=False,
        need_weights=False,
        use_separate_proj_weight=True,
        q_proj_weight=sd[a + "q_proj.weight"],
        k_proj_weight=sd[a + "k_proj.weight"],
        v_proj_weight=sd[a + "v_proj.weight"],
    )[0]
    return out[0]


# ------------------------------------------------------------------------------------- configs, registry


def test_registry_lists_the_released_architectures_and_tiny_ones() -> None:
    names = list_models()
    for name in (*PARAMS_M, *TINY):
        assert name in names
    assert get_model_config("ViT-B/32") == get_model_config("ViT-B-32")  # OpenAI's spelling
    assert get_model_config("ViT-L/14@336px") == get_model_config("ViT-L-14-336")


def test_unknown_model_name_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'; available models: ") as info:
        create_model("ViT-Q-99")
    listed = str(info.value).split("available models: ")[1].split(", ")
    assert listed == list_models() and {"RN50", "ViT-B-32", "demo-ViT", "tiny-ViT"} <= set(listed)


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_released_architectures_have_the_published_parameter_counts(name: str) -> None:
    model = create_model(name, device="meta")  # no memory, no init cost
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PARAMS_M[name]
    assert model.config.act == "quick_gelu"  # what OpenAI's weights need


@pytest.mark.parametrize("name", list_models())
def test_config_json_round_trip(name: str) -> None:
    config = get_model_config(name)
    assert CLIPConfig.from_dict(config.to_dict()) == config
    assert CLIPConfig.from_dict(__import__("json").loads(config.to_json())) == config


def test_config_accepts_open_clip_layout_and_rejects_unknown_keys(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(config_module, "_REGISTRY", {})  # register_model_config below stays in this test
    open_clip_style = {
        "embed_dim": 32,
        "quick_gelu": False,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
    }
    config = CLIPConfig.from_dict(open_clip_style)
    assert config.vision.is_resnet and config.vision.layers == (1, 1, 1, 1) and config.act == "gelu"
    with pytest.raises(ValueError, match="unknown config keys.*'embed_dm'"):
        CLIPConfig.from_dict({"embed_dm": 3})
    with pytest.raises(ValueError, match="unknown vision config keys.*'widht'"):
        CLIPConfig.from_dict({"vision": {"widht": 3}})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        CLIPConfig.from_dict({"vision": {"image_size": 30, "patch_size": 8}})
    path = tmp_path / "mine.json"
    path.write_text(config.to_json())
    register_model_config("my-test-model", path)
    assert "my-test-model" in list_models()
    assert create_model(str(path)).config == create_model("my-test-model").config == config


# ------------------------------------------------------------------------------------------- the forward


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_unit_norm(name: str) -> None:
    model = create_model(name).eval()
    embed = model.config.embed_dim
    image, text = images(model, 3, torch.float32), make_text([5, 12, 3, 77])
    image_features, text_features, scale = model(image, text)
    assert image_features.shape == (3, embed) and text_features.shape == (4, embed)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(4), rtol=0, atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-6)  # logit_scale initialised to log(1/0.07)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    per_image, per_text = model.logits(image, text)
    assert per_image.shape == (3, 4) and torch.equal(per_text, per_image.t())
    torch.testing.assert_close(per_image, scale * image_features @ text_features.t())
    raw = model.encode_image(image, normalize=False)
    torch.testing.assert_close(F.normalize(raw, dim=-1), image_features)


@pytest.mark.parametrize("name", TINY)
def test_matches_an_independent_float64_reference(name: str) -> None:
    """fastclip's towers equal OpenAI's math written with torch's functional ops from the state dict."""
    model = tiny_model(name)
    sd, cfg = model.state_dict(), model.config
    image, text = images(model), make_text([4, 30, 9])
    ref_image = (ref_encode_image_resnet if cfg.vision.is_resnet else ref_encode_image_vit)(sd, cfg, image)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image, normalize=False), ref_image, rtol=0, atol=F64_ATOL)
        ref_text = ref_encode_text(sd, cfg, text)
        torch.testing.assert_close(model.encode_text(text, normalize=False), ref_text, rtol=0, atol=F64_ATOL)


def test_gelu_config_uses_gelu() -> None:
    quick = tiny_model("tiny-ViT")
    gelu = create_model("tiny-ViT", act="gelu", dtype=torch.float64).eval()
    gelu.load_state_dict(quick.state_dict())
    assert isinstance(quick.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(gelu.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    text = make_text([6, 9])
    with torch.no_grad():
        ref = ref_encode_text(gelu.state_dict(), gelu.config, text)
        torch.testing.assert_close(gelu.encode_text(text, normalize=False), ref, rtol=0, atol=F64_ATOL)
        assert (gelu.encode_text(text) - quick.encode_text(text)).abs().max() > 1e-4


def test_text_trimming_gives_identical_features() -> None:
    model = tiny_model("tiny-ViT")
    text = make_text([3, 12, 7, 1])
    assert trimmed_length(text) == 12  # the encoder runs 12 positions, not 77
    with torch.no_grad():
        trimmed = model.encode_text(text, normalize=False)
        full = model.encode_text(text, normalize=False, trim=False)
        alone = torch.cat(
            [model.encode_text(text[i : i + 1], normalize=False) for i in range(4)]
        )  # each row trimmed to itself
    torch.testing.assert_close(trimmed, full, rtol=0, atol=F64_ATOL)
    torch.testing.assert_close(alone, full, rtol=0, atol=F64_ATOL)
    torch.testing.assert_close(full, ref_encode_text(model.state_dict(), model.config, text), rtol=0, atol=F64_ATOL)
    assert trimmed_length(torch.zeros(2, 77, dtype=torch.long)) == 1
    # token ids shorter than the context (a tokenizer called with a smaller context) work as well
    torch.testing.assert_close(model.encode_text(text[:, :20]), model.encode_text(text), rtol=0, atol=F64_ATOL)


def test_dtype_and_device_options() -> None:
    model = create_model("tiny-ViT", dtype="bf16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.dtype == torch.bfloat16
    features = model.encode_image(torch.randn(2, 3, 32, 32))  # float32 images are cast to the model's dtype
    assert features.dtype == torch.bfloat16 and torch.isfinite(features).all()
    assert create_model("tiny-RN", dtype=torch.float16).visual.conv1.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        create_model("tiny-ViT", dtype="float8")


# --------------------------------------------------------------------------------- attention backends


@pytest.mark.skipif(ON_GPU or not triton_available(), reason="interpreter test: runs where there is no GPU")
@pytest.mark.parametrize("name", TINY)
def test_triton_backend_matches_torch_backend_interpreted(name: str) -> None:
    torch_model = randomize_(create_model(name, attn_backend="torch")).eval()
    triton_model = create_model(name, attn_backend="triton").eval()
    triton_model.load_state_dict(torch_model.state_dict())
    image, text = images(torch_model, 2, torch.float32), make_text([5, 14, 9])
    grads = []
    for model in (torch_model, triton_model):
        image_features, text_features, _ = model(image, text)
        loss = (image_features.sum(0) * text_features.sum(0)).sum()
        grads.append(
            [image_features, text_features, *torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)]
        )
    for a, b in zip(*grads):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_torch_backend_on_gpu(name: str, dtype: torch.dtype) -> None:
    torch_model = randomize_(create_model(name, attn_backend="torch", device="cuda", dtype=dtype)).eval()
    triton_model = create_model(name, attn_backend="triton", device="cuda", dtype=dtype).eval()
    triton_model.load_state_dict(torch_model.state_dict())
    image, text = images(torch_model, 4, dtype).cuda(), make_text([5, 77, 9, 20]).cuda()
    tol = 1e-2 if dtype == torch.float32 else 4e-2  # fp32 may use TF32 dots; unit-norm features
    with torch.no_grad():
        for a, b in zip(torch_model(image, text)[:2], triton_model(image, text)[:2]):
            torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=tol)


def test_attn_backend_is_validated_and_settable() -> None:
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        create_model("tiny-ViT", attn_backend="flash")
    model = create_model("tiny-RN", attn_backend="torch")
    model.set_attn_backend("auto")
    assert model.visual.attnpool.backend == "auto" and model.transformer.resblocks[1].attn.backend == "auto"


# ---------------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("name", TINY)
def test_grad_checkpointing_gives_the_same_gradients(name: str) -> None:
    plain = tiny_model(name).train()
    checkpointed = tiny_model(name, grad_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    image, text = images(plain, 4), make_text([5, 14, 9, 2])
    calls = []
    block = checkpointed.visual.transformer.resblocks[0] if name == "tiny-ViT" else checkpointed.visual.layer1[0]
    block.register_forward_pre_hook(lambda *_: calls.append(1))  # (the re-run may stop early: count starts)
    results = []
    for model in (plain, checkpointed):
        image_features, text_features, scale = model(image, text)
        logits = scale * image_features @ text_features.t()
        loss = F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))
        loss.backward()
        results.append(({n: p.grad for n, p in model.named_parameters()}, model.state_dict()))
    assert len(calls) == 2  # the block ran again in the backward: checkpointing was on
    (grads, state), (grads_ckpt, state_ckpt) = results
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=0, atol=F64_ATOL, msg=n)
    for n in state:  # BatchNorm statistics updated once, as without checkpointing
        torch.testing.assert_close(state_ckpt[n], state[n], rtol=0, atol=0, msg=n)


# -------------------------------------------------------------------------------------------- bad input


def test_clear_errors_on_bad_input() -> None:
    model = create_model("tiny-ViT")
    with pytest.raises(ValueError, match=r"image must have shape \[batch, 3, 32, 32\]"):
        model.encode_image(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="more than this model's context_length 77"):
        model.encode_text(torch.ones(2, 78, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model.encode_text(torch.ones(2, 7))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 49408\)"):
        model.encode_text(torch.full((1, 5), 49408))
    with pytest.raises(ValueError, match="non-empty"):
        model.encode_text(torch.ones(0, 77, dtype=torch.long))
