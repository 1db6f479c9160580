"""Rotary position embeddings: the rotation's algebra, its place in the model, and DINOv3's weights."""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.models.rope import RotaryPositionEmbedding, apply_rotary

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 3}


def test_a_rotation_keeps_lengths_and_makes_scores_depend_on_relative_position():
    rope = RotaryPositionEmbedding(head_dim=16)
    cos, sin = rope((4, 4))
    assert cos.shape == sin.shape == (16, 16)
    q, k = torch.randn(16), torch.randn(16)
    rotated_q = apply_rotary(q.expand(1, 1, 16, 16), cos, sin)[0, 0]  # the same q at every patch
    rotated_k = apply_rotary(k.expand(1, 1, 16, 16), cos, sin)[0, 0]
    torch.testing.assert_close(rotated_q.norm(dim=-1), q.norm().expand(16))
    # patches (0,0)-(1,1) and (1,1)-(2,2) are the same step apart: the same score
    first = rotated_q[0] @ rotated_k[5]
    shifted = rotated_q[5] @ rotated_k[10]
    torch.testing.assert_close(first, shifted)
    assert not torch.allclose(first, rotated_q[0] @ rotated_k[10])  # a longer step, another score


def test_prefix_tokens_are_not_rotated():
    rope = RotaryPositionEmbedding(head_dim=8)
    cos, sin = rope((2, 2))
    x = torch.randn(1, 2, 3 + 4, 8)  # 3 prefix tokens, then 4 patches
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out[:, :, :3], x[:, :, :3])
    assert not torch.allclose(out[:, :, 3:], x[:, :, 3:])


def test_rope_gives_an_otherwise_position_free_model_its_positions():
    # without position embeddings a mean-pooled ViT cannot tell shuffled patches apart; with RoPE it can
    options = {**TINY, "class_token": False, "global_pool": "avg", "pos_embed": "none"}
    x = torch.randn(2, 3, 32, 32)
    swapped = x.clone()
    swapped[..., :8, :8], swapped[..., 8:16, 8:16] = x[..., 8:16, 8:16], x[..., :8, :8]
    with torch.no_grad():
        plain = vitkit.create_model("vit_tiny_patch16_224", **options).eval()
        torch.testing.assert_close(plain(x), plain(swapped), atol=1e-5, rtol=1e-5)
        rotary = vitkit.create_model("vit_tiny_patch16_224", **options, rope=True).eval()
        for block in rotary.blocks:  # sharp attention (at initialisation it is nearly uniform)
            block.attn.qkv.weight.mul_(20)
        assert not torch.allclose(rotary(x), rotary(swapped), atol=1e-3)
        # any input size, nothing to resample; the same tables for the intermediates
        big = torch.randn(1, 3, 48, 40)
        rotary.dynamic_img_size, rotary.patch_embed.strict_img_size = True, False
        tokens = rotary.forward_intermediates(big, indices=[1], output_fmt="NLC", intermediates_only=True)[0]
        assert tokens.shape == (1, 30, 32)


def test_rescaling_the_coordinates_happens_in_training_only():
    rope = RotaryPositionEmbedding(head_dim=8, rescale=2.0)
    torch.manual_seed(0)
    assert not torch.equal(rope((3, 3))[0], rope((3, 3))[0])
    rope.eval()
    assert torch.equal(rope((3, 3))[0], rope((3, 3))[0])
    with pytest.raises(ValueError, match="divisible by 4"):
        RotaryPositionEmbedding(head_dim=6)


def test_a_rope_model_saves_for_vitkit_and_is_refused_by_timm(tmp_path):
    from vitkit.weights import model_from_checkpoint, save

    model = vitkit.create_model("vit_tiny_patch16_224", **TINY, pos_embed="none", rope=True, rope_theta=50.0)
    assert model.config["rope"] and model.options_timm_lacks() == ["rotary position embeddings (rope=True)"]
    again = model_from_checkpoint(save(model, tmp_path / "rope.safetensors")).eval()
    assert (again.config["rope"], again.config["rope_theta"]) == (True, 50.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model.eval()(x))
    with pytest.raises(ValueError, match="rotary position embeddings"):
        save(model, tmp_path / "timm", format="timm")
    assert "rope" not in vitkit.create_model("vit_tiny_patch16_224", **TINY).config  # timm's options only


def test_the_rotation_angles_keep_full_precision_in_a_bf16_model():
    # low-precision frequencies would turn far patches by visibly wrong angles (timm guards the same)
    model = vitkit.create_model("vit_tiny_patch16_224", **TINY, pos_embed="none", rope=True)
    x = torch.randn(1, 3, 32, 32)
    cos, sin = model._rotations(x)
    model.to(torch.bfloat16)
    cos16, sin16 = model._rotations(x.bfloat16())
    assert cos16.dtype == torch.float32 and torch.equal(cos16, cos) and torch.equal(sin16, sin)
