"""What CPU speed each setting buys for the CPU CIFAR-10 recipe's model, in one process, alternating.

The training step (forward, backward, AdamW) of ``cifar10_hybrid_cpu``'s model (read from the
recipe; or any registered model with ``--options``) on a random batch, under: fp32; bf16 autocast
with the fused attention kernel or the explicit formula; the foreach instead of the fused AdamW;
one thread instead of all; ``torch.compile``. Every setting runs once per round, the rounds
alternate, the median is reported with its ratio to the recipe's setting (bf16, explicit
attention, fused AdamW, all threads, eager), so background load hits all alike.

    python benchmarks/cpu_settings.py                      # the hybrid recipe's model, batch 128
    python benchmarks/cpu_settings.py --no-compile --rounds 7
    python benchmarks/cpu_settings.py --profile            # where a bf16 step's time goes, per attention path
    python benchmarks/cpu_settings.py --variants '{"old stem": {"stem_channels": [32, 64, 128],
        "stem_strides": null}}'

With ``--variants`` it times model variants instead of settings: the recipe's setting for the
recipe's model and for each variant (the recipe's options with the given ones changed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import yaml
from torch import nn

import vitkit
from vitkit.bench.speed import _time, _train_step_fn
from vitkit.training.recipes import recipe_path

RECIPE = yaml.safe_load(recipe_path("cifar10_hybrid_cpu").read_text())["model"]
RECIPE_SETTING = "bf16 autocast, explicit attention, fused AdamW (the recipe)"
COMPILED_SETTING = "bf16, explicit attention, torch.compile"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=RECIPE["model_name"])
    parser.add_argument(
        "--options", default=json.dumps(RECIPE["model_options"]), help="model options as JSON"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3, help="steps timed per setting and round")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--variants",
        default=None,
        help='instead of the settings: model variants under the recipe\'s setting, as JSON {"name": '
        '{options changed}}, e.g. \'{"deeper stem": {"stem_channels": [32, 64, 64, 128], '
        '"stem_strides": [1, 2, 1, 2]}}\'',
    )
    parser.add_argument(
        "--profile", action="store_true", help="instead: torch.profiler's top ops of 3 bf16 steps, both paths"
    )
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    options = json.loads(args.options)
    options.pop("fused_attn", None)  # every setting below names its attention path

    def build(fused_attn: bool = False, **changes) -> nn.Module:
        torch.manual_seed(0)
        model = vitkit.create_model(
            args.model, num_classes=10, fused_attn=fused_attn, **{**options, **changes}
        )
        return model.train()

    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    if args.profile:
        for fused_attn in (True, False):
            step = _train_step_fn(build(fused_attn), x, y, "bf16")
            step()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
            print(f"bf16 autocast, {'fused attention kernel' if fused_attn else 'explicit attention'}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
        return
    if args.variants:
        recipe = "the recipe's model"
        settings = {recipe: (_train_step_fn(build(), x, y, "bf16"), threads)}
        for name, changes in json.loads(args.variants).items():
            settings[name] = (_train_step_fn(build(**changes), x, y, "bf16"), threads)
    else:
        recipe = RECIPE_SETTING
        settings = _settings(build, x, y, threads, args.compile)
    _report(settings, recipe, args, options, threads)


def _settings(build, x: torch.Tensor, y: torch.Tensor, threads: int, compile: bool) -> dict[str, tuple]:
    """The settings compared, by name: (training step, threads)."""
    settings = {  # name: (step, threads)
        "fp32, fused attention kernel": (_train_step_fn(build(True), x, y, "fp32"), threads),
        "fp32, explicit attention": (_train_step_fn(build(), x, y, "fp32"), threads),
        "bf16 autocast, fused attention kernel": (_train_step_fn(build(True), x, y, "bf16"), threads),
        RECIPE_SETTING: (_train_step_fn(build(), x, y, "bf16"), threads),
        "bf16, explicit attention, foreach AdamW": (
            _train_step_fn(build(), x, y, "bf16", fused=False),
            threads,
        ),
        "bf16, explicit attention, 1 thread": (_train_step_fn(build(), x, y, "bf16"), 1),
    }
    if compile:
        settings[COMPILED_SETTING] = (
            _train_step_fn(torch.compile(build()), x, y, "bf16"),
            threads,
        )
    return settings


def _report(
    settings: dict[str, tuple], recipe: str, args: argparse.Namespace, options: dict, threads: int
) -> None:
    """Warm every setting up, time them in alternating rounds, print the table."""
    compile_seconds = 0.0
    for name, (step, n) in settings.items():  # warm-up (and compilation) outside the clock
        torch.set_num_threads(n)
        start = time.perf_counter()
        step()
        step()
        if name == COMPILED_SETTING:
            compile_seconds = time.perf_counter() - start
    rates: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, (step, n) in settings.items():
            torch.set_num_threads(n)
            rates[name].append(args.batch_size / _time(step, args.iters, torch.device("cpu")))
    torch.set_num_threads(threads)
    base = statistics.median(rates[recipe])
    print(f"{args.model} {options}, batch {args.batch_size}, {threads} threads, {args.rounds} rounds")
    kind = "variant" if args.variants else "setting"
    print(f"| {kind} | images/s (median) | vs the recipe |\n|---|---:|---:|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median / base:.2f}x |")
    if COMPILED_SETTING in settings:
        print(f"first two compiled steps (compilation): {compile_seconds:.0f} s")


if __name__ == "__main__":
    main()
