"""Pretrained weights: read checkpoint files, check them against a model, load them.

Public surface: :func:`load_pretrained`, :func:`read_state_dict`, :func:`infer_vit_options`,
:class:`LoadReport` and :class:`CheckpointMismatchError`.
"""

from .loading import (
    CheckpointMismatchError,
    LoadReport,
    infer_vit_options,
    load_pretrained,
    read_state_dict,
)

__all__ = ["CheckpointMismatchError", "LoadReport", "infer_vit_options", "load_pretrained", "read_state_dict"]
