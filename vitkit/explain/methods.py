"""Saliency methods for Vision Transformers: ``(model, images, ...) -> (B, grid_h, grid_w)``.

Every map is a distribution over the patch grid of the actual input (non-negative, summing to
one per image; an all-zero map stays zero), every method is batched (image b of a batch gets
exactly the map it would get alone), and every method reads the token layout (class token,
distillation token, registers, no class token, non-square or dynamic grids) from the model.

Explicit attention (the weights A)
    * :func:`raw_attention` — one layer's attention from the token(s) the classifier reads to
      the patches. Easy to read, but it ignores how information was mixed by earlier layers.
    * :func:`rollout` (Abnar & Zuidema, 2020) — follows information through all layers. Each
      block computes ``x + Attention(x)``: the residual path carries every token to itself, so a
      layer's effective token mixing is ``Â = (A + I)`` with rows renormalised (here: fused
      heads, optional discard, then ``(A + I) / rowsum``). When the fused A is row-stochastic
      (mean fusion, no discard) this is exactly the paper's ``0.5·A + 0.5·I``; after max/min
      fusion or discarding, rows no longer sum to one and renormalising keeps every layer a
      mixing matrix, so the product neither explodes nor vanishes with depth (and a row that
      lost attention keeps proportionally more of itself). The joint attention is
      ``Â_L ··· Â_start``; its readout row(s) over the patches is the map. Class-agnostic.

Implicit attention (gradients of a class score)
    * :func:`gradient_rollout` — rollout where each layer's matrix is ``fuse_heads(A ⊙ ∂y_c/∂A)``
      clamped at zero: attention weighted by how much the class score depends on it.
    * :func:`relevance` (Chefer, Gur & Wolf, ICCV 2021, "Generic attention-model explainability")
      — ``Ā = E_heads[(∇A ⊙ A)⁺]``, ``R ← R + Ā·R`` from ``R = I``; the readout row(s) of R − I.
    * :func:`input_gradient` — ∂y_c/∂pixels: vanilla (|∇| max over channels), gradient × input,
      SmoothGrad (mean of vanilla maps over noisy copies); summed into patches or per pixel.

Attention pooling (``global_pool='map'``, SigLIP): the classifier reads one learned query's
attention ``a`` over the tokens instead of a class token or a plain mean. With ``query='auto'``
every method reads the rows a class token or a mean would read, weighted by ``a``: the map is
``a · M`` over the patches (M: the layer's attention, the rollout product or R), where a plain
average pool is the special case of uniform ``a``. ``a`` is fused over heads as the method fuses
the layers' heads; the gradient methods weight it like a layer (``(a ⊙ ∂y/∂a)⁺``), and
:func:`relevance` reads ``a·R`` (the pool's own relevance included, since the query is not a token).

Gradients are taken with ``torch.autograd.grad`` with respect to the captured attention tensors
of each layer, so each gradient belongs to its own layer by construction, and no ``.grad`` of
the model's parameters is touched. Class scores are logits; the default target is the
predicted class; a target may be an int (all images) or a (B,) tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .capture import (
    AttentionRecorder,
    Query,
    TokenLayout,
    eval_mode,
    forward,
    token_layout,
)

HeadFusion = Literal["mean", "max", "min"]
Target = int | Sequence[int] | torch.Tensor | None


# ------------------------------------------------------------------------------- building blocks
def fuse_heads(attn: torch.Tensor, fusion: HeadFusion = "mean") -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N) by the mean, max or min over heads."""
    if fusion == "mean":
        return attn.mean(dim=1)
    if fusion == "max":
        return attn.amax(dim=1)
    if fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {fusion!r}.")


def discard_lowest(attn: torch.Tensor, ratio: float, keep: Sequence[int] = ()) -> torch.Tensor:
    """Zero the ``ratio`` fraction of lowest entries of each (N, N) matrix of ``attn`` (B, N, N).

    Entries in the rows and columns of the tokens in ``keep`` (the class token) are never
    discarded: what the class token reads, and what reads it, is the signal being traced.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}.")
    if ratio == 0.0:
        return attn
    n = attn.shape[-1]
    protected = torch.zeros(n, n, dtype=torch.bool, device=attn.device)
    keep = list(keep)
    protected[keep, :] = True
    protected[:, keep] = True
    k = int(ratio * int((~protected).sum()))
    if k == 0:
        return attn
    flat = attn.flatten(1)
    candidates = flat.masked_fill(protected.flatten(), float("inf"))
    lowest = candidates.topk(k, dim=1, largest=False).indices
    return flat.scatter(1, lowest, 0.0).view_as(attn)


def add_identity(attn: torch.Tensor) -> torch.Tensor:
    """The residual path: ``(A + I)`` with every row renormalised to sum to one."""
    eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    mixed = attn + eye
    return mixed / mixed.sum(dim=-1, keepdim=True)


def _normalise(values: torch.Tensor) -> torch.Tensor:
    """Divide each map by its sum over the last dimension (all-zero maps stay zero)."""
    total = values.sum(dim=-1, keepdim=True)
    return values / torch.where(total > 0, total, torch.ones_like(total))


def readout(
    matrix: torch.Tensor, layout: TokenLayout, query: Query = "auto", weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, [heads,] N, N) -> (B, [heads,] grid_h, grid_w): the query rows' mean over the patches.

    With ``weights`` (B, N) the rows are weighted by them instead (an attention pool's weights,
    :func:`pool_weights`) and ``query`` is not used. The prefix columns (class, distillation,
    register tokens) are dropped and the result is renormalised to sum to one over the patches.
    """
    if matrix.shape[-1] != layout.num_tokens:
        raise ValueError(
            f"Attention over {matrix.shape[-1]} tokens does not match the layout: {layout.num_prefix_tokens} "
            f"prefix tokens + a {layout.grid} grid."
        )
    if weights is not None:
        values = torch.einsum("bi,b...ij->b...j", weights.to(matrix), matrix)[..., layout.patch_indices]
    else:
        values = matrix[..., layout.query_indices(query), layout.patch_indices].mean(dim=-2)
    return _normalise(values).unflatten(-1, layout.grid)


def pool_weights(
    pool_attention: torch.Tensor, layout: TokenLayout, fusion: HeadFusion = "mean"
) -> torch.Tensor:
    """An attention pool's weights (B, heads, queries, pooled tokens) -> (B, N) over all tokens.

    Heads fused by ``fusion``, several latent queries averaged; a pool over the patches only
    gives the prefix tokens weight zero.
    """
    row = fuse_heads(pool_attention, fusion).mean(dim=1)
    return F.pad(row, (layout.num_tokens - row.shape[-1], 0))


def _reads_pool(layout: TokenLayout, query: Query) -> bool:
    return layout.attention_pool and query == "auto"


def _recorded_pool_weights(
    recorder: AttentionRecorder, layout: TokenLayout, fusion: HeadFusion = "mean"
) -> torch.Tensor | None:
    """:func:`pool_weights` of the attention pool the recorder read, or None if it read none."""
    if recorder.pool_attention is None:
        return None
    return pool_weights(recorder.pool_attention.detach(), layout, fusion)


def _pop_gradient_pool_weights(
    attns: list[torch.Tensor],
    grads: list[torch.Tensor],
    layout: TokenLayout,
    fusion: HeadFusion = "mean",
    clamp_per_head: bool = True,
) -> torch.Tensor:
    """The pool's attention and gradient, which :func:`_attention_with_gradients` puts last: taken
    off both lists, as weights that treat the pool like the layers of the method reading it.

    ``clamp_per_head``: ``E_heads[(a ⊙ ∂y/∂a)⁺]``, as :func:`relevance` treats a layer; else
    ``fuse_heads(a ⊙ ∂y/∂a)⁺``, as :func:`gradient_rollout` does (heads fused, then clamped).
    """
    weighted = attns.pop() * grads.pop()
    if clamp_per_head:
        return pool_weights(weighted.clamp(min=0), layout, fusion)
    fused = fuse_heads(weighted, fusion).clamp(min=0)
    return pool_weights(fused.unsqueeze(1), layout, "mean")  # heads already fused: one left


def resolve_target(target: Target, logits: torch.Tensor) -> torch.Tensor:
    """A (B,) long tensor of class indices: the prediction when ``target`` is None."""
    batch = logits.shape[0]
    if target is None:
        return logits.argmax(dim=-1)
    t = torch.as_tensor(target, device=logits.device).long()
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"target must be an int or a ({batch},) tensor, got shape {tuple(t.shape)}.")
    return t


def _start_layers(start_layer: int, depth: int) -> list[int]:
    if not -depth <= start_layer < depth:
        raise ValueError(f"start_layer {start_layer} is out of range for a model with {depth} layers.")
    return list(range(start_layer % depth, depth))


def _depth(model: nn.Module) -> int:
    return AttentionRecorder(model).depth


def _attention_with_gradients(
    model: nn.Module, images: torch.Tensor, layers: list[int], target: Target, pool: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Attention of ``layers`` and ∂(target logit)/∂A for each, in the order of ``layers``; with
    ``pool``, the attention pool's A and gradient come last."""
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        eval_mode(model),
        AttentionRecorder(model, layers, pool=pool) as recorder,
    ):
        x = images.detach().clone().requires_grad_(True)
        logits = forward(model, x)
        t = resolve_target(target, logits)
        score = logits.gather(1, t[:, None]).sum()  # images are independent: per-image gradients
        attns = [recorder.attentions[i] for i in layers]
        if pool:
            attns.append(recorder.pool_attention)
        grads = torch.autograd.grad(score, attns, allow_unused=True)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(attns, grads, strict=True)]
    return [a.detach() for a in attns], [g.detach() for g in grads]


# ----------------------------------------------------------------------------------------- methods
def raw_attention(
    model: nn.Module,
    images: torch.Tensor,
    layer: int = -1,
    *,
    head_fusion: HeadFusion | None = "mean",
    query: Query = "auto",
) -> torch.Tensor:
    """One layer's attention from the readout token(s) to the patches.

    Args:
        layer: the attention layer (negative counts from the end).
        head_fusion: ``'mean'``, ``'max'`` or ``'min'`` over heads, or ``None`` for one map per
            head: (B, heads, grid_h, grid_w).
        query: ``'auto'`` (what the classifier reads: the class token, the mean over patch
            queries for a pooled model, or the patch queries weighted by an attention pool's
            weights, fused over its heads by the mean), ``'cls'`` or ``'patches'``.

    Returns:
        (B, grid_h, grid_w), or (B, heads, grid_h, grid_w) with ``head_fusion=None``.
    """
    layout = token_layout(model, images)
    recorder = AttentionRecorder(model, [layer], pool=_reads_pool(layout, query))
    with torch.no_grad(), eval_mode(model), recorder:
        forward(model, images)
    attn = next(iter(recorder.recorded().values()))
    weights = _recorded_pool_weights(recorder, layout)
    if head_fusion is None:
        return readout(attn, layout, query, weights)
    return readout(fuse_heads(attn, head_fusion), layout, query, weights)


def rollout(
    model: nn.Module,
    images: torch.Tensor,
    *,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    query: Query = "auto",
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): joint attention through the residual stream.

    Per layer from ``start_layer`` on: fuse heads, zero the lowest ``discard_ratio`` entries
    (never those of the class token's row and column), ``Â = (A + I)`` row-normalised; the
    product ``Â_L ··· Â_start`` read at the query row(s) over the patches (with an attention
    pool: weighted by the pool's attention, its heads fused the same way). Only the fused
    (B, N, N) matrix of each layer is kept during the forward pass.
    """
    layout = token_layout(model, images)
    depth = _depth(model)
    layers = _start_layers(start_layer, depth)
    keep = [layout.cls_index] if layout.cls_index is not None else []
    fuse = partial(fuse_heads, fusion=head_fusion)
    with (
        torch.no_grad(),
        eval_mode(model),
        AttentionRecorder(model, layers, transform=fuse, pool=_reads_pool(layout, query)) as recorder,
    ):
        forward(model, images)
    joint = None
    for i in layers:
        mixing = add_identity(discard_lowest(recorder.attentions[i].detach(), discard_ratio, keep))
        joint = mixing if joint is None else mixing @ joint
    return readout(joint, layout, query, _recorded_pool_weights(recorder, layout, head_fusion))


def gradient_rollout(
    model: nn.Module,
    images: torch.Tensor,
    target: Target = None,
    *,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    query: Query = "auto",
) -> torch.Tensor:
    """Class-specific rollout: each layer's matrix is ``fuse_heads(A ⊙ ∂y_t/∂A)`` clamped at zero.

    ``target``: class index (int or (B,) tensor); default the predicted class. The gradient of
    layer l multiplies the attention of layer l (matched by layer index, not by hook order).
    Then discard, identity and row normalisation, and the product, as in :func:`rollout`.

    The gradient-weighted matrices are in gradient units, so how much they weigh against the
    identity depends on the gradients' scale. A class-token row is unaffected (it has no
    identity entries over the patches), but for a pooled model (mean over patch rows) small
    gradients leave a near-uniform map dominated by each patch's path to itself; prefer
    :func:`relevance` there, which reads ``R - I``.
    """
    layout = token_layout(model, images)
    layers = _start_layers(start_layer, _depth(model))
    keep = [layout.cls_index] if layout.cls_index is not None else []
    use_pool = _reads_pool(layout, query)
    attns, grads = _attention_with_gradients(model, images, layers, target, pool=use_pool)
    # the pool's attention, weighted by its gradient like a layer's: heads fused, then clamped
    weights = (
        _pop_gradient_pool_weights(attns, grads, layout, head_fusion, clamp_per_head=False)
        if use_pool
        else None
    )
    joint = None
    for a, g in zip(attns, grads, strict=True):
        weighted = fuse_heads(a * g, head_fusion).clamp(min=0)
        mixing = add_identity(discard_lowest(weighted, discard_ratio, keep))
        joint = mixing if joint is None else mixing @ joint
    return readout(joint, layout, query, weights)


def relevance(
    model: nn.Module,
    images: torch.Tensor,
    target: Target = None,
    *,
    start_layer: int = 0,
    query: Query = "auto",
) -> torch.Tensor:
    """Chefer et al. (ICCV 2021): ``Ā = E_heads[(∇A ⊙ A)⁺]``, ``R ← R + Ā·R`` from ``R = I``.

    The map is the query row(s) of ``R - I`` over the patches (the class token's row for a
    class-token model, where ``R - I`` and ``R`` agree; the mean over the patch rows for a pooled
    model, where subtracting I removes a content-independent uniform floor), renormalised.
    With an attention pool, the pool's query is one more row: ``ā·R`` with
    ``ā = E_heads[(∇a ⊙ a)⁺]``; the query is not a token, so it has no identity to subtract.
    ``target`` as in :func:`gradient_rollout`.
    """
    layout = token_layout(model, images)
    layers = _start_layers(start_layer, _depth(model))
    use_pool = _reads_pool(layout, query)
    attns, grads = _attention_with_gradients(model, images, layers, target, pool=use_pool)
    batch, n = attns[0].shape[0], attns[0].shape[-1]
    eye = torch.eye(n, dtype=attns[0].dtype, device=attns[0].device)
    rel = eye.expand(batch, n, n)
    pool_row = _pop_gradient_pool_weights(attns, grads, layout) if use_pool else None
    for a, g in zip(attns, grads, strict=True):
        a_bar = (g * a).clamp(min=0).mean(dim=1)
        rel = rel + a_bar @ rel
    if pool_row is not None:
        return readout(rel, layout, query, pool_row)
    # R - I: the relevance gained through attention. For a class-token row this is R itself (the
    # identity has no patch entries there); for the mean over patch rows it removes the uniform
    # 1/patches floor of each token's residual path to itself, which carries no information.
    return readout(rel - eye, layout, query)


def input_gradient(
    model: nn.Module,
    images: torch.Tensor,
    target: Target = None,
    *,
    method: Literal["vanilla", "grad_x_input", "smoothgrad"] = "vanilla",
    n_samples: int = 25,
    noise_level: float = 0.15,
    seed: int = 0,
    pixel: bool = False,
) -> torch.Tensor:
    """Sensitivity of the target logit to the pixels: the model's implicit attention.

    Args:
        method: ``'vanilla'`` (|∂y/∂x| max over channels, Simonyan et al. 2014),
            ``'grad_x_input'`` (|Σ_channels x ⊙ ∂y/∂x|) or ``'smoothgrad'`` (Smilkov et al. 2017:
            the mean vanilla map over ``n_samples`` copies with Gaussian noise of standard
            deviation ``noise_level · (max - min)`` of each image).
        seed: seed of the SmoothGrad noise; the same noise pattern is used for every image of
            the batch, so batched results equal per-image results.
        pixel: return the (B, H, W) pixel map instead of the (B, grid_h, grid_w) patch sums.

    Returns:
        The map, normalised to sum to one per image.
    """
    if method not in ("vanilla", "grad_x_input", "smoothgrad"):
        raise ValueError(f"method must be 'vanilla', 'grad_x_input' or 'smoothgrad', got {method!r}.")
    layout = token_layout(model, images)
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
        images = images.detach().clone()

        def grad_at(x: torch.Tensor, t: Target) -> tuple[torch.Tensor, torch.Tensor]:
            x = x.detach().requires_grad_(True)
            logits = forward(model, x)
            t = resolve_target(t, logits)
            (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), x)
            return grad, t

        grad, t = grad_at(images, target)
        if method == "vanilla":
            pixels = grad.abs().amax(dim=1)
        elif method == "grad_x_input":
            pixels = (grad * images).sum(dim=1).abs()
        else:
            generator = torch.Generator().manual_seed(seed)
            spread = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).view(-1, 1, 1, 1)
            pixels = torch.zeros_like(images[:, 0])
            for _ in range(n_samples):
                noise = torch.randn((1, *images.shape[1:]), generator=generator).to(images)
                g, _ = grad_at(images + noise_level * spread * noise, t)
                pixels += g.abs().amax(dim=1) / n_samples
    pixels = pixels.detach()
    if pixel:
        return _normalise(pixels.flatten(1)).view_as(pixels)
    patches = F.adaptive_avg_pool2d(pixels[:, None], layout.grid)[:, 0]
    return _normalise(patches.flatten(1)).view_as(patches)


# ---------------------------------------------------------------------------------------- registry
METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "raw_attention": raw_attention,
    "rollout": rollout,
    "gradient_rollout": gradient_rollout,
    "relevance": relevance,
    "gradient": partial(input_gradient, method="vanilla"),
    "grad_x_input": partial(input_gradient, method="grad_x_input"),
    "smoothgrad": partial(input_gradient, method="smoothgrad"),
}
"""Every method by name (the names the CLI and the callback accept)."""

CLASS_SPECIFIC = frozenset({"gradient_rollout", "relevance", "gradient", "grad_x_input", "smoothgrad"})
"""Methods that explain one class (they take a ``target``); the others are class-agnostic."""


def explain(
    model: nn.Module, images: torch.Tensor, method: str, target: Target = None, **options: object
) -> torch.Tensor:
    """Run the method called ``method`` (a key of :data:`METHODS`): (B, grid_h, grid_w)."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
    if method in CLASS_SPECIFIC:
        return METHODS[method](model, images, target, **options)
    return METHODS[method](model, images, **options)
