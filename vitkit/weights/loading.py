"""Read weight files and load them into a vitkit model, with errors that say what to change.

vitkit models use timm's parameter names, so a timm state dict needs no conversion. Loading
still adapts what a user changes on purpose when fine-tuning:

* a different class count: the checkpoint's head is dropped and the model keeps its fresh one;
* a different image size (patch grid): position embeddings are resampled bicubically.

Anything else that does not fit raises :class:`CheckpointMismatchError`, naming the keys, their
shapes, and the model option that most likely differs.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.models.position import resample_position_embedding

logger = logging.getLogger("vitkit")

StateDict = dict[str, torch.Tensor]

_CONTAINER_KEYS = ("state_dict", "model", "module", "model_state", "state_dict_ema", "model_ema")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")


class CheckpointMismatchError(ValueError):
    """The checkpoint's parameters do not fit the model's options."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did besides copying tensors."""

    source: str
    head_reset: bool = False
    pos_embed_resampled: tuple[tuple[int, int], tuple[int, int]] | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- reading files
def read_state_dict(path: str | Path) -> StateDict:
    """Read a state dict from ``.safetensors`` or a torch file (``.pth .pt .bin .ckpt``).

    Torch files are loaded with ``weights_only=True`` (no code runs from the file). A dict that
    wraps the weights under ``state_dict`` / ``model`` / ``module`` is unwrapped, and a
    ``module.`` prefix (DataParallel/DDP) is stripped.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass the weights file inside it.")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif name.endswith(_TORCH_SUFFIXES):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt file, or pickled objects that are not plain tensors
            raise ValueError(
                f"Could not read {path} as a PyTorch weights file ({type(err).__name__}: {err}). "
                "If it holds pickled Python objects, re-save just the state_dict() of the model."
            ) from err
    else:
        raise ValueError(
            f"Unsupported weights file {path}: expected .safetensors or one of {', '.join(_TORCH_SUFFIXES)}."
        )
    return unwrap_state_dict(state, str(path))


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> StateDict:
    """Find the tensor dict inside a checkpoint and strip DataParallel's ``module.`` prefix."""
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(
                f"{source}: no weights found. Expected a state dict, or a dict holding one under one of "
                f"{_CONTAINER_KEYS}; found keys {sorted(obj)[:10]}."
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a dict of tensors, got {type(obj).__name__}.")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


# ---------------------------------------------------------------------------- inspecting
def infer_vit_options(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read the architecture options that the shapes of a timm-layout state dict reveal.

    Returns a subset of the :class:`~vitkit.models.VisionTransformer` options: ``embed_dim``,
    ``in_chans``, ``patch_size``, ``depth``, ``mlp_ratio``, ``qkv_bias``, ``qk_norm``,
    ``init_values`` (presence only), ``class_token``, ``reg_tokens``, ``pre_norm``, ``fc_norm``,
    ``num_classes``, ``pos_embed`` and, when qk_norm reveals the head width, ``num_heads``.
    """
    options: dict[str, Any] = {}
    proj = state.get("patch_embed.proj.weight")
    if proj is not None:
        options["embed_dim"], options["in_chans"] = int(proj.shape[0]), int(proj.shape[1])
        options["patch_size"] = (int(proj.shape[2]), int(proj.shape[3]))
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    options["depth"] = max(block_ids) + 1 if block_ids else 0
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        options["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    if block_ids:
        options["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
        options["qk_norm"] = "blocks.0.attn.q_norm.weight" in state
        options["init_values"] = "blocks.0.ls1.gamma" in state
        if options["qk_norm"] and "embed_dim" in options:
            options["num_heads"] = options["embed_dim"] // int(state["blocks.0.attn.q_norm.weight"].shape[0])
    options["class_token"] = "cls_token" in state
    options["reg_tokens"] = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    options["pre_norm"] = "norm_pre.weight" in state
    options["fc_norm"] = "fc_norm.weight" in state
    head = state.get("head.weight")
    options["num_classes"] = int(head.shape[0]) if head is not None else 0
    options["pos_embed"] = "learn" if "pos_embed" in state else "none"
    return options


# ---------------------------------------------------------------------------- loading
def load_pretrained(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> LoadReport:
    """Load weights into a vitkit :class:`~vitkit.models.VisionTransformer`.

    Args:
        model: the model, built with the options you want (class count and image size may
            differ from the checkpoint's; everything else must match).
        source: a weights file path, or a state dict.

    Returns:
        A :class:`LoadReport` saying whether the head was reset or positions were resampled.

    Raises:
        CheckpointMismatchError: the checkpoint does not fit the model; the message lists the
            keys and shapes and names the option to change.
    """
    if isinstance(source, Mapping):
        state, name = unwrap_state_dict(source), "state dict"
    else:
        state, name = read_state_dict(source), str(source)
    report = LoadReport(source=name)
    state = _adapt_to_model(dict(state), model, report)
    _check_fits(state, model, name)
    model.load_state_dict(state, strict=True)
    for note in report.notes:
        logger.info("%s: %s", name, note)
    return report


def _adapt_to_model(state: StateDict, model: nn.Module, report: LoadReport) -> StateDict:
    """Drop a head of another class count; resample position embeddings to the model's grid."""
    own = model.state_dict()
    head_w = state.get("head.weight")
    own_head_w = own.get("head.weight")
    if head_w is not None and (own_head_w is None or head_w.shape != own_head_w.shape):
        ckpt_classes = head_w.shape[0]
        model_classes = own_head_w.shape[0] if own_head_w is not None else 0
        state.pop("head.weight")
        state.pop("head.bias", None)
        state.update({k: v for k, v in own.items() if k.startswith("head.")})  # keep the fresh head
        report.head_reset = True
        report.notes.append(
            f"classifier head not loaded: the checkpoint has {ckpt_classes} classes and the model "
            f"{model_classes}; the model keeps its freshly initialised head."
        )

    pos, own_pos = state.get("pos_embed"), own.get("pos_embed")
    if (
        pos is not None
        and own_pos is not None
        and pos.shape != own_pos.shape
        and pos.shape[-1] == own_pos.shape[-1]
    ):
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        old_patches = pos.shape[1] - prefix
        side = math.isqrt(max(old_patches, 0))
        if old_patches > 0 and side * side == old_patches:
            new_grid = model.grid_size
            state["pos_embed"] = resample_position_embedding(pos, new_grid, (side, side), prefix)
            report.pos_embed_resampled = ((side, side), tuple(new_grid))
            report.notes.append(f"position embeddings resampled from a {side}x{side} grid to {new_grid}.")
    return state


def _check_fits(state: StateDict, model: nn.Module, source: str) -> None:
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    wrong_shape = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if not (missing or unexpected or wrong_shape):
        return
    ckpt_opts = infer_vit_options(state)
    model_opts = getattr(model, "config", {})
    lines = [f"The weights in {source} do not fit this model."]
    if wrong_shape:
        lines.append("Shapes that differ (checkpoint vs model):")
        shown = {}  # one line per parameter kind: blocks.0.x stands for every blocks.N.x
        for k in sorted(wrong_shape, key=lambda k: (k.startswith("blocks."), k)):
            shown.setdefault(re.sub(r"^blocks\.\d+\.", "blocks.*.", k), k)
        lines += [
            f"  {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in list(shown.values())[:12]
        ]
    if missing:
        lines.append(f"Missing from the checkpoint ({len(missing)}): {', '.join(_abbreviate(missing))}")
    if unexpected:
        lines.append(f"Not in the model ({len(unexpected)}): {', '.join(_abbreviate(unexpected))}")
    hints = _option_hints(ckpt_opts, model_opts, missing + unexpected + wrong_shape)
    if hints:
        lines.append("Probably differs: " + "; ".join(hints) + ".")
    raise CheckpointMismatchError("\n".join(lines))


def _abbreviate(keys: list[str]) -> list[str]:
    """Collapse ``blocks.3.attn.qkv.bias`` and its siblings into ``blocks.*.attn.qkv.bias``."""
    seen: dict[str, None] = {}
    for k in keys:
        seen[re.sub(r"^blocks\.\d+\.", "blocks.*.", k)] = None
    out = list(seen)
    return out[:12] + ([f"... {len(out) - 12} more"] if len(out) > 12 else [])


def _option_hints(ckpt: dict[str, Any], model: dict[str, Any], keys: list[str]) -> list[str]:
    hints = []

    def differs(option: str, model_value: Any | None = None) -> None:
        have = model.get(option) if model_value is None else model_value
        want = ckpt.get(option)
        if want is not None and have is not None and want != have:
            hints.append(f"{option} (checkpoint: {want!r}, model: {have!r})")

    model = dict(model)
    if "patch_size" in model:
        model["patch_size"] = tuple(model["patch_size"])
    if "init_values" in model:  # the checkpoint only tells whether LayerScale is there
        model["init_values"] = bool(model["init_values"])
    if "fc_norm" in model and model.get("fc_norm") is None:
        model["fc_norm"] = model.get("global_pool") not in ("token", "")
    for option in (
        "embed_dim",
        "in_chans",
        "patch_size",
        "depth",
        "mlp_ratio",
        "qkv_bias",
        "qk_norm",
        "init_values",
        "class_token",
        "reg_tokens",
        "pre_norm",
        "num_heads",
    ):
        differs(option)
    if (
        ckpt.get("fc_norm") is not None
        and model.get("fc_norm") is not None
        and ckpt["fc_norm"] != model["fc_norm"]
    ):
        hints.append(
            f"fc_norm (checkpoint: {ckpt['fc_norm']}, model: {model['fc_norm']}; it follows global_pool "
            "unless set)"
        )
    if "pos_embed" in keys and not hints:
        hints.append(
            "img_size, no_embed_class or pos_embed (the position embedding table has another length)"
        )
    return hints
