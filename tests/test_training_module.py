"""The LightningModule: loss, optimiser groups, schedule, NaN guard, resume, artifacts."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from types import SimpleNamespace
from typing import ClassVar

import lightning as L
import numpy as np
import pytest
import torch
from conftest import HostReads
from lightning.pytorch.callbacks import Timer
from torch.utils.data import DataLoader, TensorDataset

from vitkit.training import (
    EMA,
    AtomicCheckpointIO,
    ImageClassifier,
    ImagesPerSecond,
    NonFiniteLossError,
    PerRankRandomness,
    RNGStateCheckpoint,
    RunArtifacts,
    load_classifier,
    warmup_cosine,
)

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path_rate": 0.1}


class QuadrantData(L.LightningDataModule):
    """Class k = a bright square in quadrant k of a noisy 16x16 image."""

    classes: ClassVar[list[str]] = ["top_left", "top_right", "bottom_left", "bottom_right"]
    num_classes = 4
    batch_size = 16

    def __init__(self, n: int = 512, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, 16, 16, generator=g) * 0.1
        y = torch.arange(n) % 4
        for i, label in enumerate(y.tolist()):
            r, c = divmod(label, 2)
            x[i, :, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] += 1.0
        self.train_set = TensorDataset(x[: n * 3 // 4], y[: n * 3 // 4])
        self.val_set = TensorDataset(x[n * 3 // 4 :], y[n * 3 // 4 :])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=32)

    def test_dataloader(self):
        return self.val_dataloader()


def _module(**kwargs) -> ImageClassifier:
    return ImageClassifier(
        model_name="vit_tiny_patch4_32", model_options=TINY, classes=QuadrantData.classes, lr=3e-3, **kwargs
    )


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RNGStateCheckpoint()],
        plugins=[AtomicCheckpointIO()],
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def test_soft_target_loss_is_cross_entropy_with_the_mixed_labels():
    module = _module()
    logits = torch.randn(4, 4)
    hard = torch.tensor([0, 1, 2, 3])
    soft = torch.nn.functional.one_hot(hard, 4).float()
    torch.testing.assert_close(module.compute_loss(logits, soft), module.compute_loss(logits, hard))
    mixed = 0.7 * soft + 0.3 * soft.roll(1, 0)
    expected = 0.7 * torch.nn.functional.cross_entropy(
        logits, hard
    ) + 0.3 * torch.nn.functional.cross_entropy(logits, hard.roll(1, 0))
    torch.testing.assert_close(module.compute_loss(logits, mixed), expected)
    smoothed = _module(label_smoothing=0.1).compute_loss(logits, hard)
    assert not torch.allclose(smoothed, module.compute_loss(logits, hard))


def _optimizer(module: ImageClassifier, total_steps: int = 100):
    # configure_optimizers reads the schedule length and the batch size from the trainer
    module._trainer = SimpleNamespace(
        estimated_stepping_batches=total_steps,
        max_epochs=10,
        datamodule=None,
        world_size=1,
        accumulate_grad_batches=1,
    )
    return module.configure_optimizers()


def test_optimizer_decays_weight_matrices_only_and_scales_lr_by_layer():
    module = _module(layer_decay=0.5)
    config = _optimizer(module)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    by_name = {n: g for g in optimizer.param_groups for n in g["param_names"]}
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert set(by_name) == {n for n, p in module.model.named_parameters() if p.requires_grad}
    # peak LR 3e-3 x 0.5 ** (depth + 1 - layer), times the first warmup factor (1 / 11)
    warmup = scheduler.lr_lambdas[0](0)
    assert by_name["head.weight"]["lr"] == pytest.approx(3e-3 * warmup)
    assert by_name["blocks.1.mlp.fc1.weight"]["lr"] == pytest.approx(3e-3 * 0.5 * warmup)
    assert by_name["patch_embed.proj.weight"]["lr"] == pytest.approx(3e-3 * 0.125 * warmup)


def test_lr_scales_with_the_global_batch_size():
    module = _module(lr_batch_size=512)
    module._trainer = SimpleNamespace(
        datamodule=SimpleNamespace(batch_size=128), world_size=8, accumulate_grad_batches=2
    )
    assert module.effective_lr() == pytest.approx(3e-3 * 128 * 8 * 2 / 512)


def test_warmup_then_cosine_schedule():
    schedule = warmup_cosine(warmup=10, total=110, min_ratio=0.1)
    assert schedule(0) == pytest.approx(1 / 11)
    assert schedule(9) == pytest.approx(10 / 11)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(110) == pytest.approx(0.1)
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_a_time_budget_pulls_the_cosine_forward_but_never_back():
    schedule = warmup_cosine(warmup=10, total=110, min_ratio=0.1)
    for step in range(10):  # the warmup is by steps only; its end starts the cosine's clock (at 20 s)
        schedule.observe_time(step, elapsed=2.0 * (step + 1), budget=220.0)
        assert schedule(step) == pytest.approx((step + 1) / 11)
    assert (schedule.warmup_time, schedule(10)) == (20.0, pytest.approx(1.0))
    schedule.observe_time(30, elapsed=120.0, budget=220.0)  # half the post-warmup time, a fifth of the steps
    assert schedule(30) == pytest.approx(0.1 + 0.9 * 0.5)
    schedule.observe_time(90, elapsed=60.0, budget=220.0)  # 80% of the steps, a fifth of the time: steps lead
    assert schedule(90) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.8)))
    schedule.observe_time(40, elapsed=500.0, budget=220.0)  # past the budget: the floor, not beyond
    assert schedule(40) == pytest.approx(0.1)

    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), schedule)
    restored = warmup_cosine(warmup=10, total=110, min_ratio=0.1)
    torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), restored).load_state_dict(
        scheduler.state_dict()
    )
    assert (restored.time_progress, restored.warmup_time) == (1.0, 20.0)  # a resumed run keeps its clock


class _StepClock(Timer):
    """A deterministic Timer: each training batch takes 10 s (the clock reads 10 k s during batch k)."""

    def __init__(self, duration: str) -> None:
        super().__init__(duration=duration, interval="step", verbose=False)
        self.batches = 0

    def time_elapsed(self, stage: str = "train") -> float:
        return 10.0 * self.batches if stage == "train" else 0.0

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.batches += 1


class _LastLR(L.Callback):
    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        self.used = trainer.optimizers[0].param_groups[0]["lr"]  # the LR this batch trains with

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.step = trainer.global_step


@pytest.mark.parametrize("anneal_by_time", [True, False])
def test_a_time_limit_ends_training_at_the_lowest_lr_only_when_annealing_by_time(tmp_path, anneal_by_time):
    # 2 epochs of 24 steps, but 200 s of "time" at 10 s a step: Lightning stops after step 20.
    last = _LastLR()
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[_StepClock("00:00:03:20"), last])
    module = _module(warmup_steps=4, min_lr=3e-5, anneal_by_time=anneal_by_time)
    trainer.fit(module, datamodule=QuadrantData())
    assert last.step == 20
    if anneal_by_time:
        assert last.lr == pytest.approx(3e-5)  # the cosine ran its course in the time there was
        assert last.used < 3e-3 * 0.05  # and the last step trained near the floor
    else:
        assert last.used > 3e-3 * 0.5  # cut off a third of the way down the cosine


def test_anneal_by_time_without_a_time_limit_warns_and_follows_the_steps(tmp_path):
    last = _LastLR()
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[last])
    with pytest.warns(UserWarning, match="--trainer.max_time"):
        trainer.fit(_module(warmup_steps=4, min_lr=3e-5, anneal_by_time=True), datamodule=QuadrantData())
    assert (last.step, last.lr) == (24, pytest.approx(3e-5))


def test_linear_probe_then_unfreeze(tmp_path):
    module = _module(freeze="linear_probe", unfreeze_at_epoch=1)
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    with pytest.raises(ValueError, match="freeze='all'"):
        _module(freeze="all")
    frozen_before = module.model.blocks[0].attn.qkv.weight.detach().clone()
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=QuadrantData())
    torch.testing.assert_close(module.model.blocks[0].attn.qkv.weight, frozen_before)  # epoch 0: probe only
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(
        module, datamodule=QuadrantData(), ckpt_path=tmp_path / "checkpoints" / "epoch=0-step=24.ckpt"
    )
    assert all(p.requires_grad for p in module.model.parameters())
    assert not torch.allclose(module.model.blocks[0].attn.qkv.weight, frozen_before)  # epoch 1: everything


def test_pretrained_head_is_reset_only_when_it_knows_other_classes(tmp_path):
    from vitkit.weights import save

    source = _module().model
    path = tmp_path / "pretrained.safetensors"
    save(source, path, label_names=["cat", "dog", "frog", "ship"])
    same_count_other_classes = _module(pretrained=str(path))  # quadrants, not animals: a fresh head
    assert not torch.equal(same_count_other_classes.model.head.weight, source.head.weight)
    torch.testing.assert_close(
        same_count_other_classes.model.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight
    )
    assert "label_names" not in same_count_other_classes.model.pretrained_cfg
    kept = _module(pretrained=str(path), reset_head=False)
    torch.testing.assert_close(kept.model.head.weight, source.head.weight)

    save(source, path, label_names=QuadrantData.classes)  # the same classes: the head is worth keeping
    torch.testing.assert_close(_module(pretrained=str(path)).model.head.weight, source.head.weight)
    forced = _module(pretrained=str(path), reset_head=True)
    assert not torch.equal(forced.model.head.weight, source.head.weight)


def test_fit_learns_and_writes_run_artifacts(tmp_path):
    data = QuadrantData()
    module = _module()
    trainer = _trainer(tmp_path, max_epochs=4, callbacks=[RNGStateCheckpoint(), RunArtifacts()])
    trainer.fit(module, datamodule=data)
    assert trainer.callback_metrics["val/acc1"] > 0.6  # chance is 0.25
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
    assert (tmp_path / "plots" / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "plots" / "confusion_val.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary_val.json").read_text())
    assert summary["val/acc1"] == pytest.approx(float(trainer.callback_metrics["val/acc1"]))

    from vitkit.weights import read_checkpoint

    exported = read_checkpoint(tmp_path / "model.safetensors")
    assert exported.label_names == QuadrantData.classes
    torch.testing.assert_close(exported.state_dict["head.weight"], module.model.head.weight.detach())


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    data = QuadrantData()
    data.train_set.tensors[0][:] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 0 .*lr"):
        _trainer(tmp_path).fit(_module(), datamodule=data)


class _NaNBatch(QuadrantData):
    """QuadrantData in a fixed order, with NaN images in training batch ``bad`` (0-based)."""

    def __init__(self, bad: int, n: int = 128) -> None:
        super().__init__(n=n)
        self.train_set.tensors[0][bad * self.batch_size : (bad + 1) * self.batch_size] = float("nan")

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)


class _Snapshot(L.Callback):
    """The weights and optimiser step counts just before training batch ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.weights, self.steps = at, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            self.weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            state = trainer.optimizers[0].state
            self.steps = [float(s["step"]) for s in state.values()]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-deferred", "foreach-immediate"])
def test_a_nan_step_never_reaches_the_weights_and_is_reported_by_step(tmp_path, fused):
    # Fused AdamW: the NaN step is skipped on the device and reported at the next step (no host read
    # per step). Otherwise (foreach AdamW) the loss is checked at once. Either way the weights and the
    # optimiser state are those from before the bad batch, and the message names its step.
    snapshot = _Snapshot(at=2)
    trainer = _trainer(tmp_path, max_epochs=1, gradient_clip_val=1.0, callbacks=[snapshot])
    module = _module(fused_optimizer=fused)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2 \(epoch 0, batch 2, lr"):
        trainer.fit(module, datamodule=_NaNBatch(bad=2))
    optimizer = trainer.optimizers[0]
    assert bool(optimizer.defaults.get("fused")) is fused
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(value, snapshot.weights[name], rtol=0, atol=0, msg=name)
    assert [float(s["step"]) for s in optimizer.state.values()] == snapshot.steps
    assert not hasattr(optimizer, "found_inf")  # a later fit with this optimiser is not skipped


@pytest.mark.parametrize("bad", [2, 3], ids=["first-micro-batch", "second-micro-batch"])
def test_with_gradient_accumulation_a_nan_in_any_micro_batch_skips_the_whole_step(tmp_path, bad):
    # two batches per optimiser step: batches 2 and 3 make step 1. A NaN in either leaves the
    # weights and optimiser state as they were after step 0, and the message names the bad batch.
    snapshot = _Snapshot(at=2)
    trainer = _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, callbacks=[snapshot])
    module = _module()
    with pytest.raises(NonFiniteLossError, match=rf"loss is nan at step 1 \(epoch 0, batch {bad}, lr"):
        trainer.fit(module, datamodule=_NaNBatch(bad=bad))
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(value, snapshot.weights[name], rtol=0, atol=0, msg=name)
    assert (
        [float(s["step"]) for s in trainer.optimizers[0].state.values()]
        == snapshot.steps
        == [1.0] * len(snapshot.steps)
    )


def test_accumulated_steps_do_not_wait_for_their_own_results(tmp_path):
    counter = _CountReadsPerStep()
    trainer = _trainer(
        tmp_path, max_epochs=1, limit_val_batches=0, accumulate_grad_batches=2, callbacks=[counter]
    )
    module = _module()
    trainer.fit(module, datamodule=QuadrantData(n=256))
    assert counter.per_step[1:] == [0] * 10  # batch windows 2..11: micro-batches of 5 steps
    assert trainer.global_step == 6 and not hasattr(trainer.optimizers[0], "found_inf")


def test_a_nan_in_the_last_batch_of_the_run_is_reported(tmp_path):
    data = _NaNBatch(bad=5)  # 96 training images = 6 batches: the last one is bad
    with pytest.raises(NonFiniteLossError, match=r"at step 5 "):
        _trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(_module(), datamodule=data)


@pytest.mark.parametrize("deferred", [True, False])
def test_guard_stops_on_another_processs_bad_loss(deferred):
    # the flag combined over processes (here: a stand-in reduce saying another process's loss is
    # NaN) stops this process too, though its own loss is finite; the step is skipped when deferred
    from vitkit.training.guard import NonFiniteLossGuard

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    guard = NonFiniteLossGuard()
    loss = (weight**2).sum()
    loss.backward()

    def another_process_is_bad(flag):
        return torch.ones_like(flag)

    if not deferred:
        with pytest.raises(NonFiniteLossError, match="loss of another process at step 7"):
            guard.check(loss, "step 7", None, another_process_is_bad)
        return
    assert guard.check(loss, "step 7", optimizer, another_process_is_bad) is None
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.ones(3), rtol=0, atol=0)  # skipped
    with pytest.raises(NonFiniteLossError, match="loss of another process at step 7"):
        guard.check(loss, "step 8", optimizer, another_process_is_bad)
    assert not hasattr(optimizer, "found_inf")


class _CountReadsPerStep(L.Callback):
    """Host reads of this step's device values, from one batch's start to the next's (so that every
    hook of the step counts, Lightning's own conversion of the progress-bar values included)."""

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self.mode = HostReads()
        self.extra_roots = None  # a function returning more device tensors (e.g. an EMA copy's)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx > 0:
            self.per_step.append(self.mode.count)
        else:
            self.mode.__enter__()
        extra = self.extra_roots() if self.extra_roots is not None else []
        self.mode.start_window([*batch, *pl_module.parameters(), *pl_module.buffers(), *extra])

    def on_train_epoch_end(self, trainer, pl_module):
        self.mode.__exit__(None, None, None)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_training_steps_do_not_wait_for_their_own_results(tmp_path, fused):
    # vitkit's step reads none of its own results on the host (the NaN guard looks at the previous
    # step's loss, copied asynchronously; the progress bar gets host copies), gradient clipping
    # included. The immediate NaN check of a non-fused AdamW is one such read per step: it shows the
    # counter sees reads.
    counter = _CountReadsPerStep()
    trainer = _trainer(
        tmp_path,
        max_epochs=1,
        limit_val_batches=0,
        callbacks=[counter, ImagesPerSecond()],
        gradient_clip_val=1.0,
        enable_progress_bar=True,
    )
    trainer.fit(_module(fused_optimizer=fused), datamodule=QuadrantData(n=256))
    steps = counter.per_step[1:]  # windows 2..11 (the first also builds the optimizer state)
    assert len(steps) == 10
    assert steps == ([0] * 10 if fused else [1] * 10)
    assert {"loss", "lr", "img_per_s"} <= set(trainer.progress_bar_metrics)


def test_progress_bar_values_are_logged_on_a_clock_and_the_loss_every_step(tmp_path, monkeypatch):
    # Each self.log costs Python time on every step; the bar's values (loss, LR, images/s) follow a
    # clock instead. The training loss still reaches the logger at every step, and its epoch mean.
    from vitkit.training import ImagesPerSecond
    from vitkit.training._cadence import Every

    clock = iter(range(0, 10_000, 1))  # one "second" per call: due on every other call at 1.5 s
    monkeypatch.setattr("vitkit.training._cadence.time.monotonic", lambda: next(clock))
    every = Every(1.5)
    assert [every() for _ in range(6)] == [True, False, True, False, True, False]

    logged: list[str] = []
    module, speed = _module(), ImagesPerSecond()
    module._bar_due, speed._due = Every(3600.0), Every(3600.0)  # due once each, when there is a value
    original = module.log
    monkeypatch.setattr(module, "log", lambda name, *a, **k: (logged.append(name), original(name, *a, **k)))
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0, limit_train_batches=6, callbacks=[speed])
    trainer.fit(module, datamodule=QuadrantData(n=256))
    assert logged.count("train/loss") == 6
    assert logged.count("lr") == 1 and logged.count("img_per_s") == 1
    assert logged.count("loss") == 1  # from the second step: the first has no host copy of a loss yet
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert (
        "lr" not in header and "train/loss_epoch" in header
    )  # the LR goes to loggers via LearningRateMonitor


def test_a_metric_logged_to_the_progress_bar_from_the_device_is_read_every_step(tmp_path):
    # Why the bar gets host copies only: Lightning converts progress-bar values to Python numbers after
    # every batch. A module that puts its device loss on the bar waits for the device once per step.
    class LoudModule(ImageClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("loud_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
            return loss

    counter = _CountReadsPerStep()
    module = LoudModule(model_name="vit_tiny_patch4_32", model_options=TINY, classes=QuadrantData.classes)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[counter])
    trainer.fit(module, datamodule=QuadrantData(n=256))
    assert counter.per_step[1:] == [1] * 10


class StopAfterEpoch(L.Callback):
    """Simulates an interruption: the run (planned for more epochs) stops after ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path):
    def run(folder, callbacks=(), ckpt_path=None):
        L.seed_everything(0)
        module = _module()
        trainer = _trainer(folder, max_epochs=3, callbacks=[RNGStateCheckpoint(), *callbacks])
        trainer.fit(module, datamodule=QuadrantData(), ckpt_path=ckpt_path)
        return module, trainer

    straight, _ = run(tmp_path / "straight")
    _, interrupted = run(tmp_path / "resumed", callbacks=[StopAfterEpoch(0)])
    assert interrupted.current_epoch == 1
    checkpoint = tmp_path / "resumed" / "interrupted.ckpt"
    interrupted.save_checkpoint(checkpoint)
    resumed, trainer = run(tmp_path / "resumed", ckpt_path=checkpoint)
    assert trainer.current_epoch == 3
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("workers", [0, 1])
def test_resumed_run_on_the_folder_data_module_is_exact(tmp_path, workers):
    # vitkit's own loaders: the order of epoch e is seeded by (seed, e), not the e-th draw of a
    # generator that a resumed run would restart (it trained epoch 1 in epoch 0's order); with a
    # worker, the pass starts after Lightning's set_epoch although Lightning makes the iterator
    # (and a worker would draw its first indices) before it restores the epoch count
    from vitkit.data import ImageFolderDataModule, make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "data", num_train=48, num_val=8, img_size=16, seed=0)

    def run(folder, callbacks=(), ckpt_path=None):
        L.seed_everything(0)
        data = ImageFolderDataModule(
            root, batch_size=16, img_size=16, num_workers=workers, cache=True, re_prob=0.5
        )
        module = ImageClassifier(model_name="vit_tiny_patch4_32", model_options=TINY, num_classes=5, lr=3e-3)
        trainer = _trainer(folder, max_epochs=3, logger=False, callbacks=[RNGStateCheckpoint(), *callbacks])
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module, trainer

    straight, _ = run(tmp_path / "straight")
    _, interrupted = run(tmp_path / "resumed", callbacks=[StopAfterEpoch(0)])
    interrupted.save_checkpoint(tmp_path / "interrupted.ckpt")
    resumed, _ = run(tmp_path / "resumed", ckpt_path=tmp_path / "interrupted.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_without_rng_state_the_resumed_run_differs(tmp_path):
    # the RNG callback is what makes resume exact: dropout/drop-path and shuffling draw from it
    def run(folder, callbacks, ckpt_path=None):
        L.seed_everything(0)
        module = _module()
        trainer = _trainer(folder, max_epochs=2, callbacks=list(callbacks))
        trainer.fit(module, datamodule=QuadrantData(), ckpt_path=ckpt_path)
        return module

    straight = run(tmp_path / "a", [])
    L.seed_everything(0)
    first = _trainer(tmp_path / "b", max_epochs=2, callbacks=[StopAfterEpoch(0)])
    first.fit(_module(), datamodule=QuadrantData())
    first.save_checkpoint(tmp_path / "b.ckpt")
    resumed = run(tmp_path / "b", [], ckpt_path=tmp_path / "b.ckpt")
    assert not torch.allclose(straight.model.cls_token, resumed.model.cls_token)


def test_per_rank_randomness_splits_ranks_after_the_first_deterministically():
    def draws_after_train_start(world_size, rank):
        L.seed_everything(0)  # every rank starts from the same generators, as under DDP
        trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
        PerRankRandomness().on_train_start(trainer, None)
        return torch.rand(4).tolist(), random.random(), np.random.rand()

    single = draws_after_train_start(1, 0)
    assert draws_after_train_start(2, 0) == single  # rank 0 draws what a one-process run would
    rank1, rank2 = draws_after_train_start(4, 1), draws_after_train_start(4, 2)
    for a, b, c in zip(single, rank1, rank2, strict=True):  # torch, Python and NumPy
        assert a != b and a != c and b != c
    assert draws_after_train_start(4, 1) == rank1  # a function of the shared state and the rank


def test_checkpoints_store_each_weight_once():
    keys = list(_module().state_dict())
    assert sum(k.startswith("model.") for k in keys) == len(list(_module().model.state_dict()))
    assert all(k.startswith(("model.", "val_", "test_")) for k in keys)


def test_load_classifier_restores_classes_and_predictions(tmp_path):
    module = _module()
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=QuadrantData())
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    restored = load_classifier(path)
    assert restored.classes == QuadrantData.classes
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(restored(x), module.eval()(x))


def test_lightnings_load_from_checkpoint_does_not_need_the_starting_weights_again(tmp_path):
    # the run started from a weights file that is gone since: the checkpoint holds what was trained
    from vitkit.models import create_model
    from vitkit.weights import save

    # weights whose preprocessing and epsilon are not the registered model's: the checkpoint keeps them
    start_model = create_model("vit_tiny_patch4_32", **TINY, num_classes=4, norm_eps=1e-12)
    start_model.pretrained_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    start = save(start_model, tmp_path / "start.safetensors")
    module = _module(pretrained=str(start))
    assert module.model.config["norm_eps"] == 1e-12
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, datamodule=QuadrantData(n=64))
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    start.unlink()
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "final.ckpt")
    assert restored.hparams.pretrained is None and restored.classes == QuadrantData.classes
    assert restored.model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
    assert restored.model.config["norm_eps"] == restored.model.blocks[0].norm1.eps == 1e-12
    assert load_classifier(tmp_path / "final.ckpt").model.pretrained_cfg["std"] == (0.4, 0.5, 0.6)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(restored.eval()(x), module.eval()(x))
    with pytest.raises(FileNotFoundError, match="start.safetensors"):  # asked for, it is read
        ImageClassifier.load_from_checkpoint(tmp_path / "final.ckpt", pretrained=str(start))


def test_load_classifier_rebuilds_a_model_whose_architecture_came_from_its_starting_weights(tmp_path):
    # model_name=None: the architecture was read off the starting weights (a hub repo, a folder),
    # which load_classifier must not need again
    from vitkit.models import create_model
    from vitkit.weights import save

    start = save(create_model("vit_tiny_patch4_32", **TINY, num_classes=4), tmp_path / "start.safetensors")
    module = ImageClassifier(model_name=None, pretrained=str(start), classes=QuadrantData.classes)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, datamodule=QuadrantData(n=64))
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    start.unlink()
    restored = load_classifier(tmp_path / "final.ckpt")
    assert restored.model.config["embed_dim"] == TINY["embed_dim"]
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(restored(x), module.eval()(x))


def test_atomic_checkpoint_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_ema_weights_are_validated_and_kept(tmp_path):
    class RecordValidationWeights(L.Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            self.seen = pl_module.model.head.weight.detach().clone()

    L.seed_everything(0)
    ema, record = EMA(decay=0.9), RecordValidationWeights()
    module = _module()
    _trainer(tmp_path, max_epochs=1, callbacks=[ema, record], num_sanity_val_steps=0).fit(
        module, datamodule=QuadrantData()
    )
    averaged = ema._average_model.module.model.head.weight
    torch.testing.assert_close(record.seen, averaged)  # validation ran on the EMA weights
    torch.testing.assert_close(module.model.head.weight, averaged)  # and they are the final weights

    L.seed_everything(0)
    plain = _module()
    _trainer(tmp_path / "plain", max_epochs=1).fit(plain, datamodule=QuadrantData())
    assert not torch.allclose(plain.model.head.weight, averaged)


def test_vitkit_ema_averages_like_lightnings_without_reading_the_device(tmp_path):
    # Same average as Lightning's EMAWeightAveraging (through a resume, with a delayed start), and no
    # host read of device values per step, where PyTorch's AveragedModel makes two.
    from lightning.pytorch.callbacks import EMAWeightAveraging

    results = {}
    for name, make in [("lightning", EMAWeightAveraging), ("vitkit", EMA)]:
        counter = _CountReadsPerStep()
        ema = make(decay=0.8, update_starting_at_step=3)
        counter.extra_roots = lambda ema=ema: [
            *ema._average_model.parameters(),
            *ema._average_model.buffers(),
        ]
        L.seed_everything(0)
        trainer = _trainer(tmp_path / name, max_epochs=1, callbacks=[ema, counter], limit_val_batches=0)
        trainer.fit(_module(), datamodule=QuadrantData(n=256))
        ckpt = tmp_path / name / "epoch1.ckpt"
        trainer.save_checkpoint(ckpt)
        resumed = make(decay=0.8, update_starting_at_step=3)
        _trainer(tmp_path / name, max_epochs=2, callbacks=[resumed], limit_val_batches=0).fit(
            _module(), datamodule=QuadrantData(n=256), ckpt_path=ckpt
        )
        results[name] = (resumed._average_model, counter.per_step[4:])  # reads once the average runs
    (lightning, lightning_reads), (vitkit, vitkit_reads) = results["lightning"], results["vitkit"]
    assert int(vitkit.n_averaged) == int(lightning.n_averaged) == 2 * 12 - 3
    for (name, a), b in zip(lightning.module.named_parameters(), vitkit.module.parameters(), strict=True):
        torch.testing.assert_close(b, a, msg=name)
    assert vitkit_reads == [0] * len(vitkit_reads) and len(vitkit_reads) == 7
    assert min(lightning_reads) >= 2


def test_ema_warmup_grows_the_window_with_the_number_of_updates(tmp_path):
    # warmup=True: the k-th update (k earlier ones) uses min(decay, 1 - (1 + k)^-0.75), so a short
    # run's average is not mostly the initial weights, as it is with a fixed 0.999
    class RecordWeights(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(pl_module.model.head.weight.detach().clone())

    L.seed_everything(0)
    ema, record = EMA(decay=0.999, warmup=True), RecordWeights()
    module = _module()
    initial = module.model.head.weight.detach().clone()
    _trainer(tmp_path, max_epochs=1, callbacks=[record, ema], limit_val_batches=0).fit(
        module, datamodule=QuadrantData(n=256)
    )
    expected = record.seen[0]
    for k, weights in enumerate(record.seen[1:], start=1):
        expected = torch.lerp(expected, weights, 1 - min(0.999, 1 - (1 + k) ** -0.75))
    averaged = ema._average_model.module.model.head.weight
    torch.testing.assert_close(averaged, expected)
    assert ema.decay_at(1) == pytest.approx(1 - 2**-0.75) and ema.decay_at(10**6) == 0.999
    # the average has moved most of the way from the initial weights to the trained ones
    moved = (averaged - initial).norm() / (record.seen[-1] - initial).norm()
    assert moved > 0.5
    fixed = EMA(decay=0.999)
    assert fixed.decay_at(1) == 0.999


def test_ema_in_a_second_fit_of_the_same_trainer_averages_like_lightnings(tmp_path):
    # Lightning builds a new average at each fit's setup; the tensor lists vitkit's EMA keeps for a
    # fit must follow it (stale lists would update the first fit's discarded copy)
    from lightning.pytorch.callbacks import EMAWeightAveraging

    averages = []
    for make in (EMAWeightAveraging, EMA):
        L.seed_everything(0)
        ema, module = make(decay=0.8), _module()
        trainer = _trainer(tmp_path, max_epochs=1, callbacks=[ema], limit_val_batches=0)
        trainer.fit(module, datamodule=QuadrantData(n=128))
        trainer.fit_loop.max_epochs = 2
        trainer.fit(module, datamodule=QuadrantData(n=128))
        averages.append(ema._average_model.module)
    lightning, vitkit = averages
    assert not torch.equal(lightning.model.head.weight, module.model.head.weight)
    for (name, a), b in zip(lightning.named_parameters(), vitkit.parameters(), strict=True):
        torch.testing.assert_close(b, a, msg=name)


def test_model_summary_counts_the_forward_flops_of_one_image():
    from lightning.pytorch.utilities.model_summary import ModelSummary

    from vitkit.bench.speed import count_flops

    module = _module()
    model = module.model.eval()
    image = [1, 3, *model.patch_embed.img_size]
    with torch.no_grad():
        expected = count_flops(lambda: model(torch.zeros(image)))
    summary = ModelSummary(module)
    assert summary.total_flops == expected > 0
    assert summary.in_sizes[0] == image  # the first layer (the model) sees one image
    assert _module(compile=True).example_input_array is None  # no extra compilation for the summary


def test_bf16_mixed_precision_trains(tmp_path):
    module = _module()
    trainer = _trainer(tmp_path, max_epochs=2, precision="bf16-mixed")
    trainer.fit(module, datamodule=QuadrantData())
    assert module.model.head.weight.dtype == torch.float32  # master weights stay fp32
    assert trainer.callback_metrics["val/acc1"] > 0.4


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_keeps_fused_adamw_under_bf16(tmp_path, algorithm):
    # Lightning refuses gradient_clip_val with a fused optimiser under any mixed precision; vitkit
    # clips itself when there is no fp16 loss scaler, so the fused kernel (and the NaN guard's
    # sync-free path) stays on. The gradients the optimiser sees are clipped.
    clip = 1e-3
    module = _module()
    seen = []
    original = torch.optim.AdamW.step

    def spy(self, closure=None):  # the gradients AdamW steps with (Lightning clips inside the closure)
        loss = closure() if closure is not None else None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(
            (
                torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])),
                max(g.abs().max() for g in grads),
            )
        )
        original(self)
        return loss

    trainer = _trainer(
        tmp_path,
        max_steps=3,
        limit_val_batches=0,
        precision="bf16-mixed",
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
    )
    before = module.model.head.weight.detach().clone()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", spy)
        trainer.fit(module, datamodule=QuadrantData())
    assert trainer.optimizers[0].defaults["fused"]
    assert len(seen) == 3
    for norm, largest in seen:
        assert (norm if algorithm == "norm" else largest) <= clip * 1.001
    # AdamW steps do not depend on the gradient scale: clipped to a tiny norm, the weights still move
    weight = module.model.head.weight
    assert torch.isfinite(weight).all() and not torch.equal(weight, before)


def test_compile_without_a_cxx_compiler_on_cpu_runs_eagerly_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    module = _module(compile=True)
    assert module.__dict__["_compiled_model"] is not None
    with pytest.warns(UserWarning, match="needs a C\\+\\+ compiler"):
        _trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, datamodule=QuadrantData())
    assert module.__dict__["_compiled_model"] is None and module.trainer.global_step == 2


def test_compile_blocks_option_compiles_each_block_of_the_same_model():
    module = _module(compile="blocks")
    view = module.__dict__["_compiled_model"]
    assert all(b._orig_mod is a for a, b in zip(module.model.blocks, view.blocks, strict=True))
    assert view.head is module.model.head
    assert set(module.state_dict()) == set(_module().state_dict())  # the weights stored once, same keys
    twin = copy.deepcopy(module)  # as Lightning's weight averaging (EMA) copies the module
    twin_view = twin.__dict__["_compiled_model"]
    assert twin_view.blocks[0]._orig_mod is twin.model.blocks[0] and twin_view.head is twin.model.head
    with pytest.raises(ValueError, match="compile='fast'"):
        _module(compile="fast")


def test_compile_mode_reaches_torch_compile_for_the_model_and_for_each_block(monkeypatch):
    modes = []

    def recording_compile(module, mode=None, **kwargs):
        modes.append((type(module).__name__, mode))
        return module

    monkeypatch.setattr(torch, "compile", recording_compile)
    _module(compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert modes == [("VisionTransformer", "max-autotune-no-cudagraphs")]
    modes.clear()
    _module(compile="blocks", compile_mode="reduce-overhead")
    assert modes == [("TransformerBlock", "reduce-overhead")] * TINY["depth"]
    modes.clear()
    _module(compile=True)
    assert modes == [("VisionTransformer", None)]


@pytest.mark.slow
@pytest.mark.parametrize("compile", [True, "blocks"])
def test_torch_compile_option_trains_the_same_model(tmp_path, compile):
    # slow: inductor compiles C++ kernels on the first step
    module = _module(compile=compile)
    assert module.__dict__["_compiled_model"] is not None
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    before = module.model.head.weight.detach().clone()
    trainer.fit(module, datamodule=QuadrantData())
    assert trainer.global_step == 3
    assert not torch.equal(module.model.head.weight, before)  # the compiled graph updated the real weights
    assert all(k.startswith(("model.", "val_", "test_")) for k in module.state_dict())  # weights stored once


def test_flip_tta_evaluates_the_mean_logits_of_each_image_and_its_mirror(tmp_path):
    torch.manual_seed(0)
    module, data = _module(tta="hflip"), QuadrantData(n=256)
    _trainer(tmp_path, max_epochs=3).fit(module, datamodule=data)  # learns which quadrant is bright
    module.eval()
    images, labels = data.val_set.tensors
    with torch.no_grad():
        plain = module(images)
        mean = (plain + module(images.flip(-1))) / 2
    # the mirror image moves the square to the other side: averaging changes predictions here
    assert (mean.argmax(-1) != plain.argmax(-1)).any()
    (metrics,) = _trainer(tmp_path).validate(module, datamodule=data, verbose=False)
    assert metrics["val/acc1"] == pytest.approx((mean.argmax(-1) == labels).float().mean().item(), abs=1e-6)
    out = module.predict_step((images[:4], labels[:4]), 0)
    torch.testing.assert_close(out["probs"], mean[:4].softmax(-1))
    with pytest.raises(ValueError, match="tta='vflip' is not one of"):
        _module(tta="vflip")
