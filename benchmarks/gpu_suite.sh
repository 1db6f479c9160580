#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md on one GPU, part by part, each with its own time limit (one
# failure costs only its own figure). Logs: OUT/suite.log (default gpu_out/), profiles in OUT/profile.
#
#     bash benchmarks/gpu_suite.sh OUT ~/.cache/vitkit/cifar10 [PART ...]
#
# With no PART it runs the short parts of the open GPU targets: data_path, mfu_weights, mfu_graphs,
# mfu_s16 (263 s on the H200; 12.5 minutes by their limits). Then, in a second call while the machine
# is still warm (it is given back after 30 s idle): speedrun with SPEEDRUN_MINUTES=6 (392 s; the default
# 8 fits one 10-minute call on its own). Both H200 sessions of 2026-11-30 are in BENCHMARKS.md. Not run
# on a GPU yet: compile_time. `all` runs every part.
# Parts (limit in seconds; what took how long on the H100 of 2026-11-24 / the H200 of 2026-11-30):
#
#   data_path      CIFAR-10 loop, ViT-S/4, batch 512, RandAugment: JPEG folder / uint8 cache augmented
#                  in the workers / uint8 cache augmented on the GPU / plain timm loop / step alone (150; 72 s)
#   compile_time   the speedrun's model, batch 512: cold compile and step of eager / torch.compile(model) /
#                  compile_blocks, one fresh process each (benchmarks/compile_time.py; 150; not run yet)
#   data_profile   profiler report of the loop augmented on the GPU (90)
#   mfu_profile    ViT-B/16 bf16 training step, compiled, batch 256: MFU and the device time by kernel kind,
#                  attention chosen by PyTorch and on cuDNN (benchmarks/mfu_profile.py; 200; 57 s)
#   mfu_weights    the same, autocast over fp32 weights against bf16 weights with an fp32 master copy
#                  (mfu_profile.py --weights fp32 bf16; 200; 69 s)
#   mfu_graphs     the same two with CUDA graphs (--compile-mode reduce-overhead) for the 5% idle (240; 50 s)
#   mfu_s16        ViT-S/16, both weight kinds, compiled, batch 512 (160; 51 s)
#   b16_autotune   ViT-B/16 bf16 training step, torch.compile max-autotune-no-cudagraphs, batch 256 (180)
#   speedrun       CIFAR-10 time-to-accuracy for SPEEDRUN_MINUTES (default 8; the LR annealed to fit) with
#                  SPEEDRUN_ARGS and the model options SPEEDRUN_OPTIONS (JSON) (limit +60; 2.4 minutes took
#                  184 s, 6 minutes 381 s)
#   b16_eager b16_compiled b16_batch512 s16_eager s16_compiled b16_explicit b16_fp32 explain_cost:
#                  the speed / MFU / explanation tables (eager ~90 s, compiled ~150-200 s each)
#   b16_cudnn      ViT-B/16 bf16 training step, compiled, attention on cuDNN's kernel (200; torch 2.11 picks
#                  cuDNN's kernel on an H200 by itself: mfu_profile)
#
# On the lent machine (python3 3.12 with torch, timm, lightning, einops, safetensors, torchmetrics),
# vitkit runs from the working tree. Here, once: mkdir -p .gpu && cp ../shared/data/cifar10.tar.gz .gpu/
# && echo /.gpu/ >>.git/info/exclude; then one device call carrying .gpu:
#     tar -xzf .gpu/cifar10.tar.gz -C /tmp && PYTHONPATH=. bash benchmarks/gpu_suite.sh "$OUT" /tmp/cifar10
set -u
out=${1:-gpu_out}
data=${2:-}
shift $(($# > 2 ? 2 : $#))
parts=${*:-data_path mfu_weights mfu_graphs mfu_s16}
[ "$parts" = all ] && parts="data_path compile_time data_profile mfu_profile mfu_weights mfu_graphs mfu_s16 b16_eager
    b16_compiled b16_batch512 b16_autotune b16_cudnn s16_eager s16_compiled b16_explicit b16_fp32 explain_cost speedrun"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
"$py" -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)" >>"$out/gpu.txt"
cat "$out/gpu.txt"
: >"$out/suite.log"

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/part.log" 2>&1
    echo "(exit $?, $((SECONDS - start)) s)"
    { echo "=== $name"; cat "$out/part.log"; } >>"$out/suite.log"
    grep -E '^\||^vit|^batch|busy|GFLOP|Error|^epoch|throughput' "$out/part.log" | tail -n 30
}

bench() {  # bench NAME SECONDS MODEL ARGS...
    local name=$1 limit=$2 model=$3
    shift 3
    part "$name" "$limit" "$py" -m vitkit.bench --model "$model" --precision bf16 --rounds 3 "$@"
}

loop=(--model vit_small_patch4_32 --options '{}' --batch-size 512 --workers 14 --precision bf16-mixed
    --auto-augment rand-m9-mstd0.5-inc1)
for name in $parts; do
    case $name in
    data_path | data_profile | speedrun)
        if [ -z "$data" ]; then
            echo "=== $name skipped: no CIFAR-10 folder given"
            continue
        fi
        ;;
    esac
    case $name in
    data_path) part "$name" 150 "$py" -m vitkit.bench.loop --root "$data" "${loop[@]}" --steps 150 --rounds 1 ;;
    data_profile)
        part "$name" 90 "$py" -m vitkit.bench.loop --root "$data" "${loop[@]}" --steps 30 --augment-on device \
            --profile "$out/profile"
        ;;
    compile_time)
        part "$name" 150 "$py" benchmarks/compile_time.py --model vit_small_patch4_32 --batch-size 512 --steps 20 \
            --options '{"stem_channels": [64, 128, 256], "drop_path_rate": 0.1, "num_classes": 10}'
        ;;
    mfu_profile)
        part "$name" 200 "$py" benchmarks/mfu_profile.py --model vit_base_patch16_224 --batch-sizes 256 --compile \
            --sdpa-backends auto cudnn --kernels "$out/mfu_kernels.json"
        ;;
    mfu_weights | mfu_graphs | mfu_s16)
        model=vit_base_patch16_224 batch=256 mode=() limit=200
        [ "$name" = mfu_graphs ] && mode=(--compile-mode reduce-overhead) limit=240
        # ViT-S/16's matmuls are 2x narrower than ViT-B/16's: a larger batch keeps them efficient
        [ "$name" = mfu_s16 ] && model=vit_small_patch16_224 batch=512 limit=160
        part "$name" "$limit" "$py" benchmarks/mfu_profile.py --model "$model" --batch-sizes "$batch" --compile \
            "${mode[@]}" --weights fp32 bf16 --kernels "$out/$name.json"
        ;;
    b16_eager) bench "$name" 120 vit_base_patch16_224 --batch-size 256 --iters 10 ;;
    b16_compiled) bench "$name" 200 vit_base_patch16_224 --batch-size 256 --modes train --compile --iters 10 ;;
    b16_batch512) bench "$name" 200 vit_base_patch16_224 --batch-size 512 --modes train --compile --iters 5 ;;
    b16_autotune)
        bench "$name" 180 vit_base_patch16_224 --batch-size 256 --modes train --iters 10 \
            --compile-mode max-autotune-no-cudagraphs
        ;;
    b16_cudnn)
        bench "$name" 200 vit_base_patch16_224 --batch-size 256 --modes train --compile --iters 10 --sdpa-backend cudnn
        ;;
    s16_eager) bench "$name" 90 vit_small_patch16_224 --batch-size 256 --iters 10 ;;
    s16_compiled) bench "$name" 160 vit_small_patch16_224 --batch-size 256 --modes train --compile --iters 10 ;;
    b16_explicit) bench "$name" 90 vit_base_patch16_224 --batch-size 256 --modes train --explicit-attn --iters 10 ;;
    b16_fp32)
        part "$name" 90 "$py" -m vitkit.bench --model vit_base_patch16_224 --batch-size 128 --precision fp32 \
            --modes train --rounds 3 --iters 5
        ;;
    explain_cost) part "$name" 200 "$py" benchmarks/explain_cost.py --device cuda --repeats 5 ;;
    speedrun)
        minutes=${SPEEDRUN_MINUTES:-8}
        # default: the ViT-S/4 behind a convolutional stem, light regularisation, EMA with warm-up; up to
        # 200 epochs, the cosine annealed to its end when the minutes run out, stopped early at 94%
        # -d "": the whole value, line breaks included, split into words
        read -r -d "" -a extra <<<"${SPEEDRUN_ARGS:---epochs 200 --warmup-epochs 3 --mixup 0 --cutmix 0 --stop-at-target}" || true
        options=${SPEEDRUN_OPTIONS:-'{"stem_channels": [64, 128, 256], "drop_path_rate": 0.1}'}
        part "$name" "$(python3 -c "print(int($minutes * 60 + 60))")" "$py" benchmarks/cifar10_speedrun.py \
            --root "$data" --workers 15 --max-minutes "$minutes" --json "$out/speedrun.json" \
            --options "$options" "${extra[@]}"
        ;;
    *) echo "=== unknown part $name (see the header of $0)" ;;
    esac
done
