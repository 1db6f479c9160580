"""How long ``torch.compile`` makes a run wait: the whole model against its blocks one by one.

For each scope (eager, ``model``: ``torch.compile(model)``, ``blocks``:
:func:`vitkit.models.compile_blocks`) a fresh process, with Inductor's caches off so every compile
is cold, times:
- the first training step (forward, backward, AdamW), compilation included;
- two evaluation batches of different sizes (a validation loop's full and last batch);
- then the median of the next ``--steps`` training steps.

    python benchmarks/compile_time.py --model vit_small_patch4_32 \
        --options '{"stem_channels": [64, 128, 256], "drop_path_rate": 0.1}' --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from vitkit.bench.speed import _example_batch, _time


def measure(args: argparse.Namespace) -> dict:
    """One scope, in this process."""
    import vitkit
    from vitkit.models import compile_blocks

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = vitkit.create_model(args.model, **json.loads(args.options)).to(device)
    run = {"eager": model, "model": torch.compile(model), "blocks": compile_blocks(model)}[args.scope]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = _example_batch(model, args.batch_size, device, torch.contiguous_format)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def evaluate() -> None:
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            run(x)
            run(x[: max(args.batch_size // 2, 1)])
        model.train()

    first = _time(step, 1, device)
    evaluation = _time(evaluate, 1, device)
    steady = statistics.median(_time(step, 1, device) for _ in range(args.steps))
    return {
        "scope": args.scope,
        "first_step_s": first,
        "eval_two_shapes_s": evaluation,
        "step_ms": steady * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch4_32")
    parser.add_argument("--options", default="{}", help="model options as JSON")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps after the first")
    parser.add_argument("--scopes", nargs="+", default=["eager", "model", "blocks"])
    parser.add_argument("--scope", help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args(argv)
    if args.scope:
        print(json.dumps(measure(args)))
        return 0
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    print(f"{args.model} {args.options}, batch {args.batch_size}, {args.device}, bf16 autocast, cold caches")
    print(
        "| compile | first training step s | two evaluation shapes s | then ms/step |\n|---|---:|---:|---:|"
    )
    for scope in args.scopes:
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--scope", scope]
        done = subprocess.run(child, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {scope} | failed: {done.stderr.strip().splitlines()[-1]} | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {scope} | {r['first_step_s']:.1f} | {r['eval_two_shapes_s']:.1f} | {r['step_ms']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
