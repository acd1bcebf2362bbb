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
    example: (input_ids, labels)   lists of ints, labels -100 where no loss; one longer than
             max_len loses the start of its prompt (a leading BOS kept), then its end if still
             too long (`truncate="left"`), or only its end ("right"), or is refused ("error")
    batch:   {"input_ids", "attention_mask", "labels": int32 [B, T]}, and with `pack=True`
             "segment_ids" int32 [B, T] (1, 2, ... per packed example, 0 on padding)

Tokenizers are HF fast tokenizers (`tokenizer.json`, `tokenizer_config.json`, chat
template) read with `transformers.PreTrainedTokenizerFast`, which needs no torch. Special
tokens come from those files and the model's `generation_config.json` / `config.json`:
BOS is whatever the tokenizer itself adds, EOS its `eos_token`.

Hostile files stay cheap: JSONL is read a line at a time (a line can be refused unread past
`record_byte_limit`), and text fields are cut to `max_len * CHARS_PER_TOKEN` characters
before tokenizing, on the side truncation would drop anyway.
"""
from __future__ import annotations

import dataclasses
import itertools
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

# Real text averages 3 to 5 characters a token. The longest tokens are runs of spaces, '-',
# '=' or '#' (SmolLM2's reach 81 characters, and it spends exactly 64 a token on such a
# run), so with 128 even a field made only of them keeps over max_len tokens after the cut:
# the tokens kept are then those of the whole field, as BPE and its pre-tokenizers change
# tokens only near a cut, an end that truncation drops anyway.
CHARS_PER_TOKEN = 128
MiB = 1 << 20


def record_byte_limit(max_len: int) -> int:
    """The longest JSONL line worth reading for `max_len`: 128 character caps, at least 16 MiB.

    What truncation keeps of a record is about two caps of text at most (the end of the
    prompt and the start of the rest), and JSON spells a character in 12 bytes at most (an
    escaped surrogate pair), so 128 caps is 5 times the worst case and 60 times plain
    text. The floor lets a file fit for long examples load for a quick run at a small max_len.
    """
    return max(16 * MiB, 128 * max_len * CHARS_PER_TOKEN)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024


def _lines(f, path, limit: int | None) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary file, one line in memory at a time; a line longer
    than `limit` bytes is refused after reading no more than `limit` + 2 bytes of it."""
    line_no = 0
    while True:
        raw = f.readline() if limit is None else f.readline(limit + 2)
        if not raw:
            return
        line_no += 1
        if limit is not None and len(raw.rstrip(b"\r\n")) > limit:
            raise ValueError(f"{path}:{line_no}: a record of over {_size(limit)} (the limit of a line), "
                             f"far beyond any useful example length")
        try:
            yield line_no, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {err.start})") from None


def _json_list(f) -> bool:
    """Whether a binary file starts (after white space) with '[', read a chunk at a time."""
    while chunk := f.read(1 << 16):
        if chunk.lstrip():
            f.seek(0)
            return chunk.lstrip().startswith(b"[")
    f.seek(0)
    return False


def _list_items(path, raw: bytes) -> list[tuple[str, Any]]:
    try:
        items = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        line_no, line_start = raw.count(b"\n", 0, err.start) + 1, raw.rfind(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {err.start - line_start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    return [(f"{path}: record {i}", item) for i, item in enumerate(items, 1)]


def _located(path, max_record_bytes: int | None) -> Iterator[tuple[str, Any]]:
    """(where, parsed JSON) of each record; a JSONL file is read a line at a time, a JSON
    list whole (`max_record_bytes` bounds JSONL lines only)."""
    with open(path, "rb") as f:
        if _json_list(f):
            yield from _list_items(path, f.read())
            return
        for line_no, line in _lines(f, path, max_record_bytes):
            if line.strip():
                yield f"{path}:{line_no}", _parse(line, f"{path}:{line_no}")


def _parse(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None


def _file_format(where: str, record: Any) -> str:
    """The format of a file, from its first record."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with {EXPECTED}")
    found = detect_format(record)
    if found is None:
        raise ValueError(f"{where}: a record in none of the formats: expected {EXPECTED}; "
                         f"got fields {sorted(record)}")
    return found


def _checked(where: str, record: Any, format: str) -> tuple[str, dict]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with {EXPECTED}")
    check_record(record, format, where)
    return where, record


def iter_records(path: str | os.PathLike, *, format: str | None = None,
                 max_record_bytes: int | None = None) -> tuple[str, Iterator[tuple[str, dict]]]:
    """(format, lazy [(where, record)]) of a JSONL or JSON file; `where` is "file:line".

    The format is read off the first record (unless given); the records are read and
    checked one at a time as the iterator advances, each held only while in use. Lines of
    over `max_record_bytes` bytes are refused unread (see `record_byte_limit`). Errors name
    the file and the line: not UTF-8, not JSON, not an object, not the file's format.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"format={format!r}: choose one of {', '.join(FORMATS)}")
    located = _located(path, max_record_bytes)
    first = next(located, None)
    if first is None:
        raise ValueError(f"{path}: no records")
    format = format or _file_format(*first)
    first = _checked(*first, format)  # now, so its errors come before the caller's (no chat template, ...)
    return format, itertools.chain([first], (_checked(where, record, format) for where, record in located))


def read_file_checked(path: str | os.PathLike, *, format: str | None = None,
                      max_record_bytes: int | None = None) -> tuple[str, int]:
    """(format, number of records) of a data file checked as `iter_records` checks it,
    keeping no record: a check to run before anything large is loaded."""
    format, records = iter_records(path, format=format, max_record_bytes=max_record_bytes)
    return format, sum(1 for _ in records)


def read_records(path: str | os.PathLike, *, format: str | None = None, max_record_bytes: int | None = None,
                 max_len: int | None = None, truncate: str = "left") -> tuple[str, list[tuple[str, dict]]]:
    """(format, [(where, record)]) of a JSONL or JSON file, checked as `iter_records` does.

    With `max_len`, the text fields are kept as `cap_record` cuts them for that length and
    truncation, so no record holds more text than an example can use (`encode` would not
    count these records as truncated: `load` a file to have that counted).
    """
    format, records = iter_records(path, format=format, max_record_bytes=max_record_bytes)
    if max_len is not None:
        records = ((where, cap_record(record, format, max_len, truncate)[0]) for where, record in records)
    return format, list(records)


def read_jsonl(path: str | os.PathLike, *, format: str | None = None, **options) -> list[dict]:
    """The records of a JSONL or JSON file, as `read_records` reads them (same options)."""
    return [record for _, record in read_records(path, format=format, **options)[1]]


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
            raise ValueError(f"{where}: field {name!r} must be a string, found {type(record[name]).__name__}")


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


# Texts longer than the tokenizer's model_max_length are expected (truncation comes after):
# `verbose=False` keeps transformers from logging that they are.
def encode_text(tokenizer, text: str, *, specials: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=specials, verbose=False)["input_ids"])


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                              add_generation_prompt=generation_prompt,
                                              tokenizer_kwargs={"verbose": False}))


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
        ids = encode_text(tokenizer, record["text"], specials=True) + eos
        return ids, list(ids)
    if format == "alpaca":
        context = record.get("input") or ""
        prompt = ALPACA_PROMPT.format(
            context=", paired with an input that provides further context" if context else "",
            instruction=record["instruction"], input=f"### Input:\n{context}\n\n" if context else "")
        response = record["output"]
    else:
        prompt, response = record["prompt"], record["response"]
    head = encode_text(tokenizer, prompt, specials=True)
    tail = encode_text(tokenizer, response, specials=False) + eos
    return head + tail, [IGNORE_INDEX] * len(head) + tail


TRUNCATE = ("left", "right", "error")
PROMPT_FIELDS = ("prompt", "instruction", "input")


def _cut(text: str, cap: int, keep_end: bool) -> str:
    return text if len(text) <= cap else text[-cap:] if keep_end else text[:cap]


def cap_record(record: dict, format: str, max_len: int, truncate: str = "left") -> tuple[dict, bool]:
    """The record with each text field cut to `max_len * CHARS_PER_TOKEN` characters, and
    whether any was cut; a record with no longer field is returned as it is.

    A field keeps the side truncation keeps: with "left", the end of the prompt-side fields
    (prompt, instruction, input, the turns before the first assistant turn) and the start
    of the others; otherwise the start of all. So tokenizing stays bounded, and the example
    is the one the whole record gives, as long as a cut field still holds max_len tokens.
    """
    cap = max_len * CHARS_PER_TOKEN
    if format == "chat":
        messages = record["messages"]
        if all(len(m["content"]) <= cap for m in messages):
            return record, False
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return {**record, "messages": [{**m, "content": _cut(m["content"], cap, truncate == "left" and i < first)}
                                       for i, m in enumerate(messages)]}, True
    long = [name for name in FORMATS[format] + ("input",)
            if isinstance(record.get(name), str) and len(record[name]) > cap]
    if not long:
        return record, False
    return {**record, **{name: _cut(record[name], cap, truncate == "left" and name in PROMPT_FIELDS)
                         for name in long}}, True


def truncate_example(ids: list[int], labels: list[int], max_length: int, *,
                     side: str = "left", bos: int | None = None) -> Example:
    """An example cut to `max_length` tokens, labels kept aligned with ids.

    right: the end is cut. left: the prompt (the tokens before the first label) loses
    tokens from its start, a leading `bos` excepted, and only when the rest is still too
    long is its end cut: what is trained on is kept as far as it fits.
    """
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, labels
    if side == "left":
        keep = 1 if bos is not None and ids[:1] == [bos] else 0
        start = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
        drop = max(0, min(excess, start - keep))
        ids, labels = ids[:keep] + ids[keep + drop:], labels[:keep] + labels[keep + drop:]
    return ids[:max_length], labels[:max_length]


def has_targets(labels: Sequence[int]) -> bool:
    """Whether an example has a token to learn: a label at position 1 or later (nothing
    predicts position 0 in a causal LM)."""
    return any(y != IGNORE_INDEX for y in labels[1:])


@dataclasses.dataclass
class Encoded:
    """Examples of one data source and what encoding them did."""

    examples: list[Example]
    format: str
    longest: int        # tokens of the longest example before truncation (of its capped fields, if cut)
    truncated: int      # examples cut to max_len (tokens, or the characters of a field)
    max_len: int
    without_targets: int = 0  # examples with no token to learn (see `has_targets`)
    targets_cut: int = 0      # of those, the ones that had some before truncation

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
    truncate: str = "left",
    tokens: SpecialTokens | None = None,
) -> Encoded:
    """Encode records (or `(where, record)` pairs), each in `format` or in the format it
    has, and count those cut or left with nothing to learn (the caller decides what is
    too many). Examples longer than `max_length` tokens are cut as `truncate` says:
    "left" (`truncate_example`: the start of the prompt, keeping BOS), "right" (the end),
    or "error" (refused, naming the record). Text fields are first capped
    (`cap_record`), which leaves the examples as they would be without the cap."""
    if truncate not in TRUNCATE:
        raise ValueError(f"truncate={truncate!r}: choose 'left', 'right' or 'error'")
    tokens = tokens or special_tokens(tokenizer)
    examples, formats, longest, truncated, without, cut_away = [], [], 0, 0, 0, 0
    for index, item in enumerate(records, 1):
        where, record = item if isinstance(item, tuple) else (f"record {index}", item)
        fmt = format or detect_format(record)
        if fmt is None:
            raise ValueError(f"{where}: a record in none of the formats: expected {EXPECTED}; "
                             f"got fields {sorted(record)}")
        check_record(record, fmt, where)
        formats.append(fmt)
        record, capped = cap_record(record, fmt, max_length, truncate)
        if capped and truncate == "error":
            raise ValueError(f"{where}: a text field of over {max_length * CHARS_PER_TOKEN:,} characters, "
                             f"longer than max_len {max_length} tokens hold (truncate='error')")
        ids, labels = encode_record(record, fmt, tokenizer, tokens, where)
        longest, learns = max(longest, len(ids)), has_targets(labels)
        if len(ids) > max_length and truncate == "error":
            raise ValueError(f"{where}: example of {len(ids)} tokens is longer than max_len "
                             f"{max_length} (truncate='error')")
        truncated += capped or len(ids) > max_length
        ids, labels = truncate_example(ids, labels, max_length, side=truncate, bos=tokenizer.bos_token_id)
        if not has_targets(labels):
            without, cut_away = without + 1, cut_away + learns
        examples.append((ids, labels))
    if not examples:
        raise ValueError("no records to encode")
    return Encoded(examples, format or formats[0], longest, truncated, max_length, without, cut_away)


def load(
    path: str | os.PathLike,
    tokenizer,
    *,
    format: str | None = None,
    max_len: int = 2048,
    truncate: str = "left",
    tokens: SpecialTokens | None = None,
    max_record_bytes: int | None = None,
) -> Encoded:
    """Read, check and encode a data file: `Encoded` with the examples and their statistics.

    Records are read and encoded one at a time (`iter_records`), so memory holds one
    record's text at most besides the examples; `max_record_bytes` bounds that too.
    """
    fmt, records = iter_records(path, format=format, max_record_bytes=max_record_bytes)
    if fmt == "chat":
        require_chat_template(tokenizer, f"{path}: chat records")
    return encode(records, tokenizer, max_length=max_len, format=fmt, truncate=truncate, tokens=tokens)


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
    records = read_jsonl(path, format=encoded.format, max_len=encoded.max_len)
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
