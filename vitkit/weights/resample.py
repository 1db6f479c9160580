"""Adapt pretrained weights to a new resolution: position embeddings and patch size.

* New image size, same patch size: the patch grid changes, and the position-embedding table
  is resampled bicubically as a (D, H, W) image (:func:`vitkit.models.resample_position_embedding`).
  The old grid may be non-square; it is read from the checkpoint's metadata when possible.
* New patch size (FlexiViT, Beyer et al. 2023): the patch-embedding kernel is resampled so
  that a patch resized to the new size gives the same token as the original patch did under
  the old kernel. With ``resize(x) = M x`` (a linear map), we want ``<x, w> = <M x, ŵ>`` for all
  x, i.e. ``Mᵀ ŵ = w``; the least-squares / minimum-norm solution is ``ŵ = pinv(Mᵀ) w``. Plain
  interpolation of the kernel does not preserve the tokens (their scale changes with the patch
  area); the pseudo-inverse does, exactly when enlarging the patch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from vitkit.models._utils import to_2tuple


def resample_patch_embed(
    weight: torch.Tensor,
    new_size: int | tuple[int, int],
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a patch-embedding kernel (D, C, h, w) to (D, C, h', w'), FlexiViT-style.

    Args:
        weight: the convolution kernel of the patch projection.
        new_size: the new patch size.
        interpolation: the image resize the new kernel should be invariant to (``'bicubic'``,
            ``'bilinear'``, ...), i.e. how you would resize images to the new resolution.
        antialias: whether that resize is antialiased (matters when shrinking).

    Returns:
        The new kernel, same dtype and device.
    """
    new_size = to_2tuple(new_size)
    old_size = tuple(weight.shape[-2:])
    if old_size == new_size:
        return weight
    n_old = old_size[0] * old_size[1]
    # Row i is resize(e_i): together the rows describe the resize as a matrix Mᵀ (n_old, n_new).
    basis = torch.eye(n_old, dtype=torch.float64).reshape(n_old, 1, *old_size)
    smooth = interpolation in ("bilinear", "bicubic")
    resize_t = F.interpolate(
        basis.float(),
        size=new_size,
        mode=interpolation,
        antialias=antialias and smooth,
        align_corners=False if smooth else None,
    ).reshape(n_old, -1)
    resize_t = resize_t.double()
    pinv = torch.linalg.pinv(resize_t)  # (n_new, n_old) = pinv(Mᵀ)
    flat = rearrange(weight.double().cpu(), "d c h w -> (d c) (h w)")
    new = flat @ pinv.T  # each row: ŵ = pinv(Mᵀ) w
    new = rearrange(new, "(d c) (h w) -> d c h w", d=weight.shape[0], h=new_size[0])
    return new.to(dtype=weight.dtype, device=weight.device)


def infer_grid(
    num_patches: int,
    hint: tuple[int, int] | None = None,
    aspect_like: tuple[int, int] | None = None,
) -> tuple[int, int] | None:
    """The (rows, columns) of a position table with ``num_patches`` entries.

    ``hint`` (e.g. from the checkpoint's config) wins when it has that many patches; otherwise a
    square grid; otherwise the factorisation with exactly the aspect ratio of ``aspect_like``
    (the model's grid); otherwise ``None`` (ambiguous: pass the grid explicitly).
    """
    if hint is not None and hint[0] * hint[1] == num_patches:
        return tuple(hint)  # type: ignore[return-value]
    side = math.isqrt(max(num_patches, 0))
    if num_patches > 0 and side * side == num_patches:
        return side, side
    if aspect_like is not None:
        for h in range(1, num_patches + 1):
            if num_patches % h == 0 and h * aspect_like[1] == (num_patches // h) * aspect_like[0]:
                return h, num_patches // h
    return None
