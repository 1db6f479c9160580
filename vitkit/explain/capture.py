"""Capturing attention: the weights A = softmax(q kᵀ / √d) of chosen layers, and their gradients.

*Explicit* attention is what the model says it looks at: row i of A is how token i mixes the
values of all tokens. Fast kernels (``scaled_dot_product_attention``) never store A, so to read
it a layer must take its explicit path. :class:`AttentionRecorder` does that for the requested
layers only, reads A with a forward pre-hook on the layer's ``attn_drop`` (whose input is the
post-softmax A), optionally records ∂score/∂A in the backward pass, and restores everything on
exit. Layers that were not requested keep their fused path and keep nothing.

*Implicit* attention is what the output is sensitive to: the gradient of a class score with
respect to the attention weights or the input pixels (see :mod:`vitkit.explain.methods`).

A model that pools with attention (``global_pool='map'``: a learned query attends over the tokens,
:class:`~vitkit.models.AttentionPool`, timm's ``AttentionPoolLatent``) has one more attention
after the blocks; ``AttentionRecorder(..., pool=True)`` records it too: its single row per head
says how the classifier weighs the tokens.

Supported models: vitkit and timm ``VisionTransformer`` (any timm model whose blocks have
``attn.fused_attn`` and ``attn.attn_drop``), Hugging Face ViT-family models (each requested layer
is switched to the eager attention implementation and its returned weights are read), and
torchvision ``VisionTransformer`` (weights only, no gradients: ``nn.MultiheadAttention`` returns a
copy of A that is not part of the computation).

:class:`TokenLayout` says which token is what: class token, distillation token, register tokens
and the (h, w) patch grid of the actual input, so every method handles every layout.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

Query = Literal["auto", "cls", "patches"]


# ---------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class TokenLayout:
    """Which token of the sequence is what, for one input size.

    The sequence is ``prefix tokens + patches``; patches come last, in raster order over ``grid``.

    Attributes:
        grid: (rows, columns) of the patch grid for the actual input size.
        num_prefix_tokens: tokens before the patches (class, distillation, registers).
        cls_index: index of the class token, or ``None``.
        dist_index: index of the distillation token (DeiT), or ``None``.
        reg_indices: indices of the register tokens.
        pooling: what the classifier reads: ``'token'`` (the class token, and the distillation
            token for DeiT), ``'patches'`` (global average/max pooling of the patch tokens) or
            ``'all'`` (pooling of every token, prefix tokens included: timm's ``pool_include_prefix``).
        attention_pool: the pooled tokens are weighted by an attention pool (``global_pool='map'``)
            rather than equally; the methods read those weights with ``query='auto'``.
    """

    grid: tuple[int, int]
    num_prefix_tokens: int = 1
    cls_index: int | None = 0
    dist_index: int | None = None
    reg_indices: tuple[int, ...] = ()
    pooling: Literal["token", "patches", "all"] = "token"
    attention_pool: bool = False

    def __post_init__(self) -> None:
        special = [i for i in (self.cls_index, self.dist_index) if i is not None] + list(self.reg_indices)
        if sorted(special) != list(range(self.num_prefix_tokens)):
            raise ValueError(
                f"Prefix tokens {special} do not cover 0..{self.num_prefix_tokens - 1} exactly "
                f"(num_prefix_tokens={self.num_prefix_tokens})."
            )
        if self.pooling == "token" and self.cls_index is None:
            raise ValueError("pooling='token' needs a class token.")

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def patch_indices(self) -> slice:
        """Slice of the patch tokens in the sequence."""
        return slice(self.num_prefix_tokens, self.num_tokens)

    def query_indices(self, query: Query = "auto") -> list[int]:
        """Rows of an (N, N) matrix whose mean is "what the prediction reads".

        ``'auto'``: the tokens the classifier reads (class token, plus the distillation token
        whose head is averaged in for DeiT; all patches for a pooled model, all tokens for one that
        pools its prefix tokens too; with an attention pool, the methods weight these rows by its
        attention rather than equally); ``'cls'``: the class
        token; ``'patches'``: all patch tokens (models without class token).
        """
        if query == "auto":
            if self.pooling == "token":
                return [i for i in (self.cls_index, self.dist_index) if i is not None]
            if self.pooling == "all":
                return list(range(self.num_tokens))
            query = "patches"
        if query == "cls":
            if self.cls_index is None:
                raise ValueError("This model has no class token; use query='patches' (or 'auto').")
            return [self.cls_index]
        if query == "patches":
            return list(range(self.num_prefix_tokens, self.num_tokens))
        raise ValueError(f"query must be 'auto', 'cls' or 'patches', got {query!r}.")

    def labels(self) -> list[str]:
        """Token names: ``CLS``, ``DIST``, ``REG0``…, then ``(row,col)`` for each patch."""
        names = [""] * self.num_prefix_tokens
        if self.cls_index is not None:
            names[self.cls_index] = "CLS"
        if self.dist_index is not None:
            names[self.dist_index] = "DIST"
        for k, i in enumerate(self.reg_indices):
            names[i] = f"REG{k}"
        return names + [f"({r},{c})" for r in range(self.grid[0]) for c in range(self.grid[1])]


def _image_size(images: torch.Tensor | Sequence[int]) -> tuple[int, int]:
    if isinstance(images, torch.Tensor):
        return int(images.shape[-2]), int(images.shape[-1])
    h, w = images[-2:]
    return int(h), int(w)


def token_layout(model: nn.Module, images: torch.Tensor | Sequence[int]) -> TokenLayout:
    """The :class:`TokenLayout` of ``model`` for ``images`` (a tensor, or its (..., H, W) size).

    Reads vitkit and timm ``VisionTransformer`` (and subclasses such as timm's DeiT with a
    distillation token), Hugging Face ViT-family models (ViT, DeiT, DINOv2, DINOv3, I-JEPA, CLIP,
    SigLIP, AIMv2) and torchvision ``VisionTransformer``.
    """
    size = _image_size(images)
    model = unwrap(model)
    if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):  # vitkit, timm
        pe = model.patch_embed
        if hasattr(model, "dynamic_grid_size"):  # vitkit
            grid = model.dynamic_grid_size(size)
        elif getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
            grid = pe.dynamic_feat_size(size)
        elif hasattr(pe, "grid_size"):
            grid = tuple(pe.grid_size)
        else:
            raise TypeError(
                f"Cannot read the patch grid of a {type(model).__name__} (its patch embedding has no "
                "grid_size): expected a ViT whose tokens are a class/register prefix and a grid of patches."
            )
        has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
        has_dist = getattr(model, "dist_token", None) is not None
        reg_token = getattr(model, "reg_token", None)  # timm's Eva has the tokens but no count
        num_reg = getattr(model, "num_reg_tokens", 0) or (reg_token.shape[1] if reg_token is not None else 0)
        prefix = int(model.num_prefix_tokens)
        cls_index = 0 if has_cls else None
        dist_index = int(has_cls) if has_dist else None
        first_reg = int(has_cls) + int(has_dist)
        pool = getattr(model, "global_pool", "token")
        pooling = "token" if (pool == "token" and has_cls) else "patches"
        if pooling == "patches" and getattr(model, "pool_include_prefix", False):
            pooling = "all"
        return TokenLayout(
            grid=(int(grid[0]), int(grid[1])),
            num_prefix_tokens=prefix,
            cls_index=cls_index,
            dist_index=dist_index,
            reg_indices=tuple(range(first_reg, first_reg + num_reg)),
            pooling=pooling,
            attention_pool=attention_pool(model) is not None,
        )
    if _is_hf(model):
        return _hf_token_layout(model, size)
    if hasattr(model, "class_token") and hasattr(model, "encoder") and hasattr(model, "patch_size"):
        p = model.patch_size  # torchvision
        return TokenLayout(grid=(size[0] // p, size[1] // p), num_prefix_tokens=1, cls_index=0)
    raise TypeError(
        f"Cannot read the token layout of a {type(model).__name__}: expected a vitkit, timm, Hugging Face "
        "or torchvision Vision Transformer."
    )


# Hugging Face image classifiers that read the mean of the patch tokens, not the class token.
_HF_MEAN_POOLED = ("CLIPForImageClassification", "SiglipForImageClassification")


def _hf_token_layout(model: nn.Module, size: tuple[int, int]) -> TokenLayout:
    """The layout of a transformers ViT-family model (ViT, DeiT, DINOv2, CLIP's and SigLIP's image
    towers and classifiers), told by its parameters: a class token, a distillation token, registers.

    CLIP's and SigLIP's classifiers read the patch mean (``pooling='patches'``). DINOv2's read the
    class token and the patch mean side by side; ``'token'`` is taken for them, so ``query='auto'``
    reads the class token's row (the gradients that the gradient methods weigh by still come from
    the whole classifier).
    """
    config = model.config
    vision = getattr(config, "vision_config", None) or config
    if not hasattr(vision, "patch_size"):
        raise TypeError(f"Cannot read the patch size of a {type(model).__name__} from its config.")
    names = [name for name, _ in model.named_parameters()]
    if any(name.endswith("head.probe") for name in names) and not hasattr(model, "classifier"):
        raise TypeError(
            f"{type(model).__name__} pools its tokens with an attention-pooling head (an "
            "nn.MultiheadAttention, whose weights cannot be read exactly). Load the same weights as a "
            "vitkit model, whose explanations read the pool: "
            "vitkit.create_model(pretrained=FOLDER or 'hf:REPO')."
        )
    ph, pw = (vision.patch_size,) * 2 if isinstance(vision.patch_size, int) else vision.patch_size
    embedded = [name for name in names if "embeddings." in name]  # (not a pooling head's query)
    has_cls = any(name.endswith(("cls_token", "class_embedding")) for name in embedded)
    has_dist = any(name.endswith("distillation_token") for name in embedded)
    num_reg = int(getattr(vision, "num_register_tokens", 0) or 0)
    first_reg = int(has_cls) + int(has_dist)
    mean_pooled = type(model).__name__ in _HF_MEAN_POOLED or not has_cls
    return TokenLayout(
        grid=(size[0] // ph, size[1] // pw),
        num_prefix_tokens=first_reg + num_reg,
        cls_index=0 if has_cls else None,
        dist_index=int(has_cls) if has_dist else None,
        reg_indices=tuple(range(first_reg, first_reg + num_reg)),
        pooling="patches" if mean_pooled else "token",
    )


# -------------------------------------------------------------------------------------- backends
def unwrap(model: nn.Module) -> nn.Module:
    """The Vision Transformer inside a wrapper (e.g. a LightningModule with a ``.model``)."""
    if hasattr(model, "blocks") or hasattr(model, "encoder") or _is_hf(model):
        return model
    inner = getattr(model, "model", None)
    return unwrap(inner) if isinstance(inner, nn.Module) else model


def attention_pool(model: nn.Module) -> nn.Module | None:
    """The attention-pooling head of a vitkit or timm ViT (``global_pool='map'``), or ``None``."""
    pool = getattr(unwrap(model), "attn_pool", None)
    return pool if isinstance(pool, nn.Module) else None


def _is_hf(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) is not None


def _is_timm_like(module: nn.Module) -> bool:
    return hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module)


def _hf_attention_class(model: nn.Module) -> type | None:
    recorded = getattr(model, "_can_record_outputs", None) or {}
    cls = recorded.get("attentions")
    cls = getattr(cls, "target_class", cls)  # an OutputRecorder wraps the class
    return cls if isinstance(cls, type) else None


def attention_modules(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The attention module of every block, in order, and the backend that reads them.

    Returns ``(backend, modules)`` with backend ``'timm'`` (vitkit and timm: ``fused_attn`` and
    ``attn_drop``), ``'hf'`` or ``'torchvision'``.
    """
    model = unwrap(model)
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks):
        # a block's `attn`, or the block itself where attention is computed inline (timm's
        # ParallelScalingBlock: attention and MLP side by side from one fused projection)
        mods = [getattr(b, "attn", b if _is_timm_like(b) else None) for b in blocks]
        if all(m is not None and _is_timm_like(m) for m in mods):
            return "timm", mods
        kinds = sorted({type(m if m is not None else b).__name__ for m, b in zip(mods, blocks, strict=True)})
        raise TypeError(
            f"The blocks of this {type(model).__name__} are not ones vitkit reads ({', '.join(kinds)}): it "
            "reads blocks with one self-attention `attn` that has `fused_attn` and `attn_drop` (vitkit, "
            "timm's ViT, DeiT, BEiT, EVA), not parallel branches (timm's ParallelThingsBlock) or "
            "another kind of attention."
        )
    hf_class = _hf_attention_class(model)
    if hf_class is not None:
        mods = [m for m in model.modules() if isinstance(m, hf_class)]
        if mods:
            return "hf", mods
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layers"):
        mods = [getattr(layer, "self_attention", None) for layer in encoder.layers]
        if mods and all(isinstance(m, nn.MultiheadAttention) for m in mods):
            return "torchvision", mods
    mods = [m for m in model.modules() if _is_timm_like(m)]
    if mods:
        return "timm", mods
    raise TypeError(
        f"Found no attention layers to read in a {type(model).__name__}: expected blocks whose attention "
        "has `fused_attn` and `attn_drop` (vitkit, timm), or a Hugging Face / torchvision ViT."
    )


def resolve_layers(layers: int | Iterable[int] | None, depth: int) -> list[int]:
    """Layer indices (negative counts from the end) -> sorted distinct non-negative indices."""
    if layers is None:
        return list(range(depth))
    if isinstance(layers, int):
        layers = [layers]
    out = set()
    for i in layers:
        i = int(i)
        if not -depth <= i < depth:
            raise ValueError(f"Layer {i} is out of range for a model with {depth} attention layers.")
        out.add(i % depth)
    return sorted(out)


# -------------------------------------------------------------------------------------- recorder
class AttentionRecorder:
    """Context manager that records the attention weights (and their gradients) of chosen layers.

    Inside the ``with`` block, every forward pass stores the post-softmax attention of each
    requested layer in ``recorder.attentions[layer]`` (B, heads, N, N), still attached to the
    autograd graph, and with ``gradients=True`` every backward pass stores ∂(output)/∂A in
    ``recorder.gradients[layer]``: each gradient is keyed by the layer it belongs to, whatever
    order the backward pass visits them in. On exit the layers get their fused attention and
    gradient-checkpointing settings back and all hooks are removed.

    ``transform`` (optional) maps each captured A before it is stored, e.g. a head fusion, so
    that only the reduced tensor is kept (it is not applied to the gradients).

    ``pool=True`` also records the attention pool's weights (a model with ``global_pool='map'``)
    in ``recorder.pool_attention`` (B, heads, 1, pooled tokens) and, with ``gradients``, their
    gradient in ``recorder.pool_gradient`` (``transform`` does not apply to them).

    Example::

        with AttentionRecorder(model, layers=[-1], gradients=True) as rec:
            model(images)[:, 3].sum().backward()
        A, dA = rec.attentions[11], rec.gradients[11]
    """

    def __init__(
        self,
        model: nn.Module,
        layers: int | Iterable[int] | None = None,
        *,
        gradients: bool = False,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        pool: bool = False,
    ) -> None:
        self.model = unwrap(model)
        self.backend, self._modules = attention_modules(self.model)
        self.layers = resolve_layers(layers, len(self._modules))
        self.gradients_enabled = gradients
        self.transform = transform
        self.attentions: dict[int, torch.Tensor] = {}
        self.gradients: dict[int, torch.Tensor] = {}
        self.pool_attention: torch.Tensor | None = None
        self.pool_gradient: torch.Tensor | None = None
        self._pool = attention_pool(self.model) if pool else None
        if pool and self._pool is None:
            raise ValueError(f"pool=True, but this {type(self.model).__name__} has no attention pool.")
        self._undo: list[Callable[[], None]] = []
        if gradients and self.backend == "torchvision":
            raise ValueError(
                "torchvision's nn.MultiheadAttention returns a copy of the attention weights that the "
                "computation does not use, so their gradients cannot be read; use a vitkit or timm model."
            )

    @property
    def depth(self) -> int:
        """Number of attention layers of the model."""
        return len(self._modules)

    def recorded(self) -> dict[int, torch.Tensor]:
        """``{layer: (B, heads, N, N)}`` for every requested layer, detached; an error names the
        layers the forward pass did not run."""
        missing = [i for i in self.layers if i not in self.attentions]
        if missing:
            raise RuntimeError(f"Attention layers {missing} were not run by the model's forward pass.")
        return {i: self.attentions[i].detach() for i in self.layers}

    def clear(self) -> None:
        self.attentions.clear()
        self.gradients.clear()
        self.pool_attention = self.pool_gradient = None

    # ---------------------------------------------------------------- hooks
    def _store(self, index: int, attn: torch.Tensor) -> None:
        if attn.shape[-2] != attn.shape[-1]:
            raise ValueError(
                f"Attention layer {index} attends from {attn.shape[-2]} to {attn.shape[-1]} tokens: not "
                "self-attention of every token over every token (CaiT's class attention, for one). The "
                "explanations follow attention through ViT blocks, where every token attends to all."
            )
        if self.gradients_enabled and attn.requires_grad:
            attn.register_hook(partial(self._store_gradient, index))
        self.attentions[index] = self.transform(attn) if self.transform is not None else attn

    def _store_gradient(self, index: int, grad: torch.Tensor) -> None:
        self.gradients[index] = grad

    def _timm_hook(self, index: int, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._store(index, args[0])

    def _store_pool(self, attn: torch.Tensor) -> None:
        if self.gradients_enabled and attn.requires_grad:
            attn.register_hook(partial(setattr, self, "pool_gradient"))
        self.pool_attention = attn

    def _record_pool(self) -> None:
        pool = self._pool
        if _is_timm_like(pool):  # vitkit's AttentionPool: its explicit A is the input of attn_drop
            self._set(pool, "fused_attn", False)
            handle = pool.attn_drop.register_forward_pre_hook(lambda module, args: self._store_pool(args[0]))
            self._undo.append(handle.remove)
            return
        # timm's AttentionPoolLatent has no module to hook: run its explicit path here for a while
        if "forward" in vars(pool):
            self._set(pool, "forward", partial(_explicit_latent_pool, pool, self._store_pool))
        else:
            pool.forward = partial(_explicit_latent_pool, pool, self._store_pool)
            self._undo.append(lambda: delattr(pool, "forward"))

    def _output_hook(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(f"Attention layer {index} returned no attention weights.")
        if weights.ndim == 3:  # (B, N, N): one head
            weights = weights.unsqueeze(1)
        self._store(index, weights)

    @staticmethod
    def _need_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    # ---------------------------------------------------------------- context
    def _set(self, obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old))

    def __enter__(self) -> AttentionRecorder:
        self.clear()
        try:
            if hasattr(self.model, "grad_checkpointing"):  # recomputation would record twice
                self._set(self.model, "grad_checkpointing", False)
            if self._pool is not None:
                self._record_pool()
            for i in self.layers:
                module = self._modules[i]
                if self.backend == "timm":
                    self._set(module, "fused_attn", False)
                    handle = module.attn_drop.register_forward_pre_hook(partial(self._timm_hook, i))
                elif self.backend == "hf":
                    config = copy.copy(module.config)
                    config._attn_implementation = "eager"
                    self._set(module, "config", config)
                    handle = module.register_forward_hook(partial(self._output_hook, i))
                else:
                    pre = module.register_forward_pre_hook(self._need_weights, with_kwargs=True)
                    self._undo.append(pre.remove)
                    handle = module.register_forward_hook(partial(self._output_hook, i))
                self._undo.append(handle.remove)
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __exit__(self, *exc: object) -> None:
        self._restore()


def _explicit_latent_pool(
    pool: nn.Module,
    store: Callable[[torch.Tensor], None],
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """timm's ``AttentionPoolLatent.forward`` on its explicit path, handing A to ``store``."""
    from einops import rearrange

    if attn_mask is not None:
        raise ValueError("Recording an attention pool with an attention mask is not supported.")
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    q = rearrange(pool.q(pool.latent.expand(x.shape[0], -1, -1)), "b l (h d) -> b h l d", h=pool.num_heads)
    k, v = rearrange(pool.kv(x), "b n (two h d) -> two b h n d", two=2, h=pool.num_heads).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    attn = ((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, latents, N)
    store(attn)
    out = pool.proj_drop(pool.proj(rearrange(attn @ v, "b h l d -> b l (h d)")))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        return out[:, 0]
    return out.mean(1) if pool.pool == "avg" else out


# ------------------------------------------------------------------------------------ utilities
@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (no dropout, no stochastic depth), then restore its mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output (a tensor, a tuple, or an object with ``.logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):  # timm distilled models in distillation training mode
        return sum(output) / len(output)
    raise TypeError(f"Cannot read logits from a model output of type {type(output).__name__}.")


def forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(images)`` as logits, for vitkit/timm/torchvision (tensor in) and Hugging Face."""
    if _is_hf(model):
        return logits_of(model(pixel_values=images))
    return logits_of(model(images))


def attention_maps(
    model: nn.Module, images: torch.Tensor, layers: int | Iterable[int] | None = None
) -> dict[int, torch.Tensor]:
    """Post-softmax attention of the requested layers: ``{layer: (B, heads, N, N)}``.

    Exactly ``softmax(q kᵀ · scale)`` of each layer (what the explicit path computes), read
    with hooks on the requested layers only; the others keep their fused kernels and nothing
    of theirs is kept. ``layers``: an index, a list (negative counts from the end) or ``None``
    (all). The model runs once, in eval mode, without gradients; its mode is restored.
    """
    with torch.no_grad(), eval_mode(model), AttentionRecorder(model, layers) as recorder:
        forward(model, images)
    return recorder.recorded()
