"""Training: W_f gradients against the dense weight gradient, finetune() per method,
gradient accumulation, mixed precision, schedules and norm tuning."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spsft_jax import delta as deltas
from spsft_jax import llama, train, trees

CFG = llama.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=3,
                        num_heads=4, num_kv_heads=2, head_dim=4)
L = CFG.num_layers


@pytest.fixture(scope="module")
def params():
    # Larger than the default init so gradients are far from zero in every layer.
    return llama.init_params(CFG, jax.random.key(0), std=0.2)


def _batch(seed, batch=3, seq=10, *, pad=0):
    """Counting sequences (next token = this one + 1, learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, CFG.vocab_size, (batch, 1))
    ids = ((start + np.arange(seq)) % CFG.vocab_size).astype(np.int32)
    mask = np.ones_like(ids)
    labels = ids.copy()
    labels[:, :2] = -100  # a prompt without loss
    if pad:
        mask[-1, -pad:] = 0
        labels[-1, -pad:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


BATCH = _batch(0, pad=3)
DATA = [_batch(1), _batch(2)]


def _distinct_rows(seed, d_out, r):
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(d_out, r, replace=False)) for _ in range(L)]).astype(np.int32)


def _selection():
    """Rows on attention and MLP modules, distinct per layer; down_proj keeps 4, 2 and 3 rows
    (padded as selection.select pads: the last real row repeated, mask False)."""
    shapes = CFG.linear_shapes()
    down = _distinct_rows(5, shapes["down_proj"][0], 4)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    for layer in range(L):
        down[layer, ~mask[layer]] = down[layer, mask[layer]][-1]
    return {"layers": {
        "self_attn": {"q_proj": {"rows": _distinct_rows(1, shapes["q_proj"][0], 3)},
                      "v_proj": {"rows": _distinct_rows(2, shapes["v_proj"][0], 2)},
                      "o_proj": {"rows": _distinct_rows(3, shapes["o_proj"][0], 3)}},
        "mlp": {"gate_proj": {"rows": _distinct_rows(4, shapes["gate_proj"][0], 5)},
                "down_proj": {"rows": down, "mask": mask}},
    }}


SELECTION = _selection()


def _entries(selection):
    for block, modules in selection["layers"].items():
        for name, entry in modules.items():
            yield ("layers", block, name), entry


def _random_like(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])


def _mean_loss(params, delta, batch):
    s, n = train.batch_loss(CFG, train.TrainConfig(), params, delta, batch, None)
    return s / n


def _logits(params, delta=None, batch=BATCH):
    return np.asarray(_forward(params, delta, batch["input_ids"], batch["attention_mask"]))


@jax.jit
def _forward(params, delta, ids, mask):
    return llama.forward(CFG, params, ids, mask, delta)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# --------------------------------------------------------------------------- gradients


@pytest.fixture(scope="module")
def gradients(params):
    """(grad of the trainable W_f, dense grad of every weight at W + M W_f), W_f random."""
    trainable, frozen = train.prepare(params, SELECTION)
    trainable = {**trainable, "delta": _random_like(trainable["delta"], jax.random.key(1))}

    @jax.jit
    def delta_grad(trainable, frozen, batch):
        def loss(t):
            p, d = train.join(t, frozen)
            return _mean_loss(p, d, batch)
        return jax.grad(loss)(trainable)

    @jax.jit
    def dense_grad(merged, batch):
        return jax.grad(lambda p: _mean_loss(p, None, batch))(merged)

    _, delta = train.join(trainable, frozen)
    merged = deltas.merge(params, delta)
    return delta_grad(trainable, frozen, BATCH), dense_grad(merged, BATCH), delta


@pytest.mark.parametrize("path", [p for p, _ in _entries(SELECTION)], ids="/".join)
def test_w_f_gradient_is_selected_rows_of_dense_gradient(gradients, path):
    g_delta, g_dense, delta = gradients
    entry = llama.subtree(SELECTION, *path)
    rows = entry["rows"]
    mask = entry.get("mask", np.ones(rows.shape, bool))
    g_w_f = np.asarray(llama.subtree(g_delta["delta"], *path).w_f)
    dense = np.asarray(llama.subtree(g_dense, *path)["weight"])  # [L, d_out, d_in]
    expected = np.take_along_axis(dense, rows[..., None], axis=1)  # [L, r, d_in]

    assert g_w_f.shape == expected.shape
    assert np.all(np.abs(expected[mask]).max(axis=-1) > 0), "degenerate: zero dense gradient"
    assert _rel(g_w_f[mask], expected[mask]) < 5e-6
    # Padded slots take no part in the model, so they get exactly no gradient.
    assert np.all(g_w_f[~mask] == 0)


# --------------------------------------------------------------------------- init


@pytest.mark.parametrize("method", ["spsft", "lora"])
def test_zero_delta_at_init_leaves_logits_unchanged(params, method):
    trainable, frozen = train.prepare(params, SELECTION if method == "spsft" else None,
                                      method=method, rank=2, targets="mlp", key=jax.random.key(3))
    _, delta = train.join(trainable, frozen)
    if method == "lora":  # A random, B zero
        assert all(np.abs(np.asarray(d.a)).max() > 0 for _, d in deltas.leaves(delta))
    np.testing.assert_array_equal(_logits(params, delta), _logits(params))


# --------------------------------------------------------------------------- finetune


def _snapshot(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_untouched(params, before):
    """The caller's arrays are alive (not donated) and bit-identical to before."""
    for leaf in jax.tree.leaves(params):
        assert not leaf.is_deleted()
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), before)


def _data_loss(params, delta=None):
    """Mean token loss over DATA, from the logits (reusing the forward compilations)."""
    total = count = 0.0
    for b in DATA:
        logits = _logits(params, delta, b)[:, :-1].astype(np.float64)
        targets, keep = b["labels"][:, 1:], b["labels"][:, 1:] != -100
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        picked = np.take_along_axis(logits, np.where(keep, targets, 0)[..., None], -1)[..., 0]
        total, count = total + np.sum((logz - picked)[keep]), count + keep.sum()
    return total / count


def _finetune(params, selection=None, *, config=CFG, **options):
    """finetune(), checking the caller's params survive and the loss on the data falls."""
    before = _snapshot(params)
    options = {"steps": 8, "learning_rate": 1e-2, **options}
    result = train.finetune(params, selection, DATA, config=config, **options)
    _assert_untouched(params, before)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == options["steps"] and all(map(math.isfinite, losses))
    # DATA alternates two batches: compare the same batches at the start and the end.
    assert sum(losses[-2:]) < sum(losses[:2])
    return result


def test_finetune_spsft_trains_only_w_f(params):
    result = _finetune(params, SELECTION)
    found = dict(deltas.leaves(result.delta))
    assert set(found) == {p for p, _ in _entries(SELECTION)}
    for path, entry in _entries(SELECTION):
        d = found[path]
        assert isinstance(d, deltas.RowDelta) and d.bias is None
        np.testing.assert_array_equal(d.rows, entry["rows"])
        mask = entry.get("mask", np.ones(entry["rows"].shape, bool))
        np.testing.assert_array_equal(d.mask if d.mask is not None else True, mask)
        w_f = np.asarray(d.w_f)
        assert w_f.dtype == np.float32
        assert np.all(np.abs(w_f[mask]).max(axis=-1) > 0)
        assert np.all(w_f[~mask] == 0)  # padded slots never move
    # Merged, only the selected rows of the selected modules differ from the base.
    merged = deltas.merge(params, result.delta)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(k.key for k in path)
        new, old = np.asarray(llama.subtree(merged, *keys)), np.asarray(leaf)
        entry = llama.subtree(SELECTION, *keys[:-1])
        changed = np.zeros(old.shape, bool)
        if entry is not None and keys[-1] == "weight":
            for layer in range(L):
                changed[layer, entry["rows"][layer]] = True
        np.testing.assert_array_equal(new[~changed], old[~changed])
    assert _data_loss(params, result.delta) < _data_loss(params)
    assert result.trainable_params == sum(
        int(e.get("mask", np.ones(e["rows"].shape)).sum()) * CFG.linear_shapes()[p[-1]][1]
        for p, e in _entries(SELECTION))


def test_finetune_lora(params):
    result = _finetune(params, method="lora", rank=2, targets="mlp")
    found = dict(deltas.leaves(result.delta))
    assert set(found) == set(llama.module_paths("mlp"))
    for d in found.values():
        assert isinstance(d, deltas.LoraDelta) and d.scale == 1.0
        assert np.abs(np.asarray(d.b)).max() > 0  # B left zero
    assert _data_loss(params, result.delta) < _data_loss(params)
    assert _rel(_logits(deltas.merge(params, result.delta)), _logits(params, result.delta)) < 1e-5


def test_dense_delta_gradient_is_the_parameter_gradient(params):
    """Dense tuning trains a zero delta on every parameter: its gradient must be the
    gradient of the parameters themselves, and the delta must cover every one."""
    trainable, frozen = train.prepare(params, None, method="dense")

    def loss(t):
        return _mean_loss(*train.join(t, frozen), BATCH)

    g_delta = jax.jit(jax.grad(loss))(trainable)["delta"]
    g_params = jax.jit(jax.grad(lambda p: _mean_loss(p, None, BATCH)))(params)
    found = dict(deltas.leaves(g_delta))
    assert {path[:-1] for path, _ in trees.leaf_paths(params)} == set(found)
    for path, d in found.items():
        assert isinstance(d, deltas.NormDelta if path[-1].endswith("norm") else deltas.DenseDelta)
        expected = np.asarray(llama.subtree(g_params, *path)["weight"])
        assert np.abs(expected).max() > 0, path
        assert _rel(d.weight, expected) < 1e-5, path


@pytest.fixture(scope="module")
def tied():
    """The test model with tied embeddings: the embedding table is also the head."""
    import dataclasses

    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    return cfg, llama.init_params(cfg, jax.random.key(0), std=0.2)


def test_finetune_dense_tied(tied):
    cfg, params = tied
    result = _finetune(params, method="dense", config=cfg, steps=6)
    found = dict(deltas.leaves(result.delta))
    assert set(found) == {tuple(k.key for k in p[:-1])
                          for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    merged = deltas.merge(params, result.delta)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))
    ids, mask = BATCH["input_ids"], BATCH["attention_mask"]
    # The delta applied in the forward pass (embedding table and tied head) == merged weights.
    with_delta = llama.forward(cfg, params, ids, mask, result.delta)
    assert _rel(with_delta, llama.forward(cfg, merged, ids, mask)) < 1e-5


def test_finetune_head(params):
    result = _finetune(params, method="head", steps=6)
    found = dict(deltas.leaves(result.delta))
    assert set(found) == {("lm_head",)} and isinstance(found[("lm_head",)], deltas.DenseDelta)
    merged = deltas.merge(params, result.delta)
    for name in params:
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(merged[name]),
                                                        jax.tree.leaves(params[name])))
        assert same == (name != "lm_head"), name
    assert _rel(_logits(params, result.delta), _logits(merged)) < 1e-5


def test_finetune_tune_norms_and_merge(params):
    result = _finetune(params, SELECTION, tune_norms=True)
    found = dict(deltas.leaves(result.delta))
    norm_paths = {("layers", "input_layernorm"), ("layers", "post_attention_layernorm"), ("norm",)}
    assert norm_paths | {p for p, _ in _entries(SELECTION)} == set(found)
    for path in norm_paths:
        assert isinstance(found[path], deltas.NormDelta)
        assert np.abs(np.asarray(found[path].weight)).max() > 0
    merged = deltas.merge(params, result.delta)
    for path in norm_paths:
        assert not np.array_equal(llama.subtree(merged, *path)["weight"],
                                  llama.subtree(params, *path)["weight"])
    assert _rel(_logits(merged), _logits(params, result.delta)) < 1e-5
    # The norm deltas matter: dropping them changes the output.
    rows_only = {"layers": {k: v for k, v in result.delta["layers"].items() if "norm" not in k}}
    assert _rel(_logits(params, rows_only), _logits(params, result.delta)) > 1e-4


def test_mixed_precision_bf16_params_float32_state(params):
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    before = _snapshot(bf16)
    tc = train.TrainConfig(steps=4, warmup=0, learning_rate=1e-2)
    trainable, frozen = train.prepare(bf16, SELECTION)
    optimizer = train.make_optimizer(tc)
    opt_state = optimizer.init(trainable)
    step = train.make_train_step(CFG, tc, optimizer)
    batch = jax.tree.map(lambda x: jnp.asarray(x)[None], DATA[0])
    losses = []
    for i in range(tc.steps):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    floats = [x for x in jax.tree.leaves((trainable, opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen["params"]))
    _assert_untouched(bf16, before)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(trainable["delta"])) > 0


# --------------------------------------------------------------------------- accumulation


def test_grad_accum_equals_one_large_batch(params):
    # Micro-batches with different numbers of loss tokens: only a token-weighted mean agrees.
    first, second = _batch(3, batch=2, seq=10), _batch(4, batch=2, seq=10)
    second["labels"][:, :7] = -100
    sgd = optax.sgd(1.0)  # the update is the averaged gradient itself (Adam would hide its scale)
    steps = {n: train.make_train_step(CFG, train.TrainConfig(grad_accum=n), sgd) for n in (1, 2)}

    def run(grad_accum, batch):
        trainable, frozen = train.prepare(params, SELECTION)
        trainable, _, metrics = steps[grad_accum](trainable, sgd.init(trainable), frozen,
                                                  jax.tree.map(jnp.asarray, batch), jax.random.key(0))
        return jax.tree.leaves(trainable["delta"]), float(metrics["loss"]), float(metrics["tokens"])

    def cat(a, b):
        return {k: np.concatenate([a[k], b[k]])[None] for k in a}

    accumulated, loss_a, tokens_a = run(2, {k: np.stack([first[k], second[k]]) for k in first})
    large, loss_l, tokens_l = run(1, cat(first, second))
    assert tokens_a == tokens_l == np.sum(cat(first, second)["labels"][..., 1:] != -100)
    assert loss_a == pytest.approx(loss_l, rel=1e-6)
    for a, b in zip(accumulated, large):
        assert _rel(a, b) < 1e-5
    # The check can fail: the plain mean of the two micro-batch steps is a different step.
    # (Each micro-batch runs alone, beside a copy of itself that carries no loss.)
    halves = [run(1, cat(m, {**m, "labels": np.full_like(m["labels"], -100)}))[0]
              for m in (first, second)]
    naive = [(x + y) / 2 for x, y in zip(*halves)]
    assert max(_rel(n, b) for n, b in zip(naive, large)) > 1e-2


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [2, 0.2])
def test_learning_rate_schedule(schedule, warmup):
    lr, steps = 3e-3, 10
    tc = train.TrainConfig(steps=steps, learning_rate=lr, warmup=warmup, schedule=schedule)
    assert tc.warmup_steps == 2
    sched = train.learning_rate_schedule(tc)

    def expected(t):
        if t < 2:
            return lr * t / 2
        progress = (t - 2) / (steps - 2)
        return {"linear": lr * (1 - progress),
                "cosine": lr * 0.5 * (1 + math.cos(math.pi * progress)),
                "constant": lr}[schedule]

    for t in (0, 1, 2, 3, 5, 6, 9, 10):
        assert float(sched(t)) == pytest.approx(expected(t), rel=1e-5, abs=1e-9), t
    assert float(sched(0)) == 0.0 and float(sched(2)) == pytest.approx(lr)


def test_schedule_without_warmup_starts_at_peak():
    tc = train.TrainConfig(steps=4, learning_rate=1.0, warmup=0, schedule="linear")
    sched = train.learning_rate_schedule(tc)
    assert [float(sched(t)) for t in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_checkpoint_resume_continues_the_same_run(params, tmp_path):
    """A run stopped after a checkpoint and restarted ends where an unbroken run does."""
    selection = _selection()
    whole = _finetune(params, selection, steps=6)

    class Stop(Exception):
        pass

    def stop_at_step_4(record):
        if record["step"] == 4:
            raise Stop

    options = dict(config=CFG, steps=6, learning_rate=1e-2, checkpoint_dir=str(tmp_path))
    with pytest.raises(Stop):
        train.finetune(params, selection, DATA, checkpoint_every=3, callback=stop_at_step_4, **options)
    resumed = train.finetune(params, selection, DATA, **options)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    np.testing.assert_allclose([h["loss"] for h in resumed.history],
                               [h["loss"] for h in whole.history[3:]], rtol=1e-6)
    for (_, a), (_, b) in zip(deltas.leaves(resumed.delta), deltas.leaves(whole.delta)):
        np.testing.assert_allclose(a.w_f, b.w_f, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["spsft", "lora", "dense", "head"])
def test_tokentune_composes_with_every_method(params, method):
    """TokenTune is one option of finetune(): with remat and accumulation, every method trains."""
    selection = _selection() if method == "spsft" else None
    result = train.finetune(params, selection, DATA, config=CFG, steps=6, learning_rate=1e-2,
                            method=method, tokentune=0.5, remat="full", grad_accum=2)
    losses = [h["loss"] for h in result.history]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]


def test_tokentune_all_tokens_is_the_ordinary_step(params):
    """Fraction 1.0 selects every token: the step's gradients are the ordinary ones."""
    batch = {k: v[None] for k, v in _batch(7).items()}  # [grad_accum=1, B, T], no padding
    sgd = optax.sgd(1.0)

    def updated(tokentune):
        tc = train.TrainConfig(steps=1, tokentune=tokentune, max_grad_norm=None)
        trainable, frozen = train.prepare(params, _selection())
        trainable = _random_like(trainable, jax.random.key(3))
        step = train.make_train_step(CFG, tc, sgd)
        new, _, metrics = step(trainable, sgd.init(trainable), frozen, batch, jax.random.key(0))
        return new, metrics["loss"]

    (plain, plain_loss), (tt, tt_loss) = updated(None), updated(1.0)
    np.testing.assert_allclose(tt_loss, plain_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(tt), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_train_loop_in_two_parts_equals_one_run(params):
    """`train_loop` from a saved state continues exactly: 2 + 2 steps give the 4-step run."""
    tc = train.TrainConfig(steps=4, warmup=0, learning_rate=1e-2)
    optimizer = train.make_optimizer(tc)
    trainable, frozen = train.prepare(params, SELECTION)

    def fresh():
        t = jax.tree.map(lambda x: jnp.array(x, copy=True), trainable)
        return {"trainable": t, "opt_state": optimizer.init(t)}

    whole, history = train.train_loop(CFG, tc, optimizer, fresh(), frozen, DATA)
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    part, _ = train.train_loop(CFG, tc, optimizer, fresh(), frozen, iter(DATA))  # ends after 2
    rest, second = train.train_loop(CFG, tc, optimizer, part, frozen, DATA, first=2)
    assert [r["step"] for r in second] == [3, 4]
    assert [r["loss"] for r in second] == pytest.approx([r["loss"] for r in history[2:]], rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 rest["trainable"], whole["trainable"])


# --------------------------------------------------------------------------- the update


def test_step_is_adamw_after_clipping_the_whole_gradient(params):
    """The step clips the whole gradient, then applies AdamW: the same update as
    `optax.chain(clip_by_global_norm, adamw)` on that gradient."""
    batch = jax.tree.map(lambda x: jnp.asarray(x)[None], DATA[0])
    trainable, frozen = train.prepare(params, SELECTION)
    trainable = _random_like(trainable, jax.random.key(5))
    copy = lambda t: jax.tree.map(lambda x: jnp.array(x, copy=True), t)  # noqa: E731 (donated)
    sgd = optax.sgd(1.0)
    plain = train.make_train_step(CFG, train.TrainConfig(steps=1, max_grad_norm=None), sgd)
    after_sgd, _, metrics = plain(copy(trainable), sgd.init(trainable), frozen, batch, jax.random.key(0))
    grads = jax.tree.map(lambda a, b: a - b, trainable, after_sgd)
    max_norm = 0.5 * float(metrics["grad_norm"])  # so the clipping acts

    tc = train.TrainConfig(steps=3, warmup=0, learning_rate=1e-2, max_grad_norm=max_norm)
    adamw = train.make_optimizer(tc)
    # Moments from an earlier step: Adam's first step barely sees the gradient's scale.
    _, state = adamw.update(_random_like(trainable, jax.random.key(6)), adamw.init(trainable), trainable)
    ours, _, _ = train.make_train_step(CFG, tc, adamw)(copy(trainable), copy(state), frozen, batch,
                                                       jax.random.key(0))
    reference = optax.chain(optax.clip_by_global_norm(max_norm), adamw)
    updates, _ = reference.update(grads, (optax.EmptyState(), state), trainable)
    expected = optax.apply_updates(trainable, updates)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    unclipped = optax.apply_updates(trainable, adamw.update(grads, state, trainable)[0])
    assert max(_rel(a, b) for a, b in zip(jax.tree.leaves(unclipped), jax.tree.leaves(expected))) > 1e-3


def test_layerwise_update_norm_is_the_whole_update_norm(params):
    trainable, _ = train.prepare(params, SELECTION, tune_norms=True)
    paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(trainable)]
    assert any(train.in_layers(p) for p in paths) and not all(train.in_layers(p) for p in paths)
    trainable = _random_like(trainable, jax.random.key(1))
    grads = _random_like(trainable, jax.random.key(2))
    optimizer = train.make_optimizer(train.TrainConfig(steps=3, warmup=0, weight_decay=0.1))
    _, state = optimizer.update(_random_like(trainable, jax.random.key(3)), optimizer.init(trainable),
                                trainable)  # moments and step count that are not zero
    updates, _ = optimizer.update(grads, state, trainable)
    got = jax.jit(train.layerwise_update_sq_norm, static_argnums=(0, 4))(optimizer, grads, state,
                                                                         trainable, L)
    np.testing.assert_allclose(got, optax.global_norm(updates) ** 2, rtol=1e-5)


def test_compiled_step_compiles_once_per_batch_shape(params):
    tc = train.TrainConfig(steps=1)
    optimizer = train.make_optimizer(tc)
    step = train.make_train_step(CFG, tc, optimizer)
    compiled = train.CompiledStep(step)
    trainable, frozen = train.prepare(params, SELECTION)
    copy = lambda t: jax.tree.map(lambda x: jnp.array(x, copy=True), t)  # noqa: E731 (donated)
    for seq in (10, 12, 10):
        batch = jax.tree.map(lambda x: jnp.asarray(x)[None], _batch(seq, seq=seq))
        args = (trainable, optimizer.init(trainable), frozen, batch, jax.random.key(seq))
        got = compiled(copy(args[0]), copy(args[1]), *args[2:])
        want = step(copy(args[0]), copy(args[1]), *args[2:])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    assert len(compiled.executables) == 2
