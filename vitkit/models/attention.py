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

Set ``module.fused_attn = False`` (or build with ``fused_attn=False``) to take the explicit path.

Hard attention (``attn_mode="hard"``)
-------------------------------------
Soft attention gives every key some weight, however small. *Hard* attention makes a discrete
choice: each query keeps only its ``hard_k`` = k best-matching keys and ignores the rest.
With the scores S = q kᵀ / √d, shape (B, h, N, N):

    M_ij = 1 if S_ij is among the k largest scores of row i, else 0      (top-k, per row)
    A_ij = M_ij exp(S_ij) / Σ_l M_il exp(S_il)

so every row of A has exactly k non-zeros and still sums to one: the softmax renormalised over
the selected keys. The keys are chosen by ranking (``topk``), never by a threshold, so exactly
k survive even when scores tie. With k = N nothing is dropped and A is soft attention again.
A k larger than the number of tokens N (e.g. a smaller image with ``dynamic_img_size``) is
clamped to N at forward time: "keep the best k" of fewer than k keys keeps them all.

The selection M is a step function of the scores: nudging S either leaves M unchanged
(derivative zero) or flips a key in or out (no derivative at all). Back-propagating through
the formula above therefore only reaches the k selected keys; a key outside the top k gets no
gradient and can never learn that it would have been useful. Two standard remedies:

* ``hard_estimator="ste"``, the straight-through estimator (Bengio et al., 2013): the forward
  pass uses the hard A, the backward pass pretends the layer was soft attention,

      A = stop_gradient(A_hard) + (A_soft - stop_gradient(A_soft))

  whose value is A_hard (the bracket is exactly zero) and whose derivative is ∂A_soft/∂S.
  Every key, selected or not, receives the soft-attention gradient, so a key that would lower
  the loss is pushed up the ranking until it enters the top k. The price is bias: it is the
  gradient of a (slightly) different function than the one computed.
* ``hard_estimator="gumbel"``: the same straight-through gradient, but during training the k
  keys are *sampled* instead of taken greedily. Adding independent Gumbel noise G_ij to the
  scores and taking the top k of S + G draws k keys without replacement from A_soft (each
  draw picks key j with probability ∝ exp(S_ij) among the keys not yet drawn: "Gumbel-top-k",
  Kool et al., 2019). Keys just below the cut are sometimes tried, which explores selections
  the greedy top k would never visit. The weights of the chosen keys use the clean scores; in
  eval mode the selection is the deterministic top k.

Hard attention always takes the explicit path (A must exist to be made sparse), and the hard A
is what reaches ``attn_drop``, so ``vitkit.explain`` shows the maps the model actually used. It
adds no parameters: a model trained soft loads into hard mode and vice versa.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .relative_position import RelativePositionBias
from .rope import apply_rotary

ATTN_MODES = ("soft", "hard")
HARD_ESTIMATORS = ("ste", "gumbel")


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (..., N, N) with True at the k largest scores of every row (k ≤ N)."""
    index = scores.topk(k, dim=-1).indices  # (..., N, k): which keys each query keeps
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)


def gumbel_noise_like(scores: torch.Tensor) -> torch.Tensor:
    """Independent standard Gumbel samples G = -log(E), E ~ Exponential(1), shaped like ``scores``."""
    return -torch.empty_like(scores).exponential_().log()


class SelfAttention(nn.Module):
    """Multi-head self-attention: (B, N, D) -> (B, N, D).

    Args:
        dim: token width D.
        num_heads: number of heads h; D must be divisible by h.
        qkv_bias: bias in the q, k, v projection.
        qk_norm: LayerNorm on q and k per head before the dot product (stabilises large models).
        attn_drop: dropout on the attention weights A.
        proj_drop: dropout after the output projection.
        proj_bias: bias in the output projection.
        norm_layer: the norm used by ``qk_norm``.
        attn_mode: ``"soft"`` (the default: softmax over all keys, fused kernel) or ``"hard"``
            (each query keeps its top ``hard_k`` keys; see the module docstring).
        hard_k: keys kept per query in hard mode (≥ 1; clamped to N at forward time). Required
            with ``attn_mode="hard"``, not allowed with ``"soft"``.
        hard_estimator: how hard mode is trained: ``"ste"`` (straight-through, deterministic
            top-k) or ``"gumbel"`` (straight-through, top-k of Gumbel-perturbed scores during
            training, deterministic top-k in eval).
        fused_attn: soft mode's path: ``True`` (the default) the fused
            ``scaled_dot_product_attention`` kernel, ``False`` the explicit formula. The numbers
            are the same; the speed is not: on a CPU without AMX, training under bf16 autocast
            with few tokens is about twice as fast on the explicit path (BENCHMARKS.md).
            Also an attribute: set ``module.fused_attn`` at any time.
        rel_pos_grid: with a patch grid (rows, columns), a learned relative position bias B is
            added to the scores, ``A = softmax(q kᵀ / √d + B)`` (BEiT;
            :mod:`~vitkit.models.relative_position`); the tokens are that grid's patches.
        rel_pos_class_token: with ``rel_pos_grid``: whether a class token comes first.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        proj_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_mode: str = "soft",
        hard_k: int | None = None,
        hard_estimator: str = "ste",
        fused_attn: bool = True,
        rel_pos_grid: tuple[int, int] | None = None,
        rel_pos_class_token: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}.")
        _check_attn_mode(attn_mode, hard_k, hard_estimator)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn  # soft mode only: hard attention always takes the explicit path
        self.attn_mode = attn_mode
        self.hard_k = hard_k
        self.hard_estimator = hard_estimator

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rel_pos_bias = (
            RelativePositionBias(rel_pos_grid, num_heads, rel_pos_class_token) if rel_pos_grid else None
        )

    def extra_repr(self) -> str:
        if self.attn_mode == "soft":
            return ""
        return f"attn_mode='hard', hard_k={self.hard_k}, hard_estimator={self.hard_estimator!r}"

    def queries_keys_values(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project tokens (B, N, D) to per-head q, k, v, each (B, h, N, d); with ``rope`` (the
        (cos, sin) tables of :mod:`~vitkit.models.rope`), q and k of the patches are rotated."""
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def position_bias(self, num_tokens: int) -> torch.Tensor | None:
        """The relative position bias B (h, N, N) added to the scores; None without one."""
        if self.rel_pos_bias is None:
            return None
        if num_tokens != self.rel_pos_bias.num_tokens:
            raise ValueError(
                f"This attention's relative position bias is for {self.rel_pos_bias.num_tokens} tokens (a "
                f"{self.rel_pos_bias.grid_size} grid), the input has {num_tokens}: build the model for this "
                "image size (img_size=..., or model.set_input_size(...), which resamples the bias)."
            )
        return self.rel_pos_bias()

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """A = softmax(q kᵀ / √d [+ B]): (B, h, N, N), every row sums to one.

        In hard mode, the straight-through hard attention of :meth:`hard_attention_weights`.
        """
        scores = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.position_bias(q.shape[-2])
        if bias is not None:
            scores = scores + bias
        soft = scores.softmax(dim=-1)
        if self.attn_mode == "soft":
            return soft
        return self.hard_attention_weights(scores, soft)

    def hard_attention_weights(self, scores: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """Scores S and soft A (B, h, N, N) -> hard A with k non-zeros per row summing to one.

        The value is the softmax renormalised over each row's top-k keys; the gradient is that of
        the soft A (straight-through). Why not let the renormalised top-k softmax carry its own
        gradient? It is exact for the selected keys, but zero for every key outside the top k, so
        no key is ever pulled into the selection by the loss (only pushed around by changes of
        the others), and with k = 1 it is zero altogether: a one-hot row is constant. The soft
        gradient reaches all N keys at every k. With k = N value and gradient are soft attention's.
        """
        top_k = min(self.hard_k, scores.shape[-1])  # more than N keys: keep them all
        ranking = scores
        if self.hard_estimator == "gumbel" and self.training:  # sample k keys from softmax(S)
            ranking = scores + gumbel_noise_like(scores)
        keep = top_k_mask(ranking, top_k)
        hard = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)  # exactly 0 where dropped
        # The bracket is exactly zero, so the value is `hard`, bit for bit; the gradient is soft's.
        return hard.detach() + (soft - soft.detach())

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q, k, v = self.queries_keys_values(x, rope)
        if self.fused_attn and self.attn_mode == "soft":
            dropout_p = self.attn_drop.p if self.training else 0.0
            bias = self.position_bias(q.shape[-2])
            bias = None if bias is None else bias.to(q.dtype)  # an additive mask: the scores' dtype
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        else:
            attn = self.attn_drop(self.attention_weights(q, k))
            out = attn @ v
        out = rearrange(out, "b h n d -> b n (h d)")  # concatenate the heads
        return self.proj_drop(self.proj(out))


def _check_attn_mode(attn_mode: str, hard_k: int | None, hard_estimator: str) -> None:
    if attn_mode not in ATTN_MODES:
        raise ValueError(f"attn_mode={attn_mode!r} is not one of {ATTN_MODES}.")
    if hard_estimator not in HARD_ESTIMATORS:
        raise ValueError(f"hard_estimator={hard_estimator!r} is not one of {HARD_ESTIMATORS}.")
    if attn_mode == "soft":
        if hard_k is not None:
            raise ValueError(f"hard_k={hard_k} only applies to attn_mode='hard' (this layer is 'soft').")
        return
    if hard_k is None:
        raise ValueError("attn_mode='hard' needs hard_k, the number of keys each query keeps.")
    if isinstance(hard_k, bool) or not isinstance(hard_k, int):
        raise TypeError(f"hard_k must be an int, got {hard_k!r}.")
    if hard_k < 1:
        raise ValueError(f"hard_k must be at least 1 (keys kept per query), got {hard_k}.")
