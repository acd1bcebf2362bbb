"""Checks of a parsed `spsft-jax` command line, made before anything is loaded or trained:
a bad value, a missing file or an output that may not be written fails in a second, on
one line (a `UsageError`, or the library's `ValueError`/`OSError`), not after the model
has loaded.
"""
from __future__ import annotations

import math
from pathlib import Path

from spsft_jax.cli_errors import UsageError
from spsft_jax.cli_inputs import _is_gguf, _load_config
from spsft_jax.cli_resume import RUN_ENTRIES

# --------------------------------------------------------------------------- option values


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
    """Each value within OPTION_RULES, --mesh well formed, one --adapter (then held as a
    path, not a list)."""
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


# --------------------------------------------------------------------------- the model and the inputs


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


# --------------------------------------------------------------------------- the output


def _output_kind(args) -> str | None:
    """What the command writes at --out: "file", or the kind of folder `outputs` records
    ("run", "hf", "peft"); None for a command that writes nothing."""
    if args.command == "finetune":
        return "run"
    if args.command == "select":
        return "file"
    if args.command == "export":
        return "file" if args.format.startswith("gguf") else "peft" if args.format == "peft" else "hf"
    if args.command == "convert":
        return "hf"
    return None


def _check_outputs(args) -> None:
    """Every output path is usable before anything is loaded or trained."""
    from spsft_jax import outputs

    overwrite = getattr(args, "overwrite", False)
    kind = _output_kind(args)
    if args.command == "export":
        if Path(args.out).absolute() == Path(args.model).absolute():
            raise outputs.OutputError(f"--out {args.out}: is the --model {'file' if _is_gguf(args.model) else 'folder'}")
        if args.format.startswith("gguf") and not _is_gguf(args.model):
            raise UsageError(f"--format {args.format}: writes for a GGUF --model; --model {args.model} "
                             f"is not a .gguf file")
    if kind == "file":
        outputs.check_file(args.out, overwrite=overwrite, what="--out")
    elif kind == "run":
        checkpointing = args.checkpoint_every is not None or args.resume
        outputs.check_dir(args.out, kind="run", overwrite=overwrite, what="--out",
                          entries=RUN_ENTRIES if checkpointing else RUN_ENTRIES[:-1])
    elif kind is not None:
        outputs.check_dir(args.out, kind=kind, overwrite=overwrite, what="--out")


def _writing(args):
    """Hold the command's output against a second writer for as long as it runs."""
    import contextlib

    from spsft_jax import outputs

    kind = _output_kind(args)
    if kind is None:
        return contextlib.nullcontext()
    return outputs.lock(args.out, folder=kind != "file", what="--out")


# --------------------------------------------------------------------------- finetune, once defaults are in


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


def _check_context(args) -> None:
    """--max-len and --seq-len within the model's context, before the weights load."""
    cfg = _load_config(args.model)
    for name in ("max_len", "seq_len"):
        value = getattr(args, name, None)
        if value is not None and value > cfg.max_position_embeddings:
            raise UsageError(f"--{name.replace('_', '-')} {value}: longer than the model's context of "
                             f"{cfg.max_position_embeddings} tokens (max_position_embeddings in "
                             f"{args.model if _is_gguf(args.model) else Path(args.model) / 'config.json'})")
