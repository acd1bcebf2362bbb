"""Rebuild the embedded default model and its task in `spsft_jax/assets/tiny/`.

The model is a 4-layer character-level Llama pretrained from scratch with this
library (dense training) on a small synthetic corpus:

    sums in three layouts     "3 + 4 = 7."   "3 and 4 make 7."   "the sum of 3 and 4 is 7."
    word games                "upper: cat -> CAT."   "last: tree -> e."   "length: moon -> 4."

Its held-out loss on word games with words it never saw, and on the sums, shows what
it learned. The fine-tuning task is new in form only: the same sums asked as a
question, "What is 3 plus 4? " -> "7!". The pairs (a, b) of the evaluation split are
not in the training split, so exact match there measures whether fine-tuning reached
the addition the model already knows rather than memorising answers.
Deterministic; about two minutes on two CPU cores:

    python examples/build_default_model.py [--steps 1500] [--data-only]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import string
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import spsft_jax as sj

OUT = Path(__file__).resolve().parents[1] / "spsft_jax" / "assets" / "tiny"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " :->.,?!+="
SEQ_LEN = 32

SUM_LAYOUTS = ("{a} + {b} = {c}.", "{a} and {b} make {c}.", "the sum of {a} and {b} is {c}.")
WORD_GAMES = {
    "copy": lambda w: w,
    "upper": str.upper,
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
    "length": lambda w: str(len(w)),
}


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # The tokenizer frames text with BOS itself, as Llama tokenizers do.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    return tok


def word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))


def corpus(rng: random.Random, n: int) -> list[str]:
    """Half sums (every pair of digits, in every layout), half word games."""
    lines = []
    for _ in range(n):
        if rng.random() < 0.5:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            lines.append(rng.choice(SUM_LAYOUTS).format(a=a, b=b, c=a + b))
        else:
            name, w = rng.choice(sorted(WORD_GAMES)), word(rng)
            lines.append(f"{name}: {w} -> {WORD_GAMES[name](w)}.")
    return lines


def question(a: int, b: int) -> dict:
    return {"prompt": f"What is {a} plus {b}? ", "response": f"{a + b}!"}


def write_task_data() -> None:
    """Train on 60 of the 100 digit pairs (repeated), evaluate on the other 40."""
    rng = random.Random(1)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    train, held_out = pairs[:60], pairs[60:]
    with open(OUT / "train.jsonl", "w") as f:
        for a, b in (rng.choice(train) for _ in range(512)):
            f.write(json.dumps(question(a, b)) + "\n")
    with open(OUT / "eval.jsonl", "w") as f:
        for a, b in held_out:
            f.write(json.dumps(question(a, b)) + "\n")


def batch_of(tok, lines: list[str]) -> dict[str, np.ndarray]:
    """BOS + text + EOS, right-padded to SEQ_LEN; loss on every real token."""
    ids = np.full((len(lines), SEQ_LEN), PAD, np.int32)
    for row, line in enumerate(lines):
        x = ([BOS] + tok.encode(line, add_special_tokens=False).ids + [EOS])[:SEQ_LEN]
        ids[row, : len(x)] = x
    mask = (ids != PAD).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}


def held_out_loss(cfg, params, batch) -> float:
    logits = sj.llama.forward(cfg, params, batch["input_ids"], batch["attention_mask"])
    total, count = sj.losses.causal_lm_loss(logits, batch["labels"])
    return float(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="pretraining steps")
    parser.add_argument("--data-only", action="store_true", help="rewrite the task JSONL only")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    write_task_data()
    if args.data_only:
        return
    rng = random.Random(0)
    tok = build_tokenizer()
    cfg = sj.llama.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=96, intermediate_size=256, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=24, max_position_embeddings=64,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    params = sj.llama.init_params(cfg, jax.random.key(0))
    lines = corpus(rng, 20000)
    batches = [batch_of(tok, lines[i:i + 32]) for i in range(0, len(lines), 32)]
    words = batch_of(tok, [line for line in corpus(random.Random(7), 512) if "->" in line][:128])
    sums = batch_of(tok, [f.format(a=a, b=b, c=a + b) for f in SUM_LAYOUTS
                          for a in range(10) for b in range(10)])
    print(f"held-out loss before: word games {held_out_loss(cfg, params, words):.3f}, "
          f"sums {held_out_loss(cfg, params, sums):.3f} (uniform: {np.log(cfg.vocab_size):.3f})")
    start = time.perf_counter()
    result = sj.finetune(params, None, batches, config=cfg, method="dense", steps=args.steps,
                         learning_rate=3e-3, warmup=0.05, schedule="cosine", progress=True)
    params = sj.merge(params, result.delta)
    print(f"pretraining: {args.steps} steps in {time.perf_counter() - start:.0f} s, "
          f"loss {result.history[0]['loss']:.3f} -> {result.history[-1]['loss']:.3f}")
    print(f"held-out loss after: word games {held_out_loss(cfg, params, words):.3f}, "
          f"sums {held_out_loss(cfg, params, sums):.3f}")

    with tempfile.TemporaryDirectory() as staging:  # save_hf writes a whole folder
        sj.interop.save_hf(Path(staging) / "model", cfg, params)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(Path(staging) / "model" / name, OUT / name)
    tok.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": cfg.max_position_embeddings,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
