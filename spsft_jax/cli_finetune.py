"""`spsft-jax finetune`, in the order it runs: prepare (defaults, model, data, rows), one
line of plan and compiled memory, train, write the run's folder, print the summary.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from spsft_jax.cli_checks import _check_context, _check_update
from spsft_jax.cli_errors import UsageError
from spsft_jax.cli_inputs import (
    _batches, _evaluator, _examples, _job_defaults, _load, _selection, _steps, _tokenizer, _tokens)
from spsft_jax.cli_resume import _check_resume_steps, _checkpoint_plan, _run_options


@dataclass
class _Job:
    """What a run trains on, once prepared."""
    cfg: object
    params: object
    pad_id: int
    encoded: object  # the training examples, from `data.load`
    evaluate: object  # `evaluate(delta)`, see `_evaluator`
    steps: int
    chosen: object  # the SPSFT rows, or None for the other methods


def cmd_finetune(args) -> int:
    from spsft_jax import outputs, train

    out = Path(args.out)
    checkpoints, restart = _checkpoint_plan(args, out)
    job = _prepare(args, checkpoints)
    run = _train_options(args, job.steps)
    _print_plan(args, job, run)

    before = job.evaluate(None)
    if checkpoints is not None:  # recorded as ours just before anything is written there
        outputs.claim_dir(out, [checkpoints.name], kind="run", overwrite=args.overwrite)
    start = time.perf_counter()
    result = train.finetune(
        job.params, job.chosen, _batches(args, job.encoded, job.pad_id, pack=args.pack), config=job.cfg, **run,
        progress=not args.quiet, checkpoint_dir=None if checkpoints is None else str(checkpoints),
        checkpoint_every=args.checkpoint_every or 0, keep_checkpoints=args.keep, restart=restart,
        checkpoint_info={"options": _run_options(args, job.steps)},
    )
    elapsed = time.perf_counter() - start
    after = job.evaluate(result.delta)

    summary = _summary(args, result, elapsed, before, after)
    _write_run(args, out, checkpoints, job, result, summary)
    _print_result(args, job.cfg, result, elapsed, summary)
    _print_eval(before, after)
    print(f"wrote {out / 'adapter.safetensors'} and {out / 'history.json'}")
    return 0


# --------------------------------------------------------------------------- before training


def _prepare(args, checkpoints: Path | None) -> _Job:
    """Defaults, the cheap checks, then the model, the data, the evaluator and the rows:
    each failure is reported before the next, slower, step."""
    _job_defaults(args)
    _check_update(args)
    _check_context(args)
    cfg, params = _load(args)
    tokenizer = _tokenizer(args)
    pad_id = _tokens(args, tokenizer).pad
    encoded = _trainable(args, _examples(args, args.data, tokenizer, cfg))
    evaluate = _evaluator(args, cfg, params, tokenizer)
    steps = _steps(args, encoded)
    _check_resume_steps(args, checkpoints, steps)
    chosen = _rows(args, checkpoints, cfg, params, encoded, pad_id) if args.method == "spsft" else None
    return _Job(cfg, params, pad_id, encoded, evaluate, steps, chosen)


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


def _rows(args, checkpoints: Path | None, cfg, params, encoded, pad_id):
    """The rows SPSFT trains: a resumed run's own, else --selection's, else scored on the data."""
    from spsft_jax import selection as selection_lib

    run_rows = checkpoints / "selection.safetensors" if args.resume else None
    run_rows = run_rows if run_rows is not None and run_rows.is_file() else None
    if run_rows or args.selection:
        return selection_lib.load(run_rows or args.selection, cfg=cfg)[0]
    return _selection(args, cfg, params, encoded, pad_id)


def _train_options(args, steps: int) -> dict:
    """The options of `train.finetune` that decide its compiled step."""
    # One set of options for the memory line and the run: the step compiled for the line is
    # then the run's own, which it loads from the compilation cache instead of compiling.
    return dict(steps=steps, learning_rate=args.lr, method=args.method, targets=args.targets,
                rank=args.rank, tune_norms=args.tune_norms, tokentune=args.tokentune, remat=args.remat,
                update=args.update, grad_accum=args.grad_accum, warmup=args.warmup, schedule=args.schedule,
                weight_decay=args.weight_decay, seed=args.seed, mesh=args.mesh)


def _print_plan(args, job: _Job, run: dict) -> None:
    """One line: the model, what is trained, the step's compiled memory, the data, the steps."""
    from spsft_jax import data, memory

    cfg, encoded = job.cfg, job.encoded
    longest = args.seq_len or data.bucket_length(encoded.seq_len, encoded.max_len)
    mem, n_trainable = memory.step_memory(cfg, job.params, job.chosen, batch_shape=(args.batch_size, longest),
                                          **run)
    print(f"model {args.model}: {cfg.num_params():,} parameters; {args.method}: {n_trainable:,} trainable "
          f"({100 * n_trainable / cfg.num_params():.2f}%); step memory {mem / 2**20:,.1f} MiB "
          f"(compiled, batch {args.batch_size}x{longest}); {len(encoded.examples)} {encoded.format} examples, "
          f"{encoded.truncated} truncated to {encoded.max_len} tokens; {job.steps} steps at lr {args.lr:g}")


# --------------------------------------------------------------------------- after training


def _summary(args, result, elapsed: float, before, after) -> dict:
    """The run as history.json records it."""
    history = result.full_history
    return {"method": args.method, "trainable_params": result.trainable_params,
            "steps": len(history), "seconds": round(elapsed, 2),
            "train_loss_first": history[0]["loss"], "train_loss_last": history[-1]["loss"],
            "eval_before": before, "eval_after": after, "history": history}


def _write_run(args, out: Path, checkpoints: Path | None, job: _Job, result, summary: dict) -> None:
    """adapter.safetensors, selection.safetensors (SPSFT) and history.json, swapped into
    --out together; the checkpoints there are kept."""
    from spsft_jax import checkpoint, outputs
    from spsft_jax import selection as selection_lib

    keep = [checkpoints.name] if checkpoints is not None else []
    with outputs.output_dir(out, kind="run", overwrite=args.overwrite, keep=keep) as tmp:
        checkpoint.save_delta(tmp / "adapter.safetensors", result.delta, cfg=job.cfg, model=str(args.model),
                              method=args.method, targets=json.dumps(args.targets), metric=args.metric)
        if job.chosen is not None:
            selection_lib.save(tmp / "selection.safetensors", job.chosen, model=str(args.model), cfg=job.cfg,
                               targets=json.dumps(args.targets), metric=args.metric)
        with open(tmp / "history.json", "w") as f:
            json.dump(summary, f, indent=2)


def _print_result(args, cfg, result, elapsed: float, summary: dict) -> None:
    frac = result.trainable_params / cfg.num_params()
    resumed = f" (resumed after step {result.earlier_history[-1]['step']})" if result.earlier_history else ""
    print(f"{args.method}: {result.trainable_params:,} trainable parameters ({100 * frac:.2f}% of the model), "
          f"{len(result.history)} steps in {elapsed:.1f} s{resumed}")
    print(f"train loss {summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}")


def _print_eval(before, after) -> None:
    """Held-out loss and exact match before and after, and the sample generations (nothing
    without --eval)."""
    if before is None:
        return
    line = f"eval loss {before['loss']:.4f} -> {after['loss']:.4f}"
    if before["exact_match"] is not None:
        line += f"; exact match {100 * before['exact_match']:.1f}% -> {100 * after['exact_match']:.1f}%"
    print(line)
    for (prompt, reference, first), (_, _, last) in zip(before["samples"], after["samples"]):
        shown = prompt if len(prompt) <= 60 else "..." + prompt[-57:]  # a chat prompt's tail
        print(f"  {shown!r}: before {first!r}, after {last!r} (reference {reference!r})")
