"""Does pretraining with vitkit help? Pretrain on half of CIFAR-10's classes, fine-tune on the other half.

The proof asked for by issue #3, run through the user-facing CLI only:

1. pretrain ``cifar10_vit_tiny_cpu`` on classes 0-4 (airplane, automobile, bird, cat, deer);
2. fine-tune its exported ``model.safetensors`` on classes 5-9 (dog, frog, horse, ship, truck) with
   ``--model.pretrained`` (the head knows other classes, so it is re-initialised);
3. train the same model from scratch on classes 5-9 with the same recipe and the same budget;

each for two amounts of fine-tuning data (all 5,000 images per class, and 500 per class).
The class splits are folders of symbolic links, so nothing is copied.

    python benchmarks/finetune_transfer.py --cifar ~/.cache/vitkit/cifar10 --out /tmp/vitkit_transfer

Prints a markdown table of test top-1 (the CIFAR-10 test images of the five classes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def link_split(cifar: Path, out: Path, classes: list[str], per_class: int | None) -> Path:
    """``out/{train,test}/<class>`` with symbolic links into the CIFAR-10 folder."""
    for split in ("train", "test"):
        for name in classes:
            target = out / split / name
            if target.exists():
                continue
            source = cifar / split / name
            if split == "test" or per_class is None:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source.resolve(), target_is_directory=True)
                continue
            target.mkdir(parents=True)
            for image in sorted(source.iterdir())[:per_class]:
                (target / image.name).symlink_to(image.resolve())
    return out


def fit(run: Path, root: Path, epochs: int, extra: list[str]) -> dict[str, float]:
    """One ``vitkit fit`` of the CPU recipe; returns its final validation summary and wall time."""
    summary = run / "summary_val.json"
    if not summary.exists():
        command = [
            sys.executable, "-m", "vitkit.cli", "fit", "--config", "cifar10_vit_tiny_cpu",
            "--data.root", str(root), "--trainer.max_epochs", str(epochs),
            "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false", *extra,
        ]  # fmt: skip
        print("$", " ".join(command), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        (run / "wall_s.txt").write_text(f"{time.perf_counter() - start:.0f}")
    result = json.loads(summary.read_text())
    result["wall_s"] = float((run / "wall_s.txt").read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", type=Path, default=Path.home() / ".cache/vitkit/cifar10")
    parser.add_argument("--out", type=Path, default=Path("/tmp/vitkit_transfer"))
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--low-data", type=int, default=500, help="images per class of the small setting")
    parser.add_argument("--low-data-epochs", type=int, default=6)
    args = parser.parse_args()
    if not (args.cifar / "train" / "dog").is_dir():
        sys.exit(f"{args.cifar} is not the CIFAR-10 folder (train/<class>/*.jpg); see shared/data/README.md")
    out = args.out
    first = link_split(args.cifar, out / "data" / "classes0-4", CLASSES[:5], None)
    pre = fit(out / "runs" / "pretrain", first, args.pretrain_epochs, [])
    weights = out / "runs" / "pretrain" / "model.safetensors"

    settings = [
        ("all 5,000 / class", None, args.finetune_epochs),
        (f"{args.low_data} / class", args.low_data, args.low_data_epochs),
    ]
    rows = []
    for label, per_class, epochs in settings:
        tag = per_class or "all"
        root = link_split(args.cifar, out / "data" / f"classes5-9_{tag}", CLASSES[5:], per_class)
        scratch = fit(out / "runs" / f"scratch_{tag}", root, epochs, [])
        tuned = fit(out / "runs" / f"finetune_{tag}", root, epochs, ["--model.pretrained", str(weights)])
        rows.append((label, epochs, scratch, tuned))

    acc, wall = pre["val/acc1"], pre["wall_s"]
    print(f"\nPretraining on classes 0-4, {args.pretrain_epochs} epochs: {acc:.1%} top-1 ({wall:.0f} s)\n")
    print("| fine-tuning data (classes 5-9) | epochs | from scratch | fine-tuned from classes 0-4 | gain |")
    print("|---|---:|---:|---:|---:|")
    for label, epochs, scratch, tuned in rows:
        s, t = scratch["val/acc1"], tuned["val/acc1"]
        print(f"| {label} | {epochs} | {s:.1%} | {t:.1%} | {100 * (t - s):+.1f} pt |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
