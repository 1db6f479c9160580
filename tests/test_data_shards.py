"""Streaming shards: pack a folder, stream it back: the same samples and labels, each rank and worker
reading a distinct part, corrupt files reported and never fatal, a 2-step Lightning fit."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from vitkit.data import (
    SHAPE_CLASSES,
    ImageFolderDataModule,
    StreamingDataModule,
    WebDatasetShards,
    make_shapes_dataset,
    open_litdata_shards,
    pack_image_folder,
    read_shard_info,
    scan_image_folder,
)
from vitkit.data.cli import data_main
from vitkit.training import ImageClassifier

litdata = pytest.importorskip("litdata", reason="streaming shards need pip install 'vitkit[stream]'")
pytest.importorskip("webdataset", reason="streaming shards need pip install 'vitkit[stream]'")

CIFAR10 = Path("~/.cache/vitkit/cifar10").expanduser()
TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The shapes dataset (40 train + 15 val 16-px PNGs) plus one corrupt file in train/circle."""
    root = make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=40, num_val=15, img_size=16)
    (root / "train" / "circle" / "zz_corrupt.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("litdata")
    pack_image_folder(folder, out, num_workers=2, chunk_bytes="8kB")  # several chunks
    return out


def folder_samples(split: Path, classes=None) -> Counter:
    """(file bytes, label) of every file the folder scan lists, corrupt ones left out."""
    _, samples = scan_image_folder(split, classes=classes)
    return Counter((Path(p).read_bytes(), label) for p, label in samples if "corrupt" not in p)


def record_key(record: dict) -> str:
    return record["key"]


def streamed(path: Path, **options) -> Counter:
    return Counter((bytes(r["image"]), r["label"]) for r in open_litdata_shards(str(path), **options))


def keys_read_by(dataset, num_workers: int) -> list[str]:
    if isinstance(dataset, WebDatasetShards):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=num_workers, collate_fn=list)
    else:
        loader = litdata.StreamingDataLoader(dataset, batch_size=4, num_workers=num_workers, collate_fn=list)
    return [key for batch in loader for key in batch]


def test_pack_stores_the_folder_samples_labels_and_class_map(folder, shards):
    info = read_shard_info(shards)
    assert info.format == "litdata" and info.classes == list(SHAPE_CLASSES)
    assert info.classes == scan_image_folder(folder / "train")[0]
    assert {name: s.num_samples for name, s in info.splits.items()} == {"train": 40, "val": 15}
    assert info.source == str(folder.resolve())
    for name in ("train", "val"):  # the original bytes (no re-encoding) and the folder's labels
        assert streamed(shards / name) == folder_samples(folder / name, classes=info.classes)
    [skipped] = info.skipped  # the corrupt file: left out, listed, the pack went on
    assert skipped["path"].endswith("zz_corrupt.png") and skipped["split"] == "train"
    assert "Cannot decode" in skipped["error"]


def test_two_ranks_with_two_workers_each_read_distinct_parts(shards, monkeypatch):
    """litdata takes the world size and rank from WORLD_SIZE / GLOBAL_RANK (or torch.distributed)."""
    every = [r["key"] for r in open_litdata_shards(str(shards / "train"))]
    for drop_last in (False, True):  # evaluation reads every sample; DDP training equal shares
        parts = []
        for rank in (0, 1):
            monkeypatch.setenv("WORLD_SIZE", "2")
            monkeypatch.setenv("GLOBAL_RANK", str(rank))
            dataset = open_litdata_shards(
                str(shards / "train"), record_key, shuffle=True, drop_last=drop_last
            )
            assert (dataset.distributed_env.world_size, dataset.distributed_env.global_rank) == (2, rank)
            parts.append(keys_read_by(dataset, num_workers=2))
        both = parts[0] + parts[1]
        assert len(both) == len(set(both)) == len(every)  # no duplicates, within or across ranks
        assert set(both) == set(every)
        assert len(parts[0]) == len(parts[1]) == 20


def make_dm(root, **options) -> StreamingDataModule:
    defaults = {"batch_size": 8, "img_size": 16, "crop_pct": 1.0, "num_workers": 0}
    return StreamingDataModule(root, **{**defaults, **options})


def test_datamodule_batches_match_the_folder_datamodule(folder, shards):
    dm = make_dm(shards, seed=1)
    assert dm.classes == list(SHAPE_CLASSES) and dm.num_classes == 5
    assert dm.hparams["classes"] == list(SHAPE_CLASSES)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -3 < x.mean() < 3 and x.min() < 0  # normalised with the ImageNet mean and std
    assert len(dm.train_dataloader()) == 5 and dm.val_dataloader() is not None
    reference = ImageFolderDataModule(folder, batch_size=8, img_size=16, crop_pct=1.0, num_workers=0)
    reference.setup("fit")

    def pixels_and_labels(loader) -> list[tuple[int, bytes]]:
        pairs = [pair for x, y in loader for pair in zip(y.tolist(), x, strict=True)]
        return sorted((label, image.numpy().tobytes()) for label, image in pairs)

    assert pixels_and_labels(dm.val_dataloader()) == pixels_and_labels(reference.val_dataloader())
    assert dm.state_dict()["classes"] == list(SHAPE_CLASSES)
    mixing = make_dm(shards, mixup_alpha=0.2, cutmix_alpha=1.0)  # ImageFolderDataModule's Mixup / CutMix
    mixing.trainer = SimpleNamespace(training=True)
    mixed, soft = mixing.on_after_batch_transfer((x, y), 0)
    assert mixed.shape == x.shape and soft.shape == (8, 5)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(8))
    with pytest.raises(ValueError, match="differ"):
        _ = make_dm(shards, classes=["a", "b"]).classes


def test_corrupt_sample_in_the_shards_is_dropped_and_counted(folder, tmp_path):
    out = tmp_path / "unverified"
    info = pack_image_folder(folder, out, num_workers=1, verify=False)  # the corrupt file goes in
    assert info.splits["train"].num_samples == 41 and not info.skipped
    dm = make_dm(out, num_workers=2)
    dm.setup("fit")
    labels = torch.cat([y for _, y in dm.train_dataloader()])
    assert len(labels) == 40  # 41 records, one dropped from its batch
    [(path, entry)] = dm.decode_error_log.read().items()
    assert path.endswith("train/circle/zz_corrupt.png") and entry["split"] == "train"
    assert dm.decode_error_log.total == 56 and dm.decode_error_log.fraction == pytest.approx(1 / 56)


class SeenImages(L.Callback):
    def __init__(self) -> None:
        self.images: list[bytes] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.images += [image.numpy().tobytes() for image in batch[0]]


def fit(dm, max_steps: int, root: Path, ckpt_path=None) -> tuple[L.Trainer, list[bytes]]:
    module = ImageClassifier(model_name="vit_tiny_patch4_32", model_options=TINY, classes=dm.classes)
    seen = SeenImages()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=1,
        callbacks=[seen],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, seen.images


def test_fit_checkpoints_classes_and_loader_position_and_resumes_mid_epoch(shards, tmp_path):
    fixed = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "hflip": 0.0}  # the same pixels on every pass
    trainer, first = fit(make_dm(shards, **fixed), 2, tmp_path)
    assert trainer.global_step == 2 and len(first) == 16
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert checkpoint["datamodule_hyper_parameters"]["classes"] == list(SHAPE_CLASSES)
    assert checkpoint["StreamingDataModule"]["classes"] == list(SHAPE_CLASSES)
    [loader_state] = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["num_samples_yielded"] == 16  # litdata's position in the epoch
    trainer, rest = fit(make_dm(shards, **fixed), 5, tmp_path, ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 5 and len(rest) == 24  # the last 3 of the epoch's 5 batches
    assert len(set(first) | set(rest)) == 40  # the rest of the epoch: nothing twice, nothing missed


def test_webdataset_shards_give_the_same_samples_split_by_rank_and_worker(folder, tmp_path, capsys):
    out = tmp_path / "wds"
    assert data_main(["pack", str(folder), str(out), "--format", "webdataset", "--chunk-bytes", "3kB"]) == 0
    printed = capsys.readouterr().out
    assert "webdataset" in printed and "train: 40 samples" in printed and "zz_corrupt.png" in printed
    info = read_shard_info(out)
    tars = [str(out / "train" / tar) for tar, _ in info.splits["train"].shards]
    assert len(tars) >= 4 and sum(n for _, n in info.splits["train"].shards) == 40
    records = list(WebDatasetShards(tars))
    assert Counter((bytes(r["image"]), int(r["label"])) for r in records) == folder_samples(folder / "train")
    parts = [keys_read_by(WebDatasetShards(tars, record_key, rank=r, world_size=2), 2) for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(r["key"] for r in records)
    dm = make_dm(out, num_workers=0)
    dm.setup("validate")
    assert sum(len(y) for _, y in dm.val_dataloader()) == 15 and len(dm.train_dataset) == 40
    foreign = tmp_path / "foreign"  # tars written elsewhere: no vitkit-shards.json, classes given
    shutil.copytree(out / "train", foreign / "train")
    with pytest.raises(ValueError, match="classes"):
        read_shard_info(foreign)
    assert (
        read_shard_info(foreign, classes=list(SHAPE_CLASSES)).splits["train"].shards[0][0]
        == "shard-000000.tar"
    )


def test_pack_command_writes_litdata_and_refuses_to_overwrite(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert data_main(["pack", str(folder), str(out), "--num-workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "litdata" in printed and "train: 40 samples" in printed and "val: 15 samples" in printed
    assert "1 file(s) could not be decoded" in printed and (out / "vitkit-shards.json").is_file()
    assert data_main(["pack", str(folder), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert data_main(["pack", str(folder), str(out), "--overwrite", "--num-workers", "1", "--no-verify"]) == 0


@pytest.mark.skipif(not (CIFAR10 / "train").is_dir(), reason=f"no CIFAR-10 folder at {CIFAR10}")
def test_cifar10_subset_streams_the_same_images_with_no_duplicates_across_ranks(tmp_path, monkeypatch):
    root = tmp_path / "cifar"
    for split, per_class in (("train", 100), ("test", 50)):
        for name in ("airplane", "cat"):
            (root / split / name).mkdir(parents=True)
            for path in sorted((CIFAR10 / split / name).iterdir())[:per_class]:
                os.symlink(path, root / split / name / path.name)
    info = pack_image_folder(root, tmp_path / "shards", num_workers=2, chunk_bytes="64kB")
    assert info.classes == ["airplane", "cat"] and not info.skipped
    assert {name: s.num_samples for name, s in info.splits.items()} == {"train": 200, "val": 100}
    assert streamed(tmp_path / "shards" / "train") == folder_samples(root / "train")
    assert streamed(tmp_path / "shards" / "val") == folder_samples(root / "test")
    parts = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        dataset = open_litdata_shards(str(tmp_path / "shards" / "train"), record_key, shuffle=True)
        parts.append(keys_read_by(dataset, num_workers=0))
    assert len(parts[0]) == len(parts[1]) == 100 and not set(parts[0]) & set(parts[1])
