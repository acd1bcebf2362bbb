"""Memory and speed of each fine-tuning method, side by side in one run.

Memory is XLA's compiled memory analysis of one training step (or of the forward
pass for "inference"): `argument + output + temp - alias` bytes. `mem` is the
training step's figure minus inference's at the same batch (the paper's Table 7
`mem_TTL - mem_M`), `ttl/m` their ratio. Big settings are compiled only, from
`jax.ShapeDtypeStruct`s, so 7B/8B shapes need no memory; the small one also runs
and reports the median step time.

    rows = measure(setting)             -> [{"setting", "method", "rank", "tokentune", "remat",
                                             "trainable_params", "mem_bytes", "temp_bytes",
                                             "ttl_over_m", "step_s"}, ...]
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from spsft_jax import llama, train, trees

GiB = 2**30


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


# --------------------------------------------------------------------------- building steps


def _selection(cfg: llama.LlamaConfig, targets: str, rank: int) -> dict:
    # Which rows does not change memory or time; spread them over the module.
    entries = {}
    for path in llama.module_paths(targets):
        d_out = cfg.linear_shapes()[path[-1]][0]
        rows = np.linspace(0, d_out - 1, rank).astype(np.int32)
        entries[path] = {"rows": np.broadcast_to(rows, (cfg.num_layers, rank)).copy()}
    tree: dict = {}
    for path, entry in entries.items():
        tree = trees.set_nested(tree, path, entry)
    return tree


def _dependency_selection(cfg: llama.LlamaConfig, rank: int) -> dict:
    """Whole MLP channels (gate/up rows, down columns) with the trainable parameters of
    plain SPSFT at `rank` rows on the MLP: a channel costs 3 d, plain rows 2 d + ffn."""
    from spsft_jax import selection as selection_lib

    d, ffn = cfg.hidden_size, cfg.intermediate_size
    channels = round(rank * (2 * d + ffn) / (3 * d))
    paths = llama.module_paths("mlp")
    scores = trees.nest({p: np.zeros((cfg.num_layers, cfg.linear_shapes()[p[-1]][0])) for p in paths})
    return selection_lib.select(scores, rank=channels, cfg=cfg, dependency=True)


def _batch_shapes(setting: Setting, grad_accum: int | None):
    lead = (grad_accum,) if grad_accum else ()
    shape = lead + (setting.batch_size, setting.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("input_ids", "attention_mask", "labels")}


def lowered_step(setting: Setting, variant: Variant, remat: str | None, dtype=jnp.float32):
    """(jax `Lowered`, trainable parameter count, concrete-input factory) for one variant."""
    cfg = setting.cfg
    params = llama.param_shapes(cfg, dtype)
    if variant.method == "inference":
        fn = jax.jit(lambda p, b: llama.forward(cfg, p, b["input_ids"], b["attention_mask"]))
        return fn.lower(params, _batch_shapes(setting, None)), 0
    if variant.method in ("taylor", "taylor-elementwise"):
        from spsft_jax import importance

        modules = tuple(llama.module_paths(variant.targets))
        options = dict(cfg=cfg, modules=modules, remat=remat, loss_fn=None, average="tokens")
        counts = jax.ShapeDtypeStruct((1,), jnp.int32)
        if variant.method == "taylor":  # the row form: one scalar per row
            total = jax.eval_shape(
                lambda p: jax.tree.map(lambda s: s[None], importance.magnitude(cfg, p, variant.targets)),
                params)
            return importance._taylor_step.lower(
                params, total, counts, _batch_shapes(setting, None), **options), 0
        # One pass of the element-wise form: one layer's weight gradient (every pass alike).
        grads = {p: jax.ShapeDtypeStruct((1, 1) + llama.subtree(params, *p)["weight"].shape[1:],
                                         jnp.float32) for p in modules}
        classes = jax.ShapeDtypeStruct((setting.batch_size, 1), jnp.float32)
        return importance._elementwise_step.lower(
            params, grads, counts, _batch_shapes(setting, None), classes,
            jax.ShapeDtypeStruct((), jnp.int32), group=1, **options), 0
    selection = _selection(cfg, variant.targets, variant.rank) if variant.method == "spsft" else None
    if variant.dependency:
        selection = _dependency_selection(cfg, variant.rank)
    lora_options = dict(alpha=16.0, dropout=0.1) if variant.paper else {}
    tc = train.TrainConfig(steps=10, remat=remat, tokentune=variant.tokentune)
    optimizer = train.make_optimizer(tc)

    def state(p):
        trainable, frozen = train.prepare(p, selection, method=variant.method, targets=variant.targets,
                                          rank=variant.rank or 8, **lora_options)
        trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
        return trainable, optimizer.init(trainable), frozen

    trainable, opt_state, frozen = jax.eval_shape(state, params)
    n = sum(x.size for x in jax.tree.leaves(trainable))
    step = train.make_train_step(cfg, tc, optimizer)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return step.lower(trainable, opt_state, frozen, _batch_shapes(setting, 1), key), n


def memory(compiled) -> tuple[int, int]:
    """(argument + output + temp - alias, temp) bytes of a compiled computation."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return int(total), int(m.temp_size_in_bytes)


def _concrete(x, rng):
    if isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key(0)
    if jnp.issubdtype(x.dtype, jnp.integer):
        return jnp.asarray(rng.integers(0, 2, x.shape), x.dtype)  # ids, mask and labels alike
    return jnp.asarray(rng.normal(0, 0.02, x.shape), x.dtype)


def time_step(compiled, lowered, steps: int = 5) -> float:
    """Median wall time of `steps` runs of a compiled step on random inputs."""
    rng = np.random.default_rng(0)
    args = jax.tree.map(lambda x: _concrete(x, rng), _arg_shapes(lowered))
    times = []
    for _ in range(steps + 1):
        fresh = jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, args)  # donation eats inputs
        start = time.perf_counter()
        jax.block_until_ready(compiled(*fresh))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _arg_shapes(lowered):
    args, _ = lowered.args_info
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)


# --------------------------------------------------------------------------- measuring


def measure(setting: Setting, *, remats=(None, "full"), fractions=(), execute: bool | None = None) -> list[dict]:
    execute = setting.execute if execute is None else execute
    rows = []
    for remat in remats:
        inference = None
        for v in variants(setting, fractions):
            if v.method == "inference" and remat is not None:
                v_remat = None  # the forward pass has nothing to recompute
            else:
                v_remat = remat
            lowered, n = lowered_step(setting, v, v_remat)
            compiled = lowered.compile()
            mem, temp = memory(compiled)
            if v.method == "inference":
                inference = mem
            step_s = time_step(compiled, lowered) if execute and v.method != "inference" else None
            rows.append({
                "setting": setting.name, "method": v.label, "rank": v.rank,
                "tokentune": v.tokentune, "remat": remat, "trainable_params": n,
                "mem_bytes": mem, "temp_bytes": temp,
                "mem_minus_inference_bytes": None if v.method == "inference" else mem - inference,
                "ttl_over_m": mem / inference if inference else None,
                "step_s": step_s,
            })
    return rows


COLUMNS = (  # header, width, how a row shows it
    ("setting", 10, lambda r: r["setting"]),
    ("method", 13, lambda r: r["method"]),
    ("rank", 5, lambda r: r["rank"] or ""),
    ("tt", 5, lambda r: r["tokentune"] or ""),
    ("remat", 5, lambda r: r["remat"] or "-"),
    ("trainable", 13, lambda r: f"{r['trainable_params']:,}"),
    ("mem GiB", 9, lambda r: f"{r['mem_bytes'] / GiB:.3f}"),
    ("temp GiB", 9, lambda r: f"{r['temp_bytes'] / GiB:.3f}"),
    ("TTL-M GiB", 10, lambda r: "" if r["mem_minus_inference_bytes"] is None
     else f"{r['mem_minus_inference_bytes'] / GiB:.3f}"),
    ("TTL/M", 6, lambda r: f"{r['ttl_over_m']:.2f}"),
    ("step ms", 8, lambda r: "" if r["step_s"] is None else f"{1000 * r['step_s']:.1f}"),
)


def table(rows: list[dict]) -> str:
    """A fixed-width text table of `measure` rows."""
    def line(cells):
        return " ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}"
                        for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS)))

    out = [line([h for h, _, _ in COLUMNS])]
    out.append("-" * len(out[0]))
    out += [line([str(show(r)) for _, _, show in COLUMNS]) for r in rows]
    return "\n".join(out)


def main(settings=None, as_json: bool = False, execute: bool = True, fractions=None) -> list[dict]:
    rows = []
    for name in settings or list(SETTINGS):
        setting = SETTINGS[name]
        got = measure(setting, fractions=tuple(fractions or ()),
                      execute=setting.execute and execute)
        rows += got
        if as_json:
            for r in got:
                print(json.dumps(r), flush=True)
    if not as_json:
        print(table(rows))
    return rows


def plan(cfg: llama.LlamaConfig, *, rank: int, seq_len: int, batch_size: int, remat=None,
         as_json: bool = False) -> list[dict]:
    """Compiled memory of each method for a model config, without allocating it."""
    setting = Setting("model", cfg, batch_size, seq_len, rank, execute=False)
    rows = measure(setting, remats=(remat,), execute=False)
    if as_json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(table(rows))
    return rows


def step_memory(cfg: llama.LlamaConfig, params, selection, *, batch_shape: tuple[int, int],
                method: str = "spsft", targets="all-linear", rank: int = 8, remat=None,
                tokentune=None, tune_norms: bool = False, grad_accum: int = 1) -> tuple[int, int]:
    """(compiled memory bytes of one training step, trainable parameters) for the run
    `finetune` would make with these options, from shapes only (nothing is allocated)."""
    tc = train.TrainConfig(steps=1, remat=remat, tokentune=tokentune, grad_accum=grad_accum)
    optimizer = train.make_optimizer(tc)

    def state(p):
        trainable, frozen = train.prepare(p, selection, method=method, targets=targets, rank=rank,
                                          tune_norms=tune_norms)
        trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
        return trainable, optimizer.init(trainable), frozen

    trainable, opt_state, frozen = jax.eval_shape(state, params)
    n = sum(x.size for x in jax.tree.leaves(trainable))
    batch = {k: jax.ShapeDtypeStruct((grad_accum,) + tuple(batch_shape), jnp.int32)
             for k in ("input_ids", "attention_mask", "labels")}
    key = jax.eval_shape(lambda: jax.random.key(0))
    lowered = train.make_train_step(cfg, tc, optimizer).lower(trainable, opt_state, frozen, batch, key)
    return memory(lowered.compile())[0], n
