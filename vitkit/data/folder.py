"""ImageNet-style folders: find the splits, list the images, load them without crashing a run.

Layout::

    root/train/<class>/**/<image>         the class list comes from here, sorted
    root/val/<class>/**/<image>           or validation/ or test/ (or an explicit path, or a
                                          seeded held-out fraction of train when there is none)

A flat ``root/<class>/<image>`` layout is read as a training split with no validation folder.

Scanning skips hidden entries (``.DS_Store``, ``.ipynb_checkpoints``, ``__MACOSX``), files whose
extension is not an image one (in any case) and symlink loops. What cannot be right raises a
:class:`FolderLayoutError` naming the path: a split with no class folders, an empty class folder
(dropping it would shift every later label index) and a validation class the training split lacks.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .decode import DecodeError, load_rgb
from .errors import DecodeErrorLog
from .seeding import SeededBatches

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff",
        ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".avif",
    }
)  # fmt: skip
"""Extensions read as images, compared in lower case (``.JPG`` and ``.Jpeg`` count)."""

VAL_SPLIT_NAMES = ("val", "validation", "test")
"""Folder names searched, in this order, for the validation split."""

_HIDDEN_NAMES = frozenset({"__MACOSX", "@eaDir", "Thumbs.db", "desktop.ini"})


class FolderLayoutError(ValueError):
    """The folder does not have the layout of an image-classification dataset; the message says why."""


def is_hidden(name: str) -> bool:
    """Dot-files and dot-folders, and the litter macOS, Windows and NAS boxes leave behind."""
    return name.startswith(".") or name in _HIDDEN_NAMES


def is_image_file(name: str) -> bool:
    """Whether a file name has an image extension (any case) and is not hidden."""
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_files(directory: str) -> Iterator[str]:
    """Every non-hidden file under ``directory``, following symlinks but visiting each folder once."""
    seen: set[tuple[int, int]] = set()
    stack = [directory]
    while stack:
        folder = stack.pop()
        try:
            stat = os.stat(folder)
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in seen:  # a symlink loop, or one folder linked twice
            continue
        seen.add((stat.st_dev, stat.st_ino))
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            warnings.warn(f"Skipping unreadable folder {folder}: {error}", stacklevel=3)
            continue
        for entry in entries:
            if is_hidden(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=True):
                    yield entry.path
            except OSError:  # a broken link or a file that vanished
                continue


def list_images(directory: str | os.PathLike[str]) -> list[str]:
    """All image files under ``directory`` (recursively), sorted; a single image file is returned as is."""
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        return [directory]
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Image folder {directory} does not exist.")
    return sorted(p for p in _walk_files(directory) if is_image_file(os.path.basename(p)))


def _class_folders(root: str) -> list[str]:
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not is_hidden(e.name) and e.is_dir(follow_symlinks=True))


def scan_image_folder(
    root: str | os.PathLike[str], classes: Sequence[str] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """List ``root/<class>/**/<image>`` as (sorted class names, sorted (path, label) samples).

    Args:
        root: one split of the dataset, holding one folder per class.
        classes: the class list to label with (the training split's, when scanning a validation
            split). Every class folder under ``root`` must be in it; classes it has that ``root``
            lacks are allowed. ``None``: the class folders of ``root`` themselves.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        FolderLayoutError: no class folders, an empty class folder, or a class not in ``classes``.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Dataset folder {root} does not exist (or is not a folder).")
    names = _class_folders(root)
    if not names:
        loose = [n for n in os.listdir(root) if is_image_file(n)]
        hint = (
            f" It holds {len(loose)} loose image(s): put them in one sub-folder per class."
            if loose
            else " Expected one sub-folder per class: root/<class>/<image>."
        )
        raise FolderLayoutError(f"No class folders in {root}.{hint}")
    if classes is None:
        classes = names
    class_to_idx = {name: i for i, name in enumerate(classes)}
    unknown = [n for n in names if n not in class_to_idx]
    if unknown:
        raise FolderLayoutError(
            f"Class folder {os.path.join(root, unknown[0])} is not a class of the training split "
            f"({len(unknown)} such: {', '.join(unknown[:5])}). Training classes: {', '.join(classes[:10])}"
            f"{'...' if len(classes) > 10 else ''}. Add it to the training split or remove it."
        )
    samples: list[tuple[str, int]] = []
    for name in names:
        folder = os.path.join(root, name)
        files = list(_walk_files(folder))
        images = sorted(p for p in files if is_image_file(os.path.basename(p)))
        if not images:
            others = f" ({len(files)} non-image file(s) ignored)" if files else ""
            raise FolderLayoutError(
                f"Class folder {folder} contains no images{others}. An empty class would be dropped and "
                "shift the label index of every later class; add images or remove the folder."
            )
        label = class_to_idx[name]
        samples.extend((path, label) for path in images)
    return list(classes), samples


@dataclass(frozen=True)
class DatasetSplits:
    """Where the splits of a dataset are. ``val`` is None when a held-out fraction must stand in."""

    train: Path
    val: Path | None
    test: Path | None = None


def _child(root: Path, name: str) -> Path | None:
    """The sub-folder of ``root`` called ``name``, in any case."""
    exact = root / name
    if exact.is_dir():
        return exact
    for entry in root.iterdir():
        if entry.name.lower() == name and entry.is_dir():
            return entry
    return None


def _has_class_folders(folder: Path) -> bool:
    return any(not is_hidden(e.name) and e.is_dir() for e in folder.iterdir())


def find_splits(
    root: str | os.PathLike[str], val_split: str | os.PathLike[str] | None = None
) -> DatasetSplits:
    """Locate the training and validation folders of ``root``.

    Args:
        root: the dataset folder: ``root/train/<class>/...`` (or ``root/<class>/...``).
        val_split: the validation folder, as a name under ``root`` or a path; ``None`` searches
            ``val``, ``validation``, ``test`` (any case, in that order; a folder without class
            sub-folders, such as an unlabeled ``test/``, is passed over).

    Returns:
        the splits; ``val`` is None when there is no validation folder. ``test`` is a ``test/``
        folder with classes that is not the validation split.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder {root} does not exist (or is not a folder).")
    train = _child(root, "train")
    if val_split is not None:
        val = Path(val_split).expanduser()
        if not val.is_absolute():
            val = root / val
        if not val.is_dir():
            raise FileNotFoundError(f"Validation folder {val} (val_split={str(val_split)!r}) does not exist.")
    else:
        candidates = [c for c in (_child(root, n) for n in VAL_SPLIT_NAMES) if c is not None]
        val = next((c for c in candidates if _has_class_folders(c)), None)
        if train is None and candidates:
            raise FolderLayoutError(
                f"{root} has a {candidates[0].name}/ folder but no train/ folder. "
                f"Expected root/train/<class>/ and root/{candidates[0].name}/<class>/."
            )
    if train is None:
        train = root  # a flat root/<class>/<image> layout
    test = _child(root, "test")
    if test is not None and (test == val or not _has_class_folders(test)):
        test = None
    return DatasetSplits(train=train, val=val, test=test)


def split_holdout(
    samples: Sequence[tuple[str, int]], fraction: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Stratified, seeded hold-out: (train indices, val indices) into ``samples``, each sorted.

    Each class gives ``round(fraction · n_c)`` samples to validation, at least one (and at most
    ``n_c - 1``) when it has two or more. The same samples, seed and fraction give the same split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}.")
    rng = np.random.default_rng(seed)
    labels = np.array([label for _, label in samples], dtype=np.int64)
    val: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n = len(members)
        k = round(fraction * n)
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        val.extend(rng.permutation(members)[:k].tolist())
    val_set = set(val)
    return [i for i in range(len(samples)) if i not in val_set], sorted(val)


class ImageFolderDataset(SeededBatches, Dataset):
    """(image, label) pairs from a list of samples, decoded with :func:`load_rgb`.

    A file that fails to decode is recorded in ``error_log`` (shared by all DataLoader workers via
    files in one folder) and replaced by the next decodable sample in the list, so the index
    -> sample mapping stays deterministic and a corrupt JPEG never stops the epoch.

    Args:
        samples: (path, label) pairs, e.g. from :func:`scan_image_folder`.
        classes: the class names the labels index.
        transform: applied to the RGB PIL image (e.g. from :mod:`vitkit.data.transforms`).
        error_log: where decode failures are recorded; a fresh temporary one when omitted.
        split: a name recorded with each failure ("train", "val"...).
        max_tries: give up (RuntimeError) after this many consecutive undecodable files.
        augment_seed: in DataLoader workers, seed each batch's transforms from this and the batch's
            indices (:class:`~vitkit.data.seeding.SeededBatches`); None: the workers' own streams.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        transform: Callable[[Any], Any] | None = None,
        error_log: DecodeErrorLog | None = None,
        split: str = "train",
        max_tries: int = 50,
        augment_seed: int | None = None,
    ) -> None:
        if not samples:
            raise ValueError("ImageFolderDataset needs at least one sample.")
        self.samples = list(samples)
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.error_log = error_log if error_log is not None else DecodeErrorLog()
        self.split = split
        self.max_tries = max_tries
        self.augment_seed = augment_seed
        self._bad: set[int] = set()  # per process: known-bad indices are not decoded twice

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Any, int]:
        """The decoded (PIL image, label) at ``index`` or, if it is corrupt, at the next good index."""
        n = len(self.samples)
        for attempt in range(min(n, self.max_tries)):
            i = (index + attempt) % n
            if i in self._bad:
                continue
            path, label = self.samples[i]
            try:
                return load_rgb(path), label
            except DecodeError as error:
                self._bad.add(i)
                self.error_log.record(path, error, self.split)
        raise RuntimeError(
            f"{self.max_tries} consecutive files from {self.samples[index][0]} on could not be decoded; "
            f"see {self.error_log.directory} for the list."
        )

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class UnlabeledImageDataset(Dataset):
    """(image, path) for every image under a folder, for prediction. Corrupt files give ``None``.

    Use :func:`collate_skip_none` as the DataLoader's ``collate_fn``: it drops the ``None`` items,
    so a corrupt file is absent from the predictions (and listed in ``error_log``), never fatal.
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: Callable[[Any], Any] | None = None,
        error_log: DecodeErrorLog | None = None,
    ) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.error_log = error_log if error_log is not None else DecodeErrorLog()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], **kwargs: Any) -> UnlabeledImageDataset:
        paths = list_images(folder)
        if not paths:
            raise FolderLayoutError(f"No images found under {folder}.")
        return cls(paths, **kwargs)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, str] | None:
        path = self.paths[index]
        try:
            image = load_rgb(path)
        except DecodeError as error:
            self.error_log.record(path, error, "predict")
            return None
        return (self.transform(image) if self.transform is not None else image), path


def collate_skip_none(batch: list[Any]) -> Any:
    """``default_collate`` after dropping ``None`` items; an all-``None`` batch gives (empty, [])."""
    items = [item for item in batch if item is not None]
    if not items:
        return torch.empty(0), []
    return torch.utils.data.default_collate(items)
