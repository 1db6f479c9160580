"""Benchmark the explanation methods on a labelled folder: faithfulness, localisation, cost.

    python -m vitkit.explain.bench --checkpoint run/checkpoints/last.ckpt \\
        --data shapes/val --masks shapes/val_masks
    python -m vitkit.explain.bench --model vit_small_patch16_224 --pretrained vit_s16.safetensors \\
        --data imagenet_val_subset --max-images 512 --device cuda

Prints one Markdown row per method and for a random baseline: deletion AUC (lower is better),
insertion AUC, pointing game and mass in object (higher is better; these two need ``--masks``),
and the time and peak memory to explain one batch of ``--timing-batch`` (64) images
(median of ``--repeats`` runs after a warm-up; memory is the CUDA peak above what was allocated
before, or on CPU the peak growth of the process's resident memory, sampled every millisecond).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ._io import batches, find_images, format_table, load_model, parse_overrides, write_json
from .methods import METHODS, explain
from .metrics import evaluate_methods

DEFAULT_METHODS = ",".join(METHODS)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> tuple[float, float]:
    """(median seconds, peak extra memory in MiB) of ``fn()`` after one warm-up call."""
    fn()
    times, peaks = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            peaks.append(torch.cuda.max_memory_allocated(device) - before)
        else:
            before = _rss_bytes()
            peak = [before]
            done = threading.Event()

            def sample(peak: list[int] = peak, done: threading.Event = done) -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], _rss_bytes())
                    time.sleep(0.001)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            done.set()
            sampler.join()
            peaks.append(max(peak[0], _rss_bytes()) - before)
    return statistics.median(times), max(peaks) / 2**20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vitkit.explain.bench",
        description="Deletion/insertion AUC, pointing game, mass in object, time and memory per method.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", help="registered model name (implied by --checkpoint)")
    parser.add_argument("--pretrained", help="weights file for --model")
    parser.add_argument("--checkpoint", help="vitkit training checkpoint (.ckpt)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--masks", help="folder of binary object masks (enables localisation metrics)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method names")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch for the metrics")
    parser.add_argument("--max-images", type=int, help="evaluate at most this many images")
    parser.add_argument("--steps", type=int, help="deletion/insertion steps (default: one per patch, <= 32)")
    parser.add_argument("--baseline", default="blur", choices=["blur", "mean", "zero"])
    parser.add_argument("--timing-batch", type=int, default=64, help="batch size of the time/memory test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="also write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    model, _ = load_model(args.model, args.pretrained, args.checkpoint, **parse_overrides(args.overrides))
    model.to(device)
    files = find_images([args.data])[: args.max_images]
    masks = Path(args.masks) if args.masks else None

    data = (
        (x.to(device), None if m is None else m.to(device))
        for _, x, _, m in batches(files, model, args.batch_size, masks)
    )
    table = evaluate_methods(model, data, methods, steps=args.steps, baseline=args.baseline)

    # time and memory to explain one batch of `timing_batch` images (repeated to fill it)
    _, first, _, _ = next(batches(files[: args.timing_batch], model, args.timing_batch))
    reps = -(-args.timing_batch // first.shape[0])
    timing_images = first.repeat(reps, 1, 1, 1)[: args.timing_batch].to(device)
    time_key = f"seconds / {args.timing_batch} images"
    memory_key = "peak memory (MiB)"
    for name in methods:
        seconds, mebibytes = measure(
            lambda name=name: explain(model, timing_images, name), device, args.repeats
        )
        table[name][time_key] = seconds
        table[name][memory_key] = mebibytes

    name = args.model or args.checkpoint
    print(
        f"model {name} on {device}, {len(files)} images from {args.data}"
        + (f", masks {masks}" if masks else "")
    )
    print("deletion AUC: lower is better; the other scores: higher is better\n")
    columns = ["deletion_auc", "insertion_auc", "pointing_game", "mass_in_object", time_key, memory_key]
    print(format_table(table, [c for c in columns if any(c in row for row in table.values())]))
    if args.out:
        write_json(
            Path(args.out), {"model": name, "device": str(device), "images": len(files), "results": table}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
