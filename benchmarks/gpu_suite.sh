#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one pass on one GPU (7.5 minutes on an H100):
# model speed and MFU against timm (ViT-B/16 and ViT-S/16 at 224, bf16, eager and compiled, fused
# and explicit attention), the cost of explaining a batch, and the CIFAR-10 data path (uint8
# cache vs JPEG folder vs a plain loop, against the step alone, and a profile of vitkit's loop).
# Each part has its own time limit, so one failure costs only its own figure. The full logs go to OUT/suite.log (default gpu_out/).
#
#     bash benchmarks/gpu_suite.sh OUT ~/.cache/vitkit/cifar10
set -u
out=${1:-gpu_out}
data=${2:-}
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
    grep -E '^\||^vit|busy|GFLOP|Error' "$out/part.log" | tail -n 14
}

part b16_eager 120 "$py" -m vitkit.bench --model vit_base_patch16_224 --batch-size 256 --precision bf16 --rounds 3 --iters 10
part b16_compiled 200 "$py" -m vitkit.bench --model vit_base_patch16_224 --batch-size 256 --precision bf16 --modes train --compile --rounds 3 --iters 10
part s16_compiled 160 "$py" -m vitkit.bench --model vit_small_patch16_224 --batch-size 256 --precision bf16 --modes train --compile --rounds 3 --iters 10
part explain_cost 200 "$py" benchmarks/explain_cost.py --device cuda --repeats 5
if [ -n "$data" ]; then
    part cifar_loop 150 "$py" -m vitkit.bench.loop --root "$data" --model vit_small_patch4_32 --options '{}' \
        --batch-size 512 --steps 150 --rounds 1 --workers 14 --precision bf16-mixed
    # where the loop's time goes (op table by GPU time + Chrome trace in OUT/profile)
    part cifar_loop_profile 90 "$py" -m vitkit.bench.loop --root "$data" --model vit_small_patch4_32 --options '{}' \
        --batch-size 512 --steps 30 --workers 14 --precision bf16-mixed --profile "$out/profile"
fi
part s16_eager 90 "$py" -m vitkit.bench --model vit_small_patch16_224 --batch-size 256 --precision bf16 --rounds 3 --iters 10
part b16_explicit 90 "$py" -m vitkit.bench --model vit_base_patch16_224 --batch-size 256 --precision bf16 --modes train --explicit-attn --rounds 3 --iters 10
part b16_fp32 90 "$py" -m vitkit.bench --model vit_base_patch16_224 --batch-size 128 --precision fp32 --modes train --rounds 3 --iters 5
