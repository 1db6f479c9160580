"""Torchvision datasets by name: never downloads unless asked; arrays go through the tensor cache."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vitkit.data.torchvision_datasets import (
    TorchvisionDataModule,
    load_torchvision_dataset,
    tensor_cache_from_arrays,
)


def test_missing_dataset_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR10 is not in .*download=True"):
        load_torchvision_dataset("cifar10", tmp_path, train=True, download=False)
    dm = TorchvisionDataModule("cifar100", root=str(tmp_path), num_workers=0)
    dm.prepare_data()  # download=False: does nothing, fetches nothing
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="CIFAR100"):
        dm.setup("fit")


def test_unknown_name():
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        TorchvisionDataModule("imagenet")


def test_arrays_become_a_tensor_cache_with_batch_transforms(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)

    class FakeCIFAR:
        def __init__(self, train: bool) -> None:
            n = 20 if train else 8
            self.data = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]
            self.classes = [f"c{i}" for i in range(10)]

    cache = tensor_cache_from_arrays(FakeCIFAR(True).data, FakeCIFAR(True).targets, ["a"] * 10)
    assert cache.images.shape == (20, 3, 32, 32) and cache.images.dtype == torch.uint8
    assert tensor_cache_from_arrays(FakeCIFAR(True).data, [0] * 20, ["a"], size=16).images.shape == (
        20,
        3,
        16,
        16,
    )

    monkeypatch.setattr(
        "vitkit.data.torchvision_datasets.load_torchvision_dataset",
        lambda name, root, train, download: FakeCIFAR(train),
    )
    dm = TorchvisionDataModule("cifar10", root=str(tmp_path), batch_size=4, num_workers=0, mixup_alpha=0.8)
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.classes[0] == "c0" and dm.hparams["classes"] == dm.classes
    assert dm.data_config.mean == (0.4914, 0.4822, 0.4465) and dm.data_config.img_size == 32
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = next(iter(dm.val_dataloader()))
    assert y.tolist() == [0, 1, 2, 3]
    # augment_on="device": the loader only stacks uint8 images; the batch hook augments in training
    on_device = TorchvisionDataModule(
        "cifar10", root=str(tmp_path), batch_size=4, num_workers=0, augment_on="device"
    )
    on_device.setup("fit")
    images, labels = next(iter(on_device.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    on_device.trainer = SimpleNamespace(training=True)
    x, y = on_device.on_after_batch_transfer((images, labels), 0)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and torch.equal(y, labels)
    assert next(iter(on_device.val_dataloader()))[0].dtype == torch.float32
