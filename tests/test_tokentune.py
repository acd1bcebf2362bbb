"""TokenTune: same logits as the model, gradients through the selected tokens only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spsft_jax import delta as dl
from spsft_jax import llama
from spsft_jax import tokentune as tt
from spsft_jax.llama import subtree
from spsft_jax.losses import causal_lm_loss

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5)
B, T = 3, 16
PADDING = {  # (row, number of pads) per side; a row with 10 pads has fewer real tokens than k
    "none": {},
    "left": {1: 3, 2: 10},
    "right": {0: 4, 2: 10},
}


def attention_mask(kind, batch=B, seq=T):
    mask = np.ones((batch, seq), np.int32)
    for row, pads in PADDING[kind].items():
        if kind == "left":
            mask[row, :pads] = 0
        else:
            mask[row, seq - pads:] = 0
    return jnp.asarray(mask)


def batch(mask, cfg=CFG, seed=0):
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, mask.shape), jnp.int32)
    return ids, jnp.where(mask.astype(bool), ids, -100)


def random_params(cfg, seed=0):
    """Random weights, norms near one; numpy-drawn (jax.random would cost a compilation)."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        is_norm = "norm" in jax.tree_util.keystr(path)
        values = (1.0 if is_norm else 0.0) + (0.1 if is_norm else 0.02) * rng.standard_normal(shape.shape)
        return jnp.asarray(values, shape.dtype)

    return jax.tree_util.tree_map_with_path(draw, llama.param_shapes(cfg))


ROW_MODULES = ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")
LORA_MODULES = ("v_proj", "up_proj")


def rows_delta(params, cfg, *, rank, modules):
    """Zero RowDeltas on `modules`, rows drawn at random per layer."""
    rng = np.random.default_rng(0)
    selection: dict = {}
    for _, block, name in llama.module_paths(list(modules)):
        out = cfg.linear_shapes()[name][0]
        rows = np.stack([rng.choice(out, rank, replace=False) for _ in range(cfg.num_layers)])
        selection.setdefault("layers", {}).setdefault(block, {})[name] = {"rows": rows}
    return dl.rows_from_selection(params, selection)


def mixed_delta(params, seed, rank=2):
    """Every delta kind the model meets: SPSFT rows, LoRA and norm weights; all nonzero
    (W_f and LoRA's B start at zero, which would hide mistakes)."""
    lora = {}
    for path in llama.module_paths(list(LORA_MODULES)):
        d_out, d_in = params["layers"][path[1]][path[2]]["weight"].shape[1:]
        lora.setdefault("layers", {}).setdefault(path[1], {})[path[2]] = dl.LoraDelta(
            jnp.zeros((CFG.num_layers, rank, d_in)), jnp.zeros((CFG.num_layers, d_out, rank)), 2.0)
    tree = dl.union(rows_delta(params, CFG, rank=3, modules=ROW_MODULES), lora, dl.norms(params))
    return randomize(tree, seed)


def randomize(tree, seed, scale=0.05):
    rng = np.random.default_rng(seed)
    trainable, fixed = dl.split(tree)
    trainable = jax.tree.map(
        lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), trainable)
    return dl.combine(trainable, fixed)


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


select_tokens = jax.jit(tt.select_tokens, static_argnums=2)


def selection(kind, mask, key=jax.random.key(7)):
    k = {"random": 6, "all": T, "ends": 2}[kind]
    return select_tokens(key, mask, k)


# --------------------------------------------------------------------------- selection


def test_num_selected():
    assert tt.num_selected(512, 0.25) == 128
    assert tt.num_selected(512, 1.0) == 512
    assert tt.num_selected(10, 0.3) == 3  # not 4 from 0.3 * 10 = 3.0000000000000004
    assert tt.num_selected(512, 0.1) == 52  # rounded up
    assert tt.num_selected(512, 0.001) == 2  # first and last at least
    assert tt.num_selected(512, 64) == 64
    assert tt.num_selected(512, 1) == 2
    assert tt.num_selected(8, 100) == 8
    for bad in (0.0, 1.5, -0.1, 0):
        with pytest.raises(ValueError):
            tt.num_selected(512, bad)
    with pytest.raises(TypeError):
        tt.num_selected(512, True)


@pytest.mark.parametrize("pad", ["left", "right"])
def test_selection_respects_padding_and_keeps_ends(pad):
    mask = attention_mask(pad)
    k = 6
    indices, valid = select_tokens(jax.random.key(3), mask, k)
    indices, valid, mask = np.asarray(indices), np.asarray(valid), np.asarray(mask).astype(bool)
    assert indices.shape == valid.shape == (B, k) and indices.dtype == np.int32
    for row in range(B):
        real = np.flatnonzero(mask[row])
        chosen = indices[row]
        assert np.all(np.diff(chosen) > 0), "ascending and distinct"
        np.testing.assert_array_equal(valid[row], mask[row, chosen])
        assert {real[0], real[-1]} <= set(chosen[valid[row]])
        if len(real) >= k:
            assert valid[row].all() and set(chosen) <= set(real)
        else:  # every real token, padding fills the rest and is marked invalid
            assert set(chosen[valid[row]]) == set(real) and valid[row].sum() == len(real)


def test_selection_is_reproducible_and_depends_on_the_key():
    mask = attention_mask("left")
    a, _ = select_tokens(jax.random.key(1), mask, 6)
    b, _ = select_tokens(jax.random.key(1), mask, 6)
    c, _ = select_tokens(jax.random.key(2), mask, 6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_selection_is_uniform_over_the_middle():
    mask = jnp.ones((1, 10), jnp.int32)
    keys = jax.random.split(jax.random.key(0), 4000)
    indices, _ = jax.vmap(lambda key: tt.select_tokens(key, mask, 4))(keys)
    counts = np.bincount(np.asarray(indices).ravel(), minlength=10) / len(keys)
    assert counts[0] == counts[9] == 1.0
    np.testing.assert_allclose(counts[1:9], 2 / 8, atol=0.04)  # 2 random slots over 8 positions


def test_preferred_tokens_are_taken_first():
    mask = jnp.ones((2, T), jnp.int32)
    prefer = np.zeros((2, T), bool)
    prefer[0, [4, 7, 9]] = True  # fewer than the k - 2 free slots: all taken
    prefer[1, 3:13] = True  # more than the free slots: only preferred ones taken
    indices, valid = select_tokens(jax.random.key(5), mask, 6, prefer=jnp.asarray(prefer))
    indices = np.asarray(indices)
    assert {0, 4, 7, 9, 15} <= set(indices[0])
    assert {0, 15} <= set(indices[1]) and all(prefer[1, i] for i in indices[1] if i not in (0, 15))
    assert np.asarray(valid).all()


def test_loss_bearing_and_restrict_labels():
    labels = jnp.asarray([[-100, 11, 12, -100, 14, 15]])
    np.testing.assert_array_equal(tt.loss_bearing(labels), [[True, True, False, True, True, False]])
    indices, valid = jnp.asarray([[1, 3, 5]]), jnp.asarray([[True, True, False]])
    # logits at t predict labels[t + 1]: selected 1 and 3 keep labels 2 and 4; 5 is fill.
    np.testing.assert_array_equal(tt.restrict_labels(labels, indices, valid),
                                  [[-100, -100, 12, -100, 14, -100]])
    np.testing.assert_array_equal(tt.restrict_labels(labels, jnp.asarray([[0, 5]])),
                                  [[-100, 11, -100, -100, -100, -100]])
    # The same targets, gathered per selected slot; the last position predicts nothing.
    np.testing.assert_array_equal(tt.selected_targets(labels, indices, valid), [[12, 14, -100]])
    np.testing.assert_array_equal(tt.selected_targets(labels, jnp.asarray([[0, 5]])), [[11, -100]])


# --------------------------------------------------------------------------- forward

# Jitted once at module level, so tests with the same shapes share a compilation.
model_logits = jax.jit(llama.forward, static_argnums=0, static_argnames=("remat",))
tokentune_logits = jax.jit(tt.forward, static_argnums=0,
                           static_argnames=("remat", "query_chunk", "chunk_tokens"))


@pytest.mark.parametrize("kind", ["random", "all", "ends"])
def test_logits_equal_the_model(params, delta, kind):
    for pad in sorted(PADDING):  # values change, shapes do not: one compilation per kind
        mask = attention_mask(pad)
        ids, _ = batch(mask)
        indices, _ = selection(kind, mask)
        ref = model_logits(CFG, params, ids, mask, delta)
        # query_chunk=3: the unselected queries run in blocks, the last one ragged.
        ours = tokentune_logits(CFG, params, ids, indices, mask, delta, query_chunk=3)
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) < 1e-5, pad


def test_logits_equal_the_model_across_variants():
    """MQA, tied embeddings, biases, explicit positions, remat, and attention in blocks
    of `chunk_tokens` queries on both paths (selected: `llama.attend`'s own blocks)."""
    variant = dict(num_kv_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    cfg = llama.LlamaConfig(**{**CFG.__dict__, **variant})
    params = random_params(cfg, seed=2)
    mask = attention_mask("left")
    ids, _ = batch(mask, cfg)
    indices, _ = selection("random", mask)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # as generation with left padding
    ref = model_logits(cfg, params, ids, mask, position_ids=positions)
    ours = tokentune_logits(cfg, params, ids, indices, mask, position_ids=positions, remat="full",
                            chunk_tokens=2)
    assert rel_err(ours, ref) < 1e-5


# --------------------------------------------------------------------------- gradients


def reference_forward(cfg, params, ids, mask, delta, keep):
    """`llama.forward` written out layer by layer, where everything computed at an
    unselected position is a constant: hidden states entering each layer and the
    keys/values there. `keep [B, T]` marks the selected positions."""

    def freeze_unselected(x):
        selected = keep.reshape(keep.shape + (1,) * (x.ndim - 2))
        return jnp.where(selected, x, jax.lax.stop_gradient(x))

    positions = llama.default_positions(ids)
    h = llama.embed(cfg, params, ids, delta)
    cos, sin = llama.rope_tables(cfg, positions, h.dtype)
    masks = llama.attention_masks(cfg, positions, positions, mask.astype(bool))
    for i in range(cfg.num_layers):
        layer = jax.tree.map(lambda a: a[i], params["layers"])
        layer_delta = jax.tree.map(lambda a: a[i], subtree(delta, "layers"))
        h = freeze_unselected(h)
        x = llama.norm(cfg, h, layer["input_layernorm"], subtree(layer_delta, "input_layernorm"))
        q, k, v = llama.attention_projections(cfg, layer, layer_delta, x, cos, sin)
        k, v = freeze_unselected(k), freeze_unselected(v)
        h = h + llama.attention_output(cfg, layer, layer_delta, llama.layer_attention(cfg, layer, q, k, v, masks))
        h = llama.mlp_block(cfg, layer, layer_delta, h)
    return llama.head(cfg, params, h, delta)


def _loss_grad(logits_fn):
    """jit(grad) of the summed loss w.r.t. the trainable half of a split delta tree."""

    def loss(trainable, fixed, params, batch, **kwargs):
        logits = logits_fn(params, batch, dl.combine(trainable, fixed), **kwargs)
        return causal_lm_loss(logits, batch["labels"])[0]

    return jax.jit(jax.value_and_grad(loss), static_argnames=("remat", "query_chunk"))


tokentune_grad = _loss_grad(lambda p, b, d, **kw: tt.forward(
    CFG, p, b["input_ids"], b["indices"], b["attention_mask"], d, **kw))


@jax.jit
def selected_loss_grad(trainable, fixed, params, batch):
    """jit(grad) of `selected_causal_lm_loss` (it takes unrestricted labels and `valid`)."""

    def loss(trainable):
        return tt.selected_causal_lm_loss(
            CFG, params, batch["input_ids"], batch["indices"], batch["all_labels"],
            batch["attention_mask"], dl.combine(trainable, fixed), valid=batch["valid"])[0]

    return jax.value_and_grad(loss)(trainable)
reference_grad = _loss_grad(lambda p, b, d: reference_forward(
    CFG, p, b["input_ids"], b["attention_mask"], d, b["keep"]))
model_grad = _loss_grad(lambda p, b, d: llama.forward(
    CFG, p, b["input_ids"], b["attention_mask"], d))


def assert_trees_close(ours, ref, tol=1e-5):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
        assert rel_err(a, b) < tol, (jax.tree_util.keystr(path), rel_err(a, b))


def trees_differ(a, b, tol=1e-3):
    return any(rel_err(x, y) > tol for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def delta(params):
    return mixed_delta(params, seed=4)


@pytest.fixture(scope="module")
def selected_batch():
    """A left-padded batch, k = 6 tokens per row chosen among the loss-bearing ones."""
    mask = attention_mask("left")
    ids, labels = batch(mask, seed=3)
    indices, valid = select_tokens(jax.random.key(9), mask, 6, prefer=tt.loss_bearing(labels))
    return {"input_ids": ids, "attention_mask": mask, "indices": indices, "valid": valid,
            "all_labels": labels, "labels": tt.restrict_labels(labels, indices, valid),
            "keep": tt.selected_mask(indices, T, valid)}


def plain(batch):
    return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}


@pytest.mark.parametrize("remat", [None, "full"])
def test_gradients_equal_the_stop_gradient_reference(params, delta, selected_batch, remat):
    trainable, fixed = dl.split(delta)
    loss, grad = tokentune_grad(trainable, fixed, params, selected_batch,
                                remat=remat, query_chunk=4)
    ref_loss, ref_grad = reference_grad(trainable, fixed, params, selected_batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_trees_close(grad, ref_grad)
    if remat is None:
        # The reference must differ from backpropagating through every token.
        _, every_token_grad = model_grad(trainable, fixed, params, plain(selected_batch))
        assert trees_differ(ref_grad, every_token_grad)
        # The loss on the selected logits alone is the same loss.
        head_loss, head_grad = selected_loss_grad(trainable, fixed, params, selected_batch)
        np.testing.assert_allclose(head_loss, ref_loss, rtol=1e-5)
        assert_trees_close(head_grad, ref_grad)


def test_all_tokens_selected_gives_the_ordinary_gradient(params, delta):
    trainable, fixed = dl.split(delta)
    for pad in ("none", "right"):
        mask = attention_mask(pad)
        ids, labels = batch(mask, seed=5)
        indices, valid = select_tokens(jax.random.key(0), mask, tt.num_selected(T, 1.0))
        full = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        selected = {**full, "indices": indices,
                    "labels": tt.restrict_labels(labels, indices, valid)}
        assert_trees_close(tokentune_grad(trainable, fixed, params, selected)[1],
                           model_grad(trainable, fixed, params, full)[1])


# --------------------------------------------------------------------------- memory


def test_activation_memory_scales_with_selected_tokens():
    cfg = llama.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                            num_heads=4, num_kv_heads=4, head_dim=32)
    seq = 256
    params = llama.param_shapes(cfg)
    trainable, fixed = dl.split(rows_delta(params, cfg, rank=8, modules=llama.MLP_MODULES
                                           + llama.ATTENTION_MODULES))
    ids = jax.ShapeDtypeStruct((2, seq), jnp.int32)

    def temp_bytes(k):
        def loss(trainable, fixed, params, ids):
            mask = jnp.ones(ids.shape, jnp.int32)
            indices, valid = tt.select_tokens(jax.random.key(0), mask, k)
            logits = tt.forward(cfg, params, ids, indices, mask, dl.combine(trainable, fixed))
            return causal_lm_loss(logits, tt.restrict_labels(ids, indices, valid))[0]

        compiled = jax.jit(jax.grad(loss)).lower(trainable, fixed, params, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    quarter, full = temp_bytes(seq // 4), temp_bytes(seq)
    print(f"temp bytes: k=T/4 {quarter}, k=T {full} ({quarter / full:.2f}x)")
    assert quarter < 0.6 * full
