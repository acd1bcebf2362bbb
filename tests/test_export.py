"""Getting a trained delta out: merged HF checkpoints, adapter files, PEFT adapters;
each checked against transformers / peft or against our own forward pass."""
from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import spsft_jax as sj
from conftest import hf_logits, make_hf_model, rel_max_err
from spsft_jax import checkpoint, llama
from spsft_jax import delta as deltas

IDS = np.random.default_rng(0).integers(0, 96, (2, 9)).astype(np.int32)
MASK = np.array([[1] * 9, [0, 0] + [1] * 7], np.int32)  # left padding on the second row


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(folder, cfg, params) of a tiny random HF Llama."""
    folder = tmp_path_factory.mktemp("base")
    make_hf_model(folder, seed=1)
    cfg, params = sj.interop.load_hf(folder)
    return folder, cfg, params


def _hf_load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def _ours(cfg, params, delta=None):
    return np.asarray(_forward(cfg, params, delta, IDS, MASK))


_jit_forward = jax.jit(llama.forward, static_argnums=0)


def _forward(cfg, params, delta, ids, mask):
    return _jit_forward(cfg, params, ids, mask, delta)


def _rows(rng, cfg, name, r, *, mask=None, bias=False, scale=0.05):
    """A RowDelta with random nonzero W_f on `r` distinct rows per layer."""
    d_out, d_in = cfg.linear_shapes()[name]
    rows = np.stack([np.sort(rng.choice(d_out, r, replace=False)) for _ in range(cfg.num_layers)])
    w_f = scale * rng.standard_normal((cfg.num_layers, r, d_in))
    if mask is not None:  # padded as selection.select pads: last real row repeated
        mask = np.asarray(mask, bool)
        for layer in range(cfg.num_layers):
            rows[layer, ~mask[layer]] = rows[layer, mask[layer]][-1]
        mask = jnp.asarray(mask)
    b = jnp.asarray(scale * rng.standard_normal((cfg.num_layers, d_out)), jnp.float32) if bias else None
    return deltas.RowDelta(jnp.asarray(rows, jnp.int32), jnp.asarray(w_f, jnp.float32), mask, b)


def _lora(rng, cfg, name, r, alpha):
    d_out, d_in = cfg.linear_shapes()[name]
    a = 0.2 * rng.standard_normal((cfg.num_layers, r, d_in))
    b = 0.2 * rng.standard_normal((cfg.num_layers, d_out, r))  # nonzero, unlike at init
    return deltas.LoraDelta(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), alpha / r)


def spsft_delta(cfg, seed=0, *, bias=False):
    """Rows on attention and MLP modules, of different ranks, one of them masked."""
    rng = np.random.default_rng(seed)
    return {"layers": {
        "self_attn": {"q_proj": _rows(rng, cfg, "q_proj", 3, bias=bias),
                      "k_proj": _rows(rng, cfg, "k_proj", 2),
                      "o_proj": _rows(rng, cfg, "o_proj", 3)},
        "mlp": {"up_proj": _rows(rng, cfg, "up_proj", 4, mask=[[1, 1, 1, 1], [1, 1, 0, 0]]),
                "down_proj": _rows(rng, cfg, "down_proj", 3, bias=bias)},
    }}


def lora_delta(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {"layers": {
        "self_attn": {"q_proj": _lora(rng, cfg, "q_proj", 4, 8.0),
                      "v_proj": _lora(rng, cfg, "v_proj", 4, 8.0)},
        "mlp": {"gate_proj": _lora(rng, cfg, "gate_proj", 2, 16.0),
                "down_proj": _lora(rng, cfg, "down_proj", 4, 8.0)},
    }}


def norm_delta(cfg, params, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32),
                        deltas.norms(params))


def _assert_delta_matters(cfg, params, delta):
    assert rel_max_err(_ours(cfg, params, delta), _ours(cfg, params)) > 1e-3


# --------------------------------------------------------------------------- merged HF export


@pytest.mark.parametrize("kind", ["spsft", "spsft+norms", "spsft+bias", "lora"])
def test_merge_export_reload_in_transformers(tmp_path, base, kind):
    folder, cfg, params = base
    if kind == "spsft+bias":
        folder = tmp_path / "base"
        make_hf_model(folder, seed=2, attention_bias=True, mlp_bias=True)
        cfg, params = sj.interop.load_hf(folder)
    delta = lora_delta(cfg) if kind == "lora" else spsft_delta(cfg, bias=kind == "spsft+bias")
    if kind == "spsft+norms":
        delta = deltas.union(delta, norm_delta(cfg, params))
    _assert_delta_matters(cfg, params, delta)
    ours = _ours(cfg, params, delta)

    merged = sj.merge(params, delta)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    out = sj.interop.save_hf(tmp_path / "merged", cfg, merged)
    model = _hf_load(out)
    assert rel_max_err(hf_logits(model, IDS, MASK), ours) < 1e-5
    # Loading the export back gives the merged parameters exactly.
    _, again = sj.interop.load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, again, merged)


# --------------------------------------------------------------------------- adapter files


def _assert_same_delta(a, b):
    la, lb = deltas.leaves(a), deltas.leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert type(x) is type(y), path
        leaves_x, tree_x = jax.tree.flatten(x)
        leaves_y, tree_y = jax.tree.flatten(y)
        assert tree_x == tree_y, path  # same fields present, same static scale
        for u, v in zip(leaves_x, leaves_y):
            assert np.asarray(u).dtype == np.asarray(v).dtype, path
            np.testing.assert_array_equal(u, v)


def test_adapter_file_round_trip(tmp_path, base):
    _, cfg, params = base
    delta = deltas.union(spsft_delta(cfg, bias=False), norm_delta(cfg, params))
    lora = _lora(np.random.default_rng(5), cfg, "v_proj", 2, alpha=7.0)
    delta["layers"]["self_attn"]["v_proj"] = lora  # 3.5: a scale that is not alpha / r = 1
    path = checkpoint.save_delta(tmp_path / "adapter.safetensors", delta, model="tiny", method="spsft")
    loaded, metadata = checkpoint.load_delta(path)

    assert metadata == {"model": "tiny", "method": "spsft"}
    _assert_same_delta(loaded, delta)
    assert loaded["layers"]["self_attn"]["v_proj"].scale == pytest.approx(3.5)
    assert loaded["layers"]["mlp"]["up_proj"].mask.dtype == np.bool_
    assert loaded["layers"]["self_attn"]["k_proj"].mask is None
    _assert_delta_matters(cfg, params, delta)
    np.testing.assert_array_equal(_ours(cfg, params, loaded), _ours(cfg, params, delta))
    assert not list(tmp_path.glob(".*"))  # no temporary left beside it


def test_adapter_file_overwrite_is_complete(tmp_path, base):
    _, cfg, params = base
    path = tmp_path / "adapter.safetensors"
    checkpoint.save_delta(path, spsft_delta(cfg, seed=1))
    checkpoint.save_delta(path, lora_delta(cfg, seed=2), run="2")
    loaded, metadata = checkpoint.load_delta(path)
    assert metadata == {"run": "2"}
    _assert_same_delta(loaded, lora_delta(cfg, seed=2))


def _junk(path):
    path.write_text("this is not a safetensors file\n")


def _no_metadata(path):
    save_file({"layers/mlp/up_proj/rows": np.zeros((2, 3), np.int32)}, path)


def _unknown_type(path):
    meta = {checkpoint.DELTAS_KEY: json.dumps({"layers/mlp/up_proj": {"type": "Mystery"}})}
    save_file({"layers/mlp/up_proj/rows": np.zeros((2, 3), np.int32)}, path, metadata=meta)


def _stray_tensor(path):
    meta = {checkpoint.DELTAS_KEY: json.dumps({})}
    save_file({"layers/mlp/up_proj/rows": np.zeros((2, 3), np.int32)}, path, metadata=meta)


def _missing_field(path):
    meta = {checkpoint.DELTAS_KEY: json.dumps({"layers/mlp/up_proj": {"type": "RowDelta"}})}
    save_file({"layers/mlp/up_proj/rows": np.zeros((2, 3), np.int32)}, path, metadata=meta)


@pytest.mark.parametrize("make", [_junk, _no_metadata, _unknown_type, _stray_tensor, _missing_field, None],
                         ids=["junk", "no-metadata", "unknown-type", "stray-tensor", "missing-field",
                              "missing-file"])
def test_bad_adapter_file_raises_value_error_naming_it(tmp_path, make):
    path = tmp_path / "bad-adapter.safetensors"
    if make is not None:
        make(path)
    with pytest.raises(ValueError) as info:
        checkpoint.load_delta(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_adapter_is_refused_naming_the_tensor(tmp_path, base, bad):
    _, cfg, params = base
    delta = spsft_delta(cfg)
    w_f = np.array(delta["layers"]["mlp"]["up_proj"].w_f)
    w_f[1, 2, 3] = bad
    delta["layers"]["mlp"]["up_proj"] = delta["layers"]["mlp"]["up_proj"].replace(w_f=jnp.asarray(w_f))
    path = checkpoint.save_delta(tmp_path / "adapter.safetensors", delta, cfg=cfg)

    with pytest.raises(ValueError) as info:
        checkpoint.load_delta(path, cfg=cfg, params=params)
    message = str(info.value)
    assert message.startswith(f"{path}: tensor 'layers/mlp/up_proj/w_f' holds NaN or Inf")
    assert "allow_nonfinite=True" in message and "\n" not in message

    loaded, _ = checkpoint.load_delta(path, cfg=cfg, params=params, allow_nonfinite=True)
    _assert_same_delta(loaded, delta)


def test_adapter_digest_is_the_files_sha256(tmp_path, base, monkeypatch):
    _, cfg, _ = base
    one = checkpoint.save_delta(tmp_path / "one.safetensors", spsft_delta(cfg, seed=1))
    two = checkpoint.save_delta(tmp_path / "two.safetensors", spsft_delta(cfg, seed=2))
    digest = checkpoint.adapter_digest(one)
    assert digest == "sha256:" + hashlib.sha256(one.read_bytes()).hexdigest()
    assert checkpoint.adapter_digest(str(one)) == digest
    (tmp_path / "copy.safetensors").write_bytes(one.read_bytes())
    assert checkpoint.adapter_digest(tmp_path / "copy.safetensors") == digest
    assert checkpoint.adapter_digest(two) != digest
    monkeypatch.setattr(checkpoint, "DIGEST_CHUNK_BYTES", 7)  # many chunks, the last one short
    assert checkpoint.adapter_digest(one) == digest
    with pytest.raises(ValueError, match="missing.safetensors"):
        checkpoint.adapter_digest(tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def merged_once(tmp_path_factory, base):
    """(folder, adapter path, delta) of `base` with an SPSFT adapter merged by `save_merged`."""
    folder, cfg, params = base
    tmp = tmp_path_factory.mktemp("merged-once")
    delta = spsft_delta(cfg, seed=3)
    adapter = checkpoint.save_delta(tmp / "first.safetensors", delta, cfg=cfg)
    out = sj.interop.save_merged(tmp / "merged", cfg, sj.merge(params, delta),
                                 model_dir=folder, adapter_path=adapter)
    return out, adapter, delta


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def test_merged_export_records_its_adapter(tmp_path, base, merged_once):
    folder, cfg, params = base
    out, adapter, delta = merged_once
    digest = checkpoint.adapter_digest(adapter)
    plain = sj.interop.save_hf(tmp_path / "plain", cfg, sj.merge(params, delta))

    key = sj.interop.config.MERGED_ADAPTERS_KEY
    recorded, unrecorded = _config(out), _config(plain)
    assert recorded.pop(key) == [digest] and key not in unrecorded
    assert recorded == unrecorded  # nothing else in config.json changes
    assert sj.interop.merged_adapters(out) == (digest,)
    assert sj.interop.merged_adapters(out / "config.json") == (digest,)
    assert sj.interop.merged_adapters(folder) == sj.interop.merged_adapters(plain) == ()

    # transformers loads the folder as the same model, keeps the record as an attribute,
    # and writes it back when it saves the model.
    model = _hf_load(out)
    assert list(model.config.to_dict()[key]) == [digest]
    logits = hf_logits(model, IDS, MASK)
    np.testing.assert_array_equal(logits, hf_logits(_hf_load(plain), IDS, MASK))
    assert rel_max_err(logits, _ours(cfg, params, delta)) < 1e-5
    model.save_pretrained(tmp_path / "resaved")
    assert sj.interop.merged_adapters(tmp_path / "resaved") == (digest,)

    # ... and so do we.
    cfg2, params2 = sj.interop.load_hf(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, sj.merge(params, delta))


def test_merged_adapter_is_not_applied_twice(tmp_path, base, merged_once):
    folder, cfg, params = base
    out, adapter, delta = merged_once
    with pytest.raises(ValueError) as info:
        sj.interop.check_not_merged(out, adapter)
    message = str(info.value)
    assert message.startswith(f"{adapter}: already merged into {out}")
    assert checkpoint.adapter_digest(adapter) in message and "\n" not in message
    other = checkpoint.save_delta(tmp_path / "other.safetensors", lora_delta(cfg), cfg=cfg)
    sj.interop.check_not_merged(out, other)
    sj.interop.check_not_merged(folder, adapter)

    # save_merged checks before writing anything.
    with pytest.raises(ValueError, match="already merged"):
        sj.interop.save_merged(tmp_path / "twice", cfg, sj.merge(params, delta),
                               model_dir=out, adapter_path=adapter)
    assert not (tmp_path / "twice").exists()


def test_second_merge_carries_both_adapters(tmp_path, merged_once):
    out, first, _ = merged_once
    cfg, params = sj.interop.load_hf(out)
    delta = lora_delta(cfg, seed=4)
    second = checkpoint.save_delta(tmp_path / "second.safetensors", delta, cfg=cfg)
    merged = sj.merge(params, delta)
    digests = (checkpoint.adapter_digest(first), checkpoint.adapter_digest(second))

    twice = sj.interop.save_merged(tmp_path / "twice", cfg, merged, model_dir=out, adapter_path=second)
    assert sj.interop.merged_adapters(twice) == digests
    # The composition save_merged stands for, spelled out with save_hf.
    spelled = sj.interop.save_hf(tmp_path / "spelled", cfg, merged, merged_adapters=(
        sj.interop.merged_adapters(out) + (checkpoint.adapter_digest(second),)))
    assert _config(spelled) == _config(twice)
    for adapter in (first, second):
        with pytest.raises(ValueError, match="already merged"):
            sj.interop.check_not_merged(twice, adapter)


def test_resaving_a_merged_model_keeps_its_record(tmp_path, merged_once):
    out, adapter, _ = merged_once
    cfg, params = sj.interop.load_hf(out)
    digest = checkpoint.adapter_digest(adapter)
    # Converted (here to bfloat16), the weights still hold the adapter: the record follows.
    again = sj.interop.save_hf(tmp_path / "bf16", cfg, params, dtype=jnp.bfloat16)
    assert sj.interop.merged_adapters(again) == (digest,)
    cleared = sj.interop.save_hf(tmp_path / "cleared", cfg, params, merged_adapters=())
    assert sj.interop.merged_adapters(cleared) == ()


@pytest.mark.parametrize("record", [["first.safetensors"], "sha256:abc", [None]],
                         ids=["path", "short", "none"])
def test_save_hf_refuses_what_is_not_a_digest(tmp_path, base, record):
    _, cfg, params = base
    with pytest.raises(ValueError, match="merged_adapters: .* is not an adapter digest"):
        sj.interop.save_hf(tmp_path / "out", cfg, params, merged_adapters=record)
    assert not (tmp_path / "out").exists()


def test_malformed_record_is_refused_naming_the_file(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({sj.interop.config.MERGED_ADAPTERS_KEY: "sha256:" + "0" * 64}))
    with pytest.raises(ValueError) as info:
        sj.interop.merged_adapters(tmp_path)
    assert str(info.value).startswith(f"{config}: ") and "\n" not in str(info.value)


# --------------------------------------------------------------------------- PEFT adapters


def _peft_logits(base_folder, adapter_folder):
    from peft import PeftModel

    model = PeftModel.from_pretrained(_hf_load(base_folder), str(adapter_folder)).eval()
    return hf_logits(model, IDS, MASK)


@pytest.mark.parametrize("kind", ["spsft", "lora"])
def test_peft_adapter_matches_our_forward(tmp_path, base, kind):
    folder, cfg, params = base
    delta = spsft_delta(cfg) if kind == "spsft" else lora_delta(cfg)
    _assert_delta_matters(cfg, params, delta)
    out = sj.interop.save_peft_adapter(tmp_path / "adapter", cfg, delta)

    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {path[-1]: (d.w_f.shape[-2] if kind == "spsft" else d.a.shape[-2])
             for path, d in deltas.leaves(delta)}
    assert sorted(config["target_modules"]) == sorted(ranks)
    assert {n: config["rank_pattern"].get(n, config["r"]) for n in ranks} == ranks
    assert len(set(ranks.values())) > 1  # different ranks: the patterns are exercised
    assert config["base_model_name_or_path"] == str(folder)

    assert rel_max_err(_peft_logits(folder, out), _ours(cfg, params, delta)) < 1e-5


@pytest.mark.parametrize("where", ["layer-norm", "final-norm"])
def test_peft_refuses_norm_delta(tmp_path, base, where):
    _, cfg, params = base
    norms = norm_delta(cfg, params)
    extra = ({"layers": {"input_layernorm": norms["layers"]["input_layernorm"]}}
             if where == "layer-norm" else {"norm": norms["norm"]})
    delta = deltas.union(spsft_delta(cfg), extra)
    with pytest.raises(ValueError, match="norm") as info:
        sj.interop.save_peft_adapter(tmp_path / "adapter", cfg, delta)
    assert "save_hf" in str(info.value) or "linear" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_peft_refuses_row_bias(tmp_path, base):
    _, cfg, _ = base
    delta = spsft_delta(cfg, bias=True)
    with pytest.raises(ValueError, match="save_hf"):
        sj.interop.save_peft_adapter(tmp_path / "adapter", cfg, delta)
    assert list(tmp_path.iterdir()) == []
