"""The benchmark harness: the timm twin is the same model, FLOPs are counted right."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import TINY

import vitkit
from vitkit.bench import compare, count_flops, format_table, model_flops_per_image, timm_twin


def test_timm_twin_has_the_same_weights_and_logits():
    for extra in (
        {},
        {"class_token": False, "global_pool": "avg", "pos_embed": "sincos", "reg_tokens": 2},
        {"fused_attn": False},  # a kernel choice: the twin is timm's default ViT
    ):
        model = vitkit.create_model("vit_tiny_patch4_32", **{**TINY, **extra}).eval()
        twin = timm_twin(model).eval()
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)


def test_flop_count_of_a_linear_layer_is_2_m_n_k():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    assert count_flops(lambda: layer(x)) == 2 * 8 * 64 * 32


def test_model_flops_are_the_vits_matmuls_whatever_the_attention_kernel():
    # forward FLOPs of a ViT, by hand: the patch projection, per block qkv + q kᵀ + attention·v +
    # projection + MLP, and the head on the class token (2 FLOPs per multiply-add)
    c = TINY
    patches = (c["img_size"] // c["patch_size"]) ** 2
    n, d = patches + 1, c["embed_dim"]
    patch = patches * 3 * c["patch_size"] ** 2 * d
    block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * 4 * d
    expected = 2 * (patch + c["depth"] * block + d * c["num_classes"])
    x, y = torch.randn(3, 3, c["img_size"], c["img_size"]), torch.tensor([0, 1, 2])
    for fused in (True, False):  # on a CPU the fused (flash) kernel is invisible to torch's counter
        model = vitkit.create_model("vit_tiny_patch4_32", **TINY, fused_attn=fused)
        assert model_flops_per_image(model, x, y, "infer") == expected
        train = model_flops_per_image(model, x, y, "train")
        # the backward pass costs twice the forward, except the input gradient of the first layer
        assert train == 3 * expected - 2 * patch


def test_compare_reports_both_libraries_and_a_ratio():
    results = compare("vit_tiny_patch4_32", batch_size=2, rounds=1, iters=1, warmup=1, **TINY)
    assert {(r.library, r.mode) for r in results} == {
        (lib, m) for lib in ("vitkit", "timm") for m in ("train", "infer")
    }
    train = {r.library: r for r in results if r.mode == "train"}
    # same architecture, so the counted FLOPs agree; training is about 3x inference
    assert train["vitkit"].flops_per_image == train["timm"].flops_per_image
    infer = next(r for r in results if r.mode == "infer" and r.library == "vitkit")
    assert 2.5 < train["vitkit"].flops_per_image / infer.flops_per_image < 3.5
    assert all(r.images_per_s > 0 and r.mfu is None for r in results)  # no MFU without a GPU peak
    table = format_table(results)
    assert table.count("\n") == 3 and "| train | fp32 |" in table


def test_loop_benchmark_runs_both_loops_on_an_image_folder(tmp_path):
    from vitkit.bench.loop import plain_loop, vitkit_loop
    from vitkit.data import make_shapes_dataset

    make_shapes_dataset(tmp_path, num_train=40, num_val=10, img_size=32, seed=0)
    options = {
        "model_name": "vit_tiny_patch4_32",
        "model_options": {k: v for k, v in TINY.items() if k != "num_classes"},
    }
    policy = {"auto_augment": "rand-m9-mstd0.5-inc1"}
    for rate in (
        vitkit_loop(tmp_path, options, batch_size=8, steps=3, workers=0, cache=False),
        vitkit_loop(tmp_path, options, batch_size=8, steps=3, workers=0, cache=True, **policy),
        vitkit_loop(
            tmp_path, options, batch_size=8, steps=3, workers=0, cache=True, augment_on="device", **policy
        ),
        plain_loop(tmp_path, options, batch_size=8, steps=3, workers=0, **policy),
    ):
        assert 0 < rate.images_per_s < float("inf") and rate.gpu_util is None  # no GPU, no NVML


def test_plain_loop_takes_the_steps_asked_for_across_epochs(tmp_path, monkeypatch):
    # 40 images in batches of 16 (the last dropped): 2 steps an epoch; 2 warm-up + 3 timed steps
    # cross two epoch boundaries, as vitkit's Lightning loop does with max_steps
    from vitkit.bench import loop
    from vitkit.data import make_shapes_dataset

    make_shapes_dataset(tmp_path, num_train=40, num_val=10, img_size=32, seed=0)
    calls = []
    real_twin = loop.timm_twin

    def counting_twin(model):
        twin = real_twin(model)
        twin.register_forward_hook(lambda *args: calls.append(1))
        return twin

    monkeypatch.setattr(loop, "timm_twin", counting_twin)
    options = {
        "model_name": "vit_tiny_patch4_32",
        "model_options": {k: v for k, v in TINY.items() if k != "num_classes"},
    }
    loop.plain_loop(tmp_path, options, batch_size=16, steps=3, workers=0, warmup=2)
    assert len(calls) == 5


def test_loop_clock_times_only_the_steps_after_the_warmup_between_two_syncs(monkeypatch):
    # the clock starts when the device has finished the last warm-up step and stops when it has
    # finished the last timed step: a sync at each edge, the images of the timed steps only
    from vitkit.bench import loop

    now = iter(float(t) for t in range(100, 200))
    events = []
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(now))
    monkeypatch.setattr(loop, "_sync", lambda device: events.append("sync"))
    clock = loop._Clock(loop._GpuUtil("cpu"), torch.device("cpu"), warmup=2, steps=3)
    with pytest.raises(RuntimeError, match="stopped after 0 of 5 steps"):
        clock.rate()
    for size in (7, 7, 4, 4, 4):  # warm-up batches of 7 images, then timed batches of 4
        clock.on_train_batch_end(None, None, None, (torch.zeros(size, 3), None), 0)
        events.append("step")
    assert events == ["step", "sync", "step", "step", "step", "sync", "step"]
    assert (clock.start, clock.end, clock.images) == (100.0, 101.0, 12)
    assert clock.rate().images_per_s == 12.0
    with pytest.raises(ValueError, match="at least 1 warm-up step"):
        loop.vitkit_loop(Path("unused"), {}, batch_size=8, steps=3, workers=0, cache=False, warmup=0)


def test_loop_benchmark_follows_the_folders_classes_and_the_models_size(tmp_path, capsys):
    # 12 classes (more than CIFAR's 10) of 20x20 images, for a model that takes 24x24 inputs
    from PIL import Image

    from vitkit.bench.loop import loop_main

    rng = torch.Generator().manual_seed(0)
    for k in range(12):
        folder = tmp_path / "data" / "train" / f"class{k:02d}"
        folder.mkdir(parents=True)
        for i in range(2):
            pixels = torch.randint(0, 256, (20, 20, 3), dtype=torch.uint8, generator=rng).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    options = '{"img_size": 24, "embed_dim": 32, "depth": 2, "num_heads": 2}'
    argv = ["--root", str(tmp_path / "data"), "--model", "vit_tiny_patch4_32", "--options", options]
    argv += ["--batch-size", "4", "--steps", "3", "--workers", "0", "--rounds", "1"]
    assert loop_main([*argv, "--loops", "folder", "plain", "step"]) == 0
    out = capsys.readouterr().out
    assert "at 24x24, 12 classes" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "images/s" not in line]
    names = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert names == ["vitkit (folder)", "plain timm loop", "vitkit step only (batch on device)"]
    assert rows[1].split(" | ")[2] == "1.00x" and rows[2].split(" | ")[3:] == ["100%", "n/a |"]
    assert loop_main([*argv, "--loops", "folder"]) == 0  # nothing to compare with: n/a, not an error
    assert capsys.readouterr().out.splitlines()[-1].endswith("| n/a | n/a |")
    with pytest.raises(FileNotFoundError, match="has no train/ folder"):
        loop_main(["--root", str(tmp_path), "--loops", "step"])


def test_bench_commands_report_bad_input_in_one_line(tmp_path, capsys):
    import subprocess
    import sys

    from vitkit.cli.main import main

    # `vitkit bench loop` is the loop benchmark; its errors are the CLI's one-line errors
    assert main(["bench", "loop", "--root", str(tmp_path), "--loops", "step"]) == 2
    assert "vitkit bench: error:" in capsys.readouterr().err
    # `python -m vitkit.bench` is `vitkit bench`: a timm model vitkit cannot build is named, no traceback
    done = subprocess.run(
        [sys.executable, "-m", "vitkit.bench", "--model", "vit_base_patch16_rpn_224"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "ResPostBlock blocks" in done.stderr


def test_a_device_this_machine_lacks_is_named_before_any_work(monkeypatch):
    from vitkit.bench.speed import _check_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(
        ValueError, match=r"--device cuda: this machine has 0 CUDA device\(s\). Use --device cpu."
    ):
        compare("vit_tiny_patch4_32", device="cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"cuda:2: this machine has 2 .* or cuda:0..cuda:1"):
        _check_device("cuda:2")
    with pytest.raises(ValueError, match="'cpu' or 'cuda"):
        _check_device("mps")


def test_gpu_utilisation_is_sampled_from_nvml_between_start_and_stop(monkeypatch):
    from vitkit.bench.loop import _GpuUtil

    readings = iter([50.0] + [90.0, 70.0] * 1000)  # the first call only checks that NVML answers
    monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: next(readings))
    util = _GpuUtil("cuda:0", interval=0.005)
    util.start()
    time.sleep(0.1)
    mean = util.stop()
    assert len(util.samples) >= 2 and 70.0 <= mean <= 90.0
    assert 50.0 not in util.samples
    count = len(util.samples)
    time.sleep(0.03)
    assert len(util.samples) == count  # stopped
    # only the samples up to the end of the timed steps count (not the idle teardown after them)
    util.samples, util.times = [80.0, 80.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]
    assert util.stop(until=2.5) == 80.0 and util.stop() == 40.0 and util.stop(until=0.5) is None

    def no_nvml(device=None):
        raise ModuleNotFoundError("pynvml does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    unavailable = _GpuUtil("cuda:0")
    unavailable.start()
    assert unavailable.stop() is None  # n/a, not an error
    assert _GpuUtil("cpu").stop() is None


def test_loop_benchmark_profiles_vitkits_loop_into_a_report(tmp_path):
    from vitkit.bench.loop import loop_main
    from vitkit.data import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_train=48, num_val=8, img_size=32, seed=0)
    options = '{"embed_dim": 32, "depth": 2, "num_heads": 2}'
    argv = ["--root", str(tmp_path / "data"), "--model", "vit_tiny_patch4_32", "--options", options]
    assert (
        loop_main(
            [*argv, "--batch-size", "4", "--steps", "10", "--workers", "0", "--profile", str(tmp_path / "p")]
        )
        == 0
    )
    reports = list((tmp_path / "p").glob("*vitkit_loop*.txt"))
    assert len(reports) == 1
    text = reports[0].read_text()
    assert "aten::" in text and "Self CPU" in text  # an op table, not an empty file
    assert list((tmp_path / "p").glob("*.json"))  # the Chrome trace


def _load_benchmark_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cifar10_speedrun_script_trains_and_reports_when_the_target_is_reached(tmp_path):
    # the GPU time-to-accuracy script, on CPU with a tiny model and the shapes data (train/ + val/),
    # batches augmented by the batched (device) path as on a GPU
    import json

    from vitkit.data import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_train=64, num_val=16, img_size=32, seed=0)
    speedrun = _load_benchmark_script("cifar10_speedrun")
    options = json.dumps({k: v for k, v in TINY.items() if k != "num_classes"})
    argv = "--epochs 2 --batch-size 16 --warmup-epochs 1 --accelerator cpu --precision 32-true --no-compile"
    argv += f" --workers 0 --target 0.0 --model vit_tiny_patch4_32 --json {tmp_path / 'timeline.json'}"
    argv += " --augment-on device"
    argv = [*argv.split(), "--root", str(tmp_path / "data"), "--options", options]
    summary = speedrun.main(argv)
    assert [row["epoch"] for row in summary["timeline"]] == [1, 2]
    assert summary["reached"]["epoch"] == 1 and summary["settings"]["augment_on"] == "device"
    assert summary["train_images_per_s_after_epoch_1"] > 0
    assert json.loads((tmp_path / "timeline.json").read_text())["best"] == summary["best"]
    assert summary["settings"]["anneal_by_time"] is False  # no time limit: the steps set the cosine
    # a fixed-time try that stops at the target: the first validation already reaches 0%
    summary = speedrun.main(
        [*argv, "--epochs", "3", "--max-minutes", "30", "--stop-at-target", "--tta", "hflip"]
    )
    assert [row["epoch"] for row in summary["timeline"]] == [1]
    assert summary["settings"]["anneal_by_time"] is True and summary["settings"]["tta"] == "hflip"
    assert 0 < summary["final_lr"] <= 1e-3


def test_cpu_settings_times_model_variants_against_the_recipes_model(capsys, monkeypatch):
    import json

    cpu_settings = _load_benchmark_script("cpu_settings")
    built = []
    create = cpu_settings.vitkit.create_model
    monkeypatch.setattr(
        cpu_settings.vitkit, "create_model", lambda *a, **kw: built.append(kw) or create(*a, **kw)
    )
    options = {
        "img_size": 32,
        "patch_size": 4,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "stem_channels": [8, 16],
    }
    variants = {"late halving": {"stem_strides": [1, 2, 2], "stem_channels": [8, 8, 16]}}
    argv = ["--options", json.dumps(options), "--variants", json.dumps(variants)]
    cpu_settings.main([*argv, "--batch-size", "4", "--rounds", "1", "--iters", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant |") and len(rows) == 3
    assert rows[1].startswith("| the recipe's model |") and rows[1].endswith("| 1.00x |")
    assert rows[2].startswith("| late halving |")
    # each variant is the recipe's options with its own changed
    assert [kw.get("stem_strides") for kw in built] == [None, [1, 2, 2]]
    assert built[1]["stem_channels"] == [8, 8, 16] and built[1]["embed_dim"] == 32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_settings_times_the_other_settings_at_the_recipes_precision(capsys, precision):
    import json

    cpu_settings = _load_benchmark_script("cpu_settings")
    options = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    argv = ["--options", json.dumps(options), "--no-compile", "--precision", precision]
    cpu_settings.main([*argv, "--batch-size", "4", "--rounds", "1", "--iters", "1"])
    out = capsys.readouterr().out
    rows = {
        line.split(" | ")[0][2:]: line
        for line in out.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    recipe = [name for name, line in rows.items() if line.endswith("| 1.00x |") and "(the recipe)" in name]
    assert recipe == [
        f"{cpu_settings.PRECISION_NAMES[precision]}, explicit attention, fused AdamW (the recipe)"
    ]
    assert f"{precision}, explicit attention, foreach AdamW" in rows
    assert f"{precision}, explicit attention, 1 thread" in rows
    assert {"fp32, fused attention kernel", "bf16 autocast, fused attention kernel"} <= set(rows)
    assert f"the recipe in {precision}" in out


def test_the_bf16_probe_reads_the_cpus_instructions(monkeypatch):
    from vitkit.bench import speed

    monkeypatch.setattr(speed.platform, "machine", lambda: "x86_64")
    for avx512_bf16, amx, expected in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert speed.cpu_has_bf16_arithmetic() is expected


def test_bench_passes_the_compile_mode_to_both_models(monkeypatch):
    from vitkit.bench import speed

    modes = []

    def fake_compile(model, mode=None):
        modes.append(mode)
        return model

    monkeypatch.setattr(speed.torch, "compile", fake_compile)
    options = {k: v for k, v in TINY.items() if k != "num_classes"}
    argv = "--model vit_tiny_patch4_32 --batch-size 2 --modes infer --rounds 1 --iters 1 --device cpu"
    assert speed.bench_main([*argv.split(), "--compile-mode", "max-autotune-no-cudagraphs"]) == 0
    assert modes == ["max-autotune-no-cudagraphs"] * 2
    speed.compare("vit_tiny_patch4_32", 2, modes=("infer",), rounds=1, iters=1, **options)
    assert len(modes) == 2  # no compile unless asked


def test_bench_takes_input_size_channels_layout_and_model_options(monkeypatch, capsys):
    from vitkit.bench import speed

    seen = []

    def recording_infer_fn(model, x, precision):
        seen.append((type(model).__module__, x, model.patch_embed.proj.weight))
        return lambda: None

    monkeypatch.setattr(speed, "_infer_fn", recording_infer_fn)
    argv = "--model vit_tiny_patch4_32 --batch-size 2 --modes infer --rounds 1 --iters 1 --device cpu --json"
    options = '{"depth": 2, "embed_dim": 32, "num_heads": 2}'
    extra = ["--img-size", "48", "--in-chans", "1", "--channels-last", "--options", options]
    extra.append("--no-cpu-memory")
    assert speed.bench_main([*argv.split(), *extra]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny_patch4_32, 1x48x48 input, channels-last, batch 2" in out
    assert '"input_size": [\n      1,\n      48,\n      48\n    ]' in out
    assert {module.split(".")[0] for module, _, _ in seen} == {"vitkit", "timm"}
    assert {len(x) for _, x, _ in seen} == {2, 1}  # the timed batch, and one image for the FLOPs
    for _, x, kernel in seen:
        assert x.shape[1:] == (1, 48, 48) and x.is_contiguous(memory_format=torch.channels_last)
        assert kernel.shape == (32, 1, 4, 4) and kernel.is_contiguous(memory_format=torch.channels_last)


def test_cpu_peak_memory_is_measured_per_library_in_fresh_processes():
    # vitkit and timm run the same kernels, so they hold about the same memory; a training step
    # (gradients, AdamW state, saved activations) holds far more than inference
    # (batch 32, depth 4: ~130 MB more for training; what a fresh process maps in for inference
    # alone, libraries' code included, has varied by +-25 MB between runs)
    results = compare(
        "vit_tiny_patch4_32", batch_size=32, rounds=1, iters=1, warmup=1, cpu_memory=True, depth=4
    )
    memory = {(r.library, r.mode): r.peak_memory_mb for r in results}
    assert all(m is not None and m > 0 for m in memory.values()), memory
    for library in ("vitkit", "timm"):
        assert memory[(library, "train")] - memory[(library, "infer")] > 60, memory
    assert 0.8 < memory[("vitkit", "train")] / memory[("timm", "train")] < 1.25, memory


def test_sdpa_backend_restricts_both_models_to_one_attention_kernel():
    options = {k: v for k, v in TINY.items() if k != "num_classes"}
    run = dict(batch_size=2, modes=("infer",), rounds=1, iters=1, warmup=1, **options)
    math = compare("vit_tiny_patch4_32", sdpa_backend="math", **run)
    assert {r.library for r in math} == {"vitkit", "timm"} and all(r.images_per_s > 0 for r in math)
    # a CPU has no memory-efficient kernel: restricted to it, neither model can run
    with pytest.raises(RuntimeError, match="No viable backend"):
        compare("vit_tiny_patch4_32", sdpa_backend="efficient", **run)


def test_mfu_peak_follows_the_device_and_the_precision(monkeypatch):
    from vitkit.bench.speed import _peak_tflops

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    names = iter(["NVIDIA H100 80GB HBM3"] * 3 + ["NVIDIA A100-SXM4-80GB", "NVIDIA L40S", "Some GPU"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: next(names))
    assert _peak_tflops(cuda, "bf16", None) == 989.0
    torch.set_float32_matmul_precision("highest")  # torch's default: fp32 matmuls without TF32
    assert _peak_tflops(cuda, "fp32", None) == 67.0
    torch.set_float32_matmul_precision("high")  # TF32 allowed: its tensor-core peak
    assert _peak_tflops(cuda, "fp32", None) == 494.0  # (conftest restores the precision)
    assert _peak_tflops(cuda, "bf16", None) == 312.0  # an A100, not an A10
    assert _peak_tflops(cuda, "bf16", None) == 362.0  # an L40S, not an L4
    assert _peak_tflops(cuda, "bf16", None) is None  # unknown: no MFU rather than a wrong one
    assert _peak_tflops(cpu, "bf16", None) is None and _peak_tflops(cpu, "fp32", 100.0) == 100.0


def test_a_models_resident_memory_counts_its_weights_optimizer_state_and_inputs():
    # on a GPU both models stay resident during each other's steps; each is charged its own only
    from vitkit.bench.speed import _resident_bytes, _train_step_fn

    model = vitkit.create_model("vit_tiny_patch4_32", **TINY)
    weights = sum(p.numel() * 4 for p in model.parameters())
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    assert _resident_bytes(model, None) == weights  # fp32, no buffers in a ViT
    step = _train_step_fn(model, x, y, "fp32")
    step()
    tensors = len(list(model.parameters()))
    # AdamW: two moments per weight, and one fp32 step count per tensor
    assert _resident_bytes(model, step.optimizer, x, y) == 3 * weights + 4 * tensors + x.nbytes + y.nbytes


def test_mfu_profile_sorts_kernels_into_kinds_by_their_names():
    # names as an H200 profile of ViT-B/16 (torch 2.11, compiled) printed them, and CPU operators
    mfu_profile = _load_benchmark_script("mfu_profile")
    kinds = {
        "nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_bias_TNN": "matmul",
        "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16>": "matmul",
        "triton_tem_fused__to_copy_convolution_3": "matmul",
        "aten::addmm": "matmul",
        "aten::convolution_backward": "matmul",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)": "attention",
        "void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*)": "attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
        "void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>": "optimizer",
        "aten::_fused_adamw_": "optimizer",
        "Memcpy DtoD (Device -> Device)": "copy",
        "aten::copy_": "copy",
        # Inductor's fused LayerNorm kernels carry "_to_copy" (a cast) in their names: not copies
        "triton_per_fused__to_copy_add_native_layer_norm_backward_view_12": mfu_profile.OTHER,
        "triton_poi_fused_gelu_gelu_backward_view_10": mfu_profile.OTHER,
    }
    assert {name: mfu_profile.kind_of(name) for name in kinds} == kinds


def test_mfu_profile_counts_the_step_it_profiles(tmp_path):
    import json

    mfu_profile = _load_benchmark_script("mfu_profile")
    options = json.dumps(TINY)
    argv = ["--model", "vit_tiny_patch4_32", "--options", options, "--batch-sizes", "2", "4"]
    argv += ["--device", "cpu", "--iters", "1", "--rounds", "1", "--profile-steps", "2"]
    argv += ["--kernels", str(tmp_path / "k.json"), "--weights", "fp32", "bf16"]
    assert mfu_profile.main(argv) == 0
    results = json.loads((tmp_path / "k.json").read_text())
    assert [(r["batch_size"], r["weights"]) for r in results] == [
        (2, "fp32"),
        (4, "fp32"),
        (2, "bf16"),
        (4, "bf16"),
    ]
    model = vitkit.create_model("vit_tiny_patch4_32", **TINY)
    x, y = torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)
    expected = model_flops_per_image(model, x, y, "train", "bf16") / 1e9
    for result in results:
        assert result["model_gflops_per_image"] == pytest.approx(expected)
        assert result["mfu"] is None  # no peak known for a CPU
        assert result["device_ms_by_kind"]["matmul"] > 0 and result["device_ms_by_kind"]["attention"] > 0
        times = [ms for _, ms in result["top_kernels_ms"]]
        assert times == sorted(times, reverse=True) and times[0] > 0
    # the bytes the eager step moves: bf16 weights leave no casts and halve the activations' bytes
    moved = {(r["batch_size"], r["weights"]): r["eager_gb_by_kind"] for r in results}
    memory_bound = {key: gb.get("copy", 0.0) + gb[mfu_profile.OTHER] for key, gb in moved.items()}
    assert moved[(2, "bf16")].get("copy", 0.0) < 0.01 * moved[(2, "fp32")]["copy"]  # only the logits' cast
    for batch in (2, 4):
        assert memory_bound[(batch, "bf16")] < 0.8 * memory_bound[(batch, "fp32")]
        assert moved[(batch, "bf16")]["matmul"] == pytest.approx(moved[(batch, "fp32")]["matmul"])
    assert memory_bound[(4, "fp32")] > memory_bound[(2, "fp32")]  # activations grow with the batch


def test_bf16_weights_step_updates_an_fp32_master_copy_with_adamw():
    # the step of `mfu_profile.py --weights bf16`: gradients in bf16, AdamW on fp32 master weights,
    # the model's bf16 weights then the master rounded. AdamW's first step is exact to compute:
    # w <- w (1 - lr wd) - lr g / (|g| + eps)
    mfu_profile = _load_benchmark_script("mfu_profile")
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch4_32", **TINY).to(torch.bfloat16)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x).float(), y).backward()
    named = dict(model.named_parameters())
    grads = {name: p.grad.float() for name, p in named.items()}
    before = {name: p.detach().float() for name, p in named.items()}
    model.zero_grad(set_to_none=True)
    lr, wd, eps = 1e-2, 0.01, 1e-8
    step = mfu_profile.bf16_weights_step_fn(model, x, y, lr=lr)
    step()
    master = dict(zip(named, step.optimizer.param_groups[0]["params"], strict=True))
    moved = 0
    for name, p in named.items():
        assert p.dtype == torch.bfloat16 and p.grad is None, name
        g = grads[name]
        expected = before[name] * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(master[name].detach(), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), master[name].detach().to(torch.bfloat16)), name
        moved += int((p.detach().float() != before[name]).sum())
    assert moved > 0.5 * sum(p.numel() for p in named.values())  # a step of 1e-2 shows in bf16


@pytest.mark.slow
def test_compile_time_script_times_a_cold_compile_in_fresh_processes(capsys):
    # slow: Inductor compiles C++ kernels for the block (about 20 s here)
    import json
    import re

    compile_time = _load_benchmark_script("compile_time")
    options = json.dumps(TINY)
    argv = ["--model", "vit_tiny_patch4_32", "--options", options, "--batch-size", "4", "--device", "cpu"]
    assert compile_time.main([*argv, "--steps", "1", "--scopes", "eager", "blocks"]) == 0
    rows = dict(re.findall(r"^\| (eager|blocks) \| ([\d.]+) \|", capsys.readouterr().out, re.M))
    assert set(rows) == {"eager", "blocks"}
    assert float(rows["blocks"]) > float(rows["eager"]) + 1.0  # the first compiled step pays for compiling
