"""Saliency methods against independent straightforward implementations, batched, any layout."""

from __future__ import annotations

import pytest
import timm
import torch

from vitkit.explain import (
    METHODS,
    AttentionRecorder,
    attention_maps,
    explain,
    gradient_rollout,
    input_gradient,
    raw_attention,
    relevance,
    rollout,
)
from vitkit.models import VisionTransformer

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
LAYOUTS = {
    "cls": {},
    "registers": {"reg_tokens": 4},
    "no_cls": {"class_token": False, "global_pool": "avg"},
    # attention pooling (SigLIP): the prediction reads the patches through the pool's weights
    "map": {"class_token": False, "global_pool": "map"},
    "map_over_registers": {
        "class_token": False,
        "reg_tokens": 2,
        "global_pool": "map",
        "pool_include_prefix": True,
    },
}


def _model(name: str, **extra) -> VisionTransformer:
    torch.manual_seed(1)
    model = VisionTransformer(**{**TINY, "depth": 3, **LAYOUTS[name], **extra}).eval()
    # sharper than the init's near-uniform attention, so the maps are far from trivial
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(20)
        if model.attn_pool is not None:
            model.attn_pool.q.weight.mul_(200)
    return model


def _pool_rows(model, images, fusion="mean"):
    """(B, N) float64: the attention pool's weights over all tokens, heads fused, by hand; None
    for a model without a pool."""
    if model.attn_pool is None:
        return None
    with torch.no_grad(), AttentionRecorder(model, layers=[], pool=True) as rec:
        model(images)
    a = rec.pool_attention[:, :, 0].double()  # (B, heads, pooled tokens)
    fused = {"mean": a.mean(1), "max": a.amax(1), "min": a.amin(1)}[fusion]
    n = model.num_prefix_tokens + 16
    return torch.cat([torch.zeros(a.shape[0], n - a.shape[-1], dtype=torch.float64), fused], dim=1)


# ------------------------------------------------------------------ straightforward references
def _reference_rollout(
    attns, prefix, has_cls, grid, head_fusion="mean", discard_ratio=0.0, start=0, pool_rows=None
):
    """Per image, loop over layers, heads and entries: the textbook recipe written out."""
    batch, heads, n, _ = attns[0].shape
    maps = []
    for b in range(batch):
        joint = torch.eye(n, dtype=torch.float64)
        for layer in range(start, len(attns)):
            per_head = [attns[layer][b, h].double() for h in range(heads)]
            if head_fusion == "mean":
                fused = sum(per_head) / heads
            elif head_fusion == "max":
                fused = torch.stack(per_head).max(0).values
            else:
                fused = torch.stack(per_head).min(0).values
            if discard_ratio:
                candidates = [
                    (fused[i, j].item(), i, j)
                    for i in range(n)
                    for j in range(n)
                    if not (has_cls and (i == 0 or j == 0))
                ]
                candidates.sort()
                for _, i, j in candidates[: int(discard_ratio * len(candidates))]:
                    fused[i, j] = 0.0
            mixed = fused + torch.eye(n, dtype=torch.float64)
            for i in range(n):
                mixed[i] = mixed[i] / mixed[i].sum()
            joint = mixed @ joint
        if pool_rows is not None:  # the pool reads each token's row with its attention weight
            row = pool_rows[b] @ joint
        else:
            row = joint[0] if has_cls else joint[prefix:].mean(0)
        patches = row[prefix:]
        maps.append((patches / patches.sum()).reshape(grid))
    return torch.stack(maps).float()


def _attention_and_gradients_by_backward(model, images, target):
    """A and ∂logit/∂A per layer, via the recorder and an ordinary backward pass, image by image;
    with an attention pool, its A and gradient are the last entries."""
    attns, grads = [], []
    pool = model.attn_pool is not None
    for b in range(images.shape[0]):
        with AttentionRecorder(model, gradients=True, pool=pool) as rec:
            logits = model(images[b : b + 1])
            logits[0, int(target[b])].backward()
        attns.append([rec.attentions[i].detach()[0] for i in range(len(model.blocks))])
        grads.append([rec.gradients[i][0] for i in range(len(model.blocks))])
        if pool:
            attns[-1].append(rec.pool_attention.detach()[0])
            grads[-1].append(rec.pool_gradient[0])
    return attns, grads


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"head_fusion": "max", "discard_ratio": 0.5},
        {"head_fusion": "min", "start_layer": 1},
        {"discard_ratio": 0.9, "start_layer": -2},
    ],
)
def test_rollout_equals_a_straightforward_implementation(layout, options):
    model = _model(layout)
    images = torch.randn(3, 3, 32, 32)
    attns = attention_maps(model, images)
    start = options.get("start_layer", 0) % 3
    expected = _reference_rollout(
        [attns[i] for i in range(3)],
        prefix=model.num_prefix_tokens,
        has_cls=model.has_class_token,
        grid=(4, 4),
        head_fusion=options.get("head_fusion", "mean"),
        discard_ratio=options.get("discard_ratio", 0.0),
        start=start,
        pool_rows=_pool_rows(model, images, options.get("head_fusion", "mean")),
    )
    result = rollout(model, images, **options)
    assert result.shape == (3, 4, 4)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-6)


def test_rollout_with_mean_fusion_is_the_papers_half_attention_half_identity():
    model = _model("cls")
    images = torch.randn(2, 3, 32, 32)
    attns = attention_maps(model, images)
    joint = torch.eye(17).expand(2, 17, 17)
    for i in range(3):
        joint = (0.5 * attns[i].mean(1) + 0.5 * torch.eye(17)) @ joint
    expected = joint[:, 0, 1:] / joint[:, 0, 1:].sum(-1, keepdim=True)
    torch.testing.assert_close(rollout(model, images).flatten(1), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_relevance_equals_the_chefer_formula(layout):
    model = _model(layout)
    images = torch.randn(3, 3, 32, 32)
    target = torch.tensor([0, 3, 4])
    attns, grads = _attention_and_gradients_by_backward(model, images, target)
    prefix = model.num_prefix_tokens
    expected = []
    for b in range(3):
        rel = torch.eye(prefix + 16)
        pool = None
        if model.attn_pool is not None:
            a, g = attns[b].pop(), grads[b].pop()  # (heads, 1, pooled tokens)
            pool = sum((g[h, 0] * a[h, 0]).clamp(min=0) for h in range(a.shape[0])) / a.shape[0]
            pool = torch.cat([torch.zeros(prefix + 16 - pool.shape[0]), pool])
        for a, g in zip(attns[b], grads[b], strict=True):
            a_bar = sum((g[h] * a[h]).clamp(min=0) for h in range(a.shape[0])) / a.shape[0]
            rel = rel + a_bar @ rel
        if pool is not None:  # the pool's query is one more row of R, and not a token: no I to remove
            row = (pool @ rel)[prefix:]
        elif model.has_class_token:
            row = rel[0, prefix:]
        else:  # mean over patch queries of R - I (the identity only adds a uniform floor)
            row = (rel - torch.eye(prefix + 16))[prefix:, prefix:].mean(0)
        expected.append((row / row.sum()).reshape(4, 4))
    result = relevance(model, images, target)
    torch.testing.assert_close(result, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_gradient_rollout_pairs_each_gradient_with_its_own_layer_and_depends_on_the_target():
    model = _model("registers")
    images = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 2])
    attns, grads = _attention_and_gradients_by_backward(model, images, target)
    weighted = [
        torch.stack([a * g for a, g in zip(attns[b], grads[b], strict=True)]) for b in range(2)
    ]  # per image: (layers, heads, N, N)
    clamped = [w.mean(1, keepdim=True).clamp(min=0) for w in weighted]
    expected = _reference_rollout(
        [torch.stack([clamped[b][i] for b in range(2)]) for i in range(3)], 5, True, (4, 4)
    )
    torch.testing.assert_close(gradient_rollout(model, images, target), expected, rtol=1e-4, atol=1e-6)
    # gradients paired with the wrong layers (the classic bug) give a different map
    swapped = [
        torch.stack(
            [torch.stack([a * g for a, g in zip(attns[b], grads[b][::-1], strict=True)]) for b in range(2)]
        )
    ]
    wrong = _reference_rollout(
        [swapped[0][:, i].mean(1, keepdim=True).clamp(min=0) for i in range(3)], 5, True, (4, 4)
    )
    assert not torch.allclose(wrong, expected, atol=1e-4)
    # class-specific: another target, another map
    other = gradient_rollout(model, images, target=torch.tensor([3, 4]))
    assert not torch.allclose(other, expected, atol=1e-4)
    assert torch.equal(
        gradient_rollout(model, images), gradient_rollout(model, images, model(images).argmax(-1))
    )


@pytest.mark.parametrize("head_fusion", ["mean", "max"])
def test_gradient_rollout_weights_an_attention_pool_as_it_weights_a_layer(head_fusion):
    model = _model("map")
    images = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 2])
    attns, grads = _attention_and_gradients_by_backward(model, images, target)
    fuse = {"mean": lambda t: t.mean(0, keepdim=True), "max": lambda t: t.amax(0, keepdim=True)}[head_fusion]
    pool_products = [attns[b].pop() * grads[b].pop() for b in range(2)]  # (heads, 1 query, 16 patches)
    # each layer's matrix and the pool's row alike: the heads fused first, then clamped at zero
    layers = [torch.stack([fuse(attns[b][i] * grads[b][i]).clamp(min=0) for b in range(2)]) for i in range(3)]
    pool = torch.stack([fuse(p)[0, 0].clamp(min=0) for p in pool_products]).double()
    expected = _reference_rollout(layers, 0, False, (4, 4), head_fusion="mean", pool_rows=pool)
    result = gradient_rollout(model, images, target, head_fusion=head_fusion)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-6)
    if head_fusion == "max":
        return  # the max over heads and the clamp commute
    # clamping each head before the mean would be another map (the heads disagree in sign)
    per_head = torch.stack([fuse(p.clamp(min=0))[0, 0] for p in pool_products]).double()
    other = _reference_rollout(layers, 0, False, (4, 4), head_fusion="mean", pool_rows=per_head)
    assert not torch.allclose(other, expected, atol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_batch_of_three_equals_three_batches_of_one_for_every_method(layout):
    model = _model(layout)
    images = torch.randn(3, 3, 32, 32)
    for name in METHODS:
        options = {"n_samples": 3} if name == "smoothgrad" else {}
        batched = explain(model, images, name, **options)
        single = torch.cat([explain(model, images[i : i + 1], name, **options) for i in range(3)])
        assert batched.shape == (3, 4, 4), name
        torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.allclose(batched.sum((1, 2)), torch.ones(3), atol=1e-5), name
        assert (batched >= 0).all(), name


def test_raw_attention_reads_the_query_rows_per_head_or_fused():
    model = _model("registers")
    images = torch.randn(2, 3, 32, 32)
    attn = attention_maps(model, images, layers=1)[1]
    per_head = raw_attention(model, images, layer=1, head_fusion=None)
    row = attn[:, :, 0, 5:]
    torch.testing.assert_close(per_head.flatten(2), row / row.sum(-1, keepdim=True))
    fused = raw_attention(model, images, layer=1, head_fusion="max")
    expected = attn.amax(1)[:, 0, 5:]
    torch.testing.assert_close(fused.flatten(1), expected / expected.sum(-1, keepdim=True))
    gap = _model("no_cls")
    attn = attention_maps(gap, images, layers=-1)[2]
    expected = attn.mean(1)[:, :, :].mean(1)
    torch.testing.assert_close(
        raw_attention(gap, images).flatten(1), expected / expected.sum(-1, keepdim=True)
    )
    with pytest.raises(ValueError, match="no class token"):
        raw_attention(gap, images, query="cls")


def test_non_square_and_dynamic_grids():
    wide = _model("registers", img_size=(32, 48))
    dynamic = _model("cls", dynamic_img_size=True)
    for model, size, grid in [(wide, (32, 48), (4, 6)), (dynamic, (24, 40), (3, 5))]:
        images = torch.randn(2, 3, *size)
        for name in METHODS:
            options = {"n_samples": 2} if name == "smoothgrad" else {}
            result = explain(model, images, name, **options)
            assert result.shape == (2, *grid), name
            single = explain(model, images[1:], name, **options)
            torch.testing.assert_close(result[1:], single, rtol=1e-4, atol=1e-6, msg=name)
    timm_model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, dynamic_img_size=True
    ).eval()
    result = relevance(timm_model, torch.randn(2, 3, 24, 40))
    assert result.shape == (2, 3, 5)


def test_timm_distilled_model_reads_class_and_distillation_rows():
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    attn = attention_maps(model, images, layers=-1)[1].mean(1)
    expected = attn[:, :2, 2:].mean(1)
    torch.testing.assert_close(
        raw_attention(model, images).flatten(1), expected / expected.sum(-1, keepdim=True)
    )
    for name in ("rollout", "relevance", "gradient_rollout"):
        assert explain(model, images, name).shape == (2, 4, 4)


def test_input_gradient_variants_match_autograd():
    model = _model("cls")
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    target = torch.tensor([1, 4])
    logits = model(images)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), images)
    images = images.detach()

    pixels = grad.abs().amax(1)
    result = input_gradient(model, images, target, pixel=True)
    torch.testing.assert_close(result, pixels / pixels.sum((1, 2), keepdim=True))
    patches = pixels.unflatten(1, (4, 8)).unflatten(3, (4, 8)).sum((2, 4))
    torch.testing.assert_close(
        input_gradient(model, images, target), patches / patches.sum((1, 2), keepdim=True)
    )

    gxi = (grad * images).sum(1).abs()
    result = input_gradient(model, images, target, method="grad_x_input", pixel=True)
    torch.testing.assert_close(result, gxi / gxi.sum((1, 2), keepdim=True))

    smooth = input_gradient(model, images, target, method="smoothgrad", n_samples=4, pixel=True)
    assert smooth.shape == (2, 32, 32)
    assert not torch.allclose(smooth, input_gradient(model, images, target, pixel=True), atol=1e-4)
    same_seed = input_gradient(model, images, target, method="smoothgrad", n_samples=4, pixel=True)
    torch.testing.assert_close(smooth, same_seed)


def test_methods_leave_the_model_as_they_found_it():
    model = _model("cls").train()
    params = {n: p.clone() for n, p in model.named_parameters()}
    for name in METHODS:
        explain(model, torch.randn(1, 3, 32, 32), name, **({"n_samples": 2} if name == "smoothgrad" else {}))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(block.attn.fused_attn for block in model.blocks)


def test_methods_work_inside_inference_mode():
    model = _model("cls")
    with torch.inference_mode():
        images = torch.randn(1, 3, 32, 32)
        assert relevance(model, images).shape == (1, 4, 4)


def test_attention_pool_weights_the_rows_a_mean_pool_reads_equally():
    model = _model("map")
    images = torch.randn(3, 3, 32, 32)
    # raw attention of a layer: its patch rows weighted by the pool's attention, by hand
    attn = attention_maps(model, images, layers=-1)[2].mean(1).double()  # (B, N, N)
    expected = (_pool_rows(model, images)[:, None] @ attn)[:, 0]
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(
        raw_attention(model, images).flatten(1), expected.float(), rtol=1e-4, atol=1e-6
    )
    # a pool whose query matches every key equally is a mean pool: the same maps as query='patches'
    with torch.no_grad():
        model.attn_pool.q.weight.zero_()
        model.attn_pool.q.bias.zero_()
    for method in (raw_attention, rollout):
        torch.testing.assert_close(method(model, images), method(model, images, query="patches"))


def test_attention_pool_maps_agree_between_vitkit_and_timm():
    ours = _model("map_over_registers")
    options = {**TINY, "depth": 3, **LAYOUTS["map_over_registers"]}
    theirs = timm.models.vision_transformer.VisionTransformer(**options).eval()
    theirs.load_state_dict(ours.state_dict())
    images = torch.randn(2, 3, 32, 32)
    for name in ("raw_attention", "rollout", "gradient_rollout", "relevance"):
        mine = explain(ours, images, name)
        torch.testing.assert_close(explain(theirs, images, name), mine, rtol=1e-4, atol=1e-6, msg=name)
        # and the pool matters: reading the rows equally gives another map
        assert not torch.allclose(explain(ours, images, name, query="patches"), mine, atol=1e-3), name
