"""See what the attention sees: capture, explain, plot and measure Vision Transformer saliency.

* :mod:`~vitkit.explain.capture` — :func:`attention_maps`, :class:`AttentionRecorder`,
  :class:`TokenLayout`: the exact attention weights of chosen layers, and their gradients.
* :mod:`~vitkit.explain.methods` — raw attention, rollout, gradient rollout, relevance
  (Chefer et al.) and input gradients, each ``(model, images, ...) -> (B, grid_h, grid_w)``.
* :mod:`~vitkit.explain.plot` — overlays, grids, token-to-token matrices, attention graphs.
* :mod:`~vitkit.explain.metrics` — deletion/insertion AUC, pointing game, mass in the object,
  and the model-randomisation sanity test.
"""

from .capture import AttentionRecorder, TokenLayout, attention_maps, token_layout
from .methods import (
    METHODS,
    explain,
    gradient_rollout,
    input_gradient,
    raw_attention,
    relevance,
    rollout,
)

__all__ = [
    "METHODS",
    "AttentionRecorder",
    "TokenLayout",
    "attention_maps",
    "explain",
    "gradient_rollout",
    "input_gradient",
    "raw_attention",
    "relevance",
    "rollout",
    "token_layout",
]
