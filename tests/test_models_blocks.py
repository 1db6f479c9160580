"""The building blocks: shapes, the two attention paths, and their formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitkit.models import (
    DropPath,
    LayerScale,
    PatchEmbedding,
    SelfAttention,
    SwiGLU,
    SwiGLUPacked,
    TransformerBlock,
)
from vitkit.models.position import resample_position_embedding, sincos_2d_position_embedding


def test_patch_embedding_is_a_linear_map_of_each_patch():
    embed = PatchEmbedding(img_size=(8, 12), patch_size=4, in_chans=3, embed_dim=6)
    x = torch.randn(2, 3, 8, 12)
    tokens = embed(x)
    assert tokens.shape == (2, 6, 6)  # (8/4) * (12/4) = 6 patches, raster order
    # token of patch (row 1, col 2) equals W · vec(patch) + b
    patch = x[:, :, 4:8, 8:12].reshape(2, -1)
    expected = patch @ embed.proj.weight.reshape(6, -1).T + embed.proj.bias
    torch.testing.assert_close(tokens[:, 1 * 3 + 2], expected)
    assert embed(x, flatten=False).shape == (2, 2, 3, 6)


def test_patch_embedding_rejects_bad_input_with_a_useful_message():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        PatchEmbedding(img_size=30, patch_size=8)
    embed = PatchEmbedding(img_size=16, patch_size=8, in_chans=3, embed_dim=4)
    with pytest.raises(ValueError, match="3-channel.*got 1 channels"):
        embed(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        embed(torch.randn(1, 3, 24, 24))
    dynamic = PatchEmbedding(img_size=16, patch_size=8, embed_dim=4, strict_img_size=False)
    assert dynamic(torch.randn(1, 3, 24, 32)).shape == (1, 12, 4)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        dynamic(torch.randn(1, 3, 20, 16))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_and_explicit_attention_agree_forward_and_backward(qk_norm):
    attn = SelfAttention(dim=32, num_heads=4, qkv_bias=True, qk_norm=qk_norm)
    x = torch.randn(3, 10, 32, requires_grad=True)

    outputs, grads = [], []
    for fused in (True, False):
        attn.fused_attn = fused
        attn.zero_grad()
        x.grad = None
        out = attn(x)
        out.pow(2).sum().backward()
        outputs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in attn.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for g_fused, g_explicit in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(g_fused, g_explicit, rtol=1e-4, atol=1e-6)


def test_explicit_attention_is_the_textbook_formula_and_readable_by_a_hook():
    attn = SelfAttention(dim=16, num_heads=2).eval()
    attn.fused_attn = False
    captured = {}
    attn.attn_drop.register_forward_hook(lambda m, inp, out: captured.setdefault("A", inp[0]))
    x = torch.randn(2, 5, 16)
    out = attn(x)

    qkv = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)  # independent of einops
    q, k, v = qkv[0], qkv[1], qkv[2]
    expected_a = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    torch.testing.assert_close(captured["A"], expected_a)
    torch.testing.assert_close(captured["A"].sum(-1), torch.ones(2, 2, 5))
    expected = attn.proj((expected_a @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(out, expected)


def test_attention_rejects_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        SelfAttention(dim=30, num_heads=4)


def test_block_is_pre_norm_residual_and_layerscale_scales_branches():
    block = TransformerBlock(dim=16, num_heads=2, init_values=0.0).eval()
    x = torch.randn(2, 7, 16)
    # init_values=0 disables LayerScale (like timm); a tiny init keeps the block near identity
    assert isinstance(block.ls1, nn.Identity)
    block = TransformerBlock(dim=16, num_heads=2, init_values=1e-6).eval()
    assert isinstance(block.ls1, LayerScale) and torch.all(block.ls1.gamma == 1e-6)
    torch.testing.assert_close(block(x), x, atol=1e-4, rtol=0)
    with torch.no_grad():
        block.ls1.gamma.fill_(1.0)
        block.ls2.gamma.fill_(1.0)
    h = x + block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)))


def test_swiglu_gates_the_value_by_silu_of_the_gate():
    mlp = SwiGLU(8, 6, bias=False)
    x = torch.randn(2, 5, 8)
    gate, value = x @ mlp.fc1_g.weight.T, x @ mlp.fc1_x.weight.T
    torch.testing.assert_close(mlp(x), (gate * torch.sigmoid(gate) * value) @ mlp.fc2.weight.T)
    assert mlp.fc2.bias is None
    # packed: one projection, the gate's rows first
    mlp = SwiGLUPacked(8, 12)
    x = torch.randn(2, 5, 8)
    hidden = x @ mlp.fc1.weight.T + mlp.fc1.bias
    gate, value = hidden[..., :6], hidden[..., 6:]  # the gate's rows come first
    expected = (gate * torch.sigmoid(gate) * value) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), expected)
    assert mlp.fc2.in_features == 6
    block = TransformerBlock(8, 2, mlp_ratio=1.5, mlp_layer="swiglu_packed", act_layer="silu")
    assert isinstance(block.mlp, SwiGLUPacked) and block.mlp.fc1.out_features == 12
    with pytest.raises(ValueError, match="give an even width"):
        SwiGLUPacked(8, 7)
    with pytest.raises(ValueError, match="mlp_layer='glu' is not one of"):
        TransformerBlock(8, 2, mlp_layer="glu")


def test_sincos_table_matches_the_formula():
    table = sincos_2d_position_embedding((2, 3), dim=8)
    assert table.shape == (6, 8)
    omega = 1.0 / 10000 ** (torch.arange(2) / 1.0)
    row, col = 1, 2  # token index 1*3 + 2 = 5
    expected = torch.cat(
        [torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)]
    )
    torch.testing.assert_close(table[5], expected.float())
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_position_embedding((2, 2), dim=6)


def test_resampling_positions_keeps_prefix_and_is_identity_on_same_grid():
    pos = torch.randn(1, 1 + 4 * 4, 8)
    assert resample_position_embedding(pos, (4, 4), (4, 4), 1) is pos
    resized = resample_position_embedding(pos, (6, 2), (4, 4), num_prefix_tokens=1)
    assert resized.shape == (1, 1 + 12, 8)
    torch.testing.assert_close(resized[:, :1], pos[:, :1])
    constant = torch.ones(1, 16, 8)  # a constant field stays constant under bicubic resampling
    torch.testing.assert_close(resample_position_embedding(constant, (7, 5), (4, 4)), torch.ones(1, 35, 8))
    with pytest.raises(ValueError, match="prefix tokens needs"):
        resample_position_embedding(pos, (2, 2), (3, 3), 1)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    drop = DropPath(0.25)
    x = torch.randn(4000, 3, 5)
    y = drop(x)
    # per sample: all of it dropped, or all of it scaled by 1 / (1 - p)
    ratio = (y / x).reshape(4000, -1)
    assert torch.all((ratio == 0).all(1) | torch.isclose(ratio, torch.tensor(1 / 0.75)).all(1))
    assert abs((ratio[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert drop(torch.ones(1, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert torch.equal(drop.eval()(x), x)
    assert "keep" not in drop.state_dict()  # timm's checkpoints have no such entry
    with pytest.raises(ValueError, match="drop path rate 1.0"):
        DropPath(1.0)


def test_drop_path_built_on_meta_is_initialised_by_reset_parameters():
    with torch.device("meta"):
        drop = DropPath(0.1)
    drop.to_empty(device="cpu").reset_parameters()
    assert drop.keep.item() == pytest.approx(0.9)


def test_blocks_with_different_drop_rates_run_the_same_compiled_code():
    # stochastic depth rises over the blocks; regional compilation (vitkit.models.compile_blocks)
    # needs each block to run the same code, with the rate as data rather than as a constant
    from vitkit.models import VisionTransformer, compile_blocks

    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    options = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, num_classes=3, drop_path_rate=0.3)
    counts = []
    for depth in (2, 5):
        torch._dynamo.reset()
        graphs.clear()
        model = VisionTransformer(**options, depth=depth)
        view = compile_blocks(model, backend=count)
        x = torch.randn(2, 3, 16, 16)
        view(x).sum().backward()  # training
        model.eval()
        torch.testing.assert_close(view(x), model(x))  # the same weights, the same function
        counts.append(len(graphs))
        assert all(a is b._orig_mod for a, b in zip(model.blocks, view.blocks, strict=True))
        assert model.blocks[1].attn.qkv.weight.grad is not None  # gradients reach the model's own weights
        assert not any("_orig_mod" in key for key in model.state_dict())  # the model itself is untouched
    # one graph for training and one for evaluation, whatever the depth (block 0, rate 0, included)
    assert counts == [2, 2], counts


def test_compile_blocks_needs_a_sequence_of_blocks():
    from vitkit.models import compile_blocks

    with pytest.raises(ValueError, match="Linear has none. Use torch.compile"):
        compile_blocks(nn.Linear(2, 2))
