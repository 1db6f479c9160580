"""The fast path for small datasets: decode once into a uint8 tensor, augment whole batches as tensors.

On a laptop, JPEG decoding (not the model) bounds a CIFAR-10 epoch. Here every image of a split is
decoded once, resized (short side) and centre-cropped to a square ``size`` and stored as

    images: uint8 (N, 3, size, size)     labels: int64 (N,)     source_index: int64 (N,)

in memory and, optionally, in a ``.safetensors`` file keyed by the file list (paths, sizes,
modification times), the size and the interpolation, so a changed dataset is never served stale.

Batches are augmented as tensors by the DataLoader's ``collate_fn``: :class:`BatchTrainTransform`
draws one random-resized-crop box per image and resamples them all with one
``torchvision.ops.roi_align`` call (bilinear, averaging several samples per output pixel when
shrinking), flips, normalises and erases in batch form; :class:`BatchEvalTransform` resizes and
centre-crops the batch with torchvision's functional ops. With ``batched=True`` the auto-augment
policy, colour jitter and erasing are batched too (:mod:`vitkit.data.batch_augment`), so that
:meth:`BatchTrainTransform.augment` can run on the GPU after the loader has only stacked the uint8
images (:func:`stack_batch`; the data modules' ``augment_on="device"``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .batch_augment import (
    BatchRandAugment,
    batch_color_jitter,
    batch_random_erasing,
    check_erase_mode,
    device_constant,
    random_resized_crop_boxes,
)
from .decode import DecodeError, load_rgb
from .errors import DecodeErrorLog
from .seeding import SeededBatches
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_auto_augment,
    build_color_jitter,
    interpolation_mode,
)

CACHE_FORMAT_VERSION = "1"


def default_cache_dir() -> Path:
    """``$VITKIT_CACHE_DIR`` or ``~/.cache/vitkit/tensor-cache``."""
    return Path(os.environ.get("VITKIT_CACHE_DIR", Path.home() / ".cache" / "vitkit" / "tensor-cache"))


@dataclass
class TensorCache:
    """A decoded split: ``images`` uint8 (N, 3, S, S), ``labels`` int64 (N,), and ``source_index``
    (N,), each image's index in the sample list it was built from (corrupt files are left out and
    listed in ``bad``)."""

    images: torch.Tensor
    labels: torch.Tensor
    source_index: torch.Tensor
    classes: list[str]
    bad: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: str | os.PathLike[str], key: str = "") -> None:
        """Write a ``.safetensors`` file (atomically: a partial file never has the final name)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format_version": CACHE_FORMAT_VERSION,
            "key": key,
            "classes": json.dumps(self.classes),
            "bad": json.dumps(self.bad),
        }
        tensors = {"images": self.images, "labels": self.labels, "source_index": self.source_index}
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], key: str | None = None) -> TensorCache:
        """Read a file written by :meth:`save`; with ``key``, raise ValueError if built for other data."""
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            if metadata.get("format_version") != CACHE_FORMAT_VERSION:
                raise ValueError(f"{path} is not a vitkit tensor cache of format {CACHE_FORMAT_VERSION}.")
            if key is not None and metadata.get("key") != key:
                raise ValueError(f"{path} was built from other files or settings (cache key mismatch).")
            tensors = {name: file.get_tensor(name) for name in ("images", "labels", "source_index")}
        return cls(
            **tensors, classes=json.loads(metadata["classes"]), bad=json.loads(metadata.get("bad", "[]"))
        )


def cache_key(samples: Sequence[tuple[str, int]], size: int, interpolation: str) -> str:
    """SHA-256 over the format version, size, interpolation and each file's (path, label, bytes, mtime)."""
    digest = hashlib.sha256(f"{CACHE_FORMAT_VERSION}|{size}|{interpolation}".encode())
    for path, label in samples:
        try:
            stat = os.stat(path)
            signature = f"{stat.st_size}|{stat.st_mtime_ns}"
        except OSError:
            signature = "missing"
        digest.update(f"\n{os.path.abspath(path)}|{label}|{signature}".encode())
    return digest.hexdigest()


def check_cache_fits(num_images: int, size: int, fraction_of_ram: float = 0.5) -> None:
    """Raise MemoryError when N·3·S·S bytes exceed ``fraction_of_ram`` of physical memory."""
    needed = num_images * 3 * size * size
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if needed > fraction_of_ram * ram:
        raise MemoryError(
            f"A tensor cache of {num_images} images at {size}x{size} needs {needed / 2**30:.1f} GiB, "
            f"more than {fraction_of_ram:.0%} of this machine's {ram / 2**30:.1f} GiB. Use cache=False "
            "(decode on the fly) or a smaller cache_size."
        )


class _DecodeForCache(Dataset):
    def __init__(self, samples: Sequence[tuple[str, int]], size: int, interpolation: str) -> None:
        self.samples = samples
        self.resize = v2.Compose(
            [
                v2.Resize(size, interpolation=interpolation_mode(interpolation), antialias=True),
                v2.CenterCrop(size),
                v2.PILToTensor(),
            ]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        path = self.samples[index][0]
        try:
            return index, self.resize(load_rgb(path)).as_subclass(torch.Tensor), ""
        except DecodeError as error:
            return index, None, str(error)


def _stack_decoded(
    batch: list[tuple[int, torch.Tensor | None, str]],
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """A batch of decoded images as one (N, 3, S, S) tensor and their indices, plus the
    (index, error) pairs of the files that failed: one tensor crosses from a loader worker to the
    main process per batch, not one per image (each costs a shared-memory segment)."""
    ok = [(index, image) for index, image, _ in batch if image is not None]
    failed = [(index, error) for index, image, error in batch if image is None]
    indices = torch.tensor([index for index, _ in ok], dtype=torch.int64)
    images = torch.stack([image for _, image in ok]) if ok else torch.empty(0, dtype=torch.uint8)
    return indices, images, failed


def build_tensor_cache(
    samples: Sequence[tuple[str, int]],
    classes: Sequence[str],
    size: int,
    *,
    interpolation: str = "bicubic",
    num_workers: int = 0,
    error_log: DecodeErrorLog | None = None,
    split: str = "train",
) -> TensorCache:
    """Decode ``samples`` (in parallel over ``num_workers`` processes) into a :class:`TensorCache`.

    Each image's short side is resized to ``size`` and the centre ``size`` x ``size`` square kept.
    Undecodable files are left out, recorded in ``error_log`` and listed in ``TensorCache.bad``.
    """
    check_cache_fits(len(samples), size)
    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    ok = torch.zeros(len(samples), dtype=torch.bool)
    bad: list[str] = []
    loader = DataLoader(
        _DecodeForCache(samples, size, interpolation),
        batch_size=128,
        num_workers=num_workers,
        collate_fn=_stack_decoded,
        # its own generator: a loader draws its workers' seed from the global one otherwise, and a
        # run that builds a disk cache would then train with other random numbers than one that loads it
        generator=torch.Generator(),
    )
    for indices, decoded, failed in loader:
        if len(indices):
            images[indices] = decoded
            ok[indices] = True
        for index, error in failed:
            bad.append(samples[index][0])
            if error_log is not None:
                error_log.record(samples[index][0], error, split)
    keep = ok.nonzero().squeeze(1)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return TensorCache(images[keep].clone(), labels[keep], keep, list(classes), sorted(bad))


def load_or_build_tensor_cache(
    samples: Sequence[tuple[str, int]],
    classes: Sequence[str],
    size: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    name: str = "data",
    interpolation: str = "bicubic",
    num_workers: int = 0,
    error_log: DecodeErrorLog | None = None,
    split: str = "train",
    verbose: bool = True,
) -> TensorCache:
    """:func:`build_tensor_cache`, reusing / writing ``<cache_dir>/<name>-<size>px-<key>.safetensors``.

    ``cache_dir=None`` keeps the cache in memory only. Files remembered as corrupt are re-recorded
    in ``error_log`` when a cache is loaded, so they are still reported.
    """
    start = time.perf_counter()
    key = cache_key(samples, size, interpolation)
    path = (
        None
        if cache_dir is None
        else Path(cache_dir).expanduser() / f"{name}-{size}px-{key[:16]}.safetensors"
    )
    if path is not None and path.is_file():
        try:
            cache = TensorCache.load(path, key=key)
        except (ValueError, OSError) as error:
            if verbose:
                print(f"vitkit: rebuilding the tensor cache {path} ({error})")
        else:
            if error_log is not None:
                for bad in cache.bad:
                    error_log.record(bad, "undecodable when the tensor cache was built", split)
            if verbose:
                print(
                    f"vitkit: loaded {len(cache)} cached images from {path} "
                    f"in {time.perf_counter() - start:.1f} s"
                )
            return cache
    cache = build_tensor_cache(
        samples,
        classes,
        size,
        interpolation=interpolation,
        num_workers=num_workers,
        error_log=error_log,
        split=split,
    )
    if verbose:
        print(
            f"vitkit: decoded {len(cache)} {split} images into a {size}x{size} uint8 cache "
            f"({cache.images.numel() / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s"
        )
    if path is not None:
        cache.save(path, key=key)
        if verbose:
            print(f"vitkit: wrote {path}")
    return cache


class CachedTensorDataset(SeededBatches, Dataset):
    """(uint8 image (3, S, S), label) from a :class:`TensorCache`, optionally a subset of its positions.

    Meant for a DataLoader whose ``collate_fn`` is :class:`BatchTrainTransform` or
    :class:`BatchEvalTransform`; a per-image ``transform`` (e.g. a v2 pipeline) also works. With
    ``augment_seed``, each batch read in a DataLoader worker is augmented from generators seeded by
    it and the batch's indices (:class:`~vitkit.data.seeding.SeededBatches`).
    """

    def __init__(
        self,
        cache: TensorCache,
        positions: Sequence[int] | torch.Tensor | None = None,
        transform: Callable[[Any], Any] | None = None,
        augment_seed: int | None = None,
    ) -> None:
        self.augment_seed = augment_seed
        self.cache = cache
        self.positions = None if positions is None else torch.as_tensor(positions, dtype=torch.int64)
        self.classes = cache.classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.cache) if self.positions is None else len(self.positions)

    @property
    def targets(self) -> list[int]:
        labels = self.cache.labels if self.positions is None else self.cache.labels[self.positions]
        return labels.tolist()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = index if self.positions is None else int(self.positions[index])
        image, label = self.cache.images[i], int(self.cache.labels[i])
        return (self.transform(image) if self.transform is not None else image), label


@functools.lru_cache(maxsize=64)
def _normalize_constants(
    mean: tuple[float, ...], std: tuple[float, ...], scale: float
) -> tuple[list[float], list[float]]:
    """(-mean / std, 1 / (scale · std)) in float32 arithmetic, as they always were (the same bits,
    the same runs); computed once per normalisation, not per batch."""
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    return (-mean_t / std_t).tolist(), (1.0 / (scale * std_t)).tolist()


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], scale: float) -> torch.Tensor:
    """(x / scale - mean) / std per channel, in one multiply-add."""
    x = x.float()
    shift, factor = _normalize_constants(tuple(mean), tuple(std), scale)
    # copied to the device once
    shift_t, factor_t = (device_constant(c, like=x).view(1, 3, 1, 1) for c in (shift, factor))
    return torch.addcmul(shift_t, x, factor_t)


def stack_batch(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``collate_fn`` that only stacks: list of (uint8 image, label) -> (uint8 (B, 3, S, S), labels (B,)).

    What the loader workers do when the augmentation runs on the device (see
    :meth:`BatchTrainTransform.augment`): a quarter of the bytes of a float batch cross to the GPU.
    """
    images = torch.stack([image for image, _ in batch])
    labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
    return images, labels


class BatchTrainTransform:
    """``collate_fn`` for training on cached uint8 images: list of (image, label) -> (x, labels).

    x = normalise(erase(jitter(augment(flip(random_resized_crop(images)))))), float32 (B, 3, H, W).
    Crops and flips are per image but computed in batch form. An auto-augment policy, colour jitter
    and random erasing run per image with torchvision v2 / timm ops by default; with
    ``batched=True`` they run as batched tensor ops (:mod:`vitkit.data.batch_augment`: per-image
    draws, no loop over images), which is what lets :meth:`augment` run on a GPU; ``select`` says
    how those ops give each image its own result ("auto": without any host read on a GPU, only
    the drawn work on a CPU; see :class:`~vitkit.data.batch_augment.BatchRandAugment`).
    Random numbers come from the torch / Python RNGs of the process (in a DataLoader worker of the
    data modules, seeded per batch: :mod:`vitkit.data.seeding`), on the device of the images.
    """

    def __init__(
        self,
        img_size: int,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = None,
        color_jitter: float | Sequence[float] = 0.0,
        re_prob: float = 0.0,
        re_mode: str = "pixel",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        batched: bool = False,
        select: str = "auto",
    ) -> None:
        self.img_size = img_size
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.mean, self.std = tuple(mean), tuple(std)
        self.batched = batched
        self.per_image = self.policy = None
        self.jitter: v2.ColorJitter | None = None
        self.erase: RandomErasing | None = None
        self.re_prob, self.re_mode, self.select = re_prob, re_mode, select
        if batched:
            if auto_augment is not None and auto_augment.lower() not in ("", "none"):
                fill = tuple(min(255.0, round(255 * m)) for m in mean)
                self.policy = BatchRandAugment.from_name(auto_augment, fill=fill, select=select)
            self.jitter = build_color_jitter(color_jitter)  # its ranges, drawn per image
            if self.jitter is not None and self.jitter.hue is not None:
                raise ValueError(
                    f"color_jitter {tuple(color_jitter)} asks for hue jitter, which has no batched "
                    "version; drop the hue or augment per image in the loader workers (augment_on='workers')."
                )
            if re_prob > 0:
                check_erase_mode(re_mode)
            return
        steps = build_auto_augment(auto_augment, img_size, mean, interpolation)
        jitter = build_color_jitter(color_jitter)
        if jitter is not None:
            steps.append(jitter)
        self.per_image = v2.Compose([*steps, v2.PILToTensor()]) if steps else None
        self.erase = RandomErasing(re_prob, mode=re_mode, device="cpu") if re_prob > 0 else None

    def __call__(self, batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = stack_batch(batch)
        return self.augment(images), labels

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) on any device -> augmented, normalised float32 (B, 3, img_size, img_size)."""
        n, _, height, width = images.shape
        device = images.device
        boxes = random_resized_crop_boxes(n, height, width, self.scale, self.ratio, device=device)
        rois = torch.cat([torch.arange(n, dtype=torch.float32, device=device).unsqueeze(1), boxes], dim=1)
        x = roi_align(images.float(), rois, (self.img_size, self.img_size), sampling_ratio=-1, aligned=True)
        if self.hflip > 0:
            flip = torch.rand(n, device=device) < self.hflip
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        if self.policy is not None:
            x = self.policy(x)
        if self.jitter is not None:
            x = batch_color_jitter(x, self.jitter.brightness, self.jitter.contrast, self.jitter.saturation)
        if self.per_image is not None:
            x = x.round_().clamp_(0, 255).to(torch.uint8)
            x = torch.stack([self.per_image(image).as_subclass(torch.Tensor) for image in x])
        x = _normalize(x, self.mean, self.std, 255.0)
        if self.erase is not None:
            x = self.erase(x)
        elif self.batched and self.re_prob > 0:
            x = batch_random_erasing(x, self.re_prob, self.re_mode, select=self.select)
        return x


class BatchEvalTransform:
    """``collate_fn`` for evaluating on cached uint8 images: resize to ``floor(img_size / crop_pct)``
    (skipped when the cache already has that size), centre-crop ``img_size``, normalise."""

    def __init__(
        self,
        img_size: int,
        *,
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
    ) -> None:
        self.img_size = img_size
        self.resize_size = math.floor(img_size / crop_pct)
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = interpolation_mode(interpolation)

    def __call__(self, batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = stack_batch(batch)
        if min(images.shape[-2:]) != self.resize_size:
            images = TF.resize(images, self.resize_size, interpolation=self.interpolation, antialias=True)
        images = TF.center_crop(images, [self.img_size, self.img_size])
        return _normalize(images, self.mean, self.std, 255.0), labels
