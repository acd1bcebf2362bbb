"""The README's first example, end to end on the embedded tiny model.

    python examples/quickstart.py [out_dir]

Loads an HF Llama folder, scores rows with Taylor importance, keeps the top 8 per
module, fine-tunes W_f, then exports merged weights (transformers), a PEFT adapter
and the delta-only adapter file.
"""
import sys
from pathlib import Path

import jax.numpy as jnp

import spsft_jax as sj
from spsft_jax.assets import default_asset

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
model = default_asset()

cfg, params = sj.interop.load_hf(model, dtype=jnp.float32)
tokenizer = sj.data.load_tokenizer(model)
examples = sj.data.encode(sj.data.read_jsonl(model / "train.jsonl"), tokenizer, max_length=32).examples
batches = [sj.data.pad_batch(examples[i:i + 16], 32, pad_id=0) for i in range(0, 256, 16)]

scores = sj.importance.taylor(cfg, params, batches, targets="all-linear")
selection = sj.selection.select(scores, rank=8)
result = sj.finetune(params, selection, batches, config=cfg, steps=100, learning_rate=1e-2)
print(f"loss {result.history[0]['loss']:.3f} -> {result.history[-1]['loss']:.3f}")

merged = sj.merge(params, result.delta)
sj.interop.save_hf(out / "merged", cfg, merged)
sj.interop.save_peft_adapter(out / "adapter", cfg, result.delta)
sj.checkpoint.save_delta(out / "delta.safetensors", result.delta)
print(f"wrote {out}/merged, {out}/adapter and {out}/delta.safetensors")
