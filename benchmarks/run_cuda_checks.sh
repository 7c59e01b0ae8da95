#!/usr/bin/env bash
# The CUDA checks, as one script for a borrowed GPU machine (CI has no GPU and never runs this).
# Uses the machine's own torch/transformers/peft; lora_kit runs from the checkout.
#   bash benchmarks/run_cuda_checks.sh [OUT_DIR]
set -u
out="${1:-${OUT:-/tmp/cuda-checks}}"
mkdir -p "$out" /tmp/lk-path
ln -sfn "$PWD/cli" /tmp/lk-path/lora_kit_cli   # the Typer app's installed name
export PYTHONPATH="$PWD:/tmp/lk-path" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
$py -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" | tee "$out/env.txt"

echo "== trainer: fp32 / bf16 / fp16 / auto, resume"
$py -m benchmarks.cuda_train_check 2>&1 | tee "$out/train_check.txt"

echo "== training step vs PEFT"
for p in bf16 fp16 fp32; do
  $py -m benchmarks.bench_train --device cuda --precision "$p" --steps 30 --warmup 5 \
    --batch 8 --seq 256 2>&1 | tee -a "$out/bench_train.txt"
done

echo "== where a step's time goes: kernels, GPU busy time, both orders"
for p in bf16 fp32; do
  $py -m benchmarks.profile_step --precision "$p" --rounds 30 --steps 3 2>&1 \
    | grep -E "wall|medians" | tee -a "$out/profile.txt"
done

echo "== lorakit train under torchrun on the GPU (nccl): ddp and fsdp"
$py - <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from train_helpers import tiny_gpt2, tokenizer, write_text
folder = Path("/tmp/lk-tiny")
tiny_gpt2().save_pretrained(folder)
tokenizer().save_pretrained(folder)
write_text(Path("/tmp/lk-corpus.txt"), n_words=4000)
PY
for s in ddp fsdp; do
  torchrun --nproc_per_node=1 -m lora_kit_cli train --model /tmp/lk-tiny --data /tmp/lk-corpus.txt \
    --steps 6 --batch-size 4 --max-length 32 --strategy "$s" --out "/tmp/lk-$s" --json \
    2>&1 | tail -3 | tee -a "$out/torchrun.txt"
  echo "exit $s: ${PIPESTATUS[0]}" | tee -a "$out/torchrun.txt"
done
