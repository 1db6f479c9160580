"""Train from streaming shards (``vitkit data pack`` output) with the batches of ImageFolderDataModule.

    dm = StreamingDataModule("shards/imagenet", batch_size=256, img_size=224)
    model = create_model("vit_small_patch16_224", num_classes=dm.num_classes)

The class list comes from ``vitkit-shards.json`` beside the shards (the folder's sorted classes at
pack time), is stored in the hyper-parameter ``classes`` and checked against a checkpoint's. The
options, transforms, Mixup / CutMix and the adoption of a model's ``pretrained_cfg`` are
:class:`~vitkit.data.datamodule.ImageFolderDataModule`'s, from the base class both share.

Who reads what:

- litdata shards: a :class:`litdata.StreamingDataset` deals the samples of its chunks out to the
  ``world_size x num_workers`` (rank, worker) pairs in whole batches, each pair a distinct part. In
  DDP training every rank gets the same number of batches (litdata's ``drop_last``: an epoch leaves
  out fewer than ``world_size`` batches' worth of samples, different ones each epoch as the order is
  reshuffled), so no rank waits for another; evaluation reads every sample, the last rank taking the
  remainder (so each rank needs one batch: at least ``world_size x eval_batch_size`` samples).
  The loaders are litdata's :class:`~litdata.StreamingDataLoader`: Lightning saves the training
  loader's ``state_dict`` (epoch, samples seen) in checkpoints and a resumed run continues mid-epoch.
- WebDataset tars: whole tar files are dealt out, round-robin to ranks, then to workers
  (:class:`WebDatasetShards`). In multi-GPU training give each rank the same number of equal-sized
  tars, or use litdata, which splits by sample.

A sample whose bytes do not decode is dropped from its batch (one image fewer; every rank keeps its
number of batches) and recorded in :attr:`StreamingDataModule.decode_error_log`, which
:class:`~vitkit.data.errors.DecodeErrorMonitor` reports and checks against ``max_bad_fraction``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .datamodule import _ImageDataModule, auto_num_workers
from .decode import DecodeError
from .errors import DecodeErrorLog
from .folder import IMAGE_EXTENSIONS
from .pack import SHARDS_INFO_FILE, Record, ShardInfo, SplitShards, decode_image_bytes, require
from .transforms import DataConfig

WEBDATASET_IMAGE_FIELDS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
"""The fields of a WebDataset sample read as its image (``jpg``, ``png``, ``webp``...)."""


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else os.path.join(root, *parts)


def read_shard_info(root: str | os.PathLike[str], classes: Sequence[str] | None = None) -> ShardInfo:
    """The :class:`~vitkit.data.pack.ShardInfo` of a shards folder (local, mounted or an fsspec URL).

    WebDataset tars written elsewhere have no ``vitkit-shards.json``: a local ``root/train/*.tar``
    (+ ``val/*.tar``) is read as such, with ``classes`` naming labels 0..C-1.
    """
    root = os.fspath(root)
    info_path = _join(root, SHARDS_INFO_FILE)
    if "://" in root:
        import fsspec  # a dependency of Lightning

        with fsspec.open(info_path, "r", encoding="utf-8") as file:
            return ShardInfo.from_json(file.read())
    if os.path.isfile(info_path):
        return ShardInfo.from_json(Path(info_path).read_text(encoding="utf-8"))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Shards folder {root} does not exist.")
    splits = {}
    for name in ("train", "val", "validation", "test"):
        tars = sorted(p.name for p in Path(root, name).glob("*.tar"))
        if tars:
            split = SplitShards(name, num_samples=0, shards=[(tar, 0) for tar in tars])
            splits.setdefault("val" if name == "validation" else name, split)
    if "train" not in splits:
        raise FileNotFoundError(
            f"{root} has no {SHARDS_INFO_FILE} (write one with `vitkit data pack`) and no train/*.tar shards."
        )
    if not classes:
        raise ValueError(f"{root} holds WebDataset tars without {SHARDS_INFO_FILE}: pass classes=[...].")
    return ShardInfo(format="webdataset", classes=list(classes), splits=splits, source=root)


def distributed_rank() -> tuple[int, int]:
    """(global rank, world size): from torch.distributed once initialised, else ``GLOBAL_RANK`` (or
    ``RANK``) and ``WORLD_SIZE`` as launchers set them, else (0, 1). litdata reads the same."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank = os.environ.get("GLOBAL_RANK", os.environ.get("RANK", "0"))
    return int(rank), int(os.environ.get("WORLD_SIZE", "1"))


class DecodeRecord:
    """A shard :data:`~vitkit.data.pack.Record` -> (transformed RGB image, label), or None if it does
    not decode (recorded in ``error_log`` as ``<where>/<key>``). Picklable, for loader workers."""

    def __init__(
        self,
        transform: Callable[[Any], Any] | None,
        error_log: DecodeErrorLog,
        split: str,
        where: str,
    ) -> None:
        self.transform = transform
        self.error_log = error_log
        self.split = split
        self.where = where

    def __call__(self, record: Record) -> tuple[Any, int] | None:
        name = f"{self.where}/{record.get('key', '?')}"
        try:
            image = decode_image_bytes(record["image"], name)
            label = int(record["label"])
        except (DecodeError, KeyError, TypeError, ValueError) as error:
            self.error_log.record(name, error, self.split)
            return None
        return (self.transform(image) if self.transform is not None else image), label


def collate_decoded(batch: list[tuple[Any, int] | None]) -> Any:
    """``default_collate`` of the samples that decoded (None items are dropped)."""
    items = [item for item in batch if item is not None]
    if not items:
        raise RuntimeError(
            f"None of the {len(batch)} samples of a batch could be decoded; see the decode error list "
            "(DecodeErrorMonitor writes it to the run folder)."
        )
    return torch.utils.data.default_collate(items)


def open_litdata_shards(
    path: str,
    transform: Callable[[Record], Any] | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    cache_dir: str | None = None,
    max_cache_size: int | str | None = None,
) -> Any:
    """A :class:`litdata.StreamingDataset` over one packed split, yielding ``transform(record)``.

    Rank and world size are detected when it is created (as litdata does): create it in ``setup``.
    """
    litdata = require("litdata")
    return litdata.StreamingDataset(
        path,
        cache_dir=cache_dir,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        transform=transform,
        max_cache_size=max_cache_size,
    )


def record_from_webdataset(sample: dict[str, Any]) -> Record:
    """A WebDataset sample (``__key__``, ``jpg`` / ``png`` / ..., ``cls``) as a :data:`Record`.

    A sample without an image or a label gives a record that :class:`DecodeRecord` reports."""
    image = next((v for k, v in sample.items() if k.lower() in WEBDATASET_IMAGE_FIELDS), None)
    return {"image": image, "label": sample.get("cls"), "key": sample.get("__key__", "?")}  # int(b"3") == 3


class WebDatasetShards(IterableDataset):
    """Samples of WebDataset tar shards, each rank and DataLoader worker reading distinct tars.

    The tars are dealt out round-robin: ``urls[rank::world_size]`` to a rank, then
    ``[worker::num_workers]`` of those to a worker. With ``shuffle``, each pass reads its tars in a
    new order and mixes samples through a ``buffer_size`` buffer; the randomness comes from the
    DataLoader's worker seed (the global torch RNG in the main process), so a seeded run repeats.

    Args:
        urls: tar files (paths or URLs webdataset opens).
        transform: applied to each :data:`~vitkit.data.pack.Record` (e.g. :class:`DecodeRecord`).
        counts: samples per tar, to give the dataset a length (this rank's share).
        rank, world_size: default :func:`distributed_rank` when created.
    """

    def __init__(
        self,
        urls: Sequence[str],
        transform: Callable[[Record], Any] | None = None,
        *,
        shuffle: bool = False,
        buffer_size: int = 1000,
        counts: Sequence[int] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        require("webdataset")
        detected_rank, detected_world = distributed_rank()
        self.rank = detected_rank if rank is None else rank
        self.world_size = detected_world if world_size is None else world_size
        self.urls = list(urls)[self.rank :: self.world_size]
        self.counts = list(counts)[self.rank :: self.world_size] if counts else None
        self.transform = transform
        self.shuffle = shuffle
        self.buffer_size = buffer_size

    def __len__(self) -> int:
        if self.counts is None:
            raise TypeError("The number of samples in these tars is unknown.")
        return sum(self.counts)

    def __iter__(self) -> Iterator[Any]:
        wds = require("webdataset")
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        urls = self.urls[worker_id::num_workers]
        if not urls:
            return
        seed = worker.seed if worker is not None else int(torch.randint(2**62, ()).item())
        rng = random.Random(seed)
        if self.shuffle:
            rng.shuffle(urls)
        samples = wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        records: Iterator[Record] = map(record_from_webdataset, samples)
        if self.shuffle:
            records = _shuffled(records, self.buffer_size, rng)
        for record in records:
            yield self.transform(record) if self.transform is not None else record


def _shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer: each new item takes the place of a random one, which is yielded."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class StreamingDataModule(_ImageDataModule):
    """Train / validate / test on shards written by ``vitkit data pack`` (litdata or WebDataset).

    Args:
        root: the shards folder (holding ``vitkit-shards.json``), a mounted network path, or an fsspec
            URL that litdata streams from (``s3://...``), its chunks cached in ``cache_dir``.
        classes: the expected class list (e.g. from a checkpoint); it must equal the shards' list. For
            WebDataset tars packed elsewhere (no JSON), the names of labels 0..C-1.
        shuffle_buffer: WebDataset only: samples mixed in each worker's shuffle buffer.
        cache_dir, max_cache_size: litdata's cache for remote chunks (local chunks are read in place).

    The other arguments are :class:`~vitkit.data.datamodule.ImageFolderDataModule`'s (``batch_size``,
    ``img_size``, the augmentations, Mixup / CutMix, ``mean`` / ``std`` / ``pretrained_cfg``,
    ``max_bad_fraction``, ``drop_last``, ``error_dir``) and mean the same. ``seed`` seeds the shuffle
    (litdata reshuffles every epoch from it) and the augmentations.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        batch_size: int = 64,
        img_size: int | None = None,
        seed: int = 0,
        num_workers: int | None = None,
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
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        pretrained_cfg: dict[str, Any] | None = None,
        max_bad_fraction: float = 0.01,
        classes: Sequence[str] | None = None,
        eval_batch_size: int | None = None,
        drop_last: bool = False,
        error_dir: str | os.PathLike[str] | None = None,
        shuffle_buffer: int = 1000,
        cache_dir: str | None = None,
        max_cache_size: int | str | None = None,
    ) -> None:
        super().__init__()
        # Saved as a str, not a Path: Lightning loads checkpoints with weights_only, which refuses Paths.
        root = os.fspath(root)
        self.save_hyperparameters(logger=False)  # logger=False: see ImageFolderDataModule
        self.root = root if "://" in root else os.path.expanduser(root)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.num_workers = auto_num_workers() if num_workers is None else num_workers
        self.max_bad_fraction = max_bad_fraction
        self.data_config: DataConfig = self._resolve_data_config(pretrained_cfg)
        self.decode_error_log = DecodeErrorLog(error_dir)
        self._expected_classes = list(classes) if classes is not None else None
        self._info: ShardInfo | None = None
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.test_dataset: Any = None

    # -- classes and splits ------------------------------------------------------------------

    @property
    def info(self) -> ShardInfo:
        """The shards' metadata (read on first use)."""
        if self._info is None:
            info = read_shard_info(self.root, self._expected_classes)
            if self._expected_classes is not None and self._expected_classes != info.classes:
                raise ValueError(
                    f"The expected classes {self._expected_classes[:10]} differ from those the shards in "
                    f"{self.root} were packed with, {info.classes[:10]}; the labels would not match."
                )
            self._info = info
            self.hparams["classes"] = list(info.classes)
            sizes = [info.splits[s].num_samples for s in ("train", "val") if s in info.splits]
            self.decode_error_log.total = sum(sizes)
        return self._info

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    # -- datasets ------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Open the splits; in DDP, after the process group exists, so each rank takes its own part."""
        self._adopt_model_preprocessing()
        train_tf, eval_tf = self._transforms()
        splits = self.info.splits
        if stage in (None, "fit", "validate"):
            self.train_dataset = self.open_split("train", train_tf, train=True)
            self.val_dataset = self.open_split("val", eval_tf) if "val" in splits else None
        if stage in (None, "test"):  # no separate test split: test on the validation split
            test = "test" if "test" in splits else "val" if "val" in splits else None
            self.test_dataset = self.open_split(test, eval_tf) if test else None

    def open_split(self, name: str, transform: Callable[[Any], Any] | None, train: bool = False) -> Any:
        """The dataset of one split, yielding (``transform(image)``, label); shuffled when ``train``."""
        split = self.info.splits[name]
        where = _join(self.root, split.path)
        decode = DecodeRecord(transform, self.decode_error_log, name, where)
        if self.info.format == "webdataset":
            return WebDatasetShards(
                [_join(where, tar) for tar, _ in split.shards],
                decode,
                shuffle=train,
                buffer_size=self.hparams.shuffle_buffer,
                counts=[n for _, n in split.shards] if split.num_samples else None,
            )
        # Training in DDP: equal shares (litdata's drop_last), so that no rank waits for another.
        drop_last = train and (self.hparams.drop_last or distributed_rank()[1] > 1)
        return open_litdata_shards(
            where,
            decode,
            shuffle=train,
            seed=self.seed,
            drop_last=drop_last,
            cache_dir=self.hparams.cache_dir,
            max_cache_size=self.hparams.max_cache_size,
        )

    # -- loaders -------------------------------------------------------------------------------

    def _loader(self, dataset: Any, train: bool, name: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"No {name} data: call setup() first, or pack a {name} split in {self.root}.")
        options = {
            "batch_size": self.batch_size if train else self.eval_batch_size,
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "collate_fn": collate_decoded,
            # seeds each worker's torch / random / NumPy RNGs (augmentations, WebDataset shuffling)
            "generator": torch.Generator().manual_seed(self.seed + (0 if train else 1)),
        }
        if isinstance(dataset, WebDatasetShards):
            return DataLoader(dataset, drop_last=train and self.hparams.drop_last, **options)
        return require("litdata").StreamingDataLoader(dataset, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, True, "training")

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None and self.train_dataset is not None:
            return []  # no validation split: Lightning skips validation
        return self._loader(self.val_dataset, False, "validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, False, "test")

    # -- checkpoints ---------------------------------------------------------------------------
    # state_dict (classes, preprocessing) is the shared one. The position in the epoch is
    # the training loader's state, which Lightning saves and restores itself.

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        classes = list(state_dict.get("classes", []))
        if classes and self._info is not None and classes != self.classes:
            raise ValueError(
                f"The checkpoint was trained on classes {classes[:10]}, but the shards in {self.root} "
                f"hold {self.classes[:10]}."
            )
        self._expected_classes = classes or self._expected_classes
