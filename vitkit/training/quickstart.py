"""``vitkit quickstart``: the README's main job, on embedded data, no download.

Generates the synthetic shapes dataset (procedurally drawn, with object masks) on first use,
trains the ``quickstart`` recipe on it with the CPU, and prints the validation accuracy and
where the model, the checkpoints and the plots are.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path


def default_shapes_dir() -> Path:
    cache = Path(os.environ.get("VITKIT_CACHE", Path.home() / ".cache" / "vitkit"))
    return cache / "shapes"


def quickstart(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vitkit quickstart",
        description="Train a ViT on the embedded synthetic shapes dataset. Extra arguments go to "
        "`vitkit fit` (e.g. --trainer.max_epochs 2).",
    )
    parser.add_argument("--data-dir", type=Path, default=default_shapes_dir(), help="where the shapes live")
    args, fit_args = parser.parse_known_args(argv)

    from vitkit.data import make_shapes_dataset

    root = args.data_dir
    if not (root / "train").is_dir():
        print(f"Generating the synthetic shapes dataset in {root} ...")
        make_shapes_dataset(root, num_train=2000, num_val=500, img_size=32, seed=0)

    from .cli import cli_main

    cli = cli_main(["fit", "--config", "quickstart", "--data.root", str(root), *fit_args])
    trainer = cli.trainer
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    acc = float(trainer.callback_metrics.get("val/acc1", float("nan")))
    print(
        f"\nvalidation accuracy: {acc:.1%} ({len(cli.datamodule.classes)} classes, chance "
        f"{1 / len(cli.datamodule.classes):.0%})\n"
        f"run folder:  {folder}\n"
        f"weights:     {folder / 'model.safetensors'}\n"
        f"checkpoints: {folder / 'checkpoints'}\n"
        f"plots:       {folder / 'plots'}"
    )
    return 0
