"""KV-cache generation against `llama.forward` and against transformers' `generate`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_model, rel_max_err
from spsft_jax import data, generate, interop, llama

EOS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen-tiny")
    model = make_hf_model(folder, seed=3)
    cfg, params = interop.load_hf(folder)
    return model, cfg, params


def _hf_greedy(model, prompt, max_new_tokens):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(EOS)] if EOS in new else new


def test_cached_logits_equal_forward(tiny):
    """Prefill part of a left-padded batch, then one token at a time: every step's logits
    equal the full forward pass's at that position (with a trained-looking delta)."""
    from spsft_jax import delta as deltas

    _, cfg, params = tiny
    rows = {"layers": {"mlp": {"up_proj": {"rows": np.tile(np.array([1, 5, 9], np.int32), (cfg.num_layers, 1))}}}}
    delta = deltas.rows_from_selection(params, rows)
    delta = jax.tree.map(lambda x: x + 0.05 if x.dtype == jnp.float32 else x, delta)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # the second row is left-padded
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    ref = np.asarray(llama.forward(cfg, params, ids, mask, delta, position_ids=positions))
    assert rel_max_err(ref, llama.forward(cfg, params, ids, mask, position_ids=positions)) > 1e-3

    cache = generate.init_cache(cfg, 2, 12)
    valid = jnp.asarray(mask, bool)
    h, cache = generate.extend(cfg, params, cache, ids[:, :7], positions[:, :7], 0, valid, delta)
    got = [llama.head(cfg, params, h, delta)]
    for t in range(7, 12):
        h, cache = generate.extend(cfg, params, cache, ids[:, t:t + 1], positions[:, t:t + 1], t, valid, delta)
        got.append(llama.head(cfg, params, h, delta))
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    real = mask.astype(bool)
    assert rel_max_err(got[real], ref[real]) < 1e-5


def test_greedy_equals_transformers_single_and_batched(tiny):
    """Prompts alone and together (left-padded to one batch) give transformers' greedy tokens."""
    model, cfg, params = tiny
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 11, 17)]
    expected = [_hf_greedy(model, p, 12) for p in prompts]
    assert any(len(e) == 12 for e in expected)
    for prompt, want in zip(prompts, expected):
        assert generate.generate(cfg, params, [prompt], max_new_tokens=12, stop_ids=EOS) == [want]
    assert generate.generate(cfg, params, prompts, max_new_tokens=12, stop_ids=EOS) == expected
    # `greedy` (the older name) is the same decoding.
    assert generate.greedy(cfg, params, prompts, max_new_tokens=12, eos_token_id=EOS) == expected


def test_stops_at_any_stop_id(tiny):
    _, cfg, params = tiny
    prompt = list(range(3, 10))
    full = generate.generate(cfg, params, [prompt], max_new_tokens=10)[0]
    assert len(full) == 10
    stop = full[4]
    first = full.index(stop)
    assert generate.generate(cfg, params, [prompt], max_new_tokens=10, stop_ids=(EOS, stop)) == [full[:first]]


def test_sampling_is_seeded_and_stays_in_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 512))
    draw = lambda seed, top_p, temp=1.0: np.asarray(generate.pick_token(
        logits, jax.random.key(seed), jnp.float32(temp), jnp.float32(top_p), sample=True))
    np.testing.assert_array_equal(draw(0, 0.7), draw(0, 0.7))
    assert set(draw(0, 0.7).tolist()) == {0, 1}         # 0.5 + 0.3 reaches 0.7
    assert set(draw(1, 1.0).tolist()) == {0, 1, 2, 3}
    assert set(draw(2, 0.1).tolist()) == {0}
    np.testing.assert_array_equal(  # a low temperature is greedy
        draw(3, 1.0, 1e-4), np.asarray(generate.pick_token(logits, None, None, None, sample=False)))


def test_sampled_generation_is_reproducible(tiny):
    _, cfg, params = tiny
    prompt = [list(range(3, 9))]
    a = generate.generate(cfg, params, prompt, max_new_tokens=8, temperature=1.0, seed=5)
    b = generate.generate(cfg, params, prompt, max_new_tokens=8, temperature=1.0, seed=5)
    c = generate.generate(cfg, params, prompt, max_new_tokens=8, temperature=1.0, seed=6)
    assert a == b and a != c


def test_greedy_chat_equals_transformers_on_smollm2(smollm2_dir):
    """SmolLM2-135M-Instruct, a chat prompt through its template: 16 greedy tokens as transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = data.load_tokenizer(smollm2_dir)
    tokens = data.special_tokens(tokenizer, smollm2_dir)
    prompt = data.chat_prompt(tokenizer, "Explain in one sentence what a Python list is.")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    expected = out[0, len(prompt):].tolist()
    expected = expected[:min([expected.index(s) for s in tokens.stop if s in expected] or [16])]
    cfg, params = interop.load_hf(smollm2_dir)
    ours = generate.generate(cfg, params, [prompt], max_new_tokens=16, stop_ids=tokens.stop, pad_id=tokens.pad)[0]
    assert len(expected) >= 12 and ours == expected, (tokenizer.decode(ours), tokenizer.decode(expected))
