"""Every model family against transformers on tiny random checkpoints: logits, the HF round
trip, merged and PEFT exports, greedy KV-cache generation, the rows' gradient, and the
sliding window under packing and TokenTune.

Each family's checkpoint exercises its switches: Qwen2's q/k/v biases with sliding upper
layers, Qwen3's q/k norms with a tied head, Mistral's all-sliding layers, Gemma 3's norm
offset, sandwich norms, GeGLU, scaled embeddings, local/global RoPE (the global one
scaled), final soft-capping and `query_pre_attn_scalar`. The sequences are longer than the
window (5), so a wrong window changes the logits.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import spsft_jax as sj
from conftest import hf_logits, rel_max_err
from spsft_jax import checkpoint, generate, llama, tokentune
from spsft_jax import delta as deltas

WINDOW = 5
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, head_dim=12)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, rope_local_base_freq=100.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_scaling={"rope_type": "linear", "factor": 2.0}, final_logit_softcapping=3.0,
        pad_token_id=0)),
}
IDS = np.random.default_rng(0).integers(1, 128, (2, 12)).astype(np.int32)
MASK = np.array([[1] * 12, [0, 0, 0] + [1] * 9], np.int32)  # left padding on the second row


def make_family_model(folder, family: str, seed: int = 0):
    """Save a random transformers model of `family` (eager attention) to `folder`; return it."""
    import torch
    import transformers

    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**COMMON, **extra)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # norms and biases off their initial values, so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, folder, transformers model, cfg, params) of one family's tiny checkpoint."""
    folder = tmp_path_factory.mktemp(request.param)
    model = make_family_model(folder, request.param)
    cfg, params = sj.interop.load_hf(folder)
    return request.param, folder, model, cfg, params


_forward = jax.jit(llama.forward, static_argnums=0)


def _ours(cfg, params, delta=None, ids=IDS, mask=MASK):
    return np.asarray(_forward(cfg, params, ids, mask, delta))


def _hf_load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def _row_delta(cfg, seed=0, rank=3, scale=0.1):
    """Random nonzero W_f on `rank` rows of every linear of every layer."""
    rng = np.random.default_rng(seed)
    tree = {}
    for path in llama.module_paths("all-linear"):
        d_out, d_in = cfg.linear_shapes()[path[-1]]
        rows = np.stack([np.sort(rng.choice(d_out, rank, replace=False)) for _ in range(cfg.num_layers)])
        w_f = scale * rng.standard_normal((cfg.num_layers, rank, d_in))
        tree.setdefault(path[1], {})[path[2]] = deltas.RowDelta(
            jnp.asarray(rows, jnp.int32), jnp.asarray(w_f, jnp.float32))
    return {"layers": tree}


def test_config_switches(family):
    """The family's switches are on, and the window is where transformers puts it."""
    name, _, model, cfg, _ = family
    assert cfg.model_type == model.config.model_type
    want = [t == "sliding_attention" for t in getattr(model.config, "layer_types", None)
            or ["sliding_attention" if model.config.sliding_window else "full_attention"] * cfg.num_layers]
    assert [t == "sliding_attention" for t in (cfg.layer_types or ["full"] * cfg.num_layers)] == want
    assert any(want) == (name != "qwen3")
    assert cfg.qkv_bias == (name == "qwen2") and cfg.qk_norm == (name in ("qwen3", "gemma3"))
    assert cfg.tie_word_embeddings == model.config.tie_word_embeddings


def test_logits_match_transformers(family):
    _, _, model, cfg, params = family
    ours = _ours(cfg, params)
    theirs = hf_logits(model, IDS, MASK)
    valid = MASK.astype(bool)
    assert rel_max_err(ours[valid], theirs[valid]) < 1e-5


def test_round_trip_is_bit_identical_and_reads_back(family, tmp_path):
    _, folder, model, cfg, params = family
    out = sj.interop.save_hf(tmp_path / "out", cfg, params)
    before, after = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and before[key].tobytes() == after[key].tobytes(), key
    again, _ = sj.interop.load_hf(out)
    assert again == cfg
    valid = MASK.astype(bool)
    assert rel_max_err(hf_logits(_hf_load(out), IDS, MASK)[valid], hf_logits(model, IDS, MASK)[valid]) < 1e-6


def test_merged_and_peft_exports_load_in_transformers(family, tmp_path):
    from peft import PeftModel

    _, folder, _, cfg, params = family
    delta = _row_delta(cfg)
    ours = _ours(cfg, params, delta)
    assert rel_max_err(ours, _ours(cfg, params)) > 1e-3  # the delta matters
    valid = MASK.astype(bool)

    adapter = checkpoint.save_delta(tmp_path / "adapter.safetensors", delta, cfg=cfg)
    merged = sj.interop.save_merged(tmp_path / "merged", cfg, sj.merge(params, delta),
                                    model_dir=folder, adapter_path=adapter)
    assert rel_max_err(hf_logits(_hf_load(merged), IDS, MASK)[valid], ours[valid]) < 1e-5

    peft_dir = sj.interop.save_peft_adapter(tmp_path / "peft", cfg, delta)
    peft_model = PeftModel.from_pretrained(_hf_load(folder), str(peft_dir)).eval()
    assert rel_max_err(hf_logits(peft_model, IDS, MASK)[valid], ours[valid]) < 1e-5


def test_greedy_generation_matches_transformers(family):
    """KV-cache decoding past the window, token for token."""
    import torch

    _, _, model, cfg, params = family
    prompt = IDS[0, :7].tolist()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 7, dtype=torch.long),
                             max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate.generate(cfg, params, [prompt], max_new_tokens=9) == [out[0, 7:].tolist()]


def test_row_gradient_is_the_dense_gradients_rows(family):
    _, _, _, cfg, params = family
    trainable, fixed = deltas.split(_row_delta(cfg))
    trainable = jax.tree.map(jnp.zeros_like, trainable)
    labels = jnp.where(MASK.astype(bool), IDS, -100)

    def loss(params, trainable):
        delta = None if trainable is None else deltas.combine(trainable, fixed)
        logits = llama.forward(cfg, params, IDS, MASK, delta)
        return sj.losses.mean_causal_lm_loss(logits, labels)

    dense = jax.grad(loss)(params, None)
    rows = deltas.combine(jax.grad(loss, argnums=1)(params, trainable), fixed)
    for path, d in deltas.leaves(rows):
        full = sj.trees.get(dense, *path)["weight"]
        wanted = jnp.take_along_axis(full, d.rows[..., None], axis=1)
        np.testing.assert_allclose(d.w_f, wanted, rtol=1e-5, atol=1e-7, err_msg="/".join(path))


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_sliding_window_under_packing_and_tokentune(name, tmp_path):
    """Packed examples longer than the window give each one's own logits; TokenTune's split
    forward (selected and constant tokens attending through the window) equals the plain one."""
    make_family_model(tmp_path, name, seed=1)
    cfg, params = sj.interop.load_hf(tmp_path)
    a, b = IDS[0, :9], IDS[1, 3:10]
    packed = np.concatenate([a, b])[None]
    segments = np.array([[1] * 9 + [2] * 7], np.int32)
    logits = np.asarray(jax.jit(llama.forward, static_argnums=0)(
        cfg, params, packed, None, segment_ids=segments))[0]
    np.testing.assert_allclose(logits[:9], _ours(cfg, params, ids=a[None], mask=None)[0], atol=1e-5)
    np.testing.assert_allclose(logits[9:], _ours(cfg, params, ids=b[None], mask=None)[0], atol=1e-5)

    indices, _ = tokentune.select_tokens(jax.random.key(0), jnp.asarray(MASK), 4)
    split = jax.jit(tokentune.forward, static_argnums=0)(cfg, params, IDS, indices, MASK)
    valid = MASK.astype(bool)
    assert rel_max_err(np.asarray(split)[valid], _ours(cfg, params)[valid]) < 1e-5


def test_exported_config_names_the_family(family, tmp_path):
    _, _, model, cfg, _ = family
    written = sj.interop.config_to_hf(cfg)
    assert written["architectures"] == [type(model).__name__]
    assert sj.interop.config_from_hf(json.loads(json.dumps(written))) == cfg
