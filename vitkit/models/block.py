"""The Transformer block: attention to mix tokens, an MLP to transform each token.

Pre-norm residual form (as in ViT, DeiT and timm):

    x = x + DropPath(LayerScale₁(Attention(LayerNorm₁(x))))
    x = x + DropPath(LayerScale₂(MLP(LayerNorm₂(x))))

Attention is the only place where tokens exchange information; the MLP acts on every token
independently. The residual connections keep an identity path through the whole network,
which is why attention rollout adds the identity to each layer's attention matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .attention import SelfAttention


class QuickGELU(nn.Module):
    """x · σ(1.702 x): the sigmoid approximation of GELU that OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# The MLP's activation, by timm's names (``act_layer``). GELU(x) = x Φ(x), Φ the standard normal CDF.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,  # exact: ViT, DeiT, DINOv2, most checkpoints
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),  # Φ through tanh: SigLIP's big_vision models
    "quick_gelu": QuickGELU,  # OpenAI CLIP
    "silu": nn.SiLU,  # x σ(x): the gate of SwiGLU MLPs (DINOv2's giant model)
}


def activation(name: str) -> nn.Module:
    """A new activation module by its name in :data:`ACTIVATIONS`."""
    if name not in ACTIVATIONS:
        raise ValueError(f"act_layer={name!r} is not one of {tuple(ACTIVATIONS)}.")
    return ACTIVATIONS[name]()


class Mlp(nn.Module):
    """Position-wise feed-forward network: (B, N, D) -> (B, N, D).

    ``out = fc2(act(fc1(x)))`` with hidden width ``hidden_features`` (usually 4 D) and ``act`` one of
    :data:`ACTIVATIONS` (GELU by default).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        drop: float = 0.0,
        act_layer: str = "gelu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = activation(act_layer)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SwiGLU(nn.Module):
    """Gated feed-forward network (Shazeer 2020): (B, N, D) -> (B, N, D).

    A gate g = fc1_g(x) and a value u = fc1_x(x), both ``hidden_features`` wide; then
    ``out = fc2(act(g) ⊙ u)``, with ``act`` SiLU for SwiGLU (timm's ``SwiGLU``: AIMv2).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        drop: float = 0.0,
        act_layer: str = "silu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = activation(act_layer)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1_g(x)) * self.fc1_x(x))))


class SwiGLUPacked(nn.Module):
    """:class:`SwiGLU` with gate and value from one projection, ``[g, u] = fc1(x)`` (gate first):
    ``hidden_features`` is fc1's width, the gated width half of it (timm's ``SwiGLUPacked``,
    DINOv2's giant model). The layers of an :class:`Mlp`, with fc2 reading the gated half."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        drop: float = 0.0,
        act_layer: str = "silu",
        bias: bool = True,
    ) -> None:
        if hidden_features % 2:
            raise ValueError(f"SwiGLU splits fc1's {hidden_features} outputs in two: give an even width.")
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = activation(act_layer)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features // 2, in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.drop2(self.fc2(self.drop1(self.act(gate) * value)))


MLPS: dict[str, type[nn.Module]] = {"mlp": Mlp, "swiglu": SwiGLU, "swiglu_packed": SwiGLUPacked}


class LayerScale(nn.Module):
    """Per-channel learnable scale γ ⊙ x, initialised small (CaiT, DeiT III): lets deep models
    start close to the identity."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, drop a residual branch for a whole sample
    with probability ``p`` and scale the kept ones by 1 / (1 - p), so the expectation is unchanged.

    Shapes: (B, ...) -> (B, ...); one Bernoulli(1 - p) draw per sample. In evaluation, the identity.

    (torchvision's ``StochasticDepth`` computes the same.) The keep probability is a buffer rather
    than a Python number: ``torch.compile`` would otherwise specialise each block's compiled code on
    its own rate (the rates rise over depth), and blocks compiled one by one
    (:func:`vitkit.models.compile_blocks`) could not share one compiled graph.
    """

    keep: torch.Tensor

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate {p}: give a probability in [0, 1).")
        self.p = float(p)
        # not in the state dict (timm's checkpoints have no such entry): set from `p` here and again
        # by reset_parameters(), which initialises a model built on the meta device after to_empty()
        self.register_buffer("keep", torch.tensor(1.0 - self.p), persistent=False)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.keep.fill_(1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = self.keep.float().expand(x.shape[0], *([1] * (x.ndim - 1)))
        return x * (torch.bernoulli(keep) / keep).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _drop_path(rate: float | None) -> nn.Module:
    return nn.Identity() if rate is None else DropPath(rate)


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block: (B, N, D) -> (B, N, D).

    Args:
        dim: token width D.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of D.
        qkv_bias, qk_norm: see :class:`SelfAttention`.
        init_values: LayerScale initial value; ``None`` disables LayerScale.
        proj_drop: dropout after the attention projection and in the MLP.
        proj_bias: biases in the attention's output projection and the MLP's layers.
        attn_drop: dropout on the attention weights.
        drop_path: stochastic-depth rate of this block; ``None`` (the default): no stochastic depth.
            A model with stochastic depth gives every block a rate, 0 included, so that all its blocks
            hold the same modules (blocks compiled one by one then share one compiled graph).
        norm_layer: normalisation layer constructor.
        act_layer: the MLP's activation, a name of :data:`ACTIVATIONS`.
        mlp_layer: a name of :data:`MLPS`: ``'mlp'`` (:class:`Mlp`), ``'swiglu'`` (:class:`SwiGLU`) or
            ``'swiglu_packed'`` (:class:`SwiGLUPacked`); the gated ones with ``act_layer='silu'``.
        attn_mode, hard_k, hard_estimator: soft or hard (top-k) attention, see :class:`SelfAttention`.
        fused_attn: fused kernel or explicit formula for soft attention, see :class:`SelfAttention`.
        rel_pos_grid, rel_pos_class_token: a relative position bias, see :class:`SelfAttention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        proj_drop: float = 0.0,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        drop_path: float | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: str = "gelu",
        mlp_layer: str = "mlp",
        attn_mode: str = "soft",
        hard_k: int | None = None,
        hard_estimator: str = "ste",
        fused_attn: bool = True,
        rel_pos_grid: tuple[int, int] | None = None,
        rel_pos_class_token: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SelfAttention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            proj_bias=proj_bias,
            norm_layer=norm_layer,
            attn_mode=attn_mode,
            hard_k=hard_k,
            hard_estimator=hard_estimator,
            fused_attn=fused_attn,
            rel_pos_grid=rel_pos_grid,
            rel_pos_class_token=rel_pos_class_token,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = _drop_path(drop_path)

        self.norm2 = norm_layer(dim)
        if mlp_layer not in MLPS:
            raise ValueError(f"mlp_layer={mlp_layer!r} is not one of {tuple(MLPS)}.")
        self.mlp = MLPS[mlp_layer](
            dim, int(dim * mlp_ratio), drop=proj_drop, act_layer=act_layer, bias=proj_bias
        )
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = _drop_path(drop_path)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
