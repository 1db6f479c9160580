"""Measuring explanations: is a saliency map faithful, does it find the object, is it about the model?

Faithfulness — does the model actually use what the map highlights?
    * :func:`deletion`: remove patches in order of decreasing saliency (replace them by a
      blurred / mean / zero version of the image) and track the probability of the target
      class. A faithful map makes it fall fast: **lower AUC is better**.
    * :func:`insertion`: start from the fully removed image and put patches back in the same
      order: the probability should rise fast: **higher AUC is better**.
    * :func:`random_saliency`: the baseline any method must beat on both curves.
    Both curves are model-dependent and class-dependent but need no annotation.

Localisation — does the map point at the object (needs object masks)?
    * :func:`pointing_game`: is the single most salient location inside the object? (hit rate)
    * :func:`mass_in_mask`: the fraction of the map's total mass that falls inside the object.
    A map can localise well and still be unfaithful (the model may use the background).

Sanity — is the map about the trained model at all? (Adebayo et al., 2018)
    * :func:`model_randomization_test`: re-draw the weights of the layers, from the top
      (cascading) or one group at a time (independent), and compare the maps before and after
      with :func:`spearman_correlation`. A map that stays the same (rank correlation near 1)
      does not depend on what the model learned; a good method decorrelates.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from .capture import eval_mode, forward, token_layout, unwrap
from .methods import CLASS_SPECIFIC, METHODS, Target, explain, resolve_target

Baseline = Literal["blur", "mean", "zero"] | torch.Tensor


# ------------------------------------------------------------------------------- faithfulness
class Curve(NamedTuple):
    """A deletion or insertion curve.

    Attributes:
        fractions: (S + 1,) fraction of patches removed (deletion) or inserted (insertion).
        scores: (B, S + 1) probability of the target class at each step.
        auc: (B,) area under the curve over fractions in [0, 1] (trapezoidal rule).
    """

    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor


def baseline_image(
    images: torch.Tensor, baseline: Baseline = "blur", blur_sigma: float | None = None
) -> torch.Tensor:
    """What a removed patch is replaced by: ``'blur'`` (Gaussian, σ = min(H, W) / 8 by default),
    ``'mean'`` (each image's mean colour), ``'zero'`` (the dataset mean for normalised inputs) or
    a tensor broadcastable to ``images``."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(images).expand_as(images)
    h, w = images.shape[-2:]
    if baseline == "blur":
        sigma = blur_sigma if blur_sigma is not None else min(h, w) / 8
        size = min(2 * math.ceil(3 * sigma) + 1, 2 * min(h, w) - 1)
        size -= 1 - size % 2  # odd
        return gaussian_blur(images, [size, size], [sigma, sigma])
    if baseline == "mean":
        return images.mean(dim=(-2, -1), keepdim=True).expand_as(images)
    if baseline == "zero":
        return torch.zeros_like(images)
    raise ValueError(f"baseline must be 'blur', 'mean', 'zero' or a tensor, got {baseline!r}.")


def _to_grid(saliency: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) saliency at any resolution -> (B, grid_h, grid_w) (patch means)."""
    if tuple(saliency.shape[-2:]) == tuple(grid):
        return saliency
    return F.adaptive_avg_pool2d(saliency[:, None].float(), grid)[:, 0]


def _probabilities(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int
) -> torch.Tensor:
    out = []
    for start in range(0, images.shape[0], batch_size):
        logits = forward(model, images[start : start + batch_size])
        out.append(logits.softmax(-1).gather(1, target[start : start + batch_size, None])[:, 0])
    return torch.cat(out)


@torch.no_grad()
def _curve(
    kind: Literal["deletion", "insertion"],
    model: nn.Module,
    images: torch.Tensor,
    saliency: torch.Tensor,
    target: Target,
    steps: int | None,
    baseline: Baseline,
    blur_sigma: float | None,
    batch_size: int | None,
) -> Curve:
    layout = token_layout(model, images)
    grid, patches = layout.grid, layout.num_patches
    batch = images.shape[0]
    steps = min(patches, 32) if steps is None else steps
    batch_size = batch_size or batch
    saliency = _to_grid(saliency.to(images.device), grid).flatten(1)
    order = torch.argsort(-saliency, dim=1, stable=True)  # most salient first
    rank = torch.argsort(order, dim=1)  # position of each patch in that order
    counts = [round(s * patches / steps) for s in range(steps + 1)]
    removed_image = baseline_image(images, baseline, blur_sigma)
    with eval_mode(model):
        t = resolve_target(target, forward(model, images))
        scores = []
        for count in counts:
            chosen = (rank < count).float().view(batch, 1, *grid)
            chosen = F.interpolate(chosen, size=images.shape[-2:], mode="nearest").bool()
            if kind == "deletion":
                x = torch.where(chosen, removed_image, images)
            else:
                x = torch.where(chosen, images, removed_image)
            scores.append(_probabilities(model, x, t, batch_size))
    scores = torch.stack(scores, dim=1)
    fractions = torch.tensor(counts, dtype=scores.dtype, device=scores.device) / patches
    return Curve(fractions, scores, torch.trapezoid(scores, fractions, dim=1))


def deletion(
    model: nn.Module,
    images: torch.Tensor,
    saliency: torch.Tensor,
    target: Target = None,
    *,
    steps: int | None = None,
    baseline: Baseline = "blur",
    blur_sigma: float | None = None,
    batch_size: int | None = None,
) -> Curve:
    """Deletion curve: replace patches by the baseline, most salient first (lower AUC = better).

    Args:
        saliency: (B, grid_h, grid_w) maps (other resolutions are averaged onto the grid).
        target: class whose probability is tracked (int or (B,)); default the prediction.
        steps: points on the curve after the start (default: one per patch, at most 32);
            step s removes round(s · patches / steps) patches.
        baseline: see :func:`baseline_image`.
        batch_size: images per forward pass (default: the whole batch).
    """
    return _curve("deletion", model, images, saliency, target, steps, baseline, blur_sigma, batch_size)


def insertion(
    model: nn.Module,
    images: torch.Tensor,
    saliency: torch.Tensor,
    target: Target = None,
    *,
    steps: int | None = None,
    baseline: Baseline = "blur",
    blur_sigma: float | None = None,
    batch_size: int | None = None,
) -> Curve:
    """Insertion curve: start from the baseline, restore patches most salient first (higher AUC =
    better). Arguments as :func:`deletion`."""
    return _curve("insertion", model, images, saliency, target, steps, baseline, blur_sigma, batch_size)


def random_saliency(model: nn.Module, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A uniformly random (B, grid_h, grid_w) map: the chance level of every metric."""
    grid = token_layout(model, images).grid
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand((images.shape[0], *grid), generator=generator).to(images.device)
    return values / values.sum(dim=(1, 2), keepdim=True)


# ------------------------------------------------------------------------------- localisation
def _coverage(masks: torch.Tensor, grid: tuple[int, int], tolerance: int = 0) -> torch.Tensor:
    """Fraction of each saliency cell that lies inside the (optionally dilated) object mask."""
    masks = masks.float()[:, None]
    if tolerance > 0:
        masks = F.max_pool2d(masks, 2 * tolerance + 1, stride=1, padding=tolerance)
    return F.adaptive_avg_pool2d(masks, grid)[:, 0]


def pointing_game(saliency: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """Hit (1.0) or miss (0.0) per image: does the most salient cell overlap the object?

    Args:
        saliency: (B, h, w) maps at patch or pixel resolution.
        masks: (B, H, W) binary object masks at image resolution.
        tolerance: dilate the masks by this many pixels first (Zhang et al. use 15 at 224 px).
    """
    coverage = _coverage(masks, tuple(saliency.shape[-2:]), tolerance).flatten(1)
    top = saliency.flatten(1).argmax(dim=1, keepdim=True)
    return (coverage.gather(1, top)[:, 0] > 0).float()


def mass_in_mask(saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) fraction of the saliency mass (negative values clamped to 0) inside the object mask.

    A uniform map scores the object's area fraction; a perfect one scores 1.
    """
    coverage = _coverage(masks, tuple(saliency.shape[-2:]))
    s = saliency.clamp(min=0)
    total = s.sum(dim=(1, 2))
    inside = (s * coverage).sum(dim=(1, 2))
    return inside / torch.where(total > 0, total, torch.ones_like(total))


# ------------------------------------------------------------------------------------- sanity
def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-D tensor, ties sharing their average rank."""
    sorted_values, order = torch.sort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() + 1) / 2
    ranks = torch.empty_like(average[inverse])
    ranks[order] = average[inverse]
    return ranks


def spearman_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation between maps ``a`` and ``b`` (B, ...) per image: (B,).

    Ties get average ranks; a constant map has no ranking and gives NaN.
    """
    a, b = a.flatten(1), b.flatten(1)
    out = []
    for x, y in zip(a, b, strict=True):
        rx, ry = _average_ranks(x.detach().cpu()), _average_ranks(y.detach().cpu())
        rx, ry = rx - rx.mean(), ry - ry.mean()
        out.append((rx * ry).sum() / (rx.norm() * ry.norm()))
    return torch.stack(out).float()


def _layer_groups(model: nn.Module) -> list[tuple[str, list[nn.Module | nn.Parameter]]]:
    """Parameter groups from the output down: head, blocks.L-1 … blocks.0, embedding."""
    inner = unwrap(model)
    blocks = getattr(inner, "blocks", None)
    if blocks is None:
        raise TypeError("The randomisation test needs a vitkit or timm model (with `blocks`).")
    head = [getattr(inner, n) for n in ("head", "head_dist", "fc_norm", "norm") if hasattr(inner, n)]
    groups: list[tuple[str, list]] = [("head", [m for m in head if isinstance(m, nn.Module)])]
    groups += [(f"blocks.{i}", [blocks[i]]) for i in reversed(range(len(blocks)))]
    embedding = [
        getattr(inner, n, None) for n in ("patch_embed", "pos_embed", "cls_token", "reg_token", "dist_token")
    ]
    groups.append(("embedding", [e for e in embedding if e is not None]))
    return groups


def _parameters(items: list[nn.Module | nn.Parameter]) -> Iterator[nn.Parameter]:
    for item in items:
        yield from ([item] if isinstance(item, nn.Parameter) else item.parameters())


@torch.no_grad()
def _randomise(items: list[nn.Module | nn.Parameter], generator: torch.Generator) -> None:
    """Re-draw every trainable tensor as Gaussian noise with that tensor's own mean and std:
    what was learned is gone, the scale of the activations is kept."""
    for p in _parameters(items):
        if not p.requires_grad or p.numel() < 2:
            continue
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p)
        p.copy_(noise * p.float().std().to(p) + p.float().mean().to(p))


def model_randomization_test(
    model: nn.Module,
    images: torch.Tensor,
    method: str | Callable[..., torch.Tensor] = "rollout",
    *,
    mode: Literal["cascading", "independent"] = "cascading",
    target: Target = None,
    seed: int = 0,
    **options: object,
) -> dict[str, torch.Tensor]:
    """The model-randomisation sanity check (Adebayo et al., "Sanity checks for saliency maps").

    Maps of the trained model are compared with maps of copies whose weights were re-drawn:
    ``'cascading'`` randomises from the top down, cumulatively (head, then the last block, …,
    down to the embedding); ``'independent'`` randomises one group at a time. Class-specific
    methods explain the trained model's predicted class (or ``target``) throughout.

    Args:
        method: a name from :data:`~vitkit.explain.methods.METHODS` or a callable
            ``(model, images, **options) -> (B, h, w)``.

    Returns:
        ``{group name: (B,) Spearman correlation with the trained model's maps}``, in the order
        the groups were randomised. The model itself is not modified.
    """
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}.")
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
        if method in CLASS_SPECIFIC:
            with torch.no_grad(), eval_mode(model):
                target = resolve_target(target, forward(model, images))
            options = {**options, "target": target}
        fn = METHODS[method]
    else:
        fn = method

    original = fn(model, images, **options)
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, torch.Tensor] = {}
    cascade = copy.deepcopy(model)
    for index, (name, _) in enumerate(_layer_groups(model)):
        copy_ = cascade if mode == "cascading" else copy.deepcopy(model)
        _randomise(_layer_groups(copy_)[index][1], generator)
        results[name] = spearman_correlation(original, fn(copy_, images, **options))
    return results


# ---------------------------------------------------------------------------------- summary
def evaluate_saliency(
    model: nn.Module,
    images: torch.Tensor,
    saliency: torch.Tensor,
    masks: torch.Tensor | None = None,
    target: Target = None,
    *,
    steps: int | None = None,
    baseline: Baseline = "blur",
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Every metric for one set of maps: ``{name: (B,) values}``.

    Keys: ``deletion_auc``, ``insertion_auc`` and, with ``masks``, ``pointing_game`` and
    ``mass_in_object``.
    """
    kwargs = {"steps": steps, "baseline": baseline, "batch_size": batch_size}
    out = {
        "deletion_auc": deletion(model, images, saliency, target, **kwargs).auc,
        "insertion_auc": insertion(model, images, saliency, target, **kwargs).auc,
    }
    if masks is not None:
        out["pointing_game"] = pointing_game(saliency, masks)
        out["mass_in_object"] = mass_in_mask(saliency, masks)
    return out


def evaluate_methods(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    methods: Sequence[str],
    *,
    random_baseline: bool = True,
    steps: int | None = None,
    baseline: Baseline = "blur",
    options: Mapping[str, Mapping[str, object]] | None = None,
) -> dict[str, dict[str, float]]:
    """Mean of every metric over all images, per method (and for ``'random'`` saliency).

    Args:
        batches: ``(images, masks or None)`` pairs (e.g. a folder read batch by batch).
        methods: names from :data:`~vitkit.explain.methods.METHODS`.
        options: per-method keyword arguments, e.g. ``{"smoothgrad": {"n_samples": 10}}``.

    Returns:
        ``{method: {metric: mean}}`` with the keys of :func:`evaluate_saliency`.
    """
    options = options or {}
    names = [*methods, "random"] if random_baseline else list(methods)
    values: dict[str, dict[str, list[torch.Tensor]]] = {n: {} for n in names}
    for index, (images, masks) in enumerate(batches):
        for name in names:
            if name == "random":
                saliency = random_saliency(model, images, seed=index)
            else:
                saliency = explain(model, images, name, **dict(options.get(name, {})))
            result = evaluate_saliency(model, images, saliency, masks, steps=steps, baseline=baseline)
            for key, value in result.items():
                values[name].setdefault(key, []).append(value.detach().float().cpu())
    return {n: {k: float(torch.cat(v).mean()) for k, v in metrics.items()} for n, metrics in values.items()}
