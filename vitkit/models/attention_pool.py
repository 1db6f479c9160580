"""Attention pooling: one learned query reads the whole sequence (MAP, "multihead attention pooling").

A class token is a token *inside* the sequence: it attends and is attended to in every block, and
the classifier reads its final state. Attention pooling leaves the sequence alone and adds one
extra attention step at the end, in which a learned vector (the *probe*, or latent query) is the
only query and every token is a key:

    tokens x (B, N, D)  ->  k, v = x W_k, x W_v                  per head (B, h, N, d)
    probe p (1, 1, D)   ->  q = p W_q                           per head (B, h, 1, d)
    a = softmax(q kᵀ / √d)                                      (B, h, 1, N): one row per head
    y = W_o (a v)                                               (B, 1, D)
    y = y + MLP(LayerNorm(y))                                   -> pooled (B, D)

So the pooled vector is a weighted average of the tokens' values, and the weights ``a`` say
exactly which tokens the classifier read: no rollout through a class token's residual stream is
needed for the last step. There is no residual from the tokens into y (the probe is not a
token), so *all* of the sequence reaches the head through ``a``. Big Vision's SigLIP and
later ViTs use this head (Zhai et al. 2022, "Scaling Vision Transformers"; timm's
``global_pool='map'``, its ``AttentionPoolLatent``, whose parameter names this module shares:
``latent``, ``q``, ``kv``, ``proj``, ``norm``, ``mlp``).

As in :class:`~vitkit.models.SelfAttention`, two paths give the same numbers: the fused kernel,
or the explicit softmax whose result is the input of ``attn_drop`` (where ``vitkit.explain``
reads it); ``fused_attn`` chooses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .block import Mlp


class AttentionPool(nn.Module):
    """Attention pooling with a learned query: tokens (B, N, D) -> one vector per image (B, D).

    Args:
        dim: token width D.
        num_heads: heads h of the pooling attention; D must be divisible by h.
        mlp_ratio: hidden width of the MLP after the attention, as a multiple of D.
        qkv_bias: bias in the query and key/value projections.
        norm_layer: the norm before the MLP.
        act_layer: the MLP's activation (a name of :data:`vitkit.models.block.ACTIVATIONS`).
        fused_attn: ``True``: the fused ``scaled_dot_product_attention`` kernel; ``False``: the
            explicit softmax (the same numbers).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: str = "gelu",
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))  # the probe: the one query
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Identity()  # no dropout; its input is the explicit path's A (explain reads it)
        self.proj = nn.Linear(dim, dim)
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        nn.init.trunc_normal_(self.latent, std=dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        q = rearrange(self.q(self.latent), "1 one (h d) -> 1 h one d", h=self.num_heads).expand(
            batch, -1, -1, -1
        )
        k, v = rearrange(self.kv(x), "b n (two h d) -> two b h n d", two=2, h=self.num_heads).unbind(0)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))  # (B, h, 1, N)
            out = attn @ v
        y = self.proj(rearrange(out, "b h one d -> b one (h d)"))
        y = y + self.mlp(self.norm(y))
        return y[:, 0]
