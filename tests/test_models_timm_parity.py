"""Weight compatibility with timm by construction: same names, same shapes, same logits.

A timm VisionTransformer with random weights is saved to a file, loaded through
``vitkit.create_model(..., pretrained=path)``, and must give timm's logits; vitkit's state
dict loaded into timm must give vitkit's.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT

import vitkit
from vitkit.weights import CheckpointMismatchError, load_pretrained, save

BASE = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 7}

OPTION_SETS = {
    "class_token": {},
    "avg_pool_no_class_token": {"class_token": False, "global_pool": "avg"},
    "registers": {"reg_tokens": 4},
    "registers_no_embed_class": {"reg_tokens": 2, "no_embed_class": True, "global_pool": "avg"},
    "avg_pool_with_prefix_tokens": {"reg_tokens": 2, "global_pool": "avg", "pool_include_prefix": True},
    "qk_norm_layerscale": {"qk_norm": True, "init_values": 1e-2},
    "non_square": {"img_size": (32, 48)},
    "pre_norm_no_qkv_bias": {"pre_norm": True, "qkv_bias": False},
    "mlp_ratio_and_fc_norm": {"mlp_ratio": 2.0, "fc_norm": True},
    "gelu_tanh": {"act_layer": "gelu_tanh"},
    "quick_gelu_pre_norm": {"act_layer": "quick_gelu", "pre_norm": True},
    "attention_pool": {"class_token": False, "global_pool": "map", "act_layer": "gelu_tanh"},  # SigLIP
    "attention_pool_with_prefix": {"reg_tokens": 1, "global_pool": "map", "pool_include_prefix": True},
}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _randomise(model: torch.nn.Module) -> None:
    # timm's init leaves norms at 1/0 and tokens near 0: perturb everything so parity is meaningful
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _input(options: dict) -> torch.Tensor:
    size = options.get("img_size", BASE["img_size"])
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(3, 3, h, w)


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_loads_and_reproduces_logits(name, suffix, tmp_path):
    options = {**BASE, **OPTION_SETS[name]}
    reference = TimmViT(**options).eval()
    _randomise(reference)
    path = tmp_path / f"timm{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": reference.state_dict()}, path)  # wrapped, as training scripts do

    model = vitkit.create_model("vit_tiny_patch16_224", pretrained=path, **options).eval()
    x = _input(options)
    with torch.no_grad():
        assert _relative_error(model(x), reference(x)) < 1e-5


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_vitkit_state_dict_loads_into_timm(name):
    options = {**BASE, **OPTION_SETS[name]}
    model = vitkit.create_model("vit_tiny_patch16_224", **options).eval()
    _randomise(model)
    reference = TimmViT(**options).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    x = _input(options)
    with torch.no_grad():
        assert _relative_error(reference(x), model(x)) < 1e-5


def test_sincos_model_runs_in_timm_as_learned_positions():
    options = {**BASE, "class_token": False, "global_pool": "avg"}
    model = vitkit.create_model("vit_tiny_patch16_224", pos_embed="sincos", **options).eval()
    reference = TimmViT(**options).eval()
    reference.load_state_dict(model.state_dict())
    x = _input(options)
    with torch.no_grad():
        assert _relative_error(reference(x), model(x)) < 1e-5


def test_dynamic_size_matches_timm():
    options = {**BASE, "dynamic_img_size": True}
    reference = TimmViT(**options).eval()
    _randomise(reference)
    model = vitkit.create_model("vit_tiny_patch16_224", **options).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 48, 64)  # a 6x8 grid from a 4x4 table
    with torch.no_grad():
        assert _relative_error(model(x), reference(x)) < 1e-5


def test_distilled_model_matches_timms_deit_both_ways():
    # DeiT's distillation token: a second prefix token, a second head, the two logits averaged
    from timm.models.deit import VisionTransformerDistilled

    from vitkit.bench import timm_twin

    reference = VisionTransformerDistilled(**BASE).eval()
    _randomise(reference)
    model = vitkit.create_model("vit_tiny_patch16_224", distilled=True, **BASE).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = _input(BASE)
    with torch.no_grad():
        assert _relative_error(model(x), reference(x)) < 1e-5
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert (
            _relative_error(pooled, reference.forward_head(reference.forward_features(x), pre_logits=True))
            < 1e-5
        )
    assert model.num_prefix_tokens == 2 and "dist_token" in model.no_weight_decay()
    assert timm_twin(model).__class__ is VisionTransformerDistilled
    model.reset_classifier(3)  # both heads, fresh
    assert model.head.out_features == model.head_dist.out_features == 3 and model(x).shape == (3, 3)
    assert (
        "distilled" not in vitkit.create_model("vit_tiny_patch16_224", **BASE).config
    )  # timm's options only
    with pytest.raises(ValueError, match="distilled=True reads the class and distillation tokens"):
        vitkit.create_model("vit_tiny_patch16_224", distilled=True, **{**BASE, "global_pool": "avg"})
    with pytest.raises(ValueError, match="keep 'token'"):
        model.reset_classifier(3, global_pool="avg")


def test_forward_intermediates_match_timm():
    options = {**BASE, "reg_tokens": 1}
    reference = TimmViT(**options).eval()
    _randomise(reference)
    model = vitkit.create_model("vit_tiny_patch16_224", **options).eval()
    model.load_state_dict(reference.state_dict())
    x = _input(options)
    with torch.no_grad():
        ours = model.forward_intermediates(x, indices=[0, 1], norm=True, intermediates_only=True)
        theirs = reference.forward_intermediates(x, indices=[0, 1], norm=True, intermediates_only=True)
    for a, b in zip(ours, theirs, strict=True):
        assert _relative_error(a, b) < 1e-5


@pytest.mark.parametrize("name", sorted(set(vitkit.list_models()) & set(timm.list_models())))
def test_names_shared_with_timm_build_the_same_model(name):
    # one block is enough to check every default option (pooling, tokens, norms, sizes)
    reference = timm.create_model(name, pretrained=False, depth=1, num_classes=1000).eval()
    _randomise(reference)
    model = vitkit.create_model(name, depth=1, num_classes=1000).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, *model.img_size)
    with torch.no_grad():
        assert _relative_error(model(x), reference(x)) < 1e-5


# Architectures only timm registers: vitkit reads their options off timm's model (layer scale with
# its own init value, CLIP's pre-norm without patch bias and its 1e-5 epsilon, DINOv2's patch 14...).
TIMM_ONLY = [
    "vit_base_patch32_clip_quickgelu_224",  # OpenAI CLIP's activation
    "vit_base_patch32_siglip_gap_256",  # SigLIP's tanh GELU
    "vit_base_patch16_siglip_224",  # SigLIP's attention-pooling head (global_pool='map')
    "vit_small_patch14_dinov2",
    "deit3_small_patch16_224",
    "vit_base_patch32_clip_224",
    "vit_medium_patch16_gap_256",
    "deit_tiny_distilled_patch16_224",  # a distillation token and a second head (timm's own class)
    "vit_giant_patch14_reg4_dinov2",  # a SwiGLU MLP (timm's SwiGLUPacked), registers
    "aimv2_large_patch14_224",  # RMSNorm, a norm after the patch projection, SwiGLU, no biases
    "test_vit4",  # RMSNorm, a register, LayerScale
]


@pytest.mark.parametrize("name", TIMM_ONLY)
def test_timm_only_names_build_the_same_model_as_timm(name):
    assert name not in vitkit.list_models()
    size = 28 if "patch14" in name else 32  # small inputs: the patch grid is all that matters
    reference = timm.create_model(name, pretrained=False, depth=2, img_size=size, num_classes=5).eval()
    _randomise(reference)
    model = vitkit.create_model(name, depth=2, img_size=size, num_classes=5).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert _relative_error(model(x), reference(x)) < 1e-5
    # the defaults timm does not keep in the weights come along too
    config = vitkit.models.model_config(name)
    block = timm.create_model(name, pretrained=False, depth=1).blocks[0]
    assert config["init_values"] == getattr(block.ls1, "init_values", None)
    assert config["norm_eps"] == block.norm1.eps
    assert model.pretrained_cfg["mean"] == tuple(timm.create_model(name, depth=1).pretrained_cfg["mean"])


def test_a_pretrained_tag_selects_timm_preprocessing_and_classes():
    model = vitkit.create_model("vit_tiny_patch16_224.augreg_in21k", depth=1)
    assert model.num_classes == 21843 and model.pretrained_cfg["crop_pct"] == 0.9
    assert (
        vitkit.create_model("deit3_small_patch16_224.fb_in22k_ft_in1k", depth=1).pretrained_cfg["crop_pct"]
        == 1.0
    )
    with pytest.raises(ValueError, match="timm's tags for it: .*augreg_in21k"):
        vitkit.create_model("vit_tiny_patch16_224.no_such_tag", depth=1)


def test_list_models_with_timm_adds_only_what_vitkit_builds(capsys):
    from vitkit.cli.main import main

    names = vitkit.list_models("deit*", timm=True)
    assert set(vitkit.list_models("deit*")) < set(names)  # the registered ones, and more
    assert {"deit3_small_patch16_224", "deit_tiny_distilled_patch16_224"} <= set(names)
    assert "vit_so400m_patch14_siglip_gap_384" not in vitkit.list_models("vit_so400m*", timm=True)  # 384 % 14
    assert main(["models", "--timm", "deit3_s*"]) == 0
    assert capsys.readouterr().out.split() == ["deit3_small_patch16_224", "deit3_small_patch16_384"]
    assert main(["models", "*dinov2*"]) == 0  # only timm has those: say where to look
    assert "--timm also lists timm's" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("vit_dwee_patch16_reg1_gap_256", "DiffAttention attention"),
        ("vit_medium_patch16_rope_reg1_gap_256", "Eva"),
        ("eva02_tiny_patch14_224", "RotaryEmbeddingCat position rotations .vitkit has DINOv3's."),
        ("vit_base_patch16_rpn_224", "ResPostBlock blocks"),
        ("vit_relpos_base_patch16_224", "VisionTransformerRelPos"),
        (
            "beit3_base_patch16_224",
            r"attention, before its output projection \(scale_attn_norm\), a norm inside the MLP",
        ),
    ],
)
def test_timm_architectures_vitkit_lacks_are_named(name, part):
    with pytest.raises(ValueError, match=part):
        vitkit.create_model(name)


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("eva02_tiny_patch14_224", "separate q and v biases"),
        ("vit_relpos_small_patch16_224", "relative position biases"),
    ],
)
def test_a_bare_state_dict_of_a_relative_vitkit_lacks_names_the_part(name, part, tmp_path):
    # without the timm name only the tensors can tell, and they do: the error says what they show
    patch = 14 if "patch14" in name else 16
    reference = timm.create_model(name, depth=1, embed_dim=96, num_heads=2, img_size=2 * patch)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    with pytest.raises(
        CheckpointMismatchError, match="parts vitkit's VisionTransformer does not: .*" + re.escape(part)
    ):
        vitkit.create_model(pretrained=path)


def test_a_bare_swiglu_state_dict_loads_with_silu(tmp_path):
    # DINOv2's giant model: fc1 gives the gate and the value, twice fc2's input; nothing but the
    # shapes says so, and SwiGLU's SiLU is the activation taken
    reference = timm.create_model("vit_giant_patch14_dinov2", depth=1, embed_dim=96, num_heads=2, img_size=28)
    _randomise(reference.eval())
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = vitkit.create_model(pretrained=path, num_heads=2).eval()
    assert (model.config["mlp_layer"], model.config["act_layer"]) == ("swiglu_packed", "silu")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert _relative_error(model(x), reference(x)) < 1e-5
    # exports: timm's config.json names the MLP through the architecture, transformers' ViT has none
    model.config["model_name"] = "vit_giant_patch14_dinov2"
    folder = save(model, tmp_path / "timm", format="timm")
    again = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        assert _relative_error(again(x), reference(x)) < 1e-5
    model.config["model_name"] = "vit_base_patch16_224"
    with pytest.raises(ValueError, match="cannot name an MLP class"):
        save(model, tmp_path / "timm2", format="timm")
    with pytest.raises(ValueError, match="mlp_layer='swiglu_packed'"):
        save(model, tmp_path / "hf", format="hf")


def test_a_bare_aimv2_state_dict_shows_its_gated_mlp_norms_and_missing_biases(tmp_path):
    reference = timm.create_model("aimv2_large_patch14_224", depth=1, embed_dim=96, num_heads=2, img_size=28)
    _randomise(reference.eval())
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = vitkit.create_model(pretrained=path, num_heads=2, norm_eps=1e-5).eval()
    options = ("mlp_layer", "act_layer", "norm_layer", "embed_norm", "proj_bias", "qkv_bias")
    assert [model.config[k] for k in options] == ["swiglu", "silu", "rmsnorm", True, False, False]
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert _relative_error(model(x), reference(x)) < 1e-5
    # exported for timm under its architecture's name, which brings the MLP class and the epsilon
    model.config["model_name"] = "aimv2_large_patch14_224"
    again = timm.create_model(f"local-dir:{save(model, tmp_path / 'timm', format='timm')}", pretrained=True)
    with torch.no_grad():
        assert _relative_error(again.eval()(x), reference(x)) < 1e-5
    with pytest.raises(ValueError, match="norm_layer='rmsnorm'.*embed_norm=True.*proj_bias=False"):
        save(model, tmp_path / "hf", format="hf")


def test_mismatched_checkpoint_names_keys_shapes_and_options(tmp_path):
    reference = TimmViT(**{**BASE, "embed_dim": 96, "qk_norm": True})
    path = tmp_path / "wide.safetensors"
    save_file(reference.state_dict(), str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        vitkit.create_model("vit_tiny_patch16_224", pretrained=path, **BASE)
    message = str(info.value)
    assert str(path) in message
    assert "patch_embed.proj.weight: (96, 3, 8, 8) vs (48, 3, 8, 8)" in message
    assert "embed_dim (checkpoint: 96, model: 48)" in message
    assert "qk_norm (checkpoint: True, model: False)" in message
    assert "blocks.*.attn.q_norm.weight" in message

    no_cls = TimmViT(**{**BASE, "class_token": False, "global_pool": "avg"})
    with pytest.raises(CheckpointMismatchError, match=r"class_token \(checkpoint: False, model: True\)"):
        load_pretrained(vitkit.create_model("vit_tiny_patch16_224", **BASE), no_cls.state_dict())


def test_new_class_count_and_resolution_are_adapted_not_errors():
    reference = TimmViT(**BASE)
    model = vitkit.create_model("vit_tiny_patch16_224", **{**BASE, "num_classes": 3, "img_size": 48})
    head_before = model.head.weight.clone()
    report = load_pretrained(model, reference.state_dict())
    assert report.head_reset and report.pos_embed_resampled == ((4, 4), (6, 6))
    torch.testing.assert_close(model.head.weight, head_before)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_unreadable_files_get_clear_errors(tmp_path):
    model = vitkit.create_model("vit_tiny_patch16_224", **BASE)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_pretrained(model, tmp_path / "missing.pth")
    bad = tmp_path / "weights.txt"
    bad.write_text("not weights")
    with pytest.raises(ValueError, match="Unsupported weights file"):
        load_pretrained(model, bad)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="Could not read"):
        load_pretrained(model, corrupt)


def test_a_timm_map_model_without_blocks_is_read():
    # the pool is compared with the first block's MLP and heads: a model with none has no such block
    from vitkit.weights.checkpoint import timm_model_options

    reference = timm.create_model(
        "vit_base_patch16_siglip_224", depth=0, embed_dim=32, num_heads=2, img_size=32
    )
    options = timm_model_options(reference)
    assert (options["depth"], options["global_pool"]) == (0, "map")
