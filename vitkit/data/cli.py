"""``vitkit data ...``: dataset tools on the command line.

vitkit data synth OUT [--num-train N] [--num-val N] [--img-size S] [--seed S] [--overwrite]
vitkit data check ROOT      list the splits and classes, decode every image, report the bad ones
vitkit data pack ROOT OUT [--format litdata|webdataset] [--chunk-bytes 64MB] [--num-workers N]
                            write the folder as streaming shards (see vitkit.data.pack)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .pack import SHARD_FORMATS, SHARDS_INFO_FILE


def _synth(args: argparse.Namespace) -> int:
    from .synth import SHAPE_CLASSES, make_shapes_dataset

    start = time.perf_counter()
    out = make_shapes_dataset(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        img_size=args.img_size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(
        f"Wrote {args.num_train} train + {args.num_val} val {args.img_size}x{args.img_size} images of "
        f"{len(SHAPE_CLASSES)} shapes ({', '.join(SHAPE_CLASSES)}) and their masks to {out} "
        f"in {time.perf_counter() - start:.1f} s."
    )
    return 0


def _class_summary(classes: Sequence[str]) -> str:
    return f"{len(classes)} classes: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}"


def _check(args: argparse.Namespace) -> int:
    from .decode import DecodeError, load_rgb
    from .folder import find_splits, scan_image_folder

    splits = find_splits(args.root, args.val_split)
    classes, train = scan_image_folder(splits.train)
    named = [("train", splits.train, train)]
    if splits.val is not None:
        named.append(("val", splits.val, scan_image_folder(splits.val, classes=classes)[1]))
    print(_class_summary(classes))
    bad = 0
    for name, folder, samples in named:
        print(f"{name}: {folder} ({len(samples)} images)")
        if args.decode:
            for path, _ in samples:
                try:
                    load_rgb(path)
                except DecodeError as error:
                    bad += 1
                    print(f"  BAD {error}")
    if splits.val is None:
        print("no validation folder (val/, validation/ or test/): a held-out fraction of train will be used")
    if args.decode:
        print(f"{bad} undecodable file(s)")
    return 1 if bad else 0


def _pack(args: argparse.Namespace) -> int:
    from .pack import pack_image_folder

    start = time.perf_counter()
    info = pack_image_folder(
        args.root,
        args.out,
        format=args.format,
        val_split=args.val_split,
        chunk_bytes=args.chunk_bytes,
        num_workers=args.num_workers,
        verify=args.verify,
        overwrite=args.overwrite,
    )
    out = Path(args.out).expanduser()
    print(f"Packed {info.source} as {info.format} shards in {time.perf_counter() - start:.1f} s:")
    print(_class_summary(info.classes))
    for name, split in info.splits.items():
        folder = out / split.path
        files = [p for p in folder.iterdir() if p.is_file()]
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(f"{name}: {split.num_samples} samples -> {folder} ({len(files)} files, {megabytes:.1f} MB)")
    if info.skipped:
        print(f"{len(info.skipped)} file(s) could not be decoded and were left out:")
        for entry in info.skipped:
            print(f"  {entry['error']}")
    print(f"classes, split sizes and the skipped files: {out / SHARDS_INFO_FILE}")
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``data`` sub-command's parser (or its arguments added to ``parser``)."""
    parser = parser or argparse.ArgumentParser(prog="vitkit data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="data_command", required=True)

    synth = sub.add_parser(
        "synth", help="write the synthetic shapes dataset (images + object masks) to an ImageNet-style folder"
    )
    synth.add_argument("out", help="output folder (OUT/train, OUT/val, OUT/masks)")
    synth.add_argument("--num-train", type=int, default=2000, help="training images (default 2000)")
    synth.add_argument("--num-val", type=int, default=500, help="validation images (default 500)")
    synth.add_argument("--img-size", type=int, default=64, help="image side in pixels (default 64)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    synth.set_defaults(data_func=_synth)

    check = sub.add_parser("check", help="show splits and classes of an image folder; find undecodable files")
    check.add_argument("root", help="dataset folder (ROOT/train/<class>/..., ROOT/val/<class>/...)")
    check.add_argument(
        "--val-split", default=None, help="validation folder (default: val, validation or test)"
    )
    check.add_argument("--no-decode", dest="decode", action="store_false", help="only scan, do not decode")
    check.set_defaults(data_func=_check)

    pack = sub.add_parser("pack", help="write an image folder as streaming shards (litdata or WebDataset)")
    pack.add_argument("root", help="dataset folder (ROOT/train/<class>/..., ROOT/val/<class>/...)")
    pack.add_argument("out", help="shards folder (OUT/train, OUT/val, OUT/vitkit-shards.json)")
    pack.add_argument(
        "--format",
        choices=SHARD_FORMATS,
        default="litdata",
        help="litdata: Lightning's optimized chunks (default); webdataset: .tar shards",
    )
    pack.add_argument("--chunk-bytes", default="64MB", help="chunk / tar shard size (default 64MB)")
    pack.add_argument(
        "--num-workers", type=int, default=None, help="reading processes (default: one per CPU)"
    )
    pack.add_argument(
        "--val-split", default=None, help="validation folder (default: val, validation or test)"
    )
    pack.add_argument(
        "--no-verify", dest="verify", action="store_false", help="do not decode files to find bad ones"
    )
    pack.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    pack.set_defaults(data_func=_pack)
    return parser


def data_main(argv: Sequence[str] | None = None) -> int:
    """Run ``vitkit data`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.data_func(args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as error:
        print(f"vitkit data {args.data_command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(data_main())
