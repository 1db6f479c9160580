"""``vitkit fit | validate | test | predict``: LightningCLI with vitkit's defaults.

Every run lives in one folder, ``<runs_dir>/<run_name>/`` (default ``runs/<recipe name>``):

    config.yaml             the fully resolved configuration (re-run it with --config)
    metrics.csv             per-step and per-epoch metrics (CSVLogger; TensorBoard too if installed)
    checkpoints/best.ckpt   best validation top-1
    checkpoints/last.ckpt   latest state; also written on Ctrl-C / SIGTERM
    model.safetensors       the trained weights with their config, for inference and sharing
    plots/                  loss.png, accuracy.png, confusion_val.png, confusion_test.png

``--ckpt_path last`` resumes from ``checkpoints/last.ckpt`` of the same run folder. A fresh ``fit``
into a run folder that holds an earlier run's checkpoints first moves that run to
``<run_name>-<its last write time>/``, so every file of a run folder belongs to one run.
Recipes are YAML files: ``--config recipes/quickstart.yaml``, or by name, ``--config quickstart``.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from vitkit.bench import cpu_has_bf16_arithmetic
from vitkit.data import DecodeErrorMonitor

from .callbacks import (
    AtomicCheckpointIO,
    ImagesPerSecond,
    PerRankRandomness,
    PredictionWriter,
    RNGStateCheckpoint,
    RunArtifacts,
    run_dir,
)
from .module import ImageClassifier, _built_from_checkpoint
from .recipes import recipe_path


class SaveOnInterrupt(L.Callback):
    """On Ctrl-C, SIGTERM or any crash, write ``checkpoints/last.ckpt`` before the process exits."""

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        path = run_dir(trainer) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        print(f"\n{type(exception).__name__}: saved {path} (resume with --ckpt_path last)", file=sys.stderr)


class _LearningRateMonitor(LearningRateMonitor):
    """Lightning's LR monitor, idle without a logger (``--trainer.logger false``) instead of raising."""

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


def default_callbacks() -> list[L.Callback]:
    return [
        ModelCheckpoint(
            filename="best", monitor="val/acc1", mode="max", save_last=True, auto_insert_metric_name=False
        ),
        _LearningRateMonitor(logging_interval="step"),
        ImagesPerSecond(),
        RNGStateCheckpoint(),
        PerRankRandomness(),
        RunArtifacts(),
        SaveOnInterrupt(),
        PredictionWriter(),
        DecodeErrorMonitor(),  # corrupt images: warn, list them in the run folder, stop above the limit
    ]


class VitkitCLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` + any LightningDataModule.

    The data module defaults to :class:`~vitkit.data.ImageFolderDataModule` (recipes give its
    options under ``data:``); ``--data vitkit.data.StreamingDataModule`` (packed shards) or
    ``--data vitkit.data.TorchvisionDataModule`` choose another.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None, help="run folder name (default: recipe name)"
        )
        parser.add_argument("--runs_dir", type=str, default="runs", help="parent folder of all runs")
        parser.add_argument(
            "--keep_cpu_bf16",
            type=bool,
            default=False,
            help="keep a bf16 precision on a CPU without bf16 arithmetic (AVX512-BF16 or AMX), where it "
            "emulates bf16 at about a tenth of fp32's speed; by default such a run trains in fp32",
        )
        parser.set_defaults({"data": {"class_path": "vitkit.data.ImageFolderDataModule"}})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # cli_main always passes the command line (with recipe names resolved) as ``args``; Lightning
        # warns about "both args and command line arguments" on every `vitkit fit` otherwise.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        name = config.get("run_name") or _recipe_name(config) or "vitkit"
        root = Path(config.get("runs_dir") or "runs") / name
        trainer = config["trainer"]
        self._earlier_run: Path | None = None
        if trainer.get("default_root_dir") in (None, ""):
            trainer["default_root_dir"] = str(root)
            if self.subcommand == "fit" and not config.get("ckpt_path"):
                self._earlier_run = root  # set aside in before_fit, once the run's classes exist
        root = Path(trainer["default_root_dir"])
        if self.subcommand in ("validate", "test", "predict"):
            _model_from_the_checkpoint(config, root)
        if not config.get("keep_cpu_bf16"):
            _fp32_on_a_cpu_without_bf16(trainer)
        if trainer.get("logger") in (None, True):
            trainer["logger"] = _default_loggers(root, resuming=bool(config.get("ckpt_path")))

    def before_fit(self) -> None:
        # Here, not before instantiation: a data module, model or option that fails to build (a
        # mistyped --data.root) stops the command before an earlier run is moved out of the way.
        if self._earlier_run is not None:
            _set_aside_earlier_run(self._earlier_run)


class _SaveFitConfig(SaveConfigCallback):
    """Lightning's config writer, for ``fit`` only: ``config.yaml`` stays the training run's.

    Lightning writes the config of every command into the run folder; a ``vitkit test`` of the run
    would replace the training configuration by its own, ``ckpt_path`` included (re-running it with
    ``vitkit fit --config`` would then resume instead of train).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def _model_from_the_checkpoint(config: Any, root: Path) -> None:
    """Build the model of ``validate | test | predict --ckpt_path`` from the checkpoint itself.

    The module is built before Lightning restores the checkpoint, and what its constructor takes
    from the starting weights (``--model.pretrained``: a file that may have moved since, or a
    download) is the architecture of a hub model, the preprocessing the data module adopts in its
    ``setup`` (before the restore), and the norms' epsilon. vitkit's checkpoints record all three,
    so the model is built from the checkpoint instead, and the starting weights are not read.
    ``--ckpt_path best`` and ``last`` name ``checkpoints/best.ckpt`` and ``last.ckpt`` of the run
    folder (Lightning knows ``best`` only right after a ``fit`` in the same process).
    """
    ckpt_path, model = config.get("ckpt_path"), config.get("model")
    if not ckpt_path or model is None:
        return
    path = Path(ckpt_path)
    if ckpt_path in ("best", "last"):
        path = root / "checkpoints" / f"{ckpt_path}.ckpt"
        if not path.is_file():
            return  # Lightning's own lookup, and its message
        config["ckpt_path"] = str(path)
    if not path.is_file() or not _is_vitkit_checkpoint(path):
        return
    for key, value in _built_from_checkpoint(path).items():
        model[key] = value


def _is_vitkit_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a Lightning checkpoint an :class:`ImageClassifier` wrote (its ``vitkit`` entry)."""
    try:  # mmap: the weights are not read, only the pickled entries
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # not a zip-format torch file: Lightning reports what is wrong with it
        return False
    return isinstance(ckpt, dict) and isinstance(ckpt.get("vitkit"), dict) and "state_dict" in ckpt


def _runs_on_cpu(accelerator: Any) -> bool:
    if accelerator == "cpu":
        return True
    if accelerator in (None, "auto"):
        mps = getattr(torch.backends, "mps", None)
        return not torch.cuda.is_available() and not (mps is not None and mps.is_available())
    return False


def _fp32_on_a_cpu_without_bf16(trainer: Any) -> None:
    """Train in fp32 where a bf16 precision would be emulated: a recipe's fastest setting on one CPU
    must not make it ten times slower on another. ``--keep_cpu_bf16 true`` keeps bf16."""
    precision = str(trainer.get("precision") or "")
    if not precision.startswith("bf16") or not _runs_on_cpu(trainer.get("accelerator")):
        return
    if cpu_has_bf16_arithmetic():
        return
    trainer["precision"] = "32-true"
    print(
        f"vitkit: this CPU has no bf16 arithmetic (no AVX512-BF16 or AMX), where precision {precision} "
        "runs at about a tenth of fp32's speed: training in 32-true instead (to keep bf16, pass "
        "--keep_cpu_bf16 true).",
        file=sys.stderr,
    )


def _set_aside_earlier_run(root: Path) -> None:
    """Move a run folder holding checkpoints to ``<root>-<time of its last checkpoint>``.

    Without this a fresh run in the same folder writes ``best-v1.ckpt`` beside the earlier run's
    ``best.ckpt`` and its plots over the earlier ones: ``checkpoints/best.ckpt`` would name another
    run's model. Moving keeps everything. Only the first process of a run does it (DDP ranks re-run
    the command line).
    """
    if rank_zero_only.rank != 0:
        return
    last_write = max((p.stat().st_mtime for p in (root / "checkpoints").glob("*.ckpt")), default=None)
    if last_write is None:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(last_write))
    target, n = root.with_name(f"{root.name}-{stamp}"), 1
    while target.exists():
        target, n = root.with_name(f"{root.name}-{stamp}-{n}"), n + 1
    root.rename(target)
    print(
        f"vitkit: {root} held an earlier run; moved it to {target} (to continue a run instead, "
        "pass --ckpt_path last)",
        file=sys.stderr,
    )


def _recipe_name(config: Any) -> str | None:
    paths = config.get("config") or []
    if paths:
        return Path(str(paths[-1])).stem
    return None


def _default_loggers(root: Path, resuming: bool) -> list[dict[str, Any]]:
    loggers = [
        {
            "class_path": "vitkit.training.loggers.ResumableCSVLogger",
            "init_args": {"save_dir": str(root), "name": "", "version": "", "keep_existing": resuming},
        }
    ]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(
            {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root), "name": "", "version": "tensorboard"},
            }
        )
    return loggers


def _resolve_recipe_args(argv: list[str]) -> list[str]:
    """Let ``--config NAME`` (or ``--config=NAME``) name a shipped recipe."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = str(recipe_path(out[i + 1]))
        elif arg.startswith("--config="):
            out[i] = "--config=" + str(recipe_path(arg.split("=", 1)[1]))
    return out


def cli_main(argv: Sequence[str] | None = None, run: bool = True) -> VitkitCLI:
    """Run ``vitkit fit|validate|test|predict`` with ``argv`` (default: ``sys.argv[1:]``)."""
    args = _resolve_recipe_args(list(sys.argv[1:] if argv is None else argv))
    cli = VitkitCLI(
        ImageClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_callback=_SaveFitConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "callbacks": default_callbacks(),
            "plugins": lazy_instance(AtomicCheckpointIO),  # lazy: serialisable into config.yaml
            "max_epochs": 10,
        },
        parser_kwargs={"default_env": False},
    )
    if run:
        _leave_process_group()
    return cli


def _leave_process_group() -> None:
    """Destroy the DDP process group Lightning leaves up after a finished job: a process that exits
    with Gloo's threads still holding work can abort in interpreter teardown (SIGABRT, "terminate
    called without an active exception", exit status -6 after a successful run; pytorch #190489)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
