"""Overlays and figures: sizes, value ranges, and that they show what they should."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from vitkit.explain import TokenLayout, attention_maps, rollout, token_layout
from vitkit.explain.plot import (
    figure_to_array,
    overlay,
    plot_attention_graph,
    plot_attention_matrix,
    plot_explanations,
    plot_heads,
    to_rgb,
)
from vitkit.models import VisionTransformer

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_overlay_size_range_and_where_the_heat_is():
    image = torch.rand(3, 40, 24)
    saliency = torch.zeros(5, 3)
    saliency[4, 2] = 1.0  # bottom-right patch
    out = overlay(image, saliency, cmap="gray", alpha=1.0, interpolation="nearest")
    assert out.shape == (40, 24, 3) and out.dtype == np.uint8
    assert out[36, 20].tolist() == [255, 255, 255] and out[2, 2].tolist() == [0, 0, 0]
    blended = overlay(image, saliency, alpha=0.5)
    assert blended.min() >= 0 and blended.max() <= 255
    assert not np.array_equal(blended, out)
    pil = overlay(image, saliency, as_pil=True)
    assert isinstance(pil, Image.Image) and pil.size == (24, 40)
    # alpha = 0 gives the image itself
    np.testing.assert_array_equal(
        overlay(image, saliency, alpha=0.0), np.round(to_rgb(image) * 255).astype(np.uint8)
    )


def test_overlay_undoes_normalisation_and_accepts_arrays_and_pil():
    rgb = torch.rand(3, 16, 16)
    normalised = (rgb - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    np.testing.assert_allclose(to_rgb(normalised, MEAN, STD), rgb.permute(1, 2, 0).numpy(), atol=1e-6)
    uint8 = (rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert overlay(uint8, np.ones((2, 2)), alpha=0).shape == (16, 16, 3)
    assert overlay(Image.fromarray(uint8), torch.ones(2, 2)).shape == (16, 16, 3)
    assert overlay(np.zeros((16, 16)), torch.ones(2, 2)).shape == (16, 16, 3)  # grayscale
    with pytest.raises(ValueError, match="one"):
        overlay(rgb, torch.ones(2, 2, 2))


def test_figures_render_headless():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=2)
    images = torch.randn(2, 3, 32, 32)
    maps = {"rollout": rollout(model, images), "random": torch.rand(2, 4, 4)}
    fig = plot_explanations(images, maps, mean=MEAN, std=STD, titles=["a", "b"])
    assert isinstance(fig, Figure)
    assert np.asarray(fig.axes).size == 2 * 3
    pixels = figure_to_array(fig)
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8

    layout = token_layout(model, images)
    attns = attention_maps(model, images[:1])
    fig = plot_heads(images[0], attns, layout)
    assert len(fig.axes) == 2 * 2  # layers x heads
    fig = plot_attention_matrix(attns[1][0], layout)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:4] == ["CLS", "REG0", "REG1", "(0,0)"] and labels[-1] == "(3,3)"
    figure_to_array(fig)


def test_attention_graph_draws_arrows_to_the_top_keys():
    layout = TokenLayout(grid=(4, 4), num_prefix_tokens=1, cls_index=0)
    attn = torch.full((17, 17), 0.01)
    query = 1 + 1 * 4 + 1  # patch (1, 1)
    attn[query, 1 + 3 * 4 + 3] = 0.5  # strongest: patch (3, 3)
    attn[query, 1 + 0] = 0.2  # patch (0, 0)
    attn[query, query] = 0.1  # itself
    fig = plot_attention_graph(torch.rand(3, 32, 32), attn, layout, query=(1, 1), top_k=3)
    ax = fig.axes[0]
    arrows = [c for c in ax.get_children() if type(c).__name__ == "Annotation"]
    assert len(arrows) == 2  # (3, 3) and (0, 0); the self-attention is a circle
    ends = sorted(tuple(np.round(a.xy).astype(int)) for a in arrows)
    assert ends == [(4, 4), (28, 28)]  # patch centres in pixels
    assert "CLS 0.01" in ax.get_title()
    with pytest.raises(ValueError, match="not a patch"):
        plot_attention_graph(torch.rand(3, 32, 32), attn, layout, query=0)
    figure_to_array(fig)
