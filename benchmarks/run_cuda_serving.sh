#!/usr/bin/env bash
# The hot-swap issue's serving paths on a GPU, as one script for a borrowed GPU machine (CI has
# no GPU and never runs this). Uses the machine's own torch/transformers/peft; lora_kit runs
# from the checkout. Each part has its own time limit, so one that hangs leaves the others'.
#   bash benchmarks/run_cuda_serving.sh [OUT_DIR]
set -u
out="${1:-${OUT:-/tmp/cuda-serving}}"
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
$py -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" | tee "$out/env.txt"

echo "== mixed batches: 8 rows over 8 adapters vs 8 rows on one, and vs PEFT's adapter_names"
timeout 240 $py -m benchmarks.bench_hotswap --only-mixed --device cuda --clock wall --repeats 10 \
  2>&1 | grep -v -i warn | tee "$out/mixed.txt"

echo "== in-place swap from disk into a CUDA model vs PEFT's hotswap_adapter"
timeout 150 $py -m benchmarks.bench_hotswap --only-swap --device cuda --clock wall --repeats 10 \
  2>&1 | grep -v -i warn | tee "$out/swap.txt"

echo "== correctness on CUDA: mixed batches, swaps, compile-safe swap"
timeout 180 $py -m benchmarks.cuda_serving_check 2>&1 | grep -v -i warn | tee "$out/check.txt"
echo "check exit: ${PIPESTATUS[0]}" | tee -a "$out/check.txt"
