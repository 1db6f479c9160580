"""``vitkit fit | validate | test | predict`` end to end: recipes, run folder, resume, signals."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import vitkit
from vitkit.data import make_shapes_dataset
from vitkit.training import load_classifier
from vitkit.training.cli import cli_main
from vitkit.training.recipes import RECIPES_DIR, list_recipes, recipe_path

FAST = [
    "--trainer.accelerator",
    "cpu",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--data.num_workers",
    "0",
    "--data.batch_size",
    "8",
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, num_train=60, num_val=20, img_size=32, seed=0)
    return root


def _fit(tmp_path: Path, shapes: Path, *extra: str):
    return cli_main(
        [
            "fit",
            "--config",
            "quickstart",
            "--data.root",
            str(shapes),
            "--runs_dir",
            str(tmp_path),
            *FAST,
            *extra,
        ]
    )


def test_every_shipped_recipe_parses_and_trains_two_steps(tmp_path, shapes):
    names = list_recipes()
    assert {
        "quickstart",
        "cifar10_vit_tiny_cpu",
        "cifar10_vit_small_gpu",
        "imagenet_deit_small",
        "imagenet_deit_small_distilled",
        "imagenet_deit_base",
        "imagenet_simple_vit_s16",
        "finetune",
    } <= set(names)
    weights = tmp_path / "pretrained.safetensors"
    vitkit.weights.save(vitkit.create_model("vit_base_patch16_224", depth=1), weights)
    teacher = tmp_path / "teacher.safetensors"  # a recipe's hub teacher, offline: one for these 5 classes
    vitkit.weights.save(vitkit.create_model("vit_tiny_patch16_224", depth=1, num_classes=5), teacher)
    for name in names:
        config = yaml.safe_load(recipe_path(name).read_text())
        options = {**config["model"].get("model_options", {}), "depth": 1}
        extra = ["--model.pretrained", str(weights)] if name == "finetune" else []
        if config["model"].get("teacher"):
            extra += ["--model.teacher", str(teacher)]
        cli = cli_main(
            [
                "fit",
                "--config",
                name,
                "--data.root",
                str(shapes),
                "--runs_dir",
                str(tmp_path),
                *FAST,
                "--model.model_options",
                json.dumps(options),
                "--data.batch_size",
                "4",
                "--trainer.max_steps",
                "2",
                "--trainer.limit_val_batches",
                "1",
                "--trainer.precision",
                "32-true",
                *extra,
            ]
        )
        assert cli.trainer.global_step == 2, name
        assert cli.model.num_classes == 5 and cli.model.classes == cli.datamodule.classes, name
        assert (tmp_path / name / "config.yaml").is_file(), name
        if config["model"].get("teacher"):  # the distilled student learns from the teacher
            assert cli.model.model.distilled_training and "train/loss_teacher" in cli.trainer.callback_metrics


def test_bad_input_prints_its_message_without_a_traceback(tmp_path, shapes, capsys, monkeypatch):
    from vitkit.cli.main import main

    monkeypatch.delenv("VITKIT_TRACEBACK", raising=False)
    assert main(["demo", "--model", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitkit demo: error: Unknown model 'no_such_model'") and "Traceback" not in err
    missing = tmp_path / "no_such_folder"
    earlier = tmp_path / "quickstart" / "checkpoints" / "last.ckpt"  # an earlier run of the recipe
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"weights")
    fit = ["fit", "--config", "quickstart", "--data.root", str(missing), "--runs_dir", str(tmp_path), *FAST]
    assert main(fit) == 2
    assert f"vitkit fit: error: Dataset folder {missing} does not exist" in capsys.readouterr().err
    assert earlier.read_bytes() == b"weights"  # a run that never started does not move it aside
    if not torch.cuda.is_available():  # a Trainer option Lightning rejects: its message, one line
        fit_gpu = [
            *fit[:4],
            str(shapes),
            "--runs_dir",
            str(tmp_path / "gpu"),
            *FAST,
            "--trainer.accelerator",
            "gpu",
        ]
        assert main(fit_gpu) == 2
        assert "vitkit fit: error: No supported gpu backend found" in capsys.readouterr().err
    monkeypatch.setenv("VITKIT_TRACEBACK", "1")  # where it came from, for a bug report
    with pytest.raises(ValueError, match="Unknown model"):
        main(["bench", "--model", "no_such_model"])


def test_recipe_names_resolve_and_unknown_names_list_the_choices():
    assert recipe_path("quickstart").resolve() == (RECIPES_DIR / "quickstart.yaml").resolve()
    with pytest.raises(FileNotFoundError, match="Available recipes: .*quickstart"):
        recipe_path("no_such_recipe")


def test_fit_writes_the_run_folder_and_resumes_from_last(tmp_path, shapes):
    cli = _fit(tmp_path, shapes, "--trainer.max_epochs", "1")
    run = tmp_path / "quickstart"
    for name in [
        "config.yaml",
        "metrics.csv",
        "model.safetensors",
        "summary_val.json",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "plots/loss.png",
        "plots/confusion_val.png",
    ]:
        assert (run / name).is_file(), name
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["class_path"] == "vitkit.data.ImageFolderDataModule"
    assert saved["data"]["init_args"]["root"] == str(shapes)
    assert saved["model"]["model_name"] == "vit_nano_patch4_32"
    steps = cli.trainer.global_step
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    # preprocessing follows the model's weights (vit_nano_patch4_32: CIFAR statistics), not ImageNet
    assert cli.datamodule.data_config.mean == tuple(cli.model.model.pretrained_cfg["mean"])
    assert cli.datamodule.data_config.mean != (0.485, 0.456, 0.406)

    resumed = _fit(tmp_path, shapes, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 2 * steps
    with open(run / "metrics.csv") as handle:  # the resumed run appended to the metrics, not replaced them
        epochs = [row["epoch"] for row in csv.DictReader(handle) if row.get("val/acc1")]
    assert epochs == ["0", "1"]

    # a CLI checkpoint (hyper-parameters include LightningCLI's own entries) loads for inference
    restored = load_classifier(run / "checkpoints" / "last.ckpt")
    assert restored.classes == resumed.datamodule.classes

    # the exported weights rebuild the model on their own
    model = vitkit.create_model(pretrained=run / "model.safetensors").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), resumed.model.model.eval()(x))


def test_a_fresh_fit_moves_the_earlier_run_of_its_folder_aside(tmp_path, shapes, capsys):
    _fit(tmp_path, shapes, "--trainer.max_epochs", "1")
    run = tmp_path / "quickstart"
    first = (run / "checkpoints" / "best.ckpt").read_bytes()
    _fit(tmp_path, shapes, "--trainer.max_epochs", "1", "--seed_everything", "1")  # a new run, same name
    # the folder holds the new run alone (no best-v1.ckpt beside an older best.ckpt) ...
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (run / "checkpoints" / "best.ckpt").read_bytes() != first
    assert yaml.safe_load((run / "config.yaml").read_text())["seed_everything"] == 1
    # ... and the earlier run is kept whole beside it
    (earlier,) = [p for p in tmp_path.iterdir() if p.name.startswith("quickstart-")]
    assert (earlier / "checkpoints" / "best.ckpt").read_bytes() == first
    assert (earlier / "config.yaml").is_file() and (earlier / "metrics.csv").is_file()
    assert f"moved it to {earlier}" in capsys.readouterr().err


def test_fit_without_a_logger_trains_and_the_lr_goes_to_the_logger_when_there_is_one(tmp_path, shapes):
    # Lightning's LearningRateMonitor raises without a logger; the CLI's stays idle instead
    cli = _fit(tmp_path / "quiet", shapes, "--trainer.max_epochs", "1", "--trainer.logger", "false")
    assert cli.trainer.global_step > 0 and not cli.trainer.loggers
    assert (tmp_path / "quiet" / "quickstart" / "checkpoints" / "last.ckpt").is_file()
    _fit(tmp_path / "logged", shapes, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1")
    header = (tmp_path / "logged" / "quickstart" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert any(key.startswith("lr-AdamW") for key in header)


def test_a_finished_job_leaves_the_process_group(tmp_path, shapes):
    # Lightning leaves DDP's process group up; exiting with Gloo's threads alive can abort the
    # process (SIGABRT) after a successful run, so cli_main destroys it once the job is done
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _fit(tmp_path, shapes, "--trainer.max_epochs", "1")
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_command_line_parses_without_lightnings_args_warning(tmp_path, shapes, monkeypatch, recwarn):
    argv = ["--config", "quickstart", "--data.root", str(shapes), "--runs_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["vitkit", *argv])  # as the `vitkit` command runs it
    cli = cli_main(None, run=False)
    assert cli.config.data.init_args.root == str(shapes)
    assert not [w for w in recwarn if "args parameter" in str(w.message)]


def test_validate_test_and_predict_from_a_checkpoint(tmp_path, shapes):
    _fit(tmp_path, shapes, "--trainer.max_epochs", "1")
    best = str(tmp_path / "quickstart" / "checkpoints" / "best.ckpt")
    common = ["--config", "quickstart", "--data.root", str(shapes), "--runs_dir", str(tmp_path), *FAST]
    test = cli_main(["test", *common, "--ckpt_path", best])
    assert 0.0 <= float(test.trainer.callback_metrics["test/acc1"]) <= 1.0
    assert (tmp_path / "quickstart" / "plots" / "confusion_test.png").is_file()

    folder = shapes / "val" / "ring"
    cli_main(["predict", *common, "--data.predict_root", str(folder), "--ckpt_path", best])
    with (tmp_path / "quickstart" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(list(folder.iterdir()))
    assert {r["prediction"] for r in rows} <= set(test.datamodule.classes)
    assert all(0.0 < float(r["probability"]) <= 1.0 for r in rows)


def test_commands_from_a_checkpoint_build_its_model_without_the_starting_weights(tmp_path, shapes):
    # a fine-tuning run's config names its starting weights; evaluating its checkpoint later must
    # not need them (moved, deleted, or a download away), and must preprocess as training did
    options = yaml.safe_load(recipe_path("quickstart").read_text())["model"].get("model_options", {})
    start_model = vitkit.create_model("vit_nano_patch4_32", **options, num_classes=5, norm_eps=1e-5)
    start_model.pretrained_cfg.update(mean=(0.25, 0.5, 0.75), std=(0.2, 0.3, 0.4))
    start = tmp_path / "start.safetensors"
    vitkit.weights.save(start_model, start)
    fit = _fit(tmp_path, shapes, "--trainer.max_epochs", "1", "--model.pretrained", str(start))
    assert tuple(fit.datamodule.data_config.mean) == (0.25, 0.5, 0.75)
    start.unlink()
    run = tmp_path / "quickstart"
    fit_config = (run / "config.yaml").read_text()
    common = ["--config", "quickstart", "--data.root", str(shapes), "--runs_dir", str(tmp_path), *FAST]
    test = cli_main(["test", *common, "--model.pretrained", str(start), "--ckpt_path", "best"])
    assert 0.0 <= float(test.trainer.callback_metrics["test/acc1"]) <= 1.0
    assert tuple(test.datamodule.data_config.mean) == (0.25, 0.5, 0.75)
    assert tuple(test.datamodule.data_config.std) == (0.2, 0.3, 0.4)
    assert {m.eps for m in test.model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    trained = load_classifier(run / "checkpoints" / "best.ckpt")
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(test.model.state_dict()[name], tensor, msg=name)
    # the run folder's config.yaml stays the training run's (re-running it trains, not resumes)
    assert (run / "config.yaml").read_text() == fit_config


@pytest.mark.parametrize("has_bf16", [False, True])
def test_a_bf16_recipe_trains_in_fp32_on_a_cpu_that_would_emulate_bf16(
    tmp_path, shapes, monkeypatch, capsys, has_bf16
):
    from vitkit.training import cli as cli_module

    monkeypatch.setattr(cli_module, "cpu_has_bf16_arithmetic", lambda: has_bf16)
    argv = ["--config", "cifar10_hybrid_cpu", "--data.root", str(shapes), "--runs_dir", str(tmp_path)]
    cli = cli_main([*argv, "--data.cache", "none"], run=False)
    assert cli.trainer.precision == ("bf16-mixed" if has_bf16 else "32-true")
    assert ("no bf16 arithmetic" in capsys.readouterr().err) is not has_bf16
    kept = cli_main([*argv, "--data.cache", "none", "--keep_cpu_bf16", "true"], run=False)
    assert kept.trainer.precision == "bf16-mixed"  # asked for: kept, however slow


def test_print_config_shows_the_resolved_recipe(tmp_path, shapes, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", "quickstart", "--data.root", str(shapes), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model_name"] == "vit_nano_patch4_32"
    assert printed["data"]["init_args"]["cache"] == "memory"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT (Ctrl-C)"])
def test_a_signal_saves_last_checkpoint_and_the_run_resumes(tmp_path, shapes, signum):
    command = [
        sys.executable,
        "-m",
        "vitkit.cli",
        "fit",
        "--config",
        "quickstart",
        "--data.root",
        str(shapes),
        "--runs_dir",
        str(tmp_path),
        "--trainer.max_epochs",
        "1000",
        *FAST,
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    metrics = tmp_path / "quickstart" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and "val/acc1" in metrics.read_text()):
        time.sleep(0.5)  # wait until training is under way (one epoch logged)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=60)
    last = tmp_path / "quickstart" / "checkpoints" / "last.ckpt"
    assert "saved" in output and last.is_file(), output[-2000:]
    state = torch.load(last, weights_only=True)
    assert state["global_step"] > 0
    assert not list(last.parent.glob(".*tmp*"))  # no half-written leftovers

    resumed = _fit(tmp_path, shapes, "--trainer.max_epochs", str(state["epoch"] + 2), "--ckpt_path", "last")
    assert resumed.trainer.global_step > state["global_step"]


def test_fit_streams_packed_shards_with_the_same_recipe(tmp_path, shapes):
    pytest.importorskip("litdata")
    from vitkit.data import pack_image_folder

    shards = tmp_path / "shards"
    pack_image_folder(shapes, shards, num_workers=0)
    cli = _fit(
        tmp_path,
        shapes,
        "--data",
        "vitkit.data.StreamingDataModule",
        "--data.root",
        str(shards),
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "1",
    )
    assert type(cli.datamodule).__name__ == "StreamingDataModule"
    assert cli.trainer.global_step == 2
    assert cli.model.classes == sorted(p.name for p in (shapes / "train").iterdir())
    saved = yaml.safe_load((tmp_path / "quickstart" / "config.yaml").read_text())
    assert saved["data"]["class_path"] == "vitkit.data.StreamingDataModule"


def test_fit_on_a_torchvision_dataset_by_name_names_the_classes(tmp_path, shapes, monkeypatch):
    rng = np.random.default_rng(0)

    class FakeCIFAR10:  # what torchvision.datasets.CIFAR10 holds, without the download
        def __init__(self, train: bool) -> None:
            n = 40 if train else 20
            self.data = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]
            self.classes = [f"class{i}" for i in range(10)]

    monkeypatch.setattr(
        "vitkit.data.torchvision_datasets.load_torchvision_dataset",
        lambda name, root, train, download: FakeCIFAR10(train),
    )
    cli = _fit(
        tmp_path,
        shapes,
        "--data",
        "vitkit.data.TorchvisionDataModule",
        "--data.name",
        "cifar10",
        "--trainer.max_epochs",
        "1",
    )
    assert cli.model.num_classes == 10 and cli.model.classes[3] == "class3"
    restored = load_classifier(tmp_path / "quickstart" / "checkpoints" / "last.ckpt")
    assert restored.classes == [f"class{i}" for i in range(10)]
