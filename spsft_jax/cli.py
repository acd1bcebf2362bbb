"""The `spsft-jax` command.

    spsft-jax finetune                 fine-tune the embedded tiny model on its task (no download)
    spsft-jax finetune --model DIR --data train.jsonl --rank 16 --out runs/x
    spsft-jax select   --model DIR --data train.jsonl --rank 16 --out selection.safetensors
    spsft-jax export   --model DIR --adapter runs/x/adapter.safetensors --out merged/ [--format peft]
    spsft-jax generate --model DIR [--adapter FILE] --prompt "reverse: abc -> "
    spsft-jax bench    [--setting small|llama2-7b|llama3-8b] [--json]
    spsft-jax plan     --model DIR [--rank 8]     trainable parameters and compiled memory

Errors print one line naming the file or option at fault and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "tiny"


def default_asset(name: str = "") -> Path:
    return Path(str(resources.files("spsft_jax.assets").joinpath(DEFAULT_MODEL, name)))


# --------------------------------------------------------------------------- helpers


def _load(args):
    import jax.numpy as jnp

    from spsft_jax import interop

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    return interop.load_hf(args.model, dtype=dtype)


def _examples(args, path, tokenizer):
    from spsft_jax import data

    return data.encode(data.read_jsonl(path), tokenizer, max_length=args.seq_len)


def _batches(args, examples, pad_id, seed=0):
    from spsft_jax import data

    return data.batches(examples, batch_size=args.batch_size, seq_len=args.seq_len,
                        pad_id=pad_id, seed=seed)


def _selection(args, cfg, params, examples, pad_id):
    """Importance scores on the training data, then top rows."""
    import itertools

    from spsft_jax import importance, selection

    if args.metric == "magnitude":
        scores = importance.magnitude(cfg, params, targets=args.targets)
    elif args.metric == "qm-taylor":
        batches = itertools.islice(_class_batches(args, examples, pad_id), args.importance_batches)
        scores = importance.classwise_taylor(cfg, params, batches, targets=args.targets,
                                             aggregate="quantile_mean", remat=args.remat)
    else:
        batches = itertools.islice(_batches(args, examples, pad_id, seed=1), args.importance_batches)
        form = "row" if args.metric == "taylor-row" else "elementwise"
        scores = importance.taylor(cfg, params, batches, targets=args.targets, form=form,
                                   remat=args.remat)
    if args.ratio is not None:
        return selection.select(scores, ratio=args.ratio, scope=args.scope, cfg=cfg)
    return selection.select(scores, rank=args.rank, scope=args.scope, cfg=cfg)


def _class_batches(args, examples, pad_id):
    """Batches in file order with `classes` [B]: each record's `label`, numbered in sorted order."""
    import numpy as np

    from spsft_jax import data

    records = data.read_jsonl(args.data)
    missing = next((i for i, r in enumerate(records) if "label" not in r), None)
    if missing is not None:
        raise ValueError(f"{args.data}: record {missing + 1} has no 'label' field "
                         "(--metric qm-taylor needs one class label per record)")
    names = sorted({str(r["label"]) for r in records})
    classes = np.array([names.index(str(r["label"])) for r in records], np.int32)
    for start in range(0, len(examples), args.batch_size):
        batch = data.pad_batch(examples[start:start + args.batch_size], args.seq_len, pad_id)
        yield {**batch, "classes": classes[start:start + args.batch_size]}


def _eval_loss(cfg, params, delta, batches) -> float:
    import jax

    from spsft_jax import llama, losses

    @jax.jit
    def loss(batch):
        logits = llama.forward(cfg, params, batch["input_ids"], batch["attention_mask"], delta)
        return losses.causal_lm_loss(logits, batch["labels"])

    total = count = 0.0
    for batch in batches:
        s, n = loss(batch)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def _exact_match(cfg, params, delta, records, tokenizer, max_new_tokens=16) -> float:
    from spsft_jax import data, generate

    bos = data.special_id(tokenizer, "<s>", "<|begin_of_text|>")
    eos = data.special_id(tokenizer, "</s>", "<|end_of_text|>", "<|eot_id|>")
    prompts = [([bos] if bos is not None else []) + tokenizer.encode(r["prompt"], add_special_tokens=False).ids
               for r in records]
    outputs = generate.greedy(cfg, params, prompts, max_new_tokens=max_new_tokens, delta=delta,
                              eos_token_id=eos)
    hits = sum(tokenizer.decode(o) == r["response"] for o, r in zip(outputs, records))
    return hits / len(records)


# --------------------------------------------------------------------------- subcommands


def cmd_finetune(args) -> int:
    from spsft_jax import checkpoint, data, train
    from spsft_jax import selection as selection_lib
    from spsft_jax.atomic import atomic_file

    cfg, params = _load(args)
    tokenizer = data.load_tokenizer(args.tokenizer or args.model)
    pad_id = data.special_id(tokenizer, "<pad>") or 0
    examples = _examples(args, args.data, tokenizer)
    eval_records = data.read_jsonl(args.eval) if args.eval else None
    chosen = None
    if args.method == "spsft":
        chosen = (selection_lib.load(args.selection, cfg=cfg)[0] if args.selection
                  else _selection(args, cfg, params, examples, pad_id))
    print(f"model {args.model}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_params():,} parameters; {len(examples)} training examples")

    def evaluate(delta):
        if eval_records is None:
            return None
        eval_examples = data.encode(eval_records, tokenizer, max_length=args.seq_len)
        batches = [data.pad_batch(eval_examples[i:i + args.batch_size], args.seq_len, pad_id)
                   for i in range(0, len(eval_examples), args.batch_size)]
        prompts = [r for r in eval_records if "prompt" in r]
        return {"loss": _eval_loss(cfg, params, delta, batches),
                "exact_match": _exact_match(cfg, params, delta, prompts, tokenizer) if prompts else None}

    before = evaluate(None)
    start = time.perf_counter()
    result = train.finetune(
        params, chosen, _batches(args, examples, pad_id), config=cfg, steps=args.steps,
        learning_rate=args.lr, method=args.method, targets=args.targets, rank=args.rank,
        tune_norms=args.tune_norms, tokentune=args.tokentune, remat=args.remat,
        grad_accum=args.grad_accum, warmup=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, seed=args.seed, progress=not args.quiet,
    )
    elapsed = time.perf_counter() - start
    after = evaluate(result.delta)

    out = Path(args.out)
    checkpoint.save_delta(out / "adapter.safetensors", result.delta, model=str(args.model),
                          method=args.method, targets=json.dumps(args.targets), metric=args.metric)
    if chosen is not None:
        selection_lib.save(out / "selection.safetensors", chosen, model=str(args.model),
                           targets=json.dumps(args.targets), metric=args.metric)
    summary = {"method": args.method, "trainable_params": result.trainable_params,
               "steps": len(result.history), "seconds": round(elapsed, 2),
               "train_loss_first": result.history[0]["loss"], "train_loss_last": result.history[-1]["loss"],
               "eval_before": before, "eval_after": after, "history": result.history}
    with atomic_file(out / "history.json") as f:
        json.dump(summary, f, indent=2)
    frac = result.trainable_params / cfg.num_params()
    print(f"{args.method}: {result.trainable_params:,} trainable parameters ({100 * frac:.2f}% of the model), "
          f"{len(result.history)} steps in {elapsed:.1f} s")
    print(f"train loss {summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}")
    if before is not None:
        line = f"eval loss {before['loss']:.4f} -> {after['loss']:.4f}"
        if before["exact_match"] is not None:
            line += f"; exact match {100 * before['exact_match']:.1f}% -> {100 * after['exact_match']:.1f}%"
        print(line)
    print(f"wrote {out / 'adapter.safetensors'} and {out / 'history.json'}")
    return 0


def cmd_select(args) -> int:
    from spsft_jax import data
    from spsft_jax import selection as selection_lib

    cfg, params = _load(args)
    tokenizer = data.load_tokenizer(args.tokenizer or args.model)
    pad_id = data.special_id(tokenizer, "<pad>") or 0
    chosen = _selection(args, cfg, params, _examples(args, args.data, tokenizer), pad_id)
    selection_lib.save(args.out, chosen, model=str(args.model), targets=json.dumps(args.targets),
                       metric=args.metric)
    print(f"{selection_lib.num_selected_params(chosen, cfg):,} parameters selected; wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    from spsft_jax import checkpoint, delta as deltas, interop

    cfg, params = _load(args)
    delta, _ = checkpoint.load_delta(args.adapter)
    if args.format == "peft":
        interop.save_peft_adapter(args.out, cfg, delta, base_model_name_or_path=str(args.model))
    else:
        interop.save_hf(args.out, cfg, deltas.merge(params, delta), max_shard_size=args.max_shard_size)
    print(f"wrote {args.out}")
    return 0


def cmd_generate(args) -> int:
    from spsft_jax import checkpoint, data, generate

    cfg, params = _load(args)
    tokenizer = data.load_tokenizer(args.tokenizer or args.model)
    delta = checkpoint.load_delta(args.adapter)[0] if args.adapter else None
    bos = data.special_id(tokenizer, "<s>", "<|begin_of_text|>")
    eos = data.special_id(tokenizer, "</s>", "<|end_of_text|>", "<|eot_id|>")
    prompts = [([bos] if bos is not None else []) + tokenizer.encode(p, add_special_tokens=False).ids
               for p in args.prompt]
    for prompt, out in zip(args.prompt, generate.greedy(
            cfg, params, prompts, max_new_tokens=args.max_new_tokens, delta=delta, eos_token_id=eos)):
        print(f"{prompt}{tokenizer.decode(out)}")
    return 0


def cmd_bench(args) -> int:
    from spsft_jax import bench

    bench.main(settings=args.setting, as_json=args.json, execute=not args.compile_only,
               fractions=args.tokentune)
    return 0


def cmd_plan(args) -> int:
    from spsft_jax import bench

    cfg = _load_config(args.model)
    bench.plan(cfg, rank=args.rank, seq_len=args.seq_len, batch_size=args.batch_size,
               remat=args.remat, as_json=args.json)
    return 0


def _load_config(model):
    from spsft_jax import llama

    path = Path(model)
    if path.suffix == ".json":
        return llama.LlamaConfig.from_json_file(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'}: missing")
    return llama.LlamaConfig.from_json_file(path / "config.json")


# --------------------------------------------------------------------------- parser


def _model_options(p, *, data: bool):
    p.add_argument("--model", default=str(default_asset()), help="HF Llama folder (default: the embedded tiny model)")
    p.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the model folder)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    if data:
        p.add_argument("--data", default=str(default_asset("train.jsonl")), help="training JSONL")
        p.add_argument("--seq-len", type=int, default=32)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--targets", default="all-linear", help="all-linear, mlp, attention or comma-separated module names")
        p.add_argument("--metric", default="taylor", choices=["taylor", "taylor-row", "magnitude", "qm-taylor"],
                       help="taylor: sum_j |w g| (the paper's); taylor-row: |sum_j w g|; "
                            "qm-taylor: class-wise Quantile-Mean (records need a 'label')")
        p.add_argument("--rank", type=int, default=16, help="rows per module (spsft) or LoRA rank")
        p.add_argument("--ratio", type=float, help="fraction of the targeted parameters to train (instead of --rank)")
        p.add_argument("--scope", default="layer", choices=["layer", "global"])
        p.add_argument("--importance-batches", type=int, default=8)
        p.add_argument("--remat", choices=["full", "dots"])


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="spsft-jax", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="fine-tune (default: the embedded tiny model and task)")
    _model_options(p, data=True)
    p.add_argument("--eval", default=str(default_asset("eval.jsonl")), help="evaluation JSONL ('' to skip)")
    p.add_argument("--method", default="spsft", choices=["spsft", "lora", "dense", "head"])
    p.add_argument("--selection", help="a saved selection (skips importance scoring)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--tokentune", type=float, help="fraction (or count) of tokens to backpropagate through")
    p.add_argument("--tune-norms", action="store_true", help="also tune the RMSNorm weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("select", help="score rows and save a selection")
    _model_options(p, data=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("export", help="merged HF checkpoint or PEFT adapter from an adapter file")
    _model_options(p, data=False)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="hf", choices=["hf", "peft"])
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="greedy continuation of prompts")
    _model_options(p, data=False)
    p.add_argument("--adapter")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="memory and speed of each method, side by side")
    p.add_argument("--setting", action="append", choices=["small", "llama2-7b", "llama3-8b"],
                   help="repeatable; default: all")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--compile-only", action="store_true", help="do not execute the small setting")
    p.add_argument("--tokentune", type=float, action="append", help="TokenTune fractions to add (repeatable)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="trainable parameters and compiled memory per method for a config")
    p.add_argument("--model", default=str(default_asset()), help="HF folder or config.json")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--remat", choices=["full", "dots"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    return top


def _targets(value: str):
    return value if value in ("all-linear", "mlp", "attention") else [t.strip() for t in value.split(",")]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if hasattr(args, "targets"):
        args.targets = _targets(args.targets)
    if getattr(args, "eval", None) == "":
        args.eval = None
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, NotImplementedError, FloatingPointError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"spsft-jax {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
