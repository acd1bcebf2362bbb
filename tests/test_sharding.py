"""Several devices (spsft_jax.sharding): one fresh process with 8 forced CPU devices
(`--xla_force_host_platform_device_count` must be set before JAX starts) runs every
check once and reports its measurements as JSON; each test asserts on one of them."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from spsft_jax import sharding

DEVICES = 8
MESHES = ("data=8", "fsdp=8", "data=2,fsdp=4")
METHODS = ("spsft", "lora", "tokentune")
TOL = 2e-5  # float32 sums in another order

SCRIPT = textwrap.dedent("""
    import json, math, sys, tempfile, tracemalloc
    import jax, jax.numpy as jnp, numpy as np
    import spsft_jax as sj
    from spsft_jax import sharding, train

    jax.config.update("jax_default_matmul_precision", "highest")
    out = {"devices": jax.device_count()}
    cfg = sj.llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8)
    params = sj.llama.init_params(cfg, jax.random.key(0))
    # Three kinds of linear (a narrow GQA projection, MLP in and out): each module compiles.
    targets = ["k_proj", "up_proj", "down_proj"]
    selection = sj.selection.select(sj.importance.magnitude(cfg, params, targets=targets), rank=4)
    rng = np.random.default_rng(0)
    data = []
    for _ in range(2):
        ids = rng.integers(0, cfg.vocab_size, (8, 12)).astype(np.int32)
        mask = np.ones_like(ids); mask[:3, 9:] = 0
        data.append({"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)})
    methods = {"spsft": dict(method="spsft"), "lora": dict(method="lora", rank=4, targets=targets),
               "tokentune": dict(method="spsft", tokentune=0.5)}

    def rel(a, b):
        a, b = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(a) == len(b) and a
        diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))
        return diff / max(float(np.max(np.abs(np.asarray(x)))) for x in a)

    def gradients(mesh, names):
        # the methods' gradients at the start, from one jit
        batch = jax.tree.map(jnp.asarray, sj.data.normalize_batch(data[0]))
        halves = {name: train.prepare(params, selection, method=methods[name]["method"],
                                      rank=methods[name].get("rank", 8), targets=targets)
                  for name in names}
        if mesh is not None:
            halves = {name: (sharding.shard(t, mesh), sharding.shard(f, mesh))
                      for name, (t, f) in halves.items()}
            batch = sharding.place_batch(batch, mesh, axis=0)

        def all_grads(trainables):
            def loss(t, name):
                tc = train.TrainConfig(steps=1, tokentune=methods[name].get("tokentune"))
                p, d = train.join(t, halves[name][1])
                total, n = train.batch_loss(cfg, tc, p, d, batch, jax.random.key(3))
                return total / n
            return {name: jax.grad(loss)(t, name) for name, t in trainables.items()}
        return jax.jit(all_grads)({name: t for name, (t, _) in halves.items()})

    run = dict(config=cfg, steps=3, learning_rate=1e-2)
    # Whole gradients: every method on the mesh with both axes, SPSFT on the others
    # (each compile costs seconds); every run below also compares its per-step gradient norms.
    plain_grads = gradients(None, list(methods))
    for spec in sys.argv[1].split(";"):
        names = list(methods) if spec == "data=2,fsdp=4" else ["spsft"]
        grads = gradients(sharding.make_mesh(spec), names)
        for name in names:
            out[f"grad/{name}/{spec}"] = rel(plain_grads[name], grads[name])
    def relative(a, b):
        return max(abs(x - y) / abs(x) for x, y in zip(a, b))
    for name, options in methods.items():
        plain = sj.finetune(params, selection, data, **run, **options)
        for spec in sys.argv[1].split(";"):
            mesh = sharding.make_mesh(spec)
            sharded = sj.finetune(params, selection, data, mesh=mesh, **run, **options)
            out[f"{name}/{spec}"] = {
                key: relative([h[key] for h in plain.history], [h[key] for h in sharded.history])
                for key in ("loss", "grad_norm")}
            out[f"{name}/{spec}"]["delta"] = rel(plain.delta, sharded.delta)

    # remat="nested" (6 layers: 3 groups of 2) on a mesh, against "full" on one device.
    deep = sj.llama.LlamaConfig(**{**cfg.__dict__, "num_layers": 6})
    deep_params = sj.llama.init_params(deep, jax.random.key(2))
    deep_selection = sj.selection.select(sj.importance.magnitude(deep, deep_params), rank=4)
    deep_run = dict(config=deep, steps=3, learning_rate=1e-2)
    full = sj.finetune(deep_params, deep_selection, data, remat="full", **deep_run)
    nested = sj.finetune(deep_params, deep_selection, data, remat="nested",
                         mesh=sharding.make_mesh("data=2,fsdp=4"), **deep_run)
    out["nested/data=2,fsdp=4"] = {
        "loss": relative([h["loss"] for h in full.history], [h["loss"] for h in nested.history]),
        "delta": rel(full.delta, nested.delta)}
    # The per-layer update on a mesh, against the global one on one device (no clipping,
    # where the two agree).
    unclipped = dict(deep_run, max_grad_norm=None)
    whole = sj.finetune(deep_params, deep_selection, data, remat="full", **unclipped)
    layered = sj.finetune(deep_params, deep_selection, data, remat="nested", update="per-layer",
                          mesh=sharding.make_mesh("data=2,fsdp=4"), **unclipped)
    out["per-layer/data=2,fsdp=4"] = {
        "loss": relative([h["loss"] for h in whole.history], [h["loss"] for h in layered.history]),
        "delta": rel(whole.delta, layered.delta)}

    # Importance scores on a mesh (the paper's Taylor form, and magnitude).
    mesh = sharding.make_mesh("data=2,fsdp=4")
    out["importance"] = {
        "taylor": rel(sj.importance.taylor(cfg, params, data, targets),
                      sj.importance.taylor(cfg, params, data, targets, mesh=mesh)),
        "magnitude": rel(sj.importance.magnitude(cfg, params),
                         sj.importance.magnitude(cfg, params, mesh=mesh))}

    # Where finetune(mesh=) puts the arrays (train._on_mesh: the placement train_loop uses).
    def shard_shapes(x):
        return sorted({tuple(s.data.shape) for s in x.addressable_shards})
    for spec in ("fsdp=8", "data=2,fsdp=4"):
        trainable, frozen = train.prepare(params, selection)
        optimizer = train.make_optimizer(train.TrainConfig(steps=1))
        state = {"trainable": trainable, "opt_state": optimizer.init(trainable)}
        _, state, frozen, _ = train._on_mesh(spec, state, frozen, lambda *args: None)
        up = frozen["params"]["layers"]["mlp"]["up_proj"]["weight"]
        w_f = state["trainable"]["delta"]["layers"]["mlp"]["up_proj"].w_f
        mu = next(x for path, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])
                  if ".mu" in (text := jax.tree_util.keystr(path)) and "up_proj" in text)
        device0 = jax.devices()[0]
        held = sum(s.data.nbytes for x in jax.tree.leaves(frozen["params"])
                   for s in x.addressable_shards if s.device == device0)
        out[f"placement/{spec}"] = {
            "up_proj": [list(up.shape), [list(s) for s in shard_shapes(up)], len(up.addressable_shards)],
            "w_f": [list(w_f.shape), [list(s) for s in shard_shapes(w_f)]],
            "mu": [list(mu.shape), [list(s) for s in shard_shapes(mu)]],
            "rows": [list(s) for s in shard_shapes(frozen["delta"]["layers"]["mlp"]["up_proj"].rows)],
            "device0_bytes": held,
            "total_bytes": sum(x.nbytes for x in jax.tree.leaves(frozen["params"]))}

    # Quantized frozen weights on a mesh: their bytes split by rows, the run as on one device.
    from spsft_jax import quant
    qparams = jax.tree.map(lambda x: x, params)
    for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            module = qparams["layers"][group][name]
            qparams["layers"][group][name] = {**module, "weight": quant.quantize(np.asarray(module["weight"]), "int8")}
    plain = sj.finetune(qparams, selection, data, **run)
    sharded = sj.finetune(qparams, selection, data, mesh=sharding.make_mesh("data=2,fsdp=4"), **run)
    placed = sharding.shard(qparams, sharding.make_mesh("data=2,fsdp=4"))["layers"]["mlp"]["up_proj"]["weight"]
    out["quantized/data=2,fsdp=4"] = {
        "loss": relative([h["loss"] for h in plain.history], [h["loss"] for h in sharded.history]),
        "delta": rel(plain.delta, sharded.delta),
        "bytes": [list(placed.data.shape), [list(s) for s in shard_shapes(placed.data)]]}

    # Multiple-choice log-likelihoods on a mesh (odd request counts: rows padded to the devices).
    requests = [(rng.integers(0, cfg.vocab_size, n).tolist(), rng.integers(0, cfg.vocab_size, m).tolist())
                for n, m in [(5, 1), (9, 3), (3, 2), (12, 1), (7, 4)]]
    d = plain.delta  # trained rows (the quantized run above: the same selection)
    plain_ll = sj.multiple_choice.log_likelihoods(cfg, params, requests, delta=d, batch_size=4)
    mesh_ll = sj.multiple_choice.log_likelihoods(cfg, params, requests, delta=d, batch_size=4,
                                                 mesh=sharding.make_mesh("data=2,fsdp=4"))
    out["multiple_choice"] = float(np.max(np.abs(plain_ll - mesh_ll) / np.abs(plain_ll)))

    # A sharded load of a several-file safetensors checkpoint, and the host memory it takes.
    big = sj.llama.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=1024,
                               num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)
    folder = tempfile.mkdtemp() + "/model"
    sj.interop.save_hf(folder, big, sj.llama.init_params(big, jax.random.key(1)),
                       max_shard_size="4MB")
    files = sorted(f for f in __import__("os").listdir(folder) if f.endswith(".safetensors"))
    largest = max(__import__("os").path.getsize(f"{folder}/{f}") for f in files)

    def traced(load):
        tracemalloc.start()
        result = load()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return result, peak
    (_, plain), plain_peak = traced(lambda: sj.interop.load_hf(folder))
    mesh = sharding.make_mesh("data=2,fsdp=4")
    (_, loaded), sharded_peak = traced(lambda: sj.interop.load_hf(folder, mesh=mesh))
    embed = loaded["embed_tokens"]["weight"]
    out["load"] = {
        "files": len(files), "largest_file": largest, "plain_peak": plain_peak,
        "sharded_peak": sharded_peak, "model_bytes": sum(x.nbytes for x in jax.tree.leaves(plain)),
        "max_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(loaded))),
        "same_structure": jax.tree.structure(plain) == jax.tree.structure(loaded),
        "embed_shards": [list(s) for s in shard_shapes(embed)]}
    (_, qplain), _ = traced(lambda: sj.interop.load_hf(folder, quantize="nf4"))
    (_, qloaded), _ = traced(lambda: sj.interop.load_hf(folder, quantize="nf4", mesh=mesh))
    up = qloaded["layers"]["mlp"]["up_proj"]["weight"]
    out["load"]["quantized_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                        for a, b in zip(jax.tree.leaves(qplain), jax.tree.leaves(qloaded)))
    out["load"]["quantized_shards"] = [list(s) for s in shard_shapes(up.data)]
    # The sharded model exports shard by shard and reads back equal.
    again = tempfile.mkdtemp() + "/again"
    sj.interop.save_hf(again, big, loaded, max_shard_size="4MB")
    out["load"]["export_diff"] = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sj.interop.load_hf(again)[1])))

    # The command line: select --mesh (finetune --mesh runs the same finetune(mesh=) as above).
    from spsft_jax import cli
    picked = {}
    for mesh in (None, "data=2,fsdp=4"):
        file = tempfile.mkdtemp() + "/selection.safetensors"
        argv = ["select", "--metric", "magnitude", "--rank", "4", "--out", file]
        assert cli.main(argv + (["--mesh", mesh] if mesh else [])) == 0
        picked[mesh] = sj.selection.load(file)[0]
    out["cli"] = {"same_selection": all(bool(np.array_equal(a, b)) for a, b in
                                        zip(jax.tree.leaves(picked[None]), jax.tree.leaves(picked["data=2,fsdp=4"])))}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def measured():
    forced = f"--xla_force_host_platform_device_count={DEVICES}"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {forced}", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, ";".join(MESHES)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["devices"] == DEVICES
    return result


@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("what", ["loss", "grad_norm", "delta"])
def test_sharded_training_equals_one_device(measured, method, mesh, what):
    """Three steps: per-step loss and gradient norm, and the trained delta."""
    assert measured[f"{method}/{mesh}"][what] <= TOL


@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
@pytest.mark.parametrize("what", ["loss", "delta"])
def test_nested_remat_on_a_mesh_equals_full_on_one_device(measured, what):
    assert measured["nested/data=2,fsdp=4"][what] <= TOL


@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
@pytest.mark.parametrize("what", ["loss", "delta"])
def test_per_layer_update_on_a_mesh_equals_the_global_update_on_one_device(measured, what):
    assert measured["per-layer/data=2,fsdp=4"][what] <= TOL


@pytest.mark.parametrize("method,mesh", [(m, "data=2,fsdp=4") for m in METHODS]
                         + [("spsft", "data=8"), ("spsft", "fsdp=8")])
@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
def test_sharded_gradients_equal_one_device(measured, method, mesh):
    assert measured[f"grad/{method}/{mesh}"] <= TOL


@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
@pytest.mark.parametrize("mesh,fsdp", [("fsdp=8", 8), ("data=2,fsdp=4", 4)])
def test_frozen_weights_trainable_and_optimizer_state_are_split(measured, mesh, fsdp):
    placed = measured[f"placement/{mesh}"]
    (L, out, d_in), shards, count = placed["up_proj"]
    assert count == DEVICES and shards == [[L, out // fsdp, d_in]]  # a slice each, not a copy
    (L, r, d_in), shards = placed["w_f"]
    assert shards == [[L, r, d_in // fsdp]]
    assert placed["mu"] == placed["w_f"]  # Adam's moments lie as their parameters
    assert placed["rows"] == [[L, r]]  # metadata replicated
    # Norm vectors stay whole: a device holds a little more than 1/fsdp of the weights.
    assert placed["device0_bytes"] < 1.2 * placed["total_bytes"] / fsdp


@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
@pytest.mark.parametrize("metric", ["taylor", "magnitude"])
def test_importance_on_a_mesh_equals_one_device(measured, metric):
    assert measured["importance"][metric] <= TOL


@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
def test_sharded_load_equals_plain_load(measured):
    load = measured["load"]
    assert load["files"] >= 4 and load["same_structure"]
    assert load["max_diff"] == 0.0
    assert load["embed_shards"] == [[2048 // 4, 256]]
    assert load["export_diff"] == 0.0


@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
def test_multiple_choice_scores_on_a_mesh_equal_one_device(measured):
    assert measured["multiple_choice"] <= TOL


@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
@pytest.mark.parametrize("what", ["loss", "delta"])
def test_quantized_base_on_a_mesh_trains_as_on_one_device(measured, what):
    assert measured["quantized/data=2,fsdp=4"][what] <= TOL


@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
def test_quantized_bytes_are_split_by_rows(measured):
    (L, out, row_bytes), shards = measured["quantized/data=2,fsdp=4"]["bytes"]
    assert shards == [[L, out // 4, row_bytes]]
    load = measured["load"]
    assert load["quantized_diff"] == 0.0
    assert load["quantized_shards"] == [[4, 1024 // 4, 256 // 64 * 36]]  # nf4 rows, a quarter each


@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
def test_sharded_load_holds_about_one_shard_of_host_memory(measured):
    load = measured["load"]
    bound = 1.5 * load["largest_file"] + 2**20
    assert load["sharded_peak"] < bound
    # The measure can tell: the plain load holds the whole model on the host.
    assert load["plain_peak"] > load["model_bytes"] > 2 * bound


# --------------------------------------------------------------------------- rules, one device


@pytest.mark.parametrize("spec,want", [
    ("data=2,fsdp=4", {"data": 2, "fsdp": 4}), ("fsdp=8", {"data": 1, "fsdp": 8}),
    ({"data": 4}, {"data": 4, "fsdp": 1}), ("data=2,fsdp=-1", {"data": 2, "fsdp": 4}),
    (None, {"data": 1, "fsdp": 8})])
def test_parse_mesh(spec, want):
    assert sharding.parse_mesh(spec, num_devices=8) == want


@pytest.mark.parametrize("spec", ["tensor=2", "data:2", "data=0", "data=-1,fsdp=-1", "data=3,fsdp=-1"])
def test_parse_mesh_refuses(spec):
    with pytest.raises(ValueError, match="mesh"):
        sharding.parse_mesh(spec, num_devices=8)


def test_rules():
    layer = (jax.tree_util.DictKey("layers"), jax.tree_util.DictKey("mlp"))
    f32, i32 = jax.numpy.float32, jax.numpy.int32
    assert sharding.leaf_spec(layer, (32, 11008, 4096), f32, 8) == P(None, "fsdp", None)
    assert sharding.leaf_spec(layer, (32, 128, 4096), f32, 8) == P(None, None, "fsdp")
    assert sharding.leaf_spec(layer, (32, 4096), f32, 8) == P()  # norms: vectors per layer
    assert sharding.leaf_spec(layer, (32, 128), i32, 8) == P()   # selected rows
    assert sharding.leaf_spec((), (32000, 4096), f32, 8) == P("fsdp", None)
    assert sharding.leaf_spec((), (32001, 4096), f32, 8) == P(None, "fsdp")
    assert sharding.leaf_spec((), (30, 6), f32, 8) == P()  # nothing divides: replicated
    assert sharding.leaf_spec((), (32000, 4096), f32, 1) == P()


def test_plan_weights_shrink_with_fsdp():
    from spsft_jax import memory
    from spsft_jax.interop import read_config

    cfg = read_config(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "configs",
                                   "llama-2-7b", "config.json"))
    weights = {n: memory.sharded_sizes(cfg, f"fsdp={n}", method="spsft", rank=128)["weights_bytes"]
               for n in (1, 2, 4, 8)}
    total = weights[1]
    assert total == pytest.approx(cfg.num_params() * 4, rel=1e-3)  # + the selected rows
    for n, w in weights.items():
        assert total / n <= w <= 1.01 * total / n  # norms stay replicated: a hair above 1/n
    assert math.isclose(weights[8] / weights[1], 1 / 8, rel_tol=0.01)


@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
def test_cli_plan_on_a_mesh_compiles_on_forced_devices(capsys):
    """The test process has one device: the plan compiles in a child on 4 forced CPU devices."""
    from spsft_jax import cli, memory
    from spsft_jax.assets import default_asset
    from spsft_jax.interop import read_config

    argv = ["plan", "--mesh", "data=1,fsdp=4", "--method", "lora", "--rank", "4", "--seq-len", "32",
            "--batch-size"]
    assert cli.main(argv + ["4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["devices"] == 4 and plan["mesh"] == "data=1,fsdp=4" and plan["platform"] == "cpu"
    whole = memory.sharded_sizes(read_config(default_asset() / "config.json"), "fsdp=1",
                                 method="lora", rank=4)
    assert plan["weights_bytes"] < 0.3 * whole["weights_bytes"]
    assert plan["trainable_params"] == whole["trainable_params"]
    assert plan["activations_bytes"] > 0 and plan["total_bytes"] > plan["weights_bytes"]
    assert cli.main(argv + ["3"]) == 2  # 3 examples do not split over 4 devices
    assert "does not split" in capsys.readouterr().err


@pytest.mark.slow  # several devices: one child process with 8 forced CPU devices
def test_cli_select_on_a_mesh_equals_one_device(measured):
    assert measured["cli"]["same_selection"]


def test_cli_finetune_mesh_needs_its_devices(tmp_path, capsys):
    from spsft_jax import cli

    argv = ["finetune", "--mesh", "data=2,fsdp=4", "--steps", "1", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert "needs 8 devices, 1 present" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert cli.main(["finetune", "--mesh", "data=2;fsdp=4", "--out", str(tmp_path / "x")]) == 2
    assert "AXIS=SIZE" in capsys.readouterr().err
