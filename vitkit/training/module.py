"""The LightningModule that trains any vitkit model as an image classifier.

It owns the model, the loss, the metrics and the optimiser/schedule; the data come from a
LightningDataModule and everything around the loop (checkpoints, logging, EMA, precision,
devices) from the Lightning Trainer and callbacks.

Optimisation follows the ViT/DeiT recipes: AdamW, weight decay on weight matrices only (not on
norms, biases, position/class/register tokens), optional layer-wise LR decay, linear warmup per
step then cosine decay to ``min_lr``. With ``anneal_by_time`` and a time limit
(``--trainer.max_time``), the cosine follows whichever runs out first, the steps or the time.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from vitkit.models import compile_blocks, create_model
from vitkit.weights import freeze as freeze_parameters
from vitkit.weights import param_groups_lrd, unfreeze

from ._cadence import Every
from .distillation import distillation_loss, load_teacher, renormalise
from .guard import NonFiniteLossError, NonFiniteLossGuard, any_process

__all__ = ["ImageClassifier", "NonFiniteLossError", "load_classifier", "warmup_cosine"]

# Under DDP, anneal_by_time reads rank 0's clock (a broadcast, so a host-device sync on GPUs) once
# every this many optimiser steps; a single process reads its own clock at every step.
_TIME_SYNC_EVERY = 50


class ImageClassifier(L.LightningModule):
    """Train, validate, test and predict with a vitkit Vision Transformer.

    Args:
        model_name: a name from :func:`vitkit.list_models` (``timm=True`` lists the timm ViTs it also takes).
        model_options: options overriding the registered ones (e.g. ``{"depth": 6}``).
        pretrained: weights to start from, as ``create_model`` takes them: a file, folder or hub
            name, or ``True`` for timm's hub weights of ``model_name``.
        reset_head: re-initialise the classifier head after loading ``pretrained``. ``None``
            (default): only when needed — another class count, or the checkpoint's class names
            differ from ``classes`` (same count, other classes: the old head would only mislead).
            ``True``: always (fine-tuning on new classes from weights without class names).
        num_classes: classifier outputs; taken from the data module when linked by the CLI.
        classes: the class names, stored in checkpoints so predictions map back to names.
        lr: peak learning rate (after warmup), for ``lr_batch_size`` images per step if set.
        lr_batch_size: if set, the LR is scaled linearly: ``lr * global_batch / lr_batch_size``
            (DeiT: ``5e-4 * batch / 512``).
        min_lr: LR at the end of the cosine decay.
        weight_decay: AdamW decoupled weight decay, applied to weight matrices only.
        betas: AdamW betas.
        warmup_epochs: linear warmup length in epochs (converted to steps) ...
        warmup_steps: ... or in optimiser steps (takes precedence when > 0).
        layer_decay: layer-wise LR decay factor (e.g. 0.65 for fine-tuning); ``None``: off.
        label_smoothing: for the cross-entropy loss with hard labels.
        loss: ``'ce'`` (softmax cross-entropy) or ``'bce'`` (sigmoid binary cross-entropy on
            one-hot/soft targets, as in DeiT III).
        freeze: ``'none'``, ``'linear_probe'`` (train the head only), ``'freeze_blocks:N'`` (the
            stem and the first N blocks frozen) or ``'last_blocks:N'`` (only the last N train);
            see :func:`vitkit.weights.freeze`.
        unfreeze_at_epoch: with ``freeze``, make every parameter trainable again from this epoch
            on ("freeze then unfreeze": a linear probe first, then full fine-tuning).
        fused_optimizer: use the fused AdamW kernel where available (the foreach one when the
            trainer clips gradients under 16-mixed: its loss scaler cannot clip a fused optimiser).
        compile: ``True`` (or ``'model'``): wrap the whole model in ``torch.compile``, the fastest
            step once compiled; ``'blocks'``: compile the Transformer blocks one by one
            (:func:`vitkit.models.compile_blocks`), which compiles one block's code once for all of
            them and starts training several times sooner, at the cost of the fusion across block
            boundaries. ``False``: eager.
        compile_mode: ``torch.compile``'s ``mode`` (``None``: its default). On an H200,
            ``'max-autotune-no-cudagraphs'`` made a ViT-B/16 step 1.9% faster after 310 s of
            autotuning (BENCHMARKS.md): worth it for long runs only.
        anneal_by_time: with a time limit on training (``--trainer.max_time``, or a ``Timer``
            callback with a duration), the cosine decay reaches ``min_lr`` when either the steps
            (``max_epochs``/``max_steps``) or the time run out, whichever comes first. Without
            it a time limit cuts the schedule off wherever it happens to be. A run then adapts
            to the machine's speed (a slow day trains fewer epochs, but still anneals), at the
            price of exact reproducibility: the LR depends on the wall time. Off by default,
            so that a time limit used as a safety stop (a cluster job resumed later) leaves the
            schedule alone.
        tta: test-time augmentation in validation, test and predict. ``'none'`` (default);
            ``'hflip'``: the mean of the logits of each image and its mirror image, for a model
            trained with horizontal flips (``hflip`` in the data module). Twice the evaluation
            cost, typically a few tenths of a point of accuracy; CIFAR-10 speed records report
            with it. The loss logged in validation is that of the averaged logits.
        teacher: train with knowledge distillation from this model (DeiT): anything
            ``create_model(pretrained=...)`` reads (e.g. another run's ``.ckpt``), a timm
            ``train.py`` checkpoint of any timm architecture (a convnet), or ``timm:NAME``; it must
            predict the same classes, and is read when training starts (validating, testing and
            predicting do not need it). A distilled student (``distilled=True``) learns the labels
            with its class head and the teacher with its distillation head; any other student
            learns both with its one head. See :mod:`vitkit.training.distillation`.
        distillation_type: ``'hard'`` (the teacher's argmax as a label, DeiT's best) or ``'soft'``
            (KL divergence to the teacher's softened probabilities).
        distillation_alpha: the teacher term's weight α: ``(1 - α) · labels + α · teacher``.
        distillation_tau: the temperature τ of ``'soft'`` distillation.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch4_32",
        model_options: dict[str, Any] | None = None,
        pretrained: bool | str | None = None,
        reset_head: bool | None = None,
        num_classes: int | None = None,
        classes: list[str] | None = None,
        lr: float = 1e-3,
        lr_batch_size: int | None = None,
        min_lr: float = 1e-5,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 1.0,
        warmup_steps: int = 0,
        layer_decay: float | None = None,
        label_smoothing: float = 0.0,
        loss: Literal["ce", "bce"] = "ce",
        freeze: str = "none",
        unfreeze_at_epoch: int | None = None,
        fused_optimizer: bool = True,
        compile: bool | Literal["model", "blocks"] = False,
        compile_mode: str | None = None,
        anneal_by_time: bool = False,
        tta: Literal["none", "hflip"] = "none",
        teacher: str | None = None,
        distillation_type: Literal["hard", "soft"] = "hard",
        distillation_alpha: float = 0.5,
        distillation_tau: float = 1.0,
    ) -> None:
        super().__init__()
        if tta not in ("none", "hflip"):
            raise ValueError(f"tta={tta!r} is not one of 'none', 'hflip'.")
        if distillation_type not in ("hard", "soft") or not 0.0 <= distillation_alpha <= 1.0:
            raise ValueError(
                f"distillation_type={distillation_type!r}, distillation_alpha={distillation_alpha}: "
                "use 'hard' or 'soft', and a weight in [0, 1]."
            )
        self.save_hyperparameters()
        options = dict(model_options or {})
        if num_classes is None and classes:
            num_classes = len(classes)
        if num_classes is not None:
            options["num_classes"] = num_classes
        self.model = create_model(model_name, pretrained=pretrained, **options)
        self.num_classes = self.model.num_classes
        classes = list(classes) if classes else None  # []: not known yet (a data module names them in setup)
        if classes is not None and len(classes) != self.num_classes:
            raise ValueError(f"{len(classes)} class names given for a model with {self.num_classes} classes.")
        self.classes = classes or [str(i) for i in range(self.num_classes)]
        if pretrained not in (None, False):
            self._maybe_reset_head(reset_head, classes)
        # The teacher is kept out of the module registry too: its weights stay out of checkpoints and
        # out of the optimizer. Read when training starts (not to validate, test or predict), and
        # moved to the student's device.
        self.__dict__["_teacher"] = None
        self._teacher_normalisation: tuple[Any, Any, Any, Any] | None = None  # set in on_fit_start
        if teacher and self.model.head_dist is not None:
            self.model.set_distilled_training(True)  # the distillation head learns from the teacher
        freeze_parameters(self.model, freeze)
        # Kept out of the module registry (plain __dict__ entry): registering it would store every
        # weight twice in state_dict and checkpoints. The compiled wrapper shares self.model's parameters.
        self.__dict__["_compiled_model"] = _compiled(self.model, compile, compile_mode)
        if not compile:  # (a compiled model would compile once more, for batch size 1)
            # One image at the model's size: Lightning's model summary then shows the forward FLOPs
            # per image and each layer's input and output shapes, instead of "Total FLOPs: 0".
            embed = self.model.patch_embed
            self.example_input_array = torch.zeros(1, embed.in_chans, *embed.img_size)

        top_k = (1, 5) if self.num_classes > 5 else (1,)
        metrics = MetricCollection(
            {f"acc{k}": MulticlassAccuracy(self.num_classes, top_k=k, average="micro") for k in top_k}
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_confusion = MulticlassConfusionMatrix(self.num_classes)
        self.test_confusion = MulticlassConfusionMatrix(self.num_classes)
        self.last_confusion: dict[str, torch.Tensor] = {}
        self._loss_guard = NonFiniteLossGuard()
        self._bar_due = Every(0.5)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> ImageClassifier:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``, without reading again the weights the run started
        from (``pretrained``: a file that may have moved, a hub download) or its ``teacher``: the
        checkpoint holds the trained weights. Pass ``pretrained=`` / ``teacher=`` to read them."""
        kwargs.setdefault("pretrained", None)
        kwargs.setdefault("teacher", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def _maybe_reset_head(self, reset_head: bool | None, classes: list[str] | None) -> None:
        """A fresh head when the pretrained one classifies other classes (see ``reset_head``)."""
        old_names = (getattr(self.model, "pretrained_cfg", None) or {}).get("label_names")
        if reset_head is None:
            reset_head = bool(classes and old_names and list(old_names) != list(classes))
            if reset_head:
                rank_zero_info(
                    f"The pretrained head was trained on other classes ({', '.join(old_names[:4])}...); "
                    "it is re-initialised for this data's classes. Pass --model.reset_head false to keep it."
                )
        if reset_head:
            self.model.reset_classifier(self.num_classes)
            self.model.pretrained_cfg.pop("label_names", None)

    # ------------------------------------------------------------------ forward and loss
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        compiled = self.__dict__["_compiled_model"]
        return (self.model if compiled is None else compiled)(images)

    def compute_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy for int labels (with label smoothing) or soft targets (mixup/cutmix)."""
        logits = logits.float()
        if self.hparams.loss == "bce":
            if targets.ndim == 1:
                targets = F.one_hot(targets, self.num_classes).float()
            return F.binary_cross_entropy_with_logits(logits, targets)
        if targets.ndim == 1:
            return F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()  # soft targets

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch[0], batch[1]
        if not self.hparams.teacher:
            loss = self.compute_loss(self(images), targets)
        else:
            loss = self._distilled_loss(images, targets)
        shown = self._check_loss(loss, batch_idx)
        # Lightning turns every progress-bar value into a Python number after each batch: for a GPU
        # tensor, a wait for all the work queued so far. So the bar gets host copies only (the loss
        # one step late, the LR as a CPU tensor); the GPU loss goes to the logger and the epoch mean.
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=images.shape[0])
        if shown is None or not self._bar_due():  # the bar's values twice a second: each log costs time
            return loss
        bar = {"prog_bar": True, "logger": False, "on_step": True, "on_epoch": False, "batch_size": 1}
        self.log("loss", shown, **bar)
        if self._trainer is not None and self.trainer.optimizers:  # the peak group's LR (the head's)
            lr = max(group["lr"] for group in self.trainer.optimizers[0].param_groups)
            self.log("lr", torch.tensor(lr), **bar)  # loggers: LearningRateMonitor, every group
        return loss

    def _distilled_loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(1 - α) · the labels' loss + α · the teacher's (see :mod:`vitkit.training.distillation`)."""
        h = self.hparams
        output = self(images)
        logits, student = output if isinstance(output, tuple) else (output, output)
        teacher = self.teacher
        norm = self._teacher_normalisation  # None: the teacher sees the student's images as they are
        with torch.no_grad():
            taught = teacher(images if norm is None else renormalise(images, *norm))
        teacher_term = distillation_loss(student, taught, h.distillation_type, h.distillation_tau)
        self.log("train/loss_teacher", teacher_term, on_step=False, on_epoch=True, batch_size=images.shape[0])
        alpha = h.distillation_alpha
        return (1 - alpha) * self.compute_loss(logits, targets) + alpha * teacher_term

    @property
    def teacher(self) -> nn.Module | None:
        """The distillation teacher (read from ``teacher`` on first use, frozen), or None."""
        if self.hparams.teacher and self.__dict__["_teacher"] is None:
            self.__dict__["_teacher"] = load_teacher(self.hparams.teacher, self.num_classes)
        return self.__dict__["_teacher"]

    def on_fit_start(self) -> None:
        teacher = self.teacher
        if teacher is None:
            return
        teacher.to(self.device)
        # the data's normalisation (its data module's, else the student's preprocessing) -> the teacher's
        data = getattr(getattr(self.trainer, "datamodule", None), "data_config", None)
        mean = getattr(data, "mean", None) or self.model.pretrained_cfg.get("mean")
        std = getattr(data, "std", None) or self.model.pretrained_cfg.get("std")
        own = getattr(teacher, "pretrained_cfg", None) or {}
        known = None not in (mean, std, own.get("mean"), own.get("std"))
        self._teacher_normalisation = (mean, std, own["mean"], own["std"]) if known else None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The scheduler computes the next step's LR right after this step: tell it the time now.
        if not self.hparams.anneal_by_time:
            return
        scheduler, timer = self.lr_schedulers(), self._time_limit()
        schedule = getattr(scheduler, "lr_lambdas", [None])[0]  # the same object on resume (load_state_dict)
        if not isinstance(schedule, _WarmupCosine) or timer is None:
            return
        several = self.trainer.world_size > 1
        if several and self.global_step % _TIME_SYNC_EVERY:
            return
        elapsed = timer.time_elapsed("train")
        budget = elapsed + timer.time_remaining("train")
        if several:  # every rank must use the same LR, or DDP's replicas drift apart: rank 0's clock
            elapsed = self.trainer.strategy.broadcast(elapsed, src=0)
        schedule.observe_time(self.global_step, elapsed, budget)

    def _time_limit(self) -> Timer | None:
        """The trainer's Timer callback, if it has a duration (``--trainer.max_time``)."""
        if self._trainer is None:
            return None
        timers = (cb for cb in self.trainer.callbacks if isinstance(cb, Timer))
        return next((timer for timer in timers if timer.time_remaining() is not None), None)

    def _check_loss(self, loss: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        """Stop on a NaN/inf loss; with fused AdamW, without a host sync per step (the bad step is
        skipped on the device and reported one step later: see ``guard.py``). Under DDP every
        process skips and stops at the same step. Returns the newest loss already on the host
        (CPU tensor), for the progress bar."""
        optimizer = (
            self.trainer.optimizers[0] if self._trainer is not None and self.trainer.optimizers else None
        )
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else float("nan")
        where = f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}, lr {lr:.3g})"
        defer = self._trainer is not None and NonFiniteLossGuard.can_defer(optimizer, self._loss_scaler())
        several = self._trainer is not None and self.trainer.world_size > 1 and dist.is_initialized()
        reduce = any_process if several else None
        return self._loss_guard.check(loss, where, optimizer if defer else None, reduce)

    def on_train_epoch_end(self) -> None:
        self._loss_guard.flush()  # the epoch's last loss

    def on_train_end(self) -> None:
        self._loss_guard.flush()
        self._loss_guard.disarm()

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation: the model's, averaged over test-time augmentations (``tta``)."""
        logits = self(images)
        if self.hparams.tta == "hflip":
            logits = (logits + self(images.flip(-1))) / 2
        return logits

    def _evaluate(self, batch: Any, metrics: MetricCollection, confusion: nn.Module, stage: str) -> None:
        images, targets = batch[0], batch[1]
        logits = self.predict_logits(images)
        loss = self.compute_loss(logits, targets)
        labels = targets if targets.ndim == 1 else targets.argmax(dim=-1)
        metrics.update(logits, labels)
        confusion.update(logits, labels)
        self.log(
            f"{stage}/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=images.shape[0]
        )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, self.val_confusion, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_confusion, "test")

    def _end_epoch(self, metrics: MetricCollection, confusion: MulticlassConfusionMatrix, stage: str) -> None:
        self.log_dict(metrics.compute(), prog_bar=True, sync_dist=True)  # torchmetrics syncs across ranks
        matrix = confusion.compute()
        per_class = matrix.diag() / matrix.sum(dim=1).clamp(min=1)
        for name, acc in zip(self.classes, per_class.tolist(), strict=True):
            self.log(f"{stage}/acc_{name}", acc, sync_dist=False)
        self.last_confusion[stage] = matrix.cpu()
        metrics.reset()
        confusion.reset()

    def on_validation_epoch_end(self) -> None:
        self._end_epoch(self.val_metrics, self.val_confusion, "val")

    def on_test_epoch_end(self) -> None:
        self._end_epoch(self.test_metrics, self.test_confusion, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        extra = batch[1] if isinstance(batch, list | tuple) and len(batch) > 1 else None
        return {"probs": self.predict_logits(images).float().softmax(dim=-1), "meta": extra}

    def on_train_epoch_start(self) -> None:
        epoch = self.hparams.unfreeze_at_epoch
        if epoch is not None and self.current_epoch >= epoch:
            changed = unfreeze(self.model)
            if changed:
                print(f"epoch {self.current_epoch}: unfroze {len(changed)} parameter tensors")

    def setup(self, stage: str) -> None:
        """Adopt the class names of a data module that learns them only in its own ``setup``; run
        eagerly, with a warning, where ``compile`` cannot work (a CPU without a C++ compiler)."""
        compiled = self.__dict__["_compiled_model"] is not None and self._trainer is not None
        if compiled and self.trainer.strategy.root_device.type == "cpu" and not _cxx_compiler():
            rank_zero_warn(
                "--model.compile: torch.compile on CPU needs a C++ compiler (g++ or clang++, or $CXX) "
                "and none was found; running eagerly. Install one (e.g. apt install g++) to compile."
            )
            self.__dict__["_compiled_model"] = None
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(data, "classes", None) or [])
        if not self.hparams.classes and len(names) == self.num_classes:
            self.classes = names
            self.hparams.classes = names  # into checkpoints, so predictions are named

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # everything needed to rebuild the bare model without this class (vitkit.weights reads it)
        checkpoint["vitkit"] = {
            "config": dict(self.model.config),
            "pretrained_cfg": dict(self.model.pretrained_cfg),
            "classes": list(self.classes),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What the module's constructor took from the starting weights rather than from its own
        # arguments: their preprocessing and their norms' epsilon. A module rebuilt without reading
        # them again (load_from_checkpoint, load_classifier) gets them from the checkpoint.
        saved = checkpoint.get("vitkit") or {}
        if saved.get("pretrained_cfg"):
            self.model.pretrained_cfg = dict(saved["pretrained_cfg"])
        eps = (saved.get("config") or {}).get("norm_eps")
        if eps is not None and eps != self.model.config.get("norm_eps"):
            for module in self.model.modules():
                if isinstance(module, nn.LayerNorm | nn.RMSNorm):
                    module.eps = eps
            self.model.config["norm_eps"] = eps

    # ------------------------------------------------------------------ optimisation
    def _loss_scaler(self) -> Any:
        """The fp16 GradScaler of the trainer's precision (16-mixed), else None."""
        return getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``--trainer.gradient_clip_val`` (by norm, or ``gradient_clip_algorithm: value``).

        Lightning refuses to clip for any fused optimiser under mixed precision, although only an
        fp16 loss scaler makes it wrong (the gradients must be unscaled first). Without one (fp32,
        bf16) vitkit clips the gradients itself, so fused AdamW stays on.
        """
        if not gradient_clip_val or self._loss_scaler() is not None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def effective_lr(self) -> float:
        """The peak LR after optional linear scaling by the global batch size."""
        lr = self.hparams.lr
        if self.hparams.lr_batch_size and self.trainer is not None:
            batch = _global_batch_size(self.trainer)
            if batch:
                lr = lr * batch / self.hparams.lr_batch_size
        return lr

    def configure_optimizers(self) -> dict[str, Any]:
        lr = self.effective_lr()
        groups = param_groups_lrd(
            self.model,
            self.hparams.weight_decay,
            self.hparams.layer_decay or 1.0,
            base_lr=lr,
            include_frozen=self.hparams.unfreeze_at_epoch is not None,  # so unfreezing needs no new optimizer
        )
        # An fp16 loss scaler cannot clip the gradients of a fused AdamW (it unscales them inside its
        # kernel): with 16-mixed and --trainer.gradient_clip_val the foreach AdamW is used instead.
        # Otherwise configure_gradient_clipping clips, and the fused kernel stays.
        clipping = self._trainer is not None and bool(getattr(self.trainer, "gradient_clip_val", None))
        use_fused = (
            self.hparams.fused_optimizer
            and not (clipping and self._loss_scaler() is not None)
            and all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
        )
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(self.hparams.betas), fused=use_fused or None)

        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if self.hparams.warmup_steps > 0:
            warmup = self.hparams.warmup_steps
        else:
            steps_per_epoch = total / max(self.trainer.max_epochs or 1, 1)
            warmup = round(self.hparams.warmup_epochs * steps_per_epoch)
        schedule = warmup_cosine(warmup, total, min_ratio=self.hparams.min_lr / max(lr, 1e-12))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        if self.hparams.anneal_by_time:
            timer = self._time_limit()
            if timer is None:
                rank_zero_warn(
                    "--model.anneal_by_time is on but training has no time limit: the LR anneals over "
                    f"{total} steps only. Set --trainer.max_time (e.g. 00:00:55:00) to anneal by time too."
                )
            else:
                budget = timer.time_elapsed("train") + timer.time_remaining("train")
                rank_zero_info(
                    f"The LR anneals to {self.hparams.min_lr:g} at step {total} or after "
                    f"{budget / 60:.1f} minutes of training, whichever comes first."
                )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _WarmupCosine:
    """LR multiplier: linear from ~0 to 1 over ``warmup`` steps, then cosine to ``min_ratio``.

    The cosine's progress is the fraction of the post-warmup steps done, or, once
    :meth:`observe_time` has been told of a time budget, the fraction of the post-warmup time
    spent, whichever is further along. Its state is plain numbers, so ``LambdaLR`` stores it in
    checkpoints and a resumed run continues where it was.
    """

    time_progress: float = 0.0  # class defaults: checkpoints written before these existed still load
    warmup_time: float | None = None

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def observe_time(self, step: int, elapsed: float, budget: float) -> None:
        """Record that ``elapsed`` of ``budget`` seconds are spent at the end of optimiser step ``step``."""
        if step < self.warmup or self.warmup_time is None:
            self.warmup_time = elapsed  # the cosine's time starts where the warmup ends
        spent = (elapsed - self.warmup_time) / max(budget - self.warmup_time, 1e-9)
        self.time_progress = min(max(spent, 0.0), 1.0)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        progress = max(progress, self.time_progress)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.0) -> _WarmupCosine:
    """A picklable LR-multiplier function for ``LambdaLR``: linear warmup, then cosine decay."""
    return _WarmupCosine(warmup, total, min_ratio)


def _compiled(model: nn.Module, compile: bool | str, mode: str | None = None) -> nn.Module | None:
    """``model`` compiled as ``ImageClassifier(compile=...)`` asks, sharing its parameters; None: eager."""
    if compile is False:
        return None
    if compile is True or compile == "model":
        return torch.compile(model, mode=mode)
    if compile == "blocks":
        return compile_blocks(model, mode=mode)
    raise ValueError(f"compile={compile!r}: give true, false, 'model' or 'blocks'.")


def _cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU: ``$CXX``, else g++, c++ or clang++ on the PATH."""
    candidates = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return next((path for name in candidates if name and (path := shutil.which(name))), None)


def _global_batch_size(trainer: L.Trainer) -> int | None:
    datamodule = getattr(trainer, "datamodule", None)
    batch = getattr(datamodule, "batch_size", None)
    if batch is None:
        return None
    return int(batch) * trainer.world_size * trainer.accumulate_grad_batches


def _built_from_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """:class:`ImageClassifier` arguments that build its model from one of its own checkpoints.

    What the constructor would take from the starting weights (``pretrained``: a file that may
    have moved, a download; or ``model_name`` as a hub name) is the architecture, the preprocessing
    and the norms' epsilon; vitkit's checkpoints record all three, and the trained head.
    """
    return {"model_name": None, "pretrained": str(checkpoint), "reset_head": False}


def load_classifier(checkpoint: str | Path, map_location: str = "cpu") -> ImageClassifier:
    """Load a trained :class:`ImageClassifier` from a vitkit ``.ckpt`` file (no pretrained re-download)."""
    ckpt = torch.load(checkpoint, map_location=map_location, weights_only=False)
    accepted = inspect.signature(ImageClassifier).parameters
    # LightningCLI adds its own entries (e.g. `_instantiator`) to the hyper-parameters
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k in accepted}
    hparams.update(_built_from_checkpoint(checkpoint))  # not from the starting weights' source
    hparams["teacher"] = None  # only training needs it
    module = ImageClassifier(**hparams)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
