"""Records -> examples -> batches: formats, chat templates, special tokens, truncation
(left, right, error) and examples left without targets, hostile files (long lines, huge
fields, bad bytes), buckets, packing (against unpacked logits), evaluation, and the CLI's
refusals."""
from __future__ import annotations

import json
import re
import shutil

import jax
import numpy as np
import pytest

from spsft_jax import assets, cli, data, evaluate, llama
from spsft_jax.losses import IGNORE_INDEX

TINY = assets.default_asset()
CHAT = [{"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "De rien."}]


@pytest.fixture(scope="module")
def tiny_tok():
    return data.load_tokenizer(TINY)


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return data.load_tokenizer(smollm2_dir)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _learned(tok, example):
    ids, labels = example
    return tok.decode([i for i, y in zip(ids, labels) if y != IGNORE_INDEX])


# --------------------------------------------------------------------------- formats


def test_formats_detected_per_file_and_overridable(tmp_path):
    cases = {"chat": {"messages": CHAT}, "alpaca": {"instruction": "i", "input": "x", "output": "o"},
             "prompt": {"prompt": "p", "response": "r"}, "text": {"text": "t"}}
    for name, record in cases.items():
        assert data.read_records(_write(tmp_path / f"{name}.jsonl", [record]))[0] == name
    # A JSON list reads like JSONL; an explicit format wins over detection.
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([cases["alpaca"], cases["alpaca"]]))
    fmt, located = data.read_records(listed)
    assert fmt == "alpaca" and len(located) == 2
    assert data.read_records(_write(tmp_path / "both.jsonl", [{"text": "t", "prompt": "p", "response": "r"}]),
                             format="text")[0] == "text"


def test_prompt_and_text_labels_with_the_tokenizers_own_specials(tiny_tok):
    enc = data.encode([{"prompt": "1 plus 2? ", "response": "3!"}, {"text": "abc"}], tiny_tok)
    (p_ids, p_labels), (t_ids, t_labels) = enc.examples
    bos, eos = tiny_tok.convert_tokens_to_ids("<s>"), tiny_tok.convert_tokens_to_ids("</s>")
    prompt = tiny_tok("1 plus 2? ", add_special_tokens=False)["input_ids"]
    response = tiny_tok("3!", add_special_tokens=False)["input_ids"]
    assert p_ids == [bos] + prompt + response + [eos]
    assert p_labels == [IGNORE_INDEX] * (1 + len(prompt)) + response + [eos]
    assert t_ids == t_labels == [bos] + tiny_tok("abc", add_special_tokens=False)["input_ids"] + [eos]


def test_special_tokens_come_from_the_files(tmp_path, tiny_tok):
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    assert data.special_tokens(tiny_tok, folder) == data.SpecialTokens(eos=2, pad=0, stop=(2,))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert data.special_tokens(tiny_tok, folder).stop == (2, 7)


def test_chat_loss_on_assistant_turns_only(smol_tok):
    ids, labels = data.encode_chat(smol_tok, CHAT)
    assert ids == smol_tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    # Exactly the replies and the end-of-turn the template writes after each.
    assert _learned(smol_tok, (ids, labels)) == "Bonjour !<|im_end|>\nDe rien.<|im_end|>\n"
    # The text before each reply is the rendered prompt that generation starts from.
    first = labels.index(next(y for y in labels if y != IGNORE_INDEX))
    assert ids[:first] == data.chat_prompt(smol_tok, CHAT[:2])


def test_alpaca_goes_through_the_template_when_there_is_one(smol_tok, tiny_tok):
    record = {"instruction": "Translate", "input": "cat", "output": "chat"}
    chat = data.encode([record], smol_tok).examples[0]
    assert chat == data.encode_chat(smol_tok, data.alpaca_messages(record))
    plain_ids, plain_labels = data.encode([record], tiny_tok, format="alpaca").examples[0]
    assert _learned(tiny_tok, (plain_ids, plain_labels)) == "chat</s>"
    assert "Instruction:" in tiny_tok.decode(plain_ids)  # the Alpaca prompt


def test_truncation_counted_or_refused(tiny_tok):
    records = [{"text": "a" * n} for n in (3, 10, 20)]
    enc = data.encode(records, tiny_tok, max_length=8)
    assert enc.truncated == 2 and enc.longest == 22 and enc.seq_len == 8
    assert all(len(x) <= 8 for x, _ in enc.examples)
    with pytest.raises(ValueError, match=r"record 2: example of 12 tokens is longer than max_len 8"):
        data.encode(records, tiny_tok, max_length=8, truncate="error")
    with pytest.raises(ValueError, match=r"truncate='middle': choose 'left', 'right' or 'error'"):
        data.encode(records, tiny_tok, truncate="middle")


def _whole(tok, record, fmt, max_length, side):
    """The record tokenized whole, then truncated: what a capped record must still give."""
    ids, labels = data.encode_record(record, fmt, tok, data.special_tokens(tok))
    return data.truncate_example(ids, labels, max_length, side=side, bos=tok.bos_token_id)


def test_left_truncation_drops_the_start_of_the_prompt_keeping_bos(tiny_tok):
    record = {"prompt": "1 plus 2? " * 3, "response": "3!"}
    full_ids, full_labels = data.encode([record], tiny_tok, max_length=1000).examples[0]
    assert full_ids[0] == tiny_tok.bos_token_id and len(full_ids) == 34
    enc = data.encode([record], tiny_tok, max_length=10)  # "left" by default
    assert enc.examples[0] == (full_ids[:1] + full_ids[-9:], full_labels[:1] + full_labels[-9:])
    assert _learned(tiny_tok, enc.examples[0]) == "3!</s>" and enc.truncated == 1
    # "right" cuts the end, so the response goes; "error" refuses.
    assert data.encode([record], tiny_tok, max_length=10, truncate="right").examples[0] == \
        (full_ids[:10], full_labels[:10])
    with pytest.raises(ValueError, match=r"record 1: example of 34 tokens is longer than max_len 10"):
        data.encode([record], tiny_tok, max_length=10, truncate="error")
    # A response longer than max_len: the whole prompt goes (BOS stays), then the end.
    long = {"prompt": "p" * 5, "response": "r" * 20}
    ids, labels = data.encode([long], tiny_tok, max_length=8).examples[0]
    assert ids[0] == tiny_tok.bos_token_id and tiny_tok.decode(ids[1:]) == "r" * 7
    assert labels == [IGNORE_INDEX] + ids[1:]
    # Text is learned from its first token: nothing is a prompt, so the end is cut.
    text_ids, text_labels = data.encode([{"text": "abcdefghij"}], tiny_tok, max_length=1000).examples[0]
    assert data.encode([{"text": "abcdefghij"}], tiny_tok, max_length=5).examples[0] == \
        (text_ids[:5], text_labels[:5])


def test_truncate_example_without_bos_and_with_nothing_to_learn():
    x = IGNORE_INDEX
    assert data.truncate_example([1, 5, 6, 7, 8], [x, x, x, 7, 8], 4, bos=1) == ([1, 6, 7, 8], [x, x, 7, 8])
    assert data.truncate_example([1, 5, 6, 7, 8], [x, x, x, 7, 8], 4, bos=None) == ([5, 6, 7, 8], [x, x, 7, 8])
    assert data.truncate_example([5, 6, 7, 8], [x, x, x, x], 2, bos=5) == ([5, 8], [x, x])
    assert data.truncate_example([1, 5, 6, 7, 8], [x, x, x, 7, 8], 4, side="right", bos=1) == \
        ([1, 5, 6, 7], [x, x, x, 7])
    assert data.truncate_example([1, 2], [x, 2], 5) == ([1, 2], [x, 2])


def test_left_truncation_of_a_conversation_keeps_the_first_reply(smol_tok):
    ids, labels = data.encode_chat(smol_tok, CHAT)
    drop = 5
    enc = data.encode([{"messages": CHAT}], smol_tok, max_length=len(ids) - drop)
    assert ids[0] == smol_tok.bos_token_id  # the template's first token is BOS here, and stays
    assert enc.examples[0] == (ids[:1] + ids[1 + drop:], labels[:1] + labels[1 + drop:])
    assert _learned(smol_tok, enc.examples[0]) == _learned(smol_tok, (ids, labels))
    # Cut past the prompt: the later turns are cut at the end.
    first = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
    short = data.encode([{"messages": CHAT}], smol_tok, max_length=8).examples[0]
    assert short == ([ids[0]] + ids[first:first + 7], [labels[0]] + labels[first:first + 7])


def test_has_targets_skips_position_zero():
    x = IGNORE_INDEX
    assert not data.has_targets([]) and not data.has_targets([x, x]) and not data.has_targets([5, x])
    assert data.has_targets([x, 5]) and data.has_targets([4, 5])


def test_examples_without_targets_are_counted_not_refused(tiny_tok):
    no_eos = data.SpecialTokens(eos=None, pad=0, stop=())
    records = [{"prompt": "p" * 20, "response": "r"},   # cut away by "right" at 8 tokens
               {"prompt": "p", "response": ""},         # nothing to learn (no EOS here)
               {"prompt": "p", "response": "r"}]
    enc = data.encode(records, tiny_tok, max_length=8, truncate="right", tokens=no_eos)
    assert (enc.without_targets, enc.targets_cut, len(enc.examples)) == (2, 1, 3)
    assert all(y == IGNORE_INDEX for y in enc.examples[1][1])
    # "left" keeps the response; with EOS even an empty response teaches the end.
    assert (data.encode(records, tiny_tok, max_length=8).without_targets,
            data.encode(records, tiny_tok, max_length=8, truncate="right").targets_cut) == (0, 1)
    # A lone learned token at position 0 is never predicted.
    assert data.encode([{"text": ""}], tiny_tok, max_length=1).without_targets == 1
    assert data.encode([{"text": ""}], tiny_tok, max_length=8).without_targets == 0


# --------------------------------------------------------------------------- hostile files


def _words(seed, n_chars):
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat,", "and", "then", "slept.", "Why?", "42", "été", "\n"]
    return " ".join(rng.choice(words, n_chars // 3))[:n_chars]


def _texts(record):
    return [m["content"] for m in record.get("messages", [])] + [v for v in record.values() if isinstance(v, str)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_capped_fields_give_the_example_of_the_whole_record(tiny_tok, smol_tok, side):
    big, small = _words(0, 200_000), _words(1, 40)
    cases = [(tiny_tok, "prompt", {"prompt": big, "response": small}),
             (smol_tok, "prompt", {"prompt": big, "response": small}),
             (smol_tok, "prompt", {"prompt": small, "response": big}),
             (smol_tok, "prompt", {"prompt": big, "response": _words(2, 200_000)}),
             (smol_tok, "text", {"text": big}),
             (tiny_tok, "alpaca", {"instruction": big, "input": _words(3, 200_000), "output": small}),
             (smol_tok, "chat", {"messages": [
                 {"role": "system", "content": big}, {"role": "user", "content": small},
                 {"role": "assistant", "content": small}, {"role": "user", "content": _words(4, 200_000)},
                 {"role": "assistant", "content": small}]})]
    for tok, fmt, record in cases:
        capped, cut = data.cap_record(record, fmt, 32, side)
        assert cut and max(map(len, _texts(capped))) == 32 * data.CHARS_PER_TOKEN
        enc = data.encode([record], tok, max_length=32, truncate=side)
        assert enc.examples[0] == _whole(tok, record, fmt, 32, side), (fmt, tok.name_or_path)
        assert enc.truncated == 1 and enc.longest > 32
    # A record of ordinary size is left as it is, the very object.
    record = {"prompt": small, "response": small}
    assert data.cap_record(record, "prompt", 32, side) == (record, False)
    assert data.cap_record(record, "prompt", 32, side)[0] is record


class _Chunky:
    """A tokenizer of one token per 1000 characters: more than CHARS_PER_TOKEN."""

    bos_token_id = eos_token_id = pad_token_id = chat_template = None
    name_or_path = "chunky"

    def __call__(self, text, add_special_tokens, **options):
        return {"input_ids": [7] * -(-len(text) // 1000)}


def test_a_capped_field_counts_as_truncated_or_is_refused(tiny_tok):
    # Even when the capped text fits, the example is not the whole record's.
    enc = data.encode([{"text": "a" * 1000}, {"text": "a" * 5000}], _Chunky(), max_length=8)
    assert enc.truncated == 1 and enc.examples == [([7], [7]), ([7, 7], [7, 7])]
    with pytest.raises(ValueError, match=r"record 2: a text field of over 4,096 characters"):
        data.encode([{"text": "a"}, {"text": "a" * 5000}], tiny_tok, max_length=32, truncate="error")


def test_a_huge_line_loads_in_bounded_memory(tmp_path, tiny_tok):
    import tracemalloc

    path = _write(tmp_path / "huge.jsonl", [{"prompt": "ab " * 700_000, "response": "cd " * 700_000}])
    tracemalloc.start()
    try:
        enc = data.load(path, tiny_tok, max_len=32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2 ** 20, f"{peak / 2 ** 20:.0f} MiB for a 4 MB line"  # tokenized whole: ~120 MiB
    assert enc.truncated == 1 and len(enc.examples[0][0]) == 32 and enc.without_targets == 0
    # Records read for other uses hold the capped text only.
    (_, record), = data.read_records(path, max_len=32)[1]
    assert len(record["prompt"]) == len(record["response"]) == 32 * data.CHARS_PER_TOKEN
    assert record["prompt"].endswith("ab ") and record["response"].startswith("cd ")


def test_a_line_over_the_byte_limit_is_refused_naming_it(tmp_path):
    path = tmp_path / "big.jsonl"
    short = json.dumps({"text": "t"}) + "\n"
    exact = json.dumps({"text": "x" * (1000 - 12)})
    assert len(exact) == 1000
    path.write_text(short + exact + "\r\n" + json.dumps({"text": "y" * 5000}) + "\n" + short)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: a record of over 1000 B \(the limit of a line\)"):
        data.read_records(path, max_record_bytes=1000)
    assert data.read_file_checked(path, max_record_bytes=5012) == ("text", 4)
    assert data.record_byte_limit(32) == 16 * 2 ** 20  # small max_len: the floor
    assert data.record_byte_limit(8192) == 128 * 8192 * data.CHARS_PER_TOKEN


def test_the_file_check_names_the_line_at_fault(tmp_path):
    good = json.dumps({"prompt": "p", "response": "r"}).encode() + b"\n"
    cases = {
        good + b'{"prompt": "caf\xe9", "response": "r"}\n': r":2: not UTF-8 text \(byte 15\)",
        good + b"\n" + b'{"prompt": "p",\n': r":3: not valid JSON \(",
        good + b'{"prompt": 5, "response": "r"}\n': r":2: field 'prompt' must be a string, found int",
        good + b"[1]\n": r":2: expected a JSON object",
        b"\n \n": r": no records",
        b'[{"text": "a"},\n {"text": "\xff"}]': r":2: not UTF-8 text \(byte 11\)",
    }
    for i, (content, message) in enumerate(cases.items()):
        path = tmp_path / f"case{i}.jsonl"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}{message}"):
            data.read_file_checked(path)
    # Records are checked lazily, as they are read.
    path.write_bytes(good + b"{oops\n")
    fmt, records = data.iter_records(path)
    assert fmt == "prompt" and next(records)[0] == f"{path}:1"
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: not valid JSON"):
        next(records)


def test_batches_use_few_bucketed_shapes():
    assert [data.bucket_length(n) for n in (1, 16, 17, 33, 64, 65, 97, 129, 1025)] == [16, 16, 32, 64, 64, 96, 128, 192, 1536]
    assert data.bucket_length(80, max_len=90) == 90
    rng = np.random.default_rng(0)
    examples = [([1] * n, [1] * n) for n in rng.integers(1, 150, 64)]
    stream = data.batches(examples, batch_size=4, seed=0)
    shapes = {next(stream)["input_ids"].shape for _ in range(64)}
    assert {t for _, t in shapes} <= {16, 32, 64, 96, 128, 192} and len(shapes) <= 6


# --------------------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def tiny_model():
    cfg = llama.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    return cfg, llama.init_params(cfg, jax.random.key(0))


def test_packed_logits_equal_unpacked_per_example(tiny_model):
    cfg, params = tiny_model
    rng = np.random.default_rng(0)
    examples = [(x, x) for x in (rng.integers(3, 50, n).tolist() for n in (9, 5, 12, 3, 7))]
    rows = data.pack_examples(examples, 16)
    assert len(rows) < len(examples) and all(sum(len(x) for x, _ in r) <= 16 for r in rows)
    batch = data.packed_batch(rows, 16, pad_id=0)
    packed = np.asarray(llama.forward(cfg, params, batch["input_ids"], batch["attention_mask"],
                                      segment_ids=batch["segment_ids"]))
    for r, row in enumerate(rows):
        offset = 0
        for ids, _ in row:
            alone = np.asarray(llama.forward(cfg, params, np.array([ids])))[0]
            np.testing.assert_allclose(packed[r, offset:offset + len(ids)], alone, rtol=1e-5, atol=1e-5)
            offset += len(ids)
    # The held-out loss is the same packed or not: no loss crosses an example boundary.
    plain = evaluate.held_out_loss(cfg, params, [data.pad_batch(examples, 16, 0)])
    assert abs(evaluate.held_out_loss(cfg, params, [batch])["loss"] - plain["loss"]) < 1e-5
    assert evaluate.held_out_loss(cfg, params, [batch])["tokens"] == plain["tokens"]


def test_causal_mask_follows_order_not_restarting_positions(tiny_model):
    """With positions that restart mid-row, a token still sees no later token."""
    cfg, params = tiny_model
    ids = np.arange(3, 15)[None]
    positions = np.concatenate([np.arange(6), np.arange(6)])[None]
    changed = ids.copy()
    changed[0, 8:] = 40
    a = np.asarray(llama.forward(cfg, params, ids, position_ids=positions))
    b = np.asarray(llama.forward(cfg, params, changed, position_ids=positions))
    np.testing.assert_array_equal(a[0, :8], b[0, :8])


def test_held_out_loss_takes_params_as_arguments(tiny_model):
    cfg, params = tiny_model
    batch = data.pad_batch([([1, 5, 7, 9], [1, 5, 7, 9])], 16, 0)
    logits = np.asarray(llama.forward(cfg, params, batch["input_ids"], batch["attention_mask"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean([logp[0, t, batch["labels"][0, t + 1]] for t in range(3)])
    assert abs(evaluate.held_out_loss(cfg, params, [batch])["loss"] - expected) < 1e-5
    before = evaluate.batch_loss._cache_size()
    other = jax.tree.map(lambda x: x * 1.5, params)
    assert evaluate.held_out_loss(cfg, other, [batch])["loss"] != pytest.approx(expected)
    assert evaluate.batch_loss._cache_size() == before  # new weights, no new compilation


# --------------------------------------------------------------------------- bad input (CLI)

BAD = {
    "no-format": ([{"prompt": "a", "response": "b"}], {"question": "q"}, None,
                  ":2: a prompt record needs 'prompt' and 'response'"),
    "none-of-the-formats": ([], {"question": "q"}, None, ":1: a record in none of the formats: expected"),
    "roles-not-alternating": ([], {"messages": [{"role": "user", "content": "a"},
                                                {"role": "user", "content": "b"}]}, None,
                              ":1: roles must alternate"),
    "no-assistant-turn": ([], {"messages": [{"role": "system", "content": "a"},
                                            {"role": "user", "content": "b"}]}, None,
                          ":1: no assistant turn"),
    "no-chat-template": ([], {"messages": CHAT[1:3]}, None, "has no chat template"),
    "too-long": ([{"prompt": "a", "response": "b"}], {"prompt": "1 plus 2? " * 4, "response": "3!"},
                 ["--max-len", "24", "--truncate", "error"], ":2: example of 44 tokens is longer than "),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_records_exit_2_naming_file_and_line(tmp_path, capsys, case):
    good, bad, extra, message = BAD[case]
    path = _write(tmp_path / "bad.jsonl", good + [bad])
    out = tmp_path / "out"
    args = ["finetune", "--data", str(path), "--eval", "", "--steps", "1", "--quiet", "--out", str(out)]
    assert cli.main(args + (extra or [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spsft-jax finetune: error:"), err
    assert str(path) in err[0] and message in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_data_and_generation_need_no_torch():
    import subprocess
    import sys

    code = ("import sys, spsft_jax as sj; t = sj.data.load_tokenizer(sys.argv[1]); "
            "sj.data.load(sys.argv[1] + '/train.jsonl', t); assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code, str(TINY)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
