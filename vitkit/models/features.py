"""A ViT as a backbone: images in, the feature maps of chosen blocks out.

``create_model(name, features_only=True, out_indices=(5, 8, 11))`` returns a
:class:`FeatureExtractor`, as ``timm.create_model(..., features_only=True)`` does for timm's ViTs:
a list with one (B, D, H/P, W/P) map per chosen block, for detection or segmentation heads. The
blocks after the last chosen one, the pool and the classifier are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .vision_transformer import VisionTransformer


class FeatureExtractor(nn.Module):
    """Images (B, C, H, W) -> [one (B, D, H/P, W/P) map per index in ``out_indices``].

    Args:
        model: the ViT; pruned in place (see :meth:`VisionTransformer.prune_intermediate_layers`).
        out_indices: an int n takes the last n blocks; a sequence, those blocks (negative counts
            from the end).
        output_fmt: ``'NCHW'`` maps or ``'NLC'`` (B, H/P·W/P, D) tokens.
        norm: apply the model's final norm to each output.

    ``feature_info`` is timm's :class:`~timm.models.FeatureInfo` (``.channels()``,
    ``.reduction()``, ``.module_name()``), so timm-based necks read it unchanged.
    """

    def __init__(
        self,
        model: VisionTransformer,
        out_indices: int | Sequence[int] = 3,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        norm: bool = False,
    ) -> None:
        from timm.models import FeatureInfo  # imported here: `import vitkit` stays free of timm

        super().__init__()
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        self.out_indices = tuple(model.prune_intermediate_layers(out_indices, prune_norm=not norm))
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)
        self.model = model
        self.output_fmt = output_fmt
        self.norm = norm
        self.pretrained_cfg = {
            k: v for k, v in model.pretrained_cfg.items() if k not in ("num_classes", "label_names")
        }

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            x, self.out_indices, norm=self.norm, output_fmt=self.output_fmt, intermediates_only=True
        )
