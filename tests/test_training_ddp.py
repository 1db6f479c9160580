"""DDP on 2 CPU processes (gloo): ranks stay in sync, one checkpoint, and it resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("ddp_script.py")


def _run(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=SCRIPT.parent,
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
