"""Patch embedding: cut the image into patches and project each one to a token.

A ViT reads an image as a sequence. The image (B, C, H, W) is cut into non-overlapping
P x P patches, and each flattened patch is mapped linearly to a D-dimensional token:

    token_ij = W · vec(x[:, iP:(i+1)P, jP:(j+1)P]) + b

A convolution with kernel = stride = P computes exactly this for all patches at once,
which is how it is implemented here (and in timm, whose parameter names we keep).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import nn

from ._utils import to_2tuple


class PatchEmbedding(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/P * W/P, D), or (B, H/P, W/P, D) with ``flatten=False``.

    Args:
        img_size: the image size the model is built for, int or (H, W).
        patch_size: the patch size P, int or (Ph, Pw).
        in_chans: channels of the input image.
        embed_dim: the token width D.
        bias: whether the projection has a bias (CLIP-style models with ``pre_norm`` have none).
        strict_img_size: require inputs of exactly ``img_size`` (off for dynamic-size models,
            which only need H and W divisible by the patch size).
        norm_layer: a norm on each token after the projection (AIMv2's RMSNorm); ``None``: none.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self._set_geometry(img_size, patch_size, in_chans, strict_img_size)
        self.stem: nn.Module = nn.Identity()  # convolutions before the projection in ConvStem
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias
        )
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def _set_geometry(
        self,
        img_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        in_chans: int,
        strict_img_size: bool,
    ) -> None:
        img_size, patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
            raise ValueError(
                f"img_size {img_size} is not divisible by patch_size {patch_size}. "
                "Choose an img_size that is a multiple of the patch size."
            )
        self.img_size, self.patch_size = img_size, patch_size
        self.in_chans = in_chans
        self.strict_img_size = strict_img_size

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Take inputs of another size (a multiple of the patch size); the weights do not change."""
        self._set_geometry(img_size, self.patch_size, self.in_chans, self.strict_img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches per column and per row at ``img_size``: (H/P, W/P)."""
        return self.grid_size_for(self.img_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    def grid_size_for(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid of an input of size (H, W)."""
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError that says what to change when ``x`` cannot be embedded."""
        if x.ndim != 4:
            raise ValueError(
                f"Expected images of shape (B, C, H, W), got a tensor of shape {tuple(x.shape)}."
            )
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(
                f"The model expects {self.in_chans}-channel images (in_chans={self.in_chans}) but got {c} "
                f"channels. Convert the images (e.g. grayscale to RGB) or create the model with in_chans={c}."
            )
        if self.strict_img_size and (h, w) != self.img_size:
            raise ValueError(
                f"Input size {(h, w)} differs from the model's img_size {self.img_size}. Resize the images, "
                f"create the model with img_size={(h, w)}, or pass dynamic_img_size=True."
            )
        if h % self.patch_size[0] or w % self.patch_size[1]:
            raise ValueError(
                f"Input size {(h, w)} is not divisible by the patch size {self.patch_size}; resize or pad it."
            )

    def forward(self, x: torch.Tensor, flatten: bool = True) -> torch.Tensor:
        self.check_input(x)
        x = self.proj(self.stem(x))  # (B, D, H/P, W/P): one D-vector per patch
        x = self.norm(rearrange(x, "b d gh gw -> b gh gw d"))
        return rearrange(x, "b gh gw d -> b (gh gw) d") if flatten else x


class ConvStem(PatchEmbedding):
    """Image (B, C, H, W) -> tokens (B, H/P * W/P, D) through a few small convolutions, not one big one.

    "Early convolutions help transformers see better" (Xiao et al. 2021), the hybrid stem of the
    original ViT paper in miniature: a stack of 3x3 convolutions, each followed by BatchNorm and
    ReLU, log2(P) of them with stride 2 (by default the first ones), then a 1x1 convolution to the
    token width D:

        x -> [conv3x3 stride 2, BN, ReLU] x log2(P) -> [conv3x3, BN, ReLU] x rest -> conv1x1 -> tokens

    The grid is the same as patch embedding with patch size P (so position embeddings, pooling and
    explanations work unchanged), but every token now sees an overlapping neighbourhood through
    convolutions, which makes ViTs train faster and more stably on small data.

    Args:
        channels: output channels of the 3x3 convolutions, e.g. ``(32, 64)`` for P = 4; at least
            log2(P) of them.
        strides: the stride of each convolution, 1 or 2, as many as ``channels``, whose product is P;
            default: 2 for the first log2(P), 1 for the rest. Stride-1 convolutions before the
            halvings see the image at full resolution (as in a ResNet's first stage): more
            computation, more detail in every token; e.g. ``(1, 2, 2)`` for P = 4.
        Other arguments as :class:`PatchEmbedding`; P must be a power of two, equal in both directions.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        channels: tuple[int, ...] = (64, 128),
        strides: tuple[int, ...] | None = None,
        bias: bool = True,
        strict_img_size: bool = True,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not PatchEmbedding.__init__: its P x P projection is not needed here
        self._set_geometry(img_size, patch_size, in_chans, strict_img_size)
        size = self.patch_size[0]
        halvings = size.bit_length() - 1  # log2(P)
        if self.patch_size[0] != self.patch_size[1] or size != 2**halvings:
            raise ValueError(f"A conv stem needs a square, power-of-two patch_size; got {self.patch_size}.")
        if len(channels) < halvings:
            raise ValueError(
                f"stem_channels={tuple(channels)} has {len(channels)} convolutions; patch size {size} "
                f"needs at least {halvings} (one stride-2 convolution per halving)."
            )
        if strides is None:
            strides = tuple(2 if index < halvings else 1 for index in range(len(channels)))
        elif len(strides) != len(channels) or set(strides) - {1, 2} or 2 ** list(strides).count(2) != size:
            raise ValueError(
                f"stem_strides={tuple(strides)} must give each of the {len(channels)} convolutions of "
                f"stem_channels={tuple(channels)} a stride of 1 or 2, with {halvings} of them 2 for "
                f"patch size {size}."
            )
        layers: list[nn.Module] = []
        previous = in_chans
        for width, stride in zip(channels, strides, strict=True):
            layers += [
                nn.Conv2d(previous, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(previous, embed_dim, kernel_size=1, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()
