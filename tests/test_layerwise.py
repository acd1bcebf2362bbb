"""The per-layer update (spsft_jax.layerwise, `update="per-layer"`): the global step's
result without clipping, each layer clipped on its own with it, no gradient buffer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spsft_jax import llama, memory, train

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=6,
                        num_heads=4, num_kv_heads=2, head_dim=8)  # "nested": 3 groups of 2


@pytest.fixture(scope="module")
def model():
    params = llama.init_params(CFG, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16)).astype(np.int32)
    labels = np.where(np.arange(16) < 4, -100, ids)  # a prompt without loss
    batch = {"input_ids": ids[None], "attention_mask": np.ones_like(ids)[None], "labels": labels[None]}
    return params, batch


def _state(params, method, tc, **prepare_options):
    selection = memory.spread_selection(CFG, "all-linear", 4) if method == "spsft" else None
    prepare_options = {"tune_norms": True, **prepare_options}
    trainable, frozen = train.prepare(params, selection, method=method, rank=4, **prepare_options)
    # Away from zero, so that LoRA's B and every W_f get gradients in the first step.
    trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) + 0.01, trainable)
    return trainable, train.make_optimizer(tc).init(trainable), frozen


def _run(params, batch, method, steps=3, dropout=0.0, **options):
    tc = train.TrainConfig(steps=steps, warmup=0, weight_decay=0.1, **options)
    trainable, opt_state, frozen = _state(params, method, tc, dropout=dropout)
    step = train.make_train_step(CFG, tc, train.make_optimizer(tc))
    metrics = []
    for i in range(steps):
        trainable, opt_state, m = step(trainable, opt_state, frozen, batch, jax.random.key(i))
        metrics.append(m)
    return trainable, opt_state, metrics


def _close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("method,options", [
    ("spsft", dict(remat="full")), ("spsft", dict(remat="nested")),
    ("lora", dict(remat="nested", dropout=0.1)), ("dense", dict(remat="nested")),
    ("spsft", dict(remat="nested", tokentune=0.5)),
    ("spsft", dict(remat="full", tokentune=0.5, tokentune_loss="all")),
], ids=["spsft-full", "spsft-nested", "lora-dropout-nested", "dense-nested", "tokentune-nested",
        "tokentune-all-loss-full"])
def test_without_clipping_the_per_layer_update_is_the_global_one(model, method, options):
    """Three AdamW steps with weight decay: trained tree, moments, step count, loss and
    gradient norm agree with the global step's (LoRA dropout and TokenTune draw the same
    masks and tokens in both)."""
    params, batch = model
    # AdamW's first steps are about sign(g): eps=1e-3 keeps a gradient element near zero,
    # summed in another order, from flipping a whole step's move.
    unclipped = dict(options, max_grad_norm=None, eps=1e-3)
    whole = _run(params, batch, method, **unclipped)
    layered = _run(params, batch, method, **unclipped, update="per-layer")
    _close(whole[0], layered[0], 2e-6)
    _close(whole[1], layered[1], 2e-6)
    for m, n in zip(whole[2], layered[2]):
        assert bool(n["finite"])
        assert float(n["loss"]) == pytest.approx(float(m["loss"]), rel=1e-6)
        assert float(n["grad_norm"]) == pytest.approx(float(m["grad_norm"]), rel=1e-5)


def test_clipping_is_per_layer(model):
    """With `max_grad_norm`, each layer's slice of the gradient (and the part outside the
    layers) is clipped on its own: the step equals AdamW on a gradient clipped that way,
    computed here from the whole gradient, and not the globally clipped step."""
    params, batch = model
    clip = 1e-3
    tc = train.TrainConfig(steps=1, warmup=0, remat="full", max_grad_norm=clip, update="per-layer")
    optimizer = train.make_optimizer(tc)
    trainable, opt_state, frozen = _state(params, "spsft", tc)

    def loss(t):
        p, d = train.join(t, frozen)
        total, count = train.batch_loss(CFG, tc, p, d, jax.tree.map(lambda x: x[0], batch), None)
        return total / count

    grads = jax.grad(loss)(trainable)

    def clipped(path, g):
        in_layers = "'layers'" in jax.tree_util.keystr(path)
        norms = {"layers": jnp.sqrt(sum(jnp.sum(x.reshape(CFG.num_layers, -1) ** 2, axis=1)
                                        for x in jax.tree.leaves(grads["delta"]["layers"]))),
                 "rest": optax.tree.norm({k: v for k, v in grads["delta"].items() if k != "layers"})}
        norm = norms["layers"].reshape((-1,) + (1,) * (g.ndim - 1)) if in_layers else norms["rest"]
        return g * jnp.minimum(1.0, clip / norm)

    per_part = jax.tree_util.tree_map_with_path(clipped, grads)
    updates, _ = optimizer.update(per_part, opt_state, trainable)
    expected = optax.apply_updates(trainable, updates)
    globally, _ = optax.clip_by_global_norm(clip).update(grads, optax.EmptyState())
    updates, _ = optimizer.update(globally, opt_state, trainable)
    global_result = optax.apply_updates(trainable, updates)

    step = train.make_train_step(CFG, tc, optimizer)
    got, _, metrics = step(*jax.tree.map(jnp.copy, (trainable, opt_state)), frozen, batch, jax.random.key(0))
    _close(got, expected, 1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
    layers = [np.asarray(x) for x in jax.tree.leaves(got["delta"]["layers"])]
    assert max(np.max(np.abs(x - np.asarray(y))) for x, y in
               zip(layers, jax.tree.leaves(global_result["delta"]["layers"]))) > 1e-4


@pytest.mark.parametrize("method", ["spsft", "dense"])
def test_no_gradient_buffer_is_held(method):
    """Compiled from shapes: the per-layer step needs at least the whole gradient's
    bytes less than the global one, less one layer's."""
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=8,
                            num_heads=4, num_kv_heads=2, head_dim=16)
    selection = memory.spread_selection(cfg, "all-linear", 32) if method == "spsft" else None
    total = {}
    for update in train.UPDATES:
        lowered, n = memory.lowered_train_step(cfg, llama.param_shapes(cfg), selection, batch_shape=(1, 8),
                                               method=method, remat="nested", update=update)
        total[update] = memory.read(lowered.compile())[0]
    gradient_bytes = 4 * n
    assert total["global"] - total["per-layer"] >= (1 - 1 / cfg.num_layers) * gradient_bytes


def test_a_loss_that_is_not_finite_updates_nothing(model):
    params, batch = model
    broken = {**params, "norm": {"weight": params["norm"]["weight"].at[0].set(jnp.nan)}}
    tc = train.TrainConfig(steps=1, remat="nested", update="per-layer")
    trainable, opt_state, frozen = _state(broken, "spsft", tc)
    before = jax.tree.map(np.asarray, (trainable, opt_state))
    step = train.make_train_step(CFG, tc, train.make_optimizer(tc))
    after = step(trainable, opt_state, frozen, batch, jax.random.key(0))
    assert not bool(after[2]["finite"]) and np.isnan(float(after[2]["loss"]))
    _close(before, after[:2], 0.0)


def test_finetune_stops_on_a_loss_that_is_not_finite(model):
    params, batch = model
    broken = {**params, "norm": {"weight": params["norm"]["weight"].at[0].set(jnp.inf)}}
    data = [jax.tree.map(lambda x: x[0], batch)]
    selection = memory.spread_selection(CFG, "all-linear", 4)
    with pytest.raises(FloatingPointError, match="step 1: loss is nan"):
        train.finetune(broken, selection, data, config=CFG, steps=2, remat="full", update="per-layer")


@pytest.mark.parametrize("options,match", [
    (dict(update="per-layer"), "set remat='full' or 'nested'"),
    (dict(update="per-layer", remat="dots"), "set remat='full' or 'nested'"),
    (dict(update="per-layer", remat="full", grad_accum=2), "grad_accum=1"),
    (dict(update="layerwise"), "update='layerwise': choose one of"),
])
def test_options_it_cannot_take_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**options)
