"""The memory of a training step, read from XLA's compiled memory analysis, from shapes only.

A step is lowered from `jax.ShapeDtypeStruct`s and compiled, never run, so 7B/8B
shapes need no memory. Its figure is `argument + output + temp - alias` bytes
(CPU's `peak_memory_in_bytes` leaves temps out).

    step_memory(cfg, params, selection, batch_shape=(8, 512))  -> (bytes, trainable parameters)
    measure(setting)  -> [{"setting", "method", "rank", "tokentune", "remat", "trainable_params",
                           "mem_bytes", "temp_bytes", "mem_minus_inference_bytes",
                           "ttl_over_m", "step_s"}, ...]

`measure` compiles every method (`variants`) side by side; `mem_minus_inference_bytes`
is the paper's Table 7 `mem_TTL - mem_M` (training minus the forward pass at the same
batch), `ttl_over_m` their ratio, `step_s` the median step time when the setting is run.
`SETTINGS` names the model shapes `spsft-jax bench` and `benchmarks/memory.py` report.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from spsft_jax import importance, llama, train
from spsft_jax.host import release_host_memory  # noqa: F401  (here too, as before)

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    cfg: llama.LlamaConfig
    batch_size: int
    seq_len: int
    lora_rank: int  # SPSFT gets 2x this many rows: the same trainable parameters on square weights
    execute: bool


SETTINGS = {
    "small": Setting("small", llama.LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
        num_kv_heads=8, head_dim=32), batch_size=4, seq_len=256, lora_rank=8, execute=True),
    "llama2-7b": Setting("llama2-7b", llama.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128), batch_size=1, seq_len=2048, lora_rank=64, execute=False),
    "llama3-8b": Setting("llama3-8b", llama.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0), batch_size=1, seq_len=2048,
        lora_rank=64, execute=False),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    method: str          # inference, taylor (row form), taylor-elementwise, dense, head, lora, spsft
    rank: int | None = None
    targets: str = "all-linear"
    tokentune: float | None = None
    paper: bool = False       # lora: the paper's baseline, alpha 16 and dropout 0.1
    dependency: bool = False  # spsft on the MLP: whole channels, as many parameters as plain rows

    @property
    def label(self) -> str:
        suffix = "-mlp" if self.targets == "mlp" else ""
        suffix += "-paper" if self.paper else "-dep" if self.dependency else ""
        return f"{self.method}{suffix}"


def variants(setting: Setting, fractions=()) -> list[Variant]:
    r = setting.lora_rank
    rows = [Variant("inference"), Variant("dense"), Variant("head"),
            Variant("lora", r), Variant("lora", r, paper=True), Variant("spsft", 2 * r),
            Variant("lora", r, "mlp"), Variant("spsft", 2 * r, "mlp"),
            Variant("spsft", 2 * r, "mlp", dependency=True),
            Variant("taylor", targets="all-linear"), Variant("taylor-elementwise", targets="all-linear")]
    for f in fractions:
        rows += [Variant("spsft", 2 * r, tokentune=f), Variant("lora", r, tokentune=f)]
    return rows


# --------------------------------------------------------------------------- one step


def read(compiled) -> tuple[int, int]:
    """(argument + output + temp - alias, temp) bytes of a compiled computation."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return int(total), int(m.temp_size_in_bytes)


def batch_shapes(batch_shape: tuple[int, int], grad_accum: int | None = None) -> dict:
    """int32 `input_ids`, `attention_mask`, `labels` shapes ([grad_accum,] batch, seq)."""
    lead = (grad_accum,) if grad_accum else ()
    return {k: jax.ShapeDtypeStruct(lead + tuple(batch_shape), jnp.int32) for k in BATCH_KEYS}


def abstract_state(params, selection, optimizer, **prepare_options) -> tuple:
    """Shapes of (trainable, optimizer state, frozen) as `finetune` builds them from
    `params` (which may be `llama.param_shapes(cfg)`): the trainable pytree in float32."""
    def state(p):
        trainable, frozen = train.prepare(p, selection, **prepare_options)
        trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
        return trainable, optimizer.init(trainable), frozen

    return jax.eval_shape(state, params)


# `finetune`'s options that go to `train.TrainConfig`; the others go to `train.prepare`.
TRAIN_OPTIONS = frozenset(field.name for field in dataclasses.fields(train.TrainConfig))


def lowered_train_step(cfg: llama.LlamaConfig, params, selection, *, batch_shape: tuple[int, int],
                       method: str = "spsft", targets="all-linear", rank: int = 8, mesh=None,
                       **options):
    """(jax `Lowered` training step, trainable parameters) for the run `finetune` would make
    with these options; `params` may be `llama.param_shapes(cfg)`. With a `mesh` (a
    `jax.sharding.Mesh` or spec), laid out as `finetune(mesh=)` lays it out.

    options: `finetune`'s `TrainConfig` fields (steps, learning_rate, remat, tokentune,
    grad_accum, schedule...) and `prepare` options (alpha, dropout, tune_norms). Given
    all of a run's, the step is the one that run compiles, to the instruction: with a
    compilation cache on (`train.use_compilation_cache`), the run then loads it."""
    train_options = {k: v for k, v in options.items() if k in TRAIN_OPTIONS}
    prepare_options = {k: v for k, v in options.items() if k not in TRAIN_OPTIONS}
    tc = train.TrainConfig(**{"steps": 1, **train_options})
    optimizer = train.make_optimizer(tc)
    trainable, opt_state, frozen = abstract_state(params, selection, optimizer, method=method,
                                                  targets=targets, rank=rank, **prepare_options)
    n = sum(x.size for x in jax.tree.leaves(trainable))
    key = jax.eval_shape(lambda: jax.random.key(0))
    step = train.make_train_step(cfg, tc, optimizer)
    batch = batch_shapes(batch_shape, tc.grad_accum)
    if mesh is not None:
        from spsft_jax import sharding

        mesh = sharding.make_mesh(mesh)
        step = sharding.sharded_step(step, mesh, trainable, opt_state)
        trainable, opt_state, frozen = (sharding.abstract(t, mesh) for t in (trainable, opt_state, frozen))
        batch = sharding.abstract_batch(batch, mesh)
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
    return step.lower(trainable, opt_state, frozen, batch, key), n


def step_memory(cfg: llama.LlamaConfig, params, selection, *, batch_shape: tuple[int, int],
                **options) -> tuple[int, int]:
    """(compiled memory bytes of one training step, trainable parameters), from shapes
    only (nothing is allocated); `options` as `finetune`'s (`lowered_train_step`)."""
    lowered, n = lowered_train_step(cfg, params, selection, batch_shape=batch_shape, **options)
    return read(lowered.compile())[0], n


def time_step(lowered, compiled=None, steps: int = 5) -> float:
    """Median wall time of `steps` runs of a lowered step (compiled if not given) on random inputs."""
    compiled = lowered.compile() if compiled is None else compiled
    rng = np.random.default_rng(0)
    args = jax.tree.map(lambda x: _random(x, rng), _arg_shapes(lowered))
    times = []
    for _ in range(steps + 1):
        fresh = jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, args)  # donation eats inputs
        start = time.perf_counter()
        jax.block_until_ready(compiled(*fresh))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _random(x, rng):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key(0)
    if jnp.issubdtype(x.dtype, jnp.integer):
        return jnp.asarray(rng.integers(0, 2, x.shape), x.dtype)  # ids, mask and labels alike
    return jnp.asarray(rng.normal(0, 0.02, x.shape), x.dtype)


def _arg_shapes(lowered):
    args, _ = lowered.args_info
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)


# --------------------------------------------------------------------------- every method


def spread_selection(cfg: llama.LlamaConfig, targets: str, rank: int) -> dict:
    """`rank` rows spread evenly over every targeted module: which rows does not change
    memory or time."""
    from spsft_jax import trees

    return trees.nest({
        path: {"rows": np.broadcast_to(
            np.linspace(0, cfg.linear_shapes()[path[-1]][0] - 1, rank).astype(np.int32),
            (cfg.num_layers, rank)).copy()}
        for path in llama.module_paths(targets)
    })


def dependency_selection(cfg: llama.LlamaConfig, rank: int) -> dict:
    """Whole MLP channels (gate/up rows, down columns) with the trainable parameters of
    plain SPSFT at `rank` rows on the MLP: a channel costs 3 d, plain rows 2 d + ffn."""
    from spsft_jax import selection as selection_lib, trees

    d, ffn = cfg.hidden_size, cfg.intermediate_size
    channels = round(rank * (2 * d + ffn) / (3 * d))
    paths = llama.module_paths("mlp")
    scores = trees.nest({p: np.zeros((cfg.num_layers, cfg.linear_shapes()[p[-1]][0])) for p in paths})
    return selection_lib.select(scores, rank=channels, cfg=cfg, dependency=True)


def param_shapes(cfg: llama.LlamaConfig, dtype=jnp.float32, quantize: str | None = None):
    """`llama.param_shapes`, with every per-layer linear weight a `quant.QuantizedWeight`
    of kind `quantize` (as `load_hf(quantize=)` holds them) when it is given."""
    from spsft_jax import quant, trees

    params = llama.param_shapes(cfg, dtype)
    for path in llama.module_paths("all-linear") if quantize else ():
        module = trees.get(params, *path)
        params = trees.set_nested(params, path, {**module, "weight": quant.abstract(module["weight"], quantize)})
    return params


# Methods that train or score the frozen weights themselves: not on a quantized base.
NEEDS_FLOAT_WEIGHTS = ("dense", "taylor-elementwise")


def lowered_variant(setting: Setting, variant: Variant, remat: str | None, dtype=jnp.float32,
                    update: str = "global", quantize: str | None = None):
    """(jax `Lowered`, trainable parameter count) for one method on one setting; `update`
    as `train.TrainConfig`'s for the training methods; `quantize`: the frozen linears held
    in that kind (`param_shapes`)."""
    cfg, shape = setting.cfg, (setting.batch_size, setting.seq_len)
    params = param_shapes(cfg, dtype, quantize)
    if variant.method == "inference":
        fn = jax.jit(lambda p, b: llama.forward(cfg, p, b["input_ids"], b["attention_mask"]))
        return fn.lower(params, batch_shapes(shape)), 0
    if variant.method in ("taylor", "taylor-elementwise"):
        form = "row" if variant.method == "taylor" else "elementwise"
        return importance.lowered_step(cfg, params, batch_shapes(shape), targets=variant.targets,
                                       form=form, remat=remat), 0
    selection = None
    if variant.dependency:
        selection = dependency_selection(cfg, variant.rank)
    elif variant.method == "spsft":
        selection = spread_selection(cfg, variant.targets, variant.rank)
    lora_options = dict(alpha=16.0, dropout=0.1) if variant.paper else {}
    return lowered_train_step(cfg, params, selection, batch_shape=shape, method=variant.method,
                              targets=variant.targets, rank=variant.rank or 8, remat=remat,
                              tokentune=variant.tokentune, update=update, **lora_options)


def measure(setting: Setting, *, remats=(None, "full"), fractions=(), execute: bool | None = None,
            methods: list[Variant] | None = None, update: str = "global", dtype=jnp.float32,
            quantize: str | None = None) -> list[dict]:
    """One row per method and remat policy (see the module docstring); the training
    methods' step with `update` ("global" or "per-layer", `train.TrainConfig`); frozen
    weights in `dtype`, the per-layer linears quantized to `quantize` if given (the
    methods that need float weights left out)."""
    execute = setting.execute if execute is None else execute
    methods = variants(setting, fractions) if methods is None else methods
    if quantize:
        methods = [v for v in methods if v.method not in NEEDS_FLOAT_WEIGHTS and not v.dependency]
    rows = []
    for remat in remats:
        inference = None
        for v in methods:
            # The forward pass has nothing to recompute.
            training = v.method not in ("inference", "taylor", "taylor-elementwise")
            lowered, n = lowered_variant(setting, v, None if v.method == "inference" else remat,
                                         dtype=dtype, update=update, quantize=quantize)
            compiled = lowered.compile()
            mem, temp = read(compiled)
            if v.method == "inference":
                inference = mem
            # The element-wise Taylor passes differ in cost (each runs the layers below its
            # group forward only), so one program run is not a step of anything.
            timed = execute and v.method not in ("inference", "taylor-elementwise")
            step_s = time_step(lowered, compiled) if timed else None
            rows.append({
                "setting": setting.name, "method": v.label, "rank": v.rank,
                "weights": quantize or jnp.dtype(dtype).name,
                "tokentune": v.tokentune, "remat": remat,
                "update": update if training else None, "trainable_params": n,
                "mem_bytes": mem, "temp_bytes": temp,
                "mem_minus_inference_bytes": None if v.method == "inference" else mem - inference,
                "ttl_over_m": mem / inference if inference else None,
                "step_s": step_s,
            })
    return rows


def plan(cfg: llama.LlamaConfig, *, rank: int, seq_len: int, batch_size: int, remat=None,
         update: str = "global", dtype=jnp.float32, quantize: str | None = None) -> list[dict]:
    """`measure` rows of every method for a model config, compiled only (nothing allocated);
    `quantize`: the frozen linears held in that kind."""
    return measure(Setting("model", cfg, batch_size, seq_len, rank, execute=False), remats=(remat,),
                   execute=False, update=update, dtype=dtype, quantize=quantize)


# --------------------------------------------------------------------------- several devices


def _plan_selection(cfg: llama.LlamaConfig, method: str, targets, rank: int):
    return spread_selection(cfg, targets, rank) if method == "spsft" else None


def sharded_sizes(cfg: llama.LlamaConfig, mesh, *, method: str = "spsft", rank: int = 8,
                  targets="all-linear", dtype=jnp.float32) -> dict:
    """Bytes per device of the frozen weights, the trainable delta and the optimizer
    state, as `finetune(mesh=)` lays them out; from shapes only, for any mesh spec
    (no devices needed)."""
    from spsft_jax import sharding

    sizes = sharding.parse_mesh(mesh) if not isinstance(mesh, jax.sharding.Mesh) else dict(mesh.shape)
    selection = _plan_selection(cfg, method, targets, rank)
    optimizer = train.make_optimizer(train.TrainConfig(steps=1))
    trainable, opt_state, frozen = abstract_state(llama.param_shapes(cfg, dtype), selection, optimizer,
                                                  method=method, targets=targets, rank=rank)
    return {"mesh": ",".join(f"{a}={n}" for a, n in sizes.items()), "devices": int(np.prod(list(sizes.values()))),
            "weights_bytes": sharding.per_device_bytes(frozen, sizes),
            "trainable_bytes": sharding.per_device_bytes(trainable, sizes),
            "optimizer_bytes": sharding.per_device_bytes(opt_state, sizes),
            "trainable_params": sum(x.size for x in jax.tree.leaves(trainable))}


def device_plan(cfg: llama.LlamaConfig, mesh, *, method: str = "spsft", rank: int = 8,
                seq_len: int = 2048, batch_size: int = 8, remat=None, tokentune=None,
                targets="all-linear", dtype=jnp.float32, update: str = "global") -> dict:
    """Per-device memory of one training step on `mesh`, compiled from shapes here (the
    devices the mesh names must exist; `plan_on_devices` forces them on the CPU):
    weights, trainable and optimizer bytes from the sharded shapes, `activations_bytes`
    XLA's temporaries (activations, gradients, gathered weights), `total_bytes`
    arguments + outputs + temporaries - aliased."""
    from spsft_jax import sharding

    mesh = sharding.make_mesh(mesh)
    plan_row = sharded_sizes(cfg, mesh, method=method, rank=rank, targets=targets, dtype=dtype)
    start = time.perf_counter()
    lowered, _ = lowered_train_step(
        cfg, llama.param_shapes(cfg, dtype), _plan_selection(cfg, method, targets, rank),
        batch_shape=(batch_size, seq_len), method=method, targets=targets, rank=rank, remat=remat,
        tokentune=tokentune, update=update, mesh=mesh)
    total, temp = read(lowered.compile())
    return {**plan_row, "method": method, "rank": rank, "batch_size": batch_size, "seq_len": seq_len,
            "remat": remat, "update": update, "tokentune": tokentune, "dtype": jnp.dtype(dtype).name,
            "activations_bytes": temp, "total_bytes": total, "platform": jax.devices()[0].platform,
            "compile_s": round(time.perf_counter() - start, 1)}


def plan_on_devices(cfg: llama.LlamaConfig, mesh, **options) -> dict:
    """`device_plan`, here when this machine has the devices the mesh needs, else in a
    child process on as many CPU devices forced with
    `XLA_FLAGS=--xla_force_host_platform_device_count=N` (set before JAX starts there)."""
    import json
    import os
    import pickle
    import subprocess
    import sys

    from spsft_jax import sharding

    needed = sharding.mesh_devices(mesh)
    if jax.device_count() >= needed:
        return device_plan(cfg, mesh, **options)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={needed}"}
    code = ("import json, pickle, sys; from spsft_jax import memory; cfg, mesh, options = "
            "pickle.load(sys.stdin.buffer); "
            "print('PLAN ' + json.dumps(memory.device_plan(cfg, mesh, **options)))")
    options = {**options, "dtype": jnp.dtype(options.get("dtype", jnp.float32)).name}
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps((cfg, mesh, options)),
                          capture_output=True, env=env)
    lines = done.stdout.decode().splitlines()
    found = [line[5:] for line in lines if line.startswith("PLAN ")]
    if done.returncode != 0 or not found:
        error = done.stderr.decode().strip().splitlines()
        last = error[-1].split(": ", 1)[-1] if error else f"exit status {done.returncode}"
        raise ValueError(f"plan on {needed} forced CPU devices: {last}")
    return json.loads(found[-1])


# --------------------------------------------------------------------------- tables

GIB = 2**30
COLUMNS = (  # header, width, how a row shows it
    ("setting", 10, lambda r: r["setting"]),
    ("method", 18, lambda r: r["method"]),
    ("weights", 8, lambda r: r.get("weights", "")),
    ("rank", 5, lambda r: r["rank"] or ""),
    ("tt", 5, lambda r: r["tokentune"] or ""),
    ("remat", 6, lambda r: r["remat"] or "-"),
    ("update", 9, lambda r: r.get("update") or "-"),
    ("trainable", 13, lambda r: f"{r['trainable_params']:,}"),
    ("mem GiB", 9, lambda r: f"{r['mem_bytes'] / GIB:.3f}"),
    ("temp GiB", 9, lambda r: f"{r['temp_bytes'] / GIB:.3f}"),
    ("TTL-M GiB", 10, lambda r: "" if r["mem_minus_inference_bytes"] is None
     else f"{r['mem_minus_inference_bytes'] / GIB:.3f}"),
    ("TTL/M", 6, lambda r: f"{r['ttl_over_m']:.2f}"),
    ("step ms", 8, lambda r: "" if r["step_s"] is None else f"{1000 * r['step_s']:.1f}"),
)


def print_rows(rows: list[dict], *, as_json: bool = False, header: bool = True) -> None:
    """`spsft_jax.memory.measure` rows as JSON lines or a fixed-width text table."""
    def line(cells):
        return " ".join(f"{c:<{w}}" if i < 3 else f"{c:>{w}}"
                        for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS)))

    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)
        return
    if header:
        top = line([h for h, _, _ in COLUMNS])
        print(top + "\n" + "-" * len(top))
    for r in rows:
        print(line([str(show(r)) for _, _, show in COLUMNS]), flush=True)
