"""Compiled step memory on a quantized (nf4) base beside bf16 and float32 bases, at 7B/8B
shapes: the QLoRA comparison in benchmarks/README.md.

    python benchmarks/quantized_memory.py             # the table (about 10 minutes on 2 cores)
    python benchmarks/quantized_memory.py --json

Every step is compiled from shapes (nothing allocated) with `spsft_jax.memory`: seq 2048,
remat "nested", the per-layer update, SPSFT r128 against LoRA r64 (QLoRA on the nf4
base) on all linears. The frozen linears are `quant.QuantizedWeight` leaves of kind nf4
(`memory.param_shapes(quantize="nf4")`); embeddings, norms and head are float, in the
base's dtype.

A CPU compile overstates a bfloat16 program: XLA's CPU backend computes bf16 in float32,
and its loop-invariant code motion hoists the up-casts out of the layer and loss loops,
so its temporaries hold float32 copies of frozen weights. This script turns that motion
off (`XLA_FLAGS=--xla_disable_hlo_passes=...`, set before JAX starts): the `cpu` column.
Two figures a GPU would see are derived from compiled buffers:
  `bound`: the bf16 program's argument and output bytes (weights as stored, trainable
      and optimizer state) plus the temporaries of the same step with float32 frozen
      leaves (no up-cast copies; every activation in float32, at least its bf16 size);
      a GPU stays under it.
  `est`: `cpu` less the float32 copy of the bf16 LM head the CPU makes for its matmul
      (vocab x hidden x 4 bytes, the largest buffer in XLA's memory-usage report; a GPU
      multiplies in bf16). Still counts the CPU's float32 copies of one layer's weights.
The last rows match torchtune's published QLoRA recipe for Llama-3.1-8B (7.4 GiB peak:
LoRA r8 on q, v, o and the MLP, batch 2 x 2048, activation checkpointing): SPSFT r16
on the same modules, and SPSFT r128 on all linears.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Before JAX starts: no hoisted float32 copies of bf16 weights (see above).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_disable_hlo_passes="
                           "while-loop-invariant-code-motion,while-loop-expensive-invariant-code-motion")

import jax.numpy as jnp  # noqa: E402

from spsft_jax import memory  # noqa: E402
from spsft_jax.interop import read_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
GiB = 2**30
TORCHTUNE_MODULES = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sizes(cfg, variant, *, batch, dtype, quantize) -> dict:
    """Bytes of one compiled program: arguments, outputs, temporaries, aliased."""
    setting = memory.Setting("plan", cfg, batch, 2048, variant.rank or 8, execute=False)
    remat = None if variant.method == "inference" else "nested"
    lowered, n = memory.lowered_variant(setting, variant, remat, dtype=dtype, update="per-layer",
                                        quantize=quantize)
    m = lowered.compile().memory_analysis()
    return {"args": m.argument_size_in_bytes, "out": m.output_size_in_bytes, "temp": m.temp_size_in_bytes,
            "alias": m.alias_size_in_bytes, "trainable": n}


def row(model, cfg, variant, *, label, batch, base) -> dict:
    quantize = "nf4" if base.startswith("nf4") else None
    stored = jnp.bfloat16 if base in ("bfloat16", "nf4+bf16") else jnp.float32
    b = sizes(cfg, variant, batch=batch, dtype=stored, quantize=quantize)
    cpu = b["args"] + b["out"] + b["temp"] - b["alias"]
    temp = b["temp"] if stored == jnp.float32 else sizes(cfg, variant, batch=batch, dtype=jnp.float32,
                                                         quantize=quantize)["temp"]
    head_copy = cfg.vocab_size * cfg.hidden_size * 4 if stored != jnp.float32 else 0
    return {"model": model, "base": base, "method": label, "batch": f"{batch}x2048",
            "trainable": b["trainable"], "cpu_gib": cpu / GiB,
            "bound_gib": (b["args"] + b["out"] - b["alias"] + temp) / GiB, "est_gib": (cpu - head_copy) / GiB}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    V = memory.Variant
    rows = []
    for model in ("llama-2-7b", "llama-3.1-8b"):
        cfg = read_config(CONFIGS / model)
        for base in ("float32", "bfloat16", "nf4+bf16"):
            for label, variant in (("inference", V("inference")), ("spsft r128", V("spsft", 128)),
                                   ("lora r64", V("lora", 64))):
                rows.append(row(model, cfg, variant, label=label, batch=1, base=base))
                _show(rows[-1], args.json)
    cfg = read_config(CONFIGS / "llama-3.1-8b")
    for label, variant in (("spsft r16 q,v,o,mlp", V("spsft", 16, TORCHTUNE_MODULES)),
                           ("lora r8 q,v,o,mlp", V("lora", 8, TORCHTUNE_MODULES)),
                           ("spsft r128", V("spsft", 128))):
        rows.append(row("llama-3.1-8b", cfg, variant, label=label, batch=2, base="nf4+bf16"))
        _show(rows[-1], args.json)
    return 0


def _show(r: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(r), flush=True)
    else:
        print(f"| {r['model']} | {r['base']} | {r['method']} | {r['batch']} | {r['trainable']:,} | "
              f"{r['cpu_gib']:.2f} | {r['bound_gib']:.2f} | {r['est_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
