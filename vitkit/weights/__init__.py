"""Pretrained weights: read any ViT checkpoint, load it at any resolution, export it, fine-tune it.

Reading and loading:
    :func:`read_checkpoint` (files, folders, ``timm:``/``hf:``/``torchvision:`` hub names) gives a
    :class:`Checkpoint` in vitkit layout with its architecture options and preprocessing;
    :func:`load_pretrained` loads one into a model (new head, resampled positions and patch
    kernel) and returns a :class:`LoadReport`; :func:`model_from_checkpoint` builds the model
    the checkpoint describes. Mismatches raise :class:`CheckpointMismatchError`, variants vitkit
    cannot represent :class:`UnsupportedCheckpointError`.

Exporting: :func:`save` (``"vitkit"`` safetensors with metadata, ``"timm"`` and ``"hf"`` folders).

Fine-tuning: :func:`resample_patch_embed`, :func:`param_groups_lrd`, :func:`freeze`, :func:`unfreeze`.
"""

from .checkpoint import Checkpoint, infer_vit_options, read_checkpoint, read_state_dict
from .convert import UnsupportedCheckpointError
from .export import save
from .finetune import freeze, param_groups_lrd, unfreeze
from .loading import CheckpointMismatchError, LoadReport, load_pretrained, model_from_checkpoint
from .resample import resample_patch_embed

__all__ = [
    "Checkpoint",
    "CheckpointMismatchError",
    "LoadReport",
    "UnsupportedCheckpointError",
    "freeze",
    "infer_vit_options",
    "load_pretrained",
    "model_from_checkpoint",
    "param_groups_lrd",
    "read_checkpoint",
    "read_state_dict",
    "resample_patch_embed",
    "save",
    "unfreeze",
]
