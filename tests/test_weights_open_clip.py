"""OpenAI CLIP / open_clip checkpoints (``visual.conv1``, ``visual.transformer.resblocks``...): read into
vitkit and checked against timm's own converter of the same layout."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import _convert_openai_clip

import vitkit
from vitkit.weights import model_from_checkpoint

WIDTH, DEPTH, HEADS, PATCH, SIZE, OUT = 64, 2, 4, 32, 64, 32


def open_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A CLIP model's weights in open_clip's layout: the image tower under visual., a text tower beside."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    d, tokens = WIDTH, (SIZE // PATCH) ** 2 + 1
    state = {
        "visual.class_embedding": t(d),
        "visual.positional_embedding": t(tokens, d),
        "visual.conv1.weight": t(d, 3, PATCH, PATCH),
        "visual.ln_pre.weight": 1 + t(d),
        "visual.ln_pre.bias": t(d),
        "visual.ln_post.weight": 1 + t(d),
        "visual.ln_post.bias": t(d),
        "visual.proj": t(d, OUT),
        "token_embedding.weight": t(100, 32),
        "positional_embedding": t(77, 32),
        "text_projection": t(32, OUT),
        "logit_scale": torch.tensor(4.6),
    }
    for i in range(DEPTH):
        block = f"visual.transformer.resblocks.{i}."
        state |= {
            block + "ln_1.weight": 1 + t(d),
            block + "ln_1.bias": t(d),
            block + "attn.in_proj_weight": t(3 * d, d),
            block + "attn.in_proj_bias": t(3 * d),
            block + "attn.out_proj.weight": t(d, d),
            block + "attn.out_proj.bias": t(d),
            block + "ln_2.weight": 1 + t(d),
            block + "ln_2.bias": t(d),
            block + "mlp.c_fc.weight": t(4 * d, d),
            block + "mlp.c_fc.bias": t(4 * d),
            block + "mlp.c_proj.weight": t(d, 4 * d),
            block + "mlp.c_proj.bias": t(d),
        }
    return state


def timm_reference(state: dict[str, torch.Tensor], arch: str) -> torch.nn.Module:
    """timm's model of the same layout, loaded by timm's own open_clip converter."""
    model = timm.create_model(
        arch, img_size=SIZE, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=OUT
    ).eval()
    model.load_state_dict(_convert_openai_clip(state, model))
    return model


def test_an_open_clip_weights_file_is_clips_image_tower_with_its_projection_as_head(tmp_path):
    state = open_clip_state()
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    model, report = model_from_checkpoint(
        tmp_path / "open_clip_model.safetensors", num_heads=HEADS, return_report=True
    )
    reference = timm_reference(state, "vit_base_patch32_clip_224")  # GELU: open_clip's own models
    assert report.format == "open_clip"
    assert model.config["pre_norm"] and model.num_classes == OUT and model.config["norm_eps"] == 1e-5
    assert any("visual.proj" in note for note in report.notes)
    assert any("text_projection" in note for note in report.notes)  # the text tower is named, not loaded
    assert model.pretrained_cfg["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), atol=1e-5, rtol=1e-5)
    # a fresh classifier instead of the projection
    classifier = vitkit.create_model(
        pretrained=tmp_path / "open_clip_model.safetensors", num_heads=HEADS, num_classes=3
    )
    assert classifier.num_classes == 3


def test_an_open_clip_hub_folder_takes_quick_gelu_heads_and_preprocessing_from_its_config(tmp_path):
    state = open_clip_state(seed=1)
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    config = {
        "model_cfg": {
            "embed_dim": OUT,
            "quick_gelu": True,  # OpenAI's weights
            "vision_cfg": {
                "image_size": SIZE,
                "layers": DEPTH,
                "width": WIDTH,
                "head_width": 16,  # 4 heads of 16: what the tensors do not show
                "patch_size": PATCH,
            },
        },
        "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bicubic"},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    model = model_from_checkpoint(tmp_path).eval()
    assert (model.config["act_layer"], model.config["num_heads"]) == ("quick_gelu", HEADS)
    assert model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
    reference = timm_reference(state, "vit_base_patch32_clip_quickgelu_224")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_a_torchscript_archive_says_how_to_get_its_weights(tmp_path):
    # OpenAI's own CLIP downloads (ViT-B-32.pt) are TorchScript archives, which torch.load refuses safely
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, and says so
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ViT-B-32.pt")
        with pytest.raises(ValueError, match=r"TorchScript archive.*torch.jit.load\(path\).state_dict\(\)"):
            model_from_checkpoint(tmp_path / "ViT-B-32.pt")
