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


def test_stem_strides_put_the_halvings_where_asked_and_keep_the_grid():
    x = torch.randn(2, 3, 32, 32)
    late = ConvStem(32, 4, 3, 24, channels=(8, 16, 16), strides=(1, 2, 2))
    assert [m.stride[0] for m in late.stem if isinstance(m, torch.nn.Conv2d)] == [1, 2, 2]
    assert late(x, flatten=False).shape == (2, 8, 8, 24)
    # the first convolution now runs at full resolution, the default stem's at half
    sizes = {}
    early = ConvStem(32, 4, 3, 24, channels=(8, 16, 16))
    for name, stem in [("early", early), ("late", late)]:
        first = stem.stem[0]
        first.register_forward_hook(lambda m, i, out, name=name: sizes.__setitem__(name, out.shape[-2:]))
        stem(x)
    assert sizes == {"early": (16, 16), "late": (32, 32)}


def test_stem_strides_are_kept_by_the_model_and_its_files(tmp_path):
    model = _stem_model(patch_size=4, stem_strides=(1, 2, 2))
    assert model.config["stem_strides"] == (1, 2, 2)
    assert "stem_strides" not in _stem_model().config
    assert "stem_strides=(1, 2, 2)" in model.options_timm_lacks()[0]
    back = vitkit.create_model(pretrained=save(model, tmp_path / "x.safetensors")).eval()
    assert back.config["stem_strides"] == (1, 2, 2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))


@pytest.mark.parametrize(
    ("patch_size", "options", "message"),
    [
        (6, {"stem_channels": (8, 16)}, "power-of-two"),
        (8, {"stem_channels": (8, 16)}, "needs at least 3"),
        (8, {"stem_channels": (8, 16, 16), "stem_strides": (1, 2, 2)}, "with 3 of them 2 for patch size 8"),
        (4, {"stem_channels": (8, 16, 16), "stem_strides": (2, 2)}, "each of the 3 convolutions"),
        (4, {"stem_channels": (8, 16, 16), "stem_strides": (4, 1, 1)}, "a stride of 1 or 2"),
        (4, {"stem_strides": (2, 2)}, "needs stem_channels"),
    ],
)
def test_bad_stem_options_say_what_to_change(patch_size, options, message):
    with pytest.raises(ValueError, match=message):
        VisionTransformer(**{**TINY, "img_size": 48, "patch_size": patch_size, **options})


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
