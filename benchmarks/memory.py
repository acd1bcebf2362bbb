"""Memory and speed of every method side by side: the tables in benchmarks/README.md.

    python benchmarks/memory.py                       # all settings, without and with remat
    python benchmarks/memory.py --setting small --tokentune 1.0 --tokentune 0.25
    python benchmarks/memory.py --setting llama2-7b --remat nested   # one remat policy
    python benchmarks/memory.py --setting llama2-7b --remat nested --update per-layer
    python benchmarks/memory.py --json > results.jsonl

What is measured: `spsft_jax.memory` (XLA's compiled memory analysis of one step,
`argument + output + temp - alias` bytes; 7B/8B shapes compiled only, the small
setting also run for its median step time).
"""
import argparse

from spsft_jax import memory
from spsft_jax.cli import print_rows
from spsft_jax.llama import REMAT_POLICIES
from spsft_jax.train import UPDATES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", action="append", choices=sorted(memory.SETTINGS),
                   help="repeatable; default: all")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--compile-only", action="store_true", help="do not execute the small setting")
    p.add_argument("--tokentune", type=float, action="append", help="TokenTune fractions to add")
    p.add_argument("--remat", action="append", choices=["none", *sorted(REMAT_POLICIES)],
                   help="repeatable; default: none and full")
    p.add_argument("--update", default="global", choices=list(UPDATES),
                   help="the training steps' update (per-layer needs --remat full or nested)")
    args = p.parse_args()
    names = args.setting or list(memory.SETTINGS)
    for name in names:
        setting = memory.SETTINGS[name]
        remats = tuple(None if r == "none" else r for r in args.remat or ("none", "full"))
        rows = memory.measure(setting, remats=remats, fractions=tuple(args.tokentune or ()),
                              execute=setting.execute and not args.compile_only, update=args.update)
        print_rows(rows, as_json=args.json, header=name == names[0])


if __name__ == "__main__":
    main()
