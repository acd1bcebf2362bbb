"""The `spsft-jax` commands other than finetune (see `cli_finetune`): one `cmd_NAME(args)`
each, given the parsed and checked options; each calls the library, prints, and returns
the exit status.
"""
from __future__ import annotations

import json
import sys
import time

from spsft_jax.cli_errors import UsageError
from spsft_jax.cli_inputs import (
    _adapter, _examples, _job_defaults, _load, _load_config, _selection, _tokenizer, _tokens)

GiB = 2**30
# Relative error of requantized rows above which a GGUF export says the update is lost.
REQUANTIZE_WARNING = 0.5


def cmd_select(args) -> int:
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


# --------------------------------------------------------------------------- export


def cmd_export(args) -> int:
    if not args.format.startswith("gguf"):
        args.quantize = "none"  # a float merge: no row is rounded to a GGUF kind first
    cfg, params = _load(args)
    delta = _adapter(args, cfg, params)
    # A merged model records the adapters it holds, so none is applied to it twice.
    EXPORTS[args.format](args, cfg, params, delta)
    print(f"wrote {args.out}")
    return 0


def _export_hf(args, cfg, params, delta) -> None:
    from spsft_jax import delta as deltas
    from spsft_jax import interop

    interop.save_merged(args.out, cfg, deltas.merge(params, delta), model_dir=args.model,
                        adapter_path=args.adapter, max_shard_size=args.max_shard_size,
                        tokenizer_from=args.model_files, overwrite=args.overwrite)


def _export_peft(args, cfg, params, delta) -> None:
    from spsft_jax import interop

    interop.save_peft_adapter(args.out, cfg, delta, base_model_name_or_path=str(args.model),
                              overwrite=args.overwrite)


def _export_gguf_adapter(args, cfg, params, delta) -> None:
    """Exact: the base file stays as it is, llama.cpp adds the rows at run time."""
    from spsft_jax import checkpoint, interop

    interop.save_gguf_adapter(args.out, cfg, delta, like=args.model, overwrite=args.overwrite,
                              source=checkpoint.adapter_digest(args.adapter))


def _export_gguf(args, cfg, params, delta) -> None:
    """Only the trained rows are requantized: every other row keeps the input file's bytes.
    One line says how much of the update the requantized rows hold."""
    from spsft_jax import checkpoint, interop
    from spsft_jax import delta as deltas

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


# export --format -> its writer; the keys are --format's choices, in the order its help lists them.
EXPORTS = {"hf": _export_hf, "peft": _export_peft, "gguf": _export_gguf, "gguf-adapter": _export_gguf_adapter}


# --------------------------------------------------------------------------- generate, eval


def cmd_generate(args) -> int:
    from spsft_jax import generate

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


# --------------------------------------------------------------------------- bench, plan


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
    else:
        _print_mesh_plan(args, cfg, plan)
    return 0


# The rows of the per-device table: (label, key of `memory.plan_on_devices`' result).
MESH_PLAN_ROWS = (("weights (frozen)", "weights_bytes"), ("trainable state", "trainable_bytes"),
                  ("optimizer state", "optimizer_bytes"), ("activations, temporaries", "activations_bytes"),
                  ("step total (compiled)", "total_bytes"))


def _print_mesh_plan(args, cfg, plan: dict) -> None:
    print(f"{args.model}: {cfg.num_params():,} parameters ({args.dtype}); {args.method} "
          f"{'rank' if args.method == 'lora' else 'rows'} {args.rank}: {plan['trainable_params']:,} "
          f"trainable; batch {args.batch_size}x{args.seq_len}; mesh {plan['mesh']} "
          f"({plan['devices']} devices, compiled for {plan['platform']} in {plan['compile_s']} s)")
    unit, size = ("GiB", GiB) if plan["total_bytes"] >= GiB else ("MiB", 2**20)
    print(f"per device                  {unit}")
    for label, key in MESH_PLAN_ROWS:
        print(f"  {label:<24}{plan[key] / size:>8.3f}")


# --------------------------------------------------------------------------- convert


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
