"""The Vision Transformer (Dosovitskiy et al., 2021), assembled from the blocks in this package.

    image (B, C, H, W)
      -> PatchEmbedding                      patch tokens (B, H/P · W/P, D)
      -> prepend [class], [distillation] and register tokens (B, prefix + patches, D)
      -> add position embeddings
      -> depth x TransformerBlock            (B, N, D)
      -> LayerNorm
      -> pool: the class token, the mean of the patch tokens, or attention pooling (a learned
               query attends over the tokens: AttentionPool, global_pool='map')
      -> Linear head                         logits (B, num_classes)
         (DeiT distilled: a second head on the distillation token, the two logits averaged)

Options and parameter names follow timm's ``VisionTransformer``, so a timm checkpoint loads as
is and ``model.state_dict()`` loads into timm. Names that appear in ``state_dict``:
``cls_token``, ``dist_token``, ``reg_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,
attn.qkv, attn.q_norm, attn.k_norm, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``,
``norm``, ``attn_pool.{latent, q, kv, proj, norm, mlp.fc1, mlp.fc2}``, ``fc_norm``, ``head``,
``head_dist``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._utils import to_2tuple
from .attention_pool import AttentionPool
from .block import TransformerBlock
from .patch_embedding import ConvStem, PatchEmbedding
from .position import resample_position_embedding, sincos_2d_position_embedding
from .relative_position import RelativePositionBias
from .rope import RotaryPositionEmbedding

GlobalPool = Literal["token", "avg", "max", "avgmax", "map", ""]
_POOLS = ("token", "avg", "max", "avgmax", "map", "")
_POS_EMBEDS = ("learn", "sincos", "none", "")
_NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


class VisionTransformer(nn.Module):
    """Vision Transformer classifier: images (B, C, H, W) -> logits (B, num_classes).

    Args:
        img_size: input size, int or (H, W).
        patch_size: patch size P, int or (Ph, Pw).
        in_chans: image channels.
        num_classes: classifier outputs; 0 gives a feature extractor (the head is the identity).
        global_pool: ``'token'`` (class token), ``'avg'`` (mean of patch tokens), ``'max'``,
            ``'avgmax'``, ``'map'`` (attention pooling: a learned query attends over the patch
            tokens, :class:`AttentionPool`; SigLIP) or ``''`` (no pooling; ``forward_head`` sees
            all tokens).
        pool_include_prefix: ``'avg'``, ``'max'``, ``'avgmax'`` and ``'map'`` pool the prefix
            tokens (class, registers) together with the patches (timm's option of the same name).
        embed_dim: token width D.
        depth: number of Transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias in the q, k, v projections.
        qk_norm: LayerNorm on queries and keys.
        init_values: LayerScale initial value (``None``: no LayerScale).
        class_token: prepend a learned [class] token.
        reg_tokens: number of register tokens ("Vision Transformers Need Registers").
        distilled: a [distillation] token after the class token, read by a second head
            (``head_dist``); the logits are the mean of both heads (DeiT, Touvron et al. 2021; timm's
            ``VisionTransformerDistilled``, its ``deit_*_distilled_*`` models). Needs the class token
            and ``global_pool='token'``. Trained with a teacher (``ImageClassifier(teacher=...)``),
            the second head learns from the teacher's predictions; without one, both heads learn
            from the labels, as in timm's fine-tuning.
        no_embed_class: position embeddings cover the patches only, not the prefix tokens.
        pre_norm: LayerNorm before the blocks (CLIP); removes the patch projection's bias.
        final_norm: LayerNorm after the blocks (or after pooling, see ``fc_norm``).
        fc_norm: put the final norm after pooling; ``None`` means "when pooling is not 'token'".
        pos_embed: ``'learn'``, ``'sincos'`` (fixed 2-D, stored as a frozen parameter so the
            state dict stays timm-compatible) or ``'none'``.
        dynamic_img_size: accept any input size divisible by the patch size at run time;
            position embeddings are resampled to the input's grid.
        drop_rate: dropout before the head.
        pos_drop_rate: dropout after adding position embeddings.
        proj_drop_rate: dropout after attention/MLP projections.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, rising linearly from 0 to this rate over the blocks.
        weight_init: ``''`` (timm's default: truncated normal 0.02 for linear layers) or
            ``'jax'`` (Xavier-uniform linears, LeCun-normal patch projection, zero head).
        norm_eps: epsilon of every norm (timm and torchvision use 1e-6, Hugging Face 1e-12).
        norm_layer: ``'layernorm'`` (the default) or ``'rmsnorm'`` (x / RMS(x) · γ, no centring and
            no bias: AIMv2), for every norm of the model.
        embed_norm: a norm on each patch token right after the projection (AIMv2).
        proj_bias: biases in the attention's output projections and the MLPs (``False``: AIMv2).
        act_layer: the MLP's activation, by timm's names: ``'gelu'`` (exact, the default),
            ``'gelu_tanh'`` (SigLIP), ``'quick_gelu'`` (OpenAI CLIP) or ``'silu'``.
        mlp_layer: ``'mlp'`` (two layers, the default), or a gated MLP with ``act_layer='silu'``:
            ``'swiglu'`` (:class:`~vitkit.models.block.SwiGLU`: AIMv2) or ``'swiglu_packed'``
            (:class:`~vitkit.models.block.SwiGLUPacked`: DINOv2's giant model; ``mlp_ratio`` then
            gives fc1's width, twice the gated width, as in timm).
        rope: rotary position embeddings in every block's attention, over the patch grid
            (:mod:`vitkit.models.rope`: DINOv3's form); usually with ``pos_embed='none'``.
        rope_theta: their frequency base.
        rope_rescale: in training, scale the patch coordinates by a random factor in
            [1/r, r] (DINOv3's augmentation); ``None``: never.
        rel_pos_bias: a learned relative position bias in every block's attention (BEiT; timm's
            ``Beit``; :mod:`vitkit.models.relative_position`), usually with ``pos_embed='none'``.
            For the model's grid, with a class token or none (no registers or distillation
            token); :meth:`set_input_size` resamples it, ``dynamic_img_size`` cannot follow it.
        attn_mode: ``'soft'`` (softmax attention, the default) or ``'hard'`` (every query keeps
            only its top ``hard_k`` keys), in every block; see :mod:`vitkit.models.attention`.
            Hard mode adds no parameters, so the state dict is the same as in soft mode.
        hard_k: keys kept per query with ``attn_mode='hard'`` (clamped to the number of tokens).
        hard_estimator: ``'ste'`` (straight-through) or ``'gumbel'`` (Gumbel-top-k sampling of
            the kept keys during training, straight-through gradients).
        stem_channels: replace the patch projection by a convolutional stem (:class:`ConvStem`):
            3x3 convolutions with these output channels, log2(patch_size) of them with stride 2
            (the first ones unless ``stem_strides`` says), then a 1x1 convolution to ``embed_dim``.
            Same token grid; timm has no such option.
        stem_strides: with ``stem_channels``, the stride (1 or 2) of each stem convolution, e.g.
            ``(1, 2, 2)``: full-resolution convolutions before the halvings (default: the halvings
            first, the cheapest).
        fused_attn: ``True`` (the default): soft attention through the fused
            ``scaled_dot_product_attention`` kernel; ``False``: the explicit formula, in every
            block. Same numbers, different speed: on this project's 2-core CPU (no AMX), bf16
            training with 64 tokens runs about twice as fast explicit (BENCHMARKS.md), which is
            why the bf16 CPU recipe sets it. A choice of kernel, not of architecture: vitkit files
            keep it, timm twins and timm/HF exports leave it out (timm's own switch is the
            ``TIMM_FUSED_ATTN`` environment variable).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: GlobalPool = "token",
        pool_include_prefix: bool = False,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        distilled: bool = False,
        no_embed_class: bool = False,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: bool | None = None,
        pos_embed: str = "learn",
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weight_init: Literal["", "jax"] = "",
        norm_eps: float = 1e-6,
        norm_layer: Literal["layernorm", "rmsnorm"] = "layernorm",
        embed_norm: bool = False,
        proj_bias: bool = True,
        act_layer: str = "gelu",
        mlp_layer: Literal["mlp", "swiglu", "swiglu_packed"] = "mlp",
        rope: bool = False,
        rope_theta: float = 100.0,
        rope_rescale: float | None = None,
        rel_pos_bias: bool = False,
        attn_mode: Literal["soft", "hard"] = "soft",
        hard_k: int | None = None,
        hard_estimator: Literal["ste", "gumbel"] = "ste",
        stem_channels: Sequence[int] | None = None,
        stem_strides: Sequence[int] | None = None,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool={global_pool!r} is not one of {_POOLS}.")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without it.")
        if pos_embed not in _POS_EMBEDS:
            raise ValueError(f"pos_embed={pos_embed!r} is not one of {_POS_EMBEDS}.")
        if weight_init not in ("", "jax"):
            raise ValueError(f"weight_init={weight_init!r} is not one of ('', 'jax').")
        if distilled and (not class_token or global_pool != "token" or reg_tokens or fc_norm):
            raise ValueError(
                "distilled=True reads the class and distillation tokens: it needs class_token=True, "
                f"global_pool='token', no registers and no fc_norm (got class_token={class_token}, "
                f"global_pool={global_pool!r}, reg_tokens={reg_tokens}, fc_norm={fc_norm})."
            )
        if rel_pos_bias and (reg_tokens or distilled or dynamic_img_size):
            raise ValueError(
                "rel_pos_bias=True is a bias for the model's patch grid and a class token: it does not "
                f"take registers, a distillation token or dynamic_img_size (got reg_tokens={reg_tokens}, "
                f"distilled={distilled}, dynamic_img_size={dynamic_img_size})."
            )
        # Every constructor argument, so the model can be rebuilt (checkpoints, export, CLI).
        self.config: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        # the usual MLP, norms and biases are not recorded: configs of the others stay as they were
        defaults = {
            "mlp_layer": "mlp",
            "norm_layer": "layernorm",
            "embed_norm": False,
            "proj_bias": True,
            "rope": False,
            "rel_pos_bias": False,
        }
        for key, default in defaults.items():
            if self.config[key] == default:
                del self.config[key]
        if not rope:
            del self.config["rope_theta"], self.config["rope_rescale"]
        if norm_layer not in _NORMS:
            raise ValueError(f"norm_layer={norm_layer!r} is not one of {tuple(_NORMS)}.")
        if attn_mode == "soft":  # soft configs keep timm's option names only (timm twins, exports)
            for key in ("attn_mode", "hard_k", "hard_estimator"):
                del self.config[key]
        if stem_strides is not None and stem_channels is None:
            raise ValueError(
                f"stem_strides={tuple(stem_strides)} needs stem_channels (the stem's convolutions)."
            )
        if stem_channels is None:  # likewise for the patch projection timm knows
            del self.config["stem_channels"]
        else:
            self.config["stem_channels"] = stem_channels = tuple(int(c) for c in stem_channels)
        if stem_strides is None:
            del self.config["stem_strides"]
        else:
            self.config["stem_strides"] = stem_strides = tuple(int(s) for s in stem_strides)
        if fused_attn:  # the default kernel choice is not recorded: configs stay timm's
            del self.config["fused_attn"]
        if not distilled:  # timm's VisionTransformer has no such option (its distilled twin is a class)
            del self.config["distilled"]
        if not pool_include_prefix:  # set by few timm models: configs of the others stay as they were
            del self.config["pool_include_prefix"]
        self.config["img_size"] = to_2tuple(img_size)
        self.config["patch_size"] = to_2tuple(patch_size)
        self.pretrained_cfg: dict[str, Any] = {}

        use_fc_norm = global_pool not in ("token", "map", "") if fc_norm is None else fc_norm
        make_norm = partial(_NORMS[norm_layer], eps=norm_eps)

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.pool_include_prefix = pool_include_prefix
        self.embed_dim = self.num_features = embed_dim
        self.has_class_token = class_token
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + int(distilled) + reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.distilled_training = False

        embed_options = {
            "bias": not pre_norm,
            "strict_img_size": not dynamic_img_size,
            "norm_layer": make_norm if embed_norm else None,
        }
        if stem_channels is None:
            self.patch_embed = PatchEmbedding(img_size, patch_size, in_chans, embed_dim, **embed_options)
        else:
            self.patch_embed = ConvStem(
                img_size,
                patch_size,
                in_chans,
                embed_dim,
                channels=stem_channels,
                strides=stem_strides,
                **embed_options,
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None

        self.pos_embed_type = pos_embed if pos_embed in ("learn", "sincos") else "none"
        embed_len = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        if self.pos_embed_type == "none":
            self.pos_embed = None
        else:
            self.pos_embed = nn.Parameter(
                torch.zeros(1, embed_len, embed_dim), requires_grad=self.pos_embed_type == "learn"
            )
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.rope = (
            RotaryPositionEmbedding(embed_dim // num_heads, rope_theta, rope_rescale) if rope else None
        )
        self.norm_pre = make_norm(embed_dim) if pre_norm else nn.Identity()

        # (on the CPU, also when building on the meta device); None: no stochastic depth at all
        drop_path_rates = (
            torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
            if drop_path_rate > 0
            else [None] * depth
        )
        self.blocks = nn.Sequential(
            *[
                TransformerBlock(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    init_values=init_values,
                    proj_drop=proj_drop_rate,
                    proj_bias=proj_bias,
                    attn_drop=attn_drop_rate,
                    drop_path=rate,
                    norm_layer=make_norm,
                    act_layer=act_layer,
                    mlp_layer=mlp_layer,
                    attn_mode=attn_mode,
                    hard_k=hard_k,
                    hard_estimator=hard_estimator,
                    fused_attn=fused_attn,
                    rel_pos_grid=self.patch_embed.grid_size if rel_pos_bias else None,
                    rel_pos_class_token=class_token,
                )
                for rate in drop_path_rates
            ]
        )
        self.norm = make_norm(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = (
            AttentionPool(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                norm_layer=make_norm,
                act_layer=act_layer,
                fused_attn=fused_attn,
            )
            if global_pool == "map"
            else None
        )
        self.fc_norm = make_norm(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = self._new_head(num_classes) if distilled else None

        self.init_weights(weight_init)

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self, mode: Literal["", "jax"] = "") -> None:
        """(Re-)initialise all weights: timm's default scheme, or ``'jax'`` (big_vision)."""
        if self.pos_embed_type == "learn":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        elif self.pos_embed_type == "sincos":
            self.pos_embed.copy_(self._sincos(self.patch_embed.grid_size))
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        if self.attn_pool is not None:  # the probe: unit-scale queries, as timm and big_vision
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.embed_dim**-0.5)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)  # as DeiT and timm
        for name, module in self.named_modules():
            if isinstance(module, RelativePositionBias):
                nn.init.zeros_(module.table)  # no preference for any offset, as BEiT and timm
            if isinstance(module, nn.Linear):
                if mode == "jax" and name in ("head", "head_dist"):
                    nn.init.zeros_(module.weight)
                    nn.init.zeros_(module.bias)
                    continue
                if mode == "jax":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    if mode == "jax" and ".mlp." in f".{name}.":
                        nn.init.normal_(module.bias, std=1e-6)
                    else:
                        nn.init.zeros_(module.bias)
        if mode == "jax":  # LeCun normal on the patch projection
            weight = self.patch_embed.proj.weight
            fan_in = weight[0].numel()
            nn.init.trunc_normal_(weight, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)
            if self.patch_embed.proj.bias is not None:
                nn.init.zeros_(self.patch_embed.proj.bias)

    def _sincos(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Fixed sin-cos table (1, embed_len, D), zeros for prefix tokens that carry a position."""
        table = sincos_2d_position_embedding(grid_size, self.embed_dim)
        if not self.no_embed_class and self.num_prefix_tokens:
            table = torch.cat([torch.zeros(self.num_prefix_tokens, self.embed_dim), table])
        return table.unsqueeze(0)

    # ------------------------------------------------------------------ properties
    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid (rows, columns) at the model's ``img_size``."""
        return self.patch_embed.grid_size

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.patch_embed.patch_size

    @property
    def img_size(self) -> tuple[int, int]:
        return self.patch_embed.img_size

    def dynamic_grid_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid for an input of size (H, W)."""
        return self.patch_embed.grid_size_for(img_size)

    def options_timm_lacks(self) -> list[str]:
        """What timm's (and Hugging Face's) ViT cannot express of this model, each with its options;
        empty for a model timm can rebuild. Exports and the timm twin refuse a model that has any."""
        config, lacking = self.config, []
        if config.get("attn_mode", "soft") != "soft":
            hard = f"attn_mode={config['attn_mode']!r}, hard_k={config.get('hard_k')}"
            lacking.append(f"hard attention ({hard})")
        if config.get("rope"):
            lacking.append("rotary position embeddings (rope=True)")
        if config.get("rel_pos_bias"):
            lacking.append("relative position bias (rel_pos_bias=True; timm's Beit has it)")
        if config.get("stem_channels"):
            strides = f", stem_strides={config['stem_strides']}" if config.get("stem_strides") else ""
            lacking.append(f"convolutional stem (stem_channels={config['stem_channels']}{strides})")
        return lacking

    def no_weight_decay(self) -> set[str]:
        """Parameters that should not be weight-decayed: position, class, distillation and register
        tokens, the attention pool's query (a token too) and relative position tables (as BEiT)."""
        tables = {name for name, _ in self.named_parameters() if name.endswith("rel_pos_bias.table")}
        return {"pos_embed", "cls_token", "dist_token", "reg_token", "attn_pool.latent", *tables}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def set_distilled_training(self, enable: bool = True) -> None:
        """A distilled model in train mode returns both heads' logits, (class, distillation), so that
        each can have its own loss term (the labels', the teacher's), as timm's DeiT does."""
        if enable and self.head_dist is None:
            raise ValueError("set_distilled_training needs a distilled model (distilled=True).")
        self.distilled_training = enable

    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        """The head; for a distilled model (head, head_dist), as timm returns them."""
        return self.head if self.head_dist is None else (self.head, self.head_dist)

    def _new_head(self, num_classes: int) -> nn.Module:
        """A freshly initialised head on this model's device and dtype (the identity for 0 classes)."""
        if num_classes <= 0:
            return nn.Identity()
        weight = next((p for p in self.parameters()), None)
        head = nn.Linear(self.embed_dim, num_classes, device=weight.device if weight is not None else None)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head.to(weight.dtype) if weight is not None else head

    def reset_classifier(self, num_classes: int, global_pool: GlobalPool | None = None) -> None:
        """Replace the head (both heads of a distilled model) by freshly initialised ones with
        ``num_classes`` outputs (0: none)."""
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"global_pool={global_pool!r} is not one of {_POOLS}.")
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs a class token, and this model has none.")
            if global_pool != "token" and self.dist_token is not None:
                raise ValueError(
                    "A distilled model's heads read its class and distillation tokens: keep 'token'."
                )
            if global_pool == "map" and self.attn_pool is None:
                raise ValueError(
                    "global_pool='map' needs an attention pool, which this model was built without: "
                    "build it with global_pool='map' (its pool is then trained with the new head)."
                )
            if global_pool != "map":  # as timm: other pooling drops the attention pool
                self.attn_pool = None
            self.global_pool = global_pool
            self.config["global_pool"] = global_pool
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        self.head = self._new_head(num_classes)
        if self.head_dist is not None:
            self.head_dist = self._new_head(num_classes)

    # ------------------------------------------------------------------ timm's model interface
    # What timm's tools call on a model: its optimizer factory (group_matcher), its feature
    # extraction (feature_info, prune_intermediate_layers), DINO-style callers
    # (get_intermediate_layers) and resolution changes (set_input_size).
    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of ``pretrained_cfg``."""
        return self.pretrained_cfg

    @property
    def head_hidden_size(self) -> int:
        """Width of the features the head reads (``forward_head(..., pre_logits=True)``)."""
        return self.embed_dim

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per block, as timm's: ``module`` name, ``num_chs`` channels, ``reduction``
        (input pixels per patch side)."""
        reduction = self.img_size[0] // self.grid_size[0]
        return [
            {"module": f"blocks.{i}", "num_chs": self.embed_dim, "reduction": reduction}
            for i in range(len(self.blocks))
        ]

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, as timm's (its layer-wise LR decay reads them): the embedding,
        then block i, then everything after the blocks."""
        return {
            "stem": r"^cls_token|^dist_token|^reg_token|^pos_embed|^patch_embed|^norm_pre",
            "blocks": r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    @torch.no_grad()
    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: Any = None) -> None:
        """Rebuild for another input size in place: learned position embeddings are resampled
        (bicubic), fixed sin-cos ones recomputed; ``pretrained_cfg['input_size']`` follows."""
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError(
                "set_input_size cannot change the patch size of a built model: create it again with "
                "create_model(NAME, pretrained=WEIGHTS, patch_size=...), which resamples the patch kernel."
            )
        if img_size is None:
            return
        # the table for the new grid, as the forward pass would build it (read before the grid changes)
        table = self._position_embedding(self.dynamic_grid_size(to_2tuple(img_size)))
        self.patch_embed.set_img_size(img_size)  # refuses a size the patches do not divide
        for block in self.blocks:
            if block.attn.rel_pos_bias is not None:
                block.attn.rel_pos_bias.set_grid_size(self.grid_size)
        if table is not self.pos_embed:
            self.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed.requires_grad)
        self.config["img_size"] = self.img_size
        if self.pretrained_cfg.get("input_size"):
            self.pretrained_cfg["input_size"] = (self.patch_embed.in_chans, *self.img_size)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop what a feature extractor taking blocks ``indices`` (as ``forward_intermediates``)
        does not need: the later blocks, the final norm (``prune_norm``), pool and head
        (``prune_head``). Returns the block indices kept, non-negative."""
        take = _block_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max(take) + 1]
        self.config["depth"] = len(self.blocks)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "" if self.dist_token is None else None)
        return take

    # ------------------------------------------------------------------ forward
    def _position_embedding(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The position embeddings for a patch grid, resampled if it is not the model's grid."""
        if self.pos_embed is None or grid == self.grid_size:
            return self.pos_embed
        if self.pos_embed_type == "sincos":  # fixed: recompute exactly instead of interpolating
            return self._sincos(grid).to(self.pos_embed)
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        return resample_position_embedding(self.pos_embed, grid, self.grid_size, prefix)

    def _add_prefix_tokens_and_positions(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, gh, gw, D) -> sequence (B, prefix + gh·gw, D) with positions added."""
        batch, gh, gw, _ = patches.shape
        x = rearrange(patches, "b gh gw d -> b (gh gw) d")
        tokens = (self.cls_token, self.dist_token, self.reg_token)
        prefix = [token.expand(batch, -1, -1) for token in tokens if token is not None]
        pos_embed = self._position_embedding((gh, gw))
        if pos_embed is None:
            x = torch.cat([*prefix, x], dim=1)
        elif self.no_embed_class:  # positions for patches only (DeiT III, big_vision)
            x = torch.cat([*prefix, x + pos_embed], dim=1)
        else:  # the original ViT: prefix tokens have position entries too
            x = torch.cat([*prefix, x], dim=1) + pos_embed
        return self.pos_drop(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x, flatten=False)
        x = self._add_prefix_tokens_and_positions(x)
        return self.norm_pre(x)

    def _rotations(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary tables (cos, sin) of the images' patch grid, or None without ``rope``."""
        if self.rope is None:
            return None
        return self.rope(self.dynamic_grid_size(tuple(images.shape[-2:])), images.device)

    def _run_block(
        self, block: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        args = (x,) if rope is None else (x, rope)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, prefix + patches, D)."""
        rope = self._rotations(x)
        x = self._embed(x)
        for block in self.blocks:
            x = self._run_block(block, x, rope)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) -> one vector per image (B, D) following ``global_pool`` (a distilled
        model: the mean of its class and distillation tokens)."""
        if self.dist_token is not None:
            return (x[:, 0] + x[:, 1]) / 2
        if self.global_pool == "token":
            return x[:, 0]
        patches = x if self.pool_include_prefix else x[:, self.num_prefix_tokens :]
        if self.attn_pool is not None:
            return self.attn_pool(patches)
        if self.global_pool == "avg":
            return patches.mean(dim=1)
        if self.global_pool == "max":
            return patches.amax(dim=1)
        if self.global_pool == "avgmax":
            return 0.5 * (patches.amax(dim=1) + patches.mean(dim=1))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, num_classes), or the pooled features with ``pre_logits``."""
        if self.head_dist is not None:  # DeiT: a head per token, their logits averaged
            cls, dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
            if pre_logits:
                return (cls + dist) / 2
            if self.distilled_training and self.training:  # each head for its own loss term
                return self.head(cls), self.head_dist(dist)
            return (self.head(cls) + self.head_dist(dist)) / 2
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> logits; in training with :meth:`set_distilled_training`, (class head, distillation
        head) logits."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """The output of selected blocks, as timm's ``forward_intermediates``.

        Args:
            indices: an int n takes the last n blocks; a sequence takes those block indices
                (negative counts from the end); ``None`` takes all.
            return_prefix_tokens: return (patch features, prefix tokens) pairs.
            norm: apply the final norm to each intermediate.
            stop_early: stop after the last requested block (only with ``intermediates_only``).
            output_fmt: ``'NCHW'`` (B, D, gh, gw) feature maps or ``'NLC'`` (B, gh·gw, D) tokens.
            intermediates_only: return only the list of intermediates.

        Returns:
            ``intermediates`` or ``(final normalised tokens, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        take = _block_indices(len(self.blocks), indices)
        gh, gw = self.dynamic_grid_size(tuple(x.shape[-2:]))
        last = max(take) if (stop_early and intermediates_only) else len(self.blocks) - 1

        rope = self._rotations(x)
        x = self._embed(x)
        intermediates = []
        for i, block in enumerate(self.blocks[: last + 1]):
            x = self._run_block(block, x, rope)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)

        outputs = []
        for y in intermediates:
            prefix, patches = y[:, : self.num_prefix_tokens], y[:, self.num_prefix_tokens :]
            if output_fmt == "NCHW":
                patches = rearrange(patches, "b (gh gw) d -> b d gh gw", gh=gh, gw=gw).contiguous()
            outputs.append((patches, prefix) if return_prefix_tokens and self.num_prefix_tokens else patches)
        if intermediates_only:
            return outputs
        return self.norm(x), outputs

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
    ) -> list[Any]:
        """DINO's interface to ``forward_intermediates``: the last ``n`` blocks (or blocks ``n``),
        as (B, gh·gw, D) tokens, or (B, D, gh, gw) maps with ``reshape``."""
        return self.forward_intermediates(
            x,
            n,
            return_prefix_tokens=return_prefix_tokens,
            norm=norm,
            output_fmt="NCHW" if reshape else "NLC",
            intermediates_only=True,
        )


def _block_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"Cannot take the last {indices} blocks of a model with {depth}.")
        return list(range(depth - indices, depth))
    taken = []
    for i in indices:
        if not -depth <= i < depth:
            raise ValueError(f"Block index {i} is out of range for a model with {depth} blocks.")
        taken.append(i % depth)
    return taken
