"""The Lightning callback writes (and logs) overlays of a fixed validation panel every N epochs."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from vitkit.explain.callback import ExplanationCallback
from vitkit.models import VisionTransformer


class TinyClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ImageLogger(Logger):
    """A logger whose experiment records add_image calls, as TensorBoard's SummaryWriter would."""

    def __init__(self, root) -> None:
        super().__init__()
        self.root = root
        self.images: list[tuple[str, np.ndarray, int, str]] = []

    @property
    def name(self) -> str:
        return "images"

    @property
    def version(self) -> int:
        return 0

    @property
    def log_dir(self) -> str:
        return str(self.root)

    @property
    def save_dir(self) -> str:
        return str(self.root)

    @property
    def experiment(self):
        return self

    def add_image(self, tag, image, step, dataformats="CHW"):
        self.images.append((tag, image, step, dataformats))

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_callback_saves_and_logs_the_panel_every_n_epochs(tmp_path):
    data = TensorDataset(torch.randn(12, 3, 32, 32), torch.randint(0, 3, (12,)))
    logger = ImageLogger(tmp_path / "run")
    callback = ExplanationCallback(num_images=3, every_n_epochs=2, methods=("rollout", "gradient"))
    trainer = L.Trainer(
        max_epochs=4,
        logger=logger,
        callbacks=[callback],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    module = TinyClassifier()
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=2))
    folder = tmp_path / "run" / "explanations"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_001.png", "epoch_003.png"]
    assert callback.images.shape == (3, 3, 32, 32)  # the first 3 validation images, across batches
    torch.testing.assert_close(callback.images, data.tensors[0][:3])
    assert [(tag, step, fmt) for tag, _, step, fmt in logger.images] == [
        ("explanations", 4, "HWC"),
        ("explanations", 8, "HWC"),
    ]
    pixels = logger.images[0][1]
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert module.model.training is True  # back to training mode after explaining


def test_callback_rejects_unknown_methods():
    with pytest.raises(ValueError, match="Unknown method"):
        ExplanationCallback(methods=("gradcam",))
