"""Exports round-trip: vitkit safetensors, timm's hub folder, Hugging Face's ViT folder."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open

import vitkit
from vitkit.weights import model_from_checkpoint, read_checkpoint, save

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 3}
PREP = {"mean": (0.1, 0.2, 0.3), "std": (0.3, 0.2, 0.1), "interpolation": "bicubic", "crop_pct": 0.9}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def trained_model(**options) -> vitkit.VisionTransformer:
    model = vitkit.create_model("vit_nano_patch4_32", **{**SMALL, **options})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.pretrained_cfg = {**model.pretrained_cfg, **PREP}
    return model.eval()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"reg_tokens": 2, "no_embed_class": True, "qk_norm": True, "init_values": 0.1, "global_pool": "avg"},
    ],
    ids=["plain", "registers_qk_norm_layerscale"],
)
def test_vitkit_safetensors_round_trip(options, tmp_path):
    model = trained_model(img_size=(32, 48), pos_embed="sincos", **options)  # non-square, fixed positions
    file = save(model, tmp_path / "model.safetensors", label_names=["a", "b", "c"])
    with safe_open(str(file), "pt") as f:
        meta = json.loads(f.metadata()["vitkit"])
    assert meta["config"]["img_size"] == [32, 48] and meta["pretrained_cfg"]["crop_pct"] == 0.9

    loaded, report = model_from_checkpoint(file, return_report=True)
    assert report.format == "vitkit"
    for key in (
        "img_size",
        "pos_embed",
        "global_pool",
        "init_values",
        "model_name",
        "mlp_ratio",
        "num_heads",
    ):
        assert loaded.config[key] == model.config[key], key
    assert loaded.pretrained_cfg["mean"] == PREP["mean"] and loaded.pretrained_cfg["crop_pct"] == 0.9
    assert loaded.pretrained_cfg["label_names"] == ["a", "b", "c"]
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert relative_error(loaded.eval()(x), model(x)) < 1e-6
    # the recorded non-square grid makes resampling correct without old_grid
    wider = model_from_checkpoint(file, img_size=(32, 64), pos_embed="learn")
    assert wider.pos_embed.shape[1] == 4 * 8 + (0 if options else 1)


@pytest.mark.parametrize(
    "options",
    [
        {"reg_tokens": 1, "mlp_ratio": 2.0, "act_layer": "quick_gelu"},
        {
            "reg_tokens": 1,
            "class_token": False,
            "global_pool": "map",
            "act_layer": "gelu_tanh",
        },  # SigLIP's head
    ],
    ids=["registers_quick_gelu", "attention_pool"],
)
def test_timm_folder_round_trip(options, tmp_path):
    model = trained_model(**options)
    folder = save(model, tmp_path / "timm_export", format="timm")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_nano_patch4_32" or timm.is_model(config["architecture"])
    # timm itself builds the model and loads the weights from the folder
    reference = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(reference(x), model(x)) < 1e-5
    assert reference.pretrained_cfg["crop_pct"] == 0.9
    # and vitkit reads it back, options and preprocessing included
    loaded = model_from_checkpoint(folder).eval()
    assert loaded.config["reg_tokens"] == 1 and loaded.pretrained_cfg["mean"] == PREP["mean"]
    assert loaded.config["act_layer"] == options["act_layer"]
    assert loaded.config["global_pool"] == model.config["global_pool"]
    with torch.no_grad():
        assert relative_error(loaded(x), model(x)) < 1e-5


def test_distilled_model_exports_for_timm_and_for_transformers_deit(tmp_path):
    model = trained_model(distilled=True)
    folder = save(model, tmp_path / "timm_export", format="timm")
    assert "distilled" in json.loads((folder / "config.json").read_text())["architecture"]
    reference = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # timm's DeiT class
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(reference(x), model(x)) < 1e-5
        assert relative_error(model_from_checkpoint(folder).eval()(x), model(x)) < 1e-5
    transformers = pytest.importorskip("transformers")
    folder = save(model, tmp_path / "hf_export", format="hf")
    deit = transformers.DeiTForImageClassificationWithTeacher.from_pretrained(folder).eval()
    with torch.no_grad():
        assert relative_error(deit(pixel_values=x).logits, model(x)) < 1e-5


def test_the_attention_kernel_choice_survives_vitkit_files_and_stays_out_of_timm_ones(tmp_path):
    model = trained_model(fused_attn=False)
    loaded = model_from_checkpoint(save(model, tmp_path / "model.safetensors"))
    assert loaded.config["fused_attn"] is False
    assert not any(block.attn.fused_attn for block in loaded.blocks)
    folder = save(model, tmp_path / "timm_export", format="timm")
    assert "fused_attn" not in json.dumps(json.loads((folder / "config.json").read_text()))
    reference = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # timm builds it as is
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(reference(x), model(x)) < 1e-5


def test_timm_export_refuses_an_epsilon_it_cannot_record(tmp_path):
    with pytest.raises(ValueError, match="norm_eps"):
        save(trained_model(norm_eps=1e-12), tmp_path / "x", format="timm")


@pytest.mark.parametrize("format", ["timm", "hf"])
def test_hard_attention_exports_only_where_it_survives(format, tmp_path):
    model = trained_model(attn_mode="hard", hard_k=4)
    with pytest.raises(ValueError, match="attn_mode='hard'"):  # would come back attending softly
        save(model, tmp_path / "x", format=format)
    back = vitkit.create_model(pretrained=save(model, tmp_path / "x.safetensors"))
    assert back.blocks[0].attn.attn_mode == "hard" and back.blocks[0].attn.hard_k == 4


@pytest.mark.parametrize(
    "options",
    [{"norm_eps": 1e-12}, {"img_size": (32, 48), "qkv_bias": False}, {"act_layer": "gelu_tanh"}],
    ids=["hf_eps", "non_square", "gelu_tanh"],
)
def test_hf_folder_round_trip_through_transformers(options, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = trained_model(**options)
    folder = save(model, tmp_path / "hf_export", format="hf", label_names=["cat", "dog", "eel"])
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    }

    reference = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    x = torch.randn(2, 3, *model.img_size)
    with torch.no_grad():
        assert relative_error(reference(pixel_values=x).logits, model(x)) < 1e-5
    assert reference.config.id2label[1] == "dog"
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    assert list(processor.image_mean) == pytest.approx(PREP["mean"])
    assert processor.crop_size["height"] == model.img_size[0]  # crop_pct < 1: resize, then centre crop

    # and back into vitkit: same logits, same preprocessing
    loaded = model_from_checkpoint(folder).eval()
    assert loaded.config["norm_eps"] == model.config["norm_eps"]
    assert loaded.pretrained_cfg["crop_pct"] == pytest.approx(0.9, abs=0.02)
    assert loaded.pretrained_cfg["interpolation"] == "bicubic"
    with torch.no_grad():
        assert relative_error(loaded(x), model(x)) < 1e-5


def test_hf_export_names_what_transformers_cannot_express(tmp_path):
    model = trained_model(reg_tokens=4, init_values=0.1)
    with pytest.raises(ValueError, match=r"reg_tokens=4.*LayerScale"):
        save(model, tmp_path / "hf", format="hf")
    with pytest.raises(ValueError, match="class_token=False"):
        save(trained_model(class_token=False, global_pool="avg"), tmp_path / "hf", format="hf")
    with pytest.raises(ValueError, match="global_pool='map'"):
        save(trained_model(global_pool="map"), tmp_path / "hf", format="hf")
    with pytest.raises(ValueError, match="format='nope'"):
        save(trained_model(), tmp_path / "x", format="nope")


def test_feature_extractor_exports_as_vit_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = trained_model(num_classes=0)
    folder = save(model, tmp_path / "features", format="hf")
    reference = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(reference(pixel_values=x).last_hidden_state, model.forward_features(x)) < 1e-5
    assert read_checkpoint(folder).options["num_classes"] == 0
