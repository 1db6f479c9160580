"""Every supported layout loads and reproduces the source library's logits.

Random tiny models from timm, transformers and torchvision are saved in their native formats,
read back through vitkit (with the architecture inferred from the files) and must give the
same outputs (relative error < 1e-5 in float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torchvision.models.vision_transformer import VisionTransformer as TvViT
from torchvision.models.vision_transformer import interpolate_embeddings

import vitkit
from vitkit.weights import (
    CheckpointMismatchError,
    UnsupportedCheckpointError,
    load_pretrained,
    model_from_checkpoint,
    read_checkpoint,
)

transformers = pytest.importorskip("transformers")

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# a tiny ViT in transformers' config names (the ViT relatives take the same fields)
HF_TINY = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
)


def hf_config(config_class=None, **overrides):
    """A tiny ``ViTConfig`` (or ``config_class``, a relative taking the same fields)."""
    options = dict(HF_TINY, num_labels=5)
    options.update(overrides)
    return (config_class or transformers.ViTConfig)(**options)


# ---------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"image_size": [32, 48], "qkv_bias": False},
        {"layer_norm_eps": 1e-6, "patch_size": 16},
        {"hidden_act": "gelu_new"},
        {"hidden_act": "quick_gelu"},
        {"hidden_act": "gelu_python"},
        {"hidden_act": "gelu_python_tanh"},
    ],
    ids=[
        "default",
        "non_square_no_qkv_bias",
        "eps_1e-6_patch16",
        "gelu_new",
        "quick_gelu",
        "gelu_python",
        "gelu_python_tanh",
    ],
)
def test_hf_folder_reproduces_vit_for_image_classification(overrides, tmp_path):
    config = hf_config(**overrides, id2label={i: f"class{i}" for i in range(5)})
    reference = randomise(transformers.ViTForImageClassification(config))
    reference.save_pretrained(tmp_path)
    transformers.ViTImageProcessor(
        image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], resample=3, size={"height": 32, "width": 48}
    ).save_pretrained(tmp_path)

    model, report = model_from_checkpoint(tmp_path, return_report=True)
    model.eval()
    size = config.image_size if isinstance(config.image_size, list) else [32, 32]
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert relative_error(model(x), reference(pixel_values=x).logits) < 1e-5
    assert report.format == "hf"
    assert model.config["num_heads"] == 4  # from config.json: no shape says it
    assert model.config["norm_eps"] == config.layer_norm_eps
    assert model.config["qkv_bias"] == config.qkv_bias
    assert model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
    assert model.pretrained_cfg["interpolation"] == "bicubic"
    assert model.pretrained_cfg["crop_mode"] == "squash"
    assert model.pretrained_cfg["label_names"] == [f"class{i}" for i in range(5)]


def test_hf_weights_file_alone_and_bare_vit_model(tmp_path):
    reference = randomise(transformers.ViTForImageClassification(hf_config(num_attention_heads=2)))
    reference.save_pretrained(tmp_path / "cls")
    # the weights file alone: no config, so heads come from vitkit's guess or the caller
    ckpt = read_checkpoint(tmp_path / "cls" / "model.safetensors")
    # transformers' ViT epsilon is the guess, said in a note (ViTMSN and DINOv2 use 1e-6)
    assert ckpt.format == "hf" and ckpt.model_options(given=["num_heads"])["norm_eps"] == 1e-12
    assert any("norm_eps=1e-12" in note for note in ckpt.notes)
    assert ckpt.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # ViTImageProcessor's defaults
    model = model_from_checkpoint(ckpt, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(x), reference(pixel_values=x).logits) < 1e-5

    # ViTModel: keys without "vit.", a pooler vitkit does not have -> features match
    bare = randomise(transformers.ViTModel(hf_config(num_attention_heads=2)))
    torch.save(bare.state_dict(), tmp_path / "vitmodel.bin")  # transformers 5 module names
    bare.save_pretrained(tmp_path / "bare")  # the legacy layout save_pretrained writes
    for source in (tmp_path / "vitmodel.bin", tmp_path / "bare"):
        features, report = model_from_checkpoint(source, num_heads=2, num_classes=0, return_report=True)
        assert any("pooler" in note for note in report.notes)
        with torch.no_grad():
            ours = features.eval().forward_features(x)
            assert relative_error(ours, bare(pixel_values=x).last_hidden_state) < 1e-5


def test_hf_config_num_heads_mismatch_is_named(tmp_path):
    transformers.ViTForImageClassification(hf_config()).save_pretrained(tmp_path)
    model = vitkit.create_model("vit_tiny_patch16_224", **{**TINY, "num_heads": 2, "mlp_ratio": 1.5})
    with pytest.raises(CheckpointMismatchError, match=r"num_heads \(checkpoint: 4, model: 2\)"):
        load_pretrained(model, tmp_path)


def test_hf_eps_difference_is_a_warning_not_an_error(tmp_path, caplog):
    transformers.ViTForImageClassification(hf_config(num_attention_heads=2)).save_pretrained(tmp_path)
    model = vitkit.create_model("vit_tiny_patch16_224", **TINY, mlp_ratio=1.5)  # norm_eps 1e-6
    report = load_pretrained(model, tmp_path)
    assert any("norm_eps=1e-12" in note for note in report.notes)
    assert "norm_eps=1e-12" in caplog.text


def test_hf_unsupported_variants_are_explained(tmp_path):
    transformers.ViTForImageClassification(hf_config(hidden_act="relu")).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedCheckpointError, match="hidden_act='relu': vitkit's MLP has gelu, "):
        read_checkpoint(tmp_path)


def test_hf_vit_msn_reproduces_its_logits(tmp_path):
    # ViTMSN is ViT's modules under ViT's names, with its own model_type
    reference = randomise(transformers.ViTMSNForImageClassification(hf_config(transformers.ViTMSNConfig)))
    reference.save_pretrained(tmp_path)
    model = model_from_checkpoint(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(x), reference(pixel_values=x).logits) < 1e-5


def test_hf_deit_with_teacher_reproduces_its_logits_and_the_backbones_tokens(tmp_path):
    # DeiT: a distillation token after the class token; WithTeacher averages a head on each
    config = hf_config(transformers.DeiTConfig)
    reference = randomise(transformers.DeiTForImageClassificationWithTeacher(config))
    reference.save_pretrained(tmp_path / "teacher")
    model = model_from_checkpoint(tmp_path / "teacher").eval()
    assert model.config["distilled"] and model.num_classes == 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(x), reference(pixel_values=x).logits) < 1e-5
    # DeiTForImageClassification's one head reads the class token alone: the backbone loads, the head not
    single = randomise(transformers.DeiTForImageClassification(config))
    single.save_pretrained(tmp_path / "single")
    model, report = model_from_checkpoint(tmp_path / "single", return_report=True)
    assert model.num_classes == 0 and any("reads the class token alone" in note for note in report.notes)
    with torch.no_grad():
        tokens = single.deit(pixel_values=x).last_hidden_state
        assert relative_error(model.eval().forward_features(x), tokens) < 1e-5


def test_hf_mae_pretraining_checkpoint_loads_its_encoder(tmp_path):
    # ViTMAEForPreTraining: the ViT encoder under vit., a decoder beside it that fine-tuning drops
    decoder = dict(
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    config = hf_config(transformers.ViTMAEConfig, mask_ratio=0.0, **decoder)
    reference = randomise(transformers.ViTMAEForPreTraining(config))
    reference.save_pretrained(tmp_path)
    model, report = model_from_checkpoint(tmp_path, return_report=True)
    assert model.num_classes == 0 and any("decoder (MAE's" in note for note in report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # MAE shuffles its patch tokens even unmasked: compare the class token
        tokens = reference.vit(pixel_values=x).last_hidden_state
        assert relative_error(model.eval().forward_features(x)[:, 0], tokens[:, 0]) < 1e-5


def dinov2_config(**overrides):
    options = dict(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    return transformers.Dinov2Config(**{**options, "layerscale_value": 0.5, "num_labels": 3, **overrides})


def test_hf_dinov2_backbone_reproduces_its_tokens_and_preprocessing(tmp_path):
    # Dinov2Model: LayerScale, an MLP ratio, eps 1e-6, patch 14; BitImageProcessor's resize 256 / crop 224
    reference = randomise(transformers.Dinov2Model(dinov2_config()))
    reference.save_pretrained(tmp_path)
    transformers.BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, resample=3
    ).save_pretrained(tmp_path)
    model, report = model_from_checkpoint(tmp_path, return_report=True)
    assert model.config["init_values"] == 0.5 and model.config["norm_eps"] == 1e-6
    assert model.pretrained_cfg["crop_pct"] == 0.875 and model.pretrained_cfg["interpolation"] == "bicubic"
    assert any("mask_token" in note for note in report.notes)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = reference(pixel_values=x).last_hidden_state  # after the final LayerNorm
        assert relative_error(model.eval().forward_features(x), tokens) < 1e-5


def test_hf_dinov2_is_built_at_its_processors_size_as_transformers_runs_it(tmp_path):
    # the real checkpoints: config image_size 518 (a 37x37 position table), processor crop 224 from
    # 256; transformers resamples the table to every input, so the model runs at 224 (here 56 / 28)
    reference = randomise(transformers.Dinov2Model(dinov2_config(image_size=56)))
    reference.save_pretrained(tmp_path)
    transformers.BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}
    ).save_pretrained(tmp_path)
    model, report = model_from_checkpoint(tmp_path, return_report=True)
    assert model.img_size == (28, 28) and model.pretrained_cfg["input_size"] == (3, 28, 28)
    assert any("built at the image processor's 28x28" in note for note in report.notes)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert (
            relative_error(model.eval().forward_features(x), reference(pixel_values=x).last_hidden_state)
            < 1e-5
        )
    on_request = model_from_checkpoint(tmp_path, img_size=56)  # the position table's own size
    assert on_request.img_size == (56, 56)


def test_hf_dinov2_with_registers_reproduces_its_tokens_from_a_folder_and_a_bare_file(tmp_path):
    # registers sit between the class token (which has a position) and the patches, without one;
    # vitkit folds the class position into the class token and keeps positions for the patches
    config = transformers.Dinov2WithRegistersConfig(**{**dinov2_config().to_dict(), "num_register_tokens": 4})
    reference = randomise(transformers.Dinov2WithRegistersModel(config))
    reference.save_pretrained(tmp_path / "folder")  # transformers' legacy names
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))  # transformers 5 module names
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = reference(pixel_values=x).last_hidden_state
    # the bare file does not say its epsilon (1e-6 here): the caller does
    for source, given in (
        (tmp_path / "folder", {}),
        (tmp_path / "w.safetensors", {"num_heads": 2, "norm_eps": 1e-6}),
    ):
        model = model_from_checkpoint(source, **given).eval()
        assert model.config["reg_tokens"] == 4 and model.config["no_embed_class"]
        with torch.no_grad():
            assert relative_error(model.forward_features(x), tokens) < 1e-5, source


def test_hf_dinov2_classifier_loads_its_backbone_and_says_why_not_its_head(tmp_path):
    # the classifier reads [class token, mean patch token]: 2 x D inputs, not vitkit's head
    reference = randomise(transformers.Dinov2ForImageClassification(dinov2_config()))
    reference.save_pretrained(tmp_path)
    model, report = model_from_checkpoint(tmp_path, return_report=True)
    assert model.num_classes == 0 and any("2 x embed_dim" in note for note in report.notes)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = reference.dinov2(pixel_values=x).last_hidden_state
        assert relative_error(model.eval().forward_features(x), tokens) < 1e-5


def test_hf_clip_image_tower_reproduces_its_pooled_features(tmp_path):
    # CLIP's image tower is a pre-norm ViT with QuickGELU and eps 1e-5; transformers applies the last
    # LayerNorm to the pooled class token, vitkit to every token: the pooled features agree
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    clip = transformers.CLIPConfig(vision_config=HF_TINY, text_config=text)
    reference = randomise(transformers.CLIPModel(clip))
    reference.save_pretrained(tmp_path / "clip")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(
        tmp_path / "clip"
    )
    model, report = model_from_checkpoint(tmp_path / "clip", return_report=True)
    assert model.config["act_layer"] == "quick_gelu" and model.config["norm_eps"] == 1e-5
    assert model.config["pre_norm"] and model.num_classes == 0
    assert model.pretrained_cfg["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert any("visual_projection" in note for note in report.notes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = reference.vision_model(pixel_values=x).pooler_output
        ours = model.eval().forward_head(model.forward_features(x), pre_logits=True)
        assert relative_error(ours, pooled) < 1e-5
    # the weights file alone: CLIP's activation and epsilon are the guess, and the note says so
    save_file(reference.state_dict(), str(tmp_path / "clip.safetensors"))
    model, report = model_from_checkpoint(tmp_path / "clip.safetensors", num_heads=4, return_report=True)
    assert any("act_layer='quick_gelu', norm_eps=1e-05" in note for note in report.notes)
    assert any("visual_projection" in note for note in report.notes)  # the file alone says so too
    with torch.no_grad():
        assert (
            relative_error(model.eval().forward_head(model.forward_features(x), pre_logits=True), pooled)
            < 1e-5
        )


def test_hf_clip_classifier_loads_as_the_patch_mean_before_the_final_norm(tmp_path):
    # CLIPForImageClassification: its classifier reads the mean of the patch tokens as the encoder
    # leaves them, without the tower's post_layernorm
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    clip = transformers.CLIPConfig(vision_config=HF_TINY, text_config=text, num_labels=3)
    classifier = randomise(transformers.CLIPForImageClassification(clip))
    classifier.save_pretrained(tmp_path / "classifier")
    save_file(classifier.state_dict(), str(tmp_path / "classifier.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    for source, given in (
        (tmp_path / "classifier", {}),
        (tmp_path / "classifier.safetensors", {"num_heads": 4}),
    ):
        model, report = model_from_checkpoint(source, return_report=True, **given)
        assert (model.config["global_pool"], model.config["final_norm"]) == ("avg", False)
        assert model.config["class_token"] and model.num_classes == 3
        assert any("post_layernorm) is not loaded" in note for note in report.notes)
        with torch.no_grad():
            assert relative_error(model.eval()(x), classifier(pixel_values=x).logits) < 1e-5


def test_hf_siglip_image_tower_reproduces_its_attention_pooled_features(tmp_path):
    # SigLIP's tower: CLIP's names without a class token or pre-norm, a patch bias, tanh GELU, eps
    # 1e-6, and an attention-pooling head (nn.MultiheadAttention's packed q, k, v -> q and kv)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    siglip = transformers.SiglipConfig(vision_config=HF_TINY, text_config=text)
    reference = randomise(transformers.SiglipModel(siglip))
    reference.save_pretrained(tmp_path / "siglip")
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")
    model, report = model_from_checkpoint(tmp_path / "siglip", return_report=True)
    assert report.format == "siglip" and model.config["global_pool"] == "map"
    assert model.config["act_layer"] == "gelu_tanh" and model.config["norm_eps"] == 1e-6
    assert not model.config["class_token"] and model.num_classes == 0
    assert model.pretrained_cfg["mean"] == pytest.approx((0.5, 0.5, 0.5))
    assert model.pretrained_cfg["interpolation"] == "bicubic"
    assert any("text_model" in note for note in report.notes)  # the text tower is named, not loaded
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = reference.vision_model(pixel_values=x)
        model.eval()
        assert relative_error(model.forward_features(x), out.last_hidden_state) < 1e-5
        assert relative_error(model(x), out.pooler_output) < 1e-5
        # at another size, positions are resampled as transformers' interpolate_pos_encoding does
        big = torch.randn(1, 3, 48, 48)
        wide = model_from_checkpoint(tmp_path / "siglip", img_size=48).eval()
        theirs = reference.vision_model(pixel_values=big, interpolate_pos_encoding=True).pooler_output
        assert relative_error(wide(big), theirs) < 1e-5
    # the weights file alone: SigLIP's activation and epsilon are the guess, and the note says so
    save_file(reference.state_dict(), str(tmp_path / "siglip.safetensors"))
    model, report = model_from_checkpoint(tmp_path / "siglip.safetensors", num_heads=4, return_report=True)
    assert any("act_layer='gelu_tanh', norm_eps=1e-06" in note for note in report.notes)
    with torch.no_grad():
        assert relative_error(model.eval()(x), out.pooler_output) < 1e-5
    # a tower built without the head (vision_use_head=False): the mean of its normalised tokens
    headless = transformers.SiglipVisionConfig(**HF_TINY, vision_use_head=False)
    transformers.SiglipVisionModel(headless).save_pretrained(tmp_path / "headless")
    model = model_from_checkpoint(tmp_path / "headless").eval()
    assert (model.config["global_pool"], model.config["fc_norm"]) == ("avg", False)
    # SiglipForImageClassification: its classifier reads the token mean, and the pool goes unused
    classifier = randomise(transformers.SiglipForImageClassification(siglip))
    classifier.save_pretrained(tmp_path / "classifier")
    save_file(classifier.state_dict(), str(tmp_path / "classifier.safetensors"))
    for source, given in (
        (tmp_path / "classifier", {}),
        (tmp_path / "classifier.safetensors", {"num_heads": 4}),
    ):
        model, report = model_from_checkpoint(source, return_report=True, **given)
        assert (model.config["global_pool"], model.config["fc_norm"]) == ("avg", False)
        assert model.attn_pool is None and model.num_classes == 2
        assert any("reads the mean of the tokens" in note for note in report.notes)
        assert not any("classifier" in note and "not loaded: what" in note for note in report.notes)
        with torch.no_grad():
            assert relative_error(model.eval()(x), classifier(pixel_values=x).logits) < 1e-5


@pytest.mark.parametrize(
    "processor",
    [
        {"rescale_factor": 1 / 127.5, "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0]},  # [-1, 1]
        {"do_rescale": False, "image_mean": [120.0, 110.0, 100.0], "image_std": [60.0, 50.0, 40.0]},
        {"do_normalize": False, "rescale_factor": 1 / 127.5},
    ],
)
def test_hf_processor_rescaling_is_folded_into_mean_and_std(processor, tmp_path):
    # vitkit's pipeline scales pixels by 1/255 and then normalises: another rescale_factor (or none)
    # must come out as the mean and std that give transformers' pixel values
    hf = transformers.ViTImageProcessor(do_resize=False, **processor)
    randomise(transformers.ViTModel(hf_config())).save_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    cfg = read_checkpoint(tmp_path).pretrained_cfg
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    expected = torch.as_tensor(hf(images=image, return_tensors="np")["pixel_values"][0])
    pixels = torch.as_tensor(image).permute(2, 0, 1).float() / 255
    ours = (pixels - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    assert torch.allclose(ours, expected, atol=1e-5)


def test_a_sharded_checkpoint_loads_from_its_folder_and_a_single_shard_is_refused_by_name(tmp_path):
    reference = randomise(transformers.ViTForImageClassification(hf_config()))
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (
            relative_error(model_from_checkpoint(tmp_path).eval()(x), reference(pixel_values=x).logits) < 1e-5
        )
    for part, what in ((shards[0], "one shard"), (tmp_path / "model.safetensors.index.json", "the index")):
        with pytest.raises(ValueError, match=f"is {what} of a sharded checkpoint: pass the folder"):
            read_checkpoint(part)


def test_hf_config_values_left_out_mean_transformers_defaults(tmp_path):
    # an older config.json may omit what equals the config class's default (CLIP: patch 32, QuickGELU)
    import json

    reference = randomise(
        transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(**{**HF_TINY, "patch_size": 32, "image_size": 64})
        )
    )
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("patch_size", "hidden_act", "layer_norm_eps"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = model_from_checkpoint(tmp_path).eval()
    assert model.patch_size == (32, 32) and model.config["act_layer"] == "quick_gelu"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.forward_head(model.forward_features(x), pre_logits=True)
        assert relative_error(ours, reference(pixel_values=x).pooler_output) < 1e-5


def test_hf_dinov2_giant_swiglu_reproduces_its_tokens(tmp_path):
    # use_swiglu_ffn: save_pretrained packs gate and value in weights_in; transformers 5's modules
    # keep them apart (gate_proj, up_proj). Its SwiGLU takes SiLU whatever hidden_act says.
    reference = randomise(transformers.Dinov2Model(dinov2_config(use_swiglu_ffn=True)))
    reference.save_pretrained(tmp_path / "giant")
    save_file(reference.state_dict(), str(tmp_path / "giant.safetensors"))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = reference(pixel_values=x).last_hidden_state
    bare = {"num_heads": 2, "norm_eps": 1e-6}  # what a weights file alone does not tell
    for source, given in ((tmp_path / "giant", {}), (tmp_path / "giant.safetensors", bare)):
        model = model_from_checkpoint(source, **given).eval()
        assert (model.config["mlp_layer"], model.config["act_layer"]) == ("swiglu_packed", "silu")
        with torch.no_grad():
            assert relative_error(model.forward_features(x), tokens) < 1e-5, source


def test_hf_ijepa_classifies_the_mean_of_its_tokens(tmp_path):
    # I-JEPA: ViT's names without a class token; the classifier reads the mean of the normalised tokens
    reference = randomise(transformers.IJepaForImageClassification(hf_config(transformers.IJepaConfig)))
    reference.save_pretrained(tmp_path / "ijepa")
    save_file(reference.state_dict(), str(tmp_path / "ijepa.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    for source, given in ((tmp_path / "ijepa", {}), (tmp_path / "ijepa.safetensors", {"num_heads": 4})):
        model = model_from_checkpoint(source, **given).eval()
        assert (model.config["class_token"], model.config["global_pool"], model.num_classes) == (
            False,
            "avg",
            5,
        )
        with torch.no_grad():
            assert relative_error(model(x), reference(pixel_values=x).logits) < 1e-5


def test_a_bare_hf_dinov2_file_takes_dinov2s_epsilon(tmp_path):
    # LayerScale gives DINOv2 away among the Hugging Face layouts, and with it its 1e-6 (not ViT's 1e-12)
    reference = randomise(transformers.Dinov2Model(dinov2_config()))
    save_file(reference.state_dict(), str(tmp_path / "dinov2.safetensors"))
    model, report = model_from_checkpoint(tmp_path / "dinov2.safetensors", num_heads=2, return_report=True)
    assert model.config["norm_eps"] == 1e-6 and any("norm_eps=1e-06" in note for note in report.notes)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = reference(pixel_values=x).last_hidden_state
        assert relative_error(model.eval().forward_features(x), tokens) < 1e-5


def dinov3_config(**overrides):
    options = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    options |= dict(intermediate_size=96, num_register_tokens=2, layerscale_value=0.5)
    return transformers.DINOv3ViTConfig(**{**options, **overrides})


@pytest.mark.parametrize("gated", [False, True])
def test_hf_dinov3_reproduces_its_tokens_with_rotary_positions_at_any_size(gated, tmp_path):
    # DINOv3: rotary positions (no position table), 2 registers, LayerScale, no key bias; the 7B
    # model's gated MLP (gate_proj, up_proj, down_proj) with SiLU
    config = dinov3_config(use_gated_mlp=gated, hidden_act="silu" if gated else "gelu")
    reference = randomise(transformers.DINOv3ViTModel(config))
    reference.save_pretrained(tmp_path / "dinov3")
    save_file(reference.state_dict(), str(tmp_path / "dinov3.safetensors"))
    bare = {"num_heads": 4, "act_layer": "silu" if gated else "gelu"}
    for source, given in ((tmp_path / "dinov3", {}), (tmp_path / "dinov3.safetensors", bare)):
        model, report = model_from_checkpoint(source, return_report=True, **given)
        assert report.format == "dinov3"
        assert (model.config["rope"], model.config["pos_embed"]) == (True, "none")
        assert model.config["reg_tokens"] == 2 and model.config["dynamic_img_size"]
        assert model.config.get("mlp_layer", "mlp") == ("swiglu" if gated else "mlp")
        assert model.pretrained_cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            out = reference(pixel_values=x)
            model.eval()
            assert relative_error(model.forward_features(x), out.last_hidden_state) < 1e-5
            assert relative_error(model(x), out.pooler_output) < 1e-5
            # another input size: the rotations follow the grid, as transformers' do
            other = torch.randn(1, 3, 48, 40)
            tokens = reference(pixel_values=other).last_hidden_state
            assert relative_error(model.forward_features(other), tokens) < 1e-5


def test_explanations_read_the_same_rotated_attention_from_dinov3_in_both_libraries(tmp_path):
    from vitkit.explain import AttentionRecorder, token_layout

    reference = randomise(transformers.DINOv3ViTModel(dinov3_config()))
    reference.save_pretrained(tmp_path)
    model = model_from_checkpoint(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    assert token_layout(reference, x) == token_layout(model, x)
    with torch.no_grad(), AttentionRecorder(reference, [1]) as theirs:
        reference(pixel_values=x)
    with torch.no_grad(), AttentionRecorder(model, [1]) as ours:
        model(x)
    torch.testing.assert_close(ours.attentions[1], theirs.attentions[1], atol=1e-5, rtol=1e-4)


def test_hf_aimv2_image_tower_reproduces_its_tokens(tmp_path):
    # AIMv2: RMSNorm after the patch projection and in the blocks, a split SwiGLU, no class token, no
    # biases but the patch's; its attention-pooling head is not vitkit's: dropped, the tokens averaged
    vision = dict(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    vision["intermediate_size"] = 48
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
    full = randomise(
        transformers.Aimv2Model(transformers.Aimv2Config(vision_config=vision, text_config=text))
    )
    full.save_pretrained(tmp_path / "aimv2")
    save_file(full.vision_model.state_dict(), str(tmp_path / "tower.safetensors"))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = full.vision_model(pixel_values=x).last_hidden_state
    for source, given in ((tmp_path / "aimv2", {}), (tmp_path / "tower.safetensors", {"num_heads": 2})):
        model, report = model_from_checkpoint(source, return_report=True, **given)
        assert report.format == "aimv2"
        options = ("norm_layer", "embed_norm", "mlp_layer", "proj_bias", "class_token", "global_pool")
        assert [model.config[k] for k in options] == ["rmsnorm", True, "swiglu", False, False, "avg"]
        assert any("attention-pooling head" in note for note in report.notes)
        with torch.no_grad():
            model.eval()
            assert relative_error(model.forward_features(x), tokens) < 1e-5
            assert relative_error(model(x), tokens.mean(dim=1)) < 1e-5
    # explanations read the tower as they read the twin: no class token (the pool's query is not one)
    from vitkit.explain import token_layout

    assert token_layout(full.vision_model, x) == token_layout(model, x)
    assert token_layout(model, x).num_prefix_tokens == 0


def test_hf_relatives_vitkit_cannot_read_are_named(tmp_path):
    transformers.BeitModel(hf_config(transformers.BeitConfig)).save_pretrained(tmp_path / "beit")
    with pytest.raises(UnsupportedCheckpointError, match="'beit' is not supported.*relative position biases"):
        read_checkpoint(tmp_path / "beit")


# ---------------------------------------------------------------------------- torchvision
def tv_model(num_classes: int = 5) -> TvViT:
    return randomise(
        TvViT(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=128,
            num_classes=num_classes,
        )
    )


def _hf_reference_at(kind: str):
    """A random transformers model with a 48x48 (or DINOv2: 56x56) input and how it runs at 32 (28)."""
    if kind == "vit":
        ref = randomise(transformers.ViTForImageClassification(hf_config(image_size=48)))
        return ref, 32, lambda x: ref(pixel_values=x, interpolate_pos_encoding=True).logits
    if kind == "clip":
        ref = randomise(
            transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{**HF_TINY, "image_size": 48}))
        )
        return ref, 32, lambda x: ref(pixel_values=x, interpolate_pos_encoding=True).pooler_output
    if kind == "dinov2":  # transformers' DINOv2 resamples whenever the input differs from image_size
        ref = randomise(transformers.Dinov2Model(dinov2_config(image_size=56)))
    else:
        config = transformers.Dinov2WithRegistersConfig(
            **{**dinov2_config(image_size=56).to_dict(), "num_register_tokens": 2}
        )
        ref = randomise(transformers.Dinov2WithRegistersModel(config))
    return ref, 28, lambda x: ref(pixel_values=x).last_hidden_state


@pytest.mark.parametrize("kind", ["vit", "clip", "dinov2", "dinov2_with_registers"])
def test_hf_weights_at_a_smaller_size_reproduce_transformers_resampled_positions(kind, tmp_path):
    # transformers shrinks ViT/DeiT/CLIP/DINOv2 position tables without antialiasing (DINOv2 with
    # registers antialiases, as timm does): loaded at the smaller size, vitkit gives the same numbers
    reference, size, run = _hf_reference_at(kind)
    reference.save_pretrained(tmp_path)
    model, report = model_from_checkpoint(tmp_path, img_size=size, return_report=True)
    assert report.pos_embed_resampled is not None
    assert ("antialias=False" in str(report.notes)) == (kind != "dinov2_with_registers")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference_out = run(x)
        if kind == "clip":
            ours = model.eval().forward_head(model.forward_features(x), pre_logits=True)
        elif kind == "vit":
            ours = model.eval()(x)
        else:
            ours = model.eval().forward_features(x)
    assert relative_error(ours, reference_out) < 1e-5


def test_torchvision_state_dict_reproduces_logits(tmp_path):
    reference = tv_model()
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    model, report = model_from_checkpoint(tmp_path / "tv.pth", num_heads=2, return_report=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model.eval()(x), reference(x)) < 1e-5
    assert report.format == "torchvision" and model.config["norm_eps"] == 1e-6
    # a plain file: torchvision's classification preset
    assert report.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert report.pretrained_cfg["interpolation"] == "bilinear"
    assert report.pretrained_cfg["crop_pct"] == 0.875

    # the same weights into a model built by name, and at a new resolution
    model = vitkit.create_model("vit_tiny_patch16_224", **{**TINY, "img_size": 48})
    report = load_pretrained(model, tmp_path / "tv.pth")
    assert report.pos_embed_resampled == ((4, 4), (6, 6)) and not report.head_reset
    # resampled as torchvision's own interpolate_embeddings does (align_corners=True): the same logits
    resized = TvViT(
        image_size=48, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=128, num_classes=5
    )
    resized.load_state_dict(interpolate_embeddings(48, 8, reference.state_dict()))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert relative_error(model.eval()(x), resized.eval()(x)) < 1e-5


def test_torchvision_file_name_selects_its_weights_transforms(tmp_path):
    # a file named like torchvision's download: its weights enum gives preprocessing and labels
    torch.save(tv_model(num_classes=1000).state_dict(), tmp_path / "vit_b_16_swag-9ac1b537.pth")
    ckpt = read_checkpoint(tmp_path / "vit_b_16_swag-9ac1b537.pth")
    assert ckpt.pretrained_cfg["input_size"] == (3, 384, 384)
    assert ckpt.pretrained_cfg["interpolation"] == "bicubic" and ckpt.pretrained_cfg["crop_pct"] == 1.0
    assert ckpt.label_names[0] == "tench"


def test_torchvision_representation_layer_is_dropped_with_its_head():
    reference = TvViT(
        image_size=32,
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=128,
        representation_size=16,
    )
    model = vitkit.create_model("vit_tiny_patch16_224", **{**TINY, "depth": 1, "num_classes": 1000})
    report = load_pretrained(model, reference.state_dict())
    assert report.head_reset and any("pre_logits" in note for note in report.notes)


# ---------------------------------------------------------------------------- timm layouts and wrappers
OPTION_SETS = {
    "class_token": {},
    "registers": {"reg_tokens": 4, "no_embed_class": True},
    "qk_norm_layerscale": {"qk_norm": True, "init_values": 1e-2},
    "avg_pool_no_class_token": {"class_token": False, "global_pool": "avg"},
}


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_timm_state_dict_builds_the_right_model(name, tmp_path):
    options = {**TINY, **OPTION_SETS[name]}
    reference = randomise(TimmViT(**options))
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    model = model_from_checkpoint(tmp_path / "w.safetensors", num_heads=2).eval()
    assert model.config["global_pool"] == options.get("global_pool", "token")
    assert model.config["no_embed_class"] == options.get("no_embed_class", False)
    assert model.config["reg_tokens"] == options.get("reg_tokens", 0)
    assert model.config["class_token"] == options.get("class_token", True)
    assert bool(model.config["init_values"]) == ("init_values" in options)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5


def test_what_a_bare_state_dict_leaves_open_is_guessed_and_said(tmp_path):
    reference = TimmViT(**{**TINY, "embed_dim": 192, "num_heads": 3, "depth": 1})
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    model, report = model_from_checkpoint(tmp_path / "w.safetensors", return_report=True)
    assert model.config["num_heads"] == 3  # the registered tiny models have width 192 and 3 heads
    # a bare state dict does not say its activation and LayerNorm epsilon either (a CLIP-style model
    # has the same tensors): all three are named, with the values used
    (note,) = [n for n in report.notes if "does not store" in n]
    assert "num_heads=3 (head width 64), act_layer='gelu', norm_eps=1e-06" in note
    # nor whether its blocks are pre-norm: timm's post-norm and rotary ViTs have the same tensors
    assert "post-norm blocks (vit_*_rpn_*) and rotary positions (vit_pe_*)" in note
    # options the caller gives are not guessed, so not noted
    _, report = model_from_checkpoint(
        tmp_path / "w.safetensors", num_heads=3, norm_eps=1e-6, return_report=True
    )
    (note,) = [n for n in report.notes if "does not store" in n]
    assert "does not store act_layer," in note and "num_heads" not in note and "norm_eps" not in note
    _, report = model_from_checkpoint(
        tmp_path / "w.safetensors", num_heads=3, norm_eps=1e-6, act_layer="gelu", return_report=True
    )
    assert not [n for n in report.notes if "does not store" in n]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {"module": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["state_dict", "model", "module", "module_prefix", "model_and_module_prefix"],
)
def test_wrapped_state_dicts(wrap, tmp_path):
    reference = randomise(TimmViT(**TINY))
    torch.save(wrap(reference.state_dict()), tmp_path / "w.pth")
    model = model_from_checkpoint(tmp_path / "w.pth", num_heads=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5


def test_tensors_beside_the_vit_are_named_in_a_note(tmp_path):
    # a detector-style file: the ViT under backbone., a neck beside it
    reference = randomise(TimmViT(**TINY))
    state = {f"backbone.{k}": v for k, v in reference.state_dict().items()}
    torch.save(
        {**state, "neck.proj.weight": torch.ones(2, 2), "decode_head.bias": torch.ones(2)}, tmp_path / "w.pth"
    )
    model, report = model_from_checkpoint(tmp_path / "w.pth", num_heads=2, return_report=True)
    assert "not loaded: what the checkpoint holds beside the ViT (decode_head, neck)." in report.notes
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model.eval()(x), reference(x)) < 1e-5


def _timm_train_checkpoint(arch: str, path, **model_kwargs):
    """A checkpoint as timm's train.py (CheckpointSaver) writes it, of a shrunken ``arch``."""
    import argparse

    import timm

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, **model_kwargs}
    model = randomise(timm.create_model(arch, pretrained=False, num_classes=3, **kwargs))
    args = argparse.Namespace(
        model=arch, model_kwargs=kwargs, num_classes=3, gp=None, in_chans=None, mean=[0.1, 0.2, 0.3], std=None
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(
        {
            "epoch": 7,
            "arch": arch,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "version": 2,
            "args": args,
            "state_dict": state,
            "state_dict_ema": {k: v + 1 for k, v in state.items()},
            "metric": 81.5,
            "saver": {"epoch": 7, "metric": 81.5},
        },
        path,
    )
    return model


def test_timm_training_checkpoint_rebuilds_its_architecture_exactly(tmp_path):
    # a CLIP-style ViT: QuickGELU, a LayerNorm before the blocks, eps 1e-5 and 8-wide heads, none of
    # which the tensors' shapes tell; the checkpoint's arch and args do, through timm
    path = tmp_path / "model_best.pth.tar"
    reference = _timm_train_checkpoint("vit_base_patch32_clip_quickgelu_224", path)
    ckpt = read_checkpoint(path)
    assert (ckpt.format, ckpt.model_name) == ("timm", "vit_base_patch32_clip_quickgelu_224")
    assert ckpt.options["act_layer"] == "quick_gelu" and ckpt.options["norm_eps"] == 1e-5
    assert ckpt.options["num_heads"] == 4 and ckpt.options["num_classes"] == 3
    assert tuple(ckpt.pretrained_cfg["mean"]) == (0.1, 0.2, 0.3)  # the run's --mean
    assert any("state_dict_ema" in note for note in ckpt.notes)
    model = model_from_checkpoint(ckpt).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5


def test_timm_training_checkpoint_of_a_dinov3_port_loads_its_rotations(tmp_path):
    # timm's DINOv3 ports are Eva models: the arch names them, their LayerScale and q/v biases convert
    path = tmp_path / "model_best.pth.tar"
    reference = _timm_train_checkpoint("vit_small_patch16_dinov3_qkvb", path)
    model = model_from_checkpoint(path).eval()
    assert model.config["rope"] and model.config["reg_tokens"] == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5


def test_timm_training_checkpoint_keeps_options_its_model_kwargs_set(tmp_path):
    # pool_include_prefix has no tensor of its own: only --model-kwargs says the class token is pooled too
    path = tmp_path / "last.pth.tar"
    reference = _timm_train_checkpoint(
        "vit_tiny_patch16_224", path, global_pool="avg", pool_include_prefix=True
    )
    model = model_from_checkpoint(path).eval()
    assert model.config["pool_include_prefix"] is True
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5
        reference.pool_include_prefix = False  # the option matters: without it the logits move
        assert relative_error(model(x), reference(x)) > 1e-3


def test_timm_training_checkpoint_with_rmsnorm_and_without_biases_loads(tmp_path):
    # timm's --model-kwargs proj_bias=False norm_layer=rmsnorm embed_norm_layer=rmsnorm
    model_kwargs = {"proj_bias": False, "norm_layer": "rmsnorm", "embed_norm_layer": "rmsnorm"}
    path = tmp_path / "last.pth.tar"
    reference = _timm_train_checkpoint("vit_tiny_patch16_224", path, **model_kwargs)
    model = model_from_checkpoint(path).eval()
    assert model.config["proj_bias"] is False and model.blocks[0].attn.proj.bias is None
    assert (model.config["norm_layer"], model.config["embed_norm"]) == ("rmsnorm", True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5
    # the weights file alone: the shapes and the missing biases tell the same
    save_file(dict(reference.state_dict()), str(tmp_path / "w.safetensors"))
    bare = model_from_checkpoint(tmp_path / "w.safetensors", num_heads=4, norm_eps=1e-6).eval()
    assert {k: bare.config.get(k) for k in ("norm_layer", "embed_norm", "mlp_layer")} == {
        k: model.config.get(k) for k in ("norm_layer", "embed_norm", "mlp_layer")
    }
    with torch.no_grad():
        assert relative_error(bare(x), reference(x)) < 1e-5


def test_research_repo_checkpoints_with_their_command_line_load(tmp_path):
    # DeiT's, MAE's and DINO's own training scripts save {"model" or "teacher": weights, "args":
    # argparse.Namespace, ...}: the Namespace no longer stops torch.load(weights_only=True)
    import argparse

    reference = randomise(TimmViT(**TINY))
    args = argparse.Namespace(model="deit_tiny_patch16_224", lr=5e-4, input_size=32, drop_path=0.1)
    torch.save({"model": reference.state_dict(), "epoch": 299, "args": args}, tmp_path / "checkpoint.pth")
    model = model_from_checkpoint(tmp_path / "checkpoint.pth", num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 1e-5


@pytest.mark.parametrize(
    ("arch", "model_kwargs", "part"),
    [
        # residual post-norm blocks have the same tensors as pre-norm ones: only the arch tells them apart
        ("vit_base_patch16_rpn_224", {}, "ResPostBlock"),
        # options of timm's VisionTransformer that vitkit's lacks, set through --model-kwargs
        (
            "vit_tiny_patch16_224",
            {"global_pool": "prr"},
            r"attention-pooling head of type AttentionPoolPrr \(global_pool='prr'\)",
        ),
        ("vit_tiny_patch16_224", {"scale_mlp_norm": True}, r"norm inside the MLP.*\(scale_mlp_norm\)"),
    ],
)
def test_timm_training_checkpoint_of_a_variant_vitkit_lacks_is_refused(arch, model_kwargs, part, tmp_path):
    _timm_train_checkpoint(arch, tmp_path / "last.pth.tar", **model_kwargs)
    with pytest.raises(UnsupportedCheckpointError, match=part):
        read_checkpoint(tmp_path / "last.pth.tar")


def test_lightning_checkpoint_rebuilds_the_trained_model(tmp_path):
    trained = randomise(
        vitkit.create_model("vit_nano_patch4_32", depth=2, embed_dim=32, num_heads=2, num_classes=3)
    )
    checkpoint = {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "2.6.4",
        "state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()},
        "optimizer_states": [],
        "hyper_parameters": {
            "model_name": "vit_nano_patch4_32",
            "model_options": {"depth": 2, "embed_dim": 32, "num_heads": 2},
            "num_classes": 3,
            "classes": ["cat", "dog", "eel"],
            "lr": 1e-3,
        },
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    model, report = model_from_checkpoint(tmp_path / "last.ckpt", return_report=True)
    assert report.format == "lightning"
    assert model.config["model_name"] == "vit_nano_patch4_32" and model.config["mlp_ratio"] == 2.0
    assert model.pretrained_cfg["mean"] == (0.4914, 0.4822, 0.4465)  # the registry's CIFAR-10 cfg
    assert model.pretrained_cfg["label_names"] == ["cat", "dog", "eel"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model.eval()(x), trained.eval()(x)) < 1e-5

    # a num_heads that contradicts the checkpoint's hyper-parameters is named
    wrong = vitkit.create_model("vit_nano_patch4_32", depth=2, embed_dim=32, num_heads=4, num_classes=3)
    with pytest.raises(CheckpointMismatchError, match=r"num_heads \(checkpoint: 2, model: 4\)"):
        load_pretrained(wrong, tmp_path / "last.ckpt")


# ---------------------------------------------------------------------------- Google / big_vision npz
def _to_npz(model: TimmViT, layout: str) -> dict[str, np.ndarray]:
    """Write a timm ViT in Google's JAX layouts (the inverse of the loaders under test)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads, dim = model.blocks[0].attn.num_heads, model.embed_dim
    hd = dim // heads
    big_vision = layout.startswith("big_vision")
    p = "params/" if big_vision else ""
    out = {f"{p}embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0)}
    out[f"{p}embedding/bias"] = sd["patch_embed.proj.bias"]
    if "cls_token" in sd:
        out[f"{p}cls"] = sd["cls_token"]
    out[f"{p}pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1")
    if not big_vision:
        mha, mlp, ln2 = ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    blocks = []
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        q, k, v = np.split(sd[b + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[b + "attn.qkv.bias"], 3)
        block = {
            "LayerNorm_0/scale": sd[b + "norm1.weight"],
            "LayerNorm_0/bias": sd[b + "norm1.bias"],
            f"{ln2}/scale": sd[b + "norm2.weight"],
            f"{ln2}/bias": sd[b + "norm2.bias"],
            f"{mha}/out/kernel": sd[b + "attn.proj.weight"].T.reshape(heads, hd, dim),
            f"{mha}/out/bias": sd[b + "attn.proj.bias"],
            f"{mlp}/Dense_0/kernel": sd[b + "mlp.fc1.weight"].T,
            f"{mlp}/Dense_0/bias": sd[b + "mlp.fc1.bias"],
            f"{mlp}/Dense_1/kernel": sd[b + "mlp.fc2.weight"].T,
            f"{mlp}/Dense_1/bias": sd[b + "mlp.fc2.bias"],
        }
        for name, w, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            block[f"{mha}/{name}/kernel"] = w.T.reshape(dim, heads, hd)
            block[f"{mha}/{name}/bias"] = bias.reshape(heads, hd)
        blocks.append(block)
    if layout == "big_vision_scanned":
        for key in blocks[0]:
            out[f"{p}Transformer/encoderblock/{key}"] = np.stack([blk[key] for blk in blocks])
    else:
        for i, blk in enumerate(blocks):
            out.update({f"{p}Transformer/encoderblock_{i}/{k}": v for k, v in blk.items()})
    out[f"{p}Transformer/encoder_norm/scale"] = sd["norm.weight"]
    out[f"{p}Transformer/encoder_norm/bias"] = sd["norm.bias"]
    out[f"{p}head/kernel"] = sd["head.weight"].T
    out[f"{p}head/bias"] = sd["head.bias"]
    if model.attn_pool is not None:  # big_vision's MAPHead: probe, one attention, LayerNorm, MLP
        m, a = "MAPHead_0/", "MAPHead_0/MultiHeadDotProductAttention_0/"
        out[f"{p}{m}probe"] = sd["attn_pool.latent"]
        k, v = np.split(sd["attn_pool.kv.weight"], 2)
        kb, vb = np.split(sd["attn_pool.kv.bias"], 2)
        for name, w, bias in (
            ("query", sd["attn_pool.q.weight"], sd["attn_pool.q.bias"]),
            ("key", k, kb),
            ("value", v, vb),
        ):
            out[f"{p}{a}{name}/kernel"] = w.T.reshape(dim, heads, hd)
            out[f"{p}{a}{name}/bias"] = bias.reshape(heads, hd)
        out[f"{p}{a}out/kernel"] = sd["attn_pool.proj.weight"].T.reshape(heads, hd, dim)
        out[f"{p}{a}out/bias"] = sd["attn_pool.proj.bias"]
        out[f"{p}{m}LayerNorm_0/scale"] = sd["attn_pool.norm.weight"]
        out[f"{p}{m}LayerNorm_0/bias"] = sd["attn_pool.norm.bias"]
        for r in range(2):
            out[f"{p}{m}MlpBlock_0/Dense_{r}/kernel"] = sd[f"attn_pool.mlp.fc{r + 1}.weight"].T
            out[f"{p}{m}MlpBlock_0/Dense_{r}/bias"] = sd[f"attn_pool.mlp.fc{r + 1}.bias"]
    return out


NPZ_CASES = {
    # the original release: positions for the class token too
    "original": ({}, {"num_heads": 4}),
    # big_vision "gap": no class token, norm before pooling
    "big_vision": ({"class_token": False, "global_pool": "avg", "fc_norm": False}, {"global_pool": "avg"}),
    # big_vision "tok", blocks scanned into one stacked array: positions for the patches only
    "big_vision_scanned": ({"no_embed_class": True}, {"no_embed_class": True}),
    # big_vision with an attention-pooling head (SigLIP): no class token, MAP, flax's tanh GELU
    "big_vision_map": (
        {"class_token": False, "global_pool": "map", "act_layer": "gelu_tanh"},
        {"global_pool": "map", "act_layer": "gelu_tanh"},
    ),
}


@pytest.mark.parametrize("layout", list(NPZ_CASES))
def test_google_npz_reproduces_timm_reading_the_same_file(layout, tmp_path):
    timm_options, expected = NPZ_CASES[layout]
    reference = randomise(TimmViT(**{**TINY, "num_heads": 4, **timm_options}))
    np.savez(tmp_path / "vit.npz", **_to_npz(reference, layout))
    # timm's own npz reader agrees that the file holds the reference model
    check = TimmViT(**{**TINY, "num_heads": 4, **timm_options}).eval()
    check.load_pretrained(str(tmp_path / "vit.npz"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(check(x), reference(x)) < 1e-5

    model, report = model_from_checkpoint(tmp_path / "vit.npz", return_report=True)
    assert report.format == "big_vision"
    assert model.config["num_heads"] == 4  # read off the (D, heads, head_dim) kernels
    for option, value in expected.items():
        assert model.config[option] == value
    with torch.no_grad():
        assert relative_error(model.eval()(x), reference(x)) < 1e-5


def test_npz_attention_pool_head_says_which_activation_it_assumed(tmp_path):
    arrays = _to_npz(randomise(TimmViT(**{**TINY, "class_token": False, "global_pool": "map"})), "big_vision")
    np.savez(tmp_path / "map.npz", **arrays)
    ckpt = read_checkpoint(tmp_path / "map.npz")
    assert ckpt.options["global_pool"] == "map" and ckpt.options["act_layer"] == "gelu_tanh"
    assert any("MAP" in note and "act_layer='gelu'" in note for note in ckpt.notes)


def test_unknown_layout_is_explained():
    with pytest.raises(UnsupportedCheckpointError, match="no patch embedding found"):
        read_checkpoint({"encoder.weight": torch.zeros(2, 2)})
