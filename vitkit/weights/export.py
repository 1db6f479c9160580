"""Save vitkit models for vitkit, timm and Hugging Face users.

* ``format="vitkit"``: one ``.safetensors`` file in vitkit/timm layout whose metadata holds the
  model options and preprocessing as JSON, so :func:`vitkit.weights.model_from_checkpoint`
  rebuilds the model from the file alone (and any timm ``VisionTransformer`` with the same
  options loads the tensors as they are).
* ``format="timm"``: a folder in timm's hub layout (``config.json`` with ``architecture``,
  ``model_args`` and ``pretrained_cfg``, plus ``model.safetensors``), loadable with
  ``timm.create_model("local-dir:<folder>", pretrained=True)`` or pushed to the Hub as is.
* ``format="hf"``: a folder in Hugging Face layout (``config.json``, ``model.safetensors``,
  ``preprocessor_config.json``), loadable with
  ``transformers.ViTForImageClassification.from_pretrained(folder)`` (a distilled model:
  ``DeiTForImageClassificationWithTeacher``). Only the original ViT has a transformers
  counterpart: class-token pooling, positions for the class token too, no registers, LayerScale,
  q/k norm or pre-norm.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import preprocessing as prep
from .convert import vitkit_to_hf

ExportFormat = Literal["vitkit", "timm", "hf"]
_METADATA_KEY = "vitkit"
_TIMM_ARGS = (
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "global_pool",
    "pool_include_prefix",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "qk_norm",
    "init_values",
    "class_token",
    "reg_tokens",
    "no_embed_class",
    "pre_norm",
    "final_norm",
    "fc_norm",
    "dynamic_img_size",
    "act_layer",
    "proj_bias",
)


def save(
    model: nn.Module,
    path: str | Path,
    format: ExportFormat = "vitkit",
    *,
    pretrained_cfg: dict[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
) -> Path:
    """Save a vitkit VisionTransformer's weights with its options and preprocessing.

    Args:
        model: a vitkit :class:`~vitkit.models.VisionTransformer`.
        path: a ``.safetensors`` file for ``"vitkit"`` (a folder gets ``model.safetensors``
            inside), a folder for ``"timm"`` and ``"hf"`` (created if needed).
        format: ``"vitkit"``, ``"timm"`` or ``"hf"`` (see the module doc).
        pretrained_cfg: preprocessing to record; default ``model.pretrained_cfg``.
        label_names: class names of the head; default ``pretrained_cfg["label_names"]`` if any.

    Returns:
        The file or folder written.

    Raises:
        ValueError: an unknown format, or options the target format cannot express (the
            message names them).
    """
    config = dict(getattr(model, "config", {}))
    if not config:
        raise ValueError(
            "save() needs a vitkit VisionTransformer (with .config); got " + type(model).__name__
        )
    cfg = dict(pretrained_cfg if pretrained_cfg is not None else getattr(model, "pretrained_cfg", {}) or {})
    labels = list(label_names) if label_names is not None else cfg.get("label_names")
    if labels is not None and len(labels) != model.num_classes:
        raise ValueError(f"{len(labels)} label names for a model with {model.num_classes} classes.")
    cfg = prep.clean_pretrained_cfg(cfg)
    cfg["input_size"] = (model.patch_embed.in_chans, *model.img_size)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path).expanduser()
    lacking = model.options_timm_lacks() if format in ("timm", "hf") else []
    if lacking:
        raise ValueError(
            f"{format}'s ViT has no {' and no '.join(lacking)}: the exported model would not be this one "
            "(hard attention would come back soft, a stem would not load). Use format='vitkit'."
        )
    if format == "vitkit":
        return _save_vitkit(state, config, cfg, labels, path)
    if format == "timm":
        return _save_timm(state, config, cfg, labels, path)
    if format == "hf":
        return _save_hf(state, config, cfg, labels, path)
    raise ValueError(f"format={format!r}: use 'vitkit', 'timm' or 'hf'.")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _save_file(state: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(file), metadata={"format": "pt", **metadata})


def _save_vitkit(state, config, cfg, labels, path: Path) -> Path:
    file = path if path.suffix == ".safetensors" else path / "model.safetensors"
    meta = {"format_version": 1, "config": config, "pretrained_cfg": cfg, "label_names": labels}
    _save_file(state, file, {_METADATA_KEY: json.dumps(_jsonable(meta))})
    return file


def _save_timm(state, config, cfg, labels, path: Path) -> Path:
    if config.get("pos_embed") == "none":
        raise ValueError("pos_embed='none' has no timm model_args equivalent; use format='vitkit'.")
    import timm

    name = config.get("model_name")
    architecture = name if isinstance(name, str) and timm.is_model(name) else "vit_base_patch16_224"
    if config.get("distilled") and "distilled" not in architecture:  # timm picks the class by name
        architecture = "deit_base_distilled_patch16_224"
    model_args = {k: config[k] for k in _TIMM_ARGS if k in config}
    # What config.json cannot name comes with the architecture: its MLP class, its norms' epsilon.
    arch = _timm_options_of(architecture)
    mlp_layer = config.get("mlp_layer", "mlp")
    if mlp_layer != arch.get("mlp_layer", "mlp"):
        raise ValueError(
            f"mlp_layer={mlp_layer!r}: timm's config.json cannot name an MLP class, it comes with the "
            f"architecture, and {architecture!r} has another. Name the model after a timm architecture "
            "with this MLP (vit_giant_patch14_dinov2 for 'swiglu_packed', aimv2_* for 'swiglu'), or "
            "use format='vitkit'."
        )
    norm, embed_norm = config.get("norm_layer", "layernorm"), config.get("embed_norm", False)
    if norm != arch.get("norm_layer", "layernorm"):
        model_args["norm_layer"] = norm  # by name: timm's norm of that name, with its epsilon 1e-6
    if embed_norm != arch.get("embed_norm", False):
        model_args["embed_norm_layer"] = norm if embed_norm else None
    named = "norm_layer" in model_args or "embed_norm_layer" in model_args
    eps, arch_eps = float(config.get("norm_eps", 1e-6)), 1e-6 if named else arch.get("norm_eps", 1e-6)
    if eps != arch_eps:
        raise ValueError(
            f"norm_eps={eps:g}: timm's VisionTransformer takes its norms' epsilon ({arch_eps:g} for "
            f"{architecture!r}) from code, not from config.json, so this model cannot be described there. "
            "Name it after a timm architecture with this epsilon, or use format='vitkit' or 'hf'."
        )
    if config.get("weight_init"):
        model_args["weight_init"] = config["weight_init"]
    pretrained_cfg = {**cfg, "num_classes": config["num_classes"], "architecture": architecture}
    hub_config: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": config["num_classes"],
        "num_features": config["embed_dim"],
        "global_pool": config.get("global_pool", "token"),
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }
    if labels:
        hub_config["label_names"] = list(labels)
    path.mkdir(parents=True, exist_ok=True)
    _save_file(state, path / "model.safetensors", {})
    (path / "config.json").write_text(json.dumps(_jsonable(hub_config), indent=2) + "\n")
    return path


def _timm_options_of(architecture: str) -> dict[str, Any]:
    """vitkit's options of timm's ``architecture`` as timm builds it (empty if vitkit cannot)."""
    from .checkpoint import timm_architecture_options

    try:
        return timm_architecture_options(architecture) or {}
    except ValueError:  # an architecture with parts vitkit lacks
        return {}


# vitkit's act_layer -> transformers' hidden_act
_HF_ACT_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "silu": "silu"}


def hf_export_problems(config: dict[str, Any]) -> list[str]:
    """Options of a vitkit model that transformers' ``ViTModel`` cannot express (empty: exportable)."""
    problems = []
    checks = [
        (not config.get("class_token", True), "class_token=False (transformers' ViT has a class token)"),
        (
            config.get("global_pool", "token") != "token",
            f"global_pool={config.get('global_pool')!r} (needs 'token')",
        ),
        (
            config.get("reg_tokens", 0),
            f"reg_tokens={config.get('reg_tokens')} (no registers in transformers' ViT)",
        ),
        (config.get("init_values"), "init_values (LayerScale)"),
        (config.get("qk_norm"), "qk_norm=True"),
        (config.get("pre_norm"), "pre_norm=True"),
        (config.get("no_embed_class"), "no_embed_class=True (the class token has a position there)"),
        (not config.get("final_norm", True), "final_norm=False"),
        (config.get("fc_norm"), "fc_norm=True (the final norm comes before pooling there)"),
        (config.get("pos_embed") == "none", "pos_embed='none'"),
        (
            config.get("mlp_layer", "mlp") != "mlp",
            f"mlp_layer={config.get('mlp_layer')!r} (a two-layer MLP there)",
        ),
        (config.get("act_layer", "gelu") not in _HF_ACT_NAMES, f"act_layer={config.get('act_layer')!r}"),
        (config.get("norm_layer", "layernorm") != "layernorm", f"norm_layer={config.get('norm_layer')!r}"),
        (config.get("embed_norm"), "embed_norm=True"),
        (not config.get("proj_bias", True), "proj_bias=False"),
    ]
    problems += [message for bad, message in checks if bad]
    return problems


def _save_hf(state, config, cfg, labels, path: Path) -> Path:
    problems = hf_export_problems(config)
    if problems:
        raise ValueError(
            "This model cannot be saved for transformers' ViTForImageClassification (or DeiT's): "
            + "; ".join(problems)
            + ". Use format='vitkit' or 'timm' instead."
        )
    num_classes = int(config["num_classes"])
    img, patch = tuple(config["img_size"]), tuple(config["patch_size"])
    labels = list(labels) if labels else [f"LABEL_{i}" for i in range(num_classes)]
    distilled = bool(config.get("distilled"))
    if distilled:  # transformers' DeiT: the distillation token and a head on each token, averaged
        architecture = "DeiTForImageClassificationWithTeacher" if num_classes else "DeiTModel"
    else:
        architecture = "ViTForImageClassification" if num_classes else "ViTModel"
    hf_config = {
        "architectures": [architecture],
        "model_type": "deit" if distilled else "vit",
        "hidden_size": config["embed_dim"],
        "num_hidden_layers": config["depth"],
        "num_attention_heads": config["num_heads"],
        "intermediate_size": int(config["embed_dim"] * config.get("mlp_ratio", 4.0)),
        "hidden_act": _HF_ACT_NAMES[config.get("act_layer", "gelu")],
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": float(config.get("norm_eps", 1e-6)),
        "image_size": img[0] if img[0] == img[1] else list(img),
        "patch_size": patch[0] if patch[0] == patch[1] else list(patch),
        "num_channels": config.get("in_chans", 3),
        "qkv_bias": bool(config.get("qkv_bias", True)),
        "encoder_stride": patch[0],
        "pooler_output_size": config["embed_dim"],
        "pooler_act": "tanh",
        "dtype": "float32",
    }
    if num_classes:
        hf_config["id2label"] = {str(i): str(name) for i, name in enumerate(labels)}
        hf_config["label2id"] = {str(name): i for i, name in enumerate(labels)}
    path.mkdir(parents=True, exist_ok=True)
    _save_file(vitkit_to_hf(state, bool(num_classes), distilled), path / "model.safetensors", {})
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    processor = prep.to_hf_processor(cfg, img)
    (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return path
