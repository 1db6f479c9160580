"""Batched augmentation: each operation matches PIL / torchvision, each image gets its own draw, the
policies follow timm's and torchvision's rules, and the whole path makes no host read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HostReads
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_aa
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from vitkit.data import batch_augment as ba
from vitkit.data.cache import BatchTrainTransform


def _images(n=4, h=16, w=12, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=generator)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


THRESHOLDS = [0, 100, 128, 256]  # one per image of the batch
BITS = [0, 1, 3, 8]


def _pil_posterize(image: Image.Image, bits: int) -> Image.Image:
    """Pillow >= 13 refuses 0 bits; keeping 0 bits leaves a black image."""
    return ImageOps.posterize(image, bits) if bits else Image.new("RGB", image.size)


@pytest.mark.parametrize(
    ("ours", "pil", "atol"),
    [
        (
            lambda x: ba.solarize(x, torch.tensor(THRESHOLDS).float()),
            lambda im, i: ImageOps.solarize(im, THRESHOLDS[i]),
            0,
        ),
        (lambda x: ba.posterize(x, torch.tensor(BITS).float()), lambda im, i: _pil_posterize(im, BITS[i]), 0),
        (ba.invert, lambda im, i: ImageOps.invert(im), 0),
        (ba.equalize, lambda im, i: ImageOps.equalize(im), 0),
        (ba.autocontrast, lambda im, i: ImageOps.autocontrast(im), 1),  # PIL rounds its lookup table
    ],
    ids=["solarize", "posterize", "invert", "equalize", "autocontrast"],
)
def test_point_operations_match_pil_per_image(ours, pil, atol):
    x8 = _images()
    expected = torch.stack([_tensor(pil(_pil(image), i)) for i, image in enumerate(x8)])
    torch.testing.assert_close(ours(x8.float()), expected, atol=atol, rtol=0)


@pytest.mark.parametrize(
    ("ours", "reference"),
    [
        (ba.adjust_brightness, TF.adjust_brightness),
        (ba.adjust_color, TF.adjust_saturation),
        (ba.adjust_contrast, TF.adjust_contrast),
        (ba.adjust_sharpness, TF.adjust_sharpness),
    ],
)
def test_enhance_operations_match_torchvision_with_a_factor_per_image(ours, reference):
    x8 = _images()
    factors = torch.tensor([0.0, 0.3, 1.0, 1.8])
    expected = torch.stack([reference(image, float(f)).float() for image, f in zip(x8, factors, strict=True)])
    # torchvision rounds its uint8 intermediates (the grey image); the float path does not
    torch.testing.assert_close(ours(x8.float(), factors).round(), expected, atol=2, rtol=0)
    torch.testing.assert_close(ours(x8.float(), torch.ones(4)), x8.float(), atol=1e-4, rtol=0)


def test_rotation_by_90_degrees_is_rot90_and_turns_counter_clockwise():
    x = _images(2, 8, 8).float()
    turned = ba.affine_warp(x, ba.rotation(torch.tensor([90.0, -90.0])), fill=0.0)
    torch.testing.assert_close(turned[0], torch.rot90(x[0], 1, dims=(-2, -1)), atol=1e-3, rtol=0)
    torch.testing.assert_close(turned[1], torch.rot90(x[1], -1, dims=(-2, -1)), atol=1e-3, rtol=0)


def test_rotation_of_a_non_square_image_matches_torchvision():
    # the pixel-space matrix is converted to grid_sample's per-axis normalised coordinates: a 30°
    # turn of a 16x24 image must stay a rotation (not a shear) and match torchvision's
    x = _images(1, 16, 24).float()
    ours = ba.affine_warp(x, ba.rotation(torch.tensor([30.0])), fill=0.0)
    theirs = TF.rotate(x, 30.0, interpolation=InterpolationMode.BILINEAR)
    assert (ours - theirs)[..., 3:-3, 3:-3].abs().max() < 0.5


def test_translation_and_shear_move_pixels_where_the_matrix_says():
    x = _images(1, 10, 10).float()
    shifted = ba.affine_warp(x, ba.translation(torch.tensor([3.0]), axis=0), fill=(1.0, 2.0, 3.0))
    torch.testing.assert_close(shifted[..., :-3], x[..., 3:], atol=1e-3, rtol=0)  # x_in = x_out + 3
    assert torch.equal(shifted[0, :, 0, -3:], torch.tensor([1.0, 2.0, 3.0]).view(3, 1).expand(3, 3))
    down = ba.affine_warp(x, ba.translation(torch.tensor([-2.0]), axis=1), fill=0.0)
    torch.testing.assert_close(down[..., 2:, :], x[..., :-2, :], atol=1e-3, rtol=0)
    # shear along x by 1: row r (centre-relative y = r - 4.5) reads column c + y
    sheared = ba.affine_warp(x, ba.shear(torch.tensor([1.0]), axis=0), fill=0.0)
    row = 7  # y = 2.5 -> a half-pixel shift: the mean of two neighbours
    expected = (x[0, :, row, 4:7] + x[0, :, row, 5:8]) / 2
    torch.testing.assert_close(sheared[0, :, row, 2:5], expected, atol=1e-3, rtol=0)


def _fixed_ops(*ops, num_layers=1, prob=1.0):
    return ba.BatchRandAugment(list(ops), num_layers=num_layers, prob=prob)


def test_every_image_draws_its_own_operation():
    x = _images(64, 8, 8).float()
    invert = ba._Op("Invert", lambda x, level, sign: ba.invert(x))
    rotate = ba._rotate(90.0)  # level 1: exactly a quarter turn, one way or the other
    out = _fixed_ops(invert, rotate)(x)
    inverted = torch.isclose(out, 255 - x).flatten(1).all(1)
    left = torch.isclose(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-2).flatten(1).all(1)
    right = torch.isclose(out, torch.rot90(x, -1, dims=(-2, -1)), atol=1e-2).flatten(1).all(1)
    assert torch.all(inverted ^ (left | right))  # each image got exactly one of the operations
    assert inverted.sum() > 15 and left.sum() > 5 and right.sum() > 5  # and the draws differ


def test_operations_apply_with_their_probability():
    x = _images(4000, 2, 2).float()
    invert = ba._Op("Invert", lambda x, level, sign: ba.invert(x))
    changed = (_fixed_ops(invert, prob=0.5)(x) != x).flatten(1).any(1).float().mean()
    assert 0.46 < changed < 0.54
    twice = _fixed_ops(invert, num_layers=2, prob=0.5)(x)
    assert 0.46 < (twice != x).flatten(1).any(1).float().mean() < 0.54  # odd number of inversions


def test_timm_policy_strings_give_timm_operations_and_sampling():
    policy = ba.BatchRandAugment.from_name("rand-m9-mstd0.5-inc1")
    names = [op.name for op in policy.ops]
    assert names == timm_aa._RAND_INCREASING_TRANSFORMS and policy.prob == 0.5 and policy.num_layers == 2
    level = policy.sample_level(20000, torch.device("cpu"))
    assert abs(level.mean() - 0.9) < 0.01 and level.max() <= 1.0 and level.std() > 0.03
    plain = ba.BatchRandAugment.from_name("rand-m7-n3")
    assert [op.name for op in plain.ops] == timm_aa._RAND_TRANSFORMS and plain.num_layers == 3
    assert torch.all(plain.sample_level(5, torch.device("cpu")) == 0.7)
    uniform = ba.BatchRandAugment.from_name("rand-m8-mstd101").sample_level(20000, torch.device("cpu"))
    assert uniform.min() >= 0 and uniform.max() <= 0.8 and abs(uniform.mean() - 0.4) < 0.01


def test_timm_choice_weights_draw_without_replacement():
    policy = ba.BatchRandAugment.from_name("rand-m9-n3-w0")
    choices = policy._choices(2000, torch.device("cpu"))
    names = [op.name for op in policy.ops]
    never = {names.index("Posterize"), names.index("Invert")}  # weight 0 in timm's table
    assert not set(choices.flatten().tolist()) & never
    assert all(len(set(row)) == 3 for row in choices.tolist())
    rotate = (choices == names.index("Rotate")).any(1).float().mean()
    assert rotate > 0.6  # the heaviest weight (0.3 of the total)


def test_torchvision_policies_by_name():
    randaugment = ba.BatchRandAugment.from_name("randaugment")
    assert randaugment.num_layers == 2 and randaugment.prob == 1.0 and len(randaugment.ops) == 14
    assert torch.allclose(randaugment.sample_level(3, torch.device("cpu")), torch.tensor(9 / 30))
    trivial = ba.BatchRandAugment.from_name("trivialaugment")
    levels = trivial.sample_level(5000, torch.device("cpu")) * 30
    assert trivial.num_layers == 1 and torch.equal(levels.round(), levels) and levels.max() == 30


@pytest.mark.parametrize(
    ("name", "match"),
    [("augmix-m5-w4-d2", "no batched version"), ("rand-m9-x3", "Unknown section 'x3'")],
)
def test_policies_without_a_batched_version_are_refused_by_name(name, match):
    with pytest.raises(ValueError, match=match):
        ba.BatchRandAugment.from_name(name)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "randaugment", "trivialaugment", "rand-m9-n3-w0"])
def test_policies_keep_shape_and_value_range_and_change_most_images(policy):
    x = _images(64, 16, 16).float()
    out = ba.BatchRandAugment.from_name(policy)(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= -1e-3 and out.max() <= 255 + 1e-3
    assert (out != x).flatten(1).any(1).float().mean() > 0.4


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "randaugment", "trivialaugment"])
def test_computing_every_operation_or_only_the_drawn_ones_gives_the_same_images(policy):
    x = _images(64, 16, 16).float()
    results = []
    for select in ("where", "index"):
        augment = ba.BatchRandAugment.from_name(policy)
        augment.select = select
        torch.manual_seed(5)
        results.append(augment(x))
    torch.testing.assert_close(results[0], results[1], atol=1e-3, rtol=0)
    assert ba.BatchRandAugment.from_name(policy).select == "auto"
    with pytest.raises(ValueError, match="select"):
        ba.BatchRandAugment([], select="gather")


def test_random_erasing_one_box_per_image_with_its_probability():
    x = torch.full((2000, 3, 16, 16), 5.0)
    out = ba.batch_random_erasing(x, prob=0.5, mode="const")
    erased = out == 0
    hit = erased.flatten(1).any(1)
    assert 0.45 < hit.float().mean() < 0.55
    area = erased[:, 0].flatten(1).sum(1)[hit].float() / 256
    assert area.min() >= 0.01 and area.max() <= 1 / 3 + 0.05
    rows, cols = erased[:, 0].any(2), erased[:, 0].any(1)
    assert torch.equal(rows.sum(1) * cols.sum(1), erased[:, 0].flatten(1).sum(1))  # rectangles
    assert torch.all(erased.all(1) == erased.any(1))  # every channel of a box
    assert torch.all(out[~erased] == 5.0)
    pixel = ba.batch_random_erasing(x[:200], prob=1.0, mode="pixel")
    assert (pixel != 5).any() and pixel[pixel != 5].std() > 0.5
    with pytest.raises(ValueError, match="mode"):
        ba.batch_random_erasing(x, prob=0.5, mode="noise")
    torch.manual_seed(1)
    everywhere = ba.batch_random_erasing(x[:100], prob=0.5, mode="const", select="where")
    torch.manual_seed(1)
    assert torch.equal(everywhere, ba.batch_random_erasing(x[:100], prob=0.5, mode="const", select="index"))


def test_colour_jitter_factors_differ_per_image():
    x = torch.full((500, 3, 4, 4), 100.0)
    out = ba.batch_color_jitter(x, brightness=(0.6, 1.4))
    ratio = out[:, 0, 0, 0] / 100
    assert ratio.min() >= 0.6 - 1e-5 and ratio.max() <= 1.4 + 1e-5 and ratio.std() > 0.15
    with pytest.raises(ValueError, match="hue"):
        BatchTrainTransform(8, color_jitter=(0.4, 0.4, 0.4, 0.1), batched=True)


def test_batched_crop_and_flip_are_the_per_worker_ones():
    # with nothing but crop, flip and normalisation the two paths draw the same numbers
    x8 = _images(16, 20, 20)
    batch = [(image, 0) for image in x8]
    torch.manual_seed(3)
    per_worker, _ = BatchTrainTransform(12, scale=(0.3, 1.0))(batch)
    torch.manual_seed(3)
    batched = BatchTrainTransform(12, scale=(0.3, 1.0), batched=True).augment(x8)
    torch.testing.assert_close(batched, per_worker, atol=0, rtol=0)


def test_the_batched_path_never_reads_a_device_value_on_the_host():
    # On a GPU a host read (a boolean mask, .item(), .tolist() of a device tensor) stalls the CPU
    # until the device has caught up; the batched path must queue everything without one.
    transform = BatchTrainTransform(
        16,
        scale=(0.35, 1.0),
        auto_augment="rand-m9-mstd0.5-inc1",
        color_jitter=0.3,
        re_prob=0.25,
        batched=True,
        select="where",  # what "auto" picks for a GPU batch (on a CPU it reads the draws)
    )
    images = _images(32, 20, 20)
    transform.augment(images)  # the first batch copies the constants (mean, std, fill) to the device
    counter = HostReads()
    with counter:
        counter.start_window([images])
        out = transform.augment(images)
    assert counter.count == 0 and id(out) in counter.device  # it did follow the batch
    with counter:  # the counter sees a read when there is one
        counter.start_window([images])
        _ = bool((images.float() > 3).any())
    assert counter.count == 1
