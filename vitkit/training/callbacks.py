"""Callbacks and plugins that make runs resumable, observable and shareable.

* :class:`RNGStateCheckpoint`: puts the Python, NumPy and torch RNG states in every checkpoint
  and restores them on resume (Lightning's checkpoints do not hold them), so a resumed run
  draws the same augmentations and dropout masks as an uninterrupted one (loader workers: see
  :mod:`vitkit.data.seeding`).
* :class:`PerRankRandomness`: under DDP, each rank's main process draws its own random numbers
  (augmentation on the device, Mixup / CutMix, dropout, drop path) instead of every rank the same.
* :class:`AtomicCheckpointIO`: writes a checkpoint to a temporary file and renames it into
  place, so a killed process never leaves a half-written ``last.ckpt``.
* :class:`ImagesPerSecond`: images/s in the progress bar and the logs.
* :class:`EMA`: Lightning's ``EMAWeightAveraging`` (same options, same checkpoints), updated in one
  fused pass without the two host-device synchronisations per step of ``AveragedModel``; with
  ``warmup=True``, timm's EMA warm-up.
* :class:`RunArtifacts`: at the end of fit/test, the loss/accuracy curves and the confusion
  matrix as PNGs, a summary table, and the weights as ``model.safetensors``.
* :class:`PredictionWriter`: class names and probabilities of ``vitkit predict`` to CSV/JSON.
"""

from __future__ import annotations

import csv
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, EMAWeightAveraging

from ._cadence import Every


class RNGStateCheckpoint(Callback):
    """Save and restore every random number generator with the checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "python": random.getstate(),
            # plain types and tensors only, so checkpoints load with torch.load(weights_only=True)
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class PerRankRandomness(Callback):
    """Under DDP, give every rank's main process a random stream of its own when training starts.

    ``seed_everything`` seeds every rank alike (the replicas' weights start equal that way), so
    without this each rank would draw the same numbers at every step: the same crop boxes and
    RandAugment operations for the i-th image of its batch (``augment_on="device"``), the same
    Mixup / CutMix pairs and ratio, the same dropout and drop-path masks, on other images. timm
    seeds rank r with ``seed + r`` for the same reason. Here rank 0 keeps its stream, the one of a
    single-process run, and rank r > 0 re-seeds Python, NumPy and torch (CPU and CUDA) from
    (a number drawn from the stream all ranks share at that point, r). Loader workers draw per
    batch (:mod:`vitkit.data.seeding`), so ranks, which read different images, differ there already.

    On resume the stream they share is rank 0's, from the checkpoint
    (:class:`RNGStateCheckpoint`): rank 0 carries on exactly, and every other rank gets a stream that
    is a function of the checkpoint and its rank: the same for every resume of that checkpoint, but
    not the one it had before the interruption (a checkpoint holds rank 0's generators only).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1 and trainer.global_rank > 0:
            _seed_rank(trainer.global_rank)


def _seed_rank(rank: int) -> None:
    """Re-seed Python, NumPy and torch from (a draw from the current torch stream, ``rank``)."""
    from vitkit.data.seeding import reseed  # (the training package leaves the data package unloaded)

    reseed(int(torch.randint(2**62, ())), rank)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<name>.tmp-XXXX`` in the same folder, fsync, then ``os.replace`` into place."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; use the usual mode
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ImagesPerSecond(Callback):
    """Log training throughput (images/s over the last ``window`` batches) to the progress bar and
    the loggers, at most every ``every`` seconds."""

    def __init__(self, window: int = 20, every: float = 0.5) -> None:
        self.window = window
        self._times: list[float] = []
        self._sizes: list[int] = []
        self._due = Every(every)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        self._times.append(time.perf_counter())
        self._sizes.append(int(batch[0].shape[0]) * trainer.world_size)
        del self._times[: -self.window - 1], self._sizes[: -self.window - 1]
        if len(self._times) > 1 and self._due():
            elapsed = self._times[-1] - self._times[0]
            rate = sum(self._sizes[:-1]) / max(elapsed, 1e-9)
            # a CPU tensor: a Python float would be copied to the GPU, a wait for its queue to drain
            rate = torch.tensor(rate)
            pl_module.log("img_per_s", rate, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._times.clear()
        self._sizes.clear()


class _EMAPairs(NamedTuple):
    ema_floats: list[torch.Tensor]
    floats: list[torch.Tensor]
    ema_others: list[torch.Tensor]
    others: list[torch.Tensor]


class EMA(EMAWeightAveraging):
    """An exponential moving average of the weights, validated and saved in their place.

    ema = decay * ema + (1 - decay) * weights after every optimiser step (the first update copies).
    Options, schedule (``update_every_n_steps``, ``update_starting_at_step/epoch``) and checkpoint
    contents are those of Lightning's ``EMAWeightAveraging``; only the update differs. PyTorch's
    ``AveragedModel.update_parameters`` reads its step counter, a device tensor, twice per call
    (``if n_averaged == 0``, ``if n_averaged > 0``): on a GPU two waits per step for all queued work.
    Here the counter is read once per fit, and the update is one ``lerp`` over all floating-point
    tensors (integer buffers, such as BatchNorm's batch count, are copied).

    ``warmup=True`` (as timm's ``ModelEmaV3(use_warmup=True)``) lets the window grow with the run:
    the k-th update uses ``min(decay, 1 - (1 + k) ** -warmup_power)``, so early averages are not
    dominated by the random initial weights (with a fixed 0.999, the initial weights still make up
    0.999^k of the average: 68% after 390 steps, and validation sees that average).
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        device: str | None = None,
        use_buffers: bool = True,
        warmup: bool = False,
        warmup_power: float = 0.75,
    ) -> None:
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
            update_starting_at_epoch=update_starting_at_epoch,
        )
        self.decay, self.warmup, self.warmup_power = decay, warmup, warmup_power
        self._updates: int | None = None  # host copy of the device counter n_averaged, read once per fit
        self._pairs: _EMAPairs | None = None

    def decay_at(self, updates: int) -> float:
        """The decay of the update after ``updates`` earlier ones (>= 1)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + updates) ** -self.warmup_power)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._updates = None  # a resumed checkpoint may hold an average already
        self._pairs = None  # Lightning made a new average in setup

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step > self._latest_update_step and self.should_update(
            step_idx=trainer.global_step - 1
        ):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(
            epoch_idx=trainer.current_epoch
        ):
            self._update(pl_module)
            self._latest_update_epoch = trainer.current_epoch

    def _tensor_pairs(self, pl_module: L.LightningModule) -> _EMAPairs:
        """(average, model) tensors, floating-point and other, built on a fit's first update and
        reused: the model's tensors do not change during a fit."""
        if self._pairs is None:
            average = self._average_model
            assert average is not None
            ema = list(average.module.parameters())
            current = list(pl_module.parameters())
            if self._use_buffers:
                ema += list(average.module.buffers())
                current += list(pl_module.buffers())
            pairs = list(zip(ema, current, strict=True))
            floats = [(e, c) for e, c in pairs if e.is_floating_point()]
            others = [(e, c) for e, c in pairs if not e.is_floating_point()]
            self._pairs = _EMAPairs(
                [e for e, _ in floats], [c for _, c in floats], [e for e, _ in others], [c for _, c in others]
            )
        return self._pairs

    @torch.no_grad()
    def _update(self, pl_module: L.LightningModule) -> None:
        average = self._average_model
        assert average is not None
        pairs = self._tensor_pairs(pl_module)
        floats, others = pairs.floats, pairs.others
        if pairs.ema_floats and floats[0].device != pairs.ema_floats[0].device:  # device="cpu": copy over
            floats = [c.to(e.device) for e, c in zip(pairs.ema_floats, floats, strict=True)]
            others = [c.to(e.device) for e, c in zip(pairs.ema_others, others, strict=True)]
        if self._updates is None:
            self._updates = int(average.n_averaged)  # the one read per fit
        if self._updates == 0:
            torch._foreach_copy_(pairs.ema_floats + pairs.ema_others, floats + others)
        else:
            torch._foreach_lerp_(pairs.ema_floats, floats, 1.0 - self.decay_at(self._updates))
            if others:
                torch._foreach_copy_(pairs.ema_others, others)
        self._updates += 1
        average.n_averaged += 1  # on the device, no wait; kept so checkpoints match Lightning's


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the logger's folder, else the trainer's root folder."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class RunArtifacts(Callback):
    """Write plots, a summary and exported weights into the run folder after fit and test."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._write(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._write(trainer, pl_module, "test")

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from .plots import plot_confusion_matrix, plot_curves

        folder = run_dir(trainer)
        plots = folder / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        metrics_csv = _find_metrics_csv(folder)
        written = []
        if metrics_csv is not None and stage == "val":
            written += plot_curves(metrics_csv, plots)
        matrix = getattr(pl_module, "last_confusion", {}).get(stage)
        if matrix is not None:
            path = plots / f"confusion_{stage}.png"
            plot_confusion_matrix(matrix, pl_module.classes, path)
            written.append(path)
        summary = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
        summary = {k: v for k, v in summary.items() if "/acc_" not in k}
        if stage == "val":
            weights = folder / "model.safetensors"
            _export_weights(pl_module, weights)
            summary["weights"] = str(weights)
        (folder / f"summary_{stage}.json").write_text(json.dumps(summary, indent=2))
        print(_summary_table(stage, summary, written))


def _find_metrics_csv(folder: Path) -> Path | None:
    candidates = sorted(folder.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def _export_weights(pl_module: L.LightningModule, path: Path) -> None:
    from vitkit.weights import save

    classes = list(getattr(pl_module, "classes", [])) or None
    save(pl_module.model, path, format="vitkit", label_names=classes)


def _summary_table(stage: str, summary: dict[str, Any], plots: list[Path]) -> str:
    lines = [f"\n{stage} summary", "-" * 40]
    for key, value in summary.items():
        lines.append(f"{key:<24} {value:.4f}" if isinstance(value, float) else f"{key:<24} {value}")
    lines += [f"plot                     {p}" for p in plots]
    return "\n".join(lines)


class PredictionWriter(BasePredictionWriter):
    """Write ``vitkit predict`` results (path, predicted class, probability, top-k) to CSV and JSON."""

    def __init__(self, output: str = "predictions", top_k: int = 5) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.top_k = top_k

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        classes = list(getattr(pl_module, "classes", []))
        rows = []
        for batch in predictions:
            probs, meta = batch["probs"].cpu(), batch["meta"]
            top = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
            for i in range(probs.shape[0]):
                name = meta[i] if meta is not None and not isinstance(meta, torch.Tensor) else str(len(rows))
                labels = [classes[j] if j < len(classes) else str(j) for j in top.indices[i].tolist()]
                rows.append(
                    {
                        "path": str(name),
                        "prediction": labels[0],
                        "probability": round(top.values[i, 0].item(), 6),
                        "top_k": dict(
                            zip(labels, [round(v, 6) for v in top.values[i].tolist()], strict=True)
                        ),
                    }
                )
        out = Path(self.output)
        if not out.is_absolute():
            out = run_dir(trainer) / out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
        with out.with_suffix(".csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "prediction", "probability"])
            writer.writerows([r["path"], r["prediction"], r["probability"]] for r in rows)
        print(f"Wrote {len(rows)} predictions to {out.with_suffix('.csv')} and {out.with_suffix('.json')}")
