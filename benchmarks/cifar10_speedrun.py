"""CIFAR-10 time-to-accuracy: train a vitkit ViT from scratch and record when test accuracy
first reaches a target, in wall-clock seconds from the start of ``fit`` (decoding the JPEGs into
the uint8 cache and ``torch.compile`` included: what a user waits for).

It is the GPU recipe (``recipes/cifar10_vit_small_gpu.yaml``) with the epoch budget, EMA decay and
model as options, run through the public API (``ImageClassifier`` + ``ImageFolderDataModule`` +
a Lightning ``Trainer``), validating on the 10,000 test images after every epoch.

    python benchmarks/cifar10_speedrun.py --root ~/.cache/vitkit/cifar10 --epochs 60      # one GPU
    python benchmarks/cifar10_speedrun.py --root ~/.cache/vitkit/cifar10 --epochs 1 \\
        --accelerator cpu --precision 32-true --limit-train-batches 5                     # smoke test

Prints one line per epoch (wall s, val top-1, EMA or not) and, at the end, the first epoch and
second at which ``--target`` was reached; writes the same as JSON with ``--json``. With
``--max-minutes`` the run is a fixed-time try: up to ``--epochs`` epochs, the cosine ending when the
time does (``anneal_by_time``); ``--stop-at-target`` ends it at the first epoch at ``--target``.

    python benchmarks/cifar10_speedrun.py --root ~/.cache/vitkit/cifar10 --epochs 200 \
        --max-minutes 5 --stop-at-target                                                 # 5 minutes at most
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

from vitkit.data import ImageFolderDataModule
from vitkit.data.torchvision_datasets import CIFAR_MEAN_STD
from vitkit.training import EMA, ImageClassifier


class _Timeline(L.Callback):
    """Wall seconds since ``fit`` began and validation top-1 at the end of every validation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.train_images = 0
        self.train_seconds = 0.0
        self._epoch_start = 0.0
        self._epoch_images = 0
        self._validation_start = 0.0
        self._validation_seconds = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_images = 0
        self._validation_seconds = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._epoch_images += int(args[1][0].shape[0])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:  # epoch 0 holds the compilation and the cache build
            # data waits included; the validation that Lightning runs inside the epoch excluded
            self.train_seconds += time.perf_counter() - self._epoch_start - self._validation_seconds
            self.train_images += self._epoch_images

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_seconds += time.perf_counter() - self._validation_start
        if trainer.sanity_checking:
            return
        acc = trainer.callback_metrics.get("val/acc1")
        row = {
            "epoch": trainer.current_epoch + 1,
            "seconds": round(time.perf_counter() - self.start, 1),
            "val_acc1": float(acc) if acc is not None else float("nan"),
        }
        self.rows.append(row)
        print(f"epoch {row['epoch']:3d} {row['seconds']:7.1f} s  val top-1 {row['val_acc1']:.4f}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="CIFAR-10 as train/ and test/ folders")
    parser.add_argument("--model", default="vit_small_patch4_32")
    parser.add_argument("--options", default='{"drop_path_rate": 0.1}', help="model options as JSON")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak LR for a batch of 512")
    parser.add_argument("--warmup-epochs", type=float, default=5)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1")
    parser.add_argument("--mixup", type=float, default=0.8)
    parser.add_argument("--cutmix", type=float, default=1.0)
    parser.add_argument("--re-prob", type=float, default=0.25)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping; 0: off")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay per step; 0: off")
    parser.add_argument(
        "--ema-warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="grow the EMA window with the step count (vitkit.training.EMA(warmup=True))",
    )
    parser.add_argument(
        "--tta",
        default="none",
        choices=["none", "hflip"],
        help="test-time augmentation of the validation (ImageClassifier(tta=...)): 'hflip' averages the "
        "logits of each image and its mirror image, as CIFAR-10 speed records report",
    )
    parser.add_argument("--target", type=float, default=0.94)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--compile-scope",
        default="blocks",
        choices=["model", "blocks"],
        help="with --compile: the whole model, or each Transformer block (ImageClassifier(compile="
        "'blocks'): compiled once for all blocks, so training starts sooner)",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile's mode (ImageClassifier(compile_mode=...)), e.g. reduce-overhead: CUDA graphs, "
        "for a step short enough that launching its kernels shows",
    )
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument(
        "--augment-on",
        default="workers",
        choices=["workers", "device"],
        help="augment the cached batches per image in the loader workers, or on the GPU (batched ops; "
        "for a machine short of CPU cores: on the 16-core H200 of BENCHMARKS.md the workers were faster)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this wall time (Lightning's max_time: training and validation)",
    )
    parser.add_argument(
        "--anneal-by-time",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --max-minutes, end the cosine when the time ends rather than after --epochs "
        "(ImageClassifier(anneal_by_time=True)); default: on when --max-minutes is given",
    )
    parser.add_argument(
        "--stop-at-target",
        action="store_true",
        help="stop as soon as the test accuracy reaches --target (Lightning's EarlyStopping threshold)",
    )
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None, help="write the timeline here")
    args = parser.parse_args(argv)
    if args.anneal_by_time is None:
        args.anneal_by_time = args.max_minutes is not None

    timeline = _Timeline()
    L.seed_everything(0, workers=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    data = ImageFolderDataModule(
        args.root,
        batch_size=args.batch_size,
        img_size=32,
        num_workers=args.workers,
        cache="memory",
        augment_on=args.augment_on,
        scale=(0.35, 1.0),
        auto_augment=args.auto_augment or None,
        re_prob=args.re_prob,
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        crop_pct=1.0,
        mean=CIFAR_MEAN_STD["cifar10"][0],
        std=CIFAR_MEAN_STD["cifar10"][1],
        drop_last=True,
    )
    module = ImageClassifier(
        model_name=args.model,
        model_options=json.loads(args.options),
        num_classes=data.num_classes,  # 10 for CIFAR-10; any other folder works too
        lr=args.lr,
        lr_batch_size=512,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        compile=args.compile_scope if args.compile else False,
        compile_mode=args.compile_mode,
        anneal_by_time=args.anneal_by_time,
        tta=args.tta,
    )
    callbacks: list[L.Callback] = [timeline]
    if args.ema > 0:
        callbacks.append(EMA(decay=args.ema, warmup=args.ema_warmup))
    if args.stop_at_target:
        # patience never runs out: only the threshold stops the run
        callbacks.append(
            EarlyStopping("val/acc1", mode="max", stopping_threshold=args.target, patience=args.epochs + 1)
        )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=args.epochs,
        gradient_clip_val=args.clip or None,
        max_time={"minutes": args.max_minutes} if args.max_minutes else None,
        limit_train_batches=args.limit_train_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data)

    reached = next((row for row in timeline.rows if row["val_acc1"] >= args.target), None)
    best = max(timeline.rows, key=lambda row: row["val_acc1"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()}"
    summary = {
        "device": device,
        "settings": vars(args) | {"root": str(args.root), "json": str(args.json)},
        "timeline": timeline.rows,
        "best": best,
        "target": args.target,
        "reached": reached,
        "final_lr": trainer.optimizers[0].param_groups[0]["lr"],  # the floor when the cosine ran its course
        "train_images_per_s_after_epoch_1": (
            timeline.train_images / timeline.train_seconds if timeline.train_seconds else None
        ),
    }
    print(
        f"{args.model} {args.options}, {args.epochs} epochs, batch {args.batch_size}, {device}: "
        f"best {best['val_acc1']:.4f} at epoch {best['epoch']} ({best['seconds']} s); "
        + (
            f"{args.target:.0%} first at epoch {reached['epoch']}, {reached['seconds']} s"
            if reached
            else f"{args.target:.0%} not reached"
        )
    )
    if rate := summary["train_images_per_s_after_epoch_1"]:
        print(f"training throughput after epoch 1: {rate:.0f} images/s")
    print(f"last LR {summary['final_lr']:.2e} after {trainer.global_step} steps")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
