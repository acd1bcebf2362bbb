"""Memory and speed of every method side by side: the tables in benchmarks/README.md.

    python benchmarks/memory.py                       # all settings, without and with remat
    python benchmarks/memory.py --setting small --tokentune 1.0 --tokentune 0.25
    python benchmarks/memory.py --setting llama2-7b --remat nested   # one remat policy
    python benchmarks/memory.py --setting llama2-7b --remat nested --update per-layer
    python benchmarks/memory.py --json > results.jsonl
    python benchmarks/memory.py --config benchmarks/configs/qwen2.5-7b --method lora --method spsft

What is measured: `spsft_jax.memory` (XLA's compiled memory analysis of one step,
`argument + output + temp - alias` bytes; 7B/8B shapes compiled only, the small
setting also run for its median step time).
"""
import argparse
import os

from spsft_jax import memory
from spsft_jax.interop.config import config_path, read_config
from spsft_jax.llama import REMAT_POLICIES
from spsft_jax.train import UPDATES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", action="append", choices=sorted(memory.SETTINGS),
                   help="repeatable; default: all")
    p.add_argument("--config", action="append", default=[], metavar="DIR",
                   help="repeatable: a model folder or config.json (any supported family, e.g. "
                        "benchmarks/configs/qwen2.5-7b), compiled only at batch 1 x 2048, LoRA rank 64")
    p.add_argument("--method", action="append", metavar="LABEL",
                   help="repeatable: keep only these rows (inference, lora, spsft, spsft-mlp, ...)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--compile-only", action="store_true", help="do not execute the small setting")
    p.add_argument("--tokentune", type=float, action="append", help="TokenTune fractions to add")
    p.add_argument("--remat", action="append", choices=["none", *sorted(REMAT_POLICIES)],
                   help="repeatable; default: none and full")
    p.add_argument("--update", default="global", choices=list(UPDATES),
                   help="the training steps' update (per-layer needs --remat full or nested)")
    args = p.parse_args()
    settings = [memory.SETTINGS[n] for n in args.setting or ([] if args.config else memory.SETTINGS)]
    settings += [config_setting(path) for path in args.config]
    remats = tuple(None if r == "none" else r for r in args.remat or ("none", "full"))
    for i, setting in enumerate(settings):
        methods = [v for v in memory.variants(setting, tuple(args.tokentune or ()))
                   if not args.method or v.label in args.method]
        rows = memory.measure(setting, remats=remats, methods=methods,
                              execute=setting.execute and not args.compile_only, update=args.update)
        memory.print_rows(rows, as_json=args.json, header=i == 0)


def config_setting(path: str) -> memory.Setting:
    """A compiled-only setting of the model a config.json describes, named for its folder."""
    cfg = read_config(path)
    name = os.path.basename(os.path.dirname(config_path(path)).rstrip("/"))
    return memory.Setting(name, cfg, batch_size=1, seq_len=2048, lora_rank=64, execute=False)


if __name__ == "__main__":
    main()
