"""The parts of timm's model interface that timm's own tools call: each checked against timm's
model with the same weights (vitkit uses timm's parameter names, so state dicts load both ways)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.optim import param_groups_layer_decay

import vitkit
from vitkit.models import FeatureExtractor
from vitkit.weights.finetune import param_groups_lrd

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "num_classes": 5}


def twins(**options) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A timm ViT with random weights and the vitkit model holding the same weights, both in eval."""
    options = {**TINY, **options}
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **options).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = vitkit.create_model("vit_tiny_patch16_224", **options).eval()
    model.load_state_dict(reference.state_dict())
    return model, reference


def scales(groups: list[dict]) -> dict[int, float]:
    """id(parameter) -> its group's lr_scale."""
    return {id(p): g["lr_scale"] for g in groups for p in g["params"]}


def test_timm_layer_decay_groups_a_vitkit_model_as_its_timm_twin():
    model, reference = twins(reg_tokens=2)
    ours = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    theirs = param_groups_layer_decay(reference, weight_decay=0.05, layer_decay=0.5)
    by_name = scales(ours)
    reference_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert by_name[id(p)] == scales(theirs)[id(reference_params[name])], name
    # five groups (embedding, three blocks, the rest) and the decay a BEiT-style schedule gives
    assert by_name[id(model.pos_embed)] == 0.5**4 and by_name[id(model.blocks[1].mlp.fc1.weight)] == 0.5**2
    assert by_name[id(model.head.weight)] == 1.0
    # vitkit's own layer decay agrees, except for the final norm: timm counts it with the last
    # block, vitkit with the head, as MAE's and BEiT's fine-tuning scripts do
    for group in param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5):
        for name, p in zip(group["param_names"], group["params"], strict=True):
            assert group["lr_scale"] == (1.0 if name.startswith("norm.") else by_name[id(p)]), name


@pytest.mark.parametrize("norm", [False, True])
def test_features_only_matches_timm(norm, tmp_path):
    _, reference = twins(class_token=True)
    save_file(reference.state_dict(), str(tmp_path / "weights.safetensors"))
    options = {k: v for k, v in TINY.items() if k != "num_classes"}
    extractor = vitkit.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,  # timm's way to point at a local file
        pretrained_cfg_overlay={"file": str(tmp_path / "weights.safetensors"), "crop_pct": 1.0},
        features_only=True,
        out_indices=(0, -2),
        feature_cfg={"norm": norm},
        **options,
    ).eval()
    timm_extractor = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(tmp_path / "weights.safetensors")},
        features_only=True,
        out_indices=(0, -2),
        **options,
    ).eval()
    assert isinstance(extractor, FeatureExtractor)
    assert extractor.out_indices == (0, 1)
    assert len(extractor.model.blocks) == 2  # the third block is dropped, and the head
    assert extractor.feature_info.channels() == timm_extractor.feature_info.channels() == [32, 32]
    assert extractor.feature_info.reduction() == timm_extractor.feature_info.reduction() == [8, 8]
    assert extractor.pretrained_cfg["crop_pct"] == 1.0  # the overlay lands in the config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = extractor(x)
        # timm's create_model has no switch for the norm: ask its model directly for that case
        theirs = reference.forward_intermediates(x, (0, 1), norm=True, intermediates_only=True)
        theirs = theirs if norm else timm_extractor(x)
    assert [f.shape for f in ours] == [(2, 32, 4, 4)] * 2
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the extractor's weights are the full model's, under timm's "model." prefix (the norm kept for norm=True)
    kept_norm = {"model.norm.weight", "model.norm.bias"} if norm else set()
    assert set(extractor.state_dict()) == set(timm_extractor.state_dict()) | kept_norm


def test_get_intermediate_layers_as_timm_and_dino():
    model, reference = twins(reg_tokens=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for kwargs in (
            {"n": 2},
            {"n": [0, 2], "reshape": True},
            {"n": 1, "return_prefix_tokens": True, "norm": True},
        ):
            ours = model.get_intermediate_layers(x, **kwargs)
            theirs = reference.get_intermediate_layers(x, **kwargs)
            assert len(ours) == len(theirs)
            torch.testing.assert_close(ours, list(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_embed", ["learn", "sincos"])
def test_set_input_size_resamples_positions_as_timm(pos_embed):
    if pos_embed == "learn":  # timm resamples the table as vitkit should
        model, reference = twins()
        reference.set_input_size(img_size=48)
    else:  # timm has no sin-cos option: the table must be the one a model built at 48 has
        model = vitkit.create_model("vit_tiny_patch16_224", **TINY, pos_embed="sincos").eval()
        reference = vitkit.create_model(
            "vit_tiny_patch16_224", **{**TINY, "img_size": 48}, pos_embed="sincos"
        ).eval()
        weights = {k: v for k, v in model.state_dict().items() if k != "pos_embed"}
        assert reference.load_state_dict(weights, strict=False).missing_keys == ["pos_embed"]
    model.pretrained_cfg = {"input_size": (3, 32, 32)}
    model.set_input_size(img_size=48)
    assert model.img_size == (48, 48) and model.grid_size == (6, 6)
    assert model.config["img_size"] == (48, 48) and model.pretrained_cfg["input_size"] == (3, 48, 48)
    assert model.pos_embed.shape == (1, 1 + 36, 32)
    assert model.pos_embed.requires_grad == (pos_embed == "learn")
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model.set_input_size(img_size=50)
    assert model.img_size == (48, 48)  # a refused size leaves the model as it was
    with pytest.raises(ValueError, match="cannot change the patch size"):
        model.set_input_size(patch_size=4)


def test_prune_intermediate_layers_as_timm():
    model, reference = twins(global_pool="map", class_token=False)
    assert (
        model.prune_intermediate_layers([-2], prune_norm=True)
        == reference.prune_intermediate_layers([-2], prune_norm=True)
        == [1]
    )
    assert len(model.blocks) == model.config["depth"] == 2
    assert model.num_classes == 0 and model.attn_pool is None
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.head, torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_intermediates(x, [1], intermediates_only=True),
            reference.forward_intermediates(x, [1], intermediates_only=True),
        )


def test_checkpoint_path_and_config_aliases(tmp_path):
    _, reference = twins()
    save_file(reference.state_dict(), str(tmp_path / "weights.safetensors"))
    loaded = vitkit.create_model(
        "vit_tiny_patch16_224", checkpoint_path=tmp_path / "weights.safetensors", **TINY
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), atol=1e-5, rtol=1e-5)
    assert loaded.default_cfg is loaded.pretrained_cfg
    assert loaded.head_hidden_size == reference.head_hidden_size == 32
    assert timm.data.resolve_model_data_config(loaded)["input_size"] == (3, 32, 32)
