#!/usr/bin/env bash
# Every GPU row of the library scenarios, and the generator scale table at 224x224x3, in at most about
# 8 minutes on one H100-class GPU: each command has its own `timeout` (teachers 60 + 150 + 150 + 60 + 60
# = 480 s), and one that fails or runs out of time is reported at the end without stopping the others.
# Not yet run on a GPU (written on a CPU-only machine): the budgets below are estimates, the timeouts bind.
#
#   bench/gpu.sh OUTDIR        (from the repository root; writes OUTDIR/*.json and OUTDIR/*.log)
#
# GPU budgets (not the CPU ones of docs/benchmarks.md): the fast preset's generators (5 x 150 steps at batch
# 256 here, not 300) and 500 student steps at batch 256, 2 seeds; the ONNX scenario 1 seed, tucker-only and
# kegnet only (the same weights as fashion-resnet18). The Fashion-MNIST teachers are trained on first use
# (bench/teachers.py, 200 steps: seconds on a GPU) unless bench/results/teachers/ already holds them.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"  # absolute: the commands below run from the repository root
cd "$(dirname "$0")/.."

GPU_BUDGET='{"generator": {"num_generators": 5, "steps": 150, "batch_size": 256},
             "distill": {"steps": 500, "batch_size": 256, "eval_every": 100, "holdout_samples": 2048}}'
failed=()

bench() {  # bench SECONDS NAME ARGS...: one bounded command, its output in OUTDIR/NAME.log
    local seconds="$1" name="$2"
    shift 2
    echo "== $name (at most ${seconds}s): python -m bench $*"
    if ! timeout --kill-after=10 "$seconds" python -m bench "$@" --device cuda --out "$OUT/$name.json" \
            2>&1 | tee "$OUT/$name.log"; then
        failed+=("$name")
    fi
}

echo "== teachers (at most 60s; on the GPU, unless cached)"
if ! timeout --kill-after=10 60 python -c 'from bench.teachers import image_teacher, onnx_teacher
image_teacher("fashion-mobilenetv3"); onnx_teacher("fashion-resnet18")' 2>&1 | tee "$OUT/teachers.log"; then
    failed+=("teachers")
fi
bench 150 fashion-resnet18 fashion-resnet18 --seeds 2 --config "$GPU_BUDGET"
bench 150 fashion-mobilenetv3 fashion-mobilenetv3 --seeds 2 --config "$GPU_BUDGET"
bench 60 fashion-resnet18-onnx fashion-resnet18-onnx --seeds 1 --methods tucker-only,kegnet --config "$GPU_BUDGET"
bench 60 scale-224-resnet18 scale --teacher torchvision:resnet18 --sides 224 --batches 64,256 --steps 5

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "failed or timed out: ${failed[*]}" >&2
    exit 1
fi
echo "all rows written under $OUT"
