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
import math
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
    return interop.load_hf(args.model, dtype=dtype, allow_nonfinite=getattr(args, "allow_nonfinite", False))


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
    else:
        batches = itertools.islice(_batches(args, examples, pad_id, seed=1), args.importance_batches)
        scores = importance.taylor(cfg, params, batches, targets=args.targets, remat=args.remat)
    if args.ratio is not None:
        return selection.select(scores, ratio=args.ratio, scope=args.scope, cfg=cfg)
    return selection.select(scores, rank=args.rank, scope=args.scope, cfg=cfg)


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
    from spsft_jax import checkpoint, data, outputs, train
    from spsft_jax import selection as selection_lib

    out = Path(args.out)
    checkpoints = _checkpoint_dir(args, out)
    cfg, params = _load(args)
    tokenizer = data.load_tokenizer(args.tokenizer or args.model)
    pad_id = data.special_id(tokenizer, "<pad>") or 0
    examples = _examples(args, args.data, tokenizer)
    eval_records = data.read_jsonl(args.eval) if args.eval else None
    chosen = None
    run_selection = None if checkpoints is None else checkpoints / "selection.safetensors"
    if args.method == "spsft" and args.resume and not args.selection and run_selection.is_file():
        args.selection = str(run_selection)  # rescoring could choose other rows than the run's
    if args.method == "spsft":
        chosen = (selection_lib.load(args.selection, cfg=cfg)[0] if args.selection
                  else _selection(args, cfg, params, examples, pad_id))
        if run_selection is not None and not run_selection.is_file():
            run_selection.parent.mkdir(parents=True, exist_ok=True)
            selection_lib.save(run_selection, chosen, model=str(args.model), cfg=cfg)
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
        checkpoint_dir=None if checkpoints is None else str(checkpoints),
        checkpoint_every=args.checkpoint_every or 0,
    )
    elapsed = time.perf_counter() - start
    if not result.history:
        raise UsageError(f"--resume: the run in {checkpoints} has done its {args.steps} steps already; "
                         f"raise --steps to continue it")
    after = evaluate(result.delta)

    summary = {"method": args.method, "trainable_params": result.trainable_params,
               "steps": len(result.history), "seconds": round(elapsed, 2),
               "train_loss_first": result.history[0]["loss"], "train_loss_last": result.history[-1]["loss"],
               "eval_before": before, "eval_after": after, "history": result.history}
    keep = [checkpoints.name] if checkpoints is not None else []
    with outputs.output_dir(out, kind="run", overwrite=args.overwrite, keep=keep) as tmp:
        checkpoint.save_delta(tmp / "adapter.safetensors", result.delta, cfg=cfg, model=str(args.model),
                              method=args.method, targets=json.dumps(args.targets), metric=args.metric)
        if chosen is not None:
            selection_lib.save(tmp / "selection.safetensors", chosen, model=str(args.model), cfg=cfg,
                               targets=json.dumps(args.targets), metric=args.metric)
        with open(tmp / "history.json", "w") as f:
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
                       metric=args.metric, cfg=cfg, overwrite=args.overwrite)
    print(f"{selection_lib.num_selected_params(chosen, cfg):,} parameters selected; wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    from spsft_jax import checkpoint, delta as deltas, interop

    cfg, params = _load(args)
    delta, _ = checkpoint.load_delta(args.adapter, cfg=cfg, params=params)
    if args.format == "peft":
        interop.save_peft_adapter(args.out, cfg, delta, base_model_name_or_path=str(args.model),
                                  overwrite=args.overwrite)
    else:
        interop.save_hf(args.out, cfg, deltas.merge(params, delta), max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def cmd_generate(args) -> int:
    from spsft_jax import checkpoint, data, generate

    cfg, params = _load(args)
    tokenizer = data.load_tokenizer(args.tokenizer or args.model)
    delta = checkpoint.load_delta(args.adapter, cfg=cfg, params=params)[0] if args.adapter else None
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
        p.add_argument("--metric", default="taylor", choices=["taylor", "magnitude"])
        p.add_argument("--rank", type=int, default=16, help="rows per module (spsft) or LoRA rank")
        p.add_argument("--ratio", type=float, help="fraction of the targeted parameters to train (instead of --rank)")
        p.add_argument("--scope", default="layer", choices=["layer", "global"])
        p.add_argument("--importance-batches", type=int, default=8)
        p.add_argument("--remat", choices=["full", "dots"])


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="spsft-jax", description=__doc__.split("\n\n")[0])
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
    _safety_options(sub)
    return top


class UsageError(Exception):
    """A bad command line (argparse's complaint), reported on one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _safety_options(sub) -> None:
    """Options every subcommand shares: error display, and how outputs and checkpoints behave."""
    for name, p in sub.choices.items():
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        if name in ("finetune", "select", "export", "generate"):
            p.add_argument("--allow-nonfinite", action="store_true",
                           help="load weights that hold NaN or Inf (refused by default)")
        if name in ("finetune", "select", "export"):
            p.add_argument("--overwrite", action="store_true",
                           help="write into an existing output spsft-jax did not write (only our "
                                "files there are replaced; nothing else is deleted)")
        if name == "finetune":
            p.add_argument("--checkpoint-every", type=int, metavar="N",
                           help="save the training state to OUT/checkpoints every N steps")
            p.add_argument("--resume", action="store_true",
                           help="continue the run in OUT/checkpoints (same model, method, rank, selection)")


def _positive_int(v) -> bool:
    return isinstance(v, int) and v >= 1


def _positive_float(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


# option -> (test, what it must be); checked before anything is loaded.
OPTION_RULES = {
    "steps": (_positive_int, "an integer >= 1"),
    "batch_size": (_positive_int, "an integer >= 1"),
    "seq_len": (_positive_int, "an integer >= 1"),
    "rank": (_positive_int, "an integer >= 1"),
    "grad_accum": (_positive_int, "an integer >= 1"),
    "importance_batches": (_positive_int, "an integer >= 1"),
    "max_new_tokens": (_positive_int, "an integer >= 1"),
    "checkpoint_every": (_positive_int, "an integer >= 1"),
    "lr": (_positive_float, "a positive finite number"),
    "ratio": (lambda v: _positive_float(v) and v <= 1, "a fraction in (0, 1]"),
    "warmup": (lambda v: math.isfinite(v) and v >= 0, "a number >= 0 (steps, or a fraction below 1)"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "tokentune": (lambda v: all(_positive_float(x) and (x <= 1 or x.is_integer())
                                for x in (v if isinstance(v, list) else [v])),
                  "a fraction in (0, 1] or an integer count >= 1"),
}


def _check_options(args) -> None:
    for name, (test, must) in OPTION_RULES.items():
        value = getattr(args, name, None)
        if value is not None and not test(value):
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be {must}")
    if args.command == "finetune" and args.tokentune is not None and args.tokentune > 1:
        args.tokentune = int(args.tokentune)  # a token count, as the help offers


def _check_outputs(args) -> None:
    """Every output path is usable before anything is loaded or trained."""
    from spsft_jax import outputs

    overwrite = getattr(args, "overwrite", False)
    if args.command == "finetune":
        outputs.check_dir(args.out, kind="run", overwrite=overwrite, what="--out")
    elif args.command == "export":
        kind = "peft" if args.format == "peft" else "hf"
        outputs.check_dir(args.out, kind=kind, overwrite=overwrite, what="--out")
        if Path(args.out).absolute() == Path(args.model).absolute() and not overwrite:
            raise outputs.OutputError(f"--out {args.out}: is the --model folder")
    elif args.command == "select":
        outputs.check_file(args.out, overwrite=overwrite, what="--out")


def _check_inputs(args) -> None:
    """Data files exist, are files, and are UTF-8 JSON lines whose text fields are strings."""
    for option in ("data", "eval"):
        path = getattr(args, option, None)
        if not path:
            continue
        file = Path(path)
        if not file.exists():
            raise UsageError(f"--{option} {path}: no such file")
        if not file.is_file():
            raise UsageError(f"--{option} {path}: is a folder, not a JSONL file")
        with open(file, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {err.start})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
                for key in ("prompt", "response", "text"):
                    if isinstance(record, dict) and key in record and not isinstance(record[key], str):
                        raise ValueError(f"{path}:{line_no}: field {key!r} must be a string, "
                                         f"found {type(record[key]).__name__}")
    for option in ("adapter", "selection"):
        path = getattr(args, option, None)
        if path and Path(path).is_dir():
            raise UsageError(f"--{option} {path}: is a folder, not a .safetensors file")


def _checkpoint_dir(args, out: Path) -> Path | None:
    """OUT/checkpoints when the run checkpoints or resumes; a fresh run drops our old ones."""
    from spsft_jax import outputs

    checkpoints = out / "checkpoints"
    if args.resume:
        if not (checkpoints / "run.json").is_file():
            raise UsageError(f"--resume: {checkpoints} holds no checkpoint of a run to continue")
    elif checkpoints.name in outputs.recorded(out).get("run", ()) and checkpoints.is_dir():
        import shutil

        shutil.rmtree(checkpoints)  # ours, from an earlier run into this folder: start afresh
    if args.checkpoint_every is None and not args.resume:
        return None
    outputs.claim_dir(out, [checkpoints.name], kind="run", overwrite=args.overwrite)
    return checkpoints


def _message(err: BaseException) -> str:
    """One line for a user error: file-system errors name their file."""
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    elif isinstance(err, OSError) and getattr(err, "filename", None):
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _targets(value: str):
    return value if value in ("all-linear", "mlp", "attention") else [t.strip() for t in value.split(",")]


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    args = None
    try:
        args = parser().parse_args(argv)
        command = args.command
        if hasattr(args, "targets"):
            args.targets = _targets(args.targets)
        if getattr(args, "eval", None) == "":
            args.eval = None
        _check_options(args)
        _check_outputs(args)
        _check_inputs(args)
        return args.func(args)
    except (UsageError, ValueError, OSError, KeyError, NotImplementedError, FloatingPointError,
            SafetensorError) as err:
        if args is not None and getattr(args, "debug", False) or "--debug" in argv:
            raise
        print(f"spsft-jax {command}: error: {_message(err)}".replace("spsft-jax : ", "spsft-jax: "),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
