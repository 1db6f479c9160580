"""Run by test_training_ddp.py: the folder DataModule under DDP on 2 CPU processes (gloo).

Usage: python ddp_folder_script.py DATA_ROOT OUT_DIR CACHE [REPEATS]   (CACHE: none | memory)
Each rank writes OUT_DIR/rank<r>.json: the training files it loaded in its one epoch (from the
DataModule's distributed sampler) and the class list.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_script import two_cpu_ranks
from test_training_module import TINY

from vitkit.data import ImageFolderDataModule, scan_image_folder
from vitkit.training import ImageClassifier
from vitkit.training.cli import _leave_process_group


def main() -> None:
    root, out, cache = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    L.seed_everything(0)
    data = ImageFolderDataModule(
        root,
        img_size=16,
        batch_size=4,
        num_workers=0,
        cache=False if cache == "none" else cache,
        drop_last=False,
        seed=7,  # the shuffling's seed, not seed_everything's
        repeated_aug=repeats,
    )
    module = ImageClassifier(model_name="vit_tiny_patch4_32", model_options=TINY, classes=data.classes)
    trainer = two_cpu_ranks(out)
    trainer.fit(module, datamodule=data)
    loader = trainer.train_dataloader
    dataset = loader.dataset
    indices = list(loader.sampler)  # this rank's share of the epoch
    if cache == "none":
        files = [str(Path(dataset.samples[i][0]).relative_to(root)) for i in indices]
    else:  # a cached image -> its index in the scanned file list
        positions = dataset.positions if dataset.positions is not None else torch.arange(len(dataset))
        source = dataset.cache.source_index[positions].tolist()
        train_files = [path for path, _ in scan_image_folder(root / "train")[1]]
        files = [str(Path(train_files[source[i]]).relative_to(root)) for i in indices]
    record = {"files": files, "classes": data.classes, "sampler": type(loader.sampler).__name__}
    record["shuffle"] = loader.sampler.shuffle
    record["seed"] = loader.sampler.seed
    record["loader"] = type(loader).__name__  # Lightning kept the data module's loader and sampler
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
    _leave_process_group()  # as `vitkit fit` does: exiting with Gloo's threads up can abort
