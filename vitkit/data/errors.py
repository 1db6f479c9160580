"""Count and list the files that fail to decode, across DataLoader workers, and stop a hopeless run.

Workers are separate processes, so a Python list in the dataset would stay in each worker. Instead
each process appends to its own file ``errors-<pid>.jsonl`` in one shared folder (one short line per
bad file, written and closed at once), and :class:`DecodeErrorMonitor` reads the folder from the
main process. Files are per process, so there are no interleaved writes and no locks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any

import lightning as L
import torch


def _remove_if_owner(directory: str, owner_pid: int) -> None:
    # Forked workers inherit this finaliser; only the process that made the folder deletes it.
    if os.getpid() == owner_pid:
        shutil.rmtree(directory, ignore_errors=True)


class DecodeErrorLog:
    """A folder of per-process ``.jsonl`` files listing undecodable images. Picklable (just a path).

    Args:
        directory: where to keep the lists; a temporary folder (removed when this object is garbage
            collected in the process that created it) when omitted.
        total: how many files the datasets that write here hold: the denominator of :attr:`fraction`.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, total: int = 0) -> None:
        if directory is None:
            directory = tempfile.mkdtemp(prefix="vitkit-decode-errors-")
            self._finalizer = weakref.finalize(self, _remove_if_owner, directory, os.getpid())
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.total = total

    def record(self, path: str | os.PathLike[str], error: BaseException | str, split: str = "") -> None:
        """Append one failure (from any process)."""
        line = json.dumps({"path": os.fspath(path), "split": split, "error": str(error)})
        with open(self.directory / f"errors-{os.getpid()}.jsonl", "a", encoding="utf-8") as file:
            file.write(line + "\n")

    def read(self) -> dict[str, dict[str, str]]:
        """Every failed file so far, once each: path -> {"path", "split", "error"}, sorted by path."""
        found: dict[str, dict[str, str]] = {}
        for part in sorted(self.directory.glob("errors-*.jsonl")):
            for line in part.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line being written right now
                    continue
                found.setdefault(entry["path"], entry)
        return dict(sorted(found.items()))

    def __len__(self) -> int:
        return len(self.read())

    @property
    def fraction(self) -> float:
        """Failed files / :attr:`total` (0 when the total is unknown)."""
        return len(self) / self.total if self.total else 0.0

    def write_report(self, path: str | os.PathLike[str]) -> Path:
        """Write the list as ``path<TAB>split<TAB>error`` lines, one per bad file; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"{e['path']}\t{e['split']}\t{e['error']}" for e in self.read().values()]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    def clear(self) -> None:
        for part in self.directory.glob("errors-*.jsonl"):
            part.unlink(missing_ok=True)


class TooManyDecodeErrors(ValueError):
    """More than ``max_bad_fraction`` of the dataset (and more than ``min_bad_files``) could not be decoded.

    A ``ValueError``: bad input, which the ``vitkit`` command reports in one line."""


class DecodeErrorMonitor(L.Callback):
    """Warn about, list and (above a threshold) stop on undecodable images.

    At the end of each training epoch: if any file failed, write the list to
    ``<log dir>/decode_errors.txt`` (``trainer.log_dir``, else ``default_root_dir``) and warn with the
    count and that path. If more than ``max_bad_fraction`` of the files failed, and more than
    ``min_bad_files`` of them (so that a few bad files in a small dataset never stop a run), raise
    :class:`TooManyDecodeErrors`; this is also checked every ``check_every_n_batches`` training
    batches (single process), since the count only grows, so a broken dataset stops early.

    The log comes from ``error_log`` or from the datamodule's ``decode_error_log`` attribute, the
    threshold from ``max_bad_fraction`` or the datamodule's attribute of that name (default 0.01).
    """

    def __init__(
        self,
        max_bad_fraction: float | None = None,
        error_log: DecodeErrorLog | None = None,
        filename: str = "decode_errors.txt",
        check_every_n_batches: int = 100,
        min_bad_files: int = 10,
    ) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.min_bad_files = min_bad_files
        self.error_log = error_log
        self.filename = filename
        self.check_every_n_batches = check_every_n_batches
        self._reported = 0

    def _log(self, trainer: L.Trainer) -> DecodeErrorLog | None:
        return self.error_log or getattr(trainer.datamodule, "decode_error_log", None)

    def _threshold(self, trainer: L.Trainer) -> float:
        if self.max_bad_fraction is not None:
            return self.max_bad_fraction
        value = getattr(trainer.datamodule, "max_bad_fraction", None)
        return 0.01 if value is None else float(value)

    def report_path(self, trainer: L.Trainer) -> Path:
        folder = trainer.log_dir or trainer.default_root_dir
        name = self.filename
        if trainer.world_size > 1 and trainer.global_rank > 0:
            stem, dot, ext = name.rpartition(".")
            name = (
                f"{stem}.rank{trainer.global_rank}{dot}{ext}" if dot else f"{name}.rank{trainer.global_rank}"
            )
        return Path(folder) / name

    def _too_many(self, trainer: L.Trainer, bad: int, total: int) -> bool:
        return bool(total) and bad > self._threshold(trainer) * total and bad > self.min_bad_files

    def _check(self, trainer: L.Trainer, bad: int, total: int, report: Path | None) -> None:
        limit = self._threshold(trainer)
        if self._too_many(trainer, bad, total):
            where = f" The list is in {report}." if report else ""
            raise TooManyDecodeErrors(
                f"{bad} of {total} images ({bad / total:.2%}) could not be decoded, more than "
                f"max_bad_fraction={limit:g}.{where} Fix or remove those files, or raise max_bad_fraction."
            )

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        batch_idx = kwargs.get("batch_idx", args[-1] if args else 0)
        log = self._log(trainer)
        if log is None or trainer.world_size > 1 or (batch_idx + 1) % self.check_every_n_batches:
            return
        bad = len(log)
        if self._too_many(trainer, bad, log.total):
            self._check(trainer, bad, log.total, log.write_report(self.report_path(trainer)))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log = self._log(trainer)
        if log is None:
            return
        bad, total = len(log), log.total
        report = log.write_report(self.report_path(trainer)) if bad else None
        if trainer.world_size > 1:  # ranks read distinct shards of the same files: add their counts
            count = torch.tensor(float(bad), dtype=torch.float64, device=pl_module.device)
            bad = int(trainer.strategy.reduce(count, reduce_op="sum").item())
        if bad > self._reported:
            warnings.warn(
                f"{bad} image(s) could not be decoded and were replaced by other samples; list in {report}.",
                stacklevel=2,
            )
            self._reported = bad
        self._check(trainer, bad, total, report)
