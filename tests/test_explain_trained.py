"""On a model that has learned something, the maps must find what it uses (slow: trains a tiny ViT)."""

from __future__ import annotations

import pytest
import torch

from vitkit.explain.metrics import evaluate_methods
from vitkit.models import VisionTransformer

pytestmark = pytest.mark.slow


def _squares(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise with one 8x8 square whose colour (red/green/blue) is the class; the mask is the square."""
    x = torch.rand(n, 3, 32, 32, generator=generator) * 0.6
    y = torch.randint(0, 3, (n,), generator=generator)
    masks = torch.zeros(n, 32, 32, dtype=torch.bool)
    for i in range(n):
        r, c = torch.randint(0, 25, (2,), generator=generator).tolist()
        x[i, :, r : r + 8, c : c + 8] = 0.1
        x[i, y[i], r : r + 8, c : c + 8] = 1.0
        masks[i, r : r + 8, c : c + 8] = True
    return (x - 0.5) / 0.25, y, masks


@pytest.mark.parametrize(
    ("options", "methods"),
    [
        ({}, ["rollout", "relevance", "gradient"]),
        ({"reg_tokens": 4}, ["raw_attention", "rollout", "relevance", "gradient"]),
        ({"class_token": False, "global_pool": "avg"}, ["relevance"]),
    ],
)
def test_maps_of_a_trained_model_beat_random_on_every_metric(options, methods):
    generator = torch.Generator().manual_seed(0)
    train_x, train_y, _ = _squares(1500, generator)
    val_x, val_y, val_masks = _squares(32, generator)
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3, **options
    )
    optimiser = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=0.05)
    for _ in range(2):
        for idx in torch.randperm(1500).split(50):
            loss = torch.nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        assert (model(val_x).argmax(-1) == val_y).float().mean() > 0.9

    table = evaluate_methods(model, [(val_x, val_masks)], methods, steps=16, baseline="mean")
    chance = table["random"]
    for name in methods:
        scores = table[name]
        assert scores["deletion_auc"] < chance["deletion_auc"] - 0.1, name
        assert scores["insertion_auc"] > chance["insertion_auc"], name
        assert scores["pointing_game"] > chance["pointing_game"] + 0.2, name
        assert scores["mass_in_object"] > 2 * chance["mass_in_object"], name
