"""Shared test settings: deterministic, single-threaded-friendly, tiny models."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _float32_matmul_precision():
    # a test that runs a GPU script in-process (the speedrun turns TF32 on) must not change the
    # precision later tests see
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
"""Options of the tiny ViT most tests use: a 4x4 grid of 32-wide tokens."""


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts host reads (``item``, ``bool``...) of device values computed since ``start_window``.

    On a GPU such a read waits for the device to finish everything queued so far, this step's work
    included: the CPU stops feeding the GPU. This CPU stand-in follows which tensors derive from the
    device (the batch, the parameters, tensors created with an explicit ``device=``, and anything
    computed from them); tensors made from Python numbers live on the host, and a value from an
    earlier window (already copied to the host) waits for nothing, so neither counts. Besides the
    plain reads, operations whose output size depends on the values (a boolean mask as an index,
    ``nonzero``, ``masked_select``, ``unique``) count: on a GPU they wait for the values too. So
    does ``torch.tensor(..., device=)`` / ``torch.as_tensor(..., device=)``: a blocking copy of host
    data, after which PyTorch synchronises the stream. (``.to(device)`` is not followed: on a CPU,
    Lightning moves batches without ``non_blocking``, which it sets on a GPU.)
    """

    READS = frozenset(
        {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.__float__}
        | {torch.Tensor.__int__, torch.Tensor.numpy}
        | {torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select}
        | {torch.unique, torch.Tensor.unique}
    )
    INDEXING = frozenset({torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_})
    FROM_HOST = frozenset({torch.tensor, torch.as_tensor})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.device: dict[int, torch.Tensor] = {}  # id -> tensor, kept alive so that no id is reused
        self.new: set[int] = set()  # device values made in this window

    def start_window(self, roots) -> None:
        self.count, self.new = 0, set()
        self.device.update({id(t): t for t in roots})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        flat = [
            a
            for arg in (*args, *(kwargs or {}).values())
            for a in (arg if isinstance(arg, tuple | list) else (arg,))
        ]
        if func in self.READS and args and id(args[0]) in self.new:
            self.count += 1
        if func in self.INDEXING and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple | list) else (args[1],)
            if any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool and id(i) in self.new for i in index
            ):
                self.count += 1
        kwargs = kwargs or {}
        if func in self.FROM_HOST and kwargs.get("device") is not None:
            self.count += 1
        out = func(*args, **kwargs)
        if any(id(a) in self.device for a in flat) or kwargs.get("device") is not None:
            inputs = {id(a) for a in flat}
            for value in out if isinstance(out, tuple | list) else (out,):
                if isinstance(value, torch.Tensor) and id(value) not in inputs:  # not an in-place update
                    self.device[id(value)] = value
                    self.new.add(id(value))
        return out
