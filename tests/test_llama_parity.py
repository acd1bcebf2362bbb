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


def test_remat_policies_give_the_same_logits(tmp_path):
    make_hf_model(tmp_path)
    cfg, params = sj.interop.load_hf(tmp_path)
    ids = jnp.asarray(_ids(1, 9, cfg.vocab_size))
    plain = sj.llama.forward(cfg, params, ids)
    for policy in ("full", "dots", "nothing"):
        np.testing.assert_array_equal(plain, sj.llama.forward(cfg, params, ids, remat=policy))
