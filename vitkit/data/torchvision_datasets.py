"""CIFAR-10 / CIFAR-100 by name through torchvision, for users with internet (downloads only when asked).

    dm = TorchvisionDataModule("cifar10", download=True)   # ~/.cache/vitkit/torchvision

torchvision keeps these datasets as uint8 arrays in memory, so they go straight into the tensor
cache path of :mod:`vitkit.data.cache`: batches are cropped, flipped and normalised as tensors,
exactly as ``ImageFolderDataModule(cache=True)`` does for a folder. The official test split is the
validation split. Batches and Mixup/CutMix follow :class:`~vitkit.data.ImageFolderDataModule`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from .cache import BatchEvalTransform, CachedTensorDataset, TensorCache
from .datamodule import _ImageDataModule, auto_num_workers, check_augment_on
from .transforms import resolve_data_config

DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
"""Names accepted, and the torchvision class each maps to."""

CIFAR_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def default_torchvision_root() -> Path:
    """``$VITKIT_TORCHVISION_ROOT`` or ``~/.cache/vitkit/torchvision``."""
    return Path(os.environ.get("VITKIT_TORCHVISION_ROOT", Path.home() / ".cache" / "vitkit" / "torchvision"))


def tensor_cache_from_arrays(
    data: Any, targets: Any, classes: list[str], size: int | None = None
) -> TensorCache:
    """A :class:`TensorCache` from uint8 images (N, H, W, 3) and labels, resized to ``size`` if given."""
    images = torch.as_tensor(data).permute(0, 3, 1, 2).contiguous()
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        images = torch.cat(
            [TF.resize(chunk, [size, size], antialias=True) for chunk in images.split(1024)]
        )  # CIFAR is square: a plain resize
    labels = torch.as_tensor(targets, dtype=torch.int64)
    return TensorCache(images, labels, torch.arange(len(labels)), list(classes))


def load_torchvision_dataset(name: str, root: str | os.PathLike[str], train: bool, download: bool) -> Any:
    """The torchvision dataset ``name``; a clear error when it is missing and ``download`` is off."""
    import torchvision.datasets

    key = name.lower().replace("-", "")
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; vitkit knows {', '.join(DATASETS)} by name.")
    cls = getattr(torchvision.datasets, DATASETS[key])
    try:
        return cls(str(Path(root).expanduser()), train=train, download=download)
    except RuntimeError as error:
        if download:
            raise
        raise FileNotFoundError(
            f"{DATASETS[key]} is not in {root} ({error}). Pass download=True (--data.download true) to "
            "fetch it, or point ImageFolderDataModule at a folder of images."
        ) from error


class TorchvisionDataModule(_ImageDataModule):
    """CIFAR-10 / CIFAR-100 with vitkit's tensor-batch augmentation.

    Args:
        name: "cifar10" or "cifar100".
        root: where torchvision keeps the files (default ``~/.cache/vitkit/torchvision``).
        download: fetch the dataset if it is not in ``root`` (never done otherwise).
        img_size: model input size; default from ``pretrained_cfg``, else the native 32.
        mean, std: default: the dataset's own statistics (or ``pretrained_cfg``'s).
        augment_on: "workers" or "device" (augment on the GPU), as in ImageFolderDataModule.
        Other arguments as in :class:`~vitkit.data.ImageFolderDataModule`.
    """

    def __init__(
        self,
        name: str = "cifar10",
        root: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        img_size: int | None = None,
        seed: int = 0,
        num_workers: int | None = None,
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
        crop_pct: float | None = None,
        pretrained_cfg: dict[str, Any] | None = None,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        check_augment_on(augment_on, True, auto_augment, color_jitter)
        key = name.lower().replace("-", "")
        if key not in DATASETS:
            raise ValueError(f"Unknown dataset {name!r}; vitkit knows {', '.join(DATASETS)} by name.")
        self.name = key
        self.root = Path(root).expanduser() if root else default_torchvision_root()
        cfg = dict(pretrained_cfg or {})
        dataset_mean, dataset_std = CIFAR_MEAN_STD[key]
        self.data_config = resolve_data_config(
            cfg,
            img_size=img_size or (None if cfg.get("input_size") else 32),
            mean=mean or cfg.get("mean") or dataset_mean,
            std=std or cfg.get("std") or dataset_std,
            crop_pct=crop_pct if crop_pct is not None else cfg.get("crop_pct", 1.0),
        )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.num_workers = auto_num_workers() if num_workers is None else num_workers
        self.classes: list[str] = []
        self.train_dataset: CachedTensorDataset | None = None
        self.val_dataset: CachedTensorDataset | None = None

    @property
    def num_classes(self) -> int:
        return 10 if self.name == "cifar10" else 100

    def prepare_data(self) -> None:
        if self.hparams.download:
            for train in (True, False):
                load_torchvision_dataset(self.name, self.root, train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        size = math.floor(self.data_config.img_size / self.data_config.crop_pct)
        for train in (True, False):
            dataset = load_torchvision_dataset(self.name, self.root, train, download=False)
            self.classes = list(dataset.classes)
            cache = CachedTensorDataset(
                tensor_cache_from_arrays(dataset.data, dataset.targets, self.classes, size),
                augment_seed=self.seed if train else None,
            )
            if train:
                self.train_dataset = cache
            else:
                self.val_dataset = cache
        self.hparams["classes"] = self.classes

    def _loader(self, dataset: CachedTensorDataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call setup() first.")
        cfg = self.data_config
        if train:
            collate: Any = self._train_collate(self._batch_train_transform())
        else:
            collate = BatchEvalTransform(cfg.img_size, crop_pct=cfg.crop_pct, mean=cfg.mean, std=cfg.std)
        return self._epoch_loader(dataset, train, collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, False)

    def state_dict(self) -> dict[str, Any]:
        return {"classes": self.classes}
