"""ImageFolderDataModule: class map, splits, folder vs cache, seeding, Mixup in training, checkpoints."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from vitkit.data.datamodule import ImageFolderDataModule, auto_num_workers
from vitkit.data.errors import DecodeErrorMonitor, TooManyDecodeErrors
from vitkit.data.folder import FolderLayoutError
from vitkit.data.synth import SHAPE_CLASSES, make_shapes_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), num_train=40, num_val=15, img_size=16, seed=0
    )


def make_dm(root, **options) -> ImageFolderDataModule:
    defaults = {"batch_size": 8, "img_size": 16, "crop_pct": 1.0, "num_workers": 0}
    return ImageFolderDataModule(root, **{**defaults, **options})


def test_class_map_and_splits(shapes):
    dm = make_dm(shapes)
    assert dm.classes == list(SHAPE_CLASSES) and dm.num_classes == 5
    assert dm.class_to_idx["ring"] == 2
    assert dm.splits.val == shapes / "val"
    dm.setup("fit")
    assert len(dm.train_dataset) == 40 and len(dm.val_dataset) == 15
    assert dm.num_files == 55
    assert dm.hparams["classes"] == list(SHAPE_CLASSES)
    assert dm.state_dict()["classes"] == list(SHAPE_CLASSES)


def test_held_out_fraction_when_there_is_no_validation_folder(shapes):
    dm = make_dm(shapes / "train", val_fraction=0.25, seed=3)  # a flat root/<class>/ layout
    dm.setup("fit")
    assert dm.splits.val is None
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (30, 10)
    again = make_dm(shapes / "train", val_fraction=0.25, seed=3)
    again.setup("fit")
    assert dm.val_dataset.indices == again.val_dataset.indices
    other = make_dm(shapes / "train", val_fraction=0.25, seed=4)
    other.setup("fit")
    assert dm.val_dataset.indices != other.val_dataset.indices
    none = make_dm(shapes / "train", val_fraction=0.0)
    none.setup("fit")
    assert none.val_dataloader() == [] and len(none.train_dataset) == 40


@pytest.mark.parametrize("held_out", [False, True])
def test_cache_path_gives_the_same_batches_as_the_folder_path(shapes, held_out):
    root, options = (shapes / "train", {"val_fraction": 0.25}) if held_out else (shapes, {})
    folder, cached = make_dm(root, **options), make_dm(root, cache=True, **options)
    folder.setup("fit")
    cached.setup("fit")
    assert len(folder.train_dataset) == len(cached.train_dataset)
    labels = [[ds[i][1] for i in range(len(ds))] for ds in (folder.train_dataset, cached.train_dataset)]
    assert labels[0] == labels[1]  # the same samples in the same order
    x_f, y_f = next(iter(folder.val_dataloader()))
    x_c, y_c = next(iter(cached.val_dataloader()))
    assert torch.equal(y_f, y_c) and y_f.dtype == torch.int64
    torch.testing.assert_close(x_f, x_c, atol=1e-5, rtol=0)  # same pixels: 16 px images, crop_pct 1
    for dm in (folder, cached):
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (8,)


@pytest.mark.parametrize("cache", [False, True])
def test_same_seed_same_batches_whatever_the_number_of_workers(shapes, cache):
    # each batch's augmentations are seeded by (seed, its indices) in whichever worker reads it:
    # with one worker, that worker reads both batches; with two, one each
    def first_batches(seed, workers=2):
        dm = make_dm(
            shapes, seed=seed, num_workers=workers, cache=cache, auto_augment="trivialaugment", re_prob=0.5
        )
        dm.setup("fit")
        loader = iter(dm.train_dataloader())
        batches = [next(loader) for _ in range(2)]
        del loader
        gc.collect()  # shut the persistent workers down now, not in the middle of the next loader's start
        return batches

    a, b, c = first_batches(0), first_batches(0, workers=1), first_batches(1)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], c[0][0])


def test_epoch_shuffle_is_a_function_of_seed_and_epoch():
    from vitkit.data.seeding import EpochShuffle

    sampler = EpochShuffle(range(50), seed=3)
    sampler.set_epoch(2)
    second = list(sampler)
    assert sorted(second) == list(range(50))
    sampler.set_epoch(0)
    first = list(sampler)
    assert list(sampler) != first  # without set_epoch, the next pass draws the next permutation
    sampler.set_epoch(2)
    assert list(sampler) == second != first  # whatever came before
    assert list(EpochShuffle(range(50), seed=4)) != first


def test_repeated_augmentation_draws_each_image_several_times_in_a_row():
    from vitkit.data.seeding import RepeatedAugmentation

    sampler = RepeatedAugmentation(range(10), repeats=3, seed=1)
    sampler.set_epoch(4)
    order = list(sampler)
    assert len(order) == 10  # an epoch as long as without repeats
    assert order[0] == order[1] == order[2] != order[3] == order[4] == order[5]
    assert list(sampler) == order  # a function of (seed, epoch)
    sampler.set_epoch(5)
    assert list(sampler) != order
    # over 3 ranks each image's 3 copies go one to each rank
    shares = [list(RepeatedAugmentation(range(12), 3, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert shares[0] == shares[1] == shares[2] and len(set(shares[0])) == 4
    with pytest.raises(ValueError, match="repeated_aug=0"):
        RepeatedAugmentation(range(10), repeats=0)


def test_the_copies_of_a_repeated_image_are_augmented_differently(shapes):
    dm = make_dm(shapes, cache=True, repeated_aug=3, batch_size=6)
    dm.setup("fit")
    loader = dm.train_dataloader()
    images, labels = next(iter(loader))
    assert type(loader.sampler).__name__ == "RepeatedAugmentation"
    assert labels[0] == labels[1] == labels[2] and labels[3] == labels[4] == labels[5]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])


def test_two_epochs_differ(shapes):
    dm = make_dm(shapes, cache=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first, second = next(iter(loader)), next(iter(loader))
    assert not torch.equal(first[0], second[0])


class _Probe(L.LightningModule):
    """Records the target shapes it sees; a linear head on mean colour."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, num_classes)
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def forward(self, x):
        return self.head(x.mean((2, 3)))

    def training_step(self, batch, batch_idx):
        images, targets = batch
        self.seen["train"].append(targets)
        return torch.nn.functional.cross_entropy(self(images), targets)

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, **options) -> L.Trainer:
    defaults = {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    return L.Trainer(default_root_dir=tmp_path, **{**defaults, **options})


def test_mixup_in_training_only_and_classes_in_the_checkpoint(shapes, tmp_path):
    dm = make_dm(shapes, cache=True, mixup_alpha=0.8, cutmix_alpha=1.0)
    model = _Probe(dm.num_classes)
    trainer = _trainer(tmp_path)
    trainer.fit(model, datamodule=dm)
    for targets in model.seen["train"]:
        assert targets.shape == (8, 5) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert all(t.dtype == torch.int64 and t.ndim == 1 for t in model.seen["val"])
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    checkpoint = torch.load(tmp_path / "c.ckpt", weights_only=True)  # plain types only: safe to load
    assert checkpoint["datamodule_hyper_parameters"]["classes"] == list(SHAPE_CLASSES)
    assert checkpoint["ImageFolderDataModule"]["classes"] == list(SHAPE_CLASSES)
    # Restoring into a datamodule over a folder with other classes fails loudly.
    other = make_dm(shapes / "val")  # the flat val folder: same classes -> fine
    other.setup("fit")
    other.load_state_dict(checkpoint["ImageFolderDataModule"])
    renamed = {"classes": ["a", "b", "c", "d", "e"]}
    with pytest.raises(FolderLayoutError, match="trained on classes"):
        other.load_state_dict(renamed)


def test_device_augmentation_workers_stack_uint8_and_the_batch_hook_augments(shapes, tmp_path):
    dm = make_dm(shapes, cache=True, augment_on="device", auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 16, 16) and labels.dtype == torch.int64
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.dtype == torch.float32  # evaluation batches are finished in the loader as before

    class Probe(_Probe):
        def training_step(self, batch, batch_idx):
            self.seen.setdefault("images", []).append(batch[0])
            return super().training_step(batch, batch_idx)

    model = Probe(dm.num_classes)
    _trainer(tmp_path, limit_train_batches=3).fit(model, datamodule=dm)
    seen = model.seen["images"]
    assert len(seen) == 3 and all(x.dtype == torch.float32 and x.shape == (8, 3, 16, 16) for x in seen)
    # normalised with ImageNet statistics: values well below 0 and above 1 appear
    assert min(float(x.min()) for x in seen) < -1.0 and max(float(x.max()) for x in seen) > 1.5
    assert all(t.dtype == torch.int64 for t in model.seen["val"])


def test_device_augmentation_then_mixup(shapes, tmp_path):
    dm = make_dm(shapes, cache=True, augment_on="device", mixup_alpha=0.8)
    model = _Probe(dm.num_classes)
    _trainer(tmp_path).fit(model, datamodule=dm)
    assert all(t.shape == (8, 5) and t.dtype == torch.float32 for t in model.seen["train"])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"augment_on": "device"}, "turn the tensor cache on"),
        ({"augment_on": "gpu", "cache": True}, "'workers' or 'device', got 'gpu'"),
    ],
)
def test_device_augmentation_needs_the_cache(shapes, options, match):
    with pytest.raises(ValueError, match=match):
        make_dm(shapes, **options)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"auto_augment": "augmix"}, "augmix.*no batched version"), ({"color_jitter": (0, 0, 0, 0.2)}, "hue")],
)
def test_device_augmentation_refuses_what_it_cannot_batch_when_built(shapes, options, match):
    with pytest.raises(ValueError, match=match):
        make_dm(shapes, cache=True, augment_on="device", **options)


def test_model_summary_of_a_classifier_with_mixup(shapes, tmp_path):
    # Lightning sends the classifier's example image (a bare tensor, for the summary's FLOPs) through
    # the data module's batch hook while training: Mixup must leave it alone, and still mix batches
    from lightning.pytorch.callbacks import ModelSummary

    from vitkit.training import ImageClassifier

    class KeepSummary(ModelSummary):
        def _summary(self, trainer, pl_module):
            self.summary = super()._summary(trainer, pl_module)
            return self.summary

    dm = make_dm(shapes, cache=True, mixup_alpha=0.8, cutmix_alpha=1.0)
    module = ImageClassifier(
        "vit_tiny_patch4_32", model_options={"img_size": 16, "depth": 1}, num_classes=dm.num_classes
    )
    mixed = []
    module.on_train_batch_start = lambda batch, batch_idx: mixed.append(batch[1].ndim == 2)
    summary = KeepSummary()
    _trainer(tmp_path, callbacks=[summary], enable_model_summary=True).fit(module, datamodule=dm)
    assert summary.summary.total_flops > 0 and mixed == [True, True]


def test_expected_classes_argument(shapes):
    dm = make_dm(shapes, classes=[*SHAPE_CLASSES, "zebra"])
    with pytest.warns(UserWarning, match="zebra"):
        assert dm.num_classes == 6
    with pytest.raises(FolderLayoutError, match="not a class of the training split"):
        _ = make_dm(shapes, classes=["circle", "cross"]).classes


def test_a_single_class_folder_is_refused_with_the_layout_to_use(tmp_path):
    from PIL import Image

    folder = tmp_path / "data" / "train" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    with pytest.raises(FolderLayoutError, match=r"one class folder \(cat\): a classifier needs at least two"):
        _ = ImageFolderDataModule(tmp_path / "data").classes


def test_corrupt_file_through_the_datamodule_and_monitor(shapes, tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for path in (shapes / split).rglob("*.png"):
            target = root / path.relative_to(shapes)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, target)
    bad = root / "train" / "ring" / "00002.png"
    bad.unlink()
    bad.write_bytes(b"not a png")
    dm = make_dm(root, max_bad_fraction=0.1)
    trainer = _trainer(tmp_path / "run", callbacks=[DecodeErrorMonitor()], limit_train_batches=None)
    with pytest.warns(UserWarning, match=r"1 image\(s\) could not be decoded"):
        trainer.fit(_Probe(5), datamodule=dm)
    assert str(bad) in (tmp_path / "run" / "decode_errors.txt").read_text()
    strict = make_dm(root, max_bad_fraction=0.01)  # 1 of 55 files is 1.8 %
    monitor = DecodeErrorMonitor(min_bad_files=0)  # the default (10) lets so few bad files pass
    trainer = _trainer(tmp_path / "run2", callbacks=[monitor], limit_train_batches=None)
    with warnings.catch_warnings(), pytest.raises(TooManyDecodeErrors, match="1 of 55 images"):
        warnings.simplefilter("ignore")
        trainer.fit(_Probe(5), datamodule=strict)


def test_predict_dataloader_yields_images_and_paths(shapes):
    dm = make_dm(shapes, predict_root=shapes / "val", eval_batch_size=4)
    images, paths = next(iter(dm.predict_dataloader()))
    assert images.shape == (4, 3, 16, 16) and len(paths) == 4
    assert all(Path(p).suffix == ".png" and "val" in p for p in paths)
    with pytest.raises(RuntimeError, match="predict_root"):
        make_dm(shapes).predict_dataloader()


def test_pretrained_cfg_sets_preprocessing(shapes):
    cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "input_size": (3, 16, 16)}
    dm = ImageFolderDataModule(shapes, pretrained_cfg=cfg, num_workers=0, batch_size=4)
    assert dm.data_config.img_size == 16 and dm.data_config.mean == (0.5, 0.5, 0.5)
    dm.setup("validate")
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6


def test_auto_num_workers_leaves_a_cpu_for_training():
    assert 0 <= auto_num_workers() <= 8
    assert auto_num_workers() == min(8, max(0, len(os.sched_getaffinity(0)) - 1))


def _cifar_root() -> Path:
    root = Path(os.environ.get("VITKIT_CIFAR10", Path.home() / ".cache" / "vitkit" / "cifar10")).expanduser()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        pytest.skip(f"CIFAR-10 JPEG folders not found at {root} (set VITKIT_CIFAR10 to its location)")
    return root


def test_cifar10_subset_through_the_datamodule(tmp_path):
    """300 CIFAR-10 training and 100 test JPEGs, linked (not copied) into a temporary dataset."""
    cifar = _cifar_root()
    classes = sorted(p.name for p in (cifar / "train").iterdir() if p.is_dir())
    assert len(classes) == 10
    for split, per_class in (("train", 30), ("test", 10)):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            for path in sorted((cifar / split / name).iterdir())[:per_class]:
                os.symlink(path, tmp_path / split / name / path.name)
    for cache in (False, True):
        dm = ImageFolderDataModule(
            tmp_path, batch_size=32, img_size=32, crop_pct=1.0, cache=cache, num_workers=0
        )
        assert dm.classes == classes and dm.splits.val == tmp_path / "test"
        dm.setup("fit")
        assert (len(dm.train_dataset), len(dm.val_dataset)) == (300, 100)
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape == (32, 3, 32, 32) and y.max() < 10
        batches = list(dm.val_dataloader())
        labels = torch.cat([b[1] for b in batches])
        assert labels.bincount().tolist() == [10] * 10
        assert all(b[0].shape[1:] == (3, 32, 32) for b in batches)
