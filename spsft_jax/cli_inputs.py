"""What the `spsft-jax` commands read, from their parsed options: the model (an HF folder
or a GGUF file), its tokenizer, an adapter, the training and held-out data, its batches,
and the rows SPSFT trains.

Each helper takes the parsed namespace `args`; JAX and the library load inside the
functions, so that `spsft-jax --help` stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path

from spsft_jax.train import DEFAULT_LR

SAMPLES = 3  # held-out generations shown before and after fine-tuning


# --------------------------------------------------------------------------- the model


def _is_gguf(model) -> bool:
    return model is not None and Path(model).suffix.lower() == ".gguf" and Path(model).is_file()


def _load_config(model):
    """The model's config alone (no weights): from an HF folder, a config.json or a GGUF file."""
    from spsft_jax import interop

    if _is_gguf(model):
        from spsft_jax.interop import gguf_file

        return gguf_file.gguf_config(model)
    return interop.read_config(model)


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


def _tokens(args, tokenizer):
    from spsft_jax import data

    return data.special_tokens(tokenizer, args.model_files)


def _adapter(args, cfg, params):
    """The --adapter's delta, checked against the model (and not already merged into it)."""
    from spsft_jax import checkpoint, interop

    interop.check_not_merged(args.model, args.adapter)
    return checkpoint.load_delta(args.adapter, cfg=cfg, params=params,
                                 allow_nonfinite=args.allow_nonfinite)[0]


# --------------------------------------------------------------------------- the data


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


def _evaluator(args, cfg, params, tokenizer):
    """`evaluate(delta) -> {"loss", "perplexity", "exact_match", "samples"}` on the --eval file
    (None without one)."""
    from spsft_jax import evaluate

    if args.eval is None:
        return lambda delta: None
    return evaluate.evaluator(cfg, params, tokenizer, args.eval, tokens=_tokens(args, tokenizer),
                              batch_size=args.batch_size, max_len=_max_len(args, cfg), format=args.data_format,
                              truncate=args.truncate, max_new_tokens=args.max_new_tokens, samples=SAMPLES)


# --------------------------------------------------------------------------- the rows SPSFT trains


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
