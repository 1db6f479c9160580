"""Where a training step's time goes: MFU plus the device time per step by kernel kind.

`vitkit bench` says how fast vitkit's step is against timm's; this script says why it is not
faster. For each batch size it times vitkit's bf16 training step (forward, backward, fused AdamW)
on a batch already on the device, profiles a few steps, and splits the device time into matrix
products, attention, the optimizer, copies, and the rest (LayerNorm, GELU, residual adds, casts:
the memory-bound work, fused by ``torch.compile``). The FLOPs of the matrix products and of
attention are counted by torch (``FlopCounterMode``, on the step's own kernels), so each kind
also gets the TFLOP/s it ran at, and the bytes an eager step's operators read and write are
counted by kind too (on any device, a CPU included).

Two kinds of bf16 step (``--weights``): ``fp32`` is ``torch.autocast`` over fp32 weights (what
``vitkit bench --precision bf16`` and Lightning's ``bf16-mixed`` run): the matrix products run in
bf16, but the residual stream, LayerNorm and the gradients stay in fp32. ``bf16`` keeps the weights,
and so every activation and gradient, in bf16, and updates an fp32 master copy of the weights
with fused AdamW: the mixed precision of FSDP's ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``
and of Megatron, with half the memory traffic in the memory-bound kernels.

    python benchmarks/mfu_profile.py --model vit_base_patch16_224 --compile --sdpa-backends auto cudnn
    python benchmarks/mfu_profile.py --compile --compile-mode reduce-overhead --weights fp32 bf16

Writes the top kernels of each setting to ``--kernels FILE`` when given.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import vitkit
from vitkit.bench.speed import (
    _adamw,
    _check_device,
    _example_batch,
    _on_sdpa_backend,
    _peak_tflops,
    _sync,
    _time,
    _train_step_fn,
    model_flops_per_image,
)

# Kernel (or, on a CPU, operator) names by kind, tried in this order.
KINDS = (
    # cuDNN's attention runs helper kernels of its own (cudnn::fusion::compute_dot_do_o, convert_dq_...)
    ("attention", re.compile(r"flash|fmha|attention|sdpa|fort_native|cudnn::fusion", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("matmul", re.compile(r"gemm|xmma|cutlass|nvjet|triton_tem|\bmm\b|addmm|bmm|matmul|convolution", re.I)),
    # plain copies only: Inductor's fused kernels are named after their ops, casts ("_to_copy") included
    ("copy", re.compile(r"memcpy|memset|^aten::copy_$|^aten::_to_copy$", re.I)),
)
OTHER = "other (norms, activations, adds, casts)"


def kind_of(name: str) -> str:
    """The kind of a kernel or operator name (see :data:`KINDS`)."""
    return next((kind for kind, pattern in KINDS if pattern.search(name)), OTHER)


def _flops_by_kind(step) -> dict[str, float]:
    """FLOPs of one call of ``step`` by kind, on the kernels the step really uses (the fused
    attention counted with what it recomputes: the work the kernel does, not the model FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops: dict[str, float] = defaultdict(float)
    for op, count in counter.get_flop_counts().get("Global", {}).items():
        flops["attention" if "attention" in str(op) else "matmul"] += count
    return flops


def _bytes_by_kind(step) -> dict[str, float]:
    """Bytes the operators of one eager call of ``step`` read and write, by kind: every operator's
    tensor inputs and outputs, views excluded (they move nothing). Unfused, so more than a compiled
    step moves, but the same accounting for every setting: it shows what a change of dtypes saves."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    moved: dict[str, float] = defaultdict(float)

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            if not func.is_view and name not in ("detach", "alias"):
                tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
                moved[kind_of(f"aten::{name}")] += sum(t.numel() * t.element_size() for t in tensors)
            return out

    step()  # the optimizer's first step creates its state: count a later one
    with _Count():
        step()
    return dict(moved)


def _device_time_by_kind(prof, device: torch.device, steps: int) -> tuple[dict[str, float], list]:
    """Seconds per step by kind, and the kernels (name, seconds per step) sorted by time."""
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if device.type == "cuda":
            # kernels only: not the ranges that mark user code on the device's timeline
            on_device = event.device_type == torch.autograd.DeviceType.CUDA
            if not on_device or getattr(event, "is_user_annotation", False):
                continue
            us = event.time_range.elapsed_us()
        else:
            if not event.name.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        per_kernel[event.name] += us / 1e6 / steps
    by_kind: dict[str, float] = defaultdict(float)
    for name, seconds in per_kernel.items():
        by_kind[kind_of(name)] += seconds
    return by_kind, sorted(per_kernel.items(), key=lambda item: -item[1])


def bf16_weights_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-4):
    """One training step of a model whose weights are bf16: forward and backward in bf16, then
    fused AdamW on an fp32 master copy of the weights, copied back into the model's bf16 weights.

    ``model`` (or the compiled module around it) must already hold bf16 parameters.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().requires_grad_() for p in params]
    for weight in master:
        weight.grad = torch.zeros_like(weight)
    optimizer = _adamw(master, x.device, lr=lr)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        with torch.no_grad():
            torch._foreach_copy_([w.grad for w in master], [p.grad for p in params])  # bf16 -> fp32
            optimizer.step()
            torch._foreach_copy_(params, master)  # fp32 -> bf16, rounded to nearest
        for p in params:
            p.grad = None

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def measure(
    args: argparse.Namespace, batch_size: int, sdpa_backend: str | None, device: torch.device, weights: str
) -> dict:
    torch.manual_seed(0)
    torch._dynamo.reset()  # a fresh graph per setting: the attention kernel is chosen when tracing
    options = json.loads(args.options)
    model = vitkit.create_model(args.model, **options).to(device).train()
    x, y = _example_batch(model, batch_size, device, torch.contiguous_format)
    flops_per_image = model_flops_per_image(model, x, y, "train", "bf16")
    if weights == "bf16":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    compiled = torch.compile(model, mode=args.compile_mode, dynamic=False) if args.compile else model

    def train_step(module: torch.nn.Module):
        if weights == "bf16":
            return bf16_weights_step_fn(module, x, y)
        return _train_step_fn(module, x, y, "bf16")

    step = _on_sdpa_backend(train_step(compiled), sdpa_backend)
    start = time.perf_counter()
    for _ in range(3):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = sorted(_time(step, args.iters, device) for _ in range(args.rounds))[args.rounds // 2]
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    kernel_flops = _flops_by_kind(_on_sdpa_backend(train_step(model), sdpa_backend))
    eager_bytes = _bytes_by_kind(_on_sdpa_backend(train_step(model), sdpa_backend))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        _sync(device)
    by_kind, kernels = _device_time_by_kind(prof, device, args.profile_steps)
    peak = _peak_tflops(device, "bf16", args.peak_tflops)
    images_per_s = batch_size / seconds
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": batch_size,
        "compile": (args.compile_mode or "default") if args.compile else "off",
        "weights": weights,
        "sdpa_backend": sdpa_backend,
        "images_per_s": images_per_s,
        "step_ms": seconds * 1e3,
        "warmup_s": warmup_s,
        "model_gflops_per_image": flops_per_image / 1e9,
        "mfu": images_per_s * flops_per_image / (peak * 1e12) if peak else None,
        "peak_gb": peak_gb,
        "device_ms_by_kind": {k: v * 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "eager_gb_by_kind": {k: v / 1e9 for k, v in eager_bytes.items()},
        "tflops_by_kind": {
            k: kernel_flops[k] / by_kind[k] / 1e12 for k in ("matmul", "attention") if by_kind.get(k)
        },
        "top_kernels_ms": [(name, s * 1e3) for name, s in kernels[:25]],
    }


def report(result: dict) -> str:
    step_ms = result["step_ms"]
    busy = sum(result["device_ms_by_kind"].values())
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
    lines = [
        f"batch {result['batch_size']}, {result['weights']} weights, compile {result['compile']}, "
        f"sdpa {result['sdpa_backend'] or 'auto'}: "
        f"{result['images_per_s']:.1f} img/s, {step_ms:.2f} ms/step, MFU {mfu} "
        f"({result['model_gflops_per_image']:.2f} model GFLOPs/img), peak {result['peak_gb'] or 0:.1f} GB, "
        f"first 3 steps {result['warmup_s']:.0f} s",
        "| kind | ms/step | share of the step | TFLOP/s | GB read + written (eager, unfused) |",
        "|---|---:|---:|---:|---:|",
    ]
    moved = result["eager_gb_by_kind"]
    for kind in dict.fromkeys([*result["device_ms_by_kind"], *moved]):
        ms = result["device_ms_by_kind"].get(kind, 0.0)
        tflops = result["tflops_by_kind"].get(kind)
        gb = f"{moved[kind]:.2f}" if kind in moved else ""
        lines.append(
            f"| {kind} | {ms:.2f} | {ms / step_ms:.1%} | {f'{tflops:.0f}' if tflops else ''} | {gb} |"
        )
    idle = max(step_ms - busy, 0)
    lines.append(f"| device idle | {idle:.2f} | {idle / step_ms:.1%} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--options", default="{}", help="model options as JSON")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument(
        "--sdpa-backends",
        nargs="+",
        choices=["auto", "flash", "efficient", "cudnn", "math"],
        default=["auto"],
        help="attention kernels to try (auto: PyTorch picks)",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        choices=["fp32", "bf16"],
        default=["fp32"],
        help="fp32: autocast to bf16 over fp32 weights; bf16: bf16 weights, fp32 master copy (see above)",
    )
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--kernels", type=Path, default=None, help="write every setting's top kernels here")
    args = parser.parse_args(argv)
    device = _check_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(torch.cuda.get_device_name(device), "torch", torch.__version__, flush=True)
    results = []
    settings = [
        (b, None if s == "auto" else s, w)
        for w in args.weights
        for s in args.sdpa_backends
        for b in args.batch_sizes
    ]
    for batch_size, sdpa_backend, weights in settings:
        result = measure(args, batch_size, sdpa_backend, device, weights)
        results.append(result)
        print(report(result), flush=True)
        for name, ms in result["top_kernels_ms"][:8]:
            print(f"    {ms:8.3f} ms  {name[:110]}")
        if args.kernels:
            args.kernels.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
