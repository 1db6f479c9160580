"""Capturing attention: exact weights, only the requested layers, every token layout and backend."""

from __future__ import annotations

import pytest
import timm
import torch

from vitkit.explain import AttentionRecorder, TokenLayout, attention_maps, token_layout
from vitkit.models import VisionTransformer

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}


def _explicit_attention(model, images, qkv_of):
    """softmax(q kᵀ / √d) recomputed by hand from each block's normalised input."""
    inputs = {}
    hooks = [
        block.norm1.register_forward_hook(lambda m, a, out, i=i: inputs.__setitem__(i, out))
        for i, block in enumerate(model.blocks)
    ]
    with torch.no_grad():
        model.eval()(images)
    for h in hooks:
        h.remove()
    expected = {}
    for i, block in enumerate(model.blocks):
        q, k = qkv_of(block.attn, inputs[i])
        expected[i] = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return expected


def _qk(attn, x):
    b, n, d = x.shape
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(b, n, 3, attn.num_heads, d // attn.num_heads)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)
    return attn.q_norm(q), attn.k_norm(k)


@pytest.mark.parametrize(
    "options", [{}, {"reg_tokens": 4, "qk_norm": True}, {"class_token": False, "global_pool": "avg"}]
)
def test_attention_maps_equal_the_explicit_formula_on_vitkit(options):
    model = VisionTransformer(**TINY, **options)
    images = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model, images)
    expected = _explicit_attention(model, images, _qk)
    n = model.num_prefix_tokens + 16
    assert sorted(maps) == [0, 1]
    for i in (0, 1):
        assert maps[i].shape == (2, 2, n, n)
        torch.testing.assert_close(maps[i], expected[i], rtol=1e-5, atol=1e-6)
    assert all(block.attn.fused_attn for block in model.blocks)


def test_attention_maps_on_timm_with_fused_attention_left_on():
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, reg_tokens=2, qk_norm=True
    )
    for block in model.blocks:
        block.attn.fused_attn = True
    images = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model, images, layers=[-1, 3])
    assert sorted(maps) == [3, 11]
    expected = _explicit_attention(model, images, _qk)
    for i in (3, 11):
        torch.testing.assert_close(maps[i], expected[i], rtol=1e-5, atol=1e-6)
    assert all(block.attn.fused_attn for block in model.blocks)  # restored


def test_only_requested_layers_take_the_slow_path_and_are_kept():
    model = VisionTransformer(**{**TINY, "depth": 3}).eval()
    calls = {i: 0 for i in range(3)}
    for i, block in enumerate(model.blocks):
        block.attn.attn_drop.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    with AttentionRecorder(model, layers=[1]) as recorder:
        assert [b.attn.fused_attn for b in model.blocks] == [True, False, True]
        model(torch.randn(1, 3, 32, 32))
    assert calls == {0: 0, 1: 1, 2: 0}  # layers 0 and 2 never materialised A
    assert list(recorder.attentions) == [1]
    assert [b.attn.fused_attn for b in model.blocks] == [True, True, True]


def test_recorder_gradients_are_keyed_by_their_own_layer_and_settings_are_restored():
    model = VisionTransformer(**TINY).eval()
    model.set_grad_checkpointing(True)
    images = torch.randn(2, 3, 32, 32)
    with AttentionRecorder(model, gradients=True) as recorder:
        assert not model.grad_checkpointing
        model(images)[:, 2].sum().backward()
    assert model.grad_checkpointing
    # the same gradients by autograd.grad with respect to each captured tensor
    with AttentionRecorder(model) as second:
        logits = model(images)
    grads = torch.autograd.grad(logits[:, 2].sum(), [second.attentions[0], second.attentions[1]])
    for i in (0, 1):
        torch.testing.assert_close(recorder.gradients[i], grads[i])
    assert not torch.allclose(recorder.gradients[0], recorder.gradients[1])


def test_recorder_restores_the_model_after_an_error():
    model = VisionTransformer(**TINY)
    with pytest.raises(ValueError), AttentionRecorder(model):
        model(torch.randn(1, 3, 24, 24))  # wrong size: the model raises
    assert all(block.attn.fused_attn for block in model.blocks)
    assert all(not block.attn.attn_drop._forward_pre_hooks for block in model.blocks)


def test_token_layouts_of_vitkit_and_timm_models():
    cls = token_layout(VisionTransformer(**TINY), (32, 32))
    assert cls == TokenLayout(grid=(4, 4), num_prefix_tokens=1, cls_index=0)
    assert cls.query_indices() == [0]
    reg = token_layout(VisionTransformer(**TINY, reg_tokens=4, global_pool="avg"), (32, 32))
    assert (reg.num_prefix_tokens, reg.reg_indices, reg.pooling) == (5, (1, 2, 3, 4), "patches")
    assert reg.query_indices() == list(range(5, 21))
    assert reg.labels()[:6] == ["CLS", "REG0", "REG1", "REG2", "REG3", "(0,0)"]
    # pooling the prefix tokens with the patches: the prediction reads every token
    every = token_layout(
        VisionTransformer(**TINY, reg_tokens=4, global_pool="avg", pool_include_prefix=True), (32, 32)
    )
    assert (every.pooling, every.query_indices()) == ("all", list(range(21)))
    gap = token_layout(VisionTransformer(**TINY, class_token=False, global_pool="avg"), (32, 32))
    assert (gap.cls_index, gap.num_prefix_tokens) == (None, 0)
    with pytest.raises(ValueError, match="no class token"):
        gap.query_indices("cls")
    wide = token_layout(VisionTransformer(**{**TINY, "img_size": (32, 48)}), (32, 48))
    assert wide.grid == (4, 6)
    dynamic = token_layout(VisionTransformer(**TINY, dynamic_img_size=True), torch.zeros(1, 3, 24, 40))
    assert dynamic.grid == (3, 5)

    deit = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, num_classes=5)
    layout = token_layout(deit, (32, 32))
    assert (layout.cls_index, layout.dist_index, layout.query_indices()) == (0, 1, [0, 1])
    assert layout.labels()[:3] == ["CLS", "DIST", "(0,0)"]
    treg = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, reg_tokens=3, dynamic_img_size=True, num_classes=5
    )
    layout = token_layout(treg, (24, 40))
    assert (layout.grid, layout.reg_indices) == ((3, 5), (1, 2, 3))
    maps = attention_maps(treg, torch.randn(1, 3, 24, 40), layers=0)
    assert maps[0].shape == (1, 3, 4 + 15, 4 + 15)


def test_hugging_face_vit_attention_is_read_layer_by_layer():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    model = transformers.ViTForImageClassification(config).eval()
    before = model.config._attn_implementation
    images = torch.randn(2, 3, 32, 32)
    inputs = {}
    layers = [m for m in model.modules() if type(m).__name__ == "ViTLayer"]
    for i, layer in enumerate(layers):
        layer.layernorm_before.register_forward_hook(lambda m, a, out, i=i: inputs.__setitem__(i, out))
    maps = attention_maps(model, images, layers=[1])
    assert list(maps) == [1]
    attn = layers[1].attention
    q = attn.q_proj(inputs[1]).unflatten(-1, (2, 16)).transpose(1, 2)
    k = attn.k_proj(inputs[1]).unflatten(-1, (2, 16)).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
    torch.testing.assert_close(maps[1], expected.detach(), rtol=1e-5, atol=1e-6)
    assert model.config._attn_implementation == before
    assert layers[1].attention.config is model.config
    assert token_layout(model, images).grid == (4, 4)
    from vitkit.explain import relevance

    batched = relevance(model, images)  # gradients through the eager attention weights
    single = torch.cat([relevance(model, images[i : i + 1]) for i in range(2)])
    assert batched.shape == (2, 4, 4)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hugging_face_mean_pooled_classifiers_are_explained_as_their_vitkit_twins(kind, tmp_path):
    # CLIPForImageClassification and SiglipForImageClassification classify the mean of the patch
    # tokens (CLIP: after a class token; SigLIP: none): every method must read those rows, and
    # give what the same weights loaded into vitkit give
    transformers = pytest.importorskip("transformers")
    from vitkit.explain import METHODS, explain
    from vitkit.weights import model_from_checkpoint

    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config_class, model_class = {
        "clip": (transformers.CLIPConfig, transformers.CLIPForImageClassification),
        "siglip": (transformers.SiglipConfig, transformers.SiglipForImageClassification),
    }[kind]
    torch.manual_seed(0)
    model = model_class(config_class(vision_config=vision, text_config=text, num_labels=3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    twin = model_from_checkpoint(tmp_path).eval()

    images = torch.randn(2, 3, 32, 32)
    layout = token_layout(model, images)
    assert layout == token_layout(twin, images)
    assert layout.pooling == "patches" and layout.cls_index == (0 if kind == "clip" else None)
    assert layout.query_indices() == list(range(layout.num_prefix_tokens, layout.num_tokens))
    for method in ("raw_attention", "rollout", "gradient_rollout", "relevance"):
        assert method in METHODS
        torch.testing.assert_close(explain(model, images, method), explain(twin, images, method))

    # the tower alone pools with an nn.MultiheadAttention: refused, with the way to read it
    tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision))
    with pytest.raises(TypeError, match=r"attention-pooling head.*vitkit.create_model\(pretrained="):
        token_layout(tower, images)


def test_timm_parallel_scaling_blocks_are_read_where_they_compute_attention():
    # ParallelScalingBlock: no `attn` module, attention and MLP from one fused projection
    model = timm.create_model("vit_base_patch16_xp_224", **{**TINY, "depth": 2}).eval()
    images = torch.randn(2, 3, 32, 32)
    inputs = {}
    block = model.blocks[1]
    block.in_norm.register_forward_hook(lambda m, a, out: inputs.__setitem__(1, out))
    maps = attention_maps(model, images, layers=1)
    _, q, k, _ = torch.split(block.in_proj(inputs[1]), block.in_split, dim=-1)
    q, k = (block.q_norm(t.unflatten(-1, (2, 16))).transpose(1, 2) for t in (q, k))
    expected = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
    torch.testing.assert_close(maps[1], expected.detach(), rtol=1e-5, atol=1e-6)


def test_eva_register_tokens_are_counted_from_the_tokens():
    # timm's Eva keeps register tokens without a count attribute
    model = timm.create_model(
        "vit_base_patch16_rope_reg1_gap_256", **{**TINY, "depth": 2, "num_heads": 2}
    ).eval()
    layout = token_layout(model, (32, 32))
    assert (layout.num_prefix_tokens, layout.cls_index, layout.reg_indices) == (1, None, (0,))
    assert attention_maps(model, torch.randn(1, 3, 32, 32), layers=0)[0].shape == (1, 2, 17, 17)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("vit_small_patch16_18x2_224", "ParallelThingsBlock"),  # two attentions side by side per block
        ("cait_xxs24_224", "TalkingHeadAttn"),  # patch-only attention, then class attention
        ("xcit_tiny_12_p16_224", "Cannot read the patch grid"),  # attention over channels
    ],
)
def test_attention_vitkit_cannot_follow_is_refused_by_name(name, message):
    model = timm.create_model(name, img_size=32, num_classes=3).eval()
    from vitkit.explain import rollout

    with pytest.raises(TypeError, match=message):
        rollout(model, torch.randn(1, 3, 32, 32))


def test_attention_that_is_not_token_to_token_is_refused():
    class ClassAttention(torch.nn.Module):  # one query (the class token) over all tokens
        fused_attn = True

        def __init__(self):
            super().__init__()
            self.attn_drop = torch.nn.Identity()

        def forward(self, x):
            return self.attn_drop(torch.softmax(x[:, :1] @ x.transpose(1, 2), dim=-1).unsqueeze(1))

    model = torch.nn.Sequential(ClassAttention())
    with pytest.raises(ValueError, match="attends from 1 to 5 tokens"), AttentionRecorder(model):
        model(torch.randn(2, 5, 8))


def test_torchvision_vit_attention_weights():
    from torchvision.models import VisionTransformer as TVViT

    model = TVViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64).eval()
    images = torch.randn(2, 3, 32, 32)
    inputs = {}
    layer = model.encoder.layers[0]
    layer.ln_1.register_forward_hook(lambda m, a, out: inputs.__setitem__(0, out))
    maps = attention_maps(model, images, layers=0)
    w, b = layer.self_attention.in_proj_weight, layer.self_attention.in_proj_bias
    q, k, _ = (inputs[0] @ w.T + b).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
    torch.testing.assert_close(maps[0], expected.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gradients cannot be read"):
        AttentionRecorder(model, gradients=True)


@pytest.mark.parametrize("include_prefix", [False, True])
def test_attention_pool_weights_are_recorded_exactly_on_vitkit_and_timm(include_prefix):
    options = {**TINY, "reg_tokens": 2, "class_token": False, "global_pool": "map"}
    options["pool_include_prefix"] = include_prefix
    ours = VisionTransformer(**options).eval()
    theirs = timm.models.vision_transformer.VisionTransformer(**options).eval()
    theirs.load_state_dict(ours.state_dict())
    layout = token_layout(ours, (32, 32))
    assert layout.attention_pool and layout.pooling == ("all" if include_prefix else "patches")
    assert token_layout(theirs, (32, 32)) == layout
    images = torch.randn(2, 3, 32, 32)
    # by hand: the probe's query against the keys of the (pooled) final tokens
    tokens = ours.forward_features(images)
    pooled = tokens if include_prefix else tokens[:, 2:]
    pool = ours.attn_pool
    q = pool.q(pool.latent).reshape(1, 2, 1, 16)
    k = pool.kv(pooled)[..., :32].reshape(2, -1, 2, 16).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)  # (B, heads, 1, pooled tokens)
    for model in (ours, theirs):
        forward_before = model.attn_pool.forward
        with torch.no_grad(), AttentionRecorder(model, layers=[], pool=True) as recorder:
            logits = model(images)
        torch.testing.assert_close(recorder.pool_attention, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits, ours(images), rtol=1e-5, atol=1e-6)  # the same computation
        assert model.attn_pool.fused_attn and "forward" not in vars(model.attn_pool)  # restored
        assert model.attn_pool.forward == forward_before
    with pytest.raises(ValueError, match="no attention pool"):
        AttentionRecorder(VisionTransformer(**TINY), pool=True)
