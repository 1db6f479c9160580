"""Load checkpoints into vitkit models, adapting what fine-tuning changes on purpose.

vitkit models use timm's parameter names; other layouts are converted on reading (see
:mod:`vitkit.weights.checkpoint`). Loading then adapts what a user changes on purpose:

* a different class count: the checkpoint's head is dropped and the model keeps its fresh one;
* a different image size (patch grid): position embeddings are resampled bicubically, from the
  checkpoint's grid (square, or the non-square grid its config records, or ``old_grid``);
* a different patch size: the patch-embedding kernel is resampled FlexiViT-style.

Anything else that does not fit raises :class:`CheckpointMismatchError`, naming the keys, their
shapes, and the model option that most likely differs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vitkit.models import VisionTransformer, list_models
from vitkit.models._utils import to_2tuple
from vitkit.models.position import resample_position_embedding
from vitkit.models.relative_position import resample_relative_position_table

from .checkpoint import Checkpoint, read_checkpoint
from .convert import StateDict
from .resample import infer_grid, resample_patch_embed

logger = logging.getLogger("vitkit")

Source = str | Path | Mapping[str, Any] | Checkpoint


class CheckpointMismatchError(ValueError):
    """The checkpoint's parameters do not fit the model's options."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did besides copying tensors.

    Attributes:
        source: the checkpoint, for messages.
        format: the layout it was stored in (``'timm'``, ``'hf'``, ``'torchvision'``, ...).
        head_reset: the head was not loaded (another class count); the model keeps its own.
        pos_embed_resampled: ``(old grid, new grid)`` when position embeddings were resampled.
        patch_embed_resampled: ``(old patch size, new patch size)`` when the kernel was resampled.
        pretrained_cfg: the checkpoint's preprocessing (mean, std, interpolation, crop_pct,
            crop_mode), with ``input_size`` set to the model's; empty if the source has none.
        label_names: the class names of the loaded head, when the checkpoint has them.
        checkpoint_options: the architecture options the checkpoint determines.
        notes: human-readable lines about all of the above (also logged at INFO).
    """

    source: str
    format: str = "timm"
    head_reset: bool = False
    pos_embed_resampled: tuple[tuple[int, int], tuple[int, int]] | None = None
    patch_embed_resampled: tuple[tuple[int, int], tuple[int, int]] | None = None
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    label_names: list[str] | None = None
    checkpoint_options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- loading
def load_pretrained(
    model: nn.Module,
    source: Source,
    *,
    old_grid: tuple[int, int] | None = None,
    set_pretrained_cfg: bool = True,
) -> LoadReport:
    """Load weights into a vitkit :class:`~vitkit.models.VisionTransformer`.

    Args:
        model: the model, built with the options you want (class count, image size and patch
            size may differ from the checkpoint's; everything else must match).
        source: a file, folder, hub name (``timm:...``, ``hf:...``, ``torchvision:...``), state
            dict or :class:`~vitkit.weights.Checkpoint`; see :func:`read_checkpoint`.
        old_grid: the checkpoint's patch grid (rows, columns), needed only to resample a
            non-square position table whose source does not record its grid.
        set_pretrained_cfg: update ``model.pretrained_cfg`` with the checkpoint's preprocessing.

    Returns:
        A :class:`LoadReport`: what was adapted, and the checkpoint's preprocessing.

    Raises:
        CheckpointMismatchError: the checkpoint does not fit the model; the message lists the
            keys and shapes and names the option to change.
    """
    ckpt = read_checkpoint(source)
    report = LoadReport(
        source=ckpt.source, format=ckpt.format, checkpoint_options=dict(ckpt.options), notes=list(ckpt.notes)
    )
    option_hints = _metadata_hints(ckpt.options, model, report)
    state = _adapt_to_model(
        dict(ckpt.state_dict), model, ckpt.options, report, old_grid, ckpt.pos_embed_resize
    )
    _check_fits(state, model, ckpt.source, ckpt.options, option_hints)
    model.load_state_dict(state, strict=True)

    if ckpt.pretrained_cfg:
        cfg = dict(ckpt.pretrained_cfg)
        in_chans = getattr(getattr(model, "patch_embed", None), "in_chans", 3)
        img_size = getattr(model, "img_size", None)
        if img_size is not None:
            cfg["input_size"] = (in_chans, *img_size)
        report.pretrained_cfg = cfg
    if (
        ckpt.label_names
        and not report.head_reset
        and len(ckpt.label_names) == getattr(model, "num_classes", -1)
    ):
        report.label_names = list(ckpt.label_names)
    if set_pretrained_cfg:
        current = dict(getattr(model, "pretrained_cfg", None) or {})
        current.update(report.pretrained_cfg)
        if report.label_names:
            current["label_names"] = report.label_names
        model.pretrained_cfg = current
    for note in report.notes:
        logger.info("%s: %s", ckpt.source, note)
    return report


def model_from_checkpoint(
    source: Source,
    *,
    old_grid: tuple[int, int] | None = None,
    return_report: bool = False,
    **overrides: Any,
) -> VisionTransformer | tuple[VisionTransformer, LoadReport]:
    """Build the model a checkpoint describes and load it: no model name needed.

    The architecture is read off the weights and any config that comes with them (see
    :meth:`Checkpoint.model_options`); ``overrides`` change options on purpose, e.g.
    ``num_classes=10`` (new head), ``img_size=384`` (resampled positions), ``patch_size=8``
    (resampled patch kernel), ``drop_path_rate=0.1``.

    Args:
        source: anything :func:`read_checkpoint` accepts.
        old_grid: see :func:`load_pretrained`.
        return_report: also return the :class:`LoadReport`.
        **overrides: :class:`~vitkit.models.VisionTransformer` options.

    Returns:
        The model (train mode, ``model.pretrained_cfg`` from the checkpoint), or
        ``(model, report)`` with ``return_report=True``.
    """
    ckpt = read_checkpoint(source)
    options = ckpt.model_options(given=overrides)
    if "img_size" not in options and "img_size" not in overrides:
        if "pos_embed" not in ckpt.state_dict and ckpt.pretrained_cfg.get("input_size"):
            options["img_size"] = tuple(ckpt.pretrained_cfg["input_size"][1:])
        elif "pos_embed" not in ckpt.state_dict:
            options["img_size"] = 224
        else:
            n = ckpt.state_dict["pos_embed"].shape[1]
            raise CheckpointMismatchError(
                f"The grid of {ckpt.source} is not recorded and its {n}-entry position table is not "
                "square: pass img_size=(H, W) (and old_grid=(rows, columns) if it differs)."
            )
    if "img_size" not in overrides and ckpt.any_input_size:
        _follow_the_processor(ckpt, options)
    options.update(overrides)
    try:
        model = VisionTransformer(**options)
    except TypeError as err:
        raise TypeError(f"model_from_checkpoint: {err}.") from None
    if ckpt.model_name in list_models():
        model.config["model_name"] = ckpt.model_name
    model.pretrained_cfg = {"input_size": (model.patch_embed.in_chans, *model.img_size)}
    report = load_pretrained(model, ckpt, old_grid=old_grid)
    return (model, report) if return_report else model


def _follow_the_processor(ckpt: Checkpoint, options: dict[str, Any]) -> None:
    """Build a transformers checkpoint at its image processor's size when that differs from its
    config's: transformers' DINOv2 (config 518, processor crops 224) resamples its positions to
    every input, so the processor's size is the one the model is run at."""
    size = tuple(ckpt.pretrained_cfg.get("input_size", ())[1:])
    config_size, patch = options.get("img_size"), options.get("patch_size")
    if len(size) != 2 or config_size is None or patch is None:
        return
    config_size, patch = to_2tuple(config_size), to_2tuple(patch)
    if size != config_size and size[0] % patch[0] == 0 and size[1] % patch[1] == 0:
        options["img_size"] = size
        table = config_size[0] if config_size[0] == config_size[1] else config_size
        ckpt.notes.append(
            f"built at the image processor's {size[0]}x{size[1]}, the size transformers runs it at "
            f"(its config says image_size {config_size[0]}x{config_size[1]}, which is the size of its "
            f"position table); pass img_size={table} for that."
        )


# ---------------------------------------------------------------------------- adapting
def _is_head(key: str) -> bool:
    """A classifier weight: the head, or a distilled model's second head."""
    return key.startswith(("head.", "head_dist."))


_LIBRARIES = {"hf": "transformers", "clip": "transformers", "siglip": "transformers"}


def _resample_relative_position_tables(
    state: StateDict, own: StateDict, model: nn.Module, ckpt_options: Mapping[str, Any], report: LoadReport
) -> None:
    """BEiT's relative position tables, resampled to the model's grid
    (:func:`~vitkit.models.relative_position.resample_relative_position_table`)."""
    keys = [k for k in state if re.fullmatch(r"blocks\.\d+\.attn\.rel_pos_bias\.table", k)]
    resized = [
        k
        for k in keys
        if k in own and state[k].shape != own[k].shape and state[k].shape[1] == own[k].shape[1]
    ]
    if not resized:
        return
    old_grid = _checkpoint_grid(ckpt_options)  # None: a square grid, as the table's size says
    new_grid = tuple(model.grid_size)
    for key in resized:
        state[key] = resample_relative_position_table(state[key], new_grid, old_grid)
    report.notes.append(
        f"relative position tables of {len(resized)} blocks resampled to the {new_grid} grid."
    )


def _adapt_to_model(
    state: StateDict,
    model: nn.Module,
    ckpt_options: Mapping[str, Any],
    report: LoadReport,
    old_grid: tuple[int, int] | None,
    pos_embed_resize: Mapping[str, bool],
) -> StateDict:
    """Drop a head of another class count; resample the patch kernel and the position table."""
    own = model.state_dict()
    head_w = state.get("head.weight")
    own_head_w = own.get("head.weight")
    if head_w is not None and (own_head_w is None or head_w.shape != own_head_w.shape):
        ckpt_classes = head_w.shape[0]
        model_classes = own_head_w.shape[0] if own_head_w is not None else 0
        for key in [k for k in state if _is_head(k)]:
            del state[key]
        state.update({k: v for k, v in own.items() if _is_head(k)})  # keep the fresh head(s)
        report.head_reset = True
        report.notes.append(
            f"classifier head not loaded: the checkpoint has {ckpt_classes} classes and the model "
            f"{model_classes}; the model keeps its freshly initialised head."
        )
    elif head_w is None and own_head_w is not None:
        state.update({k: v for k, v in own.items() if _is_head(k)})
        report.head_reset = True
        report.notes.append(
            "the checkpoint has no classifier head; the model keeps its freshly initialised one."
        )

    kernel, own_kernel = state.get("patch_embed.proj.weight"), own.get("patch_embed.proj.weight")
    if (
        kernel is not None
        and own_kernel is not None
        and kernel.shape[:2] == own_kernel.shape[:2]
        and kernel.shape[2:] != own_kernel.shape[2:]
    ):
        old, new = tuple(kernel.shape[2:]), tuple(own_kernel.shape[2:])
        state["patch_embed.proj.weight"] = resample_patch_embed(kernel, new)
        report.patch_embed_resampled = (old, new)
        report.notes.append(f"patch-embedding kernel resampled from {old} to {new} patches (FlexiViT pinv).")

    _resample_relative_position_tables(state, own, model, ckpt_options, report)
    pos, own_pos = state.get("pos_embed"), own.get("pos_embed")
    if pos is None or own_pos is None or pos.shape[-1] != own_pos.shape[-1]:
        return state
    ckpt_nec = ckpt_options.get("no_embed_class")
    if model.num_prefix_tokens and ckpt_nec is not None and ckpt_nec != model.no_embed_class:
        return state  # reported as a mismatch of no_embed_class
    same_tokens = ckpt_options.get("class_token") == model.has_class_token and ckpt_options.get(
        "reg_tokens"
    ) == getattr(model, "num_reg_tokens", 0)
    if not same_tokens:
        return state  # reported as a mismatch of class_token / reg_tokens
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    patches = pos.shape[1] - prefix
    hint = tuple(old_grid) if old_grid is not None else _checkpoint_grid(ckpt_options)
    new_grid = tuple(model.grid_size)
    if pos.shape == own_pos.shape and (hint is None or hint == new_grid):
        return state
    if old_grid is not None and old_grid[0] * old_grid[1] != patches:
        raise CheckpointMismatchError(
            f"old_grid={tuple(old_grid)} has {old_grid[0] * old_grid[1]} positions, but the position table "
            f"of {report.source} has {patches} patch entries."
        )
    grid = infer_grid(patches, hint, aspect_like=new_grid)
    if grid is None:
        raise CheckpointMismatchError(
            f"The position table of {report.source} has {patches} patch entries, which is no square grid and "
            f"no grid with the aspect ratio of the model's {new_grid}: pass old_grid=(rows, columns)."
        )
    if grid != new_grid:
        if (
            getattr(model, "pos_embed_type", "learn") == "sincos"
            and ckpt_options.get("pos_embed") == "sincos"
        ):
            state["pos_embed"] = own_pos  # fixed table: the model's own is exact at its grid
        else:
            state["pos_embed"] = resample_position_embedding(pos, new_grid, grid, prefix, **pos_embed_resize)
        report.pos_embed_resampled = (tuple(grid), new_grid)
        how = ""
        if pos_embed_resize:
            library = _LIBRARIES.get(report.format, report.format)
            how = f", as {library} does ({', '.join(f'{k}={v}' for k, v in pos_embed_resize.items())})"
        report.notes.append(
            f"position embeddings resampled from a {grid[0]}x{grid[1]} grid to {new_grid}{how}."
        )
    return state


def _checkpoint_grid(options: Mapping[str, Any]) -> tuple[int, int] | None:
    img, patch = options.get("img_size"), options.get("patch_size")
    if img is None or patch is None:
        return None
    img = (img, img) if isinstance(img, int) else tuple(img)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return img[0] // patch[0], img[1] // patch[1]


# ---------------------------------------------------------------------------- checking
def _metadata_hints(ckpt: Mapping[str, Any], model: nn.Module, report: LoadReport) -> list[str]:
    """Options that shapes cannot show but the checkpoint's config records."""
    config = getattr(model, "config", {})
    hints = []
    heads = ckpt.get("num_heads")
    model_heads = config.get("num_heads")
    if heads is not None and model_heads is not None and heads != model_heads:
        hints.append(f"num_heads (checkpoint: {heads}, model: {model_heads})")
    nec = ckpt.get("no_embed_class")
    if (
        nec is not None
        and getattr(model, "num_prefix_tokens", 0)
        and getattr(model, "pos_embed", None) is not None
        and nec != getattr(model, "no_embed_class", nec)
    ):
        hints.append(
            f"no_embed_class (checkpoint: {nec}, model: {model.no_embed_class}; whether the class/register "
            "tokens have position embeddings)"
        )
    eps, model_eps = ckpt.get("norm_eps"), config.get("norm_eps")
    if eps is not None and model_eps is not None and float(eps) != float(model_eps):
        note = (
            f"LayerNorm epsilon differs (checkpoint: {eps:g}, model: {model_eps:g}): outputs differ slightly "
            f"from the source's; build the model with norm_eps={eps:g} to reproduce them exactly."
        )
        report.notes.append(note)
        logger.warning("%s: %s", report.source, note)
    pool, model_pool = ckpt.get("global_pool"), config.get("global_pool")
    if pool is not None and model_pool is not None and pool != model_pool:
        report.notes.append(
            f"the checkpoint was trained with global_pool={pool!r}; the model uses {model_pool!r}."
        )
    return hints


def _check_fits(
    state: StateDict, model: nn.Module, source: str, ckpt_opts: Mapping[str, Any], extra_hints: list[str]
) -> None:
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    wrong_shape = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if not (missing or unexpected or wrong_shape or extra_hints):
        return
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
    hints = _option_hints(dict(ckpt_opts), model_opts, missing + unexpected + wrong_shape)
    hints += [h for h in extra_hints if h.split(" ")[0] not in {x.split(" ")[0] for x in hints}]
    if hints:
        lines.append("Probably differs: " + "; ".join(hints) + ".")
    if parts := _parts_vitkit_lacks(state):
        lines.append(
            "The checkpoint has parts vitkit's VisionTransformer does not: " + "; ".join(parts) + "."
        )
    raise CheckpointMismatchError("\n".join(lines))


# tensor names of ViT relatives (timm, BEiT, EVA) and the part of the architecture each one gives away
_FOREIGN_PARTS = (
    (r"rel_pos\.|relative_position", "relative position biases (timm's vit_relpos_*, BEiT)"),
    (r"\.attn\.[qv]_bias$", "separate q and v biases (BEiT, EVA)"),
    (r"rope", "rotary position embeddings (EVA)"),
    (r"\.gamma_[12]$", "BEiT's layer scale (gamma_1, gamma_2)"),
    (r"\.mlp\.w12\.", "a gated MLP with xformers' packed names (w12)"),
    (r"\.attn\.norm\.", "a norm inside the attention (timm's scale_attn_norm)"),
    (r"\.mlp\.norm\.", "a norm inside the MLP (timm's scale_mlp_norm)"),
)


def _parts_vitkit_lacks(state: StateDict) -> list[str]:
    """What a checkpoint's tensor names and shapes reveal of an architecture vitkit cannot build."""
    parts = [part for pattern, part in _FOREIGN_PARTS if any(re.search(pattern, k) for k in state)]
    return parts


def _abbreviate(keys: list[str]) -> list[str]:
    """Collapse ``blocks.3.attn.qkv.bias`` and its siblings into ``blocks.*.attn.qkv.bias``."""
    seen: dict[str, None] = {}
    for k in keys:
        seen[re.sub(r"^blocks\.\d+\.", "blocks.*.", k)] = None
    out = list(seen)
    return out[:12] + ([f"... {len(out) - 12} more"] if len(out) > 12 else [])


def _option_hints(ckpt: dict[str, Any], model: dict[str, Any], keys: list[str]) -> list[str]:
    hints = []
    if not keys:
        return hints

    def differs(option: str) -> None:
        have, want = model.get(option), ckpt.get(option)
        if want is not None and have is not None and want != have:
            hints.append(f"{option} (checkpoint: {want!r}, model: {have!r})")

    model = dict(model)
    if "patch_size" in model:
        model["patch_size"] = tuple(model["patch_size"])
    if "init_values" in model:  # the checkpoint only tells whether LayerScale is there
        model["init_values"] = bool(model["init_values"])
    ckpt["init_values"] = bool(ckpt.get("init_values")) if "init_values" in ckpt else None
    if "fc_norm" in model and model.get("fc_norm") is None:
        model["fc_norm"] = model.get("global_pool") not in ("token", "")
    for option in (
        "embed_dim",
        "in_chans",
        "depth",
        "mlp_ratio",
        "qkv_bias",
        "qk_norm",
        "init_values",
        "class_token",
        "reg_tokens",
        "pre_norm",
        "final_norm",
        "num_heads",
    ):
        differs(option)
    if (
        ckpt.get("fc_norm") is not None
        and model.get("fc_norm") is not None
        and ckpt.get("final_norm", True)
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
