"""A CSV logger that keeps the history of the run it resumes.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts. For a run resumed with
``--ckpt_path last`` in its own folder that would erase the metrics (and so the loss/accuracy curves)
of everything before the interruption. :class:`ResumableCSVLogger` keeps those rows and appends.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that, with ``keep_existing=True``, appends to an existing ``metrics.csv``.

    Args:
        keep_existing: keep the rows already in ``<log_dir>/metrics.csv`` (set by ``vitkit fit``
            when it resumes with ``--ckpt_path``); otherwise behave exactly like ``CSVLogger``.
        *args, **kwargs: as for :class:`lightning.pytorch.loggers.CSVLogger`.
    """

    def __init__(self, *args: Any, keep_existing: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_existing = keep_existing

    @property
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / _ExperimentWriter.NAME_METRICS_FILE
        kept = path.read_text() if self.keep_existing and path.is_file() else ""
        experiment = super().experiment  # creates the writer, which deletes metrics.csv
        if kept:
            path.write_text(kept)
            header = next(csv.reader(kept.splitlines()), [])
            experiment.metrics_keys = list(header)  # appended rows follow the file's column order
        return experiment
