"""DDP on 2 CPU processes (gloo): ranks stay in sync, one checkpoint, and it resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitkit.data import make_shapes_dataset, scan_image_folder

SCRIPT = Path(__file__).with_name("ddp_script.py")
FOLDER_SCRIPT = Path(__file__).with_name("ddp_folder_script.py")


def _run(*args: str, script: Path = SCRIPT) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=script.parent,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_ddp_two_cpu_processes_sync_checkpoint_and_resume(tmp_path):
    _run(str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    # 192 training images / (16 per rank x 2 ranks) = 6 optimizer steps, the same on both ranks
    assert rank0["step"] == rank1["step"] == 6
    for name, weight in rank0["weights"].items():
        torch.testing.assert_close(weight, rank1["weights"][name], rtol=0, atol=0, msg=name)
    # seed_everything seeds both ranks alike; PerRankRandomness gives each its own draws
    # (augmentation on the device, Mixup, dropout), while the all-reduce keeps the weights equal
    assert len(rank0["draws"]) == len(rank1["draws"]) == 6
    assert all(a != b for a, b in zip(rank0["draws"], rank1["draws"], strict=True))
    start = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert start["global_step"] == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch=0-step=6.ckpt",
        "last.ckpt",
    ]

    _run(str(tmp_path), str(tmp_path / "checkpoints" / "last.ckpt"))
    resumed0, resumed1 = (torch.load(tmp_path / f"rank{r}_resumed.pt", weights_only=True) for r in (0, 1))
    assert resumed0["step"] == resumed1["step"] == 12
    for name, weight in resumed0["weights"].items():
        torch.testing.assert_close(weight, resumed1["weights"][name], rtol=0, atol=0, msg=name)
    assert not torch.equal(resumed0["weights"]["head.weight"], rank0["weights"]["head.weight"])
    # the checkpoint holds rank 0's generators: both ranks restore them, and rank 1 splits off again
    assert all(a != b for a, b in zip(resumed0["draws"], resumed1["draws"], strict=True))


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # Rank 1's loss alone is NaN at step 2. The flag is all-reduced: both ranks skip that step (their
    # weights stay those from before it) and both stop, rather than rank 0 waiting forever in the
    # next gradient all-reduce for a rank that has gone.
    _run(str(tmp_path), "nan")
    results = [torch.load(tmp_path / f"nan_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert "training loss is nan at step 2 (epoch 0, batch 2" in results[1]["error"]
    assert "training loss of another process at step 2 (epoch 0, batch 2" in results[0]["error"]
    for result in results:
        for name, weight in result["before"].items():
            torch.testing.assert_close(result["after"][name], weight, rtol=0, atol=0, msg=name)


def test_annealing_by_time_gives_every_rank_the_same_lr(tmp_path):
    # The ranks' clocks differ by 7 s (of 100): each reading its own would give each its own LR,
    # and the replicas' weights would drift apart although their gradients are all-reduced.
    _run(str(tmp_path), "time")
    rank0, rank1 = (torch.load(tmp_path / f"time_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["step"] == rank1["step"] == 10  # Lightning stops both at 100 s on rank 0's clock
    assert rank0["lr"] == rank1["lr"] == pytest.approx(3e-5)  # annealed to the floor in the time
    for name, weight in rank0["weights"].items():
        torch.testing.assert_close(weight, rank1["weights"][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_folder_data_is_split_between_ranks_without_duplicates(tmp_path, cache):
    root = tmp_path / "data"
    make_shapes_dataset(root, num_train=30, num_val=10, img_size=16, seed=0)  # 30 images: 15 per rank
    _run(str(root), str(tmp_path), cache, script=FOLDER_SCRIPT)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sampler"] == "DistributedSampler" and r["shuffle"] for r in ranks)
    assert all(r["seed"] == 7 for r in ranks)  # the data module's seed (Lightning's would be 0)
    assert all(r["loader"] == "EpochLoader" for r in ranks)  # its pass still starts after set_epoch
    assert ranks[0]["classes"] == ranks[1]["classes"]
    seen0, seen1 = ranks[0]["files"], ranks[1]["files"]
    assert len(seen0) == len(seen1) == 15 and len(set(seen0)) == 15
    assert not set(seen0) & set(seen1)  # no image on both ranks ...
    _, samples = scan_image_folder(root / "train")
    assert set(seen0) | set(seen1) == {str(Path(p).relative_to(root)) for p, _ in samples}  # ... none missed


def test_repeated_augmentation_sends_the_copies_of_an_image_to_different_ranks(tmp_path):
    root = tmp_path / "data"
    make_shapes_dataset(root, num_train=30, num_val=10, img_size=16, seed=0)
    _run(str(root), str(tmp_path), "none", "2", script=FOLDER_SCRIPT)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sampler"] == "RepeatedAugmentation" and r["seed"] == 7 for r in ranks)
    seen0, seen1 = ranks[0]["files"], ranks[1]["files"]
    # the epoch keeps its length (15 per rank) and holds 15 images twice: one copy on each rank
    assert len(seen0) == len(seen1) == 15 and len(set(seen0)) == 15
    assert set(seen0) == set(seen1)
