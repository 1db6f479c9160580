"""Files in and out for the explain CLI, the benchmark and the callback: models, images, masks."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# ----------------------------------------------------------------------------------------- models
def load_checkpoint_model(
    path: str | os.PathLike[str], **overrides: Any
) -> tuple[nn.Module, list[str] | None]:
    """A model from a vitkit training checkpoint (Lightning ``.ckpt``), and its class names.

    The architecture, preprocessing and class names are read from the checkpoint by
    :func:`vitkit.weights.read_checkpoint`; ``overrides`` change model options.
    """
    from vitkit.weights import model_from_checkpoint, read_checkpoint

    checkpoint = read_checkpoint(path)
    model = model_from_checkpoint(checkpoint, **overrides)
    return model, list(checkpoint.label_names) if checkpoint.label_names else None


def load_model(
    name: str | None,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    **overrides: Any,
) -> tuple[nn.Module, list[str] | None]:
    """``(model in eval mode, class names or None)`` from a model name and/or weights, or a training
    checkpoint. ``pretrained``: anything ``create_model`` reads, or ``"true"`` for timm's hub weights
    of ``name``; without a name, the architecture is read off the weights."""
    if checkpoint:
        model, classes = load_checkpoint_model(checkpoint, **overrides)
    else:
        if not name and not pretrained:
            raise ValueError("Give --model NAME and/or --pretrained WEIGHTS, or --checkpoint CKPT.")
        from vitkit.models import create_model

        source = True if str(pretrained).lower() == "true" else pretrained
        model = create_model(name, pretrained=source, **overrides)
        labels = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
        classes = list(labels) if labels and len(labels) == getattr(model, "num_classes", 0) else None
    return model.eval(), classes


def normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model expects: from ``model.pretrained_cfg``, else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def input_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(model, "img_size", None) or getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        raise ValueError("Cannot tell the model's input size (no img_size).")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ----------------------------------------------------------------------------------------- images
def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden files and folders skipped), sorted."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is neither an image file nor a folder.")
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def load_rgb(path: Path) -> Image.Image:
    """An image file as upright 8-bit RGB (EXIF orientation applied)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def find_images(inputs: Sequence[str | os.PathLike[str]]) -> list[tuple[Path, Path]]:
    """``(image path, root it was found under)`` for every file and every image under folders."""
    found = []
    for item in inputs:
        root = Path(item)
        if root.is_file():
            found.append((root, root.parent))
        else:
            found.extend((p, root) for p in list_images(root))
    if not found:
        raise FileNotFoundError(f"No images found in {', '.join(map(str, inputs))}.")
    return found


def _resize_crop(image: Image.Image, size: tuple[int, int], crop_pct: float, resample: int) -> Image.Image:
    """Resize so the image covers ``size / crop_pct``, then take the centre ``size`` crop."""
    h, w = size
    scale = max(h / image.height, w / image.width) / crop_pct
    new = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.resize(new, resample)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    return image.crop((left, top, left + w, top + h))


def preprocess(
    image: Image.Image, model: nn.Module, resample: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normalised (3, H, W) input, the same crop in [0, 1] for display)``.

    Resize and centre-crop to the model's ``img_size`` (with ``crop_pct`` and interpolation
    from ``model.pretrained_cfg`` when present), then normalise with its mean/std.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    resample = resample or cfg.get("interpolation", "bicubic")
    crop = _resize_crop(image, input_size(model), float(cfg.get("crop_pct", 1.0)), _RESAMPLE[resample])
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    mean, std = normalisation(model)
    normalised = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return normalised, pixels


def find_mask(image: Path, root: Path, masks: Path) -> Path | None:
    """The mask of ``image``: same relative path under ``masks`` (any image extension), else a
    file with the same stem anywhere under ``masks``."""
    relative = image.relative_to(root) if image.is_relative_to(root) else Path(image.name)
    same_place = sorted(masks.joinpath(relative.parent).glob(relative.stem + ".*"))
    if same_place:
        return same_place[0]
    matches = list(masks.rglob(image.stem + ".*"))
    return matches[0] if len(matches) == 1 else None


def load_mask(path: Path, model: nn.Module) -> torch.Tensor:
    """A binary (H, W) object mask (non-zero = object), cropped exactly like the image."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mask = Image.open(path).convert("L")
    mask = _resize_crop(mask, input_size(model), float(cfg.get("crop_pct", 1.0)), Image.NEAREST)
    return torch.from_numpy(np.asarray(mask) > 0)


def batches(
    files: list[tuple[Path, Path]],
    model: nn.Module,
    batch_size: int,
    masks: Path | None = None,
) -> Iterator[tuple[list[Path], torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``(paths, inputs (B, 3, H, W), display images, masks (B, H, W) or None)`` per batch.

    With ``masks``, images without a mask are skipped (and counted in a warning).
    """
    missing = 0
    for start in range(0, len(files), batch_size):
        paths, inputs, shown, object_masks = [], [], [], []
        for path, root in files[start : start + batch_size]:
            mask_path = find_mask(path, root, masks) if masks is not None else None
            if masks is not None and mask_path is None:
                missing += 1
                continue
            x, pixels = preprocess(load_rgb(path), model)
            paths.append(path)
            inputs.append(x)
            shown.append(pixels)
            if mask_path is not None:
                object_masks.append(load_mask(mask_path, model))
        if paths:
            yield (
                paths,
                torch.stack(inputs),
                torch.stack(shown),
                torch.stack(object_masks) if object_masks else None,
            )
    if missing:
        import warnings

        warnings.warn(f"{missing} image(s) have no mask under {masks} and were skipped.", stacklevel=2)


# ----------------------------------------------------------------------------------------- output
def format_table(rows: dict[str, dict[str, float]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table: one row per method, one column per metric."""
    columns = list(columns or dict.fromkeys(k for r in rows.values() for k in r))
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, values in rows.items():
        cells = []
        for c in columns:
            v = values.get(c)
            cells.append("—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["depth=6", "img_size=[32,48]"]`` -> ``{"depth": 6, "img_size": [32, 48]}`` (YAML values)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Expected KEY=VALUE, got {item!r}.")
        out[key.strip()] = yaml.safe_load(value)
    return out
