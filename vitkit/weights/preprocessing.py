"""Preprocessing that travels with weights: normalisation, resize interpolation, crop, input size.

A checkpoint was trained on images prepared one way; fine-tuning or evaluating it with other
constants silently costs accuracy. Each source describes this differently; everything here is
turned into one dict, timm's ``pretrained_cfg`` keys::

    {"mean": (r, g, b), "std": (r, g, b), "interpolation": "bicubic",
     "crop_pct": 0.875, "input_size": (3, 224, 224), "crop_mode": "center"}

``crop_pct`` is the evaluation crop: resize the shorter side to ``size / crop_pct``, then take
the central ``size`` crop. ``crop_mode="squash"`` (Hugging Face's ``ViTImageProcessor``) resizes
straight to ``input_size`` without keeping the aspect ratio.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PRETRAINED_CFG_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode", "input_size")

# PIL resampling codes as stored in Hugging Face preprocessor configs.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PIL_CODES = {name: code for code, name in _PIL_RESAMPLE.items()}


def clean_pretrained_cfg(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keep the preprocessing keys of a (timm) pretrained cfg, as tuples and floats."""
    out: dict[str, Any] = {}
    for key in PRETRAINED_CFG_KEYS:
        value = (cfg or {}).get(key)
        if value is None:
            continue
        if key in ("mean", "std", "input_size"):
            value = tuple(float(v) if key != "input_size" else int(v) for v in value)
        elif key == "crop_pct":
            value = float(value)
        out[key] = value
    return out


def from_hf_processor(config: Mapping[str, Any], num_channels: int = 3) -> dict[str, Any]:
    """A Hugging Face ``preprocessor_config.json`` (ViT, DeiT, ConvNeXt-style processors)."""
    mean, std = config.get("image_mean", INCEPTION_MEAN), config.get("image_std", INCEPTION_STD)
    if not config.get("do_normalize", True):
        mean, std = (0.0,) * num_channels, (1.0,) * num_channels
    if isinstance(mean, (int, float)):
        mean, std = (mean,) * num_channels, (std,) * num_channels
    # transformers feeds (pixel * rescale_factor - mean) / std for pixels in 0..255; vitkit's
    # pipeline (pixel / 255 - mean') / std'. The same numbers when mean' = mean / k and std' = std / k,
    # k = 255 * rescale_factor (1 for the usual 1/255; 255 without rescaling).
    k = 255.0 * float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 255.0
    if abs(k - 1.0) > 1e-9:
        mean, std = tuple(float(m) / k for m in mean), tuple(float(s) / k for s in std)
    resample = config.get("resample", 2)
    interpolation = _PIL_RESAMPLE.get(resample, "bilinear") if isinstance(resample, int) else str(resample)
    size = _hw(config.get("size")) if config.get("do_resize", True) else None
    crop = _hw(config.get("crop_size")) if config.get("do_center_crop") else None
    cfg: dict[str, Any] = {"mean": tuple(mean), "std": tuple(std), "interpolation": interpolation}
    if crop is not None:
        cfg["input_size"] = (num_channels, *crop)
        if "crop_pct" in config and config["crop_pct"] is not None:
            cfg["crop_pct"] = float(config["crop_pct"])
        elif size is not None:
            cfg["crop_pct"] = round(crop[0] / size[0], 4)
        cfg["crop_mode"] = "center"
    elif size is not None:
        cfg["input_size"] = (num_channels, *size)
        if (
            "crop_pct" in config
            and config["crop_pct"] is not None
            and "shortest_edge" in (config["size"] or {})
        ):
            cfg["crop_pct"], cfg["crop_mode"] = float(config["crop_pct"]), "center"  # ConvNeXt processor
        else:
            cfg["crop_pct"], cfg["crop_mode"] = 1.0, "squash"
    return clean_pretrained_cfg(cfg)


def hf_default(img_size: tuple[int, int] | None, num_channels: int = 3) -> dict[str, Any]:
    """What ``ViTImageProcessor()`` does when a checkpoint comes without a preprocessor config."""
    return _processor_default(INCEPTION_MEAN, INCEPTION_STD, "bilinear", "squash", img_size, num_channels)


def clip_default(img_size: tuple[int, int] | None, num_channels: int = 3) -> dict[str, Any]:
    """What ``CLIPImageProcessor()`` does: shortest edge to the input size (bicubic), centre crop,
    OpenAI CLIP's mean and std."""
    return _processor_default(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic", "center", img_size, num_channels)


def siglip_default(img_size: tuple[int, int] | None, num_channels: int = 3) -> dict[str, Any]:
    """What ``SiglipImageProcessor()`` does: resize to the input size (bicubic, no crop), mean/std 0.5."""
    return _processor_default(INCEPTION_MEAN, INCEPTION_STD, "bicubic", "squash", img_size, num_channels)


def dinov3_default(img_size: tuple[int, int] | None, num_channels: int = 3) -> dict[str, Any]:
    """What ``DINOv3ViTImageProcessor()`` does: resize to the input size (bilinear, no crop), ImageNet's
    mean and std."""
    return _processor_default(IMAGENET_MEAN, IMAGENET_STD, "bilinear", "squash", img_size, num_channels)


def _processor_default(
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: str,
    crop_mode: str,
    img_size: tuple[int, int] | None,
    num_channels: int,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
        "crop_pct": 1.0,
        "crop_mode": crop_mode,
    }
    if img_size is not None:
        cfg["input_size"] = (num_channels, *img_size)
    return cfg


def to_hf_processor(cfg: Mapping[str, Any], img_size: tuple[int, int]) -> dict[str, Any]:
    """A ``preprocessor_config.json`` that reproduces ``cfg`` in transformers.

    ``ViTImageProcessor`` resizes straight to the input size; with a crop (``crop_pct < 1``) the
    ``DeiTImageProcessor`` is used instead: resize to ``size / crop_pct``, take the centre crop.
    """
    h, w = img_size
    mean = [float(v) for v in cfg.get("mean", INCEPTION_MEAN)]
    std = [float(v) for v in cfg.get("std", INCEPTION_STD)]
    resample = _PIL_CODES.get(str(cfg.get("interpolation", "bicubic")), 3)
    crop_pct = float(cfg.get("crop_pct", 1.0) or 1.0)
    common = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "resample": resample,
        "do_resize": True,
    }
    if crop_pct >= 1.0 or cfg.get("crop_mode") == "squash":
        return {"image_processor_type": "ViTImageProcessor", **common, "size": {"height": h, "width": w}}
    size = {"height": round(h / crop_pct), "width": round(w / crop_pct)}
    return {
        "image_processor_type": "DeiTImageProcessor",
        **common,
        "size": size,
        "do_center_crop": True,
        "crop_size": {"height": h, "width": w},
    }


def from_torchvision_weights(weights: Any) -> dict[str, Any]:
    """The eval transform of a torchvision weights enum (e.g. ``ViT_B_16_Weights.IMAGENET1K_V1``)."""
    t = weights.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    return {
        "mean": tuple(float(v) for v in t.mean),
        "std": tuple(float(v) for v in t.std),
        "interpolation": str(getattr(t.interpolation, "value", t.interpolation)),
        "crop_pct": round(crop / resize, 4),
        "crop_mode": "center",
        "input_size": (3, crop, crop),
    }


def torchvision_default(img_size: int = 224) -> dict[str, Any]:
    """torchvision's classification preset (ImageNet statistics, resize 256 / crop 224, bilinear)."""
    return {
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bilinear",
        "crop_pct": round(img_size / round(img_size * 256 / 224), 4),
        "crop_mode": "center",
        "input_size": (3, img_size, img_size),
    }


def _hw(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    if isinstance(size, Mapping):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
        return None
    return int(size[0]), int(size[1])
