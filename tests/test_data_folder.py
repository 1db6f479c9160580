"""Folder scanning, split detection, held-out splits, corrupt-file skipping and the error monitor."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vitkit.data.errors import DecodeErrorLog, DecodeErrorMonitor, TooManyDecodeErrors
from vitkit.data.folder import (
    FolderLayoutError,
    ImageFolderDataset,
    UnlabeledImageDataset,
    collate_skip_none,
    find_splits,
    list_images,
    scan_image_folder,
    split_holdout,
)


def write_image(path: Path, value: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path)
    return path


def make_split(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for name, count in counts.items():
        for i in range(count):
            write_image(root / name / f"{i:03d}{ext}", value=10 * i)
    return root


def test_scan_sorts_classes_and_skips_hidden_and_non_images(tmp_path):
    root = make_split(tmp_path / "train", {"zebra": 2, "ant": 1})
    write_image(root / "ant" / "UPPER.JPEG")
    write_image(root / "ant" / "nested" / "deep.PnG")
    write_image(root / "ant" / ".hidden.png")
    write_image(root / "ant" / ".ipynb_checkpoints" / "x.png")
    write_image(root / ".ipynb_checkpoints" / "x.png")  # a hidden "class"
    (root / "ant" / ".DS_Store").write_bytes(b"\0")
    (root / "ant" / "notes.txt").write_text("hello")
    (root / "ant" / "label.csv").write_text("a,b")
    classes, samples = scan_image_folder(root)
    assert classes == ["ant", "zebra"]
    names = [os.path.relpath(p, root) for p, _ in samples]
    assert names == ["ant/000.png", "ant/UPPER.JPEG", "ant/nested/deep.PnG", "zebra/000.png", "zebra/001.png"]
    assert [label for _, label in samples] == [0, 0, 0, 1, 1]


def test_scan_survives_symlink_loops(tmp_path):
    root = make_split(tmp_path / "train", {"a": 1, "b": 1})
    os.symlink(root / "a", root / "a" / "loop")  # a -> a/loop -> a ...
    os.symlink(root, root / "b" / "up")  # b/up -> train (contains b again)
    classes, samples = scan_image_folder(root)
    assert classes == ["a", "b"]
    assert sum(1 for _, label in samples if label == 0) == 1
    assert len(samples) < 10  # no infinite walk; files reached through links are finite


def test_missing_root_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_image_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_splits(tmp_path / "nowhere")


def test_split_without_class_folders(tmp_path):
    write_image(tmp_path / "train" / "loose.png")
    with pytest.raises(FolderLayoutError, match=r"No class folders in .*train.*loose image"):
        scan_image_folder(tmp_path / "train")


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_split(tmp_path / "train", {"a": 1, "c": 1})
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("nothing here")
    with pytest.raises(FolderLayoutError, match=r"train[/\\]b contains no images \(1 non-image"):
        scan_image_folder(root)


def test_validation_class_missing_from_train(tmp_path):
    classes, _ = scan_image_folder(make_split(tmp_path / "train", {"a": 1, "b": 1}))
    val = make_split(tmp_path / "val", {"a": 1, "zzz": 1})
    with pytest.raises(FolderLayoutError, match=r"val[/\\]zzz is not a class of the training split"):
        scan_image_folder(val, classes=classes)
    # A validation split lacking a training class is fine; labels follow the training order.
    _, samples = scan_image_folder(make_split(tmp_path / "val2", {"b": 2}), classes=classes)
    assert [label for _, label in samples] == [1, 1]


@pytest.mark.parametrize("name", ["val", "validation", "test", "Val"])
def test_find_splits_detects_the_validation_folder(tmp_path, name):
    make_split(tmp_path / "train", {"a": 1})
    make_split(tmp_path / name, {"a": 1})
    splits = find_splits(tmp_path)
    assert splits.train == tmp_path / "train"
    assert splits.val == tmp_path / name


def test_find_splits_prefers_val_and_reports_a_separate_test(tmp_path):
    for split in ("train", "validation", "test"):
        make_split(tmp_path / split, {"a": 1})
    splits = find_splits(tmp_path)
    assert splits.val == tmp_path / "validation" and splits.test == tmp_path / "test"


def test_find_splits_explicit_none_and_unlabeled_test(tmp_path):
    make_split(tmp_path / "train", {"a": 1})
    write_image(tmp_path / "test" / "unlabeled.png")  # a flat test folder is not a validation split
    assert find_splits(tmp_path).val is None
    make_split(tmp_path / "holdout", {"a": 1})
    assert find_splits(tmp_path, "holdout").val == tmp_path / "holdout"
    assert find_splits(tmp_path, tmp_path / "holdout").val == tmp_path / "holdout"
    with pytest.raises(FileNotFoundError, match="nope"):
        find_splits(tmp_path, "nope")


def test_find_splits_flat_layout_and_val_without_train(tmp_path):
    make_split(tmp_path / "flat", {"a": 1, "b": 1})
    splits = find_splits(tmp_path / "flat")
    assert splits.train == tmp_path / "flat" and splits.val is None
    make_split(tmp_path / "odd" / "val", {"a": 1})
    with pytest.raises(FolderLayoutError, match="no train/ folder"):
        find_splits(tmp_path / "odd")


def test_split_holdout_is_seeded_and_stratified():
    samples = [(f"{c}{i}", c) for c in range(3) for i in range(20)]
    train, val = split_holdout(samples, 0.25, seed=1)
    assert split_holdout(samples, 0.25, seed=1) == (train, val)
    assert split_holdout(samples, 0.25, seed=2)[1] != val
    assert sorted(train + val) == list(range(60)) and not set(train) & set(val)
    assert [sum(samples[i][1] == c for i in val) for c in range(3)] == [5, 5, 5]
    # A tiny class still gives one sample to validation and keeps one for training.
    train, val = split_holdout([("a", 0), ("b", 0), ("c", 1), ("d", 1), ("e", 1)], 0.01)
    assert len(val) == 2 and len(train) == 3


def make_corrupt_dataset(tmp_path: Path, num_good: int = 8, corrupt: tuple[int, ...] = (2, 5)):
    root = make_split(tmp_path / "train", {"a": num_good // 2, "b": num_good - num_good // 2})
    classes, samples = scan_image_folder(root)
    for i in corrupt:
        Path(samples[i][0]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return classes, samples


def test_corrupt_file_is_replaced_deterministically_and_recorded(tmp_path):
    classes, samples = make_corrupt_dataset(tmp_path)
    log = DecodeErrorLog(tmp_path / "errors", total=len(samples))
    dataset = ImageFolderDataset(samples, classes, transform=None, error_log=log)
    image, label = dataset[2]
    assert image.size == (8, 8)
    assert (image.getpixel((0, 0)), label) == (dataset[3][0].getpixel((0, 0)), dataset[3][1])  # next sample
    assert list(log.read()) == [samples[2][0]]
    dataset[2]  # known bad: not decoded (or recorded) twice, same replacement
    assert len(log) == 1 and log.fraction == pytest.approx(1 / 8)


def test_corrupt_files_are_counted_across_dataloader_workers(tmp_path):
    classes, samples = make_corrupt_dataset(tmp_path)
    log = DecodeErrorLog(total=len(samples))
    dataset = ImageFolderDataset(
        samples, classes, transform=lambda im: torch.tensor(im.getpixel((0, 0))[0]), error_log=log
    )
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    images, _ = zip(*list(loader), strict=True)
    assert len(torch.cat(images)) == len(samples)  # the epoch is complete
    assert sorted(log.read()) == sorted([samples[2][0], samples[5][0]])
    assert {e["split"] for e in log.read().values()} == {"train"}
    report = log.write_report(tmp_path / "report.txt").read_text().splitlines()
    assert len(report) == 2 and report[0].startswith(samples[2][0] + "\ttrain\t")


def test_unlabeled_dataset_drops_corrupt_files(tmp_path):
    write_image(tmp_path / "p" / "x" / "1.png")
    write_image(tmp_path / "p" / "2.JPG")
    (tmp_path / "p" / "3.png").write_bytes(b"junk")
    (tmp_path / "p" / "notes.md").write_text("hi")
    assert [Path(p).name for p in list_images(tmp_path / "p")] == ["2.JPG", "3.png", "1.png"]
    dataset = UnlabeledImageDataset.from_folder(tmp_path / "p", transform=lambda im: torch.zeros(3, 2, 2))
    images, paths = collate_skip_none([dataset[i] for i in range(len(dataset))])
    assert images.shape == (2, 3, 2, 2) and [Path(p).name for p in paths] == ["2.JPG", "1.png"]
    assert len(dataset.error_log) == 1


class _TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.layer(images.float().mean((2, 3))), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Data(L.LightningDataModule):
    def __init__(self, dataset, log, max_bad_fraction):
        super().__init__()
        self.dataset, self.decode_error_log, self.max_bad_fraction = dataset, log, max_bad_fraction

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=4)


def _fit(tmp_path, dataset, log, max_bad_fraction, min_bad_files=0):
    trainer = L.Trainer(
        default_root_dir=tmp_path / "run",
        max_epochs=1,
        callbacks=[DecodeErrorMonitor(min_bad_files=min_bad_files)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_TinyModule(), datamodule=_Data(dataset, log, max_bad_fraction))
    return trainer


def _pil_to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def test_monitor_warns_and_writes_the_list_below_the_threshold(tmp_path):
    classes, samples = make_corrupt_dataset(tmp_path, corrupt=(2,))
    log = DecodeErrorLog(tmp_path / "errors", total=len(samples))
    dataset = ImageFolderDataset(samples, classes, _pil_to_tensor, log)
    with pytest.warns(UserWarning, match=r"1 image\(s\) could not be decoded"):
        _fit(tmp_path, dataset, log, max_bad_fraction=0.2)
    listed = (tmp_path / "run" / "decode_errors.txt").read_text()
    assert samples[2][0] in listed and samples[3][0] not in listed


def test_monitor_stops_the_run_above_the_threshold(tmp_path):
    classes, samples = make_corrupt_dataset(tmp_path, corrupt=(1, 2, 5))
    log = DecodeErrorLog(tmp_path / "errors", total=len(samples))
    dataset = ImageFolderDataset(samples, classes, _pil_to_tensor, log)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TooManyDecodeErrors, match=r"3 of 8 images .* max_bad_fraction=0.2"):
            _fit(tmp_path, dataset, log, max_bad_fraction=0.2)
    assert len((tmp_path / "run" / "decode_errors.txt").read_text().splitlines()) == 3


def test_a_few_bad_files_never_stop_a_run_whatever_the_fraction(tmp_path):
    # 3 of 8 is far above 20%, but not more than min_bad_files (10 by default): warn and go on
    classes, samples = make_corrupt_dataset(tmp_path, corrupt=(1, 2, 5))
    log = DecodeErrorLog(tmp_path / "errors", total=len(samples))
    dataset = ImageFolderDataset(samples, classes, _pil_to_tensor, log)
    with pytest.warns(UserWarning, match=r"3 image\(s\) could not be decoded"):
        trainer = _fit(tmp_path, dataset, log, max_bad_fraction=0.2, min_bad_files=10)
    assert trainer.current_epoch == 1 and not trainer.interrupted
