"""Input-pipeline throughput: vitkit's folder loader and tensor cache against torchvision's ImageFolder.

    python -m vitkit.data.bench --root ~/.cache/vitkit/cifar10 --workers 2

Measures training images per second over ``ROOT/train`` with the same augmentation everywhere
(RandomResizedCrop, horizontal flip, normalise) and the same DataLoader settings:

    folder       vitkit ImageFolderDataset (load_rgb decode) + v2 train transform, per image
    cache        vitkit uint8 tensor cache + BatchTrainTransform, per batch (build time reported apart)
    torchvision  torchvision.datasets.ImageFolder + the same v2 train transform, per image

The three run in turn, ``--rounds`` times, and the median of each is reported with its ratio
to torchvision. Nothing else is computed: this is the ceiling the input pipeline sets on a
training epoch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from .cache import BatchTrainTransform, CachedTensorDataset, build_tensor_cache
from .folder import ImageFolderDataset, scan_image_folder
from .transforms import build_train_transform


def _throughput(make_loader: Callable[[], DataLoader]) -> float:
    """Images per second for one full pass, worker start-up included."""
    start = time.perf_counter()
    count = 0
    for images, _ in make_loader():
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkit.data.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=Path("~/.cache/vitkit/cifar10"), help="has ROOT/train/<class>/"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for every method")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="passes per method, alternating")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images per pass (0: all)")
    args = parser.parse_args(argv)

    train = args.root.expanduser() / "train"
    classes, samples = scan_image_folder(train)
    n = len(samples) if args.limit <= 0 else min(args.limit, len(samples))
    torch.manual_seed(0)
    # An even spread over classes when limited (samples are sorted by class).
    indices = torch.linspace(0, len(samples) - 1, n).round().long().tolist() if n < len(samples) else None
    transform = build_train_transform(
        args.img_size, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear"
    )
    loader_options = {
        "batch_size": args.batch_size,
        "shuffle": True,
        "num_workers": args.workers,
        "drop_last": False,
        "persistent_workers": False,
        "pin_memory": False,
    }

    def subset(dataset):
        return dataset if indices is None else Subset(dataset, indices)

    folder_dataset = subset(ImageFolderDataset(samples, classes, transform))
    torchvision_dataset = ImageFolder(str(train), transform=transform)
    if torchvision_dataset.classes != classes or len(torchvision_dataset) != len(samples):
        print("warning: torchvision's ImageFolder sees other files than vitkit's scan", file=sys.stderr)
    torchvision_dataset = subset(torchvision_dataset)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{n} images from {train}, {args.img_size}px, batch {args.batch_size}, {args.workers} workers, "
        f"{cpus} CPUs, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    start = time.perf_counter()
    cache_samples = samples if indices is None else [samples[i] for i in indices]
    cache = build_tensor_cache(
        cache_samples, classes, args.img_size, interpolation="bilinear", num_workers=args.workers
    )
    build_seconds = time.perf_counter() - start
    print(
        f"tensor cache built in {build_seconds:.1f} s ({len(cache)} images, "
        f"{cache.images.numel() / 2**20:.0f} MiB, {len(cache) / build_seconds:.0f} images/s)"
    )
    batch_transform = BatchTrainTransform(args.img_size, mean=(0.5,) * 3, std=(0.5,) * 3)
    cached_dataset = CachedTensorDataset(cache)

    methods: dict[str, Callable[[], DataLoader]] = {
        "vitkit folder": lambda: DataLoader(folder_dataset, **loader_options),
        "vitkit cache": lambda: DataLoader(cached_dataset, collate_fn=batch_transform, **loader_options),
        "torchvision ImageFolder": lambda: DataLoader(torchvision_dataset, **loader_options),
    }
    results: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(args.rounds):
        for name, make_loader in methods.items():
            rate = _throughput(make_loader)
            results[name].append(rate)
            print(f"  round {round_ + 1}: {name:<24} {rate:9.0f} images/s", flush=True)

    reference = statistics.median(results["torchvision ImageFolder"])
    print(f"\n| method | images/s (median of {args.rounds}) | vs torchvision |")
    print("|---|---:|---:|")
    for name, rates in results.items():
        rate = statistics.median(rates)
        print(f"| {name} | {rate:.0f} | {rate / reference:.2f}x |")
    print(f"| (cache build, once) | {len(cache) / build_seconds:.0f} | {build_seconds:.1f} s |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
