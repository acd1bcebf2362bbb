"""Several devices: per-device memory plans and the step time of a sharded run (benchmarks/README.md).

    python benchmarks/sharding.py              # 7B plans for fsdp 1..8, 70B on 8, CPU step times
    python benchmarks/sharding.py --skip-70b --skip-time
    python benchmarks/sharding.py --skip-plans          # the step times only

What is measured: `spsft_jax.memory.plan_on_devices` (the step compiled from shapes
on forced CPU devices; weights, trainable and optimizer state per device from the
sharding rules, activations from XLA's temporaries), one plan at a time; and the
median step time of `finetune` on the small setting (`spsft_jax.memory.SETTINGS`)
with batch 8 on 8 forced CPU devices against one device of the same process.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp

from spsft_jax import memory
from spsft_jax.interop import read_config

CONFIGS = Path(__file__).parent / "configs"
GiB = 2**30

TIMING = """
import json, statistics
import jax, numpy as np
import spsft_jax as sj
from spsft_jax import memory, sharding

setting = memory.SETTINGS["small"]
cfg, params = setting.cfg, sj.llama.init_params(setting.cfg, jax.random.key(0))
selection = memory.spread_selection(cfg, "all-linear", 2 * setting.lora_rank)
rng = np.random.default_rng(0)
ids = rng.integers(0, cfg.vocab_size, (8, setting.seq_len)).astype(np.int32)
batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
out = {}
for name, mesh in (("1 device", None), ("data=8", "data=8"), ("fsdp=8", "fsdp=8"),
                   ("data=2,fsdp=4", "data=2,fsdp=4")):
    run = sj.finetune(params, selection, [batch], config=cfg, steps=8, learning_rate=1e-4,
                      mesh=None if mesh is None else sharding.make_mesh(mesh))
    out[name] = statistics.median(h["step_s"] for h in run.history[2:])
print("TIMES " + json.dumps(out))
"""


def plan_rows(args):
    seven = read_config(CONFIGS / "llama-2-7b" / "config.json")
    runs = [("llama-2-7b", seven, f"fsdp={n}", remat, "float32")
            for remat in (None, "full") for n in (1, 2, 4, 8)]
    if not args.skip_70b:
        seventy = read_config(CONFIGS / "llama-3.1-70b" / "config.json")
        runs += [("llama-3.1-70b", seventy, "fsdp=8", remat, dtype)
                 for dtype in ("bfloat16", "float32") for remat in ("full", None)]
    print("| model | mesh | dtype | remat | weights GiB | trainable GiB | optimizer GiB "
          "| activations GiB | step total GiB |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for name, cfg, mesh, remat, dtype in runs:
        p = memory.plan_on_devices(cfg, mesh, method="spsft", rank=128, seq_len=2048, batch_size=8,
                                   remat=remat, dtype=getattr(jnp, dtype))
        cells = [p[k] / GiB for k in ("weights_bytes", "trainable_bytes", "optimizer_bytes",
                                      "activations_bytes", "total_bytes")]
        print(f"| {name} | {mesh} | {dtype} | {remat or '-'} | "
              + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)


def step_times():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, "-c", TIMING], capture_output=True, text=True, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("TIMES ")), None)
    if line is None:
        sys.exit(done.stderr[-2000:])
    times = json.loads(line[6:])
    print("\n| small setting, batch 8x256, spsft | median step ms | vs 1 device |\n|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {1000 * t:.1f} | {t / times['1 device']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-70b", action="store_true")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--skip-plans", action="store_true")
    args = p.parse_args()
    if not args.skip_plans:
        plan_rows(args)
    if not args.skip_time:
        step_times()


if __name__ == "__main__":
    main()
