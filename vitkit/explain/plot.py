"""Drawing explanations: overlays, grids, token-to-token matrices and attention graphs.

Everything draws on ``matplotlib.figure.Figure`` objects with the Agg canvas (no pyplot, no
display, no global state), so it works headless, in threads, in notebooks (a ``Figure``
displays itself) and in training callbacks. Save with ``fig.savefig(path)`` or turn a figure
into pixels with :func:`figure_to_array`.

Images may be tensors (C, H, W) — normalised ones are un-normalised with ``mean``/``std`` —
or arrays (H, W[, C]) or PIL images; saliency maps are (grid_h, grid_w) at patch resolution
(or any resolution), upsampled to the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle
from PIL import Image

from .capture import Query, TokenLayout

Stats = Sequence[float] | None


# -------------------------------------------------------------------------------------- arrays
def to_rgb(image: Any, mean: Stats = None, std: Stats = None) -> np.ndarray:
    """An image as a float (H, W, 3) array in [0, 1].

    Accepts a tensor (C, H, W) or (1, C, H, W), an array (H, W), (H, W, C) or (C, H, W) with C in
    {1, 3, 4}, or a PIL image. ``mean``/``std`` undo a normalisation (x · std + mean) first;
    uint8 data is scaled by 1/255.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        if image.ndim == 4:
            image = image[0]
        if image.ndim == 3:
            image = image.permute(1, 2, 0)
        image = image.numpy()
    array = np.asarray(image)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    array = array.astype(np.float32) / scale
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW array
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[-1]
    if mean is not None or std is not None:
        m = np.asarray(mean if mean is not None else 0.0, dtype=np.float32).reshape(-1)[:channels]
        s = np.asarray(std if std is not None else 1.0, dtype=np.float32).reshape(-1)[:channels]
        array = array * s + m
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.clip(array[..., :3], 0.0, 1.0)


def upsample(saliency: Any, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """A (h, w) map resized to ``size`` (H, W) as a float array (``mode``: bilinear/nearest/bicubic)."""
    s = torch.as_tensor(
        np.asarray(saliency.detach().cpu() if isinstance(saliency, torch.Tensor) else saliency)
    )
    s = s.float().squeeze()
    if s.ndim != 2:
        raise ValueError(f"Expected one (h, w) saliency map, got shape {tuple(s.shape)}.")
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(s[None, None], size=size, mode=mode, **kwargs)[0, 0].numpy()


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def overlay(
    image: Any,
    saliency: Any,
    cmap: str = "jet",
    alpha: float = 0.5,
    *,
    mean: Stats = None,
    std: Stats = None,
    normalize: bool = True,
    interpolation: str = "bilinear",
    as_pil: bool = False,
) -> np.ndarray | Image.Image:
    """Blend a saliency map, upsampled to the image and coloured by ``cmap``, over the image.

    Args:
        image: see :func:`to_rgb`.
        saliency: a (h, w) map (e.g. one image of a method's (B, grid_h, grid_w) output).
        cmap: a matplotlib colormap name.
        alpha: weight of the heat map: ``(1 - alpha) · image + alpha · colour(map)``.
        mean, std: undo the input normalisation of a tensor image.
        normalize: stretch the map to [0, 1] (min-max) before colouring; otherwise it is clipped.
        interpolation: ``'bilinear'`` (smooth), ``'nearest'`` (patch blocks) or ``'bicubic'``.
        as_pil: return a PIL image instead of an array.

    Returns:
        (H, W, 3) uint8 array (or PIL image) of the image's size.
    """
    rgb = to_rgb(image, mean, std)
    heat = upsample(saliency, rgb.shape[:2], interpolation)
    heat = _min_max(heat) if normalize else np.clip(heat, 0.0, 1.0)
    coloured = matplotlib.colormaps[cmap](heat)[..., :3]
    blended = (1.0 - alpha) * rgb + alpha * coloured
    out = np.clip(np.round(blended * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(out) if as_pil else out


# -------------------------------------------------------------------------------------- figures
def new_figure(width: float, height: float) -> Figure:
    """A Figure with an Agg canvas attached (headless)."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an (H, W, 3) uint8 array."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_explanations(
    images: Any,
    maps: Mapping[str, torch.Tensor],
    *,
    mean: Stats = None,
    std: Stats = None,
    titles: Sequence[str] | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    cell: float = 2.0,
) -> Figure:
    """Grid of images (rows) × [image, then one overlay per method] (columns).

    Args:
        images: (B, C, H, W) tensor or a sequence of images.
        maps: ``{method name: (B, h, w) maps}``.
        titles: one label per image (e.g. the predicted class), shown on the first column.
    """
    images = list(images)
    names = list(maps)
    fig = new_figure(cell * (len(names) + 1), cell * len(images))
    axes = fig.subplots(len(images), len(names) + 1, squeeze=False)
    for r, image in enumerate(images):
        axes[r, 0].imshow(to_rgb(image, mean, std))
        axes[r, 0].set_title(titles[r] if titles else "image", fontsize=8)
        for c, name in enumerate(names, start=1):
            axes[r, c].imshow(overlay(image, maps[name][r], cmap, alpha, mean=mean, std=std))
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_heads(
    image: Any,
    attentions: Mapping[int, torch.Tensor],
    layout: TokenLayout,
    *,
    query: Query = "auto",
    mean: Stats = None,
    std: Stats = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    cell: float = 1.6,
) -> Figure:
    """Grid of layers (rows) × heads (columns): each head's attention from the query token(s)
    to the patches, over the image. ``attentions``: ``{layer: (heads, N, N)}`` or ``(1, heads, N,
    N)`` as returned by :func:`~vitkit.explain.attention_maps` for one image."""
    from .methods import readout

    layers = sorted(attentions)
    heads = [attentions[i][0] if attentions[i].ndim == 4 else attentions[i] for i in layers]
    num_heads = heads[0].shape[0]
    fig = new_figure(cell * num_heads, cell * len(layers))
    axes = fig.subplots(len(layers), num_heads, squeeze=False)
    for r, (layer, attn) in enumerate(zip(layers, heads, strict=True)):
        maps = readout(attn.detach().cpu().float(), layout, query)
        for h in range(num_heads):
            axes[r, h].imshow(overlay(image, maps[h], cmap, alpha, mean=mean, std=std))
            axes[r, h].set_title(f"layer {layer} head {h}", fontsize=7)
            axes[r, h].axis("off")
    fig.tight_layout()
    return fig


def plot_attention_matrix(
    attention: torch.Tensor,
    layout: TokenLayout,
    *,
    cmap: str = "viridis",
    max_labels: int = 48,
    size: float = 7.0,
    title: str | None = None,
) -> Figure:
    """The full token-to-token attention (N, N) as an alignment heatmap with token labels.

    Rows are queries, columns keys; labels are ``CLS``, ``DIST``, ``REG0``…, ``(row,col)``
    (at most ``max_labels`` are written per axis). A (heads, N, N) input is averaged over heads.
    Lines separate the prefix tokens from the patches.
    """
    attn = attention.detach().float().cpu()
    while attn.ndim > 2:
        attn = attn.mean(0)
    labels = layout.labels()
    n = attn.shape[-1]
    if n != len(labels):
        raise ValueError(f"Attention over {n} tokens does not match the layout's {len(labels)} tokens.")
    fig = new_figure(size, size)
    ax = fig.add_subplot()
    im = ax.imshow(attn.numpy(), cmap=cmap, interpolation="nearest")
    step = max(1, int(np.ceil(n / max_labels)))
    ticks = list(range(0, n, step))
    fontsize = 7 if n <= 24 else 5
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=fontsize)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    if layout.num_prefix_tokens:
        edge = layout.num_prefix_tokens - 0.5
        ax.axhline(edge, color="white", lw=0.8)
        ax.axvline(edge, color="white", lw=0.8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_attention_graph(
    image: Any,
    attention: torch.Tensor,
    layout: TokenLayout,
    query: tuple[int, int] | int,
    *,
    top_k: int = 8,
    mean: Stats = None,
    std: Stats = None,
    color: str = "yellow",
    size: float = 5.0,
) -> Figure:
    """Self-attention as a graph: from one query patch, arrows to the ``top_k`` patches it attends
    to most, with width and opacity proportional to the attention weight.

    Args:
        attention: (N, N) for one image (a (heads, N, N) input is averaged over heads).
        query: the query patch as (row, col) on the grid, or a token index.
    The attention given to prefix tokens (class, registers), which have no place on the image,
    is listed in the title; a circle on the query patch shows its attention to itself.
    """
    attn = attention.detach().float().cpu()
    while attn.ndim > 2:
        attn = attn.mean(0)
    rgb = to_rgb(image, mean, std)
    height, width = rgb.shape[:2]
    gh, gw = layout.grid
    ph, pw = height / gh, width / gw
    token = layout.num_prefix_tokens + query[0] * gw + query[1] if isinstance(query, tuple) else int(query)
    if not layout.num_prefix_tokens <= token < layout.num_tokens:
        raise ValueError(f"query {query} is not a patch of the {layout.grid} grid.")
    row = attn[token]
    patch_weights = row[layout.patch_indices]
    k = min(top_k, layout.num_patches)
    values, indices = patch_weights.topk(k)
    strongest = float(values[0]) if float(values[0]) > 0 else 1.0

    def centre(index: int) -> tuple[float, float]:
        r, c = divmod(index, gw)
        return (c + 0.5) * pw, (r + 0.5) * ph

    fig = new_figure(size, size * height / width + 0.4)
    ax = fig.add_subplot()
    ax.imshow(rgb, extent=(0, width, height, 0))
    qi = token - layout.num_prefix_tokens
    qr, qc = divmod(qi, gw)
    ax.add_patch(Rectangle((qc * pw, qr * ph), pw, ph, fill=False, edgecolor="red", lw=2))
    qx, qy = centre(qi)
    for value, index in zip(values.tolist(), indices.tolist(), strict=True):
        weight = value / strongest
        if index == qi:
            ax.add_patch(
                Circle((qx, qy), radius=0.3 * min(pw, ph), fill=False, color=color, lw=1 + 3 * weight)
            )
            continue
        kx, ky = centre(index)
        ax.annotate(
            "",
            xy=(kx, ky),
            xytext=(qx, qy),
            arrowprops={
                "arrowstyle": "->",
                "color": color,
                "lw": 0.5 + 3.5 * weight,
                "alpha": 0.3 + 0.7 * weight,
            },
        )
        ax.text(kx, ky, f"{value:.2f}", color="white", fontsize=7, ha="center", va="center")
    prefix = [
        f"{name} {float(row[i]):.2f}" for i, name in enumerate(layout.labels()[: layout.num_prefix_tokens])
    ]
    title = f"query patch ({qr},{qc}): top {k} keys"
    if prefix:
        title += "\n" + ", ".join(prefix)
    ax.set_title(title, fontsize=8)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    fig.tight_layout()
    return fig
