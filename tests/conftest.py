"""Shared test settings: deterministic, single-threaded-friendly, tiny models."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
"""Options of the tiny ViT most tests use: a 4x4 grid of 32-wide tokens."""
