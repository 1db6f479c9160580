"""The convolutional stem (``stem_channels``): same token grid as patch embedding, clear errors,
kept through vitkit's own weights format and refused where it cannot survive (timm, HF)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

import vitkit
from vitkit.bench import timm_twin
from vitkit.models import ConvStem, PatchEmbedding, VisionTransformer
from vitkit.weights import save


def _stem_model(**options) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{**TINY, "stem_channels": (8, 16, 16), **options}).eval()


def test_stem_gives_the_patch_grid_with_convolutions_in_front():
    stem = ConvStem(32, 8, 3, 24, channels=(8, 16, 16))
    plain = PatchEmbedding(32, 8, 3, 24)
    x = torch.randn(2, 3, 32, 32)
    assert stem(x).shape == plain(x).shape == (2, 16, 24)
    assert stem(x, flatten=False).shape == (2, 4, 4, 24)
    strides = [m.stride[0] for m in stem.stem if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 2, 2]  # log2(8) halvings
    assert stem.proj.kernel_size == (1, 1)
    stem4 = ConvStem(32, 4, 3, 24, channels=(8, 16, 16))
    assert [m.stride[0] for m in stem4.stem if isinstance(m, torch.nn.Conv2d)] == [2, 2, 1]


def test_stem_builds_only_its_own_layers():
    # no P x P projection is built and thrown away: construction draws exactly the random numbers
    # of the stem's convolutions and its 1x1 projection, in that order
    torch.manual_seed(0)
    ConvStem(32, 8, 3, 24, channels=(8, 16, 16))
    after_stem = torch.random.get_rng_state()
    torch.manual_seed(0)
    for previous, width in [(3, 8), (8, 16), (16, 16)]:
        torch.nn.Conv2d(previous, width, 3, padding=1, bias=False)
    torch.nn.Conv2d(16, 24, 1)
    assert torch.equal(after_stem, torch.random.get_rng_state())


def test_stem_tokens_see_overlapping_neighbourhoods():
    # a patch projection's token only sees its own P x P patch; a 3x3-conv stem's also sees the
    # border of the patch before it (stride-2, padding-1 convolutions reach one pixel to the left)
    x = torch.randn(1, 3, 32, 32)
    changed = x.clone()
    changed[..., :8, 7] += 10.0  # the last column of the first patch
    stem, plain = ConvStem(32, 8, 3, 24, channels=(8, 16, 16)).eval(), PatchEmbedding(32, 8, 3, 24)
    with torch.no_grad():
        assert torch.equal(plain(x)[0, 1], plain(changed)[0, 1])
        assert not torch.allclose(stem(x)[0, 1], stem(changed)[0, 1])


def test_model_with_a_stem_trains_its_stem_and_accepts_other_sizes():
    model = _stem_model(dynamic_img_size=True).train()
    logits = model(torch.randn(4, 3, 48, 32))
    assert logits.shape == (4, TINY["num_classes"])
    logits.sum().backward()
    assert model.patch_embed.stem[0].weight.grad.abs().sum() > 0
    assert model.config["stem_channels"] == (8, 16, 16)
    assert "stem_channels" not in VisionTransformer(**TINY).config  # plain models keep timm's options only


@pytest.mark.parametrize(
    ("patch_size", "channels", "message"),
    [(6, (8, 16), "power-of-two"), (8, (8, 16), "needs at least 3")],
)
def test_bad_stem_options_say_what_to_change(patch_size, channels, message):
    with pytest.raises(ValueError, match=message):
        VisionTransformer(**{**TINY, "img_size": 48, "patch_size": patch_size, "stem_channels": channels})


@pytest.mark.parametrize("format", ["timm", "hf"])
def test_stem_survives_vitkit_export_only(format, tmp_path):
    model = _stem_model()
    with pytest.raises(ValueError, match="stem_channels"):
        save(model, tmp_path / "x", format=format)
    with pytest.raises(ValueError, match="convolutional stem"):
        timm_twin(model)
    back = vitkit.create_model(pretrained=save(model, tmp_path / "x.safetensors")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
