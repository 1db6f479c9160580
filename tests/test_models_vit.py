"""The VisionTransformer: shapes for every option that matters, its public methods, training."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

import vitkit
from vitkit.models import VisionTransformer


@pytest.mark.parametrize(
    "options, prefix",
    [
        ({}, 1),
        ({"class_token": False, "global_pool": "avg"}, 0),
        ({"reg_tokens": 4}, 5),
        ({"reg_tokens": 2, "no_embed_class": True, "global_pool": "avg"}, 3),
        ({"pos_embed": "sincos", "class_token": False, "global_pool": "avg"}, 0),
        ({"pos_embed": "none"}, 1),
        ({"qk_norm": True, "init_values": 1e-5, "pre_norm": True}, 1),
        ({"img_size": (32, 48)}, 1),
        ({"global_pool": "max"}, 1),
        ({"global_pool": "avgmax", "fc_norm": False}, 1),
    ],
)
def test_shapes_for_each_option(options, prefix):
    model = VisionTransformer(**{**TINY, **options})
    h, w = model.img_size
    x = torch.randn(2, 3, h, w)
    grid = (h // 8, w // 8)
    assert model.grid_size == grid
    assert model.num_prefix_tokens == prefix
    tokens = model.forward_features(x)
    assert tokens.shape == (2, prefix + grid[0] * grid[1], 32)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, 32)
    logits = model(x)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


def test_no_pooling_and_feature_extractor():
    model = VisionTransformer(**{**TINY, "global_pool": "", "num_classes": 0})
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1 + 16, 32)


def test_dynamic_img_size_accepts_any_divisible_size():
    model = VisionTransformer(**TINY, dynamic_img_size=True).eval()
    for size in [(32, 32), (48, 24), (64, 64)]:
        assert model(torch.randn(1, 3, *size)).shape == (1, 5)
    # at the native size nothing is resampled: same as a static model with the same weights
    static = VisionTransformer(**TINY).eval()
    static.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), static(x))


def test_fused_attn_option_picks_the_kernel_not_the_numbers():
    torch.manual_seed(0)
    fused = VisionTransformer(**TINY)
    torch.manual_seed(0)
    explicit = VisionTransformer(**TINY, fused_attn=False)
    # a choice of kernel: no parameter added, no random number drawn
    assert fused.state_dict().keys() == explicit.state_dict().keys()
    for name, tensor in fused.state_dict().items():
        assert torch.equal(tensor, explicit.state_dict()[name]), name
    assert [block.attn.fused_attn for block in explicit.blocks] == [False, False]
    assert all(block.attn.fused_attn for block in fused.blocks)
    # the explicit path is the one taken: it materialises A, which attn_drop sees
    seen = []
    for block in explicit.blocks:
        block.attn.attn_drop.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    x = torch.randn(2, 3, 32, 32)
    out_explicit = explicit(x)
    assert seen == [(2, 2, 17, 17)] * 2
    out_fused = fused(x)
    torch.testing.assert_close(out_explicit, out_fused, rtol=1e-5, atol=1e-5)
    out_explicit.square().sum().backward()
    out_fused.square().sum().backward()
    for a, b in zip(explicit.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    # recorded only when off, so default configs stay timm's; a rebuild from the config keeps it
    assert "fused_attn" not in fused.config and explicit.config["fused_attn"] is False
    rebuilt = VisionTransformer(**explicit.config)
    assert not any(block.attn.fused_attn for block in rebuilt.blocks)


def test_sincos_positions_are_fixed_and_recomputed_for_new_grids():
    model = VisionTransformer(
        **{
            **TINY,
            "class_token": False,
            "global_pool": "avg",
            "pos_embed": "sincos",
            "dynamic_img_size": True,
        }
    )
    assert not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict()  # stored, so timm (pos_embed='learn') can load it
    big = VisionTransformer(
        **{**TINY, "class_token": False, "global_pool": "avg", "pos_embed": "sincos", "img_size": 48}
    )
    torch.testing.assert_close(model._position_embedding((6, 6)), big.pos_embed.data)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs class_token=True"):
        VisionTransformer(**TINY, class_token=False)
    with pytest.raises(ValueError, match="global_pool='mean'"):
        VisionTransformer(**TINY, global_pool="mean")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        VisionTransformer(**{**TINY, "img_size": 36})
    model = VisionTransformer(**TINY)
    with pytest.raises(ValueError, match="in_chans=1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        model(torch.randn(1, 3, 64, 64))


def test_timm_default_initialisation():
    model = VisionTransformer(img_size=64, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=100)
    assert abs(model.pos_embed.std().item() - 0.02) < 0.003
    assert model.cls_token.abs().max().item() < 1e-4
    fc1 = model.blocks[0].mlp.fc1
    assert abs(fc1.weight.std().item() - 0.02) < 0.002 and fc1.weight.abs().max() <= 2.0
    assert torch.all(fc1.bias == 0) and torch.all(model.head.bias == 0)
    jax = VisionTransformer(**TINY, weight_init="jax")
    assert torch.all(jax.head.weight == 0)


def test_drop_path_rises_linearly_over_blocks():
    model = VisionTransformer(**{**TINY, "depth": 5}, drop_path_rate=0.4)
    rates = [getattr(b.drop_path1, "p", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_builds_on_the_meta_device_without_weights():
    # `with torch.device("meta")` is how one builds a large model's skeleton (FSDP, benchmarks, loading
    # weights straight into place); construction must not read any tensor's values
    options = {**TINY, "drop_path_rate": 0.2, "pos_embed": "sincos", "stem_channels": (8, 16, 32)}
    with torch.device("meta"):
        model = VisionTransformer(**options)
    assert all(p.is_meta for p in model.parameters()) and model.img_size == (32, 32)
    assert [getattr(b.drop_path1, "p", 0.0) for b in model.blocks] == pytest.approx([0.0, 0.2])


def test_forward_intermediates_formats_and_indices():
    model = VisionTransformer(**{**TINY, "reg_tokens": 2, "img_size": (32, 48)}).eval()
    x = torch.randn(2, 3, 32, 48)
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(inter) == 2 and inter[0].shape == (2, 32, 4, 6)
    nlc = model.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True)
    assert nlc[0].shape == (2, 24, 32)
    torch.testing.assert_close(nlc[0], inter[1].flatten(2).transpose(1, 2))
    pairs = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    patches, prefix = pairs[0]
    assert prefix.shape == (2, 3, 32) and patches.shape == (2, 32, 4, 6)
    early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True, norm=True)
    assert early[0].shape == (2, 32, 4, 6)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[5])


def test_reset_classifier_and_no_weight_decay():
    model = VisionTransformer(**TINY)
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0, global_pool="avg")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32)
    assert model.config["num_classes"] == 0 and model.config["global_pool"] == "avg"
    assert model.no_weight_decay() == {
        "pos_embed",
        "cls_token",
        "dist_token",
        "reg_token",
        "attn_pool.latent",
    }
    names = dict(model.named_parameters())
    assert model.no_weight_decay() - {"reg_token", "dist_token", "attn_pool.latent"} <= set(names)


def test_attention_pool_reads_the_patches_and_leaves_with_other_pooling():
    model = VisionTransformer(**{**TINY, "class_token": False, "reg_tokens": 1, "global_pool": "map"}).eval()
    assert "attn_pool.latent" in dict(model.named_parameters())
    assert isinstance(model.norm, torch.nn.LayerNorm) and isinstance(model.fc_norm, torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    # the register token is not pooled (pool_include_prefix=False): changing it changes nothing
    moved = tokens.clone()
    moved[:, 0] += 1.0
    assert torch.equal(model.forward_head(tokens), model.forward_head(moved))
    # the explicit path computes the same pooling as the fused kernel
    fused = model.forward_head(tokens)
    model.attn_pool.fused_attn = False
    torch.testing.assert_close(model.forward_head(tokens), fused)
    with pytest.raises(ValueError, match="built without"):
        VisionTransformer(**TINY).reset_classifier(3, global_pool="map")
    model.reset_classifier(3, global_pool="avg")  # as timm: other pooling drops the pool
    assert model.attn_pool is None and model(x).shape == (2, 3)


def test_registry_lists_creates_and_overrides():
    names = vitkit.list_models()
    for required in [
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
        "vit_base_patch16_224",
        "vit_large_patch16_224",
        "vit_base_patch32_224",
        "vit_huge_patch14_224",
        "vit_tiny_patch4_32",
    ]:
        assert required in names
    assert vitkit.list_models("vit_*_patch4_32*") == [
        "vit_nano_patch4_32",
        "vit_small_patch4_32",
        "vit_tiny_patch4_32",
        "vit_tiny_patch4_32_gap",
    ]
    model = vitkit.create_model("vit_tiny_patch4_32", depth=2, num_classes=3)
    assert len(model.blocks) == 2 and model.embed_dim == 192 and model.num_classes == 3
    assert model.config["model_name"] == "vit_tiny_patch4_32"
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    base = vitkit.create_model("vit_base_patch16_224", depth=1)
    assert base.blocks[0].attn.num_heads == 12 and base.patch_size == (16, 16)
    with pytest.raises(ValueError, match="Unknown model 'vit_tiny_patch3_224'"):
        vitkit.create_model("vit_tiny_patch3_224")
    with pytest.raises(TypeError, match="Valid options:.*embed_dim"):
        vitkit.create_model("vit_tiny_patch4_32", embed_dimension=8)


def _toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # class k has a bright square in quadrant k: learnable in a few steps
    x = torch.randn(16, 3, 32, 32) * 0.1
    y = torch.arange(16) % 4
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, :, r * 16 : r * 16 + 16, c * 16 : c * 16 + 16] += 1.0
    return x, y


def test_a_few_training_steps_lower_the_loss():
    model = VisionTransformer(**{**TINY, "num_classes": 4})
    x, y = _toy_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gradient_checkpointing_gives_the_same_gradients():
    model = VisionTransformer(**TINY)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert model.grad_checkpointing
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
