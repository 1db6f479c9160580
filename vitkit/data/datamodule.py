"""A LightningDataModule for ImageNet-style folders: splits, transforms, cache, Mixup, loader hygiene.

    dm = ImageFolderDataModule("data/shapes", batch_size=128, img_size=64, cache=True)
    model = create_model("vit_tiny_patch8_64", num_classes=dm.num_classes)

Batches are ``(images, targets)``: images float32 (B, 3, H, W), normalised; targets int64 (B,),
or soft float (B, C) summing to 1 in training when Mixup / CutMix is on (applied after the batch
reaches the device, in :meth:`on_after_batch_transfer`, training only).

Two input paths with the same batches: decoding files on the fly (any dataset size), or with
``cache=True`` / ``"memory"`` / ``"disk"`` / a folder, decoding once into a uint8 tensor and
augmenting whole batches as tensors (:mod:`vitkit.data.cache`; for datasets that fit in RAM), in
the loader workers or, with ``augment_on="device"``, on the GPU after the transfer.
The class list is saved in the checkpoint (hyper-parameter ``classes`` and :meth:`state_dict`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .cache import (
    BatchEvalTransform,
    BatchTrainTransform,
    CachedTensorDataset,
    TensorCache,
    default_cache_dir,
    load_or_build_tensor_cache,
    stack_batch,
)
from .errors import DecodeErrorLog
from .folder import (
    DatasetSplits,
    FolderLayoutError,
    ImageFolderDataset,
    UnlabeledImageDataset,
    collate_skip_none,
    find_splits,
    is_hidden,
    scan_image_folder,
    split_holdout,
)
from .seeding import EpochLoader, EpochShuffle, RepeatedAugmentation
from .transforms import (
    BatchMixer,
    DataConfig,
    build_eval_transform,
    build_train_transform,
    resolve_data_config,
)


def available_cpus() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where unavailable)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_num_workers(max_workers: int = 8) -> int:
    """One loader worker per CPU beyond the one the training loop needs, at most ``max_workers``."""
    return max(0, min(max_workers, available_cpus() - 1))


AUGMENT_ON = ("workers", "device")


def check_augment_on(
    augment_on: str, cached: bool, auto_augment: str | None = None, color_jitter: Any = 0.0
) -> None:
    """Raise ValueError unless ``augment_on`` is one of :data:`AUGMENT_ON` and possible with these
    options (the cache, and a policy and colour jitter that have a batched version)."""
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"augment_on must be 'workers' or 'device', got {augment_on!r}.")
    if augment_on == "device" and not cached:
        raise ValueError(
            "augment_on='device' augments batches of cached uint8 images on the training device; "
            "turn the tensor cache on (cache=True, --data.cache memory) or use augment_on='workers'."
        )
    if augment_on == "device":
        BatchTrainTransform(8, auto_augment=auto_augment, color_jitter=color_jitter, batched=True)


class _ImageDataModule(L.LightningDataModule):
    """What vitkit's image data modules share: the training augmentation options, the preprocessing
    (a :class:`DataConfig`, adopted from the model's ``pretrained_cfg`` unless given) and batch-level
    Mixup / CutMix on the device. Subclasses save the hyper-parameters these read (``scale``,
    ``ratio``, ``hflip``, ``auto_augment``, ``color_jitter``, ``re_prob``, ``mixup_*``, ...), set
    ``data_config`` and have ``classes`` / ``num_classes``.
    """

    _mixer: BatchMixer | None = None
    _device_augment: BatchTrainTransform | None = None
    data_config: DataConfig

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def train_options(self) -> dict[str, Any]:
        """The training augmentations, as the transform builders take them."""
        h = self.hparams
        return {
            "scale": tuple(h.scale),
            "ratio": tuple(h.ratio),
            "hflip": h.hflip,
            "auto_augment": h.auto_augment,
            "color_jitter": h.color_jitter,
            "re_prob": h.re_prob,
        }

    @property
    def mixer(self) -> BatchMixer | None:
        """The Mixup / CutMix of training batches, or None when both alphas are 0."""
        h = self.hparams
        if self._mixer is None and (h.mixup_alpha > 0 or h.cutmix_alpha > 0):
            self._mixer = BatchMixer(
                self.num_classes, h.mixup_alpha, h.cutmix_alpha, prob=h.mixup_prob, switch_prob=h.switch_prob
            )
        return self._mixer

    def _resolve_data_config(self, pretrained_cfg: dict[str, Any] | None) -> DataConfig:
        h = self.hparams
        return resolve_data_config(
            pretrained_cfg,
            img_size=h.img_size,
            mean=h.mean,
            std=h.std,
            interpolation=h.interpolation,
            crop_pct=h.crop_pct,
        )

    def _adopt_model_preprocessing(self) -> None:
        """Given no ``pretrained_cfg``, take the attached model's: its weights decide the normalisation.

        Explicit ``mean`` / ``std`` / ``interpolation`` / ``crop_pct`` / ``img_size`` still win.
        """
        module = self.trainer.lightning_module if self.trainer is not None else None
        model_cfg = getattr(getattr(module, "model", None), "pretrained_cfg", None)
        if self.hparams.pretrained_cfg is None and model_cfg:
            self.data_config = self._resolve_data_config(model_cfg)

    def _transforms(self) -> tuple[Any, Any]:
        cfg = self.data_config
        common = {"mean": cfg.mean, "std": cfg.std, "interpolation": cfg.interpolation}
        train = build_train_transform(cfg.img_size, **common, **self.train_options)
        return train, build_eval_transform(cfg.img_size, crop_pct=cfg.crop_pct, **common)

    @property
    def augment_on(self) -> str:
        """Where training batches are augmented: "workers" (in the loader) or "device" (after transfer)."""
        return self.hparams.get("augment_on", "workers")

    def _batch_train_transform(self) -> BatchTrainTransform:
        """The training augmentation for cached uint8 batches, batched per image where it runs on
        the device (``augment_on="device"``). The cache is already at the size to crop from."""
        cfg = self.data_config
        return BatchTrainTransform(
            cfg.img_size,
            mean=cfg.mean,
            std=cfg.std,
            **self.train_options,
            interpolation="bilinear",
            batched=self.augment_on == "device",
        )

    def _epoch_loader(
        self, dataset: Dataset, train: bool, collate: Any, drop_last: bool = False
    ) -> DataLoader:
        """The loader both data modules hand to Lightning (:mod:`vitkit.data.seeding`): a pass starts
        at its first batch, after Lightning's ``set_epoch``; training shuffles epoch e by (seed, e),
        and the training datasets seed each batch's augmentations by (seed, its indices), so a
        resumed run draws what an uninterrupted one would."""
        workers = self.num_workers
        return EpochLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self._train_sampler(dataset) if train else None,
            drop_last=drop_last,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed + (0 if train else 1)),  # workers' first seeds
            collate_fn=collate,
        )

    def _train_sampler(self, dataset: Dataset) -> Sampler:
        """:class:`EpochShuffle`; under DDP, this rank's share of a ``DistributedSampler`` seeded by
        ``seed`` too (it shuffles epoch e by seed + e); with ``repeated_aug``, a
        :class:`RepeatedAugmentation` (this rank's share under DDP). Lightning leaves a loader that
        already has a distributed sampler as it is; the one it would put in instead takes its seed
        from ``seed_everything``."""
        trainer = self.trainer
        shards = trainer.distributed_sampler_kwargs if trainer is not None else None
        connector = getattr(trainer, "_accelerator_connector", None)
        sharded = shards and trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", True)
        repeats = int(self.hparams.get("repeated_aug", 1) or 1)
        if repeats > 1:
            return RepeatedAugmentation(dataset, repeats, self.seed, **(shards if sharded else {}))
        if sharded:
            return DistributedSampler(dataset, shuffle=True, seed=self.seed, **shards)
        return EpochShuffle(dataset, self.seed)

    def _train_collate(self, transform: BatchTrainTransform) -> Any:
        """The training loader's ``collate_fn`` for cached images: the whole augmentation, or (with
        ``augment_on="device"``) a plain stack, the augmentation then running in
        :meth:`on_after_batch_transfer`."""
        if self.augment_on == "device":
            self._device_augment = transform
            return stack_batch
        return transform

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches, on the device: the augmentation when ``augment_on="device"`` (uint8
        images in, normalised float out), then Mixup / CutMix (int targets -> soft (B, C))."""
        trainer = self.trainer
        # (not the model's example_input_array, a bare tensor Lightning also passes through this hook)
        labelled = isinstance(batch, list | tuple)
        if trainer is None or not trainer.training or not labelled:
            return batch
        images, targets = batch
        if self._device_augment is not None and images.dtype == torch.uint8:
            images = self._device_augment.augment(images)
        if self.mixer is not None:
            return self.mixer(images, targets)
        return images, targets

    def state_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "data_config": asdict(self.data_config)}


class ImageFolderDataModule(_ImageDataModule):
    """Train / validate / test / predict on an ImageNet-style image folder.

    Args:
        root: ``root/train/<class>/*`` plus ``val/``, ``validation/`` or ``test/`` (see
            :func:`~vitkit.data.folder.find_splits`), or a flat ``root/<class>/*``.
        batch_size: per device; ``eval_batch_size`` defaults to it.
        img_size: the model's input size; default: ``pretrained_cfg["input_size"]``, else 224.
        val_split: the validation folder (name under ``root`` or path); None searches for one.
        val_fraction: with no validation folder, this seeded, stratified fraction of ``train``.
        seed: for the held-out split, the shuffling and the augmentations (per worker).
        num_workers: loader processes; None: one per available CPU but one (at most 8).
        cache: False decodes files on the fly; True / "memory" decodes each split once into a
            uint8 tensor; "disk" also saves it under ``~/.cache/vitkit/tensor-cache`` (or
            ``$VITKIT_CACHE_DIR``); any other string is the folder to save it in.
        cache_size: the square size images are cached at; default ``floor(img_size / crop_pct)``.
        augment_on: with the cache, where training batches are augmented: "workers" (in the
            loader processes; auto-augment and colour jitter per image with torchvision / timm ops)
            or "device" (the workers only gather uint8 images; crop, flip, auto-augment, colour
            jitter and erasing run as batched tensor ops on the training device, after the
            transfer: :mod:`vitkit.data.batch_augment`). "device" is the fast path on a GPU; it
            takes "randaugment", "trivialaugment" and timm "rand-..." policies, no hue jitter.
        scale, ratio: RandomResizedCrop area and aspect ranges.
        hflip: horizontal flip probability.
        auto_augment: "randaugment", "trivialaugment", "autoaugment", "augmix", "3augment" or a timm
            policy string ("rand-m9-mstd0.5-inc1"); None for none.
        color_jitter: brightness / contrast / saturation strength (or a 3-4 tuple); 0 for none.
        re_prob: random-erasing probability.
        mixup_alpha, cutmix_alpha, mixup_prob, switch_prob: see :class:`~vitkit.data.transforms.BatchMixer`
            (both alphas 0: off).
        repeated_aug: draw each training image this many times per epoch pass, each copy augmented
            on its own (DeiT's repeated augmentation, timm's ``--aug-repeats 3``); 1: off. Epochs
            keep their length: see :class:`~vitkit.data.seeding.RepeatedAugmentation`.
        mean, std, interpolation, crop_pct: preprocessing; default from ``pretrained_cfg``, else ImageNet.
        pretrained_cfg: a model's ``pretrained_cfg`` dict (timm keys).
        max_bad_fraction: the fraction of undecodable files above which
            :class:`~vitkit.data.errors.DecodeErrorMonitor` stops the run (when more than 10 files fail).
        classes: the expected class list (e.g. from a checkpoint): the training folder must have
            exactly these classes, and labels follow this order.
        predict_root: a folder (searched recursively) or file of unlabeled images for prediction.
        drop_last: drop the last incomplete training batch.
        error_dir: where decode failures are collected; a temporary folder by default.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        batch_size: int = 64,
        img_size: int | None = None,
        val_split: str | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int | None = None,
        cache: bool | str = False,
        cache_size: int | None = None,
        augment_on: str = "workers",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = None,
        color_jitter: float | tuple[float, ...] = 0.0,
        re_prob: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        switch_prob: float = 0.5,
        repeated_aug: int = 1,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        pretrained_cfg: dict[str, Any] | None = None,
        max_bad_fraction: float = 0.01,
        classes: Sequence[str] | None = None,
        predict_root: str | os.PathLike[str] | None = None,
        eval_batch_size: int | None = None,
        drop_last: bool = False,
        error_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        # logger=False: the checkpoint keeps these, but they are not merged with the model's
        # hyper-parameters in the logger (Lightning refuses keys such as img_size present in both).
        self.save_hyperparameters(logger=False)
        for key, value in self.hparams.items():  # plain strings: checkpoints load with weights_only=True
            if isinstance(value, os.PathLike):
                self.hparams[key] = str(value)
        if cache not in (False, True, "memory", "disk") and not isinstance(cache, (str, os.PathLike)):
            raise ValueError(f"cache must be False, True, 'memory', 'disk' or a folder, got {cache!r}.")
        check_augment_on(augment_on, bool(cache), auto_augment, color_jitter)
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.num_workers = auto_num_workers() if num_workers is None else num_workers
        self.max_bad_fraction = max_bad_fraction
        self.data_config: DataConfig = self._resolve_data_config(pretrained_cfg)
        self.decode_error_log = DecodeErrorLog(error_dir)
        self._expected_classes = list(classes) if classes is not None else None
        self._scan: dict[str, Any] | None = None
        self._caches: dict[str, TensorCache] = {}
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    # -- classes and splits ------------------------------------------------------------------

    @property
    def splits(self) -> DatasetSplits:
        return self._scanned()["splits"]

    @property
    def classes(self) -> list[str]:
        """The sorted class names of the training folder (scanned on first use)."""
        return self._scanned()["classes"]

    def _scanned(self) -> dict[str, Any]:
        """Find the splits and list their files, once."""
        if self._scan is not None:
            return self._scan
        splits = find_splits(self.root, self.hparams.val_split)
        classes, train_samples = scan_image_folder(splits.train, classes=self._expected_classes)
        if len(classes) < 2:
            raise FolderLayoutError(
                f"{splits.train} has one class folder ({classes[0]}): a classifier needs at least two. "
                "Put each class's images in its own sub-folder: train/<class>/<image>."
            )
        if self._expected_classes is not None:
            missing = sorted(set(classes) - {c for c in self._folder_classes(splits.train)})
            if missing:
                warnings.warn(
                    f"The training folder {splits.train} has no folder for class(es) "
                    f"{', '.join(missing[:5])} of the expected class list; they get no training images.",
                    stacklevel=2,
                )
        scan: dict[str, Any] = {"splits": splits, "classes": classes, "train": train_samples}
        scan["train_indices"] = list(range(len(train_samples)))
        if splits.val is not None:
            scan["val"] = scan_image_folder(splits.val, classes=classes)[1]
        elif self.hparams.val_fraction > 0:
            train_idx, val_idx = split_holdout(train_samples, self.hparams.val_fraction, self.seed)
            scan["train_indices"], scan["val_indices"] = train_idx, val_idx
        if splits.test is not None:
            scan["test"] = scan_image_folder(splits.test, classes=classes)[1]
        self._scan = scan
        self.hparams["classes"] = list(classes)
        self.decode_error_log.total = len(train_samples) + len(scan.get("val", []))
        return scan

    @staticmethod
    def _folder_classes(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name))

    @property
    def num_files(self) -> int:
        """Image files in the training and validation splits (the denominator of the bad fraction)."""
        self._scanned()
        return self.decode_error_log.total

    # -- datasets ------------------------------------------------------------------------------

    def _cache_folder(self) -> Path | None:
        cache = self.hparams.cache
        if cache in (True, "memory"):
            return None
        if cache == "disk":
            return default_cache_dir()
        return Path(cache).expanduser()

    @property
    def cache_size(self) -> int:
        return self.hparams.cache_size or self.data_config.resize_size

    def _tensor_cache(self, split: str, samples: list[tuple[str, int]]) -> TensorCache:
        if split not in self._caches:
            self._caches[split] = load_or_build_tensor_cache(
                samples,
                self.classes,
                self.cache_size,
                cache_dir=self._cache_folder(),
                name=f"{self.root.resolve().name}-{split}",
                interpolation=self.data_config.interpolation,
                num_workers=self.num_workers,
                error_log=self.decode_error_log,
                split=split,
            )
        return self._caches[split]

    def prepare_data(self) -> None:
        """Build the disk cache once (rank 0) so that other ranks load it in :meth:`setup`."""
        if self.hparams.cache and self._cache_folder() is not None:
            self._build("fit")
            self._caches.clear()

    def setup(self, stage: str | None = None) -> None:
        self._adopt_model_preprocessing()
        self._build(stage)

    def _build(self, stage: str | None) -> None:
        scan = self._scanned()
        train_tf, eval_tf = self._transforms()
        if stage in (None, "fit", "validate"):
            if self.hparams.cache:
                cache = self._tensor_cache("train", scan["train"])
                keep = set(scan["train_indices"])
                positions = [p for p, i in enumerate(cache.source_index.tolist()) if i in keep]
                self.train_dataset = CachedTensorDataset(cache, positions, augment_seed=self.seed)
                if "val" in scan:
                    self.val_dataset = CachedTensorDataset(self._tensor_cache("val", scan["val"]))
                elif "val_indices" in scan:
                    held = set(scan["val_indices"])
                    val_positions = [p for p, i in enumerate(cache.source_index.tolist()) if i in held]
                    self.val_dataset = CachedTensorDataset(cache, val_positions)
            else:
                full = ImageFolderDataset(
                    scan["train"],
                    self.classes,
                    train_tf,
                    self.decode_error_log,
                    "train",
                    augment_seed=self.seed,
                )
                self.train_dataset = Subset(full, scan["train_indices"]) if "val_indices" in scan else full
                if "val" in scan:
                    self.val_dataset = ImageFolderDataset(
                        scan["val"], self.classes, eval_tf, self.decode_error_log, "val"
                    )
                elif "val_indices" in scan:
                    held_out = ImageFolderDataset(
                        scan["train"], self.classes, eval_tf, self.decode_error_log, "val"
                    )
                    self.val_dataset = Subset(held_out, scan["val_indices"])
        if stage in (None, "test"):
            if "test" not in scan:  # no separate test folder: test on the validation data
                if self.val_dataset is None:
                    self._build("validate")
                self.test_dataset = self.val_dataset
            elif self.hparams.cache:
                self.test_dataset = CachedTensorDataset(self._tensor_cache("test", scan["test"]))
            else:
                self.test_dataset = ImageFolderDataset(
                    scan["test"], self.classes, eval_tf, self.decode_error_log, "test"
                )

    def _batch_transforms(self) -> tuple[BatchTrainTransform, BatchEvalTransform]:
        cfg = self.data_config
        # The cache is already at floor(img_size / crop_pct); a tensor resize supports bilinear / bicubic.
        interpolation = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic") else "bilinear"
        evaluate = BatchEvalTransform(
            cfg.img_size, crop_pct=cfg.crop_pct, interpolation=interpolation, mean=cfg.mean, std=cfg.std
        )
        return self._batch_train_transform(), evaluate

    # -- loaders -------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset | None, train: bool, name: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"No {name} data: call setup() first, or give the dataset a {name} split "
                f"(found: {self.splits})."
            )
        collate = None
        if isinstance(dataset, CachedTensorDataset):
            train_batch, eval_batch = self._batch_transforms()
            collate = self._train_collate(train_batch) if train else eval_batch
        drop_last = train and self.hparams.drop_last and len(dataset) > self.batch_size
        return self._epoch_loader(dataset, train, collate, drop_last)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, True, "training")

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None and self._scan is not None and self.train_dataset is not None:
            return []  # no validation folder and val_fraction=0: Lightning skips validation
        return self._loader(self.val_dataset, False, "validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, False, "test")

    def predict_dataloader(self) -> DataLoader:
        """(images (B, 3, H, W), paths) for every image under ``predict_root``, eval-transformed.
        Undecodable files are left out of the batches and listed in :attr:`decode_error_log`."""
        if self.hparams.predict_root is None:
            raise RuntimeError("Set predict_root (a folder or file of images) to predict.")
        _, eval_tf = self._transforms()
        dataset = UnlabeledImageDataset.from_folder(
            self.hparams.predict_root, transform=eval_tf, error_log=self.decode_error_log
        )
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_skip_none,
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        classes = list(state_dict.get("classes", []))
        if self._scan is not None and classes and classes != self.classes:
            raise FolderLayoutError(
                f"The checkpoint was trained on classes {classes[:10]}, "
                f"but {self.root} has {self.classes[:10]}."
            )
        self._expected_classes = classes or self._expected_classes
