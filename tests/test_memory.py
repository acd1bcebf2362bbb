"""Compiled step memory of every method (spsft_jax.memory): fields, counts and orderings."""
import dataclasses
import json
import subprocess
import sys

import pytest

from spsft_jax import cli, llama, memory

TINY = memory.Setting("tiny", llama.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8), batch_size=2, seq_len=16, lora_rank=2, execute=True)
FIELDS = {"setting", "method", "rank", "tokentune", "remat", "trainable_params", "mem_bytes",
          "temp_bytes", "step_s"}


@pytest.fixture(scope="module")
def rows():
    return memory.measure(TINY, remats=(None,), fractions=(0.5,))


def _row(rows, method, tokentune=None):
    return next(r for r in rows if r["method"] == method and r["tokentune"] == tokentune)


@pytest.mark.slow  # the benchmark: every method compiled and run
def test_rows_have_the_documented_fields(rows):
    assert {r["method"] for r in rows} >= {"inference", "dense", "head", "lora", "spsft",
                                           "lora-mlp", "spsft-mlp", "taylor", "taylor-elementwise"}
    for r in rows:
        assert FIELDS <= r.keys()
        assert r["setting"] == "tiny" and r["mem_bytes"] > 0
        assert (r["step_s"] is None) == (r["method"] in ("inference", "taylor-elementwise"))


@pytest.mark.slow  # the benchmark: every method compiled and run
def test_trainable_parameter_counts(rows):
    cfg, r = TINY.cfg, TINY.lora_rank
    shapes = cfg.linear_shapes()
    lora = cfg.num_layers * sum(r * (o + i) for o, i in shapes.values())
    spsft = cfg.num_layers * sum(2 * r * i for _, i in shapes.values())
    assert _row(rows, "lora")["trainable_params"] == lora
    assert _row(rows, "spsft")["trainable_params"] == spsft
    assert _row(rows, "dense")["trainable_params"] == cfg.num_params()
    assert _row(rows, "head")["trainable_params"] == cfg.vocab_size * cfg.hidden_size


@pytest.mark.slow  # the benchmark: every method compiled and run
def test_memory_orderings(rows):
    inference = _row(rows, "inference")["mem_bytes"]
    for r in rows:
        if r["method"] != "inference":
            assert r["mem_bytes"] > inference
            assert r["ttl_over_m"] == pytest.approx(r["mem_bytes"] / inference)
    assert _row(rows, "dense")["mem_bytes"] > _row(rows, "spsft")["mem_bytes"]
    # Element-wise Taylor holds one layer's weight gradient, never the model's.
    assert (_row(rows, "taylor")["mem_bytes"] < _row(rows, "taylor-elementwise")["mem_bytes"]
            < _row(rows, "dense")["mem_bytes"])
    assert _row(rows, "spsft", 0.5)["temp_bytes"] < _row(rows, "spsft")["temp_bytes"]


def test_cli_bench_prints_one_json_object_per_line(monkeypatch, capsys):
    monkeypatch.setitem(memory.SETTINGS, "small", TINY)
    few = [memory.Variant("inference"), memory.Variant("spsft", 4)]
    monkeypatch.setattr(memory, "variants", lambda setting, fractions=(): few)
    assert cli.main(["bench", "--setting", "small", "--json", "--compile-only"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["method"], r["remat"]) for r in records] == [
        ("inference", None), ("spsft", None), ("inference", "full"), ("spsft", "full")]
    assert all(FIELDS <= r.keys() and r["step_s"] is None for r in records)


@pytest.mark.slow  # the benchmark: every method compiled and run
def test_dependency_row_matches_plain_trainable_parameters(rows):
    assert (_row(rows, "spsft-mlp-dep")["trainable_params"]
            == pytest.approx(_row(rows, "spsft-mlp")["trainable_params"], rel=0.1))


def test_lowered_step_is_the_one_the_run_compiles():
    """Given `finetune`'s options, `lowered_train_step` lowers from shapes the very step
    the run compiles from its arrays (so the run loads it from a compilation cache);
    another learning rate is another step."""
    import jax
    import jax.numpy as jnp

    from spsft_jax import train

    cfg = TINY.cfg
    params = llama.init_params(cfg, jax.random.key(0))
    selection = memory.spread_selection(cfg, "all-linear", 4)
    options = dict(steps=7, learning_rate=3e-3, warmup=2, schedule="cosine", weight_decay=0.01,
                   remat="full", tune_norms=True)

    def from_shapes(**changed):
        lowered, _ = memory.lowered_train_step(cfg, llama.param_shapes(cfg), selection, batch_shape=(2, 16),
                                               method="spsft", rank=4, **{**options, **changed})
        return lowered.as_text()

    tc = train.TrainConfig(steps=7, learning_rate=3e-3, warmup=2, schedule="cosine", weight_decay=0.01,
                           remat="full")
    optimizer = train.make_optimizer(tc)
    trainable, frozen = train.prepare(params, selection, method="spsft", rank=4, tune_norms=True)
    trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)
    ids = jnp.zeros((1, 2, 16), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    run = train.make_train_step(cfg, tc, optimizer).lower(trainable, optimizer.init(trainable), frozen,
                                                          batch, jax.random.key(1))
    assert from_shapes() == run.as_text()
    assert from_shapes(learning_rate=1e-3) != run.as_text()


_AHEAD = """
import json
import sys
from pathlib import Path

import jax
import numpy as np

from spsft_jax import importance, llama, memory, selection, train

cache = Path(sys.argv[1])
train.use_compilation_cache(cache, min_compile_seconds=0)
cfg = llama.LlamaConfig(**json.loads(sys.argv[2]))
run = dict(steps=2, learning_rate=1e-3, rank=2, remat="full")
memory.step_memory(cfg, llama.param_shapes(cfg), memory.spread_selection(cfg, "all-linear", 2),
                   batch_shape=(2, 16), **run)
ahead = {p.name for p in cache.glob("jit_step-*-cache")}
params = llama.init_params(cfg, jax.random.key(1))
rows = selection.select(importance.magnitude(cfg, params), rank=2)
ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16), dtype=np.int32)
batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
train.finetune(params, rows, [batch], config=cfg, **run)
print(len(ahead), len({p.name for p in cache.glob("jit_step-*-cache")} - ahead))
"""


def test_a_step_compiled_from_shapes_is_the_one_the_run_loads(tmp_path):
    """Compiled before any weight exists (other rows, same counts), the step lands in the
    cache, and `finetune` on the loaded weights loads it instead of compiling another."""
    proc = subprocess.run([sys.executable, "-c", _AHEAD, str(tmp_path / "cache"),
                           json.dumps(dataclasses.asdict(TINY.cfg))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ahead, compiled_by_the_run = map(int, proc.stdout.split()[-2:])
    assert ahead == 1 and compiled_by_the_run == 0
