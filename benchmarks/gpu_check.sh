#!/usr/bin/env bash
# The GPU lease's script, under 10 minutes: the compiled CUDA path run for real (the traced kernels
# against eager, FP8 accuracy, a CUDA-graph replay; the kernels' own tests), then the layer
# benchmark into $OUT/<gpu>_layers.json (benchmarks/results/ when OUT is unset).
#     bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=${OUT:-benchmarks/results}
gpu=$(python -c "import torch; name = torch.cuda.get_device_name(); print(next((g for g in ('h200', 'h100', 'a100', 'l4') if g in name.lower()), 'gpu'))")
python -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)"
timeout 240 python -m pytest -q tests/test_cuda_codegen.py tests/test_kernels.py \
    -k "gpu or graph_replays or compiled or grouped_mm_op or experts_op" 2>&1 | tail -25
tests=$?
timeout 300 python benchmarks/layers.py --no-max-autotune --shapes "sonicmoe 3" "sonicmoe 4" mixtral-8x7b qwen3-30b-a3b \
    --json "$out/${gpu}_layers.json"
echo "tests: exit $tests; layers: $out/${gpu}_layers.json"
