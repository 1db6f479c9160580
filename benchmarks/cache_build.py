"""How long decoding an image folder into vitkit's uint8 tensor cache takes.

The first epoch of a run with ``--data.cache memory`` waits for this (the H200 speedrun of
BENCHMARKS.md: 18 s for CIFAR-10's 60,000 JPEGs with 15 workers).

    python benchmarks/cache_build.py --root ~/.cache/vitkit/cifar10/train --workers 2 --rounds 2
"""

from __future__ import annotations

import argparse
import sys
import time

from vitkit.data import scan_image_folder
from vitkit.data.cache import build_tensor_cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="a folder of class folders (e.g. DATA/train)")
    parser.add_argument("--size", type=int, default=32, help="cached image size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    classes, samples = scan_image_folder(args.root)
    for round in range(1, args.rounds + 1):
        start = time.perf_counter()
        cache = build_tensor_cache(samples, classes, args.size, num_workers=args.workers)
        seconds = time.perf_counter() - start
        print(f"round {round}: {len(cache)} images in {seconds:.1f} s ({len(cache) / seconds:.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
