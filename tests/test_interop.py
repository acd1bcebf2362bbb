"""HF checkpoint folders in and out (`spsft_jax.interop`), checked against transformers."""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import spsft_jax as sj
from spsft_jax.trees import leaf_paths
from conftest import hf_logits, make_hf_model

hf_io = sj.interop.hf

ROUND_TRIP_VARIANTS = {
    "plain": dict(),
    "tied": dict(tie_word_embeddings=True),
    "bias": dict(attention_bias=True, mlp_bias=True),
}


def _ids(batch=2, seq=11, vocab=96, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


def _st_tensors(folder) -> dict[str, np.ndarray]:
    """Every tensor of every safetensors file in `folder` (single file or shards)."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                assert name not in out, f"{name} stored twice"
                out[name] = f.get_tensor(name)
    return out


def _assert_bit_identical(a: np.ndarray, b: np.ndarray, what=""):
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                          np.ascontiguousarray(b).view(np.uint8)), what


def _assert_same_params(p, q):
    pa, pb = dict(leaf_paths(p)), dict(leaf_paths(q))
    assert pa.keys() == pb.keys()
    for path in pa:
        _assert_bit_identical(np.asarray(pa[path]), np.asarray(pb[path]), "/".join(path))


def _hf_load(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **kwargs).eval()


def _torch_to_np(t):
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _write_bin(folder, state, name="pytorch_model.bin", **kwargs):
    import torch

    torch.save(state, Path(folder) / name, **kwargs)


def _copy_config(src, dst):
    Path(dst).mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(src) / "config.json", Path(dst) / "config.json")


def _error_message(excinfo) -> str:
    """The message, which must be one line (one clear error, no wall of text)."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("variant", sorted(ROUND_TRIP_VARIANTS))
def test_round_trip_is_bit_identical(tmp_path, variant):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = make_hf_model(src, **ROUND_TRIP_VARIANTS[variant])
    cfg, params = sj.interop.load_hf(src)
    assert cfg.tie_word_embeddings == (variant == "tied")
    assert ("lm_head" in params) == (variant != "tied")
    sj.interop.save_hf(dst, cfg, params)

    before, after = _st_tensors(src), _st_tensors(dst)
    assert sorted(before) == sorted(after)
    for name in before:
        _assert_bit_identical(before[name], after[name], name)

    # The export loads back as the same config and parameters.
    cfg2, params2 = sj.interop.load_hf(dst)
    assert cfg2 == cfg
    _assert_same_params(params, params2)

    # transformers reads the export as the same model: exactly the same logits.
    reloaded = _hf_load(dst)
    assert reloaded.config.tie_word_embeddings == (variant == "tied")
    if variant == "tied":
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = _ids()
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(model, ids))


def test_sharded_save_and_load(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = make_hf_model(src)
    cfg, params = sj.interop.load_hf(src)
    limit = 20_000
    sj.interop.save_hf(dst, cfg, params, max_shard_size=limit)

    shards = sorted(dst.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert not (dst / "model.safetensors").exists()
    index = json.loads((dst / hf_io.SAFETENSORS_INDEX).read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == set(_st_tensors(src))
    assert {dst / f for f in weight_map.values()} == set(shards)
    tensors = _st_tensors(dst)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for shard in shards:  # each shard within the limit unless it is one big tensor
        with safe_open(shard, framework="numpy") as f:
            names = list(f.keys())
            assert weight_map.keys() >= set(names)
            assert all(weight_map[n] == shard.name for n in names)
            size = sum(f.get_tensor(n).nbytes for n in names)
        assert size <= limit or len(names) == 1

    _, params2 = sj.interop.load_hf(dst)
    _assert_same_params(params, params2)
    ids = _ids()
    np.testing.assert_array_equal(hf_logits(_hf_load(dst), ids), hf_logits(model, ids))


def test_loads_transformers_sharded_checkpoint(tmp_path):
    model = make_hf_model(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / hf_io.SAFETENSORS_INDEX).exists()
    _, single = sj.interop.load_hf(tmp_path / "single")
    _, sharded = sj.interop.load_hf(tmp_path / "sharded")
    _assert_same_params(single, sharded)


def test_size_strings():
    assert sj.interop.parse_size(123) == 123
    assert sj.interop.parse_size("5GB") == 5 * 10**9
    assert sj.interop.parse_size("2GiB") == 2 * 2**30
    assert sj.interop.parse_size("500 MB") == 500 * 10**6
    assert sj.interop.parse_size("20KB") == 20_000
    with pytest.raises(ValueError, match="max_shard_size"):
        sj.interop.parse_size("lots")


# --------------------------------------------------------------------------- pytorch_model.bin


def test_pytorch_bin_loads_like_safetensors(tmp_path):
    model = make_hf_model(tmp_path / "st", **ROUND_TRIP_VARIANTS["bias"])
    _, reference = sj.interop.load_hf(tmp_path / "st")

    single = tmp_path / "bin"
    _copy_config(tmp_path / "st", single)
    _write_bin(single, model.state_dict())
    _, params = sj.interop.load_hf(single)
    _assert_same_params(reference, params)

    # Sharded: pytorch_model-0000k-of-00003.bin files and their index.
    sharded = tmp_path / "bin-sharded"
    _copy_config(tmp_path / "st", sharded)
    items = list(model.state_dict().items())
    weight_map = {}
    for k in range(3):
        file = f"pytorch_model-{k + 1:05d}-of-00003.bin"
        part = dict(items[k::3])
        _write_bin(sharded, part, file)
        weight_map.update(dict.fromkeys(part, file))
    (sharded / hf_io.BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, params = sj.interop.load_hf(sharded)
    _assert_same_params(reference, params)


def test_pytorch_bin_of_parameters_and_legacy_format(tmp_path):
    """A dict of nn.Parameters (requires_grad) and the pre-zip torch.save format both load."""
    model = make_hf_model(tmp_path / "st")
    _, reference = sj.interop.load_hf(tmp_path / "st")

    as_params = tmp_path / "params"
    _copy_config(tmp_path / "st", as_params)
    _write_bin(as_params, dict(model.named_parameters()))
    _, params = sj.interop.load_hf(as_params)
    _assert_same_params(reference, params)

    legacy = tmp_path / "legacy"
    _copy_config(tmp_path / "st", legacy)
    _write_bin(legacy, model.state_dict(), _use_new_zipfile_serialization=False)
    _, params = sj.interop.load_hf(legacy)
    _assert_same_params(reference, params)


def test_bf16_pytorch_bin(tmp_path):
    model = make_hf_model(tmp_path / "st", dtype="bfloat16")
    _, reference = sj.interop.load_hf(tmp_path / "st")
    folder = tmp_path / "bin"
    _copy_config(tmp_path / "st", folder)
    _write_bin(folder, model.state_dict())
    _, params = sj.interop.load_hf(folder)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    _assert_same_params(reference, params)


def test_safetensors_preferred_over_bin(tmp_path):
    """With both formats in a folder, the safetensors weights are read (as transformers does)."""
    folder = tmp_path / "both"
    make_hf_model(folder, seed=0)
    _, reference = sj.interop.load_hf(folder)
    other = make_hf_model(tmp_path / "other", seed=1)
    items = list(other.state_dict().items())
    weight_map = {}
    for k in range(2):
        part = dict(items[k::2])
        _write_bin(folder, part, f"pytorch_model-{k + 1:05d}-of-00002.bin")
        weight_map.update(dict.fromkeys(part, f"pytorch_model-{k + 1:05d}-of-00002.bin"))
    (folder / hf_io.BIN_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    _, params = sj.interop.load_hf(folder)
    _assert_same_params(reference, params)


# --------------------------------------------------------------------------- dtypes


def test_bf16_checkpoint_dtype_preserved_or_converted(tmp_path):
    src = tmp_path / "src"
    make_hf_model(src, dtype="bfloat16")
    stored = _st_tensors(src)
    assert {t.dtype for t in stored.values()} == {np.dtype(ml_dtypes.bfloat16)}

    cfg, params = sj.interop.load_hf(src)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    _assert_bit_identical(np.asarray(params["layers"]["mlp"]["up_proj"]["weight"][1]),
                          stored["model.layers.1.mlp.up_proj.weight"])

    _, params32 = sj.interop.load_hf(src, dtype=jnp.float32)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params32)} == {jnp.dtype(jnp.float32)}
    for (path, a), (_, b) in zip(leaf_paths(params), leaf_paths(params32)):
        np.testing.assert_array_equal(np.asarray(a).astype(np.float32), np.asarray(b), "/".join(path))

    # bf16 params saved with dtype=None stay bf16, bit for bit.
    sj.interop.save_hf(tmp_path / "kept", cfg, params)
    for name, t in _st_tensors(tmp_path / "kept").items():
        _assert_bit_identical(t, stored[name], name)
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["dtype"] == "bfloat16"

    # float32 params written as bf16 round back to the same bf16 values transformers has.
    import torch

    sj.interop.save_hf(tmp_path / "cast", cfg, params32, dtype=jnp.bfloat16)
    for name, t in _st_tensors(tmp_path / "cast").items():
        _assert_bit_identical(t, stored[name], name)
    assert json.loads((tmp_path / "cast" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = _hf_load(tmp_path / "cast", dtype=torch.bfloat16)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    for name, p in reloaded.state_dict().items():
        if name in stored:
            _assert_bit_identical(_torch_to_np(p), stored[name], name)
    # Compared with transformers' own load of the source: make_hf_model's in-memory model
    # was cast with .to(bfloat16), which also casts its rotary buffer; from_pretrained does not.
    ids = _ids()
    original = _hf_load(src, dtype=torch.bfloat16)
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(original, ids))


def test_float32_params_exported_as_float32(tmp_path):
    make_hf_model(tmp_path / "src")
    cfg, params = sj.interop.load_hf(tmp_path / "src", dtype="bfloat16")
    assert params["norm"]["weight"].dtype == jnp.bfloat16
    sj.interop.save_hf(tmp_path / "out", cfg, params, dtype=jnp.float32)
    assert {t.dtype for t in _st_tensors(tmp_path / "out").values()} == {np.dtype(np.float32)}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_unsupported_dtype_is_refused(tmp_path):
    make_hf_model(tmp_path)
    with pytest.raises(ValueError, match="float64") as err:
        sj.interop.load_hf(tmp_path, dtype=np.float64)
    assert "bfloat16" in _error_message(err)


# --------------------------------------------------------------------------- tokenizer


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["the quick brown fox", "jumps over the lazy dog", "hello world"],
        trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"]),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                   bos_token="<s>", eos_token="</s>")


TEXT = "the lazy fox says hello to the world"


def test_tokenizer_files_copied_on_export(tmp_path):
    from transformers import AutoTokenizer

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_hf_model(src)
    _tiny_tokenizer().save_pretrained(src)
    expected = AutoTokenizer.from_pretrained(src)(TEXT)["input_ids"]
    assert len(set(expected)) > 3  # a real vocabulary, not all unknown

    cfg, params = sj.interop.load_hf(src)
    sj.interop.save_hf(dst, cfg, params)
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (dst / "tokenizer_config.json").is_file()
    assert (dst / "generation_config.json").is_file()
    assert AutoTokenizer.from_pretrained(dst)(TEXT)["input_ids"] == expected

    # Explicit tokenizer_from, when the config's folder has none.
    bare = tmp_path / "bare"
    make_hf_model(bare)
    cfg_bare, params_bare = sj.interop.load_hf(bare)
    sj.interop.save_hf(tmp_path / "explicit", cfg_bare, params_bare, tokenizer_from=src)
    assert AutoTokenizer.from_pretrained(tmp_path / "explicit")(TEXT)["input_ids"] == expected
    sj.interop.save_hf(tmp_path / "none", cfg_bare, params_bare)
    assert not (tmp_path / "none" / "tokenizer.json").exists()
    with pytest.raises(FileNotFoundError, match="tokenizer_from"):
        sj.interop.save_hf(tmp_path / "typo", cfg_bare, params_bare, tokenizer_from=tmp_path / "srcc")
    assert not (tmp_path / "typo").exists()

    # Saving over the source folder (not ours: asked for explicitly) keeps its tokenizer.
    sj.interop.save_hf(src, cfg, params, overwrite=True)
    assert AutoTokenizer.from_pretrained(src)(TEXT)["input_ids"] == expected


# --------------------------------------------------------------------------- bad input


def _edit_config(folder, **changes):
    path = Path(folder) / "config.json"
    hf = json.loads(path.read_text())
    hf.update(changes)
    path.write_text(json.dumps(hf))


def test_missing_config(tmp_path):
    make_hf_model(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError) as err:
        sj.interop.load_hf(tmp_path)
    assert str(tmp_path / "config.json") in _error_message(err)


def test_invalid_json_config(tmp_path):
    make_hf_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as err:
        sj.interop.load_hf(tmp_path)
    assert "config.json" in _error_message(err)


def test_wrong_model_type(tmp_path):
    make_hf_model(tmp_path)
    _edit_config(tmp_path, model_type="phi3")
    with pytest.raises(ValueError) as err:
        sj.interop.load_hf(tmp_path)
    msg = _error_message(err)
    assert "model_type='phi3'" in msg and "'llama'" in msg and "'gemma3_text'" in msg


@pytest.mark.parametrize("change,named", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(sliding_window=4096), "sliding_window"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "yarn"),
])
def test_unsupported_config_attribute(tmp_path, change, named):
    make_hf_model(tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(ValueError) as err:
        sj.interop.load_hf(tmp_path)
    assert named in _error_message(err)


def test_missing_required_config_attribute(tmp_path):
    make_hf_model(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="hidden_size") as err:
        sj.interop.load_hf(tmp_path)
    _error_message(err)


def _rewrite_safetensors(folder, edit):
    file = Path(folder) / "model.safetensors"
    tensors = _st_tensors(folder)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
    make_hf_model(tmp_path)
    _rewrite_safetensors(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing tensor") as err:
        sj.interop.load_hf(tmp_path)
    assert "model.layers.1.mlp.up_proj.weight" in _error_message(err)


def test_misshaped_tensor(tmp_path):
    make_hf_model(tmp_path)

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)

    _rewrite_safetensors(tmp_path, shrink)
    with pytest.raises(ValueError) as err:
        sj.interop.load_hf(tmp_path)
    msg = _error_message(err)
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert "(8, 32)" in msg and "(16, 32)" in msg


def test_unexpected_tensor(tmp_path):
    make_hf_model(tmp_path)
    _rewrite_safetensors(tmp_path, lambda t: t.update({"model.layers.2.mlp.up_proj.weight":
                                                       np.zeros((64, 32), np.float32)}))
    with pytest.raises(ValueError, match="unexpected tensor") as err:
        sj.interop.load_hf(tmp_path)
    assert "model.layers.2.mlp.up_proj.weight" in _error_message(err)


class Payload:
    """Stands for whatever code a malicious pickle would run."""

    def __init__(self):
        self.value = 42


@pytest.mark.parametrize("wrap", ["dict", "ordered-dict", "top-level"])
def test_pickle_with_objects_is_refused(tmp_path, wrap):
    import torch

    model = make_hf_model(tmp_path / "st")
    folder = tmp_path / "bin"
    _copy_config(tmp_path / "st", folder)
    state = model.state_dict()
    if wrap == "dict":
        state = {**state, "extra": Payload()}
    elif wrap == "ordered-dict":
        state = collections.OrderedDict(state)
        state["extra"] = Payload()
    else:
        state = Payload()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refused") as err:
        sj.interop.load_hf(folder)
    msg = _error_message(err)
    assert "Payload" in msg and "pytorch_model.bin" in msg
    assert "\x1b" not in msg  # no terminal escapes from torch's message


def test_bin_with_non_tensor_entry(tmp_path):
    model = make_hf_model(tmp_path / "st")
    folder = tmp_path / "bin"
    _copy_config(tmp_path / "st", folder)
    _write_bin(folder, {**model.state_dict(), "step": 3})
    with pytest.raises(ValueError) as err:
        sj.interop.load_hf(folder)
    msg = _error_message(err)
    assert "'step'" in msg and "int" in msg


def test_bin_that_is_not_a_dict(tmp_path):
    model = make_hf_model(tmp_path / "st")
    folder = tmp_path / "bin"
    _copy_config(tmp_path / "st", folder)
    _write_bin(folder, list(model.state_dict().values()))
    with pytest.raises(ValueError, match="dict of tensors") as err:
        sj.interop.load_hf(folder)
    _error_message(err)


@pytest.mark.parametrize("content", ["empty", "truncated", "garbage", "garbage-global"])
def test_bin_that_is_not_a_checkpoint(tmp_path, content):
    import torch

    make_hf_model(tmp_path / "st")
    folder = tmp_path / "bin"
    _copy_config(tmp_path / "st", folder)
    file = folder / "pytorch_model.bin"
    if content == "truncated":
        torch.save({"x": torch.ones(1000)}, file)
        file.write_bytes(file.read_bytes()[:2000])
    else:
        file.write_bytes({"empty": b"", "garbage": b"\x00\x01 garbage" * 10,
                          # "c" is pickle's GLOBAL opcode: read as a (refused) import
                          "garbage-global": b"certainly not a pickle" * 50}[content])
    with pytest.raises(ValueError) as err:
        sj.interop.load_hf(folder)
    msg = _error_message(err)
    assert str(file) in msg
    assert ("refused" if content.startswith("garbage") else "not a readable") in msg
    assert len(msg) < len(str(file)) + 300


def test_no_weights(tmp_path):
    make_hf_model(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights") as err:
        sj.interop.load_hf(tmp_path)
    assert "model.safetensors" in _error_message(err)


def test_index_names_missing_shard(tmp_path):
    model = make_hf_model(tmp_path / "single")
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    os.remove(victim)
    with pytest.raises(FileNotFoundError) as err:
        sj.interop.load_hf(folder)
    assert victim.name in _error_message(err)


# --------------------------------------------------------------------------- atomic writes


def _drop_leaf(params):
    params = jax.tree_util.tree_map(lambda x: x, params)
    del params["layers"]["mlp"]["down_proj"]
    return params


def test_failed_save_leaves_nothing(tmp_path):
    make_hf_model(tmp_path / "src")
    cfg, params = sj.interop.load_hf(tmp_path / "src")
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    with pytest.raises(ValueError, match="down_proj") as err:
        sj.interop.save_hf(out_parent / "model", cfg, _drop_leaf(params))
    _error_message(err)
    assert os.listdir(out_parent) == []


def test_save_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    make_hf_model(tmp_path / "src")
    cfg, params = sj.interop.load_hf(tmp_path / "src")
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    real_save, calls = hf_io.save_file, []

    def failing_save(tensors, file, **kwargs):
        calls.append(file)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save(tensors, file, **kwargs)

    monkeypatch.setattr(hf_io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        sj.interop.save_hf(out_parent / "model", cfg, params, max_shard_size="20KB")
    assert len(calls) == 3
    assert os.listdir(out_parent) == []

    # A failure while replacing an existing folder leaves the old one as it was.
    monkeypatch.setattr(hf_io, "save_file", real_save)
    sj.interop.save_hf(out_parent / "model", cfg, params)
    before = {p.name: p.read_bytes() for p in (out_parent / "model").iterdir()}
    calls.clear()
    monkeypatch.setattr(hf_io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        sj.interop.save_hf(out_parent / "model", cfg, params, max_shard_size="20KB")
    assert os.listdir(out_parent) == ["model"]
    assert {p.name: p.read_bytes() for p in (out_parent / "model").iterdir()} == before


def test_save_replaces_existing_folder(tmp_path):
    make_hf_model(tmp_path / "a", seed=0)
    make_hf_model(tmp_path / "b", seed=1)
    cfg, params_a = sj.interop.load_hf(tmp_path / "a")
    _, params_b = sj.interop.load_hf(tmp_path / "b")
    out_parent = tmp_path / "out"
    out = out_parent / "model"
    sj.interop.save_hf(out, cfg, params_a, max_shard_size="20KB")
    (out / "stale.txt").write_text("from an earlier run")
    assert (out / hf_io.SAFETENSORS_INDEX).exists()

    with pytest.raises(ValueError, match="stale.txt"):  # a file we did not write: refused
        sj.interop.save_hf(out, cfg, params_b)
    sj.interop.save_hf(out, cfg, params_b, overwrite=True)  # unsharded this time
    # Our old shards and index are gone; the file we did not write stays.
    assert sorted(os.listdir(out)) == [".spsft-jax.json", "config.json", "generation_config.json",
                                       "model.safetensors", "stale.txt"]
    assert os.listdir(out_parent) == ["model"]  # no temp or old folder left beside it
    _, reloaded = sj.interop.load_hf(out)
    _assert_same_params(params_b, reloaded)


def test_save_over_a_file_is_refused(tmp_path):
    make_hf_model(tmp_path / "src")
    cfg, params = sj.interop.load_hf(tmp_path / "src")
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(ValueError, match="not a folder"):
        sj.interop.save_hf(tmp_path / "taken", cfg, params)
    assert (tmp_path / "taken").read_text() == "not a folder"
    assert sorted(os.listdir(tmp_path)) == ["src", "taken"]


# --------------------------------------------------------------------------- config.json schema

hf_config = sj.interop.config
BASE_CONFIG = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("model_type,config_class", [
    ("llama", "LlamaConfig"), ("mistral", "MistralConfig"), ("qwen2", "Qwen2Config"),
    ("qwen3", "Qwen3Config"), ("gemma3_text", "Gemma3TextConfig")])
def test_every_key_of_each_family_config_is_read_or_ignored(model_type, config_class):
    """transformers' own defaults, per family: each key is one we read, check or pass over
    on purpose, the config they describe is the one transformers builds, and the family's
    defaults for absent keys are its config class's."""
    import transformers

    theirs = getattr(transformers, config_class)()
    hf = theirs.to_dict()
    family = hf_config.FAMILIES[model_type]
    assert [k for k in hf if k not in family.known_keys() | {"model_type"} and not k.startswith("_")] == []
    cfg = sj.interop.config_from_hf(hf)
    assert cfg == sj.interop.config_from_hf({"model_type": model_type, **{
        k: hf[k] for k in hf_config.REQUIRED}}), "absent keys read as transformers' defaults"
    for key, (field, _) in (hf_config.FIELDS | dict(family.fields)).items():
        if hasattr(theirs, key):
            want = getattr(theirs, key)
            assert getattr(cfg, field) == (tuple(want) if isinstance(want, list) else want), key
    rope = theirs.rope_parameters.get("full_attention", theirs.rope_parameters)
    assert cfg.rope_theta == rope["rope_theta"] and cfg.rope_scaling is None
    sliding = [t == "sliding_attention" for t in getattr(theirs, "layer_types", None) or
               ["sliding_attention" if getattr(theirs, "sliding_window", None) else "full_attention"]
               * cfg.num_layers]
    assert [t == "sliding_attention" for t in cfg.layer_types or ["full"] * cfg.num_layers] == sliding


@pytest.mark.parametrize("extra", [
    {"_name_or_path": "a/b", "_model_name_or_path": "c", "_commit_hash": "0" * 40},
    {"transformers_version": "4.45.2", "torch_dtype": "bfloat16", "dtype": "bfloat16"},
    {"use_cache": False, "architectures": ["LlamaForCausalLM"], "initializer_range": 0.01},
    {"unk_token_id": 0, "sep_token_id": None, "decoder_start_token_id": None},
    {"temperature": 0.6, "top_p": 0.9, "max_length": 4096, "do_sample": True},
    {"pretraining_tp": 2, "attention_dropout": 0.1},
    {"use_sliding_window": False, "sliding_window": 4096},
    {"sliding_window": None, "quantization_config": None, "rope_scaling": None},
], ids=lambda d: ",".join(d))
def test_metadata_keys_pass(extra):
    assert sj.interop.config_from_hf({**BASE_CONFIG, **extra}) == sj.interop.config_from_hf(BASE_CONFIG)


@pytest.mark.parametrize("change,named", [
    (dict(model_type="phi3"), "model_type"),
    (dict(model_type="gemma3"), "gemma3_text"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(sliding_window=4096), "sliding_window"),
    (dict(use_sliding_window=True, sliding_window=4096), "sliding_window"),
    (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
     "quantization_config"),
    (dict(auto_map={"AutoModelForCausalLM": "modeling.MyLlama"}), "auto_map"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "yarn"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "dynamic"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                           "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 32}), "beta_fast"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_unsupported_feature_is_refused_naming_the_key(change, named):
    with pytest.raises(ValueError) as err:
        sj.interop.config_from_hf({**BASE_CONFIG, **change}, source="x/config.json")
    msg = _error_message(err)
    assert named in msg and msg.startswith("x/config.json: ")


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("legacy,current", [
    (dict(rope_theta=5e5, rope_scaling=LLAMA3_ROPE),
     dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 5e5})),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}),
     dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})),
    (dict(rope_theta=2e4), dict(rope_parameters={"rope_type": "default", "rope_theta": 2e4})),
], ids=["llama3", "linear", "default"])
def test_rope_from_both_generations_of_transformers(legacy, current):
    from transformers import LlamaConfig

    ours = sj.interop.config_from_hf({**BASE_CONFIG, **legacy})
    assert ours == sj.interop.config_from_hf({**BASE_CONFIG, **current})
    # and transformers reads the legacy form as the same rope
    theirs = LlamaConfig(**BASE_CONFIG | legacy, max_position_embeddings=128).rope_parameters
    assert ours.rope_theta == theirs["rope_theta"]
    assert (ours.rope_scaling.rope_type if ours.rope_scaling else "default") == theirs["rope_type"]


@pytest.mark.parametrize("change", [
    dict(), dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 5e5}),
    dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), dict(tie_word_embeddings=True),
    dict(attention_bias=True, mlp_bias=True, head_dim=12), dict(eos_token_id=[2, 5], bos_token_id=1),
], ids=["plain", "llama3", "linear", "tied", "bias-head-dim", "eos-list"])
def test_exported_config_reads_the_same_in_transformers(change):
    """config_to_hf -> transformers -> config_from_hf gives the config back, and the
    legacy keys (rope_scaling, top-level rope_theta) say what rope_parameters says."""
    from transformers import LlamaConfig

    cfg = sj.interop.config_from_hf({**BASE_CONFIG, "max_position_embeddings": 128, **change})
    written = sj.interop.config_to_hf(cfg)
    theirs = LlamaConfig.from_dict(json.loads(json.dumps(written)))
    assert sj.interop.config_from_hf(theirs.to_dict()) == cfg
    legacy = {k: v for k, v in written.items() if k != "rope_parameters"}
    assert sj.interop.config_from_hf(legacy) == cfg
    assert LlamaConfig.from_dict(legacy).rope_parameters == theirs.rope_parameters


# --------------------------------------------------------------------------- GGUF in


def _llama_cpp_permute(w, heads):
    """llama.cpp's q/k row order: each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, model=None, arch="llama", extra_tensors=()):
    """A float32 GGUF of `model` (a transformers Llama) as llama.cpp lays it out."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    if model is not None:
        c = model.config
        writer.add_block_count(c.num_hidden_layers)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
        writer.add_vocab_size(c.vocab_size)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            module, kind = name.rsplit(".", 1)
            array = tensor.numpy()
            if module.rsplit(".", 1)[-1] in heads:
                array = _llama_cpp_permute(array, heads[module.rsplit(".", 1)[-1]])
            writer.add_tensor(f"{names.get_name(module)}.{kind}", array)
    for name, array in extra_tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "tied"])
def test_load_gguf_equals_transformers_gguf_loader(variant, tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import VARIANTS

    model = make_hf_model(tmp_path / "hf", **VARIANTS[variant])
    file = _write_gguf(tmp_path / "model.gguf", model)
    cfg, params = sj.interop.load_gguf(file)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name)
    hf = theirs.config.to_dict()
    assert hf.pop("quantization_config")["quant_method"] == "gguf"  # dequantized on load
    assert cfg == sj.interop.config_from_hf(hf)
    original = model.state_dict()
    for name, (path, layer) in sj.interop.hf_names(cfg).items():
        leaf = dict(leaf_paths(params))[path]
        ours = np.asarray(leaf if layer is None else leaf[layer])
        _assert_bit_identical(ours, theirs.state_dict()[name].numpy(), name)
        _assert_bit_identical(ours, original[name].numpy(), name)


def test_gguf_of_another_architecture_is_refused(tmp_path):
    file = _write_gguf(tmp_path / "phi3.gguf", arch="phi3")
    with pytest.raises(ValueError) as err:
        sj.interop.load_gguf(file)
    msg = _error_message(err)
    assert str(file) in msg and "'phi3'" in msg and "gemma3" in msg
    from spsft_jax import cli

    assert cli.main(["convert", str(file), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def _llama_cpp_rope_factors(head_dim, theta, factor, low, high, original):
    """The divisors llama.cpp writes as rope_freqs.weight for llama3 RoPE scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    out = np.where(wavelen < original / high, 1.0,
                   np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def test_gguf_llama3_rope_factors_become_rope_scaling(tmp_path):
    """llama.cpp keeps Llama 3.2's RoPE scaling only as a tensor: the loaded model
    computes the original's logits (transformers' GGUF loader would drop the scaling)."""
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = make_hf_model(tmp_path / "hf", rope_theta=5e5, rope_scaling=rope,
                          max_position_embeddings=131072)
    factors = _llama_cpp_rope_factors(8, 5e5, 32.0, 1.0, 4.0, 8192)
    assert factors.min() == 1.0 and factors.max() == 32.0  # all three bands present
    file = _write_gguf(tmp_path / "model.gguf", model, extra_tensors=[("rope_freqs.weight", factors)])
    cfg, params = sj.interop.load_gguf(file)
    assert cfg.rope_scaling == sj.llama.RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    ids = _ids(batch=1, seq=100)  # long enough for the low frequencies to turn
    ours = sj.llama.forward(cfg, params, ids)
    from conftest import rel_max_err

    assert rel_max_err(ours, hf_logits(model, ids)) <= 1e-5
    unscaled = sj.llama.forward(dataclasses.replace(cfg, rope_scaling=None), params, ids)
    assert rel_max_err(unscaled, hf_logits(model, ids)) > 5e-5  # the scaling shows, 5x the bar


def test_gguf_unknown_rope_factors_are_refused(tmp_path):
    model = make_hf_model(tmp_path / "hf")
    file = _write_gguf(tmp_path / "model.gguf", model,
                       extra_tensors=[("rope_freqs.weight", np.full(4, 2.0, np.float32))])
    with pytest.raises(ValueError) as err:
        sj.interop.load_gguf(file)
    assert "rope_freqs.weight" in _error_message(err)


def test_not_a_gguf_file_is_refused(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ValueError) as err:
        sj.interop.load_gguf(tmp_path / "junk.gguf")
    assert "junk.gguf" in _error_message(err)


def test_package_without_one_gguf_is_refused():
    with pytest.raises(ValueError, match="found 0") as err:
        sj.interop.gguf_file.package_gguf("pytest")
    assert "pytest" in _error_message(err)


_LOAD_PEAK = """
import json, sys
import jax, jax.numpy as jnp
from spsft_jax import interop

jnp.ones(1).block_until_ready()
before = int(open("/proc/self/statm").read().split()[1]) * 4096
cfg, params = interop.load_hf(sys.argv[1])
# VmHWM: this process's own peak (ru_maxrss would count the parent's, after a fork and exec)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"before": before, "peak": peak,
                  "weights": sum(x.nbytes for x in jax.tree.leaves(params))}))
"""


def test_load_holds_the_weights_once(tmp_path):
    """The load's peak is the weights plus a block: each tensor is copied into its slot
    from the file a block at a time, and the CPU adopts the slots without a copy (before,
    the mapped file and the host buffers each added a second copy of the model)."""
    import subprocess
    import sys

    make_hf_model(tmp_path, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, head_dim=64, vocab_size=2048)
    out = subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(tmp_path)], capture_output=True,
                         text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["weights"] > 60 * 2**20  # large enough for a second copy to show
    assert m["peak"] - m["before"] < 1.2 * m["weights"] + 24 * 2**20, m
