"""Model speed: vitkit against the same timm model, in one process, alternating.

For a model name and input size it measures training-step and inference throughput (images/s),
FLOPs per image (counted with ``torch.utils.flop_counter``, not guessed), peak memory, and on a
GPU the model FLOPs utilisation: MFU = images/s x training FLOPs per image / device peak.

The two models get the same weights and the same inputs, and are timed in alternating rounds so
that a shared, noisy machine slows both alike; the ratio is the number to read.

    python -m vitkit.bench --model vit_tiny_patch4_32 --batch-size 128 --precision fp32 bf16
    python -m vitkit.bench --model vit_small_patch16_224 --img-size 384 --channels-last --compile
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vitkit

# Dense peak TFLOP/s by device name (vendor datasheets, SXM parts, no sparsity): bf16 and TF32 on the
# tensor cores, and plain fp32 (what an fp32 matmul runs at with torch's default "highest" precision).
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "4090": {"bf16": 165.0, "tf32": 82.6, "fp32": 82.6},
}

_TIMM_IGNORES = ("model_name", "weight_init", "norm_eps", "pos_embed", "fused_attn")


@dataclass
class SpeedResult:
    library: str
    mode: str
    precision: str
    images_per_s: float
    flops_per_image: float
    peak_memory_mb: float | None
    mfu: float | None
    input_size: tuple[int, int, int] | None = None  # (C, H, W), as timm's pretrained_cfg writes it


def cpu_has_bf16_arithmetic() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AVX512-BF16 or AMX on x86, bf16 on Arm.

    Elsewhere (an AVX2-only x86 CPU, such as AMD's Zen 1 to 3) oneDNN emulates bf16, and a ViT's
    bf16-autocast training step runs at about a tenth of its fp32 step (BENCHMARKS.md).
    """
    try:
        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return True
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return False
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch without these probes: assume it is fine
        return True


def timm_twin(model: nn.Module) -> nn.Module:
    """The timm ``VisionTransformer`` with the same options and weights as a vitkit model."""
    twin = _timm_architecture(model)
    twin.load_state_dict(model.state_dict())
    return twin


def _timm_architecture(model: nn.Module) -> nn.Module:
    """timm's ``VisionTransformer`` with a vitkit model's options (its own initial weights)."""
    if lacking := model.options_timm_lacks():
        raise ValueError(f"timm's ViT has no {' and no '.join(lacking)}: compare models without them.")
    options = {k: v for k, v in model.config.items() if k not in _TIMM_IGNORES}
    options["pos_embed"] = "learn" if model.pos_embed is not None else "none"  # sincos tables load as weights
    norm = {"layernorm": timm.layers.LayerNorm, "rmsnorm": timm.layers.RmsNorm}[
        options.pop("norm_layer", "layernorm")
    ]
    options["norm_layer"] = partial(norm, eps=model.config.get("norm_eps", 1e-6))
    if options.pop("embed_norm", False):
        options["embed_norm_layer"] = options["norm_layer"]
    if "mlp_layer" in options:  # timm takes the MLP as a class
        options["mlp_layer"] = {"swiglu": timm.layers.SwiGLU, "swiglu_packed": timm.layers.SwiGLUPacked}[
            options["mlp_layer"]
        ]
    if options.pop("distilled", False):  # DeiT's distillation token and second head: timm's own class
        return timm.models.deit.VisionTransformerDistilled(**options)
    return timm.models.vision_transformer.VisionTransformer(**options)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_step_fn(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, fused: bool = True
) -> Callable[[], None]:
    """One training step: forward, backward, AdamW (fused where the device has it; ``fused=False``:
    the foreach AdamW)."""
    optimizer = _adamw(model.parameters(), x.device, fused=fused)

    def step() -> None:
        with _autocast(x.device, precision):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.optimizer = optimizer  # type: ignore[attr-defined]  # (its state counts as the model's memory)
    return step


def _adamw(params: Any, device: torch.device, lr: float = 1e-4, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW as the benchmarks step it: the fused kernel where the device has one (``fused=False``:
    the foreach one)."""
    kind = {"fused": device.type in ("cuda", "cpu")} if fused else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, **kind)


def _resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None, *tensors: torch.Tensor) -> int:
    """Bytes a model keeps between steps: weights, buffers, its optimizer's state, and ``tensors``."""
    held = [*model.parameters(), *model.buffers(), *tensors]
    if optimizer is not None:
        held += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in held)


def _step_fn(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, precision: str
) -> Callable[[], None]:
    """A training step (``mode="train"``) or a forward pass of ``model`` on (``x``, ``y``)."""
    return _train_step_fn(model, x, y, precision) if mode == "train" else _infer_fn(model, x, precision)


def _example_batch(
    model: nn.Module, batch_size: int, device: torch.device | str, memory_format: torch.memory_format
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images at the model's input size (in ``memory_format``) and labels of its classes."""
    x = torch.randn(batch_size, model.patch_embed.in_chans, *model.img_size, device=device)
    y = torch.randint(0, max(model.num_classes, 1), (batch_size,), device=device)
    return x.contiguous(memory_format=memory_format), y


def _infer_fn(model: nn.Module, x: torch.Tensor, precision: str) -> Callable[[], None]:
    @torch.inference_mode()
    def step() -> None:
        with _autocast(x.device, precision):
            model(x)

    return step


def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call of ``step`` (matmuls, convolutions, attention), counted by torch."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def model_flops_per_image(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str = "train", precision: str = "fp32"
) -> float:
    """The model FLOPs of one image in a training step (``mode="train"``) or a forward pass.

    Counted on the first image of the batch (every op of a ViT is per image, so the count is
    linear in the batch), with attention on PyTorch's math kernel, whose two matmuls are the
    model's own: the fused kernels are counted with the attention scores they recompute in the
    backward pass (hardware FLOPs, not model FLOPs, which MFU is defined by), and the CPU's flash
    kernel is not counted at all. The training step also updates the weights once.
    """
    step = _step_fn(model, x[:1], y[:1], mode, precision)
    with sdpa_kernel(SDPBackend.MATH):
        return count_flops(step)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[], None], iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iters


SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def _on_sdpa_backend(step: Callable[[], None], backend: str | None) -> Callable[[], None]:
    """``step`` with ``scaled_dot_product_attention`` restricted to one kernel (None: PyTorch picks)."""
    if backend is None:
        return step

    def restricted() -> None:
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            step()

    return restricted


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1])


def _cpu_peak_mib(
    library: str,
    model_name: str,
    model_options: dict,
    batch_size: int,
    mode: str,
    precision: str,
    compile: bool,
    compile_mode: str | None,
    channels_last: bool,
    threads: int,
    sdpa_backend: str | None = None,
) -> float | None:
    """Run in a fresh process: how far one step (after a first one) raises the process's peak
    resident memory above what it held before the model existed (weights, gradients, optimizer
    state, activations and what the allocator keeps). Linux only (``/proc``); else None.

    A process of its own for each library and setting, because memory a step frees stays resident
    (the C allocator keeps it for reuse), so the second model timed in one process would look
    cheaper than the first.
    """
    torch.set_num_threads(threads)
    before = _proc_status_kib("VmRSS")
    if before is None:
        return None
    torch.manual_seed(0)
    with torch.device("meta"):  # the architecture without weights, so that only one model is resident
        spec = vitkit.create_model(model_name, **model_options)
    if library == "timm":
        model = _timm_architecture(spec)
    else:
        model = vitkit.create_model(model_name, **model_options)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train(mode == "train")
    x, y = _example_batch(spec, batch_size, "cpu", memory_format)
    if compile:
        model = torch.compile(model, mode=compile_mode)
    step = _on_sdpa_backend(_step_fn(model, x, y, mode, precision), sdpa_backend)
    step()
    try:  # reset the high-water mark to the current resident size (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    step()
    peak = _proc_status_kib("VmHWM")
    return None if peak is None else (peak - before) / 1024


def _in_fresh_process(fn: Callable[..., float | None], *args: Any) -> float | None:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def _peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    """The device's peak for ``precision``: MFU is measured against the arithmetic the step can use
    (an fp32 step against the fp32 peak, or TF32's when ``torch.set_float32_matmul_precision``
    allows it), by the longest name in :data:`PEAK_TFLOPS` found in the device's name."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = max((k for k in PEAK_TFLOPS if k in name), key=len, default=None)  # "A100" before "A10"
    if key is None:
        return None
    if precision == "bf16":
        return PEAK_TFLOPS[key]["bf16"]
    return PEAK_TFLOPS[key]["fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"]


def _check_device(device: str) -> torch.device:
    """``device`` as a ``torch.device``, or a clear error when this machine does not have it."""
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count()  # 0 without a driver, without raising
        if (dev.index or 0) >= count:  # also count == 0
            raise ValueError(
                f"--device {device}: this machine has {count} CUDA device(s). Use --device cpu"
                + (f" or cuda:0..cuda:{count - 1}." if count else ".")
            )
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: vitkit bench measures on 'cpu' or 'cuda[:N]'.")
    return dev


def compare(
    model_name: str,
    batch_size: int = 64,
    precisions: Sequence[str] = ("fp32",),
    modes: Sequence[str] = ("train", "infer"),
    device: str = "cpu",
    fused_attn: bool = True,
    compile: bool = False,
    compile_mode: str | None = None,
    rounds: int = 5,
    iters: int = 5,
    warmup: int = 3,
    peak_tflops: float | None = None,
    channels_last: bool = False,
    cpu_memory: bool = False,
    sdpa_backend: str | None = None,
    **model_options,
) -> list[SpeedResult]:
    """Time vitkit and its timm twin, alternating ``rounds`` times; median images/s per setting.

    ``model_options`` go to :func:`vitkit.create_model` (``img_size``, ``in_chans``, ...) and, through
    the model's config, to the timm twin. ``compile_mode``: torch.compile's ``mode`` (e.g.
    "max-autotune-no-cudagraphs": Triton matmul templates with fused epilogues, a longer first
    compilation), with ``compile=True``. ``channels_last``: images and the patch-embedding
    convolution in channels-last memory format (timm's ``benchmark.py --channels-last``).
    ``sdpa_backend``: both models' fused attention on one kernel of :data:`SDPA_BACKENDS` ("cudnn":
    cuDNN's attention, which PyTorch does not always pick by itself on an H100); a kernel that
    cannot run the inputs (on a CPU: any but "flash" and "math") raises PyTorch's "No viable
    backend" error. Peak memory: on a GPU, the model's own weights, buffers, optimizer state and
    inputs plus the most one step allocates on top of what is resident (the other library's model,
    also resident, is not counted); on a CPU with ``cpu_memory=True``, the peak resident memory one
    step adds, each library and setting measured in a fresh process (:func:`_cpu_peak_mib`; a few
    seconds each).
    """
    dev = _check_device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    ours = vitkit.create_model(model_name, fused_attn=fused_attn, **model_options)
    theirs = timm_twin(ours).to(dev, memory_format=memory_format)
    ours.to(dev, memory_format=memory_format)
    eager = {"vitkit": ours, "timm": theirs}
    models = {k: torch.compile(m, mode=compile_mode) for k, m in eager.items()} if compile else eager
    x, y = _example_batch(ours, batch_size, dev, memory_format)
    results = []
    for precision in precisions:
        peak = _peak_tflops(dev, precision, peak_tflops)
        for mode in modes:
            steps, optimizers = {}, {}
            for name, model in models.items():
                model.train(mode == "train")
                step = _step_fn(model, x, y, mode, precision)
                optimizers[name] = getattr(step, "optimizer", None)
                steps[name] = _on_sdpa_backend(step, sdpa_backend)
            # counted on the eager models: a dispatch-mode counter cannot see into compiled graphs
            flops = {
                name: model_flops_per_image(model, x, y, mode, precision) for name, model in eager.items()
            }
            for step in steps.values():
                for _ in range(warmup):
                    step()
            times: dict[str, list[float]] = {name: [] for name in steps}
            for _ in range(rounds):
                for name, step in steps.items():
                    times[name].append(_time(step, iters, dev))
            for name in steps:
                if dev.type == "cuda":  # both models are resident: count this one's own memory only
                    torch.cuda.synchronize(dev)
                    before = torch.cuda.memory_allocated(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    steps[name]()
                    torch.cuda.synchronize(dev)
                    step_peak = torch.cuda.max_memory_allocated(dev) - before
                    memory = (_resident_bytes(eager[name], optimizers[name], x, y) + step_peak) / 2**20
                elif cpu_memory:
                    memory = _in_fresh_process(
                        _cpu_peak_mib,
                        name,
                        model_name,
                        {"fused_attn": fused_attn, **model_options},
                        batch_size,
                        mode,
                        precision,
                        compile,
                        compile_mode,
                        channels_last,
                        torch.get_num_threads(),
                        sdpa_backend,
                    )
                else:
                    memory = None
                rate = batch_size / statistics.median(times[name])
                mfu = rate * flops[name] / (peak * 1e12) if peak and mode == "train" else None
                shape = (x.shape[1], x.shape[2], x.shape[3])
                results.append(SpeedResult(name, mode, precision, rate, flops[name], memory, mfu, shape))
    return results


def format_table(results: list[SpeedResult]) -> str:
    """A markdown table with one row per (mode, precision) and the vitkit/timm ratio."""
    lines = [
        "| mode | precision | vitkit img/s | timm img/s | ratio | GFLOPs/img | vitkit MFU "
        "| peak MB (vitkit/timm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keyed = {(r.library, r.mode, r.precision): r for r in results}
    for mode, precision in dict.fromkeys((r.mode, r.precision) for r in results):
        ours, theirs = keyed[("vitkit", mode, precision)], keyed[("timm", mode, precision)]
        mfu = f"{ours.mfu:.1%}" if ours.mfu is not None else "n/a"
        memory = (
            f"{ours.peak_memory_mb:.0f} / {theirs.peak_memory_mb:.0f}"
            if ours.peak_memory_mb is not None
            else "n/a"
        )
        lines.append(
            f"| {mode} | {precision} | {ours.images_per_s:.1f} | {theirs.images_per_s:.1f} | "
            f"{ours.images_per_s / theirs.images_per_s:.3f} | {ours.flops_per_image / 1e9:.3f} | {mfu} "
            f"| {memory} |"
        )
    return "\n".join(lines)


def bench_main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loop"]:  # vitkit bench loop: the end-to-end loop from image files
        from .loop import loop_main

        return loop_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="vitkit bench",
        description=__doc__.split("\n\n")[0],
        epilog="`vitkit bench loop --help`: the training loop from image files against a plain loop.",
    )
    parser.add_argument(
        "--model",
        default="vit_tiny_patch4_32",
        help="a name from `vitkit models`, or a timm ViT vitkit can build (`vitkit models --timm`)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")
    parser.add_argument(
        "--channels-last", action="store_true", help="images and patch convolution in channels-last format"
    )
    parser.add_argument(
        "--options", type=json.loads, default={}, help="other model options as JSON, e.g. '{\"depth\": 6}'"
    )
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--explicit-attn",
        action="store_true",
        help="vitkit takes the explicit softmax path (fused_attn=False); timm keeps its fused kernel",
    )
    parser.add_argument(
        "--sdpa-backend",
        default=None,
        choices=list(SDPA_BACKENDS),
        help="run both models' fused attention on this kernel only (default: PyTorch picks)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile's mode, with --compile",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds, vitkit and timm alternating; the median is kept"
    )
    parser.add_argument("--iters", type=int, default=5, help="steps per timed round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (default: by device name and precision, PEAK_TFLOPS)",
    )
    parser.add_argument(
        "--cpu-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a CPU, measure each setting's peak memory in a fresh process (default: on)",
    )
    parser.add_argument("--json", action="store_true", help="print raw results as JSON too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {"img_size": args.img_size, "in_chans": args.in_chans}
    options = {**args.options, **{k: v for k, v in sizes.items() if v is not None}}
    results = compare(
        args.model,
        batch_size=args.batch_size,
        precisions=args.precision,
        modes=args.modes,
        device=args.device,
        fused_attn=not args.explicit_attn,
        compile=args.compile or args.compile_mode is not None,
        compile_mode=args.compile_mode,
        rounds=args.rounds,
        iters=args.iters,
        peak_tflops=args.peak_tflops,
        channels_last=args.channels_last,
        cpu_memory=args.cpu_memory,
        sdpa_backend=args.sdpa_backend,
        **options,
    )
    on_gpu = args.device.startswith("cuda")
    device = torch.cuda.get_device_name(args.device) if on_gpu else f"CPU x{torch.get_num_threads()}"
    chans, height, width = results[0].input_size
    layout = ", channels-last" if args.channels_last else ""
    layout += f", SDPA on {args.sdpa_backend}" if args.sdpa_backend else ""
    print(
        f"{args.model}, {chans}x{height}x{width} input{layout}, batch {args.batch_size}, {device}, "
        f"torch {torch.__version__}, timm {timm.__version__}"
    )
    print(format_table(results))
    if not on_gpu and "bf16" in args.precision and not cpu_has_bf16_arithmetic():
        print("note: this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): its bf16 rows are emulated")
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    return 0
