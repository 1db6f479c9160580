"""Fine-tuning: new head, new resolution (positions, non-square grids), new patch size, LLRD, freezing."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_patch_embed as timm_resample_patch_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT

import vitkit
from vitkit.models import resample_position_embedding
from vitkit.weights import (
    CheckpointMismatchError,
    freeze,
    load_pretrained,
    param_groups_lrd,
    resample_patch_embed,
    save,
    unfreeze,
)

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def reference(**options) -> TimmViT:
    model = TimmViT(**{**TINY, **options}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def vit(**options) -> vitkit.VisionTransformer:
    return vitkit.create_model("vit_tiny_patch16_224", **{**TINY, **options})


# ---------------------------------------------------------------------------- new head
def test_new_class_count_reinitialises_the_head_and_says_so(caplog):
    source = reference()
    model = vit(num_classes=3)
    fresh_head = model.head.weight.clone()
    with caplog.at_level(logging.INFO, logger="vitkit"):
        report = load_pretrained(model, source.state_dict())
    assert report.head_reset
    assert "classifier head not loaded: the checkpoint has 5 classes and the model 3" in caplog.text
    torch.testing.assert_close(model.head.weight, fresh_head)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_distilled_checkpoint_fine_tunes_with_both_heads_fresh_and_trainable():
    from timm.models.deit import VisionTransformerDistilled

    source = VisionTransformerDistilled(**TINY).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = vit(distilled=True, num_classes=3)
    fresh = model.head_dist.weight.clone()
    report = load_pretrained(model, source.state_dict())
    assert report.head_reset
    torch.testing.assert_close(model.head_dist.weight, fresh)  # neither 5-class head was taken
    torch.testing.assert_close(model.dist_token, source.dist_token)
    # a linear probe trains both heads; the distillation token is stem (LLRD layer 0)
    frozen = set(freeze(model, "linear_probe"))
    assert "head_dist.weight" not in frozen and "head.weight" not in frozen and "dist_token" in frozen
    unfreeze(model)
    groups = param_groups_lrd(model, layer_decay=0.5, base_lr=1.0)
    scale = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
    assert scale["dist_token"] == min(scale.values()) and scale["head_dist.weight"] == 1.0


# ---------------------------------------------------------------------------- new resolution
def test_same_grid_is_identity_and_new_grid_resamples():
    source = reference()
    same = vit()
    report = load_pretrained(same, source.state_dict())
    assert report.pos_embed_resampled is None
    torch.testing.assert_close(same.pos_embed, source.pos_embed, rtol=0, atol=0)

    bigger = vit(img_size=64)
    report = load_pretrained(bigger, source.state_dict())
    assert report.pos_embed_resampled == ((4, 4), (8, 8))
    torch.testing.assert_close(bigger.pos_embed[:, :1], source.pos_embed[:, :1])  # class token kept aside
    assert bigger(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_non_square_checkpoint_grid(tmp_path):
    source = reference(img_size=(32, 48))  # a 4x6 grid: 24 patches, 25 entries with the class token
    state = source.state_dict()
    expected = resample_position_embedding(source.pos_embed, (6, 6), (4, 6), num_prefix_tokens=1)

    # a plain state dict does not record the grid: the error asks for it
    with pytest.raises(CheckpointMismatchError, match=r"old_grid=\(rows, columns\)"):
        load_pretrained(vit(img_size=48), state)
    model = vit(img_size=48)
    report = load_pretrained(model, state, old_grid=(4, 6))
    assert report.pos_embed_resampled == ((4, 6), (6, 6))
    torch.testing.assert_close(model.pos_embed, expected)

    # a grid with the model's aspect ratio is found without help
    wide = vit(img_size=(64, 96))
    assert load_pretrained(wide, state).pos_embed_resampled == ((4, 6), (8, 12))

    # exported by vitkit, the grid travels in the metadata, even a transposed one of the same length
    exported = vit(img_size=(32, 48))
    exported.load_state_dict(state)
    file = save(exported, tmp_path / "wide.safetensors")
    tall = vit(img_size=(48, 32))
    report = load_pretrained(tall, file)
    assert report.pos_embed_resampled == ((4, 6), (6, 4))
    torch.testing.assert_close(
        tall.pos_embed, resample_position_embedding(source.pos_embed, (6, 4), (4, 6), num_prefix_tokens=1)
    )


def test_position_layout_mismatch_is_named(tmp_path):
    # registers without positions (timm's *_reg models) vs a model that gives them positions
    exported = vit(reg_tokens=2, no_embed_class=True)
    file = save(exported, tmp_path / "reg.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"no_embed_class \(checkpoint: True, model: False"):
        load_pretrained(vit(reg_tokens=2), file)
    load_pretrained(vit(reg_tokens=2, no_embed_class=True, img_size=48), file)  # and resampled when it fits


def test_dino_style_teacher_checkpoint_with_backbone_prefix():
    source = reference(num_classes=0)
    checkpoint = {
        "teacher": {
            **{f"backbone.{k}": v for k, v in source.state_dict().items()},
            "head.mlp.0.weight": torch.zeros(4, 32),  # DINO's projection head: not part of the ViT
        },
        "epoch": 100,
    }
    model = vit(num_classes=0)
    report = load_pretrained(model, checkpoint)
    assert any("'backbone.'" in note for note in report.notes)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model.eval()(x), source(x)) < 1e-5


def test_wrong_old_grid_is_named():
    with pytest.raises(CheckpointMismatchError, match=r"old_grid=\(3, 3\) has 9 positions"):
        load_pretrained(vit(img_size=48), reference().state_dict(), old_grid=(3, 3))


# ---------------------------------------------------------------------------- new patch size
def test_patch_kernel_resampling_matches_timm_and_preserves_tokens():
    kernel = torch.randn(32, 3, 8, 8)
    for size in (16, 12, 4):
        ours, theirs = resample_patch_embed(kernel, size), timm_resample_patch_embed(kernel, [size, size])
        assert relative_error(ours, theirs) < 1e-5
    # enlarging a patch: <x, w> == <resize(x), w'> for any patch x (FlexiViT's pseudo-inverse)
    patches = torch.randn(6, 3, 8, 8)
    resized = F.interpolate(patches, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    before = torch.einsum("bchw,dchw->bd", patches, kernel)
    after = torch.einsum("bchw,dchw->bd", resized, resample_patch_embed(kernel, 16))
    assert relative_error(after, before) < 1e-5


def test_new_patch_size_is_resampled_automatically(caplog):
    source = reference()  # 8x8 patches on 32x32 images
    model = vit(img_size=64, patch_size=16).eval()  # 16x16 patches on 64x64: the same 4x4 grid
    with caplog.at_level(logging.INFO, logger="vitkit"):
        report = load_pretrained(model, source.state_dict())
    assert report.patch_embed_resampled == ((8, 8), (16, 16)) and report.pos_embed_resampled is None
    assert "patch-embedding kernel resampled" in caplog.text
    # a smooth image at twice the resolution gives nearly the same features
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    image = torch.stack([torch.sin(2 * ys + 1), torch.cos(3 * xs), ys * xs]).unsqueeze(0)
    upsampled = F.interpolate(image, size=(64, 64), mode="bicubic", antialias=True, align_corners=False)
    with torch.no_grad():
        error = relative_error(model.forward_features(upsampled), source.forward_features(image))
    assert error < 0.02


# ---------------------------------------------------------------------------- layer-wise LR decay
def test_param_groups_lrd_values_and_coverage():
    model = vit(init_values=0.1)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5, base_lr=1e-3)
    where = {name: g for g in groups for name in g["param_names"]}
    names = [name for g in groups for name in g["param_names"]]
    assert len(names) == len(set(names)), "a parameter is in two groups"
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in groups) == len(names)
    # depth 2 -> 3 layers: stem 0.5^3, block 0 0.5^2, block 1 0.5, norm/head 1
    expected = {
        "patch_embed.proj.weight": (0.125, 0.05),
        "patch_embed.proj.bias": (0.125, 0.0),
        "cls_token": (0.125, 0.0),
        "pos_embed": (0.125, 0.0),
        "blocks.0.attn.qkv.weight": (0.25, 0.05),
        "blocks.0.norm1.weight": (0.25, 0.0),
        "blocks.0.ls1.gamma": (0.25, 0.0),
        "blocks.1.mlp.fc1.weight": (0.5, 0.05),
        "blocks.1.mlp.fc1.bias": (0.5, 0.0),
        "norm.weight": (1.0, 0.0),
        "head.weight": (1.0, 0.05),
        "head.bias": (1.0, 0.0),
    }
    for name, (scale, decay) in expected.items():
        assert where[name]["lr_scale"] == pytest.approx(scale), name
        assert where[name]["weight_decay"] == decay, name
        assert where[name]["lr"] == pytest.approx(1e-3 * scale), name
    optimizer = torch.optim.AdamW(groups, lr=1e-3)  # the extra keys ride along
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()

    flat = param_groups_lrd(model, weight_decay=0.05, layer_decay=1.0)  # no decay: decay/no-decay only
    assert [(g["weight_decay"], g["lr_scale"]) for g in flat] == [(0.05, 1.0), (0.0, 1.0)]
    assert sorted(n for g in flat for n in g["param_names"]) == sorted(names)


# ---------------------------------------------------------------------------- freezing
def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freezing_strategies():
    model = vit()
    everything = trainable(model)
    assert freeze(model, "full") == [] and trainable(model) == everything

    frozen = freeze(model, "linear_probe")
    assert trainable(model) == {"head.weight", "head.bias"} and len(frozen) == len(everything) - 2
    groups = param_groups_lrd(model, layer_decay=0.9)
    assert [n for g in groups for n in g["param_names"]] == ["head.weight", "head.bias"]
    assert len(unfreeze(model)) == len(frozen) and trainable(model) == everything

    freeze(model, "freeze_blocks:1")
    assert not any(
        n.startswith(("patch_embed", "cls_token", "pos_embed", "blocks.0.")) for n in trainable(model)
    )
    assert {n for n in everything if n.startswith(("blocks.1.", "norm.", "head."))} <= trainable(model)
    unfreeze(model)

    freeze(model, "last_blocks:1")
    assert trainable(model) == {n for n in everything if n.startswith(("blocks.1.", "norm.", "head."))}
    unfreeze(model)

    freeze(model, "linear_probe")
    unfreeze(model, last_blocks=1)  # gradual unfreezing, top down
    assert trainable(model) == {n for n in everything if n.startswith(("blocks.1.", "norm.", "head."))}

    with pytest.raises(ValueError, match="linear_probe"):
        freeze(model, "half")
    with pytest.raises(ValueError, match="only 2 blocks"):
        freeze(model, "freeze_blocks:3")


def test_freeze_then_unfreeze_schedule_with_one_optimizer():
    model = vit(pos_embed="sincos", class_token=False, global_pool="avg")
    freeze(model, "linear_probe")
    optimizer = torch.optim.AdamW(param_groups_lrd(model, layer_decay=0.75, include_frozen=True), lr=1e-2)
    block_before = model.blocks[0].attn.qkv.weight.detach().clone()
    head_before = model.head.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, block_before, rtol=0, atol=0)
    assert not torch.equal(model.head.weight, head_before)

    unfreeze(model)
    assert not model.pos_embed.requires_grad  # a sin-cos table stays fixed
    optimizer.zero_grad()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.blocks[0].attn.qkv.weight, block_before)


def test_plain_state_dict_file_round_trip_into_a_frozen_model(tmp_path):
    source = reference()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = vit(num_classes=2)
    freeze(model, "linear_probe")
    load_pretrained(model, tmp_path / "w.safetensors")  # loading does not change requires_grad
    assert trainable(model) == {"head.weight", "head.bias"}
