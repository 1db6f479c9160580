"""Training with Lightning: the :class:`ImageClassifier` module, callbacks and the CLI.

Public surface: :class:`ImageClassifier`, :func:`load_classifier`,
:func:`warmup_cosine`, :class:`NonFiniteLossError`, the callbacks, and :func:`cli_main`
(imported lazily because it pulls in the data package).
"""

from .callbacks import (
    EMA,
    AtomicCheckpointIO,
    ImagesPerSecond,
    PerRankRandomness,
    PredictionWriter,
    RNGStateCheckpoint,
    RunArtifacts,
)
from .module import ImageClassifier, NonFiniteLossError, load_classifier, warmup_cosine

__all__ = [
    "EMA",
    "AtomicCheckpointIO",
    "ImageClassifier",
    "ImagesPerSecond",
    "NonFiniteLossError",
    "PerRankRandomness",
    "PredictionWriter",
    "RNGStateCheckpoint",
    "RunArtifacts",
    "cli_main",
    "load_classifier",
    "warmup_cosine",
]


def __getattr__(name: str):
    if name == "cli_main":
        from .cli import cli_main

        return cli_main
    raise AttributeError(name)
