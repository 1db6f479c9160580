"""Position embeddings: attention is blind to order, so each patch token gets its position added.

Self-attention treats its input as a *set*: permuting the patches permutes the output the same
way. To know where a patch came from, a position vector is added to each patch token:

* ``learn``: a free parameter per grid position (ViT, DeiT), initialised N(0, 0.02²);
* ``sincos``: fixed 2-D sine-cosine features of the (row, column) index, as in "Better plain
  ViT baselines for ImageNet-1k" (Beyer et al. 2022): a quarter of the channels each for
  sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω) with ω_k = 10000^(-k / (D/4 - 1)).

Learned embeddings exist for one grid; at another resolution they are resampled bicubically
as a (D, H, W) image, with the entries of class/register tokens kept aside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def sincos_2d_position_embedding(
    grid_size: tuple[int, int], dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding for a (H, W) grid: returns (H * W, D), rows in raster order."""
    if dim % 4 != 0:
        raise ValueError(f"sincos position embeddings need embed_dim divisible by 4, got {dim}.")
    gh, gw = grid_size
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1)
    omega = 1.0 / temperature**omega
    ys, xs = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    xs = rearrange(xs, "h w -> (h w) 1") * omega
    ys = rearrange(ys, "h w -> (h w) 1") * omega
    return torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1).float()


def resample_position_embedding(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    *,
    antialias: bool = True,
    align_corners: bool = False,
) -> torch.Tensor:
    """Resample (1, prefix + Hₒ·Wₒ, D) position embeddings to (1, prefix + Hₙ·Wₙ, D).

    The patch part is treated as a D-channel image and resized with bicubic interpolation
    (antialiased when shrinking, as timm does); the first ``num_prefix_tokens`` entries
    (class/register tokens) have no position on the grid and are kept unchanged.
    ``antialias`` and ``align_corners`` select another library's way: transformers' ViT, DeiT,
    DINOv2 and CLIP shrink without antialiasing, torchvision aligns the corners.
    """
    new_grid, old_grid = tuple(new_grid), tuple(old_grid)
    if new_grid == old_grid:
        return pos_embed
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != expected:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} entries, but a {old_grid} grid with {num_prefix_tokens} "
            f"prefix tokens needs {expected}."
        )
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = rearrange(grid.float(), "1 (h w) d -> 1 d h w", h=old_grid[0], w=old_grid[1])
    grid = F.interpolate(
        grid, size=new_grid, mode="bicubic", antialias=antialias, align_corners=align_corners
    )
    grid = rearrange(grid, "1 d h w -> 1 (h w) d").to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
