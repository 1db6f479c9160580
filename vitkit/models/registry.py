"""Named model configurations: ``create_model("vit_small_patch16_224", num_classes=10)``.

Each name maps to the options of :class:`VisionTransformer`, named as timm names them, so a
timm user finds the same model behind the same name. Any option can be overridden by keyword.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .vision_transformer import VisionTransformer

_MODEL_CONFIGS: dict[str, dict[str, Any]] = {}

# Normalisation most ViT checkpoints use (timm's augreg / big_vision "inception" constants).
_INCEPTION_MEAN_STD = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
_IMAGENET_MEAN_STD = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_CIFAR10_MEAN_STD = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}


def register_model(name: str, **options: Any) -> None:
    """Register ``name`` as a :class:`VisionTransformer` with these default options.

    A ``pretrained_cfg`` option (dict: mean, std, interpolation, crop_pct, input_size...) is not
    passed to the model but attached to it as ``model.pretrained_cfg``.
    """
    if name in _MODEL_CONFIGS:
        raise ValueError(f"A model named {name!r} is already registered.")
    _MODEL_CONFIGS[name] = options


def list_models(pattern: str = "*", timm: bool = False) -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (e.g. ``"vit_*_patch16_*"``), sorted.

    With ``timm=True``, also the timm ViT architectures vitkit can build under their timm names
    (see :func:`model_config`); each candidate is built on the meta device to check: about half a
    minute for all of timm's ViTs on a 2-core CPU, less with a narrower ``pattern``.
    """
    names = {n for n in _MODEL_CONFIGS if fnmatch.fnmatchcase(n, pattern)}
    if timm:
        import timm as timm_lib

        candidates = timm_lib.list_models(pattern, module=["vision_transformer", "deit", "eva", "beit"])
        names.update(n for n in candidates if n not in names and _builds_from_timm(n))
    return sorted(names)


def _builds_from_timm(arch: str) -> bool:
    """Whether vitkit builds the timm architecture ``arch`` (checked on the meta device)."""
    try:
        with torch.device("meta"):
            VisionTransformer(**_timm_options(arch))
    except ValueError:  # a part vitkit lacks, or a size it refuses (not a multiple of the patch)
        return False
    return True


def model_config(name: str) -> dict[str, Any]:
    """A copy of the default options of the model ``name``.

    ``name`` is a registered name (:func:`list_models`) or, as in ``timm.create_model``, any timm
    ViT architecture that vitkit's :class:`VisionTransformer` can express (``vit_small_patch14_dinov2``,
    ``deit3_base_patch16_224``, ``vit_base_patch16_clip_224``...): its options are read off timm's
    model, built on the meta device. A pretrained tag (``vit_small_patch16_224.augreg_in21k``)
    selects that tag's preprocessing and class count, as in timm. A timm architecture with parts
    vitkit lacks (a SwiGLU MLP, an attention-pooling head...) raises an error that names them.
    """
    if name in _MODEL_CONFIGS:  # a registered name is taken whole, even with a dot in it
        return dict(_MODEL_CONFIGS[name])
    arch, _, tag = name.partition(".")
    options = dict(_MODEL_CONFIGS[arch]) if arch in _MODEL_CONFIGS else dict(_timm_options(arch))
    if tag or arch not in _MODEL_CONFIGS:
        timm_cfg = _timm_pretrained_cfg(name)
        if timm_cfg:
            from vitkit.weights.preprocessing import clean_pretrained_cfg

            options["pretrained_cfg"] = clean_pretrained_cfg(timm_cfg)
            if tag and timm_cfg.get("num_classes") is not None:
                options["num_classes"] = int(timm_cfg["num_classes"])
        elif tag:
            import timm

            tags = ", ".join(n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*"))
            known = f"timm's tags for it: {tags}." if tags else "timm has no pretrained weights for it."
            raise ValueError(f"Unknown pretrained tag {tag!r} of {arch!r}. {known}")
    return options


@functools.lru_cache(maxsize=64)
def _timm_options(arch: str) -> dict[str, Any]:
    """Options of an architecture only timm registers (cached: copy before changing them); the usual
    unknown-model error otherwise."""
    from vitkit.weights.checkpoint import timm_architecture_options

    options = timm_architecture_options(arch)  # raises when timm has it but vitkit cannot express it
    if options is None:
        close = fnmatch.filter(_MODEL_CONFIGS, f"*{arch.split('_patch')[0]}*") or list_models()
        raise ValueError(
            f"Unknown model {arch!r}: not a vitkit model, nor a timm ViT vitkit can build. "
            f"Some vitkit models: {', '.join(close[:8])}."
        )
    return options


def _timm_pretrained_cfg(name: str) -> dict[str, Any] | None:
    """timm's pretrained cfg for ``name`` (``arch`` or ``arch.tag``) as a dict, or None."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # timm knows the architecture but not this tag
        return None
    return cfg.to_dict() if cfg is not None else None


def create_model(
    name: str | None = None,
    pretrained: bool | str | Path | None = None,
    *,
    checkpoint_path: str | Path | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] = 3,
    feature_cfg: dict[str, Any] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally loading pretrained weights.

    Args:
        name: a name from :func:`list_models`, or as in timm ``hf-hub:REPO`` / ``local-dir:FOLDER``
            (the architecture, and with ``pretrained=True`` the weights, of that repository or
            folder). Without a name, ``pretrained`` is required and the architecture is read off
            the checkpoint (see :func:`vitkit.weights.model_from_checkpoint`).
        pretrained: the weights to load: a ``.safetensors`` / ``.pth`` / ``.bin`` / ``.ckpt`` /
            ``.npz`` file (timm, vitkit, Hugging Face, torchvision or big_vision layout), a Hugging
            Face ``save_pretrained`` folder, or a hub name (``timm:NAME[.TAG]``, ``hf:REPO``,
            ``torchvision:vit_b_16``). ``True``, as in ``timm.create_model(name, pretrained=True)``:
            the weights timm hosts for ``name`` (its default tag, or the tag in the name), downloaded
            once into the Hugging Face cache. ``False`` or ``None``: none. A new ``num_classes``
            re-initialises the head, a new ``img_size`` resamples the position embeddings, a new
            ``patch_size`` the patch kernel; anything else that does not fit raises an error naming
            the option.
        checkpoint_path: as timm's: weights loaded after building (and after ``pretrained``).
        pretrained_cfg_overlay: as timm's: entries that replace the model's ``pretrained_cfg``
            (mean, std, crop_pct...). With ``pretrained=True``, a ``file`` entry (a local weights
            file) or ``hf_hub_id`` entry (a Hub repository) says where the weights are.
        features_only: return a :class:`~vitkit.models.features.FeatureExtractor` (as timm's
            ``features_only``): the feature maps of blocks ``out_indices``, the head dropped.
        out_indices: the blocks it returns: an int n for the last n, or block indices.
        feature_cfg: more :class:`~vitkit.models.features.FeatureExtractor` options
            (``output_fmt``, ``norm``).
        **overrides: any :class:`VisionTransformer` option, e.g. ``num_classes=10, img_size=32``.

    Returns:
        The model, in train mode like a freshly constructed ``nn.Module``; its
        ``pretrained_cfg`` holds the preprocessing (mean, std, interpolation, crop_pct,
        input_size) of the checkpoint, else of the registered model.
    """
    overlay = dict(pretrained_cfg_overlay or {})
    if pretrained is True and (overlay.get("file") or overlay.get("hf_hub_id")):
        pretrained = overlay["file"] if overlay.get("file") else f"hf:{overlay['hf_hub_id']}"
    if pretrained is False:
        pretrained = None
    if name is not None and name.startswith(("hf-hub:", "local-dir:")):  # timm's names of a repo, a folder
        scheme, _, where = name.partition(":")
        source = f"hf:{where}" if scheme == "hf-hub" else where
        if pretrained not in (None, True):
            raise ValueError(
                f"create_model({name!r}) takes its weights from there: pass pretrained=True or False."
            )
        name, pretrained, fresh = None, source, pretrained is None
    else:
        fresh = False
    if name is None:
        if pretrained is None or pretrained is True:
            raise TypeError(
                "create_model needs a model name, or pretrained=... to read the architecture from."
            )
        from vitkit.weights import model_from_checkpoint

        model = model_from_checkpoint(pretrained, **overrides)
        if fresh:  # the repo's architecture, new weights (timm's pretrained=False)
            model.init_weights(model.config.get("weight_init", ""))
    else:
        model = _build(name, _timm_hub_name(name) if pretrained is True else pretrained, overrides)
    if checkpoint_path is not None:
        from vitkit.weights import load_pretrained

        load_pretrained(model, checkpoint_path)
    model.pretrained_cfg.update({k: v for k, v in overlay.items() if k not in ("file", "hf_hub_id")})
    if features_only:
        from .features import FeatureExtractor

        return FeatureExtractor(model, out_indices, **(feature_cfg or {}))
    return model


def _build(name: str, pretrained: str | Path | None, overrides: dict[str, Any]) -> VisionTransformer:
    """The model ``name`` with ``overrides``, loaded from ``pretrained`` if given."""
    options = model_config(name)
    pretrained_cfg = dict(options.pop("pretrained_cfg", {}))
    checkpoint = None
    if pretrained is not None:
        from vitkit.weights import read_checkpoint

        checkpoint = read_checkpoint(pretrained)  # read once: it also tells the LayerNorm epsilon
        if "norm_eps" in checkpoint.options and "norm_eps" not in overrides:
            options["norm_eps"] = checkpoint.options["norm_eps"]
    options.update(overrides)
    try:
        model = VisionTransformer(**options)
    except TypeError as err:  # an unknown keyword: name it and list the valid ones
        raise TypeError(f"create_model({name!r}): {err}. Valid options: {_option_names()}.") from None
    pretrained_cfg.setdefault("input_size", (model.patch_embed.in_chans, *model.img_size))
    model.pretrained_cfg = pretrained_cfg
    model.config["model_name"] = name
    if checkpoint is not None:
        from vitkit.weights import load_pretrained

        load_pretrained(model, checkpoint)
    return model


def _timm_hub_name(name: str) -> str:
    """``timm:<name>`` when timm hosts weights for ``name`` (``arch`` or ``arch.tag``); else a clear error."""
    import timm

    arch, _, tag = name.partition(".")
    if timm.is_model(arch) and timm.list_pretrained(f"{arch}.{tag or '*'}"):
        return f"timm:{name}"
    raise ValueError(
        f"pretrained=True loads the weights timm hosts for a model name, and timm has none for {name!r}. "
        "Pass the weights instead: a file or folder, or a hub name such as pretrained='timm:NAME.TAG', "
        "'hf:REPO' or 'torchvision:vit_b_16'."
    )


def _option_names() -> str:
    import inspect

    return ", ".join(p for p in inspect.signature(VisionTransformer).parameters)


def _register_defaults() -> None:
    sizes: dict[str, dict[str, Any]] = {
        "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
        "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
        "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
        "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
        "huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
    }
    imagenet = {"pretrained_cfg": {**_INCEPTION_MEAN_STD, "interpolation": "bicubic", "crop_pct": 0.9}}
    for size, patch in [
        ("tiny", 16),
        ("small", 16),
        ("small", 32),
        ("base", 16),
        ("base", 32),
        ("base", 8),
        ("large", 16),
        ("large", 32),
        ("huge", 14),
    ]:
        register_model(f"vit_{size}_patch{patch}_224", patch_size=patch, **sizes[size], **imagenet)
    for size in ("tiny", "small", "base"):
        register_model(f"vit_{size}_patch16_384", img_size=384, patch_size=16, **sizes[size], **imagenet)
        # DeiT: ImageNet-1k only, ImageNet mean/std.
        register_model(
            f"deit_{size}_patch16_224",
            patch_size=16,
            **sizes[size],
            pretrained_cfg={**_IMAGENET_MEAN_STD, "interpolation": "bicubic", "crop_pct": 0.875},
        )
    # Registers (Darcet et al. 2024), positions for patches only, as timm's *_reg4 models.
    for size in ("small", "base"):
        register_model(
            f"vit_{size}_patch16_reg4_gap_256",
            img_size=256,
            patch_size=16,
            class_token=False,
            reg_tokens=4,
            no_embed_class=True,
            global_pool="avg",
            **sizes[size],
            **imagenet,
        )
    # "Better plain ViT baselines" (Beyer et al. 2022): sincos positions, no class token, GAP.
    for size in ("small", "base"):
        register_model(
            f"simple_vit_{size}_patch16_224",
            patch_size=16,
            class_token=False,
            global_pool="avg",
            fc_norm=False,
            pos_embed="sincos",
            weight_init="jax",
            **sizes[size],
            **imagenet,
        )
    # Small images (CIFAR-size, 32x32): 4x4 patches give an 8x8 grid.
    small_images = {
        "img_size": 32,
        "patch_size": 4,
        "num_classes": 10,
        "pretrained_cfg": {**_CIFAR10_MEAN_STD, "interpolation": "bilinear", "crop_pct": 1.0},
    }
    register_model("vit_nano_patch4_32", embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, **small_images)
    register_model("vit_tiny_patch4_32", **sizes["tiny"], **small_images)
    register_model("vit_small_patch4_32", **sizes["small"], **small_images)
    register_model(
        "vit_tiny_patch4_32_gap",
        **sizes["tiny"],
        class_token=False,
        global_pool="avg",
        pos_embed="sincos",
        **small_images,
    )


_register_defaults()
