"""Regional compilation: compile one Transformer block, reuse it for all of them.

``torch.compile(model)`` traces the whole network and compiles every block as if each were new:
the compile time grows with the depth, and it is paid again for each new input shape and for
evaluation. Every block of a ViT runs the same code on the same shapes, so compiling the blocks
one by one lets ``torch.compile`` compile that code once and reuse it for the other blocks (PyTorch's
"regional compilation"). The price is the fusion across block boundaries: a residual add and the next
block's LayerNorm then run as two kernels instead of one.

BENCHMARKS.md ("Compile time") measures both: on its 2-core CPU the blocks compiled one by one
reach the first training step about 3x sooner than the whole model compiled.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def compile_blocks(model: nn.Module, **compile_options: Any) -> nn.Module:
    """A view of ``model`` whose ``blocks`` are each wrapped in ``torch.compile(block,
    **compile_options)``. The view shares every parameter and buffer with ``model``; only the
    container of blocks is its own.

    Use the view to train fast; ``model`` itself stays eager (its state dict, hooks and
    explanations are unchanged). The view is built once: switch ``model`` to gradient
    checkpointing, or replace its head, before you call this.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"compile_blocks needs a model with a sequence of blocks in `.blocks`; "
            f"{type(model).__name__} has none. Use torch.compile(model) instead."
        )
    view = copy.copy(model)  # same attributes, parameters and buffers as the model ...
    view._modules = dict(model._modules)  # ... but its own registry of submodules
    compiled = [torch.compile(block, **compile_options) for block in blocks]
    view.blocks = nn.Sequential(*compiled) if isinstance(blocks, nn.Sequential) else nn.ModuleList(compiled)
    return view
