"""Pack an image folder into streaming shards: litdata's optimized chunks (default) or WebDataset tars.

    info = pack_image_folder("data/imagenet", "shards/imagenet")     # vitkit data pack ROOT OUT
    dm = StreamingDataModule("shards/imagenet")                       # vitkit.data.streaming

Output::

    OUT/vitkit-shards.json    format, classes, samples per split, source folder, the files left out
    OUT/train/                litdata: index.json + chunk-*.bin   webdataset: shard-000000.tar, ...
    OUT/val/                  when the folder has a validation split (and OUT/test/ for a separate test/)

A record is the file's original encoded bytes (re-encoding would cost quality and space), its label
(the index of its class in the training folder's sorted class list, written to the JSON so that the
streaming side uses the same class map) and its path relative to the split folder (its key). Each
file is decoded once while packing (:func:`~vitkit.data.decode.load_rgb`); files that fail are left
out, counted and listed in the JSON, never crash the pack.

Why litdata by default: it is Lightning's own, maintained format. Its loader deals samples (not
whole files) out to every DDP rank and DataLoader worker, so ranks get equal shares, and its loader
state goes into Lightning checkpoints to resume mid-epoch. WebDataset tars (``<key>.jpg`` +
``<key>.cls``) are what timm and open_clip pipelines read and write: ``--format webdataset`` writes
them for interoperability, and :class:`~vitkit.data.streaming.WebDatasetShards` reads them.

litdata and webdataset are optional (``pip install 'vitkit[stream]'``) and imported when used.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

from .datamodule import available_cpus
from .decode import load_rgb
from .errors import DecodeErrorLog
from .folder import find_splits, scan_image_folder

SHARDS_INFO_FILE = "vitkit-shards.json"
"""The metadata file beside the shards."""

SHARD_FORMATS = ("litdata", "webdataset")

Record = dict[str, Any]
"""One packed sample: ``{"image": encoded bytes, "label": int, "key": "class/file.jpg"}``."""


def require(module: str) -> ModuleType:
    """Import an optional dependency of the streaming extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"Streaming shards need the {module!r} package: pip install 'vitkit[stream]'"
        ) from error


def parse_bytes(size: int | str) -> int:
    """``"64MB"`` -> 64_000_000 (kB / MB / GB are powers of 1000, KiB / MiB / GiB of 1024); ints pass."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?)b?\s*", str(size).lower())
    if match is None:
        raise ValueError(f"Cannot read {size!r} as a size; use e.g. 64MB, 256MiB or 1GB.")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " kmgt".index(prefix or " "))


class _NamedBytes(io.BytesIO):
    """In-memory file bytes that print as their file name, so decode errors say which file failed."""

    def __init__(self, data: bytes | memoryview, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return repr(self.name)


def decode_image_bytes(data: bytes | memoryview, name: str) -> Image.Image:
    """:func:`~vitkit.data.decode.load_rgb` on an encoded image in memory; errors name ``name``."""
    return load_rgb(_NamedBytes(data, name))


@dataclass
class SplitShards:
    """One packed split: its folder (relative to the shards root) and how many samples it holds.

    ``shards`` lists ``(tar file, samples)`` for WebDataset (litdata keeps that in its ``index.json``).
    """

    path: str
    num_samples: int
    source: str = ""
    shards: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class ShardInfo:
    """What ``OUT/vitkit-shards.json`` says: format, class list, splits, source and the skipped files."""

    format: str
    classes: list[str]
    splits: dict[str, SplitShards]
    source: str = ""
    skipped: list[dict[str, str]] = field(default_factory=list)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / SHARDS_INFO_FILE
        path.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, text: str) -> ShardInfo:
        data = json.loads(text)
        splits = {
            name: SplitShards(**{**split, "shards": [tuple(s) for s in split.get("shards", [])]})
            for name, split in data["splits"].items()
        }
        return cls(**{**data, "splits": splits})


class _RecordReader:
    """(path, label) -> a :data:`Record`, or None for a file that cannot be read or decoded.

    A plain picklable object, so that pack workers (forked or spawned) can run it; failures go to a
    :class:`~vitkit.data.errors.DecodeErrorLog` folder that every process appends to.
    """

    def __init__(self, split_folder: str, error_dir: str, split: str, verify: bool) -> None:
        self.split_folder = split_folder
        self.error_dir = error_dir
        self.split = split
        self.verify = verify

    def __call__(self, sample: tuple[str, int]) -> Record | None:
        path, label = sample
        try:
            with open(path, "rb") as file:
                data = file.read()
            if self.verify:
                decode_image_bytes(data, path)
        except OSError as error:  # DecodeError is an OSError
            DecodeErrorLog(self.error_dir).record(path, error, self.split)
            return None
        key = os.path.relpath(path, self.split_folder).replace(os.sep, "/")
        return {"image": data, "label": int(label), "key": key}


def default_start_method() -> str:
    """``fork`` on Linux: pack workers start in milliseconds instead of re-importing torch (seconds
    each); they only read files and run Pillow. ``spawn`` elsewhere."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def pack_image_folder(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: str = "litdata",
    val_split: str | None = None,
    chunk_bytes: int | str = "64MB",
    num_workers: int | None = None,
    verify: bool = True,
    overwrite: bool = False,
    start_method: str | None = None,
) -> ShardInfo:
    """Write the splits of an image folder as streaming shards in ``out`` (see the module docstring).

    Args:
        root: an image folder: ``root/train/<class>/*`` plus ``val/``, as
            :func:`~vitkit.data.folder.find_splits` finds them.
        out: the shards folder; it may exist, but must not hold shards unless ``overwrite``.
        format: ``"litdata"`` or ``"webdataset"``.
        val_split: the validation folder, as for :func:`~vitkit.data.folder.find_splits`.
        chunk_bytes: the size of a litdata chunk or a tar shard (``"64MB"``, ``"1GiB"`` or bytes).
        num_workers: processes reading and verifying files; default: one per available CPU.
        verify: decode every file and leave out those that fail (False: trust the files, faster).
        overwrite: replace the shards already in ``out`` (only those: other files are left alone).
        start_method: for the worker processes; default :func:`default_start_method`.

    Returns:
        the :class:`ShardInfo` also written to ``out/vitkit-shards.json``.
    """
    if format not in SHARD_FORMATS:
        raise ValueError(f"Unknown shard format {format!r}; use one of {', '.join(SHARD_FORMATS)}.")
    require(format)
    root = Path(root).expanduser()
    splits = find_splits(root, val_split)
    classes, train = scan_image_folder(splits.train)
    named = {"train": (splits.train, train)}
    for name, folder in (("val", splits.val), ("test", splits.test)):
        if folder is not None:
            named[name] = (folder, scan_image_folder(folder, classes=classes)[1])
    out = Path(out).expanduser()
    _clear_output(out, overwrite)
    workers = available_cpus() if num_workers is None else max(1, num_workers)
    writer = _ShardWriter(parse_bytes(chunk_bytes), workers, start_method or default_start_method())
    write = writer.litdata if format == "litdata" else writer.webdataset
    error_log = DecodeErrorLog()
    info = ShardInfo(format=format, classes=classes, splits={}, source=str(root.resolve()))
    for name, (folder, samples) in named.items():
        reader = _RecordReader(str(folder), str(error_log.directory), name, verify)
        split = write(samples, out / name, reader)
        split.source = str(folder.resolve())
        info.splits[name] = split
    info.skipped = list(error_log.read().values())
    info.save(out)  # last: a folder without it holds an unfinished pack
    return info


def _clear_output(out: Path, overwrite: bool) -> None:
    """Make ``out``; with ``overwrite``, remove the shards a previous pack left there (and only those)."""
    ours = [out / SHARDS_INFO_FILE, *(out / name for name in ("train", "val", "test"))]
    existing = [path for path in ours if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds shards ({', '.join(p.name for p in existing)}); "
            "pass overwrite=True (--overwrite) to replace them."
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _restore_start_method() -> Iterator[None]:
    """litdata's ``optimize`` sets the global multiprocessing start method; put the caller's back."""
    previous = multiprocessing.get_start_method(allow_none=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(previous, force=True)


def webdataset_sample(record: Record) -> dict[str, Any]:
    """A :data:`Record` as a WebDataset sample: ``<key>.<ext>`` (the original bytes) + ``<key>.cls``.

    WebDataset splits a member name at the first dot of its base name, so dots in the key become ``_``.
    """
    stem, ext = os.path.splitext(record["key"])
    return {
        "__key__": stem.replace(".", "_"),
        (ext.lstrip(".").lower() or "img"): bytes(record["image"]),
        "cls": str(record["label"]).encode(),
    }


@dataclass
class _ShardWriter:
    """Writes one split's records as shards of about ``chunk_bytes``, reading in ``num_workers`` processes."""

    chunk_bytes: int
    num_workers: int
    start_method: str

    def litdata(self, samples: Sequence[tuple[str, int]], folder: Path, reader: _RecordReader) -> SplitShards:
        litdata = require("litdata")
        with _restore_start_method():
            litdata.optimize(
                fn=reader,  # None for a bad file: litdata writes nothing for it
                inputs=list(samples),
                output_dir=str(folder),
                chunk_bytes=self.chunk_bytes,
                num_workers=min(self.num_workers, len(samples)),
                start_method=self.start_method,
                mode="overwrite",
                verbose=False,
            )
        index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        return SplitShards(folder.name, num_samples=sum(chunk["chunk_size"] for chunk in index["chunks"]))

    def webdataset(
        self, samples: Sequence[tuple[str, int]], folder: Path, reader: _RecordReader
    ) -> SplitShards:
        """Tar shards ``shard-000000.tar``...; a shard closes once it holds ``chunk_bytes`` of images."""
        wds = require("webdataset")
        folder.mkdir(parents=True)
        shards: list[list[Any]] = []  # [tar file, samples]; the last one is open
        writer, size = None, 0
        for record in self._read(reader, samples):
            if record is None:
                continue
            if writer is None or size >= self.chunk_bytes:
                if writer is not None:
                    writer.close()
                shards.append([f"shard-{len(shards):06d}.tar", 0])
                writer, size = wds.TarWriter(str(folder / shards[-1][0])), 0
            writer.write(webdataset_sample(record))
            size += len(record["image"])
            shards[-1][1] += 1
        if writer is not None:
            writer.close()
        return SplitShards(
            folder.name, num_samples=sum(n for _, n in shards), shards=[(f, n) for f, n in shards]
        )

    def _read(
        self, reader: Callable[[tuple[str, int]], Record | None], samples: Sequence[tuple[str, int]]
    ) -> Iterator[Record | None]:
        """``reader`` over ``samples``, in order."""
        if self.num_workers <= 1:
            yield from map(reader, samples)
            return
        chunksize = max(1, min(256, len(samples) // (4 * self.num_workers)))
        with multiprocessing.get_context(self.start_method).Pool(self.num_workers) as pool:
            yield from pool.imap(reader, samples, chunksize=chunksize)
