"""Relative position bias (BEiT, Bao et al. 2022; Swin): attention that knows how far apart two patches are.

A position table added to the tokens (``pos_embed``) tells each token *where it is*. A relative
position bias instead tells attention *how far apart* a query and a key are: one learned scalar per
head for every offset (Δrow, Δcolumn) between two patches, added to the scores before the softmax:

    A = softmax(q kᵀ / √d + B),    B_ij = table[offset(i, j)]          (h, N, N)

An H x W grid has (2H - 1)(2W - 1) offsets; three more entries hold the class token's bias
(class → patch, patch → class, class → class), BEiT's layout, which timm's checkpoints use. Each
block has its own table, so every layer can learn its own sense of locality (a head that looks at
its neighbours learns large values for small offsets).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


def relative_position_index(grid_size: tuple[int, int], class_token: bool = True) -> torch.Tensor:
    """(N, N) long: for each query i and key j, the row of the bias table that holds their bias.

    Patches (r1, c1) and (r2, c2) share a row exactly when their offsets (r1 - r2, c1 - c2) are
    equal. With ``class_token`` the class token comes first, and its entries index the table's
    last three rows: class → patch, patch → class, class → class.
    """
    rows, cols = grid_size
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.flatten(), c.flatten()  # (P,) coordinates of the patches in reading order
    dr = r[:, None] - r[None, :] + rows - 1  # offsets shifted to start at 0: 0 .. 2H-2
    dc = c[:, None] - c[None, :] + cols - 1
    index = dr * (2 * cols - 1) + dc
    if not class_token:
        return index
    offsets = (2 * rows - 1) * (2 * cols - 1)
    full = torch.empty(rows * cols + 1, rows * cols + 1, dtype=torch.long)
    full[1:, 1:] = index
    full[0, :] = offsets  # the class token as the query
    full[:, 0] = offsets + 1  # the class token as the key
    full[0, 0] = offsets + 2
    return full


def relative_position_table_size(grid_size: tuple[int, int]) -> int:
    """Rows of the bias table of an H x W grid: (2H - 1)(2W - 1) offsets and three class-token entries."""
    return (2 * grid_size[0] - 1) * (2 * grid_size[1] - 1) + 3


class RelativePositionBias(nn.Module):
    """The bias B (h, N, N) of one attention layer over an H x W grid (plus a class token).

    Args:
        grid_size: the patch grid (rows, columns).
        num_heads: one bias per head.
        class_token: whether the tokens start with a class token.
    """

    def __init__(self, grid_size: tuple[int, int], num_heads: int, class_token: bool = True) -> None:
        super().__init__()
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.class_token = class_token
        self.table = nn.Parameter(torch.zeros(relative_position_table_size(self.grid_size), num_heads))
        self.register_buffer("index", relative_position_index(self.grid_size, class_token), persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.index.shape[0]

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, class_token={self.class_token}"

    def forward(self) -> torch.Tensor:
        """B: (h, N, N), to add to the attention scores of every image."""
        return rearrange(self.table[self.index], "i j h -> h i j")

    def set_grid_size(self, grid_size: tuple[int, int]) -> None:
        """Resample the table to another grid (:func:`resample_relative_position_table`)."""
        grid_size = (int(grid_size[0]), int(grid_size[1]))
        if grid_size == self.grid_size:
            return
        table = resample_relative_position_table(self.table.detach(), grid_size, self.grid_size)
        self.table = nn.Parameter(table, requires_grad=self.table.requires_grad)
        self.grid_size = grid_size
        self.index = relative_position_index(grid_size, self.class_token).to(self.index.device)


def resample_relative_position_table(
    table: torch.Tensor, grid_size: tuple[int, int], old_grid_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """A bias table (offsets + 3, heads) for another grid: bicubic over the offsets, the class-token
    entries kept (timm's ``resize_rel_pos_bias_table``, as it resizes BEiT's). ``old_grid_size``:
    the table's grid; None: the square one its size gives."""
    from timm.layers import resize_rel_pos_bias_table

    shape = (relative_position_table_size(grid_size), table.shape[1])
    resized = resize_rel_pos_bias_table(table, tuple(grid_size), shape, old_window_size=old_grid_size)
    return resized.contiguous()
