"""What vitkit's Lightning loop costs per step beyond the step itself: a CPU stand-in for the GPU
data-path target (the loop keeping a GPU >= 80% busy).

A one-block, 32-wide ViT on one 512-image batch that the loader hands back as is (no decoding, no
augmentation, no copy), so the forward/backward/AdamW work is small and the same in every row and
what differs is the Python each loop runs around it:

- ``plain``: a ``for`` loop of forward, cross-entropy, backward, fused AdamW step;
- ``vitkit``: ``ImageClassifier`` under a Lightning ``Trainer`` with the CLI's throughput callback
  and the progress bar, as ``vitkit fit`` runs it;
- ``vitkit, bar values every step``: the same with the progress-bar values (loss, LR, images/s)
  logged at every step, as before commit 66eaa5c ("training: progress-bar values on a clock");
- ``vitkit, no progress bar``.

The rows alternate within each round and the median per row is reported, with its excess over the
plain loop in ms per step. On a GPU a step of the speedrun's ViT-S/4 at batch 512 takes ~20-35 ms,
so every millisecond of loop overhead here is a few percent of GPU time there (the host CPUs of
the GPU machines are faster than this 2-core one).

    python benchmarks/loop_overhead.py                  # 200 steps, 5 rounds
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from vitkit.training import ImageClassifier, ImagesPerSecond

OPTIONS = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 16, "num_classes": 10}


class _SameBatch(Dataset):
    """``steps`` times the same (images, labels) batch: the loader adds nothing."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


def _module() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier("vit_nano_patch4_32", model_options=OPTIONS, num_classes=10)


def plain(loader: DataLoader) -> float:
    model = _module()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    start = time.perf_counter()
    for images, labels in loader:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def vitkit(loader: DataLoader, bar: bool = True, every_step: bool = False) -> float:
    module, speed = _module(), ImagesPerSecond()
    if every_step:  # the bar's values logged at every step
        module._bar_due = speed._due = lambda: True
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[speed],
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    batch = (torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,)))
    loader = DataLoader(_SameBatch(batch, args.steps), batch_size=None, num_workers=0)
    rows = {
        "plain for loop": lambda: plain(loader),
        "vitkit": lambda: vitkit(loader),
        "vitkit, bar values every step": lambda: vitkit(loader, every_step=True),
        "vitkit, no progress bar": lambda: vitkit(loader, bar=False),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, run in rows.items():
            times[name].append(run() / args.steps * 1e3)
    base = statistics.median(times["plain for loop"])
    threads = torch.get_num_threads()
    print(f"\nbatch {args.batch_size}, {args.steps} steps, {args.rounds} rounds, {threads} threads")
    print("| loop | ms / step (median) | over the plain loop | rounds |")
    print("|---|---:|---:|---|")
    for name, values in times.items():
        median = statistics.median(values)
        spread = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {median:.2f} | {median - base:+.2f} ms | {spread} |")


if __name__ == "__main__":
    main()
