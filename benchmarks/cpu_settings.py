"""What CPU speed each setting buys for the CPU CIFAR-10 recipe's model, in one process, alternating.

The training step (forward, backward, AdamW) of ``cifar10_hybrid_cpu``'s model (read from the
recipe; or any registered model with ``--options``) on a random batch, under: fp32 and bf16 autocast,
each with the fused attention kernel or the explicit formula; then, at the recipe's precision, the
foreach instead of the fused AdamW, one thread instead of all, and ``torch.compile``. The recipe's
precision is the one ``vitkit fit`` gives it on this CPU: bf16 where the CPU has bf16 arithmetic
(AVX512-BF16 or AMX), else fp32 (``--precision`` chooses). Every setting runs once per round, the
rounds alternate, the median is reported with its ratio to the recipe's setting (explicit
attention, fused AdamW, all threads, eager), so background load hits all alike.

    python benchmarks/cpu_settings.py                      # the hybrid recipe's model, batch 128
    python benchmarks/cpu_settings.py --no-compile --rounds 7
    python benchmarks/cpu_settings.py --profile            # where a step's time goes, per attention path
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
from vitkit.bench import cpu_has_bf16_arithmetic
from vitkit.bench.speed import _time, _train_step_fn
from vitkit.training.recipes import recipe_path

RECIPE = yaml.safe_load(recipe_path("cifar10_hybrid_cpu").read_text())["model"]
PRECISION_NAMES = {"fp32": "fp32", "bf16": "bf16 autocast"}


def _recipe_setting(precision: str) -> str:
    return f"{PRECISION_NAMES[precision]}, explicit attention, fused AdamW (the recipe)"


def _compiled_setting(precision: str) -> str:
    return f"{precision}, explicit attention, torch.compile"


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
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="the recipe's precision (auto: as `vitkit fit` on this CPU, bf16 only with bf16 arithmetic)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: torch.profiler's top ops of 3 steps at the recipe's precision, both paths",
    )
    args = parser.parse_args(argv)
    if args.precision == "auto":
        args.precision = "bf16" if cpu_has_bf16_arithmetic() else "fp32"
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
            step = _train_step_fn(build(fused_attn), x, y, args.precision)
            step()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
            path = "fused attention kernel" if fused_attn else "explicit attention"
            print(f"{PRECISION_NAMES[args.precision]}, {path}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
        return
    if args.variants:
        recipe = "the recipe's model"
        settings = {recipe: (_train_step_fn(build(), x, y, args.precision), threads)}
        for name, changes in json.loads(args.variants).items():
            settings[name] = (_train_step_fn(build(**changes), x, y, args.precision), threads)
    else:
        recipe = _recipe_setting(args.precision)
        settings = _settings(build, x, y, threads, args.compile, args.precision)
    _report(settings, recipe, args, options, threads)


def _settings(
    build, x: torch.Tensor, y: torch.Tensor, threads: int, compile: bool, precision: str
) -> dict[str, tuple]:
    """The settings compared, by name: (training step, threads)."""
    settings = {}  # name: (step, threads)
    for p in ("fp32", "bf16"):
        settings[f"{PRECISION_NAMES[p]}, fused attention kernel"] = (
            _train_step_fn(build(True), x, y, p),
            threads,
        )
        explicit = _recipe_setting(p) if p == precision else f"{PRECISION_NAMES[p]}, explicit attention"
        settings[explicit] = (_train_step_fn(build(), x, y, p), threads)
    settings[f"{precision}, explicit attention, foreach AdamW"] = (
        _train_step_fn(build(), x, y, precision, fused=False),
        threads,
    )
    settings[f"{precision}, explicit attention, 1 thread"] = (_train_step_fn(build(), x, y, precision), 1)
    if compile:
        settings[_compiled_setting(precision)] = (
            _train_step_fn(torch.compile(build()), x, y, precision),
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
        if name == _compiled_setting(args.precision):
            compile_seconds = time.perf_counter() - start
    rates: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, (step, n) in settings.items():
            torch.set_num_threads(n)
            rates[name].append(args.batch_size / _time(step, args.iters, torch.device("cpu")))
    torch.set_num_threads(threads)
    base = statistics.median(rates[recipe])
    print(
        f"{args.model} {options}, batch {args.batch_size}, {threads} threads, {args.rounds} rounds, "
        f"the recipe in {args.precision}"
    )
    kind = "variant" if args.variants else "setting"
    print(f"| {kind} | images/s (median) | vs the recipe |\n|---|---:|---:|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median / base:.2f}x |")
    if _compiled_setting(args.precision) in settings:
        print(f"first two compiled steps (compilation): {compile_seconds:.0f} s")


if __name__ == "__main__":
    main()
