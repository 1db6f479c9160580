"""Hard (top-k) attention: exact k-sparse maps, straight-through gradients, soft as the k = N case."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from timm.models.vision_transformer import VisionTransformer as TimmViT

import vitkit
from vitkit.explain import attention_maps
from vitkit.models import SelfAttention, VisionTransformer
from vitkit.weights import save

NUM_TOKENS = 1 + 4 * 4  # TINY: class token + a 4x4 patch grid


def _hard(k: int, estimator: str = "ste", **options) -> VisionTransformer:
    return VisionTransformer(**{**TINY, **options}, attn_mode="hard", hard_k=k, hard_estimator=estimator)


def _captured_attention(attn: SelfAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output of ``attn`` on ``x`` and the A it used, read where vitkit.explain reads it."""
    captured = []
    handle = attn.attn_drop.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    out = attn(x)
    handle.remove()
    return out, captured[0]


@pytest.mark.parametrize("k", [1, 3, NUM_TOKENS - 1])
@pytest.mark.parametrize("estimator", ["ste", "gumbel"])
def test_every_row_has_exactly_k_nonzeros_summing_to_one(k, estimator):
    model = _hard(k, estimator)
    maps = attention_maps(model, torch.randn(3, 3, 32, 32))  # what explanations see (eval mode)
    assert list(maps) == [0, 1]
    for attn in maps.values():
        assert attn.shape == (3, TINY["num_heads"], NUM_TOKENS, NUM_TOKENS)
        assert torch.all((attn > 0).sum(-1) == k)
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))

    # in training (Gumbel: sampled keys) the A that the layer uses is still k-sparse
    model.train()
    _, attn = _captured_attention(model.blocks[0].attn, torch.randn(3, NUM_TOKENS, TINY["embed_dim"]))
    assert torch.all((attn > 0).sum(-1) == k)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))


def test_hard_attention_keeps_the_top_k_scores_and_renormalises_the_softmax():
    attn = SelfAttention(dim=16, num_heads=2, attn_mode="hard", hard_k=3).eval()
    x = torch.randn(2, 7, 16)
    _, captured = _captured_attention(attn, x)
    q, k, _ = attn.queries_keys_values(x)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    top = scores.topk(3, dim=-1)
    expected = torch.zeros_like(scores).scatter(-1, top.indices, top.values.softmax(-1))
    torch.testing.assert_close(captured, expected)


@pytest.mark.parametrize("estimator", ["ste", "gumbel"])
def test_straight_through_gradients_reach_queries_and_keys_even_with_k_1(estimator):
    # With k = 1 every row of A is one-hot: the renormalised softmax over a single key is constant,
    # so its own gradient with respect to q and k is zero. The straight-through estimator's is not.
    attn = SelfAttention(dim=16, num_heads=2, attn_mode="hard", hard_k=1, hard_estimator=estimator).train()
    attn(torch.randn(2, 7, 16)).pow(2).sum().backward()
    grad_q, grad_k, grad_v = attn.qkv.weight.grad.chunk(3)  # rows of the fused projection: q, k, v
    for grad in (grad_q, grad_k, grad_v):
        assert grad.abs().sum() > 1e-3


@pytest.mark.parametrize("estimator, k", [("ste", NUM_TOKENS), ("gumbel", 1000)])  # k > N: clamped to N
def test_k_equal_to_the_number_of_tokens_is_soft_attention(k, estimator):
    soft = VisionTransformer(**TINY)
    hard = _hard(k, estimator)
    hard.load_state_dict(soft.state_dict())
    x = torch.randn(4, 3, 32, 32)
    results = {}
    for name, model, fused in (("fused", soft, True), ("explicit", soft, False), ("hard", hard, False)):
        for block in model.blocks:
            block.attn.fused_attn = fused
        model.zero_grad()
        out = model(x)
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (out.detach(), grads)
    for reference, tolerance in (("explicit", {"rtol": 0, "atol": 1e-6}), ("fused", {})):
        torch.testing.assert_close(results["hard"][0], results[reference][0], **tolerance)
        for name, grad in results["hard"][1].items():
            torch.testing.assert_close(grad, results[reference][1][name], **tolerance, msg=name)


def test_gumbel_selection_is_random_in_training_and_the_plain_top_k_in_eval():
    attn = SelfAttention(dim=16, num_heads=2, attn_mode="hard", hard_k=2, hard_estimator="gumbel")
    greedy = SelfAttention(dim=16, num_heads=2, attn_mode="hard", hard_k=2).eval()
    greedy.load_state_dict(attn.state_dict())
    x = torch.randn(2, 9, 16)
    first, second = _captured_attention(attn, x)[1], _captured_attention(attn, x)[1]
    assert not torch.equal(first > 0, second > 0)  # different keys sampled
    attn.eval()
    first, second = _captured_attention(attn, x)[1], _captured_attention(attn, x)[1]
    assert torch.equal(first, second)
    torch.testing.assert_close(first, _captured_attention(greedy, x)[1], rtol=0, atol=0)
    greedy.train()  # the straight-through estimator is deterministic in training too
    torch.testing.assert_close(_captured_attention(greedy, x)[1], first, rtol=0, atol=0)


def test_options_are_checked_with_clear_messages():
    with pytest.raises(ValueError, match="attn_mode='sparse' is not one of"):
        SelfAttention(dim=16, num_heads=2, attn_mode="sparse")
    with pytest.raises(ValueError, match="hard_estimator='reinforce' is not one of"):
        SelfAttention(dim=16, num_heads=2, attn_mode="hard", hard_k=2, hard_estimator="reinforce")
    with pytest.raises(ValueError, match="needs hard_k"):
        SelfAttention(dim=16, num_heads=2, attn_mode="hard")
    for k in (0, -3):
        with pytest.raises(ValueError, match="hard_k must be at least 1"):
            SelfAttention(dim=16, num_heads=2, attn_mode="hard", hard_k=k)
    with pytest.raises(TypeError, match="hard_k must be an int"):
        SelfAttention(dim=16, num_heads=2, attn_mode="hard", hard_k=2.5)
    with pytest.raises(ValueError, match="hard_k=4 only applies to attn_mode='hard'"):
        vitkit.create_model("vit_tiny_patch4_32", hard_k=4)
    with pytest.raises(ValueError, match="hard_k must be at least 1"):
        vitkit.create_model("vit_tiny_patch4_32", attn_mode="hard", hard_k=0)


def test_create_model_passes_the_options_to_every_block():
    model = vitkit.create_model("vit_nano_patch4_32", attn_mode="hard", hard_k=8, hard_estimator="gumbel")
    keys = ("attn_mode", "hard_k", "hard_estimator")
    for block in model.blocks:
        assert [getattr(block.attn, key) for key in keys] == ["hard", 8, "gumbel"]
    assert [model.config[key] for key in keys] == ["hard", 8, "gumbel"]  # checkpoints rebuild hard mode
    # soft models record timm's option names only, as before hard attention existed
    assert not set(keys) & set(vitkit.create_model("vit_nano_patch4_32").config)


def test_hard_mode_keeps_the_timm_state_dict_and_the_feature_api(tmp_path):
    hard = _hard(4)
    state = hard.state_dict()
    assert state.keys() == VisionTransformer(**TINY).state_dict().keys()  # no new parameters
    timm_model = TimmViT(**TINY)
    timm_model.load_state_dict(state)  # strict
    hard.load_state_dict(timm_model.state_dict())
    assert all(torch.equal(v, state[k]) for k, v in hard.state_dict().items())

    file = save(hard, tmp_path / "hard.safetensors")  # the config records hard mode
    again = vitkit.create_model(pretrained=file).eval()
    assert (again.blocks[0].attn.attn_mode, again.blocks[0].attn.hard_k) == ("hard", 4)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), hard.eval()(x))

    final, features = hard.forward_intermediates(x, indices=2)
    assert final.shape == (2, NUM_TOKENS, TINY["embed_dim"]) and features[0].shape == (2, 32, 4, 4)


def _bright_square_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # class = the quadrant holding a bright 8x8 square, placed anywhere inside it, on faint noise
    x = torch.randn(n, 3, 32, 32, generator=generator) * 0.1
    y = torch.arange(n) % 4
    offsets = torch.randint(0, 9, (n, 2), generator=generator)
    for i, label in enumerate(y.tolist()):
        top, left = (label // 2) * 16 + int(offsets[i, 0]), (label % 2) * 16 + int(offsets[i, 1])
        x[i, :, top : top + 8, left : left + 8] += 1.0
    return x, y


@pytest.mark.parametrize("estimator, k", [("ste", 2), ("gumbel", 4)])
def test_a_hard_attention_vit_learns_a_toy_task(estimator, k):
    # the options of recipes/cifar10_vit_tiny_cpu.yaml: sincos positions, average pooling
    model = _hard(k, estimator, num_classes=4, pos_embed="sincos", class_token=False, global_pool="avg")
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):  # a fresh batch every step: the loss falls by learning, not memorising
        x, y = _bright_square_batch(32, generator)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses
    x, y = _bright_square_batch(256, generator)
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(-1) == y).float().mean()
    assert accuracy > 0.5  # chance: 0.25
