"""Records -> examples -> batches: formats, chat templates, special tokens, truncation,
buckets, packing (against unpacked logits), evaluation, and the CLI's refusals."""
from __future__ import annotations

import json
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
                 ["--max-len", "24", "--truncate", "error"], ":2: example of 44 tokens is longer than max_len 24"),
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
