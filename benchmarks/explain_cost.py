"""What does explaining a batch cost, next to training on it? Time and peak memory per method.

For one model and batch (default ViT-B/16 at 224, 64 images; the weights do not matter for cost),
each case runs in a fresh process, so the peak memory of one cannot hide in another's:

* ``forward``: inference without gradients, the floor;
* ``forward+backward``: a training step's compute (loss = sum of the predicted-class logits);
* ``attention_maps[last]`` / ``attention_maps[all]``: capture one layer vs every layer — memory
  should grow with the layers asked for, not the depth;
* ``raw_attention``, ``rollout``, ``rollout[last 4]``, ``gradient_rollout``, ``relevance``.

Peak memory is, on CPU, the process's high-water mark (``ru_maxrss``) after the first call minus its
resident size just before it (the model and batch already in memory); on GPU,
``torch.cuda.max_memory_allocated`` above what the model and batch hold; time is the median of
``--repeats`` further calls. Prints a markdown table with each cost as a ratio to forward+backward.

    python benchmarks/explain_cost.py                          # ViT-B/16, 224, batch 64, CPU
    python benchmarks/explain_cost.py --model vit_small_patch16_224 --batch 16
    python benchmarks/explain_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

CASES = [
    "forward",
    "forward+backward",
    "attention_maps[last]",
    "attention_maps[all]",
    "raw_attention",
    "rollout",
    "rollout[last 4]",
    "gradient_rollout",
    "relevance",
]


def _case(name: str, model: torch.nn.Module, images: torch.Tensor):
    from vitkit import explain

    depth = len(model.blocks)
    if name == "forward":
        return lambda: _no_grad(model, images)
    if name == "forward+backward":

        def step() -> None:
            model.zero_grad(set_to_none=True)
            logits = model(images)
            logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()

        return step
    if name == "attention_maps[last]":
        return lambda: explain.attention_maps(model, images, layers=[depth - 1])
    if name == "attention_maps[all]":
        return lambda: explain.attention_maps(model, images)
    if name == "rollout[last 4]":
        return lambda: explain.rollout(model, images, start_layer=depth - 4)
    return lambda: getattr(explain, name)(model, images)


def _no_grad(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _high_water_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_one(args: argparse.Namespace) -> dict[str, float]:
    import vitkit

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = vitkit.create_model(args.model, img_size=args.img_size).to(device).eval()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    fn = _case(args.one, model, images)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else _resident_bytes()
    fn()
    sync()
    after = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _high_water_bytes()
    peak = max(after - before, 0)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    results = {}
    for case in args.cases.split(","):
        command = [sys.executable, __file__, "--one", case, *sys.argv[1:]]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[case] = json.loads(output.strip().splitlines()[-1])
        print(f"{case}: {results[case]}", file=sys.stderr, flush=True)
    base = results.get("forward+backward")
    print(f"\n{args.model}, {args.batch} images at {args.img_size}px, {args.device}\n")
    print("| case | s / batch | × forward+backward | peak memory MiB | × forward+backward |")
    print("|---|---:|---:|---:|---:|")
    for case, r in results.items():
        t_ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "—"
        m_ratio = f"{r['peak_mib'] / base['peak_mib']:.2f}" if base and base["peak_mib"] > 0 else "—"
        print(f"| {case} | {r['seconds']:.2f} | {t_ratio} | {r['peak_mib']:.0f} | {m_ratio} |")


if __name__ == "__main__":
    main()
