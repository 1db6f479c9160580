"""Rotary position embedding over the patch grid (RoPE, Su et al. 2021; DINOv3's 2-D form).

Absolute position embeddings add a vector to each token once, before the blocks. RoPE instead
rotates every query and key, in every attention layer, by angles that grow with the token's
position, so that the score q·k between two patches depends on where they are relative to each
other. Each head's d channels are taken as d/2 pairs (channel i with channel i + d/2); pair j of
a patch at normalised position (y, x) is turned by

    θ_j = 2π · y · ω_j  for the first d/4 pairs,   2π · x · ω_j  for the next d/4,
    ω_j = base^(-4j/d),

    rotate(v) = v · cos θ + rotate_half(v) · sin θ,    rotate_half([a, b]) = [-b, a].

Positions are the patch centres scaled to [-1, 1] whatever the grid, so a model runs at any input
size without resampling anything. The prefix tokens (class, registers) are not rotated: they have
no place on the grid. In training, DINOv3 also rescales the coordinates by a random factor in
[1/r, r] (``rescale``), which makes its features robust to the scale of the grid.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


class RotaryPositionEmbedding(nn.Module):
    """The (cos θ, sin θ) tables of a patch grid: (grid_h · grid_w, head_dim) each.

    Args:
        head_dim: channels per attention head d (a multiple of 4).
        base: the frequency base (DINOv3: 100).
        rescale: in training, scale all coordinates by one log-uniform factor in [1/rescale,
            rescale] per forward pass; ``None``: never.
    """

    def __init__(self, head_dim: int, base: float = 100.0, rescale: float | None = None) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D rotary embeddings need a head width divisible by 4, got {head_dim}.")
        self.head_dim, self.base, self.rescale = head_dim, base, rescale

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        """ω_j = base^(-4j/d), j = 0 .. d/4 - 1; computed in float32 at each call (d/4 numbers), so
        no buffer is ever cast to a lower precision with the model's weights."""
        j = torch.arange(self.head_dim // 4, dtype=torch.float32, device=device)
        return self.base ** (-4 * j / self.head_dim)

    def forward(
        self, grid: tuple[int, int], device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gh, gw = grid
        ys = (torch.arange(gh, dtype=torch.float32, device=device) + 0.5) / gh * 2 - 1  # centres in [-1, 1]
        xs = (torch.arange(gw, dtype=torch.float32, device=device) + 0.5) / gw * 2 - 1
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)  # (gh, gw, 2)
        coords = rearrange(coords, "gh gw two -> (gh gw) two")
        if self.training and self.rescale is not None:
            log_r = math.log(self.rescale)
            coords = coords * torch.empty(1, device=device).uniform_(-log_r, log_r).exp()
        angles = 2 * math.pi * coords[:, :, None] * self._frequencies(device)  # (N, 2, d/4): y's, x's
        angles = rearrange(angles, "n two f -> n (two f)").tile(2)  # (N, d): pair i with i + d/2
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the last dimension (a 90° turn of each (a_i, b_i) pair)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last ``len(cos)`` tokens of per-head q or k (B, h, N, d); the prefix stays."""
    prefix, patches = x[..., : -cos.shape[0], :], x[..., -cos.shape[0] :, :]
    rotated = patches * cos.to(x.dtype) + rotate_half(patches) * sin.to(x.dtype)
    return torch.cat([prefix, rotated], dim=-2)
