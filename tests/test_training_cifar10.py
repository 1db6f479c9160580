"""Real data: a tiny ViT trained on a CIFAR-10 subset through the CLI clearly beats chance.

The data come from ../shared/data/cifar10.tar.gz beside the repository (or an extracted copy at
$VITKIT_CIFAR10 or ~/.cache/vitkit/cifar10); without them the test is skipped.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

from vitkit.training.cli import cli_main

REPO = Path(__file__).resolve().parent.parent
TARBALL = REPO.parent / "shared" / "data" / "cifar10.tar.gz"
PER_CLASS = {"train": 200, "test": 50}


def _extracted() -> Path | None:
    for candidate in (os.environ.get("VITKIT_CIFAR10"), Path.home() / ".cache" / "vitkit" / "cifar10"):
        if candidate and (Path(candidate) / "train").is_dir():
            return Path(candidate)
    return None


def _subset(out: Path) -> Path:
    """Copy the first PER_CLASS images of each class and split into ``out``."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    source = _extracted()
    if source is not None:
        for split, n in PER_CLASS.items():
            for class_dir in sorted((source / split).iterdir()):
                target = out / split / class_dir.name
                target.mkdir(parents=True)
                for image in sorted(class_dir.iterdir())[:n]:
                    shutil.copy(image, target / image.name)
        return out
    if not TARBALL.is_file():
        pytest.skip(f"CIFAR-10 not found: neither {TARBALL} nor an extracted copy ($VITKIT_CIFAR10)")
    with tarfile.open(TARBALL) as archive:
        for member in archive:
            parts = Path(member.name).parts  # cifar10/<split>/<class>/<file>
            if not member.isfile() or len(parts) != 4 or parts[1] not in PER_CLASS:
                continue
            key = (parts[1], parts[2])
            if counts[key] < PER_CLASS[parts[1]]:
                counts[key] += 1
                target = out / parts[1] / parts[2] / parts[3]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
    return out


def test_tiny_vit_on_a_cifar10_subset_clearly_beats_chance(tmp_path):
    root = _subset(tmp_path / "cifar10")
    cli = cli_main(
        [
            "fit",
            "--config",
            "cifar10_vit_tiny_cpu",
            "--data.root",
            str(root),
            "--runs_dir",
            str(tmp_path),
            "--data.num_workers",
            "0",
            "--data.batch_size",
            "64",
            "--trainer.max_epochs",
            "8",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--model.model_options",
            '{"depth": 4, "class_token": false, "global_pool": "avg", "pos_embed": "sincos"}',
        ]
    )
    assert cli.datamodule.classes[:3] == ["airplane", "automobile", "bird"]
    accuracy = float(cli.trainer.callback_metrics["val/acc1"])
    assert accuracy > 0.3, f"validation accuracy {accuracy:.3f} on 10 classes (chance 0.1)"
