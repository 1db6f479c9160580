"""Entry point of the ``vitkit`` command: one sub-command per job.

vitkit quickstart                  train on the embedded synthetic-shapes data (no download)
vitkit fit|validate|test|predict   LightningCLI driven by YAML recipes (--config NAME_OR_FILE)
vitkit data synth OUT              write the synthetic shapes dataset with object masks
vitkit data pack ROOT OUT          write an image folder as streaming shards (litdata or WebDataset)
vitkit explain ...                 attention heatmaps and their faithfulness metrics
vitkit recipes                     list the shipped recipes
vitkit models [PATTERN] [--timm]   list the model names (--timm: and timm's that vitkit builds)
vitkit demo                        build a model, run it on an embedded image, print it
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

_LIGHTNING = ("fit", "validate", "test", "predict")
_USAGE = __doc__.split("\n\n", 1)[1]


def _demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vitkit demo", description="Run a model on an embedded image.")
    parser.add_argument("--model", default="vit_tiny_patch4_32", help="a name from `vitkit models`")
    args = parser.parse_args(argv)

    import torch

    import vitkit

    torch.manual_seed(0)
    model = vitkit.create_model(args.model).eval()
    size = model.img_size
    # An embedded "image": a smooth colour gradient with a bright square, no file needed.
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size[0]), torch.linspace(0, 1, size[1]), indexing="ij")
    image = torch.stack([xs, ys, 1 - xs])
    image[:, size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = 1.0
    with torch.no_grad():
        logits = model(image.unsqueeze(0))
    print(model)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\n{args.model}: {params / 1e6:.2f} M parameters, patch grid {model.grid_size}, "
        f"{model.num_prefix_tokens} prefix token(s)"
    )
    print(f"input {tuple(image.shape)} -> logits {tuple(logits.shape)} (untrained weights)")
    return 0


def _models(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vitkit models",
        description="List the model names create_model, fit and bench accept.",
    )
    parser.add_argument(
        "pattern", nargs="?", default="*", help="a shell-style pattern, e.g. 'vit_*_patch16_*'"
    )
    parser.add_argument(
        "--timm", action="store_true", help="also the timm ViT architectures vitkit can build"
    )
    args = parser.parse_args(argv)

    import vitkit

    names = vitkit.list_models(args.pattern, timm=args.timm)
    for name in names:
        print(name)
    if not names and not args.timm:
        print(f"No vitkit model matches {args.pattern!r}; --timm also lists timm's.", file=sys.stderr)
    return 0


def _recipes(argv: list[str]) -> int:
    from vitkit.training.recipes import RECIPES_DIR, list_recipes

    for name in list_recipes():
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:<28} {first}")
    return 0


def _quickstart(argv: list[str]) -> int:
    from vitkit.training.quickstart import quickstart

    return quickstart(argv)


def _data(argv: list[str]) -> int:
    from vitkit.data.cli import data_main

    return data_main(argv)


def _bench(argv: list[str]) -> int:
    from vitkit.bench import bench_main

    return bench_main(argv)


def _explain(argv: list[str]) -> int:
    from vitkit.explain.cli import explain_main

    return explain_main(argv)


_COMMANDS = {
    "quickstart": _quickstart,
    "demo": _demo,
    "models": _models,
    "recipes": _recipes,
    "data": _data,
    "explain": _explain,
    "bench": _bench,
}


# What bad input raises in vitkit (a missing file or folder, an unknown model or recipe, an option
# that does not fit): the message names the value and what to do, so the command prints it alone.
_INPUT_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError)


def _is_input_error(error: Exception) -> bool:
    """Bad input: vitkit's own (above) or a Trainer option Lightning rejects (``--trainer.accelerator
    gpu`` on a machine without one), whose messages also say what is wrong."""
    if isinstance(error, _INPUT_ERRORS):
        return True
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")  # imported if it ran
    return lightning_errors is not None and isinstance(error, lightning_errors.MisconfigurationException)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: vitkit COMMAND [options]\n\n{_USAGE}\n`vitkit COMMAND --help` explains each command.")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in (*_LIGHTNING, *_COMMANDS):
        print(f"vitkit: unknown command {command!r}. Commands: {', '.join([*_LIGHTNING, *_COMMANDS])}.")
        return 2
    try:
        return _run(command, rest)
    except Exception as error:
        if not _is_input_error(error) or os.environ.get("VITKIT_TRACEBACK"):
            raise
        print(f"vitkit {command}: error: {error}", file=sys.stderr)
        print("(VITKIT_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2


def _run(command: str, rest: list[str]) -> int:
    if command in _LIGHTNING:
        from vitkit.training.cli import cli_main

        cli_main([command, *rest])
        return 0
    return _COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
