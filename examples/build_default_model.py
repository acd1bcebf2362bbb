"""Rebuild the embedded default model and data in `spsft_jax/assets/tiny/`.

A character-level tokenizer, a tiny Llama pretrained from scratch (dense, with this
library) on string-manipulation text, and a fine-tuning task it has not seen
(adding two digits, asked in words), split into train and eval JSONL.
Deterministic; a few minutes on two CPU cores:

    python examples/build_default_model.py [--steps 800] [--data-only]
"""
from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

import jax

import spsft_jax as sj
from spsft_jax import data as sd

OUT = Path(__file__).resolve().parents[1] / "spsft_jax" / "assets" / "tiny"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " :->.,?!+="


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))


PRETRAIN_TASKS = {
    "copy": lambda w: w,
    "upper": str.upper,
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
    "length": lambda w: str(len(w)),
    "double": lambda w: w + w,
}


def pretrain_text(rng: random.Random, n: int) -> list[dict]:
    records = []
    for _ in range(n):
        name = rng.choice(sorted(PRETRAIN_TASKS))
        w = word(rng)
        records.append({"text": f"{name}: {w} -> {PRETRAIN_TASKS[name](w)}."})
    return records


def addition_task(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"prompt": f"What is {a} plus {b}? ", "response": f"{a + b}!"})
    return out


def write_task_data() -> None:
    rng = random.Random(1)
    for name, n in (("train", 512), ("eval", 64)):
        with open(OUT / f"{name}.jsonl", "w") as f:
            for record in addition_task(rng, n):
                f.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="pretraining steps")
    parser.add_argument("--data-only", action="store_true", help="rewrite the task JSONL only")
    args = parser.parse_args()
    if args.data_only:
        write_task_data()
        return
    rng = random.Random(0)
    tok = build_tokenizer()
    cfg = sj.llama.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=96, intermediate_size=256, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=24, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    params = sj.llama.init_params(cfg, jax.random.key(0))
    examples = sd.encode(pretrain_text(rng, 4000), tok, max_length=32)
    batches = sd.batches(examples, batch_size=32, seq_len=32, pad_id=0, seed=0)
    result = sj.finetune(params, None, batches, config=cfg, method="dense", steps=args.steps,
                         learning_rate=3e-3, warmup=0.05, schedule="cosine", progress=True)
    print("pretraining loss", result.history[0]["loss"], "->", result.history[-1]["loss"])
    params = sj.merge(params, result.delta)

    OUT.mkdir(parents=True, exist_ok=True)
    sj.interop.save_hf(OUT, cfg, params, overwrite=True)  # the folder also holds the task data
    tok.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": cfg.max_position_embeddings,
    }, indent=2) + "\n")
    write_task_data()


if __name__ == "__main__":
    main()
