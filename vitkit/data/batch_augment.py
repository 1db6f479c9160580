"""Augment a whole batch at once, on whatever device the batch is on.

Per-image augmentation (torchvision v2, timm's PIL ops) runs one image at a time in the loader
workers. On a CPU that is fine, the model is slower still; but a GPU trains a small ViT on tens of
thousands of CIFAR images a second, and a few workers applying RandAugment image by image cannot
keep up. Here every step is a tensor op over the whole batch ``x: (B, 3, H, W)``, so it runs where
the batch is (on the GPU after the transfer, or in one CPU worker) with no Python loop over images.

Every image still draws its own operation and magnitude. The trick: each operation of the policy
is computed for the whole batch, and each image keeps the result of the one it drew::

    out = where(choice == k, op_k(x, level), out)        for k = 1 .. K

The work is the same whatever was drawn, and the host never reads a random number back from the
device (no boolean indexing, no ``.item()``), so on a GPU the CPU queues the augmentation and the
next training step without waiting. The geometric operations (rotate, shear, translate) become one
affine matrix per image and share a single ``grid_sample``.

Images are float with values in [0, 255] (what a crop of uint8 data gives) until normalisation.

- :class:`BatchRandAugment`: RandAugment / TrivialAugment, from a timm policy string
  (``"rand-m9-mstd0.5-inc1"``) or torchvision's names (``"randaugment"``, ``"trivialaugment"``).
- :func:`batch_color_jitter`, :func:`batch_random_erasing`: per-image colour jitter and erasing;
  :func:`random_resized_crop_boxes`: torchvision's RandomResizedCrop boxes for a whole batch.
- The operations themselves (``adjust_brightness`` ... ``equalize``, :func:`affine_warp`), each for
  per-image parameters of shape (B,).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from einops import rearrange, repeat
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

# -- the operations: x float (B, 3, H, W) in [0, 255], one parameter per image (B,) ---------------


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def device_constant(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``torch.tensor(values)`` on ``like``'s device and dtype, made once and then reused.

    Copying host data to a GPU with ``torch.tensor(..., device=...)`` makes the CPU wait for the
    device (PyTorch synchronises the stream after a blocking copy); constants are copied once.
    """
    key = (tuple(float(v) for v in values), like.device, like.dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(key[0], dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


def _per_image(value: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1), to broadcast a per-image parameter over its pixels."""
    return rearrange(value, "b -> b 1 1 1")


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601, as PIL and torchvision): 0.299 R + 0.587 G + 0.114 B, shape (B, 1, H, W)."""
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: ``degenerate + factor · (x - degenerate)``, clamped to [0, 255].

    factor 0 gives the degenerate image, 1 the original, above 1 pushes away from the degenerate.
    """
    return torch.lerp(degenerate, x, _per_image(factor).to(x.dtype)).clamp_(0, 255)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black."""
    return blend(torch.zeros_like(x), x, factor)


def adjust_color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Saturation: blend with the image's own grey version."""
    return blend(grayscale(x).expand_as(x), x, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with a flat image at the mean grey level of each image."""
    mean = grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return blend(mean.expand_as(x), x, factor)


def adjust_sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with a smoothed copy (3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13; border pixels kept).

    The kernel is the 3x3 box sum plus 4 x the centre: (9 · avg_pool3x3(x) + 4 · x) / 13.
    """
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = (9.0 * F.avg_pool2d(x, 3, stride=1) + 4.0 * x[..., 1:-1, 1:-1]) / 13.0
    return blend(smooth, x, factor)


def invert(x: torch.Tensor) -> torch.Tensor:
    return 255.0 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` (0-8) most significant bits of every value; 0 bits gives black."""
    step = _per_image(torch.exp2(8.0 - bits.to(x.dtype)))
    return torch.floor(x.round() / step) * step


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the values at or above ``threshold``."""
    return torch.where(x >= _per_image(threshold), 255.0 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor, threshold: float = 128.0) -> torch.Tensor:
    """Add ``add`` to the values below ``threshold`` (capped at 255); timm's SolarizeAdd."""
    return torch.where(x < threshold, (x + _per_image(add)).clamp(max=255.0), x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to span [0, 255] (flat channels are left alone)."""
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    flat = high <= low
    scale = 255.0 / torch.where(flat, torch.ones_like(high), high - low)
    return torch.where(flat, x, ((x - low) * scale).clamp_(0, 255))


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel, as PIL does it (torchvision's batched uint8 kernel)."""
    return TF.equalize(x.round().clamp(0, 255).to(torch.uint8)).to(x.dtype)


def affine_warp(x: torch.Tensor, matrix: torch.Tensor, fill: Sequence[float] | float = 128.0) -> torch.Tensor:
    """Warp every image by its own affine map, bilinearly; outside pixels take ``fill``.

    ``matrix`` (B, 2, 3) maps each *output* pixel to where it is read from in the input, in pixel
    units with the origin at the image centre: ``p_in = M · p_out + t`` (PIL's convention for
    ``Image.transform``, about the centre). ``grid_sample`` wants the same map in coordinates
    normalised to [-1, 1] per axis: with D = diag(W/2, H/2), ``theta = D⁻¹ M D | D⁻¹ t``.
    """
    b, c, h, w = x.shape
    scale = device_constant([1.0, h / w, 2 / w, w / h, 1.0, 2 / h], like=matrix)  # D⁻¹ · D entries
    theta = matrix * rearrange(scale, "(i j) -> 1 i j", i=2)
    grid = F.affine_grid(theta.to(x.dtype), [b, c, h, w], align_corners=False)
    fill_t = device_constant([fill] * c if isinstance(fill, int | float) else fill, like=x).view(1, -1, 1, 1)
    # zeros outside the image, so shift by the fill colour first: fill + warp(x - fill)
    return (
        F.grid_sample(x - fill_t, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill_t
    )


def _matrices(linear: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(B, 2, 2) linear parts and (B, 2) shifts -> (B, 2, 3) affine matrices."""
    return torch.cat([linear, shift.unsqueeze(-1)], dim=2)


def rotation(degrees: torch.Tensor) -> torch.Tensor:
    """(B,) angles -> (B, 2, 3): the content turns counter-clockwise for positive angles (as PIL)."""
    a = torch.deg2rad(degrees)
    cos, sin = torch.cos(a), torch.sin(a)
    linear = rearrange(torch.stack([cos, -sin, sin, cos], dim=1), "b (i j) -> b i j", i=2)
    return _matrices(linear, torch.zeros_like(linear[:, 0]))


def shear(factor: torch.Tensor, axis: int) -> torch.Tensor:
    """(B,) factors -> (B, 2, 3): ``x_in = x_out + f·y_out`` (axis 0) or ``y_in = y_out + f·x_out``."""
    linear = repeat(torch.eye(2, dtype=factor.dtype, device=factor.device), "i j -> b i j", b=len(factor))
    linear = linear.clone()
    linear[:, axis, 1 - axis] = factor
    return _matrices(linear, torch.zeros_like(linear[:, 0]))


def translation(pixels: torch.Tensor, axis: int) -> torch.Tensor:
    """(B,) shifts -> (B, 2, 3): the content moves by ``-pixels`` along x (axis 0) or y (axis 1)."""
    linear = repeat(torch.eye(2, dtype=pixels.dtype, device=pixels.device), "i j -> b i j", b=len(pixels))
    shift = torch.zeros_like(linear[:, 0])
    shift[:, axis] = pixels
    return _matrices(linear, shift)


# -- policies: which operations, and how a level in [0, 1] becomes each one's argument -------------


@dataclass(frozen=True)
class _Op:
    """One operation of a policy. ``apply(x, level, sign)`` for colour operations; ``matrix(level,
    sign, height, width)`` -> (B, 2, 3) for geometric ones. ``level`` in [0, 1], ``sign`` ±1 (B,)."""

    name: str
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    matrix: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor] | None = None


def _identity() -> _Op:
    return _Op("Identity", lambda x, level, sign: x)


def _rotate(max_degrees: float) -> _Op:
    return _Op("Rotate", matrix=lambda level, sign, h, w: rotation(level * max_degrees * sign))


def _shear(axis: int, max_factor: float) -> _Op:
    def matrix(level: torch.Tensor, sign: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return shear(level * max_factor * sign, axis)

    return _Op("ShearX" if axis == 0 else "ShearY", matrix=matrix)


def _translate(axis: int, max_fraction: float | None = None, max_pixels: float | None = None) -> _Op:
    """Up to ``max_fraction`` of the image side (timm's ``TranslateXRel``), or ``max_pixels`` pixels."""

    def matrix(level: torch.Tensor, sign: torch.Tensor, h: int, w: int) -> torch.Tensor:
        limit = max_pixels if max_pixels is not None else max_fraction * (w if axis == 0 else h)
        return translation(level * limit * sign, axis)

    name = ("TranslateX" if axis == 0 else "TranslateY") + ("Rel" if max_pixels is None else "")
    return _Op(name, matrix=matrix)


def _enhance(name: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], factor) -> _Op:
    return _Op(name, lambda x, level, sign: fn(x, factor(level, sign)))


_ENHANCE = {
    "Brightness": adjust_brightness,
    "Color": adjust_color,
    "Contrast": adjust_contrast,
    "Sharpness": adjust_sharpness,
}


def _timm_ops(increasing: bool, translate_pct: float = 0.45) -> list[_Op]:
    """timm's RandAugment operations (``_RAND_TRANSFORMS`` / ``_RAND_INCREASING_TRANSFORMS``), in
    its order, with its level-to-argument rules (``level`` = magnitude / 10)."""
    if increasing:  # severity grows with the level in every operation

        def factor(level, sign):
            return (1.0 + 0.9 * level * sign).clamp(min=0.1)

        def bits(level):
            return 4 - torch.floor(4 * level)

        def threshold(level):
            return 256 - torch.floor(256 * level)

        suffix = "Increasing"
    else:  # timm's original rules: posterize and solarize get *milder* with the level

        def factor(level, sign):
            return 1.8 * level + 0.1

        def bits(level):
            return torch.floor(4 * level)

        def threshold(level):
            return torch.floor(256 * level)

        suffix = ""
    return [
        _Op("AutoContrast", lambda x, level, sign: autocontrast(x)),
        _Op("Equalize", lambda x, level, sign: equalize(x)),
        _Op("Invert", lambda x, level, sign: invert(x)),
        _rotate(30.0),
        _Op("Posterize" + suffix, lambda x, level, sign: posterize(x, bits(level))),
        _Op("Solarize" + suffix, lambda x, level, sign: solarize(x, threshold(level))),
        _Op("SolarizeAdd", lambda x, level, sign: solarize_add(x, torch.floor(110 * level))),
        *(
            _enhance(name + suffix, _ENHANCE[name], factor)
            for name in ("Color", "Contrast", "Brightness", "Sharpness")
        ),
        _shear(0, 0.3),
        _shear(1, 0.3),
        _translate(0, translate_pct),
        _translate(1, translate_pct),
    ]


def _torchvision_ops(wide: bool) -> list[_Op]:
    """torchvision's RandAugment (``wide=False``) / TrivialAugmentWide operations and ranges."""
    shear_max, rotate_max, enhance_max, posterize_drop = (
        (0.99, 135.0, 0.99, 6) if wide else (0.3, 30.0, 0.9, 4)
    )

    def factor(level, sign):
        return 1.0 + enhance_max * level * sign

    translate = {"max_pixels": 32.0} if wide else {"max_fraction": 150.0 / 331.0}
    return [
        _identity(),
        _shear(0, shear_max),
        _shear(1, shear_max),
        _translate(0, **translate),
        _translate(1, **translate),
        _rotate(rotate_max),
        *(_enhance(name, fn, factor) for name, fn in _ENHANCE.items()),
        _Op("Posterize", lambda x, level, sign: posterize(x, 8 - torch.round(posterize_drop * level))),
        _Op("Solarize", lambda x, level, sign: solarize(x, 255.0 * (1.0 - level))),
        _Op("AutoContrast", lambda x, level, sign: autocontrast(x)),
        _Op("Equalize", lambda x, level, sign: equalize(x)),
    ]


# timm's experimental choice weights ('w0'), by the operation's base name
_TIMM_CHOICE_WEIGHTS = {
    "Rotate": 0.3,
    "ShearX": 0.2,
    "ShearY": 0.2,
    "TranslateX": 0.1,
    "TranslateY": 0.1,
    "Color": 0.025,
    "Sharpness": 0.025,
    "AutoContrast": 0.025,
    "Solarize": 0.005,
    "SolarizeAdd": 0.005,
    "Contrast": 0.005,
    "Brightness": 0.005,
    "Equalize": 0.005,
    "Posterize": 0.0,
    "Invert": 0.0,
}


class BatchRandAugment:
    """RandAugment on a batch: ``num_layers`` rounds, in each of which every image draws one
    operation, applies it with probability ``prob`` at its own magnitude.

    Build it from a policy name with :meth:`from_name` (what ``auto_augment`` takes elsewhere in
    vitkit), which reproduces the policy's operations, ranges and sampling:

    - ``"rand-m9-mstd0.5-inc1"`` and every other timm RandAugment string (``m`` magnitude of 10,
      ``n`` layers, ``mstd`` Gaussian noise on the magnitude per application, ``mmax`` its cap,
      ``inc`` the "increasing" operations, ``w0`` timm's choice weights); each operation applies
      with probability 0.5, as in timm.
    - ``"randaugment"``: torchvision's RandAugment (2 layers, magnitude 9 of 31 bins, always applied).
    - ``"trivialaugment"``: torchvision's TrivialAugmentWide (1 layer, magnitude uniform over 31 bins).

    Differences from the per-image versions: geometric operations turn about the image centre and
    resample bilinearly (timm's PIL ops shear and translate about the corner and pick bilinear or
    bicubic at random), and values stay float between operations instead of being rounded to uint8.

    Args:
        ops: the operations (see the private ``_timm_ops`` / ``_torchvision_ops``).
        num_layers: operations per image.
        prob: probability that a drawn operation is applied.
        sample_level: ``(B, device) -> (B,)`` levels in [0, 1] for one layer.
        weights: choice weights per operation (then drawn without replacement, as timm does).
        fill: the colour (0-255 per channel) geometric operations bring in from outside the image.
        select: how each image gets its operation's result: "where" computes every operation for
            the whole batch and keeps each image's own (no host read: for GPUs), "index" computes
            each operation on the images that drew it only (less work, but reads the draws on the
            host), "auto" (default) "index" on a CPU, "where" elsewhere. Same draws, same results.
    """

    def __init__(
        self,
        ops: Sequence[_Op],
        num_layers: int = 2,
        prob: float = 1.0,
        sample_level: Callable[[int, torch.device], torch.Tensor] | None = None,
        weights: Sequence[float] | None = None,
        fill: Sequence[float] | float = 128.0,
        select: str = "auto",
    ) -> None:
        _resolve_select(select, torch.device("cpu"))  # validates
        if weights is not None and len(weights) != len(ops):
            raise ValueError(f"{len(weights)} choice weights for {len(ops)} operations.")
        self.ops = list(ops)
        self.num_layers = num_layers
        self.prob = prob
        self.sample_level = sample_level or (lambda n, device: torch.ones(n, device=device))
        self.weights = None if weights is None else [float(w) for w in weights]
        self.fill = fill
        self.select = select

    @classmethod
    def from_name(
        cls, name: str, fill: Sequence[float] | float = 128.0, select: str = "auto"
    ) -> BatchRandAugment:
        """A policy by name (see the class docstring); ``fill`` as 0-255 values (e.g. the mean colour)."""
        key = name.lower()
        if key == "randaugment":
            return cls(_torchvision_ops(wide=False), 2, 1.0, _fixed_level(9 / 30), fill=fill, select=select)
        if key in ("trivialaugment", "trivialaugmentwide", "ta_wide"):
            return cls(_torchvision_ops(wide=True), 1, 1.0, _uniform_bins(31), fill=fill, select=select)
        if key == "rand" or key.startswith("rand-"):
            return cls._from_timm_string(name, fill, select)
        raise ValueError(
            f"auto_augment {name!r} has no batched version. Batched policies: 'randaugment', "
            "'trivialaugment' and timm's 'rand-...' strings; run other policies per image in the "
            "loader workers (augment_on='workers')."
        )

    @classmethod
    def _from_timm_string(cls, name: str, fill: Sequence[float] | float, select: str) -> BatchRandAugment:
        magnitude, num_layers, std, cap, increasing, weighted = 10.0, 2, 0.0, 10.0, False, False
        for section in name.split("-")[1:]:
            parts = re.split(r"(\d.*)", section)
            if len(parts) < 2:
                continue
            key, value = parts[0], parts[1]
            if key == "m":
                magnitude = float(int(value))
            elif key == "n":
                num_layers = int(value)
            elif key == "mstd":
                std = float(value)
                std = math.inf if std > 100 else std
            elif key == "mmax":
                cap = float(int(value))
            elif key == "inc":
                increasing = bool(value)  # as timm reads it: any 'inc' section, even 'inc0', turns it on
            elif key == "w":
                weighted = True
            else:
                raise ValueError(f"Unknown section {section!r} in the RandAugment policy {name!r}.")
        ops = _timm_ops(increasing)
        weights = None
        if weighted:
            weights = [_TIMM_CHOICE_WEIGHTS[re.sub(r"(Increasing|Rel)$", "", op.name)] for op in ops]

        def sample_level(n: int, device: torch.device) -> torch.Tensor:
            if std == math.inf:
                level = torch.rand(n, device=device) * magnitude
            elif std > 0:
                level = torch.randn(n, device=device) * std + magnitude
            else:
                level = torch.full((n,), magnitude, device=device)
            return level.clamp(0.0, cap) / 10.0

        return cls(ops, num_layers, 0.5, sample_level, weights, fill, select)

    def _choices(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, num_layers) operation indices."""
        if self.weights is None:
            return torch.randint(len(self.ops), (n, self.num_layers), device=device)
        weights = device_constant(self.weights, like=torch.empty(0, device=device))
        return torch.multinomial(repeat(weights, "k -> n k", n=n), self.num_layers, replacement=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x float (B, 3, H, W) in [0, 255] -> the same shape, each image augmented on its own."""
        n, _, h, w = x.shape
        choices = self._choices(n, x.device)
        geometric = [k for k, op in enumerate(self.ops) if op.matrix is not None]
        select = _resolve_select(self.select, x.device)
        for layer in range(self.num_layers):
            applied = torch.rand(n, device=x.device) < self.prob
            chosen = torch.where(applied, choices[:, layer], -1)  # -1: leave the image alone
            level = self.sample_level(n, x.device)
            sign = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0)
            out = x.clone() if select == "index" else x
            if geometric:  # one affine matrix per image (identity unless it drew a geometric op)
                matrix = repeat(torch.eye(2, 3, device=x.device), "i j -> b i j", b=n)
                is_geometric = torch.zeros_like(applied)
                for k in geometric:
                    pick = chosen == k
                    matrix = torch.where(
                        rearrange(pick, "b -> b 1 1"), self.ops[k].matrix(level, sign, h, w), matrix
                    )
                    is_geometric |= pick
                warp = partial(affine_warp, fill=self.fill)
                out = _replace(out, is_geometric, select, warp, x, matrix)
            for k, op in enumerate(self.ops):
                if op.apply is not None:
                    out = _replace(out, chosen == k, select, op.apply, x, level, sign)
            x = out
        return x

    def __repr__(self) -> str:
        names = ", ".join(op.name for op in self.ops)
        return f"{type(self).__name__}(num_layers={self.num_layers}, prob={self.prob}, ops=[{names}])"


SELECT = ("auto", "where", "index")


def _resolve_select(select: str, device: torch.device) -> str:
    """ "auto" -> "index" on a CPU (the draws are already on the host), "where" elsewhere."""
    if select not in SELECT:
        raise ValueError(f"select must be 'auto', 'where' or 'index', got {select!r}.")
    return select if select != "auto" else ("index" if device.type == "cpu" else "where")


def _replace(
    out: torch.Tensor, mask: torch.Tensor, select: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor
) -> torch.Tensor:
    """``out`` with the images where ``mask`` is set replaced by ``fn(*inputs)`` for those images.

    "where" computes ``fn`` on the whole batch and keeps the masked images: no host read, the
    choice for a GPU. "index" computes it on the masked images only (reading the mask on the host,
    free on a CPU, where the batch already is) and writes them into ``out`` in place.
    """
    if select == "where":
        return torch.where(_per_image(mask), fn(*inputs), out)
    rows = mask.nonzero().squeeze(1)
    if len(rows):
        out[rows] = fn(*(t[rows] for t in inputs))
    return out


def _fixed_level(level: float) -> Callable[[int, torch.device], torch.Tensor]:
    return lambda n, device: torch.full((n,), level, device=device)


def _uniform_bins(bins: int) -> Callable[[int, torch.device], torch.Tensor]:
    return lambda n, device: torch.randint(bins, (n,), device=device).float() / (bins - 1)


# -- colour jitter and random erasing, per image ---------------------------------------------------


def batch_color_jitter(
    x: torch.Tensor,
    brightness: tuple[float, float] | None = None,
    contrast: tuple[float, float] | None = None,
    saturation: tuple[float, float] | None = None,
) -> torch.Tensor:
    """torchvision's ColorJitter without hue, per image: each factor ~ U[low, high] of its range
    (the ranges of a ``v2.ColorJitter``; None leaves that adjustment out).

    The adjustments run in one random order per batch (torchvision draws one per image).
    """
    n = x.shape[0]
    steps = [(adjust_brightness, brightness), (adjust_contrast, contrast), (adjust_color, saturation)]
    for i in torch.randperm(3).tolist():  # a CPU draw: no device sync
        fn, bounds = steps[i]
        if bounds is not None:
            x = fn(x, torch.empty(n, device=x.device).uniform_(*bounds))
    return x


ERASE_MODES = ("pixel", "rand", "const")


def check_erase_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of :data:`ERASE_MODES`."""
    if mode not in ERASE_MODES:
        raise ValueError(f"Random erasing mode must be 'pixel', 'rand' or 'const', got {mode!r}.")


def random_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    trials: int = 10,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` boxes (x1, y1, x2, y2) sampled as torchvision's RandomResizedCrop does, all at once.

    Per box: area ~ U(scale)·H·W and log aspect ~ U(log ratio); the first of ``trials`` draws that
    fits is used, else the centre crop clamped to ``ratio``; the position is uniform. The draws are
    made on ``device`` (default CPU), so boxes for a batch on a GPU never pass through the host.
    """
    w, h = _candidate_box_sides(n, height * width, scale, ratio, trials, device)
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    w, h = _first_that_fits(fits, w, h)
    # Fallback when no draw fits: the whole image, cropped to the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    any_fit = fits.any(dim=1)
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    left = torch.floor(torch.rand(n, device=device) * (width - w + 1))
    top = torch.floor(torch.rand(n, device=device) * (height - h + 1))
    return torch.stack([left, top, left + w, top + h], dim=1)


def _candidate_box_sides(
    n: int,
    area: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    trials: int,
    device: torch.device | str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``trials`` candidate boxes per image, (n, trials) each: with a ~ U(scale)·area and log r ~
    U(log ratio), the sides round(√(a·r)) and round(√(a/r)) (which is the width and which the height
    is the caller's convention: torchvision's crop and timm's erasing differ)."""
    target = area * torch.empty(n, trials, device=device).uniform_(*scale)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(torch.empty(n, trials, device=device).uniform_(*log_ratio))
    return torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()


def _first_that_fits(fits: torch.Tensor, *sides: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each (n, trials) side at the first trial that ``fits`` (the first trial where none does), (n,)."""
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    return tuple(side.gather(1, first).squeeze(1) for side in sides)


def batch_random_erasing(
    x: torch.Tensor,
    prob: float,
    mode: str = "pixel",
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
    select: str = "auto",
) -> torch.Tensor:
    """timm's RandomErasing (one box per image) on a normalised batch, per image, without a loop.

    With probability ``prob`` an image gets one box of area ~ U(scale)·H·W and log aspect ~
    U(log ratio) (the first of ``attempts`` draws that fits; none fitting: no box), filled with
    per-pixel normal noise (``"pixel"``), one normal value per channel (``"rand"``) or zeros
    (``"const"``). ``select`` as in :class:`BatchRandAugment` ("index" draws noise for the erased
    images only).
    """
    check_erase_mode(mode)
    n, c, h, w = x.shape
    device = x.device
    box_h, box_w = _candidate_box_sides(n, h * w, scale, ratio, attempts, device)
    fits = (box_h < h) & (box_w < w)
    box_h, box_w = _first_that_fits(fits, box_h, box_w)
    erase = (torch.rand(n, device=device) < prob) & fits.any(dim=1)
    top = torch.floor(torch.rand(n, device=device) * (h - box_h + 1))
    left = torch.floor(torch.rand(n, device=device) * (w - box_w + 1))
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + box_h).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + box_w).view(n, 1, 1))
    )
    mask = (inside & erase.view(n, 1, 1)).unsqueeze(1)  # (B, 1, H, W)

    def fill(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mode == "pixel":
            noise = torch.randn_like(x)
        elif mode == "rand":
            noise = torch.randn(len(x), c, 1, 1, dtype=x.dtype, device=device).expand_as(x)
        else:
            noise = torch.zeros_like(x)
        return torch.where(mask, noise, x)

    select = _resolve_select(select, device)
    return _replace(x.clone() if select == "index" else x, erase, select, fill, x, mask)
