"""Run by test_training_ddp.py as a real script: Lightning's DDP launcher re-executes it per rank.

Usage: python ddp_script.py OUT_DIR [CKPT_TO_RESUME | nan | time]
Trains a tiny ViT with strategy='ddp' on 2 CPU processes (gloo), then each rank writes its
final weights and one draw per step from its torch generator to OUT_DIR/rank<r>.pt; rank 0's
checkpoint is OUT_DIR/checkpoints/last.ckpt.
With ``nan``, rank 1's third training batch is NaN: each rank writes the error it stopped with and
its weights before and after that batch to OUT_DIR/nan_rank<r>.pt. With ``time``, an
``anneal_by_time`` run whose ranks' clocks disagree writes OUT_DIR/time_rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_training_module import QuadrantData, _LastLR, _module, _StepClock

import vitkit.training.module as module_code
from vitkit.training import AtomicCheckpointIO, NonFiniteLossError, PerRankRandomness, RNGStateCheckpoint
from vitkit.training.cli import _leave_process_group


def two_cpu_ranks(out: Path, **options) -> L.Trainer:
    """A Trainer for one epoch of DDP on 2 CPU processes, without logger, checkpoints or bars."""
    defaults = dict(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **options})


def nan_on_rank_one(out: Path) -> None:
    """Rank 1 alone gets a NaN batch (step 2): both ranks must skip it and stop together."""
    L.seed_everything(0)
    module = _module()  # fused AdamW: the deferred, sync-free check
    before = {}

    def training_step(batch, batch_idx):
        images, targets = batch
        if batch_idx == 2:
            before.update({k: v.detach().clone() for k, v in module.model.state_dict().items()})
            if module.global_rank == 1:
                images = torch.full_like(images, float("nan"))
        return type(module).training_step(module, (images, targets), batch_idx)

    module.training_step = training_step
    trainer = two_cpu_ranks(out)
    error = ""
    try:
        trainer.fit(module, datamodule=QuadrantData(n=256))
    except NonFiniteLossError as e:
        error = str(e)
    after = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    torch.save({"error": error, "before": before, "after": after}, out / f"nan_rank{trainer.global_rank}.pt")


def skewed_clocks(out: Path) -> None:
    """anneal_by_time with a 100 s limit, each batch taking 10 s, rank 1's clock 7 s ahead of rank 0's:
    the ranks must still use the same LRs (rank 0's clock), so their weights stay identical."""
    module_code._TIME_SYNC_EVERY = 1  # a 12-step run: read the (shared) clock at every step

    class Skewed(_StepClock):
        rank = 0

        def on_train_start(self, trainer, *args) -> None:
            super().on_train_start(trainer, *args)
            self.rank = trainer.global_rank

        def time_elapsed(self, stage: str = "train") -> float:
            return super().time_elapsed(stage) + 7.0 * self.rank

    L.seed_everything(0)
    module = _module(warmup_steps=2, min_lr=3e-5, anneal_by_time=True)
    last = _LastLR()
    trainer = two_cpu_ranks(out, max_epochs=2, callbacks=[Skewed("00:00:01:40"), last])
    trainer.fit(module, datamodule=QuadrantData(n=256))
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    result = {"weights": state, "step": last.step, "lr": last.lr}
    torch.save(result, out / f"time_rank{trainer.global_rank}.pt")


class _Draws(L.Callback):
    """One number per step from the rank's main-process torch generator (what device augmentation,
    Mixup and dropout draw from)."""

    def __init__(self) -> None:
        self.draws: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.draws.append(float(torch.rand(())))


def main() -> None:
    out = Path(sys.argv[1])
    resume = sys.argv[2] if len(sys.argv) > 2 else None
    L.seed_everything(0)
    module = _module()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2 if resume else 1,
        default_root_dir=out,
        logger=L.pytorch.loggers.CSVLogger(out, name="", version=""),
        callbacks=[
            RNGStateCheckpoint(),
            PerRankRandomness(),
            draws := _Draws(),
            L.pytorch.callbacks.ModelCheckpoint(save_last=True),
        ],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=QuadrantData(n=256), ckpt_path=resume)
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    torch.save(
        {"weights": state, "step": trainer.global_step, "world": trainer.world_size, "draws": draws.draws},
        out / f"rank{trainer.global_rank}{'_resumed' if resume else ''}.pt",
    )
    if trainer.global_rank == 0:
        val = float(trainer.callback_metrics["val/acc1"])
        (out / f"val_acc{'_resumed' if resume else ''}.txt").write_text(str(val))


if __name__ == "__main__":
    if sys.argv[2:] == ["nan"]:
        nan_on_rank_one(Path(sys.argv[1]))
    elif sys.argv[2:] == ["time"]:
        skewed_clocks(Path(sys.argv[1]))
    else:
        main()
    _leave_process_group()  # as `vitkit fit` does: exiting with Gloo's threads up can abort
