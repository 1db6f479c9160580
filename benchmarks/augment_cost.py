"""How many training images per second one CPU core can augment from the uint8 tensor cache.

The cache's ``collate_fn`` (``BatchTrainTransform``) crops, flips and normalises a whole batch in
tensor form; an auto-augment policy runs per image (torchvision / timm ops, ``augment_on="workers"``)
or, with ``batched=True`` (what ``augment_on="device"`` runs on the GPU), as batched tensor ops.
This times one batch of CIFAR-sized uint8 images on one thread (as in a DataLoader worker) for
each policy and path, in alternating rounds, to tell whether the loader workers can keep up with
a GPU; and, for scale, the per-batch re-seeding that makes the augmentations reproducible:

    python benchmarks/augment_cost.py                 # 32x32, batch 512, the GPU recipe's policies
    python benchmarks/augment_cost.py --size 224 --batch-size 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vitkit.data.cache import BatchTrainTransform
from vitkit.data.seeding import reseed

RESEED = "re-seeding the worker's generators for the batch (vitkit/data/seeding.py), alone"

POLICIES = {
    "crop + flip (no auto-augment)": None,
    "+ timm rand-m9-mstd0.5-inc1 (the GPU recipe)": "rand-m9-mstd0.5-inc1",
    "+ torchvision RandAugment": "randaugment",
    "+ torchvision TrivialAugmentWide": "trivialaugment",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32, help="image side in the cache")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--re-prob", type=float, default=0.25, help="random erasing, as in the GPU recipe")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8)
    batch = [(image, 0) for image in images]
    transforms = {
        f"{name}, {'batched' if batched else 'per image'}": BatchTrainTransform(
            args.size, scale=(0.35, 1.0), auto_augment=policy, re_prob=args.re_prob, batched=batched
        )
        for name, policy in POLICIES.items()
        for batched in (False, True)
    }
    # what every batch costs a worker before any augmentation: re-seeding from the batch's indices
    indices = list(range(args.batch_size))
    transforms[RESEED] = lambda _: reseed(0, *indices)
    seconds: dict[str, list[float]] = {name: [] for name in transforms}
    for _ in range(args.rounds):
        for name, transform in transforms.items():
            start = time.perf_counter()
            transform(batch)
            seconds[name].append(time.perf_counter() - start)
    print(f"{args.batch_size} images of {args.size}x{args.size}, 1 thread, median of {args.rounds} rounds")
    print("| augmentation, path | images/s per core |\n|---|---:|")
    for name, values in seconds.items():
        print(f"| {name} | {args.batch_size / statistics.median(values):,.0f} |")


if __name__ == "__main__":
    main()
