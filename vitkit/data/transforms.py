"""Train and eval transforms (torchvision.transforms.v2, timm for what v2 lacks), and Mixup/CutMix.

Train (per image, PIL or uint8 tensor in, normalised float tensor out)::

    RandomResizedCrop(img_size, scale, ratio) -> HorizontalFlip(p) -> [auto augment] -> [ColorJitter]
    -> float in [0, 1] -> Normalize(mean, std) -> [RandomErasing(re_prob)]

Eval: resize the short side to ``floor(img_size / crop_pct)``, centre-crop ``img_size``, normalise
(timm's convention: ``crop_pct = 0.875`` shows the central 87.5 % of a 256-pixel image at 224).

Mean, std, interpolation, crop_pct and input size default to ImageNet's and are taken from a
model's ``pretrained_cfg`` when given; explicit arguments win over both.

Mixup / CutMix work on whole batches and turn integer labels into soft targets (B, C), rows
summing to 1, so the loss sees the mixed labels: see :class:`BatchMixer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_aa
from timm.data.auto_augment import (
    augment_and_mix_transform,
    auto_augment_transform,
    rand_augment_transform,
)
from timm.data.random_erasing import RandomErasing
from torch.nn import functional as F
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875
DEFAULT_INTERPOLATION = "bicubic"
DEFAULT_IMG_SIZE = 224

AUTO_AUGMENT_NAMES = ("randaugment", "trivialaugment", "autoaugment", "augmix", "3augment")
"""torchvision-backed policies by name; timm policy strings (``rand-m9-mstd0.5-inc1``,
``augmix-m5-w4-d2``, ``original``, ``v0``, ``3a``) are also accepted and built by timm."""


@dataclass(frozen=True)
class DataConfig:
    """The preprocessing a model expects: input size, normalisation, resampling and eval crop ratio."""

    img_size: int = DEFAULT_IMG_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = DEFAULT_INTERPOLATION
    crop_pct: float = DEFAULT_CROP_PCT

    @property
    def resize_size(self) -> int:
        """The short side images are resized to before the eval centre crop: floor(img_size / crop_pct)."""
        return math.floor(self.img_size / self.crop_pct)


def resolve_data_config(
    pretrained_cfg: Mapping[str, Any] | None = None,
    *,
    img_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> DataConfig:
    """Explicit arguments, else the model's ``pretrained_cfg`` (timm keys), else ImageNet defaults.

    ``pretrained_cfg`` keys used: ``mean``, ``std``, ``interpolation``, ``crop_pct`` and
    ``input_size`` ((C, H, W); H is taken as the square image size).
    """
    cfg = dict(pretrained_cfg or {})
    if img_size is None and cfg.get("input_size") is not None:
        img_size = int(cfg["input_size"][-2])
    config = DataConfig(
        img_size=int(img_size or DEFAULT_IMG_SIZE),
        mean=tuple(float(v) for v in (mean if mean is not None else cfg.get("mean", IMAGENET_MEAN))),
        std=tuple(float(v) for v in (std if std is not None else cfg.get("std", IMAGENET_STD))),
        interpolation=str(interpolation or cfg.get("interpolation") or DEFAULT_INTERPOLATION),
        crop_pct=float(crop_pct if crop_pct is not None else cfg.get("crop_pct") or DEFAULT_CROP_PCT),
    )
    if len(config.mean) != 3 or len(config.std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {config.mean} and {config.std}.")
    if not 0.0 < config.crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {config.crop_pct}.")
    interpolation_mode(config.interpolation)  # validate early
    return config


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """``"bicubic"`` -> ``InterpolationMode.BICUBIC`` (nearest, bilinear, bicubic, lanczos...)."""
    try:
        return v2.InterpolationMode(name.lower())
    except ValueError:
        options = ", ".join(m.value for m in v2.InterpolationMode)
        raise ValueError(f"Unknown interpolation {name!r}; use one of {options}.") from None


def build_auto_augment(
    name: str | None, img_size: int, mean: Sequence[float] = IMAGENET_MEAN, interpolation: str = "bicubic"
) -> list[Callable[[Any], Any]]:
    """The auto-augment stage for ``name`` (empty for ``None`` / ``"none"``).

    torchvision v2: ``randaugment`` (2 ops, magnitude 9), ``trivialaugment`` (TrivialAugmentWide),
    ``autoaugment`` (ImageNet policy), ``augmix``. timm (PIL-only, a PIL conversion is inserted):
    ``3augment`` / ``3a`` (DeiT III: one of grayscale, solarize, blur), and timm policy strings such
    as ``rand-m9-mstd0.5-inc1``, ``augmix-m5-w4-d2``, ``original``, ``v0``.
    """
    if name is None or name.lower() in ("", "none"):
        return []
    key = name.lower()
    mode = interpolation_mode(interpolation)
    if mode not in (v2.InterpolationMode.NEAREST, v2.InterpolationMode.BILINEAR):
        mode = v2.InterpolationMode.BILINEAR  # v2's geometric ops on tensors support these two
    if key == "randaugment":
        return [v2.RandAugment(interpolation=mode)]
    if key in ("trivialaugment", "trivialaugmentwide", "ta_wide"):
        return [v2.TrivialAugmentWide(interpolation=mode)]
    if key == "autoaugment":
        return [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=mode)]
    if key == "augmix":
        return [v2.AugMix(interpolation=mode)]
    # timm builds the rest; its ops work on PIL images only.
    hparams: dict[str, Any] = {
        "translate_const": int(img_size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
    }
    if key in ("3augment", "3aug", "three_augment"):
        key = "3a"
    if key.startswith("rand-") or key == "rand":
        op = rand_augment_transform(name, hparams)
    elif key.startswith("augmix"):
        op = augment_and_mix_transform(name, {**hparams, "translate_pct": 0.3})
    elif key.split("-")[0] in ("original", "originalr", "v0", "v0r", "3a"):
        op = auto_augment_transform(key if key == "3a" else name, hparams)
    else:
        raise ValueError(
            f"Unknown auto_augment {name!r}. Use one of {', '.join(AUTO_AUGMENT_NAMES)}, "
            "or a timm policy string such as 'rand-m9-mstd0.5-inc1'."
        )
    return [v2.ToPILImage(), _allow_zero_bit_posterize(op)]


def _posterize(image: Image.Image, bits: int, **_: Any) -> Image.Image:
    """timm's posterize, also for 0 bits kept (a black image, as Pillow < 13 gave; Pillow 13 raises)."""
    if bits >= 1:
        return ImageOps.posterize(image, bits)
    return Image.new(image.mode, image.size)


def _allow_zero_bit_posterize(transform: Any) -> Any:
    """Swap timm's posterize for :func:`_posterize` in a timm policy. At magnitude 10 (reached by
    ``rand-m9-mstd0.5``) timm's increasing posterize keeps 0 bits, which Pillow >= 13 rejects."""
    ops = list(getattr(transform, "ops", []))
    for sub_policy in getattr(transform, "policy", []):
        ops.extend(sub_policy)
    for op in ops:
        if getattr(op, "aug_fn", None) is timm_aa.posterize:
            op.aug_fn = _posterize
    return transform


def build_color_jitter(value: float | Sequence[float]) -> v2.ColorJitter | None:
    if isinstance(value, (int, float)):
        return v2.ColorJitter(value, value, value) if value > 0 else None
    if len(value) not in (3, 4):
        raise ValueError(
            f"color_jitter is a float or (brightness, contrast, saturation[, hue]), got {value}."
        )
    return v2.ColorJitter(*value)


def build_train_transform(
    img_size: int = DEFAULT_IMG_SIZE,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    auto_augment: str | None = None,
    color_jitter: float | Sequence[float] = 0.0,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> v2.Compose:
    """The training pipeline (see the module docstring). Accepts PIL images and uint8 (3, H, W) tensors.

    Random erasing is timm's (``re_mode="pixel"`` fills with per-pixel normal noise, as DeiT does).
    """
    steps: list[Callable[[Any], Any]] = [
        v2.RandomResizedCrop(
            img_size,
            scale=scale,
            ratio=ratio,
            interpolation=interpolation_mode(interpolation),
            antialias=True,
        )
    ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps += build_auto_augment(auto_augment, img_size, mean, interpolation)
    jitter = build_color_jitter(color_jitter)
    if jitter is not None:
        steps.append(jitter)
    steps += to_normalized_tensor(mean, std)
    if re_prob > 0:
        steps.append(RandomErasing(re_prob, mode=re_mode, device="cpu"))
    return v2.Compose(steps)


def build_eval_transform(
    img_size: int = DEFAULT_IMG_SIZE,
    *,
    crop_pct: float = DEFAULT_CROP_PCT,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> v2.Compose:
    """Resize the short side to ``floor(img_size / crop_pct)``, centre-crop ``img_size``, normalise."""
    resize = DataConfig(img_size=img_size, crop_pct=crop_pct).resize_size
    return v2.Compose(
        [
            v2.Resize(resize, interpolation=interpolation_mode(interpolation), antialias=True),
            v2.CenterCrop(img_size),
            *to_normalized_tensor(mean, std),
        ]
    )


def to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Callable[[Any], Any]]:
    """PIL / uint8 -> float32 in [0, 1] -> (x - mean) / std -> plain tensor, as v2 steps."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ]


def transforms_from_config(config: DataConfig, **train_options: Any) -> tuple[v2.Compose, v2.Compose]:
    """(train, eval) transforms for a :class:`DataConfig`; ``train_options`` go to the train builder."""
    common = {"mean": config.mean, "std": config.std, "interpolation": config.interpolation}
    train = build_train_transform(config.img_size, **common, **train_options)
    return train, build_eval_transform(config.img_size, crop_pct=config.crop_pct, **common)


class BatchMixer:
    """Mixup / CutMix on a batch: (images (B, 3, H, W), int labels (B,)) -> (mixed, soft targets (B, C)).

    With probability ``prob`` the batch is mixed with its rolled copy: by CutMix (pasting a box,
    lam = kept area) with probability ``switch_prob`` when both are enabled, else by Mixup
    (x = lam·x + (1 - lam)·x_rolled, lam ~ Beta(alpha, alpha)); targets get the same lam. Otherwise
    the targets are one-hot. Every row of the targets sums to 1. Built on torchvision's v2.MixUp and
    v2.CutMix; randomness comes from the global torch RNG.

    Args:
        num_classes: C.
        mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that kind.
        prob: probability of mixing a batch at all.
        switch_prob: probability of CutMix rather than Mixup when both are enabled.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
    ) -> None:
        self.num_classes = num_classes
        self.prob = prob
        self.switch_prob = switch_prob
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup is not None or self.cutmix is not None)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.ndim != 1:
            raise ValueError(f"BatchMixer expects integer labels of shape (B,), got {tuple(labels.shape)}.")
        labels = labels.long()
        if not self.enabled or torch.rand(()).item() >= self.prob:
            return images, F.one_hot(labels, self.num_classes).to(images.dtype)
        if self.mixup is not None and self.cutmix is not None:
            use_cutmix = torch.rand(()).item() < self.switch_prob
            mixer = self.cutmix if use_cutmix else self.mixup
        else:
            mixer = self.mixup or self.cutmix
        mixed, targets = mixer(images, labels)
        return mixed.as_subclass(torch.Tensor), targets.to(images.dtype)
