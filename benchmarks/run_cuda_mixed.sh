#!/usr/bin/env bash
# The hot-swap issue's mixed-batch figures on a GPU (CI has no GPU and never runs this):
# 8 rows over 8 adapters vs 8 rows on one, and vs PEFT's adapter_names, GPT-2 small and
# BERT-base, 8 x 32 and 8 x 1 tokens. Uses the machine's own torch/transformers/peft.
#   bash benchmarks/run_cuda_mixed.sh [OUT_DIR]
set -u
out="${1:-${OUT:-/tmp/cuda-mixed}}"
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
$py -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" | tee "$out/env.txt"
$py -m benchmarks.bench_hotswap --only-mixed --device cuda --clock wall --repeats 10 2>&1 \
  | grep -v -i warn | tee "$out/mixed.txt"
