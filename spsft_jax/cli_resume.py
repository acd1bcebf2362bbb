"""Checkpoints of `spsft-jax finetune`: where a run keeps them, what `--resume` reads back,
and what an interrupted run leaves to resume from.
"""
from __future__ import annotations

import json
from pathlib import Path

from spsft_jax.cli_errors import UsageError

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


def _check_resume_steps(args, checkpoints: Path | None, steps: int) -> None:
    """A resumed run has steps left to do."""
    from spsft_jax import checkpoint

    done = checkpoint.latest_step(checkpoints) if args.resume else None
    if done is not None and done >= steps:
        raise UsageError(f"--resume: the run in {checkpoints} has done {done} steps already "
                         f"(--steps {steps}); raise --steps to continue it")


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


def _kept(args) -> str:
    """What an interrupted run leaves to resume from."""
    from spsft_jax import checkpoint

    if args is None or args.command != "finetune":
        return ""
    folder = Path(args.out) / "checkpoints"
    step = checkpoint.latest_step(folder)
    return "" if step is None else f"; the latest checkpoint is step {step} in {folder} (--resume continues)"
