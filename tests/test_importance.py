"""Importance scores against references built from dense weight gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spsft_jax import importance, llama, losses

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8)
PATHS = llama.module_paths("all-linear")


@pytest.fixture(scope="module")
def params():
    # A larger init than the default so that rows differ clearly in importance.
    return llama.init_params(CFG, jax.random.key(0), std=0.2)


def _batch(seed, batch, seq, *, pad=0, classes=None):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    labels = ids.copy()
    if pad:  # right padding on the last example, and its pads carry no loss
        mask[-1, -pad:] = 0
        labels[-1, -pad:] = -100
    labels[:, :2] = -100  # a prompt without loss
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if classes is not None:
        out["classes"] = np.asarray(classes, np.int32)
    return out


BATCHES = [_batch(1, 2, 10, pad=3), _batch(2, 3, 7)]  # different sizes and lengths


def _reference_token_losses(logits, labels):
    """Per-token cross entropy written independently of `spsft_jax.losses`."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = labels[:, 1:]
    valid = targets != -100
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, -picked, 0.0), valid


def _dense_taylor(params, batches, weights_of_example):
    """|sum_j w_ij dL/dw_ij| from the full weight gradient of a weighted sum of example losses."""
    arrays = [{k: jnp.asarray(b[k]) for k in ("input_ids", "attention_mask", "labels")}
              for b in batches]
    weights = [jnp.asarray(w, jnp.float32) for w in weights_of_example]
    return {path: np.asarray(v) for path, v in _dense_row_taylor(params, arrays, weights).items()}


@jax.jit
def _dense_row_taylor(params, batches, weights_of_example):
    def loss(layers):
        p = {**params, "layers": layers}
        total = 0.0
        for batch, weights in zip(batches, weights_of_example):
            logits = llama.forward(CFG, p, batch["input_ids"], batch["attention_mask"])
            token_losses, _ = _reference_token_losses(logits, batch["labels"])
            total = total + jnp.sum(token_losses.sum(-1) * weights)
        return total

    grads = {"layers": jax.grad(loss)(params["layers"])}
    return {path: jnp.abs(jnp.sum(llama.subtree(params, *path)["weight"]
                                  * llama.subtree(grads, *path)["weight"], axis=-1))
            for path in PATHS}


def _loss_tokens_per_example(batch):
    return (np.asarray(batch["labels"])[:, 1:] != -100).sum(-1)


def _leaf(tree, path):
    return np.asarray(llama.subtree(tree, *path))


# --------------------------------------------------------------------------- losses


def test_causal_lm_loss_matches_a_log_softmax_reference():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 6, 11)), jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 11, (3, 6)), jnp.int32).at[1, 2:].set(-100)
    ref, valid = _reference_token_losses(logits, labels)
    total, count = losses.causal_lm_loss(logits, labels)
    assert int(count) == int(valid.sum()) == 3 * 5 - 4  # labels[1, 2:] are 4 of the 5 shifted
    np.testing.assert_allclose(total, ref.sum(), rtol=1e-6)
    np.testing.assert_allclose(losses.mean_causal_lm_loss(logits, labels), ref.sum() / valid.sum(),
                               rtol=1e-6)
    sums, counts = losses.per_example_causal_lm_loss(logits, labels)
    np.testing.assert_allclose(sums, ref.sum(-1), rtol=1e-6)
    np.testing.assert_array_equal(counts, valid.sum(-1))
    assert float(losses.mean_causal_lm_loss(logits, jnp.full_like(labels, -100))) == 0.0


# --------------------------------------------------------------------------- magnitude and Taylor (row form)


def test_magnitude_is_the_l2_norm_of_each_row(params):
    scores = importance.magnitude(CFG, params)
    for path in PATHS:
        w = np.asarray(llama.subtree(params, *path)["weight"], np.float64)
        np.testing.assert_allclose(_leaf(scores, path), np.sqrt((w**2).sum(-1)), rtol=1e-6)
    assert set(importance.magnitude(CFG, params, "mlp")["layers"]) == {"mlp"}


# Every Taylor call below targets all linears and reuses these batch shapes, so the
# step compiles a handful of times for the whole file.


@pytest.fixture(scope="module")
def taylor_scores(params):
    return importance.taylor(CFG, params, iter(BATCHES), form="row")  # one pass is enough


def test_taylor_equals_the_dense_gradient_reference(params, taylor_scores):
    tokens = sum(_loss_tokens_per_example(b).sum() for b in BATCHES)
    ref = _dense_taylor(params, BATCHES, [np.full(len(b["input_ids"]), 1.0 / tokens) for b in BATCHES])
    for path in PATHS:
        got = _leaf(taylor_scores, path)
        assert got.shape == (CFG.num_layers, CFG.linear_shapes()[path[-1]][0]) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref[path], rtol=2e-4, atol=1e-6 * ref[path].max())


def test_taylor_takes_the_absolute_value_after_accumulating(params, taylor_scores):
    # Scores of the data set are not the token-weighted mean of per-batch scores.
    parts = [importance.taylor(CFG, params, [b], form="row") for b in BATCHES]
    weights = [_loss_tokens_per_example(b).sum() for b in BATCHES]
    for path in PATHS:
        mean_of_abs = sum(w * _leaf(p, path) for w, p in zip(weights, parts)) / sum(weights)
        assert np.all(_leaf(taylor_scores, path) <= mean_of_abs * (1 + 1e-5) + 1e-9)
        assert not np.allclose(_leaf(taylor_scores, path), mean_of_abs, rtol=1e-3)


def test_taylor_compiles_once_per_batch_shape_and_remat_agrees(params, taylor_scores):
    compiled = importance._taylor_step._cache_size()
    again = importance.taylor(CFG, params, BATCHES[::-1] + BATCHES, form="row")
    assert importance._taylor_step._cache_size() == compiled
    one_batch = importance.taylor(CFG, params, BATCHES[:1], form="row")
    rematted = importance.taylor(CFG, params, BATCHES[:1], remat="full", form="row")
    for path in PATHS:  # scores are |sums| that cancel: compare relative to the largest
        scale = _leaf(taylor_scores, path).max()
        np.testing.assert_allclose(_leaf(again, path), _leaf(taylor_scores, path), atol=1e-5 * scale)
        np.testing.assert_allclose(_leaf(rematted, path), _leaf(one_batch, path), atol=1e-5 * scale)


def test_taylor_rejects_data_without_loss_tokens(params):
    empty = {**BATCHES[1], "labels": np.full_like(BATCHES[1]["labels"], -100)}
    with pytest.raises(ValueError, match="no loss tokens"):
        importance.taylor(CFG, params, [empty])
    with pytest.raises(KeyError, match="batch 0: no 'labels'"):
        importance.taylor(CFG, params, [{"input_ids": empty["input_ids"]}])


# --------------------------------------------------------------------------- class-wise Taylor

# Class 3 never occurs: it must score 0 and stay out of the aggregates.
NUM_CLASSES = 4
CLASS_BATCHES = [_batch(1, 2, 10, pad=3, classes=[2, 0]), _batch(2, 3, 7, classes=[0, 1, 2])]


@pytest.fixture(scope="module")
def per_class(params):
    return importance.per_class_taylor(CFG, params, CLASS_BATCHES, num_classes=NUM_CLASSES,
                                       form="row")


def test_per_class_taylor_equals_dense_references_per_class(params, per_class):
    scores, tokens = per_class
    for t in range(NUM_CLASSES):
        in_class = [np.asarray(b["classes"]) == t for b in CLASS_BATCHES]
        count = sum(_loss_tokens_per_example(b)[m].sum() for b, m in zip(CLASS_BATCHES, in_class))
        assert int(tokens[t]) == count
        if count == 0:
            assert all(np.all(_leaf(scores, path)[t] == 0) for path in PATHS)
            continue
        ref = _dense_taylor(params, CLASS_BATCHES, [m / count for m in in_class])
        for path in PATHS:
            np.testing.assert_allclose(_leaf(scores, path)[t], ref[path], rtol=2e-4,
                                       atol=1e-6 * ref[path].max())


@pytest.mark.parametrize("how", importance.AGGREGATES)
def test_classwise_taylor_aggregates_the_present_classes(params, per_class, how):
    scores = importance.classwise_taylor(CFG, params, CLASS_BATCHES, aggregate=how,
                                         num_classes=NUM_CLASSES, form="row")
    for path in PATHS:
        present = _leaf(per_class[0], path)[:3].astype(np.float64)
        expected = {"mean": present.mean(0), "max": present.max(0),
                    "quantile_mean": np.quantile(present, np.linspace(0, 1, 11), axis=0).mean(0)}[how]
        np.testing.assert_allclose(_leaf(scores, path), expected, rtol=1e-5)


def test_one_class_gives_plain_taylor_and_the_class_axis_grows(params):
    # Every example in class 3 with num_classes unknown: the class axis grows to 4.
    one_class = [{**b, "classes": np.full(len(b["input_ids"]), 3, np.int32)} for b in CLASS_BATCHES]
    scores, tokens = importance.per_class_taylor(CFG, params, one_class, form="row")
    assert tokens.shape == (NUM_CLASSES,) and int(tokens[:3].sum()) == 0
    plain = importance.taylor(CFG, params, CLASS_BATCHES, form="row")
    classwise = importance.classwise_taylor(CFG, params, one_class, aggregate="quantile_mean",
                                            form="row")
    for path in PATHS:
        scale = _leaf(plain, path).max()
        np.testing.assert_allclose(_leaf(scores, path)[3], _leaf(plain, path), atol=1e-5 * scale)
        np.testing.assert_allclose(_leaf(classwise, path), _leaf(plain, path), atol=1e-5 * scale)


def test_classwise_rejects_bad_classes(params):
    with pytest.raises(ValueError, match=r"batch 0: classes must lie in \[0, 2\)"):
        importance.per_class_taylor(CFG, params, CLASS_BATCHES, num_classes=2)
    with pytest.raises(KeyError, match="needs 'classes'"):
        importance.per_class_taylor(CFG, params, BATCHES)
    with pytest.raises(ValueError, match="aggregate='median'"):
        importance.classwise_taylor(CFG, params, CLASS_BATCHES, aggregate="median")


# --------------------------------------------------------------------------- aggregators


@pytest.mark.parametrize("num_classes", [1, 2, 7, 12])
def test_aggregators_match_numpy(num_classes):
    x = np.random.default_rng(num_classes).exponential(size=(num_classes, 3, 5))
    quantile_mean = np.quantile(x, np.linspace(0, 1, 11), axis=0).mean(0)
    np.testing.assert_allclose(importance.aggregate(x, "quantile_mean"), quantile_mean, rtol=1e-5)
    np.testing.assert_allclose(importance.aggregate(x, "mean"), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(importance.aggregate(x, "max"), x.max(0), rtol=1e-6)
    tree = importance.aggregate({"a": {"b": x}}, "quantile_mean")
    np.testing.assert_allclose(tree["a"]["b"], quantile_mean, rtol=1e-5)


def test_aggregate_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match="aggregate='median'"):
        importance.aggregate(np.ones((2, 3)), "median")
