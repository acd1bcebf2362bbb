"""finetune(mesh=) on several devices: 4 CPU devices forced in a fresh process
(`--xla_force_host_platform_device_count` must be set before JAX starts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    import spsft_jax as sj

    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = sj.llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8)
    params = sj.llama.init_params(cfg, jax.random.key(0))
    selection = sj.selection.select(sj.importance.magnitude(cfg, params), rank=4)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (8, 12)).astype(np.int32)
    mask = np.ones_like(ids); mask[:3, 9:] = 0
    data = [{"input_ids": ids, "attention_mask": mask,
             "labels": np.where(mask == 1, ids, -100)}]
    options = dict(config=cfg, steps=3, learning_rate=1e-2)
    plain = sj.finetune(params, selection, data, **options)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = sj.finetune(params, selection, data, mesh=mesh, **options)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(plain.delta), jax.tree.leaves(sharded.delta)))
    scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(plain.delta))
    print(json.dumps({"devices": jax.device_count(), "diff": diff, "scale": scale,
                      "losses": [[h["loss"] for h in r.history] for r in (plain, sharded)]}))
""")


def test_finetune_on_four_devices_matches_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    assert result["scale"] > 0 and result["diff"] <= 1e-5 * result["scale"]
    plain, sharded = result["losses"]
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(plain, sharded))
