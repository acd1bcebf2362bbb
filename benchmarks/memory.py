"""Memory and speed of every method side by side: the table in README.md.

    python benchmarks/memory.py                       # all settings, without and with remat
    python benchmarks/memory.py --setting small --tokentune 1.0 --tokentune 0.25
    python benchmarks/memory.py --json > results.jsonl

The same as `spsft-jax bench`; see spsft_jax/bench.py for what is measured.
"""
import sys

from spsft_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
