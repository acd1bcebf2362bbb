"""Our functional Llama gives the logits of transformers' LlamaForCausalLM."""
import jax.numpy as jnp
import numpy as np
import pytest

import spsft_jax as sj
from conftest import VARIANTS, hf_logits, make_hf_model, rel_max_err

TOL = 1e-5


def _ids(batch, seq, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    model = make_hf_model(tmp_path, **VARIANTS[variant])
    cfg, params = sj.interop.load_hf(tmp_path)
    ids = _ids(2, 40, cfg.vocab_size)  # longer than the llama3 original context
    ours = sj.llama.forward(cfg, params, jnp.asarray(ids))
    err = rel_max_err(ours, hf_logits(model, ids))
    print(f"{variant}: rel max err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(tmp_path, side):
    model = make_hf_model(tmp_path)
    cfg, params = sj.interop.load_hf(tmp_path)
    ids = _ids(3, 12, cfg.vocab_size, seed=1)
    mask = np.ones_like(ids)
    for row, pad in enumerate([0, 3, 7]):
        if pad and side == "left":
            mask[row, :pad] = 0
        elif pad:
            mask[row, -pad:] = 0
    ours = np.asarray(sj.llama.forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(model, ids, mask)
    valid = mask.astype(bool)
    err = rel_max_err(ours[valid], ref[valid])
    print(f"{side}-padded: rel max err {err:.2e}")
    assert err < TOL
    if side == "left":  # the mask must matter: without it real positions see the pads
        unmasked = np.asarray(sj.llama.forward(cfg, params, jnp.asarray(ids)))
        assert rel_max_err(unmasked[valid], ref[valid]) > 1e-3


def test_remat_policies_give_the_same_gradients(tmp_path, capsys):
    """Remat changes what the backward pass recomputes, never the gradient; and it does
    change what is kept (fewer saved residuals), so the policy really applies. With no
    remat a layer keeps only its input and `SAVED_ACTIVATIONS`, fewer than autodiff would
    keep; "minimal" keeps q, k and v as well."""
    import jax
    from jax.ad_checkpoint import print_saved_residuals

    make_hf_model(tmp_path)
    cfg, params = sj.interop.load_hf(tmp_path)
    ids = jnp.asarray(_ids(1, 9, cfg.vocab_size))

    def loss(p, remat):
        return jnp.sum(jax.nn.log_softmax(sj.llama.forward(cfg, p, ids, remat=remat))[..., 0])

    def residuals(remat):  # what the backward pass keeps, one printed line each
        capsys.readouterr()
        print_saved_residuals(lambda p: loss(p, remat), params)
        return capsys.readouterr().out.splitlines()

    def saved(remat):
        return len(residuals(remat))

    everything = jax.checkpoint_policies.everything_saveable  # what plain autodiff keeps
    plain = jax.grad(loss)(params, everything)
    for policy in (None, "minimal", "full", "dots"):
        got = jax.grad(loss)(params, policy)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(plain)):
            # Recomputation regroups float sums: float32 rounding relative to the gradient's scale.
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    assert saved("full") < saved("dots") < saved(everything)
    assert saved("full") < saved(None) < saved("minimal") < saved(everything)
    # Per layer, stacked by the scan: the layer's input and the named activations, no more.
    def stacked(remat):
        return [r for r in residuals(remat) if f"[{cfg.num_layers},{ids.shape[0]},{ids.shape[1]}," in r]

    assert len(stacked(None)) == 1 + len(sj.llama.SAVED_ACTIVATIONS), stacked(None)
    assert len(stacked("minimal")) == 1 + len(sj.llama.SAVED_ACTIVATIONS) + 3, stacked("minimal")  # q, k, v


def test_layer_groups_of_nested_remat():
    group = sj.llama.layer_group_size
    assert [group(n) for n in (1, 2, 4, 6, 7, 30, 32, 80)] == [1, 2, 4, 2, 7, 5, 4, 8]


@pytest.mark.slow  # 6 layers, every remat path trained twice
def test_nested_remat_keeps_group_inputs_and_gives_the_gradient_of_full(tmp_path, capsys):
    """remat="nested" on 6 layers (3 groups of 2): the forward pass keeps the inputs of
    3 groups, not of 6 layers, and the gradient is "full"'s, through Taylor scores and
    training (with and without TokenTune) too."""
    import jax
    from jax.ad_checkpoint import print_saved_residuals

    from spsft_jax import memory, train

    make_hf_model(tmp_path, num_hidden_layers=6)
    cfg, params = sj.interop.load_hf(tmp_path)
    ids = jnp.asarray(_ids(2, 9, cfg.vocab_size))

    def loss(p, remat):
        return jnp.sum(jax.nn.log_softmax(sj.llama.forward(cfg, p, ids, remat=remat))[..., 0])

    def stacked(remat):  # saved residuals stacked over layers or groups, by leading size
        capsys.readouterr()
        print_saved_residuals(lambda p: loss(p, remat), params)
        lines = capsys.readouterr().out.splitlines()
        return sorted(int(line.split("[")[1].split(",")[0]) for line in lines if ",2,9,32]" in line)

    assert stacked("full") == [6] and stacked("nested") == [3]
    full, nested = (jax.grad(loss)(params, r) for r in ("full", "nested"))
    for a, b in zip(jax.tree.leaves(nested), jax.tree.leaves(full)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))

    selection = memory.spread_selection(cfg, "all-linear", 4)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    scores = [sj.importance.taylor(cfg, params, [batch], remat=r) for r in ("full", "nested")]
    for a, b in zip(*(jax.tree.leaves(x) for x in scores)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))
    for tokentune in (None, 0.5):  # TokenTune scans its two paths through the same layers
        runs = {r: train.finetune(params, selection, [batch], config=cfg, steps=3, learning_rate=1e-2,
                                  remat=r, tokentune=tokentune) for r in ("full", "nested")}
        # Adam divides by the gradient's own scale, so last-bit differences in a near-zero
        # gradient move its entry by more than rounding: 3e-5 is 0.3% of one step (lr 1e-2).
        for a, b in zip(*(jax.tree.leaves(run.delta) for run in runs.values())):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5)
        losses = {r: [h["loss"] for h in run.history] for r, run in runs.items()}
        assert losses["nested"] == pytest.approx(losses["full"], rel=1e-6)
        assert losses["nested"][-1] < losses["nested"][0]


def test_token_blocks_change_nothing(tmp_path):
    """Attention in query blocks and the loss in position blocks: same logits, loss and gradient."""
    import jax

    from spsft_jax import losses

    make_hf_model(tmp_path)
    cfg, params = sj.interop.load_hf(tmp_path)
    ids = jnp.asarray(_ids(2, 18, cfg.vocab_size, seed=3))  # 4 blocks of 4 and one of 2
    labels = ids.at[0, :5].set(-100)
    np.testing.assert_allclose(sj.llama.forward(cfg, params, ids, chunk_tokens=4),
                               sj.llama.forward(cfg, params, ids, chunk_tokens=None), rtol=1e-6, atol=1e-6)

    def loss(p, chunk):
        h = sj.llama.hidden_states(cfg, p, ids, chunk_tokens=chunk)
        total, count = losses.chunked_causal_lm_loss(lambda x: sj.llama.head(cfg, p, x), h, labels, chunk)
        return total / count

    plain, plain_grad = jax.value_and_grad(loss)(params, None)
    ref = losses.mean_causal_lm_loss(sj.llama.forward(cfg, params, ids), labels)
    got, got_grad = jax.value_and_grad(loss)(params, 4)
    np.testing.assert_allclose(plain, ref, rtol=1e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(plain_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_token_blocks_never_exceed_the_block_size():
    """A length the block size does not divide ends in a shorter block, never one block
    of the whole sequence (which would build the full score matrix)."""
    import jax

    seen = []

    def fn(x):
        seen.append(x.shape[1])
        return 2 * x

    x = jnp.arange(2 * 11 * 3, dtype=jnp.float32).reshape(2, 11, 3)
    np.testing.assert_array_equal(jax.jit(lambda x: sj.llama.token_blocks(fn, x, 4))(x), 2 * x)
    assert seen and max(seen) <= 4 and 3 in seen


def test_loss_blocks_bound_the_logits_and_prefer_a_divisor():
    from spsft_jax import losses

    budget = losses.LOGIT_BLOCK_ELEMENTS
    # Llama 3's vocabulary at batch 1: 32 tokens a block, which divides 2048.
    assert losses.logit_block_tokens(512, 1, 128256, 2048) == budget // 128256 == 32
    # A small vocabulary is held to the attention block size.
    assert losses.logit_block_tokens(512, 2, 64, 4096) == 512
    for chunk, batch, vocab, tokens in [(512, 8, 49152, 64), (512, 8, 49152, 67), (64, 3, 5000, 100)]:
        size = losses.logit_block_tokens(chunk, batch, vocab, tokens)
        assert 1 <= size <= chunk and size * batch * vocab <= budget
        bound = min(chunk, budget // (batch * vocab))
        divisors = [s for s in range(bound // 2 + 1, bound + 1) if tokens % s == 0]
        assert size == (max(divisors) if divisors else bound)
    assert losses.logit_block_tokens(None, 1, 10, 10) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_gradient_is_autodiffs(dtype):
    """`swiglu` keeps only its inputs for the backward pass; its gradient is the one
    autodiff gives `silu(gate) * up`."""
    import jax

    gate, up, dy = (jax.random.normal(jax.random.key(i), (3, 7, 11), dtype) * 3 for i in range(3))

    def reference(g, u):
        return jax.nn.silu(g) * u

    got_y, got_vjp = jax.vjp(sj.llama.swiglu, gate, up)
    want_y, want_vjp = jax.vjp(reference, gate, up)
    tol = {"float32": 1e-6, "bfloat16": 2e-2}[dtype]
    np.testing.assert_allclose(np.asarray(got_y, np.float32), np.asarray(want_y, np.float32), rtol=tol)
    for got, want in zip(got_vjp(dy), want_vjp(dy)):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=tol, atol=tol)
