"""Data: image folders that never crash a run, a tensor cache for small data, and synthetic shapes.

Public surface:

- :class:`ImageFolderDataModule`: Lightning data for ``root/train/<class>/*`` (+ ``val/``), with
  transforms, Mixup/CutMix, an optional uint8 tensor cache and reproducible loaders.
- :class:`DecodeErrorMonitor`: a Lightning callback that lists undecodable files and stops a run
  when too many fail.
- :func:`load_rgb`, :func:`scan_image_folder`, :func:`find_splits`, :class:`ImageFolderDataset`:
  the pieces, usable without Lightning.
- :func:`build_train_transform`, :func:`build_eval_transform`, :func:`resolve_data_config`,
  :class:`BatchMixer`: preprocessing (torchvision v2 / timm).
- :class:`BatchRandAugment`: RandAugment / TrivialAugment on a whole batch, on its device, each
  image with its own draw (``augment_on="device"`` in the data modules; :mod:`.batch_augment`).
- :class:`TorchvisionDataModule`: CIFAR-10 / CIFAR-100 by name (downloads only when asked).
- :func:`pack_image_folder` (``vitkit data pack``), :class:`StreamingDataModule`: streaming shards
  (litdata chunks or WebDataset tars, ``pip install 'vitkit[stream]'``) for data beyond one disk;
  :class:`ShardInfo`, :func:`read_shard_info`, :func:`open_litdata_shards`, :class:`WebDatasetShards`.
- :func:`make_shapes_dataset`, :class:`SyntheticShapes`, :func:`load_mask`: the shapes dataset
  with ground-truth object masks.
"""

from .batch_augment import BatchRandAugment
from .cache import TensorCache, load_or_build_tensor_cache
from .datamodule import ImageFolderDataModule
from .decode import DecodeError, load_rgb
from .errors import DecodeErrorLog, DecodeErrorMonitor, TooManyDecodeErrors
from .folder import (
    IMAGE_EXTENSIONS,
    FolderLayoutError,
    ImageFolderDataset,
    UnlabeledImageDataset,
    find_splits,
    list_images,
    scan_image_folder,
    split_holdout,
)
from .pack import ShardInfo, pack_image_folder
from .streaming import StreamingDataModule, WebDatasetShards, open_litdata_shards, read_shard_info
from .synth import SHAPE_CLASSES, SyntheticShapes, load_mask, make_shapes_dataset
from .torchvision_datasets import TorchvisionDataModule
from .transforms import (
    BatchMixer,
    DataConfig,
    build_eval_transform,
    build_train_transform,
    resolve_data_config,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SHAPE_CLASSES",
    "BatchMixer",
    "BatchRandAugment",
    "DataConfig",
    "DecodeError",
    "DecodeErrorLog",
    "DecodeErrorMonitor",
    "FolderLayoutError",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "ShardInfo",
    "StreamingDataModule",
    "SyntheticShapes",
    "TensorCache",
    "TooManyDecodeErrors",
    "TorchvisionDataModule",
    "UnlabeledImageDataset",
    "WebDatasetShards",
    "build_eval_transform",
    "build_train_transform",
    "find_splits",
    "list_images",
    "load_mask",
    "load_or_build_tensor_cache",
    "load_rgb",
    "make_shapes_dataset",
    "open_litdata_shards",
    "pack_image_folder",
    "read_shard_info",
    "resolve_data_config",
    "scan_image_folder",
    "split_holdout",
]
