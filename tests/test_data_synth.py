"""Synthetic shapes: deterministic, masks aligned with the drawn object, files = in-memory, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data.cli import data_main
from vitkit.data.folder import find_splits, scan_image_folder
from vitkit.data.synth import SHAPE_CLASSES, SyntheticShapes, load_mask, make_shapes_dataset, render_shape


def test_same_seed_same_images_other_seed_or_split_differs():
    a, label_a, mask_a = render_shape(3, 32, seed=5)
    b, label_b, mask_b = render_shape(3, 32, seed=5)
    assert (
        np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(mask_a, mask_b) and label_a == label_b
    )
    assert not np.array_equal(np.asarray(a), np.asarray(render_shape(3, 32, seed=6)[0]))
    assert not np.array_equal(np.asarray(a), np.asarray(render_shape(3, 32, seed=5, split="val")[0]))


@pytest.mark.parametrize("img_size", [32, 64])
def test_masks_are_inside_non_empty_and_mark_the_coloured_object(img_size):
    for index in range(15):
        image, label, mask = render_shape(index, img_size, seed=1)
        pixels = np.asarray(image).astype(float)
        assert image.size == (img_size, img_size) and mask.shape == (img_size, img_size)
        assert label == index % 5
        area = mask.mean()
        assert 0.01 < area < 0.6
        # Inside the image with a margin: the border rows/columns are background.
        assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
        # The object is one colour, distinct from the background at the object's place.
        core = mask.copy()  # the mask eroded by one pixel: edge pixels blend into the background
        for shift, axis in ((1, 0), (-1, 0), (1, 1), (-1, 1)):
            core &= np.roll(mask, shift, axis)
        inner = pixels[core]
        ring = np.zeros_like(mask)
        ys, xs = np.nonzero(mask)
        ring[max(ys.min() - 2, 0) : ys.max() + 3, max(xs.min() - 2, 0) : xs.max() + 3] = True
        ring &= ~mask
        outside = pixels[ring] if ring.any() else pixels[~mask]
        assert inner.std(axis=0).max() < 25  # a flat colour plus a little noise
        assert np.linalg.norm(inner.mean(0) - outside.mean(0)) > 40
        assert np.linalg.norm(pixels[mask].mean(0) - outside.mean(0)) > 40


def test_ring_has_a_hole_and_circle_does_not():
    ring = next(render_shape(i, 64)[2] for i in range(40) if SHAPE_CLASSES[i % 5] == "ring")
    circle = next(render_shape(i, 64)[2] for i in range(40) if SHAPE_CLASSES[i % 5] == "circle")
    for mask, hole in ((ring, True), (circle, False)):
        ys, xs = np.nonzero(mask)
        cy, cx = round(ys.mean()), round(xs.mean())
        assert bool(mask[cy, cx]) is not hole


def test_in_memory_dataset_matches_the_files_and_masks(tmp_path):
    root = make_shapes_dataset(tmp_path / "shapes", num_train=10, num_val=5, img_size=32, seed=3)
    splits = find_splits(root)
    assert splits.val == root / "val"
    classes, samples = scan_image_folder(splits.train)
    assert classes == list(SHAPE_CLASSES) and len(samples) == 10
    memory = SyntheticShapes(10, img_size=32, seed=3)
    for path, label in samples:
        index = int(path[-9:-4])
        image, mem_label, mem_mask = memory[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and mem_mask.dtype == torch.bool
        assert mem_label == label
        assert np.array_equal(np.asarray(Image.open(path)), image.permute(1, 2, 0).numpy())
        assert np.array_equal(load_mask(root, path), mem_mask.numpy())
    relative = "val/" + SHAPE_CLASSES[2] + "/00002.png"
    assert np.array_equal(load_mask(root, relative), SyntheticShapes(5, 32, 3, split="val")[2][2].numpy())
    with pytest.raises(FileNotFoundError, match="No mask"):
        load_mask(root, "val/circle/99999.png")


def test_make_refuses_to_overwrite_without_asking(tmp_path):
    make_shapes_dataset(tmp_path, num_train=5, num_val=0, img_size=16)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_shapes_dataset(tmp_path, num_train=5, num_val=0, img_size=16)
    make_shapes_dataset(tmp_path, num_train=6, num_val=0, img_size=16, overwrite=True)
    assert len(list((tmp_path / "train").rglob("*.png"))) == 6


def test_cli_synth_and_check(tmp_path, capsys):
    out = tmp_path / "s"
    assert (
        data_main(
            ["synth", str(out), "--num-train", "10", "--num-val", "5", "--img-size", "24", "--seed", "1"]
        )
        == 0
    )
    assert "Wrote 10 train + 5 val 24x24 images" in capsys.readouterr().out
    assert Image.open(out / "val" / "cross" / "00001.png").size == (24, 24)
    assert (out / "masks" / "val" / "cross" / "00001.png").is_file()
    assert data_main(["synth", str(out)]) == 2  # exists
    assert "overwrite" in capsys.readouterr().err
    assert data_main(["check", str(out)]) == 0
    assert "0 undecodable" in capsys.readouterr().out
    (out / "train" / "ring" / "00002.png").write_bytes(b"broken")
    assert data_main(["check", str(out)]) == 1
    assert "BAD" in capsys.readouterr().out
