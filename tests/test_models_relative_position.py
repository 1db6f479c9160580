"""BEiT's relative position bias: the same bias, logits and explanations as timm's ``Beit``."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.beit import Beit, checkpoint_filter_fn, gen_relative_position_index

import vitkit
from vitkit.explain import explain
from vitkit.models import VisionTransformer
from vitkit.models.relative_position import RelativePositionBias, relative_position_index
from vitkit.weights import load_pretrained, model_from_checkpoint, read_checkpoint
from vitkit.weights.checkpoint import timm_model_options

TINY_BEIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}


def _beit(img_size=32, shared=False, abs_pos=False, seed=0) -> Beit:
    """A tiny timm Beit whose biases and tables are far from their zero initialisation."""
    torch.manual_seed(seed)
    model = Beit(
        img_size=img_size,
        **TINY_BEIT,
        use_abs_pos_emb=abs_pos,
        use_rel_pos_bias=not shared,
        use_shared_rel_pos_bias=shared,
        init_values=0.1,
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bias_table" in name or name.endswith(("q_bias", "v_bias")) or name == "head.weight":
                param.normal_(std=2.0)  # (timm scales its head to 1e-3 at init)
    return model


def test_the_index_is_beits_for_any_grid_with_or_without_a_class_token():
    for grid in [(4, 4), (3, 5), (1, 6)]:
        expected = gen_relative_position_index(grid)
        assert torch.equal(relative_position_index(grid), expected)
        assert torch.equal(relative_position_index(grid, class_token=False), expected[1:, 1:])
    bias = RelativePositionBias((3, 5), num_heads=2)
    with torch.no_grad():
        bias.table.normal_()
    b = bias()
    assert b.shape == (2, 16, 16)
    # patches at the same offset share a bias: (0,0)->(1,2) and (1,1)->(2,3)
    assert torch.equal(b[:, 1 + 0, 1 + 7], b[:, 1 + 6, 1 + 13])
    assert not torch.equal(b[:, 1 + 0, 1 + 7], b[:, 1 + 0, 1 + 8])


@pytest.mark.parametrize("variant", ["per_block", "shared", "with_absolute_positions"])
def test_timm_beit_weights_give_the_same_logits_on_both_attention_paths(variant):
    reference = _beit(shared=variant == "shared", abs_pos=variant == "with_absolute_positions")
    options = timm_model_options(reference)
    assert options["rel_pos_bias"] and options["global_pool"] == "avg" and options["fc_norm"]
    model = model_from_checkpoint(reference.state_dict(), **options).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        for block in model.blocks:
            block.attn.fused_attn = False  # the explicit formula adds the same bias
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        # the bias matters: without it the logits change
        for block in model.blocks:
            block.attn.rel_pos_bias.table.zero_()
        assert not torch.allclose(model(x), expected, atol=1e-3)
    # a bare state dict: the table tells the heads and the (square) grid
    bare = model_from_checkpoint(reference.state_dict()).eval()
    assert bare.config["num_heads"] == 2 and bare.img_size == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bare(x), expected, rtol=1e-5, atol=1e-5)
    if variant == "shared":
        assert any("copied into each block" in note for note in read_checkpoint(reference.state_dict()).notes)


def test_the_tables_are_not_weight_decayed_as_in_timm():
    from vitkit.weights import param_groups_lrd

    reference = _beit()
    model = model_from_checkpoint(reference.state_dict(), **timm_model_options(reference))
    tables = {f"blocks.{i}.attn.rel_pos_bias.table" for i in range(2)}
    assert tables <= model.no_weight_decay()
    timm_tables = {n for n in reference.no_weight_decay() if "relative_position" in n}
    assert len(timm_tables) == len(tables) == 2
    decayed = {
        n for g in param_groups_lrd(model, weight_decay=0.05) if g["weight_decay"] for n in g["param_names"]
    }
    assert not tables & decayed and "blocks.0.attn.qkv.weight" in decayed


def test_timms_beit_architectures_build_by_name():
    names = vitkit.list_models("beit*", timm=True)
    assert {"beit_base_patch16_224", "beitv2_large_patch16_224"} <= set(names)
    with torch.device("meta"):
        model = vitkit.create_model("beit_base_patch16_224")
        reference = timm.create_model("beit_base_patch16_224")
    own = {k: v.shape for k, v in model.state_dict().items()}
    assert (
        own["blocks.0.attn.rel_pos_bias.table"] == reference.blocks[0].attn.relative_position_bias_table.shape
    )
    # one more tensor per block: the keys' bias, which BEiT leaves out. A bias on the keys adds q·b
    # to every score of a query's row, which the softmax ignores: it never changes an output.
    count = sum(v.numel() for v in model.parameters())
    assert count == sum(v.numel() for v in reference.parameters()) + 12 * 768


def test_a_new_image_size_resamples_the_tables_as_timm_does():
    reference = _beit(img_size=32)
    file_state = reference.state_dict()
    bigger = Beit(img_size=48, **TINY_BEIT, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
    bigger.load_state_dict(checkpoint_filter_fn(file_state, bigger))  # timm's own resampling
    bigger.eval()
    options = {**timm_model_options(reference), "img_size": 48}
    loaded = VisionTransformer(**options).eval()
    report = load_pretrained(loaded, file_state)
    assert any("resampled to the (6, 6) grid" in note for note in report.notes)
    resized = model_from_checkpoint(file_state, **timm_model_options(reference)).eval()
    resized.set_input_size(48)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = bigger(x)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(resized(x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"differs from the model's img_size \(32, 32\)"):
        model_from_checkpoint(file_state).eval()(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="relative position bias is for 17 tokens"):
        reference_size = model_from_checkpoint(file_state)
        reference_size.blocks[0].attn(torch.randn(1, 37, 32))  # the attention itself names its grid too
    with pytest.raises(ValueError, match="dynamic_img_size"):
        VisionTransformer(img_size=32, **TINY_BEIT, rel_pos_bias=True, dynamic_img_size=True)


def test_explanations_read_the_attention_with_its_bias_as_on_timms_model():
    reference = _beit()
    model = model_from_checkpoint(reference.state_dict(), **timm_model_options(reference)).eval()
    unbiased = model_from_checkpoint(reference.state_dict(), **timm_model_options(reference)).eval()
    with torch.no_grad():
        for block in unbiased.blocks:
            block.attn.rel_pos_bias.table.zero_()
    x = torch.randn(2, 3, 32, 32)
    for method in ("raw_attention", "rollout", "gradient_rollout", "relevance"):
        ours = explain(model, x, method)
        torch.testing.assert_close(ours, explain(reference, x, method), rtol=1e-4, atol=1e-6, msg=method)
        assert not torch.allclose(ours, explain(unbiased, x, method), atol=1e-4), method
