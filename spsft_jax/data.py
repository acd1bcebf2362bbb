"""From JSONL text to the batches `finetune` consumes.

    records (JSONL, one object a line):
        {"prompt": "...", "response": "..."}   loss on the response tokens only
        {"text": "..."}                         loss on every token
    examples: [(input_ids, labels)]  lists of ints, labels -100 where no loss
    batch:    {"input_ids": int32 [B, T], "attention_mask": int32 [B, T], "labels": int32 [B, T]}

Tokenizers are HF `tokenizer.json` files read with the `tokenizers` library.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

IGNORE = -100


def load_tokenizer(path: str | os.PathLike):
    """A `tokenizers.Tokenizer` from a `tokenizer.json` file or a folder holding one."""
    from tokenizers import Tokenizer

    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json (HF fast-tokenizer format) found")
    return Tokenizer.from_file(str(file))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; an error names the file and line at fault."""
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not ({"text"} <= record.keys()
                                                    or {"prompt", "response"} <= record.keys()):
                raise ValueError(f"{path}:{line_no}: expected an object with 'text', "
                                 f"or 'prompt' and 'response'")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def special_id(tokenizer, *names: str) -> int | None:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def encode(records: Iterable[dict], tokenizer, *, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per record: BOS, prompt (no loss), response and EOS (loss)."""
    bos = special_id(tokenizer, "<s>", "<|begin_of_text|>")
    eos = special_id(tokenizer, "</s>", "<|end_of_text|>", "<|eot_id|>")
    examples = []
    for record in records:
        if "text" in record:
            prompt, response = [], tokenizer.encode(record["text"], add_special_tokens=False).ids
        else:
            prompt = tokenizer.encode(record["prompt"], add_special_tokens=False).ids
            response = tokenizer.encode(record["response"], add_special_tokens=False).ids
        head = ([bos] if bos is not None else []) + prompt
        tail = response + ([eos] if eos is not None else [])
        ids = (head + tail)[:max_length]
        labels = ([IGNORE] * len(head) + tail)[:max_length]
        examples.append((ids, labels))
    return examples


def pad_batch(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad examples to `seq_len` (labels -100 and attention 0 on padding)."""
    b = len(examples)
    ids = np.full((b, seq_len), pad_id, np.int32)
    labels = np.full((b, seq_len), IGNORE, np.int32)
    mask = np.zeros((b, seq_len), np.int32)
    for row, (x, y) in enumerate(examples):
        n = min(len(x), seq_len)
        ids[row, :n], labels[row, :n], mask[row, :n] = x[:n], y[:n], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(
    examples: list[tuple[list[int], list[int]]],
    *,
    batch_size: int,
    seq_len: int,
    pad_id: int = 0,
    seed: int | None = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled batches of one shape (one compilation); a new order each epoch."""
    if not examples:
        raise ValueError("no examples to batch")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(examples)) if seed is not None else np.arange(len(examples))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield pad_batch([examples[i] for i in order[start:start + batch_size]], seq_len, pad_id)
        if len(order) < batch_size:
            yield pad_batch([examples[i] for i in order], seq_len, pad_id)
