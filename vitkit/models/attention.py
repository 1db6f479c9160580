"""Multi-head self-attention, the one operation that makes a Transformer a Transformer.

Every token asks a question (query q), offers a description of itself (key k) and carries
content (value v), all three linear projections of the token. Token i then gathers the
values of all tokens j, weighted by how well its query matches their keys:

    A = softmax(q kᵀ / √d)        (N, N): row i is a probability distribution over tokens
    out_i = Σ_j A_ij v_j

This is *soft* attention: every token gets a non-negative weight and the weights sum to one,
so the output is a differentiable weighted average. With h heads the embedding of width D is
split into h independent subspaces of width d = D / h, each with its own attention pattern.

Two paths compute the same numbers:

* the fused path, ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
  kernels; never stores A), used for training and inference;
* the explicit path, which materialises A exactly as written above. It is the textbook formula,
  and the post-softmax A is the *input* of ``attn_drop``, so a forward hook there reads it
  (``vitkit.explain`` does this, on timm models too, whose attention has the same structure).

Set ``module.fused_attn = False`` to take the explicit path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention: (B, N, D) -> (B, N, D).

    Args:
        dim: token width D.
        num_heads: number of heads h; D must be divisible by h.
        qkv_bias: bias in the q, k, v projection.
        qk_norm: LayerNorm on q and k per head before the dot product (stabilises large models).
        attn_drop: dropout on the attention weights A.
        proj_drop: dropout after the output projection.
        norm_layer: the norm used by ``qk_norm``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project tokens (B, N, D) to per-head q, k, v, each (B, h, N, d)."""
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """A = softmax(q kᵀ / √d): (B, h, N, N), every row sums to one."""
        scores = (q * self.scale) @ k.transpose(-2, -1)
        return scores.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.queries_keys_values(x)
        if self.fused_attn:
            dropout_p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            attn = self.attn_drop(self.attention_weights(q, k))
            out = attn @ v
        out = rearrange(out, "b h n d -> b n (h d)")  # concatenate the heads
        return self.proj_drop(self.proj(out))
