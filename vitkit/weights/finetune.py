"""Fine-tuning helpers: layer-wise learning-rate decay and freezing strategies.

Both are pure functions of an ``nn.Module`` with vitkit/timm parameter names, so a training
loop (vitkit's Lightning module, or your own) can use them directly.

Layer-wise LR decay (BEiT, MAE): lower layers hold general features that fine-tuning should
change little, so their learning rate is scaled down geometrically with the distance from the
head. With ``L = depth + 1`` layers, the stem (patch embedding, class/distillation/register tokens,
positions, pre-norm) is layer 0, block i is layer i + 1, and the final norms and head are
layer L; a parameter of layer l gets ``lr_scale = layer_decay ** (L - l)``.

Freezing: ``"linear_probe"`` trains only the head; ``"freeze_blocks:N"`` (alias
``"backbone_until:N"``) freezes the stem and the first N blocks; ``"last_blocks:N"`` trains the
last N blocks, the final norms and the head. "Freeze then unfreeze" schedules call
:func:`freeze` first and :func:`unfreeze` later; build the optimizer with
``param_groups_lrd(..., include_frozen=True)`` so the unfrozen parameters are already in it
(AdamW skips parameters without gradients).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

_STEM = ("cls_token", "reg_token", "pos_embed", "patch_embed.", "norm_pre.", "mask_token", "dist_token")
FREEZE_STRATEGIES = ("none", "full", "linear_probe", "freeze_blocks:N", "backbone_until:N", "last_blocks:N")


def layer_id(name: str, depth: int) -> int:
    """The layer of a parameter for LR decay: stem 0, block i -> i + 1, norms and head depth + 1."""
    if name.startswith(_STEM) or name in ("cls_token", "dist_token", "reg_token", "pos_embed"):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def param_groups_lrd(
    model: nn.Module,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
    no_weight_decay_list: Iterable[str] | None = None,
    *,
    base_lr: float | None = None,
    include_frozen: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise LR decay and selective weight decay.

    Weight decay applies only to weight matrices (parameters with 2 or more dims), never to
    norms, biases, LayerScale, or the names in ``no_weight_decay_list`` (default
    ``model.no_weight_decay()``: position embeddings, class and register tokens).

    Args:
        model: a vitkit/timm ViT (``blocks`` gives the depth).
        weight_decay: the decay of weight matrices.
        layer_decay: LR ratio between consecutive layers; 1.0 disables the decay.
        no_weight_decay_list: parameter names without weight decay (exact names).
        base_lr: if given, each group also gets ``lr = base_lr * lr_scale``.
        include_frozen: also put parameters with ``requires_grad=False`` in the groups (for
            freeze-then-unfreeze schedules).

    Returns:
        One dict per (layer, decay/no-decay) pair, in layer order: ``params``,
        ``param_names``, ``weight_decay``, ``lr_scale``, ``layer_id`` (and ``lr``). Schedulers
        must multiply each group's LR by its ``lr_scale`` (timm's schedulers do). With
        ``layer_decay=1.0`` every layer has the same LR, so there are just two groups (decay and
        no decay, ``layer_id`` 0), which keeps LR logs and optimizer state small.
    """
    if no_weight_decay_list is None:
        no_weight_decay_list = getattr(model, "no_weight_decay", lambda: set())()
    skip = set(no_weight_decay_list)
    depth = len(getattr(model, "blocks", []))
    num_layers = depth + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad and not include_frozen:
            continue
        no_decay = param.ndim < 2 or name in skip or name.endswith(".bias")
        layer = layer_id(name, depth) if layer_decay != 1.0 else 0
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers - layer) if layer_decay != 1.0 else 1.0
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
                "layer_id": layer,
            }
            if base_lr is not None:
                groups[key]["lr"] = base_lr * scale
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _fixed(model: nn.Module) -> set[str]:
    """Parameters that are never trained (a sin-cos position table)."""
    return {"pos_embed"} if getattr(model, "pos_embed_type", "learn") == "sincos" else set()


def freeze(model: nn.Module, strategy: str = "linear_probe") -> list[str]:
    """Set ``requires_grad=False`` on the parameters a strategy freezes; return their names.

    Strategies: ``"none"`` / ``"full"`` (full fine-tuning: nothing frozen), ``"linear_probe"``
    (only the head trains), ``"freeze_blocks:N"`` or ``"backbone_until:N"`` (the stem and the
    first N blocks frozen), ``"last_blocks:N"`` (only the last N blocks, final norms and head
    train). Parameters outside the frozen set are left as they are.
    """
    depth = len(getattr(model, "blocks", []))
    strategy = strategy.strip()
    if strategy in ("none", "full", ""):
        return []
    if strategy == "linear_probe":
        frozen = lambda name: not name.startswith(("head.", "head_dist."))  # noqa: E731
    elif (match := re.fullmatch(r"(freeze_blocks|backbone_until|last_blocks):(\d+)", strategy)) is not None:
        kind, n = match.group(1), int(match.group(2))
        if n > depth:
            raise ValueError(f"freeze={strategy!r}: the model has only {depth} blocks.")
        if kind == "last_blocks":
            frozen = lambda name: layer_id(name, depth) <= depth - n  # noqa: E731
        else:
            frozen = lambda name: layer_id(name, depth) <= n  # noqa: E731
    else:
        raise ValueError(f"freeze={strategy!r}: use one of {', '.join(FREEZE_STRATEGIES)} (N an integer).")
    names = []
    for name, param in model.named_parameters():
        if frozen(name):
            param.requires_grad_(False)
            names.append(name)
    return names


def unfreeze(model: nn.Module, last_blocks: int | None = None) -> list[str]:
    """Make parameters trainable again; return the names whose state changed.

    Args:
        model: the model.
        last_blocks: ``None`` unfreezes everything (the second phase of "freeze then unfreeze");
            an int k unfreezes only the final norms, the head and the last k blocks (gradual
            unfreezing, top down).

    A sin-cos position table stays fixed.
    """
    depth = len(getattr(model, "blocks", []))
    fixed = _fixed(model)
    changed = []
    for name, param in model.named_parameters():
        if name in fixed or param.requires_grad:
            continue
        if last_blocks is None or layer_id(name, depth) > depth - last_blocks:
            param.requires_grad_(True)
            changed.append(name)
    return changed


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
