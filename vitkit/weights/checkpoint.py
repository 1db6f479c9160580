"""Read any supported ViT checkpoint into one form: a :class:`Checkpoint`.

A :class:`Checkpoint` holds the weights in vitkit's layout plus what the source says about
them: the architecture options it reveals (from tensor shapes, and from configs when there are
any) and the preprocessing the weights were trained with. :func:`read_checkpoint` accepts

* a local file: ``.safetensors`` (vitkit/timm, or Hugging Face), ``.pth .pt .bin .ckpt .pth.tar``
  (a plain state dict, one wrapped under ``state_dict``/``model``/``module``, a vitkit Lightning
  checkpoint, a checkpoint of timm's ``train.py``, a torchvision or Hugging Face state dict) or a
  Google/big_vision ``.npz``;
* a folder: as written by Hugging Face ``save_pretrained`` (``config.json`` + weights +
  ``preprocessor_config.json``), by timm's ``save_for_hf``/``push_to_hf_hub`` (``config.json``
  with ``architecture``) or by :func:`vitkit.weights.save`;
* hub names: ``timm:<model>[.<tag>]`` (timm's download and cache), ``hf:<repo id>[@revision]``
  (huggingface_hub's cache) and ``torchvision:<builder>[.<WEIGHTS>]`` (torch.hub's cache). All of
  them work offline (``HF_HUB_OFFLINE=1``) when the files are already in the cache;
* a state dict (or a dict wrapping one), or a :class:`Checkpoint`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.models import VisionTransformer, list_models, model_config
from vitkit.models._utils import to_2tuple
from vitkit.models.block import ACTIVATIONS
from vitkit.models.relative_position import relative_position_table_size

from . import preprocessing as prep
from .convert import (
    StateDict,
    UnsupportedCheckpointError,
    npz_to_vitkit,
    timm_beit_to_vitkit,
    timm_eva_to_vitkit,
    to_vitkit,
)

logger = logging.getLogger("vitkit")

_CONTAINER_KEYS = ("state_dict", "model", "module", "model_state", "state_dict_ema", "model_ema", "teacher")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
_VIT_OPTIONS = tuple(inspect.signature(VisionTransformer).parameters)
_METADATA_KEY = "vitkit"  # safetensors metadata entry written by vitkit.weights.save
# what a bare state dict leaves open, by layout, and the likeliest value: a CLIP-style timm model
# (QuickGELU, eps 1e-5) has the same tensors as a timm ViT (GELU, eps 1e-6)
_SHAPELESS_DEFAULTS = {
    "timm": {"act_layer": "gelu", "norm_eps": 1e-6},
    "hf": {"act_layer": "gelu", "norm_eps": 1e-12},
    "clip": {"act_layer": "quick_gelu", "norm_eps": 1e-5},  # OpenAI's CLIP
    "open_clip": {"act_layer": "gelu", "norm_eps": 1e-5},  # open_clip's own (OpenAI's: quick_gelu)
    "dinov3": {"act_layer": "gelu", "norm_eps": 1e-5},  # DINOv3ViTConfig's defaults
    "aimv2": {"act_layer": "silu", "norm_eps": 1e-5},  # Aimv2VisionConfig's defaults
    "siglip": {"act_layer": "gelu_tanh", "norm_eps": 1e-6},  # SiglipVisionConfig's defaults
}


@dataclass
class Checkpoint:
    """Weights in vitkit layout, with what their source says about architecture and preprocessing.

    Attributes:
        state_dict: tensors under vitkit's (= timm's) parameter names.
        source: where they came from (path or hub name), for messages.
        format: the layout they were stored in: ``'vitkit'``, ``'timm'``, ``'lightning'``,
            ``'hf'``, ``'clip'``, ``'siglip'``, ``'torchvision'`` or ``'big_vision'``.
        options: :class:`~vitkit.models.VisionTransformer` options the checkpoint determines:
            from shapes (embed_dim, depth, patch_size, tokens, ...) and, when the source has a
            config, the rest (num_heads, img_size, norm_eps, global_pool, ...).
        pretrained_cfg: preprocessing (mean, std, interpolation, crop_pct, crop_mode,
            input_size); empty when the source does not say.
        model_name: the source's model name, when it has one.
        label_names: class names of the checkpoint's head, when known.
        notes: what the conversion dropped or assumed.
        pos_embed_resize: how the source library resizes its position table for another input
            size, as keyword arguments of
            :func:`~vitkit.models.resample_position_embedding` (transformers' ViT, DeiT, DINOv2
            and CLIP: no antialiasing; torchvision: ``align_corners``). Loading at another
            ``img_size`` resamples the same way, so that the model reproduces the source's
            outputs at that size. Empty: timm's way (bicubic, antialiased).
        any_input_size: the source model resamples its positions to every input (transformers'
            DINOv2), so the size it is run at is its preprocessing's, not its table's;
            :func:`~vitkit.weights.model_from_checkpoint` builds it at the former.
    """

    state_dict: StateDict
    source: str
    format: str
    options: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    label_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    pos_embed_resize: dict[str, bool] = field(default_factory=dict)
    any_input_size: bool = False

    def model_options(self, given: Iterable[str] = ()) -> dict[str, Any]:
        """Constructor options for a model that fits these weights; ``given``: options the caller
        sets itself, which are neither guessed nor noted.

        Options a plain state dict cannot tell are filled in and noted: ``num_heads`` (a
        registered model of the same width and depth, else 64-wide heads), ``img_size`` and
        ``no_embed_class`` (a square grid), ``global_pool`` (the class token if there is one and
        no ``fc_norm``, else the patch average).
        """
        opts = {k: v for k, v in self.options.items() if k in _VIT_OPTIONS}
        if opts.get("init_values") is True:
            opts["init_values"] = 1e-5  # LayerScale is there; its value comes with the weights
        elif opts.get("init_values") is False:
            opts["init_values"] = None
        guessed: dict[str, str] = {}  # option -> the value used, as said in the note
        given = set(given)
        if "num_heads" not in opts and "num_heads" not in given and "embed_dim" in opts:
            opts["num_heads"] = guess_num_heads(opts["embed_dim"], opts.get("depth"))
            guessed["num_heads"] = (
                f"{opts['num_heads']} (head width {opts['embed_dim'] // opts['num_heads']})"
            )
        if self.format in _SHAPELESS_DEFAULTS:  # a bare state dict: no config says how the tensors are used
            defaults = dict(_SHAPELESS_DEFAULTS[self.format])
            if opts.get("mlp_layer", "mlp") != "mlp":  # a gated MLP: SwiGLU's SiLU, as timm's and DINOv2's
                defaults["act_layer"] = "silu"
            if self.format == "hf" and opts.get("init_values"):  # LayerScale: DINOv2, its norms' 1e-6
                defaults["norm_eps"] = 1e-6
            left_open = {k: v for k, v in defaults.items() if k not in opts and k not in given}
            guessed.update({k: repr(v) for k, v in left_open.items()})
            opts.update(left_open)
        if guessed:
            names = ", ".join(guessed)
            used = ", ".join(f"{k}={v}" for k, v in guessed.items())
            note = (
                f"{self.source} does not store {names}, which its tensors do not tell; using {used}. "
                f"Pass {'=..., '.join(guessed)}=... if that is wrong. Read through timm:<name>, a folder "
                "with its config.json or a timm train.py checkpoint, the architecture is exact."
            )
            if self.format == "timm":
                note += (
                    " The same tensors also fit timm ViTs vitkit does not have, which would load wrong: "
                    "post-norm blocks (vit_*_rpn_*) and rotary positions (vit_pe_*); if the file could be "
                    "one of those, load it by its timm name and vitkit says which part it lacks."
                )
            self.notes.append(note)
            logger.warning(note)
        if "img_size" not in opts and "pos_embed" in self.state_dict and "patch_size" in opts:
            prefix = _prefix_tokens(opts)
            guess = guess_grid_options(self.state_dict["pos_embed"], prefix, opts["patch_size"])
            if "no_embed_class" in opts:
                guess.pop("no_embed_class", None)
            opts.update(guess)
        if "global_pool" not in opts:
            token = opts.get("class_token", True) and not opts.get("fc_norm", False)
            opts["global_pool"] = "token" if token else "avg"
        return opts


# ---------------------------------------------------------------------------- entry point
def read_checkpoint(source: str | Path | Mapping[str, Any] | Checkpoint) -> Checkpoint:
    """Read weights from any supported source into a :class:`Checkpoint` (see the module doc).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file of an unknown type or one that cannot be read.
        UnsupportedCheckpointError: weights of a ViT variant vitkit cannot represent.
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return _from_mapping(source, "state dict")
    text = str(source)
    for scheme, reader in (("timm:", _from_timm_hub), ("hf:", _from_hf_hub), ("torchvision:", _from_tv_hub)):
        if text.startswith(scheme):
            return reader(text[len(scheme) :])
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.is_dir():
        return _from_folder(path, str(path))
    return _from_file(path, str(path))


def read_state_dict(path: str | Path) -> StateDict:
    """Read the raw tensors of a ``.safetensors`` or torch file, unwrapped, names unchanged.

    Torch files are loaded with ``weights_only=True`` (no code runs from the file). A dict that
    wraps the weights under ``state_dict`` / ``model`` / ``module`` is unwrapped, and a
    ``module.`` prefix (DataParallel/DDP) is stripped. Use :func:`read_checkpoint` to also
    convert other layouts to vitkit's names.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass the weights file inside it.")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        return _read_safetensors(path)[0]
    if name.endswith(_TORCH_SUFFIXES):
        return unwrap_state_dict(_torch_load(path), str(path))
    raise ValueError(
        f"Unsupported weights file {path}: expected .safetensors, .npz or one of "
        f"{', '.join(_TORCH_SUFFIXES)}."
    )


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


# ---------------------------------------------------------------------------- architecture options
def infer_vit_options(
    state: Mapping[str, torch.Tensor], known: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Read the architecture options a vitkit-layout state dict reveals, completed by ``known``.

    From shapes: ``embed_dim``, ``in_chans``, ``patch_size`` (from ``known`` with a convolutional
    stem, whose ``stem_channels`` are read instead; its ``stem_strides`` only from ``known``),
    ``depth``, ``mlp_ratio``, ``mlp_layer``, ``norm_layer``, ``embed_norm``, ``proj_bias``,
    ``qkv_bias``, ``qk_norm``, ``init_values`` (presence only, unless
    ``known`` has the value), ``class_token``, ``distilled``, ``reg_tokens``, ``pre_norm``,
    ``final_norm``, ``fc_norm``, ``num_classes``, ``pos_embed``, ``global_pool='map'`` (an attention
    pool's weights); ``num_heads`` when qk_norm reveals the head width. ``img_size`` and
    ``no_embed_class`` only when ``known`` has an image size that fits the position table (shapes
    alone do not determine a grid; :meth:`Checkpoint.model_options` guesses one).

    Args:
        state: weights in vitkit layout.
        known: options a config already gives (e.g. Hugging Face's ``num_heads`` and
            ``img_size``); shapes win where both say something, and a known ``img_size`` that
            does not fit the position table is dropped.
    """
    known = {k: v for k, v in (known or {}).items() if v is not None}
    options: dict[str, Any] = {}
    proj = state.get("patch_embed.proj.weight")
    if proj is not None:
        options["embed_dim"], options["in_chans"] = int(proj.shape[0]), int(proj.shape[1])
        options["patch_size"] = (int(proj.shape[2]), int(proj.shape[3]))
    stem_key = re.compile(r"patch_embed\.stem\.(\d+)\.weight")
    stem = {int(m.group(1)): w for k, w in state.items() if (m := stem_key.fullmatch(k))}
    stem_convs = [w for _, w in sorted(stem.items()) if w.ndim == 4]
    if stem_convs:  # a convolutional stem: its 1x1 projection says nothing of the image or the patch size
        options["in_chans"] = int(stem_convs[0].shape[1])
        options["stem_channels"] = tuple(int(w.shape[0]) for w in stem_convs)
        if "patch_size" in known:
            options["patch_size"] = to_2tuple(known["patch_size"])
        else:
            del options["patch_size"]
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    options["depth"] = max(block_ids) + 1 if block_ids else 0
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    gate = state.get("blocks.0.mlp.fc1_g.weight")
    if fc1 is not None:
        options["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
        if fc2 is not None and 2 * fc2.shape[1] == fc1.shape[0]:  # fc1 gives a gate and a value
            options["mlp_layer"] = "swiglu_packed"
    elif gate is not None:  # the gate and the value from separate layers
        options["mlp_ratio"] = gate.shape[0] / gate.shape[1]
        options["mlp_layer"] = "swiglu"
    if "blocks.0.norm1.weight" in state and "blocks.0.norm1.bias" not in state:
        options["norm_layer"] = "rmsnorm"  # a scale without a shift
    if "patch_embed.norm.weight" in state:
        options["embed_norm"] = True
    if "blocks.0.attn.proj.weight" in state and "blocks.0.attn.proj.bias" not in state:
        options["proj_bias"] = False
    if block_ids:
        options["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
        options["qk_norm"] = "blocks.0.attn.q_norm.weight" in state
        has_ls = "blocks.0.ls1.gamma" in state
        options["init_values"] = (known.get("init_values") or True) if has_ls else False
        if options["qk_norm"] and "embed_dim" in options:
            options["num_heads"] = options["embed_dim"] // int(state["blocks.0.attn.q_norm.weight"].shape[0])
    options["class_token"] = "cls_token" in state
    options["distilled"] = "dist_token" in state
    options["reg_tokens"] = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    options["pre_norm"] = "norm_pre.weight" in state
    options["final_norm"] = "norm.weight" in state or "fc_norm.weight" in state
    options["fc_norm"] = "fc_norm.weight" in state if options["final_norm"] else known.get("fc_norm", False)
    table = state.get("blocks.0.attn.rel_pos_bias.table")
    if table is not None:  # BEiT's relative position bias; a square grid unless a config says
        options["rel_pos_bias"] = True
        options["num_heads"] = int(table.shape[1])  # one bias per head
        side = (math.isqrt(int(table.shape[0]) - 3) + 1) // 2
        square = relative_position_table_size((side, side)) == table.shape[0]
        if "img_size" not in known and "patch_size" in options and square:
            options["img_size"] = (side * options["patch_size"][0], side * options["patch_size"][1])
    if "attn_pool.latent" in state:  # an attention pool is the only pooling that has weights
        options["global_pool"] = "map"
    head = state.get("head.weight")
    options["num_classes"] = int(head.shape[0]) if head is not None else 0
    has_pos = "pos_embed" in state
    options["pos_embed"] = (
        ("sincos" if known.get("pos_embed") == "sincos" else "learn") if has_pos else "none"
    )
    if has_pos and "patch_size" in options:
        options.update(_grid_options(state["pos_embed"], options, known))

    merged = {k: v for k, v in known.items() if k not in options}
    merged.update(options)
    if merged.get("img_size", 0) is None:
        merged.pop("img_size")  # the config's size does not fit the position table
    return merged


def _prefix_tokens(options: Mapping[str, Any]) -> int:
    """Tokens before the patches: class, distillation, registers."""
    return (
        int(bool(options.get("class_token", False)))
        + int(bool(options.get("distilled", False)))
        + int(options.get("reg_tokens", 0))
    )


def _grid_options(pos: torch.Tensor, options: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    """``img_size`` and ``no_embed_class`` when a known image size fits the position table.

    Shapes alone do not determine the grid (25 entries may be 5x5 patches, or 4x6 patches and
    a class token), so without a config nothing is returned and callers decide:
    :meth:`Checkpoint.model_options` guesses a square grid, the loader uses the model's.
    """
    if "img_size" not in known:
        return {}
    n = int(pos.shape[1])
    prefix = _prefix_tokens(options)
    size, patch = to_2tuple(known["img_size"]), options["patch_size"]
    patches = (size[0] // patch[0]) * (size[1] // patch[1])
    if prefix == 0:
        return {"img_size": size} if n == patches else {"img_size": None}
    choices = [nec for nec in (False, True) if n == patches + (0 if nec else prefix)]
    if "no_embed_class" in known:
        choices = [c for c in choices if c == bool(known["no_embed_class"])]
    if not choices:
        return {"img_size": None}  # the config's size does not fit the position table
    return {"img_size": size, "no_embed_class": choices[0]}


def guess_grid_options(
    pos: torch.Tensor, num_prefix_tokens: int, patch_size: tuple[int, int]
) -> dict[str, Any]:
    """A guess of ``img_size`` and ``no_embed_class`` from the length of a position table alone:
    a square grid of patches, with positions for the prefix tokens if that makes it square."""
    n = int(pos.shape[1])
    candidates = [(False, n)] if num_prefix_tokens == 0 else [(False, n - num_prefix_tokens), (True, n)]
    for no_embed_class, patches in candidates:
        side = math.isqrt(max(patches, 0))
        if patches > 0 and side * side == patches:
            out: dict[str, Any] = {"img_size": (side * patch_size[0], side * patch_size[1])}
            if num_prefix_tokens:
                out["no_embed_class"] = no_embed_class
            return out
    return {}


def guess_num_heads(embed_dim: int, depth: int | None = None) -> int:
    """Heads for a checkpoint that does not say: a registered model of the same width (and depth),
    else 64-wide heads (the ViT/DeiT/timm convention), else one head."""
    same_width = []
    for name in list_models():
        cfg = model_config(name)
        if cfg.get("embed_dim") == embed_dim:
            same_width.append(cfg)
    for cfg in sorted(same_width, key=lambda c: c.get("depth") != depth):
        if embed_dim % cfg["num_heads"] == 0:
            return int(cfg["num_heads"])
    return embed_dim // 64 if embed_dim % 64 == 0 else 1


# ---------------------------------------------------------------------------- files
def _from_file(path: Path, source: str) -> Checkpoint:
    name = path.name.lower()
    shard = re.fullmatch(r".+-\d+-of-\d+\.(safetensors|bin)", name)
    if shard or name.endswith(".index.json"):
        raise ValueError(
            f"{path} is {'one shard' if shard else 'the index'} of a sharded checkpoint: pass the folder "
            f"that holds the index and all its shards ({path.parent}); vitkit reads them together."
        )
    if name.endswith(".npz"):
        return _from_npz(path, source)
    if name.endswith(".safetensors"):
        state, metadata = _read_safetensors(path)
        return _from_mapping(state, source, metadata=metadata, filename=path.name)
    if name.endswith(_TORCH_SUFFIXES):
        return _from_mapping(_torch_load(path), source, filename=path.name)
    raise ValueError(
        f"Unsupported weights file {path}: expected .safetensors, .npz or one of "
        f"{', '.join(_TORCH_SUFFIXES)}."
    )


def _torch_load(path: Path) -> Any:
    try:
        # timm's train.py stores its command line as an argparse.Namespace: plain values, safe to rebuild
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, or pickled objects that are not plain tensors
        if _is_torchscript(path):
            raise ValueError(
                f"{path} is a TorchScript archive (as OpenAI's CLIP .pt files are), not a weights file: "
                "save its weights first, torch.save(torch.jit.load(path).state_dict(), 'weights.pth'), "
                "and pass that."
            ) from err
        raise ValueError(
            f"Could not read {path} as a PyTorch weights file ({type(err).__name__}: {err}). "
            "If it holds pickled Python objects, re-save just the state_dict() of the model."
        ) from err


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a ``torch.jit.save`` archive (it holds compiled code beside the data)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:
        raise ValueError(f"Could not read {path} as safetensors ({type(err).__name__}: {err}).") from err
    return state, metadata


def _from_npz(path: Path, source: str) -> Checkpoint:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:
        raise ValueError(f"Could not read {path} as .npz ({type(err).__name__}: {err}).") from err
    state, known, notes = npz_to_vitkit(arrays)
    return _finish(state, source, "big_vision", known, pretrained_cfg={}, notes=notes)


def _from_mapping(
    obj: Mapping[str, Any],
    source: str,
    metadata: Mapping[str, str] | None = None,
    filename: str | None = None,
) -> Checkpoint:
    known: dict[str, Any] = {}
    pretrained_cfg: dict[str, Any] = {}
    model_name = label_names = None
    lightning = False
    meta = _vitkit_metadata(metadata, obj)
    timm_train = False
    if isinstance(obj, Mapping) and isinstance(obj.get("hyper_parameters"), Mapping):
        lightning = True
        known, pretrained_cfg, model_name, label_names = _lightning_hparams(obj["hyper_parameters"])
    elif (
        isinstance(obj, Mapping)
        and isinstance(obj.get("arch"), str)
        and isinstance(obj.get("state_dict"), Mapping)
    ):
        timm_train = True
        known, pretrained_cfg, model_name = _timm_train_options(obj, source)
    if meta:
        config = dict(meta.get("config") or {})
        model_name = config.pop("model_name", None) or meta.get("model_name") or model_name
        known.update(config)
        pretrained_cfg = prep.clean_pretrained_cfg(meta.get("pretrained_cfg")) or pretrained_cfg
        label_names = meta.get("label_names") or label_names

    state, fmt, notes = to_vitkit(unwrap_state_dict(obj, source))
    # how the source library resizes its position table for another input size (its
    # interpolate_pos_encoding / interpolate_embeddings), where it differs from timm's antialiased bicubic
    pos_embed_resize: dict[str, bool] = {}
    if fmt in ("hf", "clip", "siglip"):
        if "cls_token" not in state or (fmt == "clip" and "head.weight" in state):
            # no class token (SigLIP, I-JEPA): an attention pool (read off the weights), else the
            # token mean; CLIP with a head: CLIPForImageClassification's classifier on the patch mean
            known = {"global_pool": "avg", **known}
        known = {**_HF_DEFAULTS, **known}
        pos_embed_resize = {"antialias": False}
        if "reg_token" in state:  # DINOv2 with registers, converted to positions for the patches only
            known["no_embed_class"] = True
            pos_embed_resize = {}  # transformers' DINOv2 with registers antialiases, as timm does
    elif fmt == "open_clip":  # a class token read by the head, as CLIP's
        known = {**_HF_DEFAULTS, **known}
    elif fmt == "aimv2":  # no class token: the token mean, as timm's ports
        known = {"class_token": False, "global_pool": "avg", "fc_norm": False, **known}
    elif fmt == "dinov3":  # positions by rotation only, the class token read by the head
        # any input size, as transformers runs it: nothing to resample
        known = {**_HF_DEFAULTS, "rope": True, "rope_theta": 100.0, "dynamic_img_size": True, **known}
    elif fmt == "torchvision":
        known = {**_TV_DEFAULTS, **known}
        pos_embed_resize = {"antialias": False, "align_corners": True}
        tv = _torchvision_weights_for_file(filename) if filename else None
        if tv is not None:  # a file downloaded from torchvision: its weights enum knows the rest
            pretrained_cfg = prep.from_torchvision_weights(tv)
            label_names = list(tv.meta["categories"])
            known.update(_tv_builder_options(tv, state))
    elif meta:
        fmt = "vitkit"
    elif lightning:
        fmt = "lightning"
    elif timm_train:
        fmt = "timm"
        if isinstance(obj.get("state_dict_ema"), Mapping):
            notes.append(
                f"{source} also holds EMA weights (state_dict_ema); these are the raw ones (state_dict). "
                "For the EMA ones: read_checkpoint(torch.load(path)['state_dict_ema'])."
            )
    ckpt = _finish(state, source, fmt, known, pretrained_cfg, notes, model_name, label_names)
    ckpt.pos_embed_resize = pos_embed_resize
    if not ckpt.pretrained_cfg:
        img = ckpt.options.get("img_size")
        if fmt == "hf":
            ckpt.pretrained_cfg = prep.hf_default(img, ckpt.options.get("in_chans", 3))
            ckpt.notes.append("no preprocessor config: assuming ViTImageProcessor's defaults (mean/std 0.5).")
        elif fmt == "siglip":
            ckpt.pretrained_cfg = prep.siglip_default(img, ckpt.options.get("in_chans", 3))
            ckpt.notes.append(
                "no preprocessor config: assuming SiglipImageProcessor's defaults (mean/std 0.5, bicubic "
                "resize to the input size, no crop)."
            )
        elif fmt in ("clip", "open_clip", "aimv2"):  # (AIMv2's processor is CLIP's)
            ckpt.pretrained_cfg = prep.clip_default(img, ckpt.options.get("in_chans", 3))
            ckpt.notes.append(
                "no preprocessor config: assuming CLIPImageProcessor's defaults (OpenAI CLIP mean/std, "
                "bicubic, centre crop)."
            )
        elif fmt == "dinov3":
            ckpt.pretrained_cfg = prep.dinov3_default(img or (224, 224), ckpt.options.get("in_chans", 3))
            ckpt.notes.append(
                "no preprocessor config: assuming DINOv3ViTImageProcessor's defaults (ImageNet mean/std, "
                "bilinear resize to the input size, no crop)."
            )
        elif fmt == "torchvision":
            ckpt.pretrained_cfg = prep.torchvision_default(img[0] if img else 224)
            ckpt.notes.append(
                "assuming torchvision's ImageNet preset (ImageNet mean/std, resize 256 / crop 224)."
            )
        else:
            ckpt.notes.append(
                "the checkpoint records no preprocessing (mean/std, crop): the model keeps its own "
                "pretrained_cfg."
            )
    return ckpt


def _finish(
    state: StateDict,
    source: str,
    fmt: str,
    known: Mapping[str, Any],
    pretrained_cfg: Mapping[str, Any],
    notes: list[str],
    model_name: str | None = None,
    label_names: list[str] | None = None,
) -> Checkpoint:
    known = {k: v for k, v in known.items() if k in _VIT_OPTIONS}
    if fmt == "timm" and known.get("rope"):  # timm's Eva (its DINOv3 ports) names two parts otherwise
        state = timm_eva_to_vitkit(state)
    elif fmt == "timm" and any(_BEIT_TABLE.fullmatch(k) for k in state):  # timm's Beit
        state, beit_notes = timm_beit_to_vitkit(state)
        notes = [*notes, *beit_notes]
    options = infer_vit_options(state, known)
    if label_names is not None and len(label_names) != options.get("num_classes"):
        label_names = None
    return Checkpoint(
        state_dict=state,
        source=source,
        format=fmt,
        options=options,
        pretrained_cfg=prep.clean_pretrained_cfg(pretrained_cfg),
        model_name=model_name,
        label_names=list(label_names) if label_names else None,
        notes=list(notes),
    )


# A relative position table of timm's Beit (per block, or shared by all): vit_relpos_* models name
# theirs blocks.N.attn.rel_pos.relative_position_bias_table, a bias vitkit does not have.
_BEIT_TABLE = re.compile(r"(blocks\.\d+\.attn|rel_pos_bias)\.relative_position_bias_table")


def _vitkit_metadata(metadata: Mapping[str, str] | None, obj: Any) -> dict[str, Any] | None:
    if metadata and _METADATA_KEY in metadata:
        return json.loads(metadata[_METADATA_KEY])
    if isinstance(obj, Mapping) and isinstance(obj.get(_METADATA_KEY), Mapping):
        return dict(obj[_METADATA_KEY])  # e.g. checkpoint["vitkit"] = {"config": ..., "pretrained_cfg": ...}
    return None


def _lightning_hparams(hp: Mapping[str, Any]) -> tuple[dict, dict, str | None, list[str] | None]:
    """Options of a vitkit ``ImageClassifier`` checkpoint: registry defaults + model_options."""
    name = hp.get("model_name")
    known: dict[str, Any] = {}
    pretrained_cfg: dict[str, Any] = {}
    if isinstance(name, str):
        try:  # a registered name, or a timm architecture vitkit builds
            known = model_config(name)
        except ValueError as err:
            logger.debug("model_name %r of the checkpoint is not known (%s); reading the weights", name, err)
        pretrained_cfg = dict(known.pop("pretrained_cfg", {}))
    known.update(hp.get("model_options") or {})
    if hp.get("num_classes") is not None:
        known["num_classes"] = hp["num_classes"]
    classes = hp.get("classes")
    return known, pretrained_cfg, name, list(classes) if classes else None


def _timm_train_options(obj: Mapping[str, Any], source: str) -> tuple[dict, dict, str]:
    """Options, preprocessing and model name of a checkpoint written by timm's ``train.py``.

    Its ``arch`` names the timm model and ``args`` holds the command line: timm builds that model
    on the meta device (with ``--model-kwargs``, ``--gp`` and ``--in-chans``) to give the exact
    architecture, as for a timm hub folder, and a variant vitkit lacks is refused. The preprocessing is
    the architecture's default, with the ``--mean``, ``--std``, ``--interpolation`` and ``--crop-pct``
    the run was given.
    """
    arch = obj["arch"]
    args = obj.get("args")
    model_args = dict(getattr(args, "model_kwargs", None) or {})
    for option, flag in (("global_pool", "gp"), ("in_chans", "in_chans")):
        if getattr(args, flag, None) is not None:
            model_args.setdefault(option, getattr(args, flag))
    known = dict(timm_architecture_options(arch, model_args) or {})
    if not known:
        logger.warning(
            "%s: timm cannot build its architecture %r; reading the options from the weights", source, arch
        )
    known.pop("num_classes", None)  # the head's shape tells (train.py's --num-classes)
    pretrained_cfg: dict[str, Any] = {}
    try:
        import timm

        default = timm.models.get_pretrained_cfg(arch)
        pretrained_cfg = default.to_dict() if default is not None else {}
    except Exception as err:  # an architecture timm does not know
        logger.debug("no timm pretrained_cfg for %s: %s", arch, err)
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if getattr(args, key, None) not in (None, ""):
            pretrained_cfg[key] = getattr(args, key)
    return known, pretrained_cfg, arch


# ---------------------------------------------------------------------------- folders
_HF_DEFAULTS = {
    "class_token": True,
    "reg_tokens": 0,
    "no_embed_class": False,
    "global_pool": "token",
    "fc_norm": False,
}
_TV_DEFAULTS = {"no_embed_class": False, "global_pool": "token", "fc_norm": False, "norm_eps": 1e-6}
_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)


def _from_folder(path: Path, source: str) -> Checkpoint:
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    if config is not None and "architecture" in config:
        return _from_timm_folder(path, config, source)
    if config is not None and "model_type" in config:
        return _from_hf_folder(path, config, source)
    if config is None and (path / "open_clip_config.json").is_file():
        return _from_open_clip_folder(path, json.loads((path / "open_clip_config.json").read_text()), source)
    weights = [path / n for n in _WEIGHT_FILES if (path / n).is_file()]
    if not weights:
        weights = sorted(
            p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin", ".npz")
        )
    if not weights:
        raise FileNotFoundError(
            f"{path}: no config.json and no weights file (.safetensors, .pth, .bin, .npz)."
        )
    return _from_file(weights[0], source)


def _from_open_clip_folder(path: Path, config: Mapping[str, Any], source: str) -> Checkpoint:
    """An open_clip hub folder: ``open_clip_config.json`` says what the weights do not (QuickGELU or
    GELU, the head width, the preprocessing)."""
    weights = [path / n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")]
    weights = [w for w in weights if w.is_file()]
    if not weights:
        raise FileNotFoundError(f"{path}: open_clip_config.json but no open_clip_model.safetensors or .bin.")
    ckpt = _from_file(weights[0], source)
    model_cfg = dict(config.get("model_cfg") or {})
    vision = dict(model_cfg.get("vision_cfg") or {})
    if not isinstance(vision.get("layers", 0), int) or vision.get("timm_model_name"):
        raise UnsupportedCheckpointError(f"{path}: an open_clip image tower that is not its own ViT.")
    width = int(vision.get("width", 768))
    known = {
        "act_layer": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "norm_eps": 1e-5,
        "num_heads": width // int(vision.get("head_width", 64)),
        "img_size": to_2tuple(vision.get("image_size", 224)),
    }
    ckpt.options = infer_vit_options(ckpt.state_dict, {**ckpt.options, **known})
    preprocess = dict(config.get("preprocess_cfg") or {})
    if preprocess.get("mean") and preprocess.get("std"):
        ckpt.pretrained_cfg = {
            **ckpt.pretrained_cfg,
            "mean": tuple(preprocess["mean"]),
            "std": tuple(preprocess["std"]),
            "interpolation": preprocess.get("interpolation", "bicubic"),
            "input_size": (ckpt.options.get("in_chans", 3), *known["img_size"]),
        }
    return ckpt


def _read_weights_in(path: Path) -> tuple[StateDict, dict[str, str]]:
    """The weights of a hub-style folder: single file or sharded with an index."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            if name.endswith(".safetensors"):
                return _read_safetensors(path / name)
            return unwrap_state_dict(_torch_load(path / name), str(path / name)), {}
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            state: StateDict = {}
            for shard in shards:
                file = path / shard
                state.update(
                    _read_safetensors(file)[0] if shard.endswith(".safetensors") else _torch_load(file)
                )
            return state, {}
    raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or sharded index found.")


def _from_hf_folder(path: Path, config: Mapping[str, Any], source: str) -> Checkpoint:
    known = hf_config_options(config)
    state, _ = _read_weights_in(path)
    processor_file = path / "preprocessor_config.json"
    ckpt = _from_mapping(state, source)
    ckpt.options = infer_vit_options(ckpt.state_dict, known)
    if processor_file.is_file():
        ckpt.pretrained_cfg = prep.from_hf_processor(
            json.loads(processor_file.read_text()), known.get("in_chans", 3)
        )
        ckpt.notes = [n for n in ckpt.notes if "no preprocessor config" not in n]
    id2label = config.get("id2label") or {}
    labels = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
    if labels and None not in labels and not all(re.fullmatch(r"LABEL_\d+", str(x)) for x in labels):
        ckpt.label_names = labels if len(labels) == ckpt.options.get("num_classes") else None
    ckpt.model_name = config.get("_name_or_path") or None
    ckpt.any_input_size = str(config.get("model_type", "")).startswith("dinov2")
    if "Dinov2ForImageClassification" in (config.get("architectures") or []):
        ckpt.notes.append(
            "Dinov2ForImageClassification's classifier reads the class token and the mean patch token "
            "side by side (2 x embed_dim inputs), which vitkit's head does not: the backbone is loaded "
            "without it (num_classes=0, a feature extractor; pass num_classes=... for a fresh head)."
        )
    return ckpt


# transformers classifiers whose head reads the mean of the patch tokens, not the class token
_HF_MEAN_CLASSIFIERS = ("SiglipForImageClassification", "CLIPForImageClassification")


def hf_config_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """VisionTransformer options from a Hugging Face ``config.json``: ViT, ViTMSN, DeiT (distilled),
    DINOv2, CLIP and SigLIP (their image towers); other model types raise, with the way to the same
    weights when there is one."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    mean_classifier = any(a in architectures for a in _HF_MEAN_CLASSIFIERS)
    if model_type in ("clip", "siglip", "aimv2"):  # CLIPModel, SiglipModel, Aimv2Model: the image tower
        model_type = f"{model_type}_vision_model"
        config = {**dict(config.get("vision_config") or {}), "model_type": model_type}
    if model_type not in _HF_CONFIG_DEFAULTS:  # the model types vitkit reads
        hint = _HF_TYPE_HINTS.get(str(model_type), "")
        raise UnsupportedCheckpointError(
            f"Hugging Face model_type {model_type!r} is not supported: vitkit reads 'vit', 'vit_msn', "
            "'vit_mae', 'deit', 'ijepa', 'dinov2' (with registers too), 'dinov3_vit', 'clip', 'siglip' "
            "and 'aimv2' models (ViTModel, ViTForImageClassification, ViTMSN*, ViTMAE*, DeiT*, IJepa*, "
            "Dinov2*, DINOv3ViTModel, CLIP's, SigLIP's and AIMv2's image towers)."
            f"{' ' + hint if hint else ''}"
        )
    # a config.json may leave out what equals its class's default: start from transformers' defaults
    config = {**_HF_CONFIG_DEFAULTS[model_type], **config}
    swiglu = model_type.startswith("dinov2") and config.get("use_swiglu_ffn")  # the giant model
    act = "silu" if swiglu else config.get("hidden_act", "gelu")  # its SwiGLU ignores hidden_act
    if act not in _HF_ACTIVATIONS:
        raise UnsupportedCheckpointError(
            f"hidden_act={act!r}: vitkit's MLP has {', '.join(sorted(_HF_ACTIVATIONS))} (transformers' "
            "names), so these logits would differ."
        )
    hidden = int(config.get("hidden_size", 768))
    options = {
        **_HF_DEFAULTS,
        "img_size": to_2tuple(config.get("image_size", 224)),
        "patch_size": to_2tuple(config.get("patch_size", 16)),
        "in_chans": int(config.get("num_channels", 3)),
        "embed_dim": hidden,
        "depth": int(config.get("num_hidden_layers", 12)),
        "num_heads": int(config.get("num_attention_heads", 12)),
        "mlp_ratio": int(config.get("intermediate_size") or 4 * hidden) / hidden,
        "qkv_bias": bool(config.get("qkv_bias", True)),
        "norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        "act_layer": _HF_ACTIVATIONS[act],
    }
    if model_type == "clip_vision_model":  # timm's pre-norm ViT: a LayerNorm before the blocks
        options["pre_norm"] = True
        if mean_classifier:  # the patch mean, before the final norm (dropped by the conversion)
            options.update(global_pool="avg", fc_norm=False, final_norm=False)
    if model_type == "siglip_vision_model":  # no class token; the attention pool, or the token mean
        use_head = config.get("vision_use_head", True) and not mean_classifier
        options.update(class_token=False, global_pool="map" if use_head else "avg", fc_norm=False)
    if model_type == "aimv2_vision_model":  # RMSNorm (after the patches too), split SwiGLU, no biases
        if config.get("is_native"):
            raise UnsupportedCheckpointError(
                "This AIMv2 is a 'native' one (sin-cos positions at each image's own resolution); "
                "vitkit reads the fixed-size AIMv2 towers."
            )
        options.update(
            qkv_bias=_projection_biases(config, "qkv_bias", "mlp_bias", "AIMv2", default=False),
            class_token=False,
            global_pool="avg",
            fc_norm=False,
            norm_layer="rmsnorm",
            embed_norm=True,
            mlp_layer="swiglu",
            proj_bias=bool(config.get("mlp_bias", False)),
            norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        )
    if model_type == "ijepa":  # I-JEPA: no class token, the mean of the normalised tokens
        options.update(class_token=False, global_pool="avg", fc_norm=False)
    if model_type == "dinov3_vit":  # rotary positions only, registers, LayerScale (shift / jitter: training)
        options.update(
            proj_bias=_projection_biases(config, "proj_bias", "mlp_bias", "DINOv3", default=True),
            rope=True,
            rope_theta=float(config.get("rope_theta", 100.0)),
            rope_rescale=config.get("pos_embed_rescale"),
            pos_embed="none",
            reg_tokens=int(config.get("num_register_tokens", 0)),
            init_values=float(config.get("layerscale_value", 1.0)),
            qkv_bias=bool(config.get("query_bias", True) or config.get("value_bias", True)),
            final_norm=bool(config.get("apply_layernorm", True)),
            dynamic_img_size=True,  # any input size, as transformers runs it: nothing to resample
        )
        if config.get("use_gated_mlp"):
            options["mlp_layer"] = "swiglu"
    if model_type == "deit":  # ViT with a distillation token after the class token
        options["distilled"] = True
    if model_type.startswith("dinov2"):  # LayerScale, an MLP ratio instead of a width
        options.update(mlp_ratio=float(config["mlp_ratio"]), init_values=float(config["layerscale_value"]))
    if swiglu:  # fc1's width comes from the weights' shapes
        options.update(mlp_layer="swiglu_packed")
    if model_type == "dinov2_with_registers":  # positions for the patches only (see hf_to_vitkit)
        options.update(reg_tokens=int(config["num_register_tokens"]), no_embed_class=True)
    return options


def _projection_biases(config: Mapping[str, Any], attention: str, mlp: str, name: str, default: bool) -> bool:
    """Whether a model's attention and MLP projections have biases; vitkit has one switch for both
    (``proj_bias``), so a model with one and not the other is refused."""
    if bool(config.get(attention, default)) != bool(config.get(mlp, default)):
        raise UnsupportedCheckpointError(
            f"This {name} has biases in its attention projections but not its MLP, or the reverse "
            f"({attention}, {mlp}); vitkit's proj_bias sets both."
        )
    return bool(config.get(mlp, default))


# The Hugging Face model types vitkit reads, each with its transformers config's defaults (ViTConfig,
# ViTMSNConfig, ViTMAEConfig, DeiTConfig, Dinov2Config, CLIPVisionConfig): what a config.json that
# omits a value means
_HF_VIT_BASE = {
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "qkv_bias": True,
}
_HF_DINOV2 = {
    **_HF_VIT_BASE,
    "patch_size": 14,
    "intermediate_size": None,
    "mlp_ratio": 4,
    "layer_norm_eps": 1e-6,
    "layerscale_value": 1.0,
}
_HF_CONFIG_DEFAULTS = {
    "vit": _HF_VIT_BASE,
    "deit": _HF_VIT_BASE,
    "vit_msn": {**_HF_VIT_BASE, "layer_norm_eps": 1e-6},
    "vit_mae": _HF_VIT_BASE,
    "ijepa": _HF_VIT_BASE,
    "dinov3_vit": {**_HF_VIT_BASE, "layer_norm_eps": 1e-5},
    "aimv2_vision_model": {
        **_HF_VIT_BASE,
        "patch_size": 14,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 8,
        "intermediate_size": 2816,
        "hidden_act": "silu",
        "qkv_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-5,
    },
    "dinov2": _HF_DINOV2,
    "dinov2_with_registers": {**_HF_DINOV2, "num_register_tokens": 4},
    "clip_vision_model": {
        **_HF_VIT_BASE,
        "patch_size": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
    "siglip_vision_model": {**_HF_VIT_BASE, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
}


# why vitkit cannot read some Hugging Face ViT relatives, said in the error
_HF_TYPE_HINTS = {
    "beit": "BEiT uses relative position biases, which vitkit's ViT does not have.",
    "data2vec-vision": "data2vec-vision uses relative position biases, which vitkit's ViT does not have.",
}


# transformers' ``hidden_act`` names -> vitkit's ``act_layer`` ("gelu_new", "gelu_fast" and
# "gelu_python_tanh" are the tanh approximation written out, "gelu_python" the exact GELU;
# "gelu_pytorch_tanh" is torch's own).
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "silu": "silu",
    "swish": "silu",
}


def _from_timm_folder(path: Path, config: Mapping[str, Any], source: str) -> Checkpoint:
    """A folder in timm's hub layout: ``config.json`` (architecture, model_args, pretrained_cfg)."""
    arch = config["architecture"]
    model_args = dict(config.get("model_args") or {})
    if config.get("num_classes") is not None:
        model_args.setdefault("num_classes", config["num_classes"])
    if config.get("global_pool"):
        model_args.setdefault("global_pool", config["global_pool"])
    known: dict[str, Any] = {}
    if arch in list_models():
        known = model_config(arch)
        known.pop("pretrained_cfg", None)
    known.update(timm_architecture_options(arch, model_args) or {})
    known.update({k: v for k, v in model_args.items() if k in _VIT_OPTIONS})
    state, metadata = _read_weights_in(path)
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    ckpt = _from_mapping(state, source, metadata=metadata)
    meta_known = ckpt.options if ckpt.format == "vitkit" else {}
    ckpt.options = infer_vit_options(ckpt.state_dict, {**known, **meta_known})
    if ckpt.format != "vitkit":
        ckpt.format = "timm"
    ckpt.pretrained_cfg = prep.clean_pretrained_cfg(pretrained_cfg) or ckpt.pretrained_cfg
    labels = config.get("label_names") or pretrained_cfg.get("label_names")
    if isinstance(labels, list) and len(labels) == ckpt.options.get("num_classes"):
        ckpt.label_names = [str(x) for x in labels]
    ckpt.model_name = arch
    return ckpt


# ---------------------------------------------------------------------------- timm models
def timm_model_options(model: nn.Module) -> dict[str, Any]:
    """vitkit options of a timm ``VisionTransformer`` instance (raises for variants vitkit lacks)."""
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.vision_transformer import Attention, Block
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if isinstance(model, Eva):
        return _timm_eva_options(model)
    if isinstance(model, Beit):
        return _timm_beit_options(model)
    if not isinstance(model, TimmViT):
        raise UnsupportedCheckpointError(
            f"timm model {type(model).__name__} is not a timm VisionTransformer; vitkit only reads those."
        )
    block = model.blocks[0] if len(model.blocks) else None
    problems = []
    if getattr(model, "attn_pool", None) is not None and (pool_problem := _timm_attn_pool_problem(model)):
        problems.append(pool_problem)
    embed = model.patch_embed
    norm_kinds = {type(m) for m in model.modules() if "norm" in type(m).__name__.lower()}
    norm_kind = _timm_norm_kind(norm_kinds)
    if norm_kind is None:
        names = ", ".join(sorted(kind.__name__ for kind in norm_kinds))
        problems.append(f"norms other than LayerNorm or RMSNorm ({names})")
    if not isinstance(getattr(embed, "proj", None), nn.Conv2d):
        problems.append("a patch embedding other than one Conv2d (a hybrid stem)")
    if getattr(embed, "dynamic_img_pad", False):
        problems.append("dynamic_img_pad")
    if block is not None and type(block) is not Block:  # parallel or post-norm blocks
        problems.append(f"{type(block).__name__} blocks")
    elif block is not None:
        if type(block.attn) is not Attention:
            problems.append(f"{type(block.attn).__name__} attention")
        elif not isinstance(getattr(block.attn, "norm", nn.Identity()), nn.Identity):
            problems.append("a norm inside the attention, before its output projection (scale_attn_norm)")
        problems += _timm_mlp_problems(block.mlp)
    _refuse_timm_model(model, problems)
    norms = [m for m in model.modules() if type(m) in norm_kinds]
    options = _timm_shared_options(model)
    options.update(
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        distilled=getattr(model, "dist_token", None) is not None,
        no_embed_class=bool(model.no_embed_class),
    )
    if norms:
        options["norm_eps"] = float(norms[0].eps)
    if norm_kind == "rmsnorm":
        options["norm_layer"] = "rmsnorm"
    if not isinstance(getattr(embed, "norm", nn.Identity()), nn.Identity):
        options["embed_norm"] = True
    if block is not None:
        options.update(
            qkv_bias=block.attn.qkv.bias is not None,
            qk_norm=not isinstance(block.attn.q_norm, nn.Identity),
            init_values=getattr(block.ls1, "init_values", 1e-5) if hasattr(block.ls1, "gamma") else None,
        )
    return options


def _timm_shared_options(model: nn.Module) -> dict[str, Any]:
    """The options timm's ``VisionTransformer`` and its ``Eva`` give alike: sizes, class token,
    pooling, the norms around the blocks, and the blocks' heads, MLP and projection biases."""
    embed, block = model.patch_embed, model.blocks[0] if len(model.blocks) else None
    options: dict[str, Any] = {
        "img_size": tuple(embed.img_size),
        "patch_size": tuple(embed.patch_size),
        "in_chans": int(embed.proj.in_channels),
        "num_classes": int(model.num_classes),
        "global_pool": model.global_pool,
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "class_token": model.cls_token is not None,
        "pre_norm": not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity),
        "final_norm": not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        "fc_norm": not isinstance(model.fc_norm, nn.Identity),
        "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)),
    }
    if block is not None:
        options.update(
            num_heads=int(block.attn.num_heads),
            mlp_ratio=_timm_mlp_width(block.mlp) / model.embed_dim,
            act_layer=_timm_activation(block.mlp),
        )
        if _timm_mlp_layer(block.mlp) != "mlp":
            options["mlp_layer"] = _timm_mlp_layer(block.mlp)
        if block.attn.proj.bias is None:
            options["proj_bias"] = False
    return options


def _timm_mlp_problems(mlp: nn.Module) -> list[str]:
    """What of a timm block's MLP vitkit lacks: its kind, a norm inside it, its activation."""
    problems = []
    if _timm_mlp_layer(mlp) is None:
        problems.append(f"{type(mlp).__name__} MLP")
    elif not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        problems.append("a norm inside the MLP, before its second layer (scale_mlp_norm)")
    if _timm_activation(mlp) is None:
        problems.append(f"activation {mlp.act!r} (vitkit has {', '.join(ACTIVATIONS)})")
    return problems


def _refuse_timm_model(model: nn.Module, problems: list[str], kind: str = "") -> None:
    """Raise, naming the parts, when a timm model has parts vitkit's ViT lacks."""
    if problems:
        name = model.pretrained_cfg.get("architecture", type(model).__name__)
        raise UnsupportedCheckpointError(
            f"timm model {name}{kind} uses " + ", ".join(problems) + ", which vitkit's VisionTransformer "
            "does not have."
        )


def _timm_eva_options(model: nn.Module) -> dict[str, Any]:
    """vitkit options of a timm ``Eva`` model with DINOv3's rotary positions (its DINOv3 ports);
    other Eva models (EVA-02's rotary form, post-norm blocks, norms inside...) raise, naming why."""
    from timm.layers import RotaryEmbeddingDinoV3
    from timm.models.eva import EvaAttention, EvaBlock

    rope, block = getattr(model, "rope", None), model.blocks[0] if len(model.blocks) else None
    problems = []
    if type(rope) is not RotaryEmbeddingDinoV3:
        problems.append(f"{type(rope).__name__} position rotations (vitkit has DINOv3's)")
    elif rope.min_period is not None or (rope.normalize_coords, rope.grid_offset, rope.grid_indexing) != (
        "separate",
        0.0,
        "ij",
    ):
        problems.append("DINOv3 rotations with other periods or coordinates")
    elif rope.shift_coords is not None or rope.jitter_coords is not None:
        problems.append("rotations shifted or jittered in training (vitkit rescales only)")
    if getattr(model, "pos_embed", None) is not None:
        problems.append("a position table beside the rotations")
    if block is not None:
        attn = block.attn
        if (
            type(block) is not EvaBlock
            or type(attn) is not EvaAttention
            or getattr(attn, "qkv", None) is None
        ):
            problems.append(f"{type(block).__name__} blocks with {type(attn).__name__} attention")
        elif not isinstance(attn.norm, nn.Identity) or not isinstance(attn.q_norm, nn.Identity):
            problems.append("a norm inside the attention")
        problems += _timm_mlp_problems(block.mlp)
    norm_kinds = {type(m) for m in model.modules() if "norm" in type(m).__name__.lower()}
    if _timm_norm_kind(norm_kinds) != "layernorm":
        problems.append("norms other than LayerNorm")
    _refuse_timm_model(model, problems, " (an Eva)")
    reg_token = getattr(model, "reg_token", None)
    options = _timm_shared_options(model)
    options.update(
        reg_tokens=int(reg_token.shape[1]) if reg_token is not None else 0,
        pos_embed="none",
        rope=True,
        rope_theta=float(rope.temperature),
        rope_rescale=rope.rescale_coords,
    )
    if block is not None:
        options.update(
            norm_eps=float(block.norm1.eps),
            qkv_bias=getattr(block.attn, "q_bias", None) is not None,
            init_values=1e-5 if getattr(block, "gamma_1", None) is not None else None,  # the weights set it
        )
    return options


def _timm_beit_options(model: nn.Module) -> dict[str, Any]:
    """vitkit options of a timm ``Beit`` (BEiT, BEiT v2): relative position biases, q and v biases,
    LayerScale, mean pooling; one shared bias table becomes one per block when the weights load."""
    from timm.models.beit import Attention as BeitAttention
    from timm.models.beit import Block as BeitBlock

    block = model.blocks[0] if len(model.blocks) else None
    problems = []
    if block is not None:
        if type(block) is not BeitBlock or type(block.attn) is not BeitAttention:
            problems.append(f"{type(block).__name__} blocks with {type(block.attn).__name__} attention")
        else:
            problems += _timm_mlp_problems(block.mlp)
            if block.attn.qkv_bias_separate:
                problems.append("q and v biases added after the projection (qkv_bias_separate)")
    norm_kinds = {type(m) for m in model.modules() if "norm" in type(m).__name__.lower()}
    if _timm_norm_kind(norm_kinds) != "layernorm":
        problems.append("norms other than LayerNorm")
    _refuse_timm_model(model, problems, " (a Beit)")
    options = _timm_shared_options(model)
    per_block = block is not None and block.attn.relative_position_bias_table is not None
    options.update(
        pos_embed="learn" if model.pos_embed is not None else "none",
        rel_pos_bias=per_block or model.rel_pos_bias is not None,
    )
    if block is not None:
        options.update(
            norm_eps=float(block.norm1.eps),
            qkv_bias=block.attn.q_bias is not None,
            init_values=1e-5 if block.gamma_1 is not None else None,  # the weights set it
        )
    return options


def _timm_mlp_width(mlp: nn.Module) -> int:
    """The hidden width timm builds an MLP with (``int(dim * mlp_ratio)``): fc1's, or the gate's."""
    return int((getattr(mlp, "fc1", None) or mlp.fc1_g).out_features)


def _timm_norm_kind(kinds: set[type]) -> str | None:
    """``'layernorm'`` or ``'rmsnorm'`` when a timm model's norms are all of that kind (none:
    ``'layernorm'``), else None."""
    from timm.layers import RmsNorm

    if all(issubclass(kind, nn.LayerNorm) for kind in kinds):
        return "layernorm"
    if all(kind in (RmsNorm, nn.RMSNorm) for kind in kinds):
        return "rmsnorm"
    return None


def _timm_mlp_layer(mlp: nn.Module) -> str | None:
    """vitkit's ``mlp_layer`` for a timm block's MLP: ``'mlp'``, ``'swiglu'`` (timm's ``SwiGLU``),
    ``'swiglu_packed'`` (timm's ``SwiGLUPacked``: a ``GluMlp`` with the gate first), or None (another
    kind)."""
    from timm.layers import GluMlp, SwiGLU
    from timm.models.vision_transformer import Mlp

    if type(mlp) is Mlp:
        return "mlp"
    if type(mlp) is SwiGLU:
        return "swiglu"
    if type(mlp) is GluMlp and not mlp.gate_last and mlp.chunk_dim == -1:
        return "swiglu_packed"
    return None


def _timm_attn_pool_problem(model: nn.Module) -> str | None:
    """What of a timm ViT's attention pool vitkit's :class:`~vitkit.models.AttentionPool` lacks, or
    None for timm's plain MAP head (``global_pool='map'``: one latent query, q and kv projections,
    LayerNorm and MLP with the blocks' width ratio and activation, token pooling)."""
    from timm.layers import AttentionPoolLatent

    pool = model.attn_pool
    if type(pool) is not AttentionPoolLatent:
        return f"an attention-pooling head of type {type(pool).__name__} (global_pool={model.global_pool!r})"
    lacks = []
    if pool.latent_len != 1 or pool.pool != "token":
        lacks.append(f"{pool.latent_len} latent queries pooled by {pool.pool!r}")
    if pool.pos_embed is not None:
        lacks.append("its own position embedding")
    if not isinstance(pool.q, nn.Linear) or pool.latent_dim != model.embed_dim:
        lacks.append("a latent without its query projection, or of another width")
    if not isinstance(pool.q_norm, nn.Identity):
        lacks.append("q/k norms")
    if pool.mlp is None or not isinstance(pool.norm, nn.LayerNorm):
        lacks.append("no output MLP or norm")
    elif len(model.blocks) and pool.mlp.fc1.out_features != _timm_mlp_width(model.blocks[0].mlp):
        lacks.append("an MLP of another width than the blocks'")
    block_heads = model.blocks[0].attn.num_heads if len(model.blocks) else pool.num_heads
    if pool.q.bias is None or pool.num_heads != block_heads:
        lacks.append("other heads than the blocks' or no q/kv bias")
    if not lacks:
        return None
    return "an attention-pooling head with " + ", ".join(lacks)


def _timm_activation(mlp: nn.Module) -> str | None:
    """The vitkit name (:data:`~vitkit.models.block.ACTIVATIONS`) of a timm MLP's activation, or None."""
    act = getattr(mlp, "act", None)
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu"}.get(
        type(act).__name__
    )


def timm_architecture_options(
    arch: str, model_args: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Options of a timm architecture, built on the meta device (no memory, no weights); ``None``
    when timm does not know the name or cannot build it there."""
    try:
        import timm

        if not timm.is_model(arch):
            return None
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **dict(model_args or {}))
    except Exception as err:  # an unknown architecture argument, a model that cannot be built on meta
        logger.debug("timm could not build %s on the meta device: %s", arch, err)
        return None
    return timm_model_options(model)


# ---------------------------------------------------------------------------- hubs
def _from_timm_hub(spec: str) -> Checkpoint:
    """``timm:<model>[.<tag>]``: timm downloads (or finds in its cache) and converts the weights."""
    import timm

    name = spec.split(".", 1)[0]
    if not timm.is_model(name):
        raise ValueError(f"timm does not know the model {name!r} (timm:{spec}).")
    arch_options = timm_architecture_options(name)  # fail before downloading for unsupported variants
    if arch_options is None:
        logger.debug("timm:%s could not be checked before downloading", spec)
    try:
        model = timm.create_model(spec, pretrained=True)
    except Exception as err:
        raise RuntimeError(
            f"timm could not load pretrained weights for {spec!r} ({type(err).__name__}: {err}). Offline, "
            "the weights must already be in the Hugging Face cache (HF_HUB_CACHE) or in torch.hub's "
            "(TORCH_HOME)."
        ) from err
    options = timm_model_options(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = dict(model.pretrained_cfg)
    labels = cfg.get("label_names")
    return _finish(
        state,
        f"timm:{spec}",
        "timm",
        options,
        cfg,
        notes=[],
        model_name=name,
        label_names=list(labels) if isinstance(labels, (list, tuple)) else None,
    )


def _from_hf_hub(spec: str) -> Checkpoint:
    """``hf:<repo id>[@revision]``: huggingface_hub downloads (or finds in its cache) the files."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, _, revision = spec.partition("@")

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision or None))
        except EntryNotFoundError:  # not in the repo (online) or not in the cache (offline)
            return None

    try:
        config = fetch("config.json")
        if config is not None:
            fetch("preprocessor_config.json")
        weights = None
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (weights := fetch(name)) is not None:
                break
        if weights is None and (index := fetch("model.safetensors.index.json")) is not None:
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                weights = fetch(shard)
    except Exception as err:
        raise RuntimeError(
            f"Could not get {repo_id!r} from the Hugging Face hub or its local cache ({type(err).__name__}: "
            f"{err}). Offline (HF_HUB_OFFLINE=1), the files must already be in the cache (HF_HUB_CACHE)."
        ) from err
    if weights is None:
        raise FileNotFoundError(
            f"hf:{spec}: no model.safetensors or pytorch_model.bin in the repo (or, offline, in the cache)."
        )
    ckpt = _from_folder(weights.parent, f"hf:{spec}")
    ckpt.model_name = repo_id
    return ckpt


def _from_tv_hub(spec: str) -> Checkpoint:
    """``torchvision:vit_b_16[.IMAGENET1K_V1]`` or ``torchvision:ViT_B_16_Weights.IMAGENET1K_V1``."""
    import torchvision.models as tvm

    name, _, tag = spec.partition(".")
    try:
        if name.endswith("_Weights"):
            weights = tvm.get_weight(spec)
        else:
            enum = tvm.get_model_weights(name)
            weights = enum[tag] if tag else enum.DEFAULT
    except (KeyError, ValueError) as err:
        raise ValueError(f"torchvision has no weights {spec!r} ({err}).") from err
    try:
        raw = weights.get_state_dict(progress=False, weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"Could not get {weights} from torchvision or torch.hub's cache ({type(err).__name__}: {err}). "
            "Offline, the file must already be in $TORCH_HOME/hub/checkpoints."
        ) from err
    ckpt = _from_mapping(raw, f"torchvision:{spec}")
    extra = _tv_builder_options(weights, ckpt.state_dict)
    ckpt.options = infer_vit_options(ckpt.state_dict, {**ckpt.options, **extra})
    ckpt.pretrained_cfg = prep.from_torchvision_weights(weights)
    ckpt.notes = [n for n in ckpt.notes if "torchvision's ImageNet preset" not in n]
    categories = weights.meta.get("categories")
    if categories and len(categories) == ckpt.options.get("num_classes"):
        ckpt.label_names = list(categories)
    ckpt.model_name = name if not name.endswith("_Weights") else None
    return ckpt


def _torchvision_weights_for_file(filename: str) -> Any | None:
    """The torchvision weights enum whose download has this file name (e.g. vit_b_16-c867db91.pth)."""
    import torchvision.models as tvm

    for builder in tvm.list_models(module=tvm, include="vit_*"):
        for weights in tvm.get_model_weights(builder):
            if Path(weights.url).name == filename:
                return weights
    return None


def _tv_builder_options(weights: Any, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """num_heads from the torchvision builder of ``weights``, if its width matches the weights."""
    import torchvision.models as tvm

    builder = next(
        (b for b in tvm.list_models(module=tvm, include="vit_*") if weights in tvm.get_model_weights(b)), None
    )
    proj = state.get("patch_embed.proj.weight")
    if builder is None or proj is None:
        return {}
    with torch.device("meta"):
        model = tvm.get_model_builder(builder)(weights=None)
    if model.hidden_dim != proj.shape[0]:
        return {}
    return {"num_heads": int(model.encoder.layers[0].num_heads)}
