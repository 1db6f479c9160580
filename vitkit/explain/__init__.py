"""See what the attention sees: capture, explain, plot and measure Vision Transformer saliency.

Explicit attention is what a layer's weights ``A = softmax(q kᵀ / √d)`` say each token reads;
implicit attention is what the prediction is sensitive to (gradients). Both are here:

* :mod:`~vitkit.explain.capture` — :func:`attention_maps`, :class:`AttentionRecorder`,
  :class:`TokenLayout`: the exact attention of chosen layers (and its gradients), read with
  hooks from vitkit, timm, Hugging Face and torchvision ViTs, with fused kernels left on elsewhere.
* :mod:`~vitkit.explain.methods` — :func:`raw_attention`, :func:`rollout`,
  :func:`gradient_rollout`, :func:`relevance` (Chefer et al.) and :func:`input_gradient`, each
  ``(model, images, ...) -> (B, grid_h, grid_w)``, batched, for any token layout.
* :mod:`~vitkit.explain.plot` — :func:`overlay`, grids, token-to-token matrices, attention graphs.
* :mod:`~vitkit.explain.metrics` — deletion/insertion AUC, pointing game, mass in the object,
  and the model-randomisation sanity test.
* :class:`~vitkit.explain.callback.ExplanationCallback` — overlays during Lightning training.

Example::

    from vitkit.explain import rollout, relevance, overlay
    maps = relevance(model, images)              # (B, grid_h, grid_w), predicted classes
    picture = overlay(images[0], maps[0], mean=mean, std=std)   # (H, W, 3) uint8
"""

from typing import Any

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
from .metrics import (
    deletion,
    evaluate_saliency,
    insertion,
    mass_in_mask,
    model_randomization_test,
    pointing_game,
    random_saliency,
    spearman_correlation,
)

__all__ = [
    "METHODS",
    "AttentionRecorder",
    "ExplanationCallback",
    "TokenLayout",
    "attention_maps",
    "deletion",
    "evaluate_saliency",
    "explain",
    "gradient_rollout",
    "input_gradient",
    "insertion",
    "mass_in_mask",
    "model_randomization_test",
    "overlay",
    "pointing_game",
    "random_saliency",
    "raw_attention",
    "relevance",
    "rollout",
    "spearman_correlation",
    "token_layout",
]


def __getattr__(name: str) -> Any:  # matplotlib and Lightning load only when asked for
    if name == "overlay":
        from .plot import overlay

        return overlay
    if name == "ExplanationCallback":
        from .callback import ExplanationCallback

        return ExplanationCallback
    raise AttributeError(f"module 'vitkit.explain' has no attribute {name!r}")
