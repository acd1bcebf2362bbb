"""Compile time of `spsft_jax.llama.forward` against depth.

The decoder layers are stacked and run with `lax.scan`, so the compiled program
holds one layer body whatever `num_layers` is: compiling a 32-layer model should
take about as long as a 2-layer one of the same width. This script checks that
for the forward pass and for forward+backward (`jax.grad` of the summed logits
with respect to all parameters).

Inputs are `jax.ShapeDtypeStruct`s, so nothing model-sized is allocated; only
`jax.jit(f).lower(...).compile()` is timed, never a run.

    python benchmarks/compile_time.py                 # 2 vs 32 layers, hidden 256
    python benchmarks/compile_time.py --layers 2 8 32 --hidden 512 --json
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from spsft_jax import llama


def make_config(layers: int, hidden: int, vocab: int) -> llama.LlamaConfig:
    heads = max(1, hidden // 64)
    return llama.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64 or 64,  # Llama's ~8/3 ratio, rounded
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=max(1, heads // 2),
        head_dim=hidden // heads,
    )


def compile_seconds(fn, *args) -> float:
    """Wall time of lowering and compiling `fn` for abstract `args` (a fresh jit each time,
    so no cached executable is reused)."""
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start


def measure(layers: int, hidden: int, vocab: int, batch: int, seq: int, dtype) -> dict:
    cfg = make_config(layers, hidden, vocab)
    params = llama.param_shapes(cfg, dtype)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def forward(p, x):
        return llama.forward(cfg, p, x)

    def loss(p, x):
        return llama.forward(cfg, p, x).astype(jnp.float32).sum()

    return {
        "layers": layers,
        "hidden": hidden,
        "params": cfg.num_params(),
        "forward_compile_s": compile_seconds(forward, params, ids),
        "grad_compile_s": compile_seconds(jax.grad(loss), params, ids),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)

    # Warm up the backend and jax's own tracing machinery so the first row does not pay for it.
    measure(1, 64, 128, 1, 8, args.dtype)

    rows = [measure(n, args.hidden, args.vocab, args.batch, args.seq, jnp.dtype(args.dtype))
            for n in args.layers]
    if args.json:
        for row in rows:
            print(json.dumps({**row, "backend": jax.default_backend()}))
        return rows
    print(f"backend {jax.default_backend()}, hidden {args.hidden}, batch {args.batch}, "
          f"seq {args.seq}, {args.dtype}")
    print(f"{'layers':>6}  {'params':>11}  {'forward compile s':>17}  {'grad compile s':>14}")
    for row in rows:
        print(f"{row['layers']:>6}  {row['params']:>11,}  {row['forward_compile_s']:>17.3f}  "
              f"{row['grad_compile_s']:>14.3f}")
    return rows


if __name__ == "__main__":
    main()
