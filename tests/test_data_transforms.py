"""Preprocessing config resolution, train/eval pipelines, auto-augment names, Mixup/CutMix targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data.transforms import (
    IMAGENET_MEAN,
    BatchMixer,
    DataConfig,
    build_auto_augment,
    build_eval_transform,
    build_train_transform,
    resolve_data_config,
)


def test_config_defaults_pretrained_cfg_and_explicit_overrides():
    assert resolve_data_config() == DataConfig(224, IMAGENET_MEAN, (0.229, 0.224, 0.225), "bicubic", 0.875)
    cfg = {
        "mean": (0.5,) * 3,
        "std": (0.25,) * 3,
        "interpolation": "bilinear",
        "crop_pct": 0.9,
        "input_size": (3, 32, 32),
    }
    resolved = resolve_data_config(cfg)
    assert resolved == DataConfig(32, (0.5,) * 3, (0.25,) * 3, "bilinear", 0.9)
    assert resolve_data_config(cfg, img_size=64, crop_pct=1.0).img_size == 64
    assert resolve_data_config(cfg, img_size=64, crop_pct=1.0).crop_pct == 1.0
    assert DataConfig(img_size=224, crop_pct=0.875).resize_size == 256
    with pytest.raises(ValueError, match="crop_pct"):
        resolve_data_config(crop_pct=1.5)
    with pytest.raises(ValueError, match="interpolation"):
        resolve_data_config(interpolation="sinc")


def test_eval_transform_resizes_by_crop_ratio_then_centre_crops():
    # 40 x 40 with a 4-pixel white border: at crop_pct 0.8 (resize 40, crop 32) the border is cut off.
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    pixels[:4], pixels[-4:], pixels[:, :4], pixels[:, -4:] = 255, 255, 255, 255
    image = Image.fromarray(pixels)
    out = build_eval_transform(32, crop_pct=0.8, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert out.shape == (3, 32, 32) and type(out) is torch.Tensor
    assert out.max() == 0
    kept = build_eval_transform(32, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert kept[:, 0].min() > 0.9  # resized to 32: the border is still there


def test_eval_transform_normalises():
    image = Image.new("RGB", (8, 8), (255, 0, 128))
    out = build_eval_transform(8, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(image)
    assert out[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 255 * 2 - 1], abs=1e-5)


@pytest.mark.parametrize(
    "auto_augment",
    [
        None,
        "randaugment",
        "trivialaugment",
        "autoaugment",
        "augmix",
        "3augment",
        "rand-m9-mstd0.5-inc1",
        "original",
    ],
)
def test_train_transform_accepts_pil_and_uint8_tensors(auto_augment):
    torch.manual_seed(0)
    transform = build_train_transform(
        24, auto_augment=auto_augment, color_jitter=0.4, re_prob=0.5, scale=(0.5, 1.0)
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    for item in (image, torch.randint(0, 255, (3, 40, 30), dtype=torch.uint8)):
        out = transform(item)
        assert type(out) is torch.Tensor and out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_timm_rand_augment_survives_zero_bit_posterize():
    # At magnitude 10 timm's increasing posterize keeps 0 bits, which Pillow >= 13 rejects.
    _, augment = build_auto_augment("rand-n1-m10-inc1", 32)
    augment.ops = [op for op in augment.ops if op.name == "PosterizeIncreasing"]
    augment.ops[0].prob = 1.0
    out = augment(Image.new("RGB", (4, 4), (200, 100, 50)))
    assert np.asarray(out).max() == 0


def test_unknown_auto_augment_is_rejected():
    with pytest.raises(ValueError, match="Unknown auto_augment 'fancy'"):
        build_auto_augment("fancy", 32)


def test_horizontal_flip_and_crop_scale_are_applied():
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :8] = 255  # left half white
    image = Image.fromarray(pixels)
    keep = build_train_transform(16, scale=(1, 1), ratio=(1, 1), hflip=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    flip = build_train_transform(16, scale=(1, 1), ratio=(1, 1), hflip=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    assert keep(image)[0, 0, 0] == 1 and keep(image)[0, 0, -1] == 0
    assert flip(image)[0, 0, 0] == 0 and flip(image)[0, 0, -1] == 1


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixer_gives_soft_targets_summing_to_one(mixup, cutmix):
    torch.manual_seed(0)
    mixer = BatchMixer(num_classes=7, mixup_alpha=mixup, cutmix_alpha=cutmix)
    images = torch.randn(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 6])
    mixed, targets = mixer(images, labels)
    assert mixed.shape == images.shape and type(mixed) is torch.Tensor
    assert targets.shape == (6, 7) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert (targets > 0).sum(1).max() == 2  # each row mixes two labels
    assert not torch.equal(mixed, images)
    # The target keeps the sample's own label with weight lam and the rolled one with 1 - lam.
    lam = targets[torch.arange(6), labels]
    other = targets[torch.arange(6), labels.roll(1)]
    torch.testing.assert_close(lam + other, torch.ones(6))


def test_mixer_prob_zero_gives_one_hot_and_rejects_soft_labels():
    mixer = BatchMixer(num_classes=3, mixup_alpha=0.8, cutmix_alpha=0.0, prob=0.0)
    images = torch.randn(4, 3, 8, 8)
    out, targets = mixer(images, torch.tensor([0, 2, 1, 2]))
    assert torch.equal(out, images)
    assert targets.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="integer labels"):
        mixer(images, targets)


def test_mixer_switches_between_cutmix_and_mixup():
    torch.manual_seed(0)
    images = torch.arange(2, dtype=torch.float32).view(2, 1, 1, 1).expand(2, 3, 8, 8).contiguous()
    labels = torch.tensor([0, 1])
    only_cutmix = BatchMixer(2, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=1.0)
    only_mixup = BatchMixer(2, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.0)
    cut, _ = only_cutmix(images, labels)
    mix, _ = only_mixup(images, labels)
    assert set(cut.unique().tolist()) <= {0.0, 1.0}  # pasted boxes: values are copied, not blended
    assert any(v not in (0.0, 1.0) for v in mix.unique().tolist())  # blended values
