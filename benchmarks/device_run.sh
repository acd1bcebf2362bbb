#!/usr/bin/env bash
# The accelerator run of benchmarks/README.md ("On an accelerator"): PEFT LoRA beside
# our LoRA, SPSFT and SPSFT + TokenTune on a 1B-class shape (Llama-3.2-1B's, random
# weights), bfloat16 then float32 frozen weights, one child process per row.
#
#     bash benchmarks/device_run.sh [OUT_DIR]     # from the repository root
#
# Needs jax with its GPU plugin, torch with CUDA, transformers and peft in `python3`;
# spsft-jax itself is taken from this checkout. Writes OUT_DIR/{gpu,versions}.txt and
# one JSON line per row to OUT_DIR/<dtype>.jsonl as each row finishes, then the table.
set -euo pipefail
out="${1:-${OUT:-/tmp/vs-peft-device}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
python3 -c "import jax, torch, peft, transformers
print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, torch.cuda.is_available(),
      'peft', peft.__version__, 'transformers', transformers.__version__)" | tee "$out/versions.txt"
for dtype in bfloat16 float32; do
    python3 benchmarks/vs_peft.py --cases llama-1b --methods lora,spsft --dtype "$dtype" \
        --cold-only --no-kernel --out /tmp/vs-peft-models | tee "$out/$dtype.txt"
    grep '^{' "$out/$dtype.txt" > "$out/$dtype.jsonl" || true
done
