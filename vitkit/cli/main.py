"""Entry point of the ``vitkit`` command: dispatches to one sub-command per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
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
    print(
        f"input {tuple(image.shape)} -> logits {tuple(logits.shape)}; "
        f"top class {logits.argmax(-1).item()} (untrained weights)"
    )
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitkit", description="Vision Transformers: train, fine-tune, explain."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a model, run it on an embedded image, print its structure")
    demo.add_argument("--model", default="vit_tiny_patch4_32", help="a name from vitkit.list_models()")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
