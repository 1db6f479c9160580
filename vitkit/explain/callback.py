"""Watch explanations evolve during training: overlays of a fixed panel of validation images.

Add ``ExplanationCallback(every_n_epochs=5)`` to the Trainer's callbacks: at the end of every
N-th training epoch it explains the same validation images with the chosen methods and writes
``<log_dir>/explanations/epoch_XXX.png`` (images × methods), and logs the figure to TensorBoard
(or any logger whose ``experiment`` has ``add_image``). Rollout of a freshly initialised model is
nearly uniform; as the model learns, the maps should settle on the objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from .methods import METHODS, explain


class ExplanationCallback(Callback):
    """Every ``every_n_epochs`` epochs, save (and log) overlays for a fixed panel of images.

    Args:
        images: the panel, (B, C, H, W) model inputs; ``None`` takes the first ``num_images``
            images of the validation dataloader.
        num_images: panel size when taken from the validation data.
        every_n_epochs: how often (counted in training epochs).
        methods: names from :data:`~vitkit.explain.methods.METHODS`.
        method_options: per-method keyword arguments, e.g. ``{"rollout": {"discard_ratio": 0.9}}``.
        mean, std: the input normalisation to undo for display; default ``model.pretrained_cfg``'s.
        dirname: folder under the run's log dir.
        cmap, alpha: overlay colormap and opacity.
    """

    def __init__(
        self,
        images: torch.Tensor | None = None,
        num_images: int = 8,
        every_n_epochs: int = 1,
        methods: Sequence[str] = ("rollout", "relevance"),
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dirname: str = "explanations",
        cmap: str = "jet",
        alpha: float = 0.5,
    ) -> None:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
        if every_n_epochs < 1:
            raise ValueError("every_n_epochs must be >= 1.")
        self.images = images
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.methods = list(methods)
        self.method_options = {k: dict(v) for k, v in (method_options or {}).items()}
        self.mean, self.std = mean, std
        self.dirname = dirname
        self.cmap, self.alpha = cmap, alpha
        self.saved: list[Path] = []

    # ------------------------------------------------------------------ panel
    def _panel(self, trainer: L.Trainer) -> torch.Tensor | None:
        if self.images is not None:
            return self.images
        loader = trainer.val_dataloaders
        if (
            loader is None
            and trainer.datamodule is not None
            and hasattr(trainer.datamodule, "val_dataloader")
        ):
            loader = trainer.datamodule.val_dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            return None
        taken: list[torch.Tensor] = []
        for batch in loader:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            taken.extend(images[: self.num_images - len(taken)])
            if len(taken) >= self.num_images:
                break
        self.images = torch.stack(taken) if taken else None
        return self.images

    @staticmethod
    def _model(pl_module: L.LightningModule) -> torch.nn.Module:
        inner = getattr(pl_module, "model", None)
        return inner if isinstance(inner, torch.nn.Module) else pl_module

    # ------------------------------------------------------------------ hook
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs or not trainer.is_global_zero:
            return
        panel = self._panel(trainer)
        if panel is None:
            return
        model = self._model(pl_module)
        images = panel.to(pl_module.device)
        maps = {m: explain(model, images, m, **self.method_options.get(m, {})).cpu() for m in self.methods}

        from .plot import figure_to_array, plot_explanations

        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = self.mean if self.mean is not None else cfg.get("mean")
        std = self.std if self.std is not None else cfg.get("std")
        with torch.no_grad():
            predicted = model(images).argmax(-1).tolist()
        titles = [f"predicted {p}" for p in predicted]
        fig = plot_explanations(
            panel.cpu(), maps, mean=mean, std=std, titles=titles, cmap=self.cmap, alpha=self.alpha
        )
        folder = Path(trainer.log_dir or trainer.default_root_dir) / self.dirname
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch_{trainer.current_epoch:03d}.png"
        fig.savefig(path)
        self.saved.append(path)
        pixels = None
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if callable(getattr(experiment, "add_image", None)):
                pixels = figure_to_array(fig) if pixels is None else pixels
                experiment.add_image("explanations", pixels, trainer.global_step, dataformats="HWC")
