"""End-to-end training speed from image files: vitkit's Lightning loop against a plain loop.

Both train the same architecture (vitkit's model, and timm's ``VisionTransformer`` twin of it)
with the same batch size, optimiser and train transforms, reading the same JPEG folder with the
same number of workers. The plain side is what a minimal script does:
``torchvision.datasets.ImageFolder`` + ``DataLoader`` + a ``for`` loop of forward, backward,
AdamW step. vitkit runs its ``ImageClassifier`` and ``ImageFolderDataModule`` under a Lightning
``Trainer``: decoding the folder, from the uint8 tensor cache augmented in the loader workers, and
from the cache augmented on the device (``augment_on="device"``). ``--auto-augment`` adds a policy
to every loop (per image in the plain loop's workers, as timm does). The settings alternate. Each
loop first takes ``--warmup`` untimed steps; its clock then runs from the device finishing the last
of them to the device finishing the last timed step, so start-up and the first steps' one-off costs
(lazily loaded kernels, the allocator growing) are not counted, whichever loop runs first. Last, the
training step alone on a batch already on the device gives the ceiling: a loop's rate over it is
the fraction of the time its data path keeps the device busy. On a GPU with NVML (nvidia-ml-py)
the GPU's own utilisation is sampled over the same steps too ("GPU-Util", as nvidia-smi shows
it), which also counts the work a loop adds on the device, such as augmentation.

    vitkit bench loop --root ~/.cache/vitkit/cifar10 --steps 60 --warmup 5 --rounds 2
    vitkit bench loop --root DIR --model vit_small_patch4_32 --options '{}' \
        --batch-size 512 --workers 14 --device cuda --precision bf16-mixed \
        --auto-augment rand-m9-mstd0.5-inc1
    vitkit bench loop --root DIR ... --steps 40 --profile OUT [--augment-on device]
    vitkit bench loop --root ~/data/imagenet --model vit_small_patch16_224 --options '{}' \
        --loops folder plain step     # the image size and the classes follow the model and the folder
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from vitkit.bench.speed import _check_device, _sync, timm_twin
from vitkit.data import ImageFolderDataModule, build_train_transform
from vitkit.training import ImageClassifier


class LoopRate(NamedTuple):
    """A loop's speed: images/s, and the mean GPU utilisation over the same steps (NVML's
    "GPU-Util", the share of time in which a kernel was running; None without a GPU or NVML)."""

    images_per_s: float
    gpu_util: float | None = None


class _GpuUtil:
    """NVML's utilisation of one GPU, sampled every ``interval`` s in a thread between :meth:`start`
    and :meth:`stop` (``torch.cuda.utilization``, which needs the nvidia-ml-py package).

    The rate ratio "loop / step alone" counts work the loop adds on the GPU (augmentation on the
    device) as idle time; NVML says whether the GPU was running anything at all. :meth:`stop`
    averages only the samples taken up to ``until`` (the end of the last timed step): the GPU idles
    through Lightning's teardown after the last step, which is not the data path's doing.
    """

    def __init__(self, device: str | torch.device, interval: float = 0.1) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.samples: list[float] = []
        self.times: list[float] = []  # time.perf_counter() of each sample
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.device.type != "cuda" or self._thread is not None:
            return
        try:
            torch.cuda.utilization(self.device)
        except Exception:  # no NVML here (no nvidia-ml-py, no driver): report n/a
            return
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            reading = float(torch.cuda.utilization(self.device))
            self.times.append(time.perf_counter())
            self.samples.append(reading)

    def stop(self, until: float | None = None) -> float | None:
        """The mean utilisation in percent of the samples taken up to ``until`` (a
        ``time.perf_counter()``; None: all), or None when there are none."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        kept = [s for s, t in zip(self.samples, self.times, strict=True) if until is None or t <= until]
        return statistics.mean(kept) if kept else None


class _Clock(L.Callback):
    """Seconds and images of the ``steps`` training steps that follow ``warmup`` untimed ones.

    The clock starts when the device has finished the last warm-up step and stops when it has
    finished the last timed one (a synchronisation at each edge, none in between), so the first
    steps' one-off costs (lazily loaded kernels, the allocator growing, cuBLAS handles) are not
    counted and work still queued on the device is. The GPU utilisation is sampled over the same span.
    """

    def __init__(self, util: _GpuUtil, device: torch.device, warmup: int, steps: int) -> None:
        self.start = 0.0
        self.end = 0.0
        self.images = 0
        self.util = util
        self.device = device
        self.warmup = warmup
        self.steps = steps
        self._done = 0  # training steps finished, across epochs

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._done += 1
        if self._done > self.warmup:
            self.images += int(batch[0].shape[0])
        if self._done in (self.warmup, self.warmup + self.steps):
            _sync(self.device)
            now = time.perf_counter()
            if self._done == self.warmup:
                self.start = now
                self.util.start()
            else:
                self.end = now

    def rate(self) -> LoopRate:
        """Images/s and GPU utilisation of the timed steps."""
        if self._done < self.warmup + self.steps:
            raise RuntimeError(
                f"The loop stopped after {self._done} of {self.warmup + self.steps} steps; "
                "give it more data or fewer --steps."
            )
        return LoopRate(self.images / (self.end - self.start), self.util.stop(until=self.end))


def _check_steps(steps: int, warmup: int) -> None:
    if steps < 1 or warmup < 1:
        raise ValueError(
            f"Time at least 1 step after at least 1 warm-up step (got --steps {steps}, --warmup {warmup}): "
            "the clock starts when the last warm-up step has finished."
        )


def _task(root: Path, options: dict[str, Any]) -> tuple[int, int]:
    """(the number of classes under ``root/train``, the model's square input size): both loops train
    that many classes on images cropped to the size the model takes."""
    import vitkit

    if not (root / "train").is_dir():
        raise FileNotFoundError(
            f"{root} has no train/ folder: give --root an ImageNet-style folder, train/<class>/*.jpg"
        )
    classes, _ = find_classes(str(root / "train"))
    with torch.device("meta"):  # the architecture only
        model = vitkit.create_model(options["model_name"], **options["model_options"])
    height, width = model.img_size
    if height != width:
        raise ValueError(
            f"The loop benchmark crops square images; {options['model_name']} takes {height}x{width}. "
            f"Give it a square size: --options '{{\"img_size\": {height}}}'."
        )
    return len(classes), height


def vitkit_loop(
    root: Path,
    options: dict[str, Any],
    batch_size: int,
    steps: int,
    workers: int,
    cache: bool,
    device: str = "cpu",
    precision: str = "32-true",
    profile: Path | None = None,
    augment_on: str = "workers",
    auto_augment: str | None = None,
    warmup: int = 5,
) -> LoopRate:
    """Images/s of ``steps`` training steps of vitkit's Trainer (no validation, no checkpoints),
    timed after ``warmup`` untimed ones (:class:`_Clock`).

    ``cache``: the uint8 tensor cache instead of decoding files; ``augment_on``: where the cached
    batches are augmented ("workers" or "device"); ``device``: "cpu", "cuda" or "cuda:N".

    ``profile``: a folder for Lightning's ``PyTorchProfiler`` report of up to 10 steps after 5 of
    warm-up (an op table sorted by device or CPU time, and a Chrome trace); the rate is then the
    profiled run's, slower than an unprofiled one.
    """
    _check_steps(steps, warmup)
    num_classes, size = _task(root, options)
    torch.manual_seed(0)
    module = ImageClassifier(
        model_name=options["model_name"],
        model_options=options["model_options"],
        num_classes=num_classes,
        lr=1e-3,
        warmup_steps=10,
    )
    data = ImageFolderDataModule(
        root,
        batch_size=batch_size,
        img_size=size,
        num_workers=workers,
        cache="memory" if cache else False,
        augment_on=augment_on,
        scale=(0.6, 1.0),
        auto_augment=auto_augment,
        crop_pct=1.0,
    )
    on = torch.device(device)
    clock = _Clock(_GpuUtil(on), on, warmup, steps)
    accelerator = "gpu" if on.type == "cuda" else "cpu"
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=[on.index or 0] if accelerator == "gpu" else 1,
        precision=precision,
        max_steps=warmup + steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        profiler=None if profile is None else _profiler(profile, steps, accelerator),
    )
    trainer.fit(module, datamodule=data)
    return clock.rate()


def _profiler(folder: Path, steps: int, accelerator: str) -> Any:
    from lightning.pytorch.profilers import PyTorchProfiler

    active = max(min(10, steps - 6), 1)
    return PyTorchProfiler(
        dirpath=folder,
        filename="vitkit_loop",
        export_to_chrome=True,
        row_limit=40,
        sort_by_key="cuda_time_total" if accelerator == "gpu" else "cpu_time_total",
        schedule=torch.profiler.schedule(wait=min(5, steps - active - 1), warmup=1, active=active),
    )


def plain_loop(
    root: Path,
    options: dict[str, Any],
    batch_size: int,
    steps: int,
    workers: int,
    device: str = "cpu",
    precision: str = "32-true",
    auto_augment: str | None = None,
    warmup: int = 5,
) -> LoopRate:
    """Images/s of the same training with timm's model in a minimal PyTorch loop, timed as
    vitkit's: ``steps`` steps after ``warmup`` untimed ones, the device synchronised at both ends."""
    import vitkit

    _check_steps(steps, warmup)
    num_classes, size = _task(root, options)
    on = torch.device(device)
    kind = on.type
    on_gpu = kind == "cuda"
    torch.manual_seed(0)
    model = vitkit.create_model(options["model_name"], num_classes=num_classes, **options["model_options"])
    model = timm_twin(model).to(device)
    transform = build_train_transform(size, scale=(0.6, 1.0), auto_augment=auto_augment)
    loader = DataLoader(
        ImageFolder(str(root / "train"), transform=transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=on_gpu,
        drop_last=True,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.train()
    start, images, util = 0.0, 0, _GpuUtil(on)
    # as many steps as vitkit's loop takes, across epochs (Lightning's max_steps does the same)
    epochs = (batch for _ in itertools.count() for batch in loader)
    for done, (x, y) in enumerate(itertools.islice(epochs, warmup + steps), start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if done > warmup:
            images += x.shape[0]
        elif done == warmup:
            _sync(on)
            start = time.perf_counter()
            util.start()
    _sync(on)
    end = time.perf_counter()
    return LoopRate(images / (end - start), util.stop(until=end))


def step_only(
    options: dict[str, Any],
    batch_size: int,
    steps: int,
    device: str,
    precision: str,
    num_classes: int = 10,
    warmup: int = 5,
) -> LoopRate:
    """Images/s of vitkit's training step alone, on a batch already on the device: the ceiling a
    data path can feed (loop rate / this = the fraction of the time the device is kept busy)."""
    import vitkit
    from vitkit.bench.speed import _example_batch, _time, _train_step_fn

    torch.manual_seed(0)
    model = vitkit.create_model(options["model_name"], num_classes=num_classes, **options["model_options"])
    model.to(device)
    x, y = _example_batch(model, batch_size, device, torch.contiguous_format)
    step = _train_step_fn(model.train(), x, y, "bf16" if precision.startswith("bf16") else "fp32")
    for _ in range(warmup):
        step()
    util = _GpuUtil(device)
    util.start()
    seconds = _time(step, max(steps // 2, 5), torch.device(device))
    return LoopRate(batch_size / seconds, util.stop())


LOOPS = {  # --loops key: the row's name
    "folder": "vitkit (folder)",
    "cache": "vitkit (tensor cache)",
    "device": "vitkit (tensor cache, augmented on the device)",
    "plain": "plain timm loop",
    "step": "vitkit step only (batch on device)",
}


def loop_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitkit bench loop", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, required=True, help="an ImageNet-style folder (train/<class>/...)"
    )
    parser.add_argument("--model", default="vit_nano_patch4_32")
    parser.add_argument(
        "--options",
        default='{"class_token": false, "global_pool": "avg"}',
        help="model options as JSON (the CPU CIFAR-10 recipe's by default)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per loop")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed training steps before them (at least 1)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument(
        "--auto-augment", default=None, help="a policy for every loop, e.g. rand-m9-mstd0.5-inc1"
    )
    parser.add_argument(
        "--augment-on",
        default="workers",
        choices=["workers", "device"],
        help="with --profile: where the cached batches are augmented",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="only profile vitkit's loop (tensor cache) into this folder: an op table and a Chrome trace",
    )
    parser.add_argument(
        "--loops",
        nargs="+",
        default=list(LOOPS),
        choices=list(LOOPS),
        help="which loops to time (default: all; the two cache loops decode the whole train split "
        "into memory first, so leave them out for a dataset larger than the RAM)",
    )
    args = parser.parse_args(argv)
    import json

    _check_device(args.device)
    _check_steps(args.steps, args.warmup)
    options = {"model_name": args.model, "model_options": json.loads(args.options)}
    num_classes, size = _task(args.root, options)
    vitkit_loops = {  # key: (tensor cache, where batches are augmented)
        "folder": (False, "workers"),
        "cache": (True, "workers"),
        "device": (True, "device"),
    }
    runs: dict[str, list[LoopRate]] = {key: [] for key in args.loops}
    common = (args.root, options, args.batch_size, args.steps, args.workers)
    policy = {"auto_augment": args.auto_augment, "warmup": args.warmup}
    if args.profile is not None:
        rate = vitkit_loop(
            *common, True, args.device, args.precision, args.profile, augment_on=args.augment_on, **policy
        )
        print(
            f"vitkit (tensor cache, augmented in the {args.augment_on}), profiled: "
            f"{rate.images_per_s:.1f} images/s; report in {args.profile}"
        )
        return 0
    for _ in range(args.rounds):
        for key in args.loops:
            if key in vitkit_loops:
                cache, where = vitkit_loops[key]
                rate = vitkit_loop(*common, cache, args.device, args.precision, augment_on=where, **policy)
            elif key == "plain":
                rate = plain_loop(*common, args.device, args.precision, **policy)
            else:
                setting = (args.batch_size, args.steps, args.device, args.precision, num_classes)
                rate = step_only(options, *setting, warmup=args.warmup)
            runs[key].append(rate)
    medians = {key: statistics.median(r.images_per_s for r in values) for key, values in runs.items()}
    utils = {key: [r.gpu_util for r in values if r.gpu_util is not None] for key, values in runs.items()}
    print(
        f"{args.model} {options['model_options']} at {size}x{size}, {num_classes} classes, batch "
        f"{args.batch_size}, {args.steps} steps, {args.workers} workers, {torch.get_num_threads()} threads, "
        f"auto-augment {args.auto_augment}"
    )
    print(
        "| loop | images/s (median) | vs plain | device busy (vs step only) | GPU-Util (NVML) |\n"
        "|---|---|---|---|---|"
    )
    for key, median in medians.items():
        plain = f"{median / medians['plain']:.2f}x" if "plain" in medians else "n/a"
        busy = f"{median / medians['step']:.0%}" if "step" in medians else "n/a"
        util = f"{statistics.median(utils[key]):.0f}%" if utils[key] else "n/a"
        print(f"| {LOOPS[key]} | {median:.1f} | {plain} | {busy} | {util} |")
    return 0


if __name__ == "__main__":  # the same as `vitkit bench loop ...`, bad input reported the same way
    from vitkit.cli.main import main

    raise SystemExit(main(["bench", "loop", *sys.argv[1:]]))
