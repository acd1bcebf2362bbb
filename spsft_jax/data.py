"""From the records a user has to the batches `finetune` consumes.

    records: a JSONL file (one object a line) or a JSON file (a list of objects), each
    file in one format, detected from its first record or given (`format=`):
        chat    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
                rendered with the tokenizer's own chat template; loss on assistant turns only
        alpaca  {"instruction": "...", "input": "..." (optional), "output": "..."}
                a user turn and an assistant turn through the chat template when the
                tokenizer has one, else the Alpaca prompt; loss on the output
        prompt  {"prompt": "...", "response": "..."}    raw text; loss on the response and EOS
        text    {"text": "..."}                          raw text; loss on every token and EOS
    example: (input_ids, labels)   lists of ints, labels -100 where no loss
    batch:   {"input_ids", "attention_mask", "labels": int32 [B, T]}, and with `pack=True`
             "segment_ids" int32 [B, T] (1, 2, ... per packed example, 0 on padding)

Tokenizers are HF fast tokenizers (`tokenizer.json`, `tokenizer_config.json`, chat
template) read with `transformers.PreTrainedTokenizerFast`, which needs no torch. Special
tokens come from those files and the model's `generation_config.json` / `config.json`:
BOS is whatever the tokenizer itself adds, EOS its `eos_token`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from spsft_jax.losses import IGNORE_INDEX

Example = tuple[list[int], list[int]]

# Required fields of each format, in the order formats are detected.
FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt": ("prompt", "response"),
    "text": ("text",),
}
EXPECTED = "; ".join(f"{' and '.join(repr(f) for f in fields)} ({name})" for name, fields in FORMATS.items())
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n{input}### Response:\n")


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | os.PathLike):
    """The HF fast tokenizer of a model folder (or of the folder of a `tokenizer.json`)."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder / 'tokenizer.json'}: no tokenizer (HF fast-tokenizer format) found")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Token ids read from the tokenizer and model files, never guessed from strings."""

    eos: int | None          # appended after a response or text
    pad: int                 # fills batches (masked out, so any id works)
    stop: tuple[int, ...]    # ids that end generation


def _json_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def special_tokens(tokenizer, model_dir: str | os.PathLike | None = None) -> SpecialTokens:
    """EOS, padding and stop ids: the tokenizer's, then `generation_config.json`, then `config.json`."""
    folder = Path(model_dir) if model_dir is not None else None
    generation = _json_file(folder / "generation_config.json") if folder else {}
    config = _json_file(folder / "config.json") if folder else {}
    model_eos = _ids(generation.get("eos_token_id")) + _ids(config.get("eos_token_id"))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (model_eos or [None])[0]
    stop = tuple(dict.fromkeys(_ids(eos) + model_eos))
    pad = next((p for p in (tokenizer.pad_token_id, generation.get("pad_token_id"),
                            config.get("pad_token_id"), eos) if p is not None), 0)
    return SpecialTokens(eos=eos, pad=int(pad), stop=stop)


# --------------------------------------------------------------------------- records


def read_records(path: str | os.PathLike, *, format: str | None = None) -> tuple[str, list[tuple[str, dict]]]:
    """(format, [(where, record)]) of a JSONL or JSON file; `where` is "file:line".

    Every record must be in the file's format (detected from the first record unless
    given); an error names the file, the line and the fields expected.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"format={format!r}: choose one of {', '.join(FORMATS)}")
    with open(path) as f:
        text = f.read()
    located: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):  # a JSON list of records
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        located = [(f"{path}: record {i}", item) for i, item in enumerate(items, 1)]
    else:
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    if not located:
        raise ValueError(f"{path}: no records")
    for where, record in located:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with {EXPECTED}")
        if format is None:
            format = detect_format(record)
            if format is None:
                raise ValueError(f"{where}: a record in none of the formats: expected {EXPECTED}; "
                                 f"got fields {sorted(record)}")
        check_record(record, format, where)
    return format, located


def read_jsonl(path: str | os.PathLike, *, format: str | None = None) -> list[dict]:
    """The records of a JSONL or JSON file, checked as `read_records` does."""
    return [record for _, record in read_records(path, format=format)[1]]


def detect_format(record: dict) -> str | None:
    return next((name for name, fields in FORMATS.items() if set(fields) <= record.keys()), None)


def check_record(record: dict, format: str, where: str) -> None:
    fields = FORMATS[format]
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: a {format} record needs {' and '.join(map(repr, fields))}; "
                         f"got fields {sorted(record)}")
    if format == "chat":
        check_conversation(record["messages"], where)
        return
    for name in fields + (("input",) if format == "alpaca" and "input" in record else ()):
        if not isinstance(record[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")


def check_conversation(messages: Any, where: str) -> None:
    """An optional system turn, then user and assistant turns alternating, with an assistant turn."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} "
                         f"objects with string values")
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(turns)):
        raise ValueError(f"{where}: roles must alternate user, assistant, ... after an optional "
                         f"system turn; got {roles}")
    if "assistant" not in turns:
        raise ValueError(f"{where}: no assistant turn to learn from (roles {roles})")


# --------------------------------------------------------------------------- encoding


def _encode(tokenizer, text: str, *, specials: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=specials)["input_ids"])


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                              add_generation_prompt=generation_prompt))


def chat_prompt(tokenizer, messages: list[dict] | str) -> list[int]:
    """Token ids of a conversation (or one user message) ready for the assistant's reply."""
    require_chat_template(tokenizer, "chat prompt")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return _render(tokenizer, messages, generation_prompt=True)


def require_chat_template(tokenizer, needed_by: str) -> None:
    if not tokenizer.chat_template:
        raise ValueError(f"{needed_by}: the tokenizer of {tokenizer.name_or_path} has no chat template "
                         f"(chat_template.jinja or 'chat_template' in tokenizer_config.json)")


def encode_chat(tokenizer, messages: list[dict], where: str = "conversation") -> Example:
    """The rendered conversation, with labels on the assistant turns only.

    Each assistant turn's tokens are found by rendering the conversation up to it (with
    the generation prompt) and up to its end, and taking the difference: whatever the
    template adds around a reply (headers, end-of-turn tokens) is placed as the template
    places it, and the end-of-turn token is learned.
    """
    ids = _render(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1])
        if ids[:len(before)] != before or ids[:len(through)] != through:
            raise ValueError(f"{where}: the chat template of {tokenizer.name_or_path} does not render the "
                             f"start of this conversation as a prefix of the whole; cannot place turn {i}")
        labels[len(before):len(through)] = ids[len(before):len(through)]
    return ids, labels


def alpaca_messages(record: dict) -> list[dict]:
    """An Alpaca record as a user turn (instruction, then input) and an assistant turn."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def encode_record(record: dict, format: str, tokenizer, tokens: SpecialTokens, where: str = "record") -> Example:
    """(input_ids, labels) of one record of the given format."""
    if format == "alpaca" and tokenizer.chat_template:
        format, record = "chat", {"messages": alpaca_messages(record)}
    if format == "chat":
        require_chat_template(tokenizer, where)
        return encode_chat(tokenizer, record["messages"], where)
    eos = [tokens.eos] if tokens.eos is not None else []
    if format == "text":
        ids = _encode(tokenizer, record["text"], specials=True) + eos
        return ids, list(ids)
    if format == "alpaca":
        context = record.get("input") or ""
        prompt = ALPACA_PROMPT.format(
            context=", paired with an input that provides further context" if context else "",
            instruction=record["instruction"], input=f"### Input:\n{context}\n\n" if context else "")
        response = record["output"]
    else:
        prompt, response = record["prompt"], record["response"]
    head = _encode(tokenizer, prompt, specials=True)
    tail = _encode(tokenizer, response, specials=False) + eos
    return head + tail, [IGNORE_INDEX] * len(head) + tail


@dataclasses.dataclass
class Encoded:
    """Examples of one data source and what encoding them did."""

    examples: list[Example]
    format: str
    longest: int        # tokens of the longest example before truncation
    truncated: int      # examples cut to max_len
    max_len: int

    @property
    def seq_len(self) -> int:
        """The longest example, capped by `max_len`."""
        return min(self.longest, self.max_len)


def encode(
    records: Iterable[dict] | Iterable[tuple[str, dict]],
    tokenizer,
    *,
    max_length: int = 2048,
    format: str | None = None,
    truncate: str = "right",
    tokens: SpecialTokens | None = None,
) -> Encoded:
    """Encode records (or `(where, record)` pairs), each in `format` or in the format it
    has; cut examples longer than `max_length` and count them, or with `truncate="error"`
    refuse, naming the record."""
    if truncate not in ("right", "error"):
        raise ValueError(f"truncate={truncate!r}: choose 'right' or 'error'")
    tokens = tokens or special_tokens(tokenizer)
    examples, formats, longest, truncated = [], [], 0, 0
    for index, item in enumerate(records, 1):
        where, record = item if isinstance(item, tuple) else (f"record {index}", item)
        fmt = format or detect_format(record)
        if fmt is None:
            raise ValueError(f"{where}: a record in none of the formats: expected {EXPECTED}; "
                             f"got fields {sorted(record)}")
        check_record(record, fmt, where)
        formats.append(fmt)
        ids, labels = encode_record(record, fmt, tokenizer, tokens, where)
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            if truncate == "error":
                raise ValueError(f"{where}: example of {len(ids)} tokens is longer than max_len "
                                 f"{max_length} (truncate='error')")
            ids, labels, truncated = ids[:max_length], labels[:max_length], truncated + 1
        examples.append((ids, labels))
    if not examples:
        raise ValueError("no records to encode")
    return Encoded(examples, format or formats[0], longest, truncated, max_length)


def load(
    path: str | os.PathLike,
    tokenizer,
    *,
    format: str | None = None,
    max_len: int = 2048,
    truncate: str = "right",
    tokens: SpecialTokens | None = None,
) -> Encoded:
    """Read, check and encode a data file: `Encoded` with the examples and their statistics."""
    fmt, located = read_records(path, format=format)
    if fmt == "chat":
        require_chat_template(tokenizer, f"{path}: chat records")
    return encode(located, tokenizer, max_length=max_len, format=fmt, truncate=truncate, tokens=tokens)


# --------------------------------------------------------------------------- batches


def bucket_length(n: int, max_len: int | None = None) -> int:
    """The padded length for `n` tokens: the smallest of 16, 32, 64, 96, 128, 192, 256,
    384, ... (powers of two and 1.5 times them) that holds it, capped at `max_len`. A
    dozen shapes reach 2048, so few compile, and padding stays under a third."""
    power = 16
    while True:
        for size in (power, power * 3 // 2) if power >= 64 else (power,):
            if size >= n:
                return size if max_len is None else min(size, max(max_len, n))
        power *= 2


def pad_batch(examples: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad examples to `seq_len` (labels -100 and attention 0 on padding)."""
    b = len(examples)
    ids = np.full((b, seq_len), pad_id, np.int32)
    labels = np.full((b, seq_len), IGNORE_INDEX, np.int32)
    mask = np.zeros((b, seq_len), np.int32)
    for row, (x, y) in enumerate(examples):
        n = min(len(x), seq_len)
        ids[row, :n], labels[row, :n], mask[row, :n] = x[:n], y[:n], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_examples(examples: Sequence[Example], seq_len: int) -> list[list[Example]]:
    """Examples grouped into rows of at most `seq_len` tokens (first fit, longest first)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
        n = min(len(examples[i][0]), seq_len)
        row = next((r for r, free in enumerate(room) if free >= n), None)
        if row is None:
            rows.append([])
            room.append(seq_len)
            row = len(rows) - 1
        rows[row].append(examples[i])
        room[row] -= n
    return rows


def packed_batch(rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows of packed examples as one batch with `segment_ids` (1, 2, ... per example, 0 on padding).

    Each example's first label is dropped, so the last token of one example is never
    trained to predict the first of the next.
    """
    examples = [(sum((x for x, _ in row), []), sum(([IGNORE_INDEX] + y[1:] for _, y in row), [])) for row in rows]
    batch = pad_batch(examples, seq_len, pad_id)
    segments = np.zeros_like(batch["input_ids"])
    for r, row in enumerate(rows):
        lengths = [min(len(x), seq_len) for x, _ in row]
        segments[r, :sum(lengths)] = np.repeat(np.arange(1, len(row) + 1), lengths)[:seq_len]
    batch["segment_ids"] = segments
    return batch


def batches(
    examples: Sequence[Example],
    *,
    batch_size: int,
    seq_len: int | None = None,
    max_len: int | None = None,
    pad_id: int = 0,
    seed: int | None = 0,
    pack: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled batches, a new order each epoch.

    seq_len: pad every batch to this length (one shape); by default each batch is padded
        to the `bucket_length` of its longest example (a few shapes, each compiled once;
        batches stay random draws, not grouped by length).
    pack: several examples per row (segment ids keep them apart), rows of `seq_len`
        (default: `max_len`, else the longest example's bucket).
    """
    if not examples:
        raise ValueError("no examples to batch")
    rng = np.random.default_rng(seed) if seed is not None else None
    lengths = np.array([len(x) for x, _ in examples])
    if pack:
        row_len = seq_len or max_len or bucket_length(int(lengths.max()))
        rows = pack_examples(examples, row_len)
        while True:
            order = rng.permutation(len(rows)) if rng is not None else np.arange(len(rows))
            for start in range(0, max(len(order) - batch_size, 0) + 1, batch_size):
                yield packed_batch([rows[i] for i in order[start:start + batch_size]], row_len, pad_id)
    while True:
        order = rng.permutation(len(examples)) if rng is not None else np.arange(len(examples))
        groups = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        if len(order) < batch_size:
            groups = [order]
        for group in groups:
            n = seq_len or bucket_length(int(lengths[group].max()), max_len)
            yield pad_batch([examples[i] for i in group], n, pad_id)


def eval_batches(examples: Sequence[Example], *, batch_size: int, pad_id: int = 0,
                 max_len: int | None = None) -> list[dict[str, np.ndarray]]:
    """Every example once, in batches of similar length; the last batch is filled with
    empty rows (no tokens, no loss) so that all batches share the batch size."""
    order = np.argsort([len(x) for x, _ in examples], kind="stable")
    groups = [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    return [pad_batch(g + [([], [])] * (batch_size - len(g)),
                      bucket_length(max(len(x) for x, _ in g), max_len), pad_id) for g in groups]


def prompts_and_references(records: Iterable[dict], format: str, tokenizer) -> list[tuple[list[int], str]]:
    """(prompt ids, reference text) of each record that has a reply to compare against:
    the prompt as training renders it, up to where the reply starts (text records have none)."""
    pairs = []
    for record in records:
        if format == "chat" or (format == "alpaca" and tokenizer.chat_template):
            messages = alpaca_messages(record) if format == "alpaca" else record["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            pairs.append((chat_prompt(tokenizer, messages[:last]), messages[last]["content"]))
        elif format in ("alpaca", "prompt"):
            ids, labels = encode_record(record, format, tokenizer, SpecialTokens(None, 0, ()))
            start = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(ids))
            pairs.append((ids[:start], record["output"] if format == "alpaca" else record["response"]))
    return pairs


def class_batches(path: str | os.PathLike, encoded: Encoded, *, batch_size: int, pad_id: int,
                  seq_len: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches in file order with `classes` [B]: each record's `label` of the file `encoded`
    was read from, numbered in sorted order (class-wise importance needs them)."""
    records = read_jsonl(path, format=encoded.format)
    missing = next((i for i, r in enumerate(records) if "label" not in r), None)
    if missing is not None:
        raise ValueError(f"{path}: record {missing + 1} has no 'label' field "
                         "(class-wise Taylor needs one class label per record)")
    names = sorted({str(r["label"]) for r in records})
    classes = np.array([names.index(str(r["label"])) for r in records], np.int32)
    seq_len = seq_len or bucket_length(encoded.seq_len, encoded.max_len)
    for start in range(0, len(encoded.examples), batch_size):
        batch = pad_batch(encoded.examples[start:start + batch_size], seq_len, pad_id)
        yield {**batch, "classes": classes[start:start + batch_size]}


def normalize_batch(batch: Mapping[str, Any], index: int = 0, *,
                    labels_required: bool = False) -> dict[str, np.ndarray]:
    """The one batch check: int32 input_ids / attention_mask / labels `[batch, seq]`
    (+ segment_ids); defaults: all tokens real, labels = ids at real tokens (unless
    `labels_required`, as for importance scores, which need the task's labels)."""
    for key in ("input_ids", "labels") if labels_required else ("input_ids",):
        if key not in batch or batch[key] is None:
            raise KeyError(f"batch {index}: no {key!r} (has {sorted(batch)})")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"batch {index}: input_ids must be [batch, seq], got shape {ids.shape}")
    mask = batch.get("attention_mask")
    mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    labels = batch.get("labels")
    labels = np.where(mask.astype(bool), ids, IGNORE_INDEX) if labels is None else np.asarray(labels)
    for name, value in (("attention_mask", mask), ("labels", labels)):
        if value.shape != ids.shape:
            raise ValueError(f"batch {index}: {name} has shape {value.shape}, input_ids has {ids.shape}")
    normal = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
              "labels": labels.astype(np.int32)}
    if "segment_ids" in batch:
        normal["segment_ids"] = np.asarray(batch["segment_ids"]).astype(np.int32)
    return normal
