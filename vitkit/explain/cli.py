"""``vitkit explain``: saliency overlays and predictions for images, and optionally their metrics.

    vitkit explain --model vit_tiny_patch4_32 --checkpoint run/checkpoints/last.ckpt \\
        photos/ cat.png --methods rollout,relevance --out explanations/
    vitkit explain --checkpoint last.ckpt shapes/val --evaluate --masks shapes/val_masks

Writes ``OUT/overlays/<image>__<method>.png``, ``OUT/summary.png`` (images × methods) and
``OUT/predictions.json`` (per image: predicted class, probability, top 5, and for every method
the class it explains and its overlay file). ``--evaluate`` computes deletion/insertion AUC
(and, with ``--masks``, the pointing game and the saliency mass inside the object) for every
method and a random baseline, prints a table and writes ``OUT/metrics.json``. Masks are found
by the image's relative path (any extension) under ``--masks``, else by its file name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ._io import batches, find_images, format_table, load_model, parse_overrides, write_json
from .methods import CLASS_SPECIFIC, METHODS, explain

DEFAULT_METHODS = "raw_attention,rollout,gradient_rollout,relevance,gradient"


def build_parser(prog: str = "vitkit explain") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Explain a ViT's predictions with attention maps and gradients; measure them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", help="a model name (`vitkit models [--timm]`); implied by --checkpoint")
    parser.add_argument(
        "--pretrained",
        help="the weights: a file or folder, a hub name (timm:NAME, hf:REPO, torchvision:vit_b_16) or "
        "'true' for timm's weights of --model; without --model the architecture is read off them",
    )
    parser.add_argument("--checkpoint", help="a vitkit training checkpoint (.ckpt)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option override, e.g. --set num_classes=10 (repeatable)",
    )
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"comma-separated, from: {', '.join(METHODS)}"
    )
    parser.add_argument("--out", default="explanations", help="output folder")
    parser.add_argument("--target", type=int, help="class to explain (default: the predicted class)")
    parser.add_argument("--labels", help="text file with one class name per line")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--cmap", default="jet", help="matplotlib colormap of the overlays")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the heat map")
    parser.add_argument("--max-summary", type=int, default=16, help="images in summary.png")
    parser.add_argument("--evaluate", action="store_true", help="run the faithfulness/localisation metrics")
    parser.add_argument("--masks", help="folder of binary object masks (for --evaluate)")
    parser.add_argument("--steps", type=int, help="deletion/insertion steps (default: one per patch, <= 32)")
    parser.add_argument(
        "--baseline", default="blur", choices=["blur", "mean", "zero"], help="removed-patch fill"
    )
    parser.add_argument("--max-images", type=int, help="use at most this many images")
    return parser


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    return names


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)


def _safe_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
    return "_".join(relative.with_suffix("").parts)


def explain_main(argv: list[str] | None = None) -> int:
    """Entry point of ``vitkit explain`` (returns the exit status)."""
    args = build_parser().parse_args(argv)
    methods = _methods(args.methods)
    device = _device(args.device)
    model, classes = load_model(
        args.model, args.pretrained, args.checkpoint, **parse_overrides(args.overrides)
    )
    model.to(device)
    if args.labels:
        classes = [line.strip() for line in Path(args.labels).read_text().splitlines() if line.strip()]
    files = find_images(args.inputs)[: args.max_images]
    out = Path(args.out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)

    from .plot import overlay, plot_explanations

    records, summary_images, summary_maps, summary_titles = [], [], {m: [] for m in methods}, []
    roots = dict(files)
    for paths, inputs, shown, _ in batches(files, model, args.batch_size):
        inputs = inputs.to(device)
        with torch.no_grad():
            probs = model(inputs).softmax(-1).cpu()
        target = args.target if args.target is not None else probs.argmax(-1)
        maps = {m: explain(model, inputs, m, target if m in CLASS_SPECIFIC else None).cpu() for m in methods}
        for b, path in enumerate(paths):
            name = _safe_name(path, roots[path])
            top = probs[b].topk(min(5, probs.shape[-1]))
            predicted = int(top.indices[0])
            record = {
                "image": str(path),
                "prediction": predicted,
                "label": classes[predicted] if classes else str(predicted),
                "probability": float(top.values[0]),
                "top5": [[int(i), float(p)] for p, i in zip(top.values, top.indices, strict=True)],
                "explanations": {},
            }
            for m in methods:
                file = out / "overlays" / f"{name}__{m}.png"
                overlay(shown[b], maps[m][b], args.cmap, args.alpha, as_pil=True).save(file)
                explained = (
                    (args.target if args.target is not None else predicted) if m in CLASS_SPECIFIC else None
                )
                record["explanations"][m] = {"target": explained, "overlay": str(file.relative_to(out))}
            records.append(record)
            if len(summary_images) < args.max_summary:
                summary_images.append(shown[b])
                summary_titles.append(f"{path.name}: {record['label']} {record['probability']:.0%}")
                for m in methods:
                    summary_maps[m].append(maps[m][b])
    write_json(
        out / "predictions.json",
        {"model": args.model or args.checkpoint, "methods": methods, "classes": classes, "images": records},
    )
    fig = plot_explanations(
        torch.stack(summary_images),
        {m: torch.stack(v) for m, v in summary_maps.items()},
        titles=summary_titles,
        cmap=args.cmap,
        alpha=args.alpha,
    )
    fig.savefig(out / "summary.png")
    print(
        f"{len(records)} image(s), {len(methods)} method(s): overlays in {out / 'overlays'}, "
        f"predictions in {out / 'predictions.json'}"
    )

    if args.evaluate:
        from .metrics import evaluate_methods

        masks = Path(args.masks) if args.masks else None
        data = (
            (inputs.to(device), None if m is None else m.to(device))
            for _, inputs, _, m in batches(files, model, args.batch_size, masks)
        )
        table = evaluate_methods(model, data, methods, steps=args.steps, baseline=args.baseline)
        write_json(out / "metrics.json", table)
        print(
            "\nDeletion AUC: lower is better; insertion AUC, pointing game and mass in object: "
            "higher is better.\n"
        )
        print(format_table(table))
    return 0
