"""Soft vs hard (top-k) attention on CIFAR-10: test accuracy, training speed, attention concentration.

Trains the model of ``recipes/cifar10_vit_tiny_cpu.yaml`` (vit_nano_patch4_32: 64 patch tokens, no
class token, average pooling, sincos positions; the recipe's optimiser, label smoothing and data
pipeline, uint8 memory cache included) once per attention mode, each with the same budget and seed,
and prints a markdown table:

* test top-1 on the CIFAR-10 test folder (all 10,000 images);
* training images/s, twice: as measured during each run (the runs are sequential, so this moves with
  the background load of a shared machine), and in alternating rounds of one training step per mode
  on a random batch, where every mode sees the same load (read the ratio to soft);
* how concentrated the attention is, on every ``--attention-stride``-th test image, all layers and
  heads: the mean entropy of an attention row (nats; a uniform row over 64 keys has ln 64 = 4.16,
  a row over k keys at most ln k) and the mean number of keys that hold 90% of a row's mass.

The budget is ``--epochs`` passes over ``--train-fraction`` of the training set (Lightning's
``limit_train_batches``: a different random subset each epoch; the defaults give 14,848 images per
model). The recipe's 1 warmup epoch of 10 is scaled to the same 10% of this budget. One seed.
On the shared 2-core CPU, with other jobs keeping the load near 6, the defaults took 27 minutes:

    nice -n 5 .venv/bin/python benchmarks/hard_attention_cifar10.py --root ~/.cache/vitkit/cifar10

``--speed-only`` runs the alternating step timing alone (2 minutes).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from vitkit.data import ImageFolderDataModule
from vitkit.explain import attention_maps
from vitkit.models import create_model
from vitkit.training import ImageClassifier

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cifar10_vit_tiny_cpu.yaml"


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Entropy -Σ_j A_ij log A_ij (nats) of every attention row: (..., N, N) -> (..., N); 0 log 0 = 0."""
    return torch.special.entr(attn).sum(dim=-1)


def keys_for_mass(attn: torch.Tensor, mass: float = 0.9) -> torch.Tensor:
    """How many of a row's largest weights it takes to reach ``mass``: (..., N, N) -> (..., N)."""
    cumulative = attn.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return ((cumulative < mass).sum(dim=-1) + 1).clamp(max=attn.shape[-1]).float()


class TrainingSpeed(L.Callback):
    """Images per second of the training loop (evaluation is not run during fit)."""

    def __init__(self) -> None:
        self.images, self.seconds, self._start = 0, 0.0, 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, idx
    ) -> None:
        self.images += int(batch[0].shape[0])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds += time.perf_counter() - self._start
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f", train loss {float(loss):.3f}" if loss is not None else ""
        print(
            f"  epoch {trainer.current_epoch}: {self.images / self.seconds:.1f} img/s{loss_text}", flush=True
        )


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, stride: int) -> dict[str, Any]:
    """Test top-1 on every image; attention concentration per layer on every ``stride``-th image."""
    model.eval()
    correct = seen = 0
    entropy: dict[int, list[torch.Tensor]] = {}
    keys90: dict[int, list[torch.Tensor]] = {}
    for images, labels in loader:
        correct += int((model(images).argmax(dim=-1) == labels).sum())
        seen += len(labels)
        for layer, attn in attention_maps(model, images[::stride]).items():  # (b, heads, N, N)
            entropy.setdefault(layer, []).append(attention_entropy(attn).flatten())
            keys90.setdefault(layer, []).append(keys_for_mass(attn, 0.9).flatten())
    per_layer_entropy = [torch.cat(entropy[i]).mean().item() for i in sorted(entropy)]
    per_layer_keys = [torch.cat(keys90[i]).mean().item() for i in sorted(keys90)]
    return {
        "top1": correct / seen,
        "entropy": sum(per_layer_entropy) / len(per_layer_entropy),
        "keys90": sum(per_layer_keys) / len(per_layer_keys),
        "entropy_per_layer": per_layer_entropy,
        "keys90_per_layer": per_layer_keys,
    }


def train_and_measure(
    recipe: dict[str, Any], data: ImageFolderDataModule, attention: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    L.seed_everything(recipe.get("seed_everything", 0), verbose=False)
    model_cfg = recipe["model"]
    module = ImageClassifier(
        model_name=model_cfg["model_name"],
        model_options={**model_cfg.get("model_options", {}), **attention},
        classes=data.classes,
        lr=model_cfg["lr"],
        min_lr=model_cfg["min_lr"],
        weight_decay=model_cfg["weight_decay"],
        warmup_epochs=model_cfg["warmup_epochs"] / recipe["trainer"]["max_epochs"] * args.epochs,
        label_smoothing=model_cfg["label_smoothing"],
    )
    speed = TrainingSpeed()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        limit_train_batches=args.train_fraction,
        limit_val_batches=0,  # evaluation below, outside the timed loop
        num_sanity_val_steps=0,
        precision=recipe["trainer"].get("precision", "32-true"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[speed],
    )
    trainer.fit(module, datamodule=data)
    result = evaluate(module.model, data.val_dataloader(), args.attention_stride)
    result["img_per_s"] = speed.images / speed.seconds
    result["train_images"] = speed.images
    return result


def step_speed(
    recipe: dict[str, Any], modes: list[tuple[str, dict[str, Any]]], rounds: int, iters: int = 3
) -> dict[str, float]:
    """Training-step images/s (forward, backward, AdamW) of each mode on one random batch, timed in
    alternating rounds so that every mode sees the same background load; the median of rounds."""
    model_cfg, batch = recipe["model"], recipe["data"]["batch_size"]
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    steps = {}
    for name, attention in modes:
        model = create_model(
            model_cfg["model_name"], num_classes=10, **model_cfg["model_options"], **attention
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model: torch.nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up
        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(iters):
                step()
            times[name].append((time.perf_counter() - start) / iters)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", default="~/.cache/vitkit/cifar10", help="CIFAR-10 folder with train/ and test/"
    )
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--train-fraction", type=float, default=0.15, help="of the training batches, per epoch"
    )
    parser.add_argument(
        "--ks", type=int, nargs="+", default=[16, 4], help="hard_k values to compare with soft"
    )
    parser.add_argument("--estimator", default="ste", choices=["ste", "gumbel"])
    parser.add_argument("--attention-stride", type=int, default=10, help="every n-th test image for the maps")
    parser.add_argument("--speed-rounds", type=int, default=5, help="alternating rounds of the step timing")
    parser.add_argument(
        "--speed-only", action="store_true", help="only the alternating training-step timing, no training"
    )
    args = parser.parse_args()

    start = time.perf_counter()
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    modes: list[tuple[str, dict[str, Any]]] = [("soft", {})]
    modes += [
        (f"hard, k = {k}", {"attn_mode": "hard", "hard_k": k, "hard_estimator": args.estimator})
        for k in args.ks
    ]
    if args.speed_only:
        speed = step_speed(recipe, modes, args.speed_rounds)
        print(
            f"\nTraining step, batch {recipe['data']['batch_size']}, alternating rounds (median of "
            f"{args.speed_rounds}). Wall time {time.perf_counter() - start:.0f} s.\n"
        )
        print("| attention | train step img/s | vs soft |\n|---|---:|---:|")
        for name, rate in speed.items():
            print(f"| {name} | {rate:.0f} | {rate / speed['soft']:.2f}x |")
        return

    data = ImageFolderDataModule(Path(args.root).expanduser(), **recipe["data"])
    data.setup("fit")  # decode the JPEGs into the memory cache once; every run reuses it
    print(f"data ready in {time.perf_counter() - start:.0f} s", flush=True)
    results = {}
    for name, attention in modes:
        print(f"{name}:", flush=True)
        results[name] = train_and_measure(recipe, data, attention, args)
        print(f"  {results[name]}", flush=True)
    speed = step_speed(recipe, modes, args.speed_rounds)

    images = results["soft"]["train_images"]
    print(
        f"\n{args.epochs} epochs x {args.train_fraction:g} of the training set ({images} images per model), "
        f"{args.estimator} estimator; attention on every {args.attention_stride}th test image "
        f"(uniform over 64 keys: entropy {math.log(64):.2f}). "
        f"Wall time {time.perf_counter() - start:.0f} s.\n"
    )
    print(
        "| attention | test top-1 | train img/s (in the run) | train step img/s (alternating) | vs soft "
        "| mean row entropy (nats) | keys holding 90% of a row |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['top1']:.1%} | {r['img_per_s']:.0f} | {speed[name]:.0f} "
            f"| {speed[name] / speed['soft']:.2f}x | {r['entropy']:.2f} | {r['keys90']:.1f} |"
        )
    print("\nPer layer (entropy / keys for 90%):")
    for name, r in results.items():
        cells = ", ".join(
            f"{h:.2f}/{k:.1f}" for h, k in zip(r["entropy_per_layer"], r["keys90_per_layer"], strict=True)
        )
        print(f"- {name}: {cells}")


if __name__ == "__main__":
    main()
