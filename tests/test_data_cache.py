"""The uint8 tensor cache: same images and labels as the files, disk round trip, batch augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data.batch_augment import random_resized_crop_boxes
from vitkit.data.cache import (
    BatchEvalTransform,
    BatchTrainTransform,
    CachedTensorDataset,
    TensorCache,
    build_tensor_cache,
    cache_key,
    load_or_build_tensor_cache,
)
from vitkit.data.errors import DecodeErrorLog
from vitkit.data.folder import scan_image_folder


def make_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    rng = np.random.default_rng(0)
    sizes = [(20, 20), (30, 20), (20, 40), (24, 24), (16, 16), (50, 25)]  # mixed sizes, both orientations
    for i, (w, h) in enumerate(sizes):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return scan_image_folder(root)


def test_cache_holds_every_image_resized_and_centre_cropped(tmp_path):
    classes, samples = make_folder(tmp_path / "train")
    before = torch.get_rng_state()
    cache = build_tensor_cache(samples, classes, 16, interpolation="bilinear")
    # building draws nothing from the global generator: a run that builds a disk cache draws the
    # same random numbers as one that loads it
    assert torch.equal(torch.get_rng_state(), before)
    assert cache.images.shape == (6, 3, 16, 16) and cache.images.dtype == torch.uint8
    assert cache.labels.tolist() == [label for _, label in samples]
    assert cache.source_index.tolist() == list(range(6))
    # A 16 x 16 file is stored unchanged.
    exact = next(i for i, (p, _) in enumerate(samples) if p.endswith("4.png"))
    stored = cache.images[exact].permute(1, 2, 0).numpy()
    assert np.array_equal(stored, np.asarray(Image.open(samples[exact][0])))


def test_corrupt_files_are_left_out_of_the_cache_and_recorded(tmp_path):
    classes, samples = make_folder(tmp_path / "train")
    Path(samples[1][0]).write_bytes(b"broken")
    log = DecodeErrorLog()
    cache = build_tensor_cache(samples, classes, 8, error_log=log, num_workers=0)
    assert len(cache) == 5 and 1 not in cache.source_index.tolist()
    assert cache.labels.tolist() == [samples[i][1] for i in cache.source_index.tolist()]
    assert cache.bad == [samples[1][0]] and list(log.read()) == [samples[1][0]]
    # a loader batch in which every file fails (here: the only one) leaves the cache empty, no crash
    nothing = build_tensor_cache(samples[1:2], classes, 8, num_workers=0)
    assert len(nothing) == 0 and nothing.bad == [samples[1][0]]


def test_cache_built_by_workers_equals_the_one_built_in_process(tmp_path):
    # the workers send each batch as one stacked tensor with its indices
    classes, samples = make_folder(tmp_path / "train")
    Path(samples[3][0]).write_bytes(b"broken")
    alone = build_tensor_cache(samples, classes, 8, num_workers=0)
    workers = build_tensor_cache(samples, classes, 8, num_workers=2)
    assert torch.equal(workers.images, alone.images) and workers.bad == alone.bad == [samples[3][0]]
    assert workers.source_index.tolist() == alone.source_index.tolist() == [0, 1, 2, 4, 5]


def test_disk_cache_round_trip_and_invalidation(tmp_path, capsys):
    classes, samples = make_folder(tmp_path / "train")
    Path(samples[2][0]).write_bytes(b"broken")
    folder = tmp_path / "cache"
    first = load_or_build_tensor_cache(samples, classes, 12, cache_dir=folder, name="t")
    files = list(folder.glob("t-12px-*.safetensors"))
    assert len(files) == 1
    log = DecodeErrorLog()
    again = load_or_build_tensor_cache(samples, classes, 12, cache_dir=folder, name="t", error_log=log)
    assert "loaded 5 cached images" in capsys.readouterr().out
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert again.classes == classes and list(log.read()) == [samples[2][0]]  # still reported
    # A changed file changes the key: the old cache is not reused.
    key = cache_key(samples, 12, "bicubic")
    Image.new("RGB", (5, 5)).save(samples[0][0])
    assert cache_key(samples, 12, "bicubic") != key
    assert cache_key(samples, 13, "bicubic") != cache_key(samples, 12, "bicubic")
    load_or_build_tensor_cache(samples, classes, 12, cache_dir=folder, name="t")
    assert len(list(folder.glob("t-12px-*.safetensors"))) == 2
    with pytest.raises(ValueError, match="key mismatch"):
        TensorCache.load(files[0], key=cache_key(samples, 12, "bicubic"))


def test_random_resized_crop_boxes_stay_inside_and_respect_scale():
    torch.manual_seed(0)
    boxes = random_resized_crop_boxes(2000, 30, 40, scale=(0.2, 0.5), ratio=(0.75, 1.33))
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 40).all() and (y2 <= 30).all()
    area = (x2 - x1) * (y2 - y1) / (30 * 40)
    assert area.min() >= 0.17 and area.max() <= 0.53  # rounding to whole pixels
    aspect = (x2 - x1) / (y2 - y1)
    assert aspect.min() > 0.65 and aspect.max() < 1.5
    # Impossible requests fall back to the centre crop of the allowed aspect ratio.
    wide = random_resized_crop_boxes(5, 10, 100, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert ((wide[:, 2] - wide[:, 0]) == 10).all() and ((wide[:, 3] - wide[:, 1]) == 10).all()


def _batch(n: int = 8, size: int = 16) -> list[tuple[torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen), i % 3) for i in range(n)
    ]


def test_batch_train_transform_identity_crop_and_flip():
    batch = _batch()
    images = torch.stack([image for image, _ in batch]).float() / 255
    plain = BatchTrainTransform(16, scale=(1, 1), ratio=(1, 1), hflip=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    out, labels = plain(batch)
    torch.testing.assert_close(out, images, atol=1e-4, rtol=0)
    assert labels.tolist() == [i % 3 for i in range(8)] and labels.dtype == torch.int64
    flipped, _ = BatchTrainTransform(
        16, scale=(1, 1), ratio=(1, 1), hflip=1.0, mean=(0, 0, 0), std=(1, 1, 1)
    )(batch)
    torch.testing.assert_close(flipped, images.flip(-1), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "options", [{}, {"auto_augment": "trivialaugment", "color_jitter": 0.3, "re_prob": 1.0}]
)
def test_batch_train_transform_shapes_and_normalisation(options):
    torch.manual_seed(0)
    out, labels = BatchTrainTransform(8, **options)(_batch(6, 20))
    assert out.shape == (6, 3, 8, 8) and out.dtype == torch.float32 and labels.shape == (6,)
    assert out.abs().max() < 10  # normalised, not 0..255


def test_batch_eval_transform_matches_the_per_image_eval_path():
    from vitkit.data.transforms import build_eval_transform

    batch = _batch(4, 20)
    out, _ = BatchEvalTransform(16, crop_pct=0.8, interpolation="bilinear")(batch)  # resize 20: skipped
    per_image = torch.stack(
        [build_eval_transform(16, crop_pct=0.8, interpolation="bilinear")(i) for i, _ in batch]
    )
    torch.testing.assert_close(out, per_image, atol=1e-5, rtol=0)
    out, _ = BatchEvalTransform(8, crop_pct=1.0)(batch)  # resized 20 -> 8
    assert out.shape == (4, 3, 8, 8)


def test_cached_dataset_subset(tmp_path):
    classes, samples = make_folder(tmp_path / "train")
    cache = build_tensor_cache(samples, classes, 8)
    subset = CachedTensorDataset(cache, [4, 1])
    assert len(subset) == 2 and subset.targets == [samples[4][1], samples[1][1]]
    image, label = subset[1]
    assert torch.equal(image, cache.images[1]) and label == samples[1][1]
