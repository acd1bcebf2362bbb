"""A class head on the last token: logits, loss and predictions against a direct computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spsft_jax import classify, evaluate, importance, llama, selection, train

CFG = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=4, tie_word_embeddings=True)
CLASSES = 3
PAD = 0


@pytest.fixture(scope="module")
def model():
    params = llama.init_params(CFG, jax.random.key(0), std=0.3)
    head = jax.random.normal(jax.random.key(1), (CLASSES, CFG.hidden_size))
    return classify.with_class_head(CFG, params, CLASSES, head)


def _examples():
    rng = np.random.default_rng(0)
    lengths = [5, 9, 3, 7, 6, 4]
    return [classify.class_example(rng.integers(1, CFG.vocab_size, n).tolist(), i % CLASSES, PAD)
            for i, n in enumerate(lengths)]


def _direct_logits(cfg, params, examples):
    """Each example alone, unpadded: the class logits at its last real token."""
    return np.stack([np.asarray(llama.forward(cfg, params, jnp.asarray([ids[:-1]])))[0, -1]
                     for ids, _ in examples])


def test_class_head_replaces_the_lm_head(model):
    cfg, params = model
    assert cfg.vocab_size == CLASSES and not cfg.tie_word_embeddings
    assert params["embed_tokens"]["weight"].shape == (40, 16)  # the embedding table stays
    with pytest.raises(ValueError, match="expected"):
        classify.with_class_head(CFG, params, CLASSES, jnp.zeros((CLASSES + 1, CFG.hidden_size)))


def test_predictions_are_the_last_tokens_argmax(model):
    cfg, params = model
    examples = _examples()
    batches = [classify.class_batch(examples[:4], 12, PAD), classify.class_batch(examples[4:], 12, PAD)]
    np.testing.assert_array_equal(batches[0]["classes"], [0, 1, 2, 0])
    predicted, true = classify.predict(cfg, params, batches)
    np.testing.assert_array_equal(true, [i % CLASSES for i in range(6)])
    np.testing.assert_array_equal(predicted, _direct_logits(cfg, params, examples).argmax(-1))


def test_lm_loss_of_a_class_batch_is_the_class_cross_entropy(model):
    cfg, params = model
    examples = _examples()
    logits = _direct_logits(cfg, params, examples)
    labels = np.array([i % CLASSES for i in range(len(examples))])
    expected = np.mean(jax.nn.logsumexp(logits, -1) - logits[np.arange(len(labels)), labels])
    got = evaluate.held_out_loss(cfg, params, [classify.class_batch(examples, 12, PAD)])
    assert got["tokens"] == len(examples)
    np.testing.assert_allclose(got["loss"], expected, rtol=1e-5)


def test_classwise_taylor_and_training_run_on_class_batches(model):
    cfg, params = model
    batches = [classify.class_batch(_examples(), 12, PAD)]
    scores = importance.classwise_taylor(cfg, params, batches, targets="mlp", num_classes=CLASSES)
    sel = selection.select(scores, rank=2)
    before = evaluate.held_out_loss(cfg, params, batches)["loss"]
    result = train.finetune(params, sel, batches, config=cfg, steps=15, learning_rate=1e-2, warmup=0)
    after = evaluate.held_out_loss(cfg, params, batches, delta=result.delta)["loss"]
    assert after < before


def test_accuracy_statistics():
    predicted = np.array([0, 0, 1, 1, 2, 0, 2, 2])
    true = np.array([0, 0, 1, 2, 2, 2, 2, 3])
    per_class = classify.per_class_accuracy(predicted, true, 5)
    np.testing.assert_allclose(per_class[:4], [1.0, 1.0, 0.5, 0.0])
    assert np.isnan(per_class[4])
    stats = classify.accuracy_stats(per_class)
    assert stats == {"mean": 0.625, "worst": 0.0, "q25": 0.375, "median": 0.75}
    with pytest.raises(ValueError, match="no class label"):
        classify.class_batch([([1, 2], [-100, -100])], 4, PAD)
