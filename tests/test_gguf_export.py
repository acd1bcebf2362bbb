"""`interop.save_gguf`: params back into the GGUF they came from, byte for byte where unchanged."""
from __future__ import annotations

import dataclasses
import filecmp

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from spsft_jax import delta as delta_lib  # noqa: E402
from spsft_jax import importance, llama, quant, selection, trees  # noqa: E402
from spsft_jax.interop import load_gguf, save_gguf  # noqa: E402
from spsft_jax.interop.gguf_file import permute, unpermute  # noqa: E402


def _tensors(path) -> dict[str, tuple[int, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (int(t.tensor_type), np.asarray(t.data).view(np.uint8)) for t in reader.tensors}


def _fields(path) -> dict[str, tuple]:
    reader = gguf.GGUFReader(path)
    return {k: (tuple(f.types), [bytes(np.asarray(p).tobytes()) for p in f.parts])
            for k, f in reader.fields.items()}


# --------------------------------------------------------------------------- fast


@pytest.mark.parametrize("heads", [1, 2, 3, 8])
def test_permute_inverts_unpermute(heads):
    rows = heads * 2 * 5
    x = np.random.default_rng(0).standard_normal((rows, 7)).astype(np.float32)
    assert np.array_equal(permute(unpermute(x, heads), heads), x)
    assert np.array_equal(unpermute(permute(x, heads), heads), x)
    assert not np.array_equal(permute(x, heads), x)
    b = np.arange(rows * 3, dtype=np.uint8).reshape(rows, 3)  # rows of bytes move alike
    assert np.array_equal(permute(unpermute(b, heads), heads), b)


# A Q4_K_M file's mix: some layers of a tensor in a wider kind than the others.
MIXED = {"attn_v": ("Q4_0", "Q8_0"), "ffn_down": ("Q8_0", "Q5_0")}


def _tiny_gguf(path, *, tied=False, mixed=False):
    """A small llama GGUF as llama.cpp lays it out: Q8_0 linears, F16 embedding, F32 norms;
    `mixed`: attn_v and ffn_down change kind from layer to layer (`MIXED`), and the
    embedding is Q8_0."""
    rng = np.random.default_rng(1)
    d, ff, layers, heads, kv, vocab = 64, 128, 2, 4, 2, 48
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_string("general.name", "tiny")

    def add(name, shape, kind="Q8_0"):
        q = quant.quantize(rng.standard_normal(shape).astype(np.float32) * 0.1, kind)
        w.add_tensor(name, np.asarray(q.data), raw_dtype=gguf.GGMLQuantizationType[kind])

    if mixed:
        add("token_embd.weight", (vocab, d))
    else:
        w.add_tensor("token_embd.weight", rng.standard_normal((vocab, d)).astype(np.float16))
    hd = d // heads
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
        for name, shape in [("attn_q", (d, d)), ("attn_k", (kv * hd, d)), ("attn_v", (kv * hd, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)),
                            ("ffn_down", (d, ff))]:
            add(f"blk.{i}.{name}.weight", shape, MIXED[name][i] if mixed and name in MIXED else "Q8_0")
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    if not tied:
        add("output.weight", (vocab, d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dequantize", [False, True])
def test_tiny_round_trip_is_byte_identical(tmp_path, tied, dequantize):
    src = _tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    cfg, params = load_gguf(src, dequantize=dequantize)
    out = save_gguf(tmp_path / "out" / "tiny.gguf", cfg, params, like=src)
    assert filecmp.cmp(src, out, shallow=False)
    assert ("output.weight" in _tensors(out)) == (not tied)


def test_tiny_changed_floats_are_written_in_like_types(tmp_path):
    src = _tiny_gguf(tmp_path / "tiny.gguf")
    cfg, params = load_gguf(src, dequantize=True)  # all float: linears requantized on write
    changed = jax.tree.map(lambda x: x, params)
    changed["norm"]["weight"] = params["norm"]["weight"] * 2
    changed["embed_tokens"]["weight"] = params["embed_tokens"]["weight"].at[3].add(0.5)
    q = changed["layers"]["self_attn"]["q_proj"]["weight"]
    changed["layers"]["self_attn"]["q_proj"]["weight"] = q.at[1, 5].add(0.25)
    out = save_gguf(tmp_path / "changed.gguf", cfg, changed, like=src)
    before, after = _tensors(src), _tensors(out)
    assert [n for n in before] == [n for n in after]
    assert {n: t for n, (t, _) in before.items()} == {n: t for n, (t, _) in after.items()}
    differ = {n for n in before if not np.array_equal(before[n][1], after[n][1])}
    assert differ == {"output_norm.weight", "token_embd.weight", "blk.1.attn_q.weight"}
    _, back = load_gguf(out)
    for path in [("norm", "weight"), ("embed_tokens", "weight")]:
        np.testing.assert_allclose(trees.get(back, *path), trees.get(changed, *path), atol=1e-3)
    qb, qc = back["layers"]["self_attn"]["q_proj"]["weight"], changed["layers"]["self_attn"]["q_proj"]["weight"]
    np.testing.assert_allclose(qb, qc, atol=0.02)  # Q8_0 step
    # only the changed row of the q tensor (in llama.cpp's row order) differs
    rows_changed = np.flatnonzero((before["blk.1.attn_q.weight"][1] != after["blk.1.attn_q.weight"][1]).any(-1))
    heads = cfg.num_heads
    assert rows_changed.tolist() == [int(np.flatnonzero(permute(np.arange(cfg.hidden_size), heads) == 5)[0])]


def _random_row_delta(params, targets="all-linear", rank=2, seed=0, scale=0.05):
    """A row delta on every targeted linear with random W_f (a trained delta's stand-in)."""
    scores = importance.magnitude(None, params, targets=targets)
    d = delta_lib.rows_from_selection(params, selection.select(scores, rank=rank))
    key = iter(jax.random.split(jax.random.key(seed), 16))
    for path, rd in delta_lib.leaves(d):
        rd = dataclasses.replace(rd, w_f=scale * jax.random.normal(next(key), rd.w_f.shape, jnp.float32))
        d = trees.set_nested(d, path, rd)
    return d


@pytest.mark.parametrize("mask", [False, True])
def test_a_row_delta_as_a_llama_cpp_adapter_is_exact(tmp_path, mask):
    from spsft_jax.interop import save_gguf_adapter

    src = _tiny_gguf(tmp_path / "tiny.gguf")
    cfg, params = load_gguf(src, dequantize=False)
    d = _random_row_delta(params, rank=3)
    if mask:  # a padded selection: the masked slot's row gets nothing
        for path, rd in delta_lib.leaves(d):
            d = trees.set_nested(d, path, dataclasses.replace(rd, mask=jnp.asarray(np.array([[1, 0, 1]] * 2) > 0)))
    out = save_gguf_adapter(tmp_path / "adapter.gguf", cfg, d, like=src, source="sha256:x")
    reader = gguf.GGUFReader(out)
    fields = {k: f for k, f in reader.fields.items()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == 3.0  # alpha / rank = 1
    lora = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert len(lora) == 2 * 7 * cfg.num_layers
    # B A, in llama.cpp's row order, is each layer's update: the float merge less the base
    exact = trees.flatten(delta_lib.merge(params, d, requantize=None))
    base = trees.flatten(quant.dequantize_tree(params))
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    for path in exact:
        module = path[-2]
        if path[0] != "layers" or module not in names:
            continue
        for layer in range(cfg.num_layers):
            update = np.asarray(exact[path][layer]) - np.asarray(base[path][layer])
            if module in heads:
                update = permute(update, heads[module])
            name = f"blk.{layer}.{names[module]}.weight"
            np.testing.assert_allclose(lora[name + ".lora_b"] @ lora[name + ".lora_a"], update, atol=1e-6)


def test_requantized_report_tells_a_kept_update_from_a_rounded_away_one(tmp_path):
    src = _tiny_gguf(tmp_path / "tiny.gguf")  # Q8_0 linears: a step of max|block| / 127
    _, params = load_gguf(src, dequantize=False)
    reports = {}
    for scale in (1.0, 1e-5):
        d = _random_row_delta(params, scale=scale)
        reports[scale] = delta_lib.requantized_report(params, delta_lib.merge(params, d), d)
    assert reports[1.0]["error"] < 0.05 and 0.95 < reports[1.0]["norm_kept"] < 1.05
    assert reports[1e-5]["error"] > 0.5  # far below a step: rounding decides the rows


@pytest.mark.parametrize("tied", [False, True])
def test_kinds_mixed_across_layers_and_embeddings_kept_quantized(tmp_path, tied):
    src = _tiny_gguf(tmp_path / "mixed.gguf", tied=tied, mixed=True)
    cfg, floats = load_gguf(src)
    _, params = load_gguf(src, dequantize=False, quantized_embeddings=True)
    layers = params["layers"]
    for module, kinds in [(layers["self_attn"]["v_proj"], MIXED["attn_v"]), (layers["mlp"]["down_proj"], MIXED["ffn_down"])]:
        w = module["weight"]
        assert set(w.kinds) == set(kinds) and [w.layer(i).kind for i in range(2)] == list(kinds)
    assert params["embed_tokens"]["weight"].kind == "Q8_0"
    assert ("lm_head" in params) == (not tied) and (tied or params["lm_head"]["weight"].kind == "Q8_0")
    # the same values, decoded inside the layer scan / from the looked-up rows only
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(llama.forward(cfg, params, ids)),
                                  np.asarray(llama.forward(cfg, floats, ids)))
    # written back unchanged: the same file; merged: only trained rows differ, in their own kinds
    out = save_gguf(tmp_path / "out" / "same.gguf", cfg, params, like=src)
    assert filecmp.cmp(src, out, shallow=False)
    d = _random_row_delta(params)
    merged = delta_lib.merge(params, d)
    exact = trees.flatten(delta_lib.merge(floats, d))
    for path, w in trees.flatten(merged, stop=quant.is_quantized).items():
        ours, want = np.asarray(quant.dequantize(w)), np.asarray(exact[path])
        # requantized rows: within a 4-bit step of the exact merge (Q4_0's is max|block| / 8)
        assert np.abs(ours - want).max() <= 0.07 * np.abs(want).max(), path
    out = save_gguf(tmp_path / "out" / "merged.gguf", cfg, merged, like=src)
    before, after = _tensors(src), _tensors(out)
    assert {n: t for n, (t, _) in before.items()} == {n: t for n, (t, _) in after.items()}
    for name, (_, data) in before.items():
        differ = np.flatnonzero((data != after[name][1]).any(-1)) if data.ndim == 2 else []
        if name.startswith("blk.") and name.endswith("weight") and "norm" not in name:
            assert 0 < len(differ) <= 2, name  # rank 2: at most its two rows
        else:
            assert len(differ) == 0, name
    _, back = load_gguf(out, dequantize=False, quantized_embeddings=True)
    np.testing.assert_array_equal(np.asarray(llama.forward(cfg, back, ids)),
                                  np.asarray(llama.forward(cfg, merged, ids)))


def test_foreign_file_is_not_overwritten(tmp_path):
    from spsft_jax.outputs import OutputError

    src = _tiny_gguf(tmp_path / "tiny.gguf")
    cfg, params = load_gguf(src, dequantize=False)
    target = tmp_path / "taken.gguf"
    target.write_bytes(b"not ours")
    with pytest.raises(OutputError):
        save_gguf(target, cfg, params, like=src)
    assert target.read_bytes() == b"not ours"
    save_gguf(target, cfg, params, like=src, overwrite=True)
    assert filecmp.cmp(src, target, shallow=False)


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_quantized(smollm2_gguf):
    return load_gguf(smollm2_gguf, dequantize=False)


@pytest.fixture(scope="module")
def smollm2_merged(smollm2_quantized, smollm2_gguf, tmp_path_factory):
    """SmolLM2 with a rank-4 row delta on every mlp linear merged in, exported as GGUF."""
    cfg, params = smollm2_quantized
    sel = selection.select(importance.magnitude(cfg, params, targets="mlp"), rank=4)
    d = delta_lib.rows_from_selection(params, sel)
    key = iter(jax.random.split(jax.random.key(0), 8))
    d = jax.tree.map(lambda x: x, d, is_leaf=delta_lib.is_delta)
    for path, rd in delta_lib.leaves(d):
        rd = dataclasses.replace(rd, w_f=0.05 * jax.random.normal(next(key), rd.w_f.shape, jnp.float32))
        d = trees.set_nested(d, path, rd)
    merged = delta_lib.merge(params, d)
    out = save_gguf(tmp_path_factory.mktemp("gguf-export") / "merged.gguf", cfg, merged, like=smollm2_gguf)
    return cfg, sel, merged, out


@pytest.mark.slow
def test_smollm2_round_trip_is_byte_identical(smollm2_quantized, smollm2_gguf, tmp_path):
    cfg, params = smollm2_quantized
    out = save_gguf(tmp_path / "same.gguf", cfg, params, like=smollm2_gguf)
    before, after = _tensors(smollm2_gguf), _tensors(out)
    assert list(before) == list(after)
    for name in before:
        assert before[name][0] == after[name][0], name
        assert np.array_equal(before[name][1], after[name][1]), name
    assert _fields(smollm2_gguf) == _fields(out)
    assert filecmp.cmp(smollm2_gguf, out, shallow=False)  # the whole file


@pytest.mark.slow
def test_smollm2_merged_rows_only_differ(smollm2_merged, smollm2_gguf, record_property):
    cfg, sel, merged, out = smollm2_merged
    before, after = _tensors(smollm2_gguf), _tensors(out)
    assert list(before) == list(after)
    assert _fields(smollm2_gguf) == _fields(out)
    names = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    rows_of = {names[m]: np.asarray(trees.get(sel, "layers", "mlp", m)["rows"]) for m in names}
    changed_rows = 0
    for name, (ttype, data) in before.items():
        new = after[name][1]
        assert after[name][0] == ttype, name
        parts = name.split(".")
        if parts[0] == "blk" and parts[2] in rows_of:
            trained = set(rows_of[parts[2]][int(parts[1])].tolist())
            differ = set(np.flatnonzero((data != new).any(-1)).tolist())
            assert differ <= trained, (name, differ - trained)
            changed_rows += len(differ)
        else:
            assert np.array_equal(data, new), name
    assert changed_rows > 0.9 * 3 * 4 * cfg.num_layers  # almost every trained row moved a step
    total = sum(d.nbytes for _, d in before.values())
    same = sum(int((d == after[n][1]).sum()) for n, (_, d) in before.items())
    record_property("unchanged_byte_fraction", same / total)
    print(f"unchanged tensor bytes after the rank-4 mlp merge: {same / total:.6f} ({total - same} of {total} differ)")
    assert same / total > 0.99

    _, back = load_gguf(out, dequantize=False)
    flat_back = trees.flatten(back, stop=quant.is_quantized)
    for path, leaf in trees.flatten(merged, stop=quant.is_quantized).items():
        if quant.is_quantized(leaf):
            assert flat_back[path].kind == leaf.kind
            assert np.array_equal(np.asarray(flat_back[path].data), np.asarray(leaf.data)), path
        else:
            assert np.array_equal(np.asarray(flat_back[path]), np.asarray(leaf)), path


@pytest.mark.slow
def test_smollm2_export_read_by_transformers(smollm2_merged):
    import torch
    from transformers import AutoModelForCausalLM

    cfg, _, _, out = smollm2_merged
    ids = np.array([[1, 504, 3458, 314, 260, 8525, 28, 2]], np.int32)
    model = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(llama.forward(cfg, load_gguf(out)[1], jnp.asarray(ids)), np.float32)
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"transformers vs spsft_jax logits on the exported GGUF: max relative error {err:.2e}")
    assert err < 1e-4


# --------------------------------------------------------------------------- the command line


def _gguf_of(path, cfg, params, kind="Q8_0"):
    """A GGUF of `params` as llama.cpp lays a Llama out (linears in `kind`, the rest float
    32), without a tokenizer: commands get the model's own with --tokenizer."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    w.add_tensor("token_embd.weight", np.asarray(params["embed_tokens"]["weight"], np.float32))
    for i in range(cfg.num_layers):
        layer = jax.tree.map(lambda x: np.asarray(x[i], np.float32), params["layers"])
        w.add_tensor(f"blk.{i}.attn_norm.weight", layer["input_layernorm"]["weight"])
        for group in ("self_attn", "mlp"):
            for name, weight in layer[group].items():
                weight = weight["weight"]
                weight = permute(weight, heads[name]) if name in heads else weight
                w.add_tensor(f"blk.{i}.{names[name]}.weight", np.asarray(quant.quantize(weight, kind).data),
                             raw_dtype=gguf.GGMLQuantizationType[kind])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", layer["post_attention_layernorm"]["weight"])
    w.add_tensor("output_norm.weight", np.asarray(params["norm"]["weight"], np.float32))
    if "lm_head" in params:
        w.add_tensor("output.weight", np.asarray(params["lm_head"]["weight"], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from spsft_jax.assets import default_asset
    from spsft_jax.interop import load_hf

    cfg, params = load_hf(default_asset())
    return _gguf_of(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf", cfg, params)


def _cli(capsys, *argv):
    from spsft_jax import cli

    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow  # the whole command-line path on a GGUF
def test_the_command_line_trains_on_a_gguf_and_exports_one(tiny_gguf, tmp_path, capsys):
    from spsft_jax.assets import default_asset

    asset = default_asset()
    model = ["--model", tiny_gguf, "--tokenizer", asset]
    code, out, err = _cli(capsys, "finetune", *model, "--data", asset / "train.jsonl", "--eval", asset / "eval.jsonl",
                          "--steps", 30, "--rank", 4, "--max-new-tokens", 4, "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    assert "spsft" in out and (tmp_path / "run" / "adapter.safetensors").is_file()
    before, after = (float(x) for x in out.split("eval loss ")[1].split(";")[0].split(" -> "))
    assert after < before
    from spsft_jax import selection as selection_lib
    assert selection_lib.load(tmp_path / "run" / "selection.safetensors")[1]["metric"] == "taylor"
    adapter = tmp_path / "run" / "adapter.safetensors"

    # the adapter on the GGUF (kept quantized) and on its float load: the same text
    texts = []
    for extra in ([], ["--quantize", "none"]):
        code, out, err = _cli(capsys, "generate", *model, *extra, "--adapter", adapter, "--prompt", "What is 2 plus 2? ")
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1]

    merged = tmp_path / "merged.gguf"
    code, out, err = _cli(capsys, "export", *model, "--adapter", adapter, "--format", "gguf", "--out", merged)
    assert code == 0 and "the requantized rows hold the update with" in out, err
    before, after = _tensors(tiny_gguf), _tensors(merged)
    changed = {n for n in before if not np.array_equal(before[n][1], after[n][1])}
    assert changed and all(n.startswith("blk.") for n in changed)
    for name in changed:  # rank 4: at most 4 rows of each linear
        assert 0 < (before[name][1] != after[name][1]).any(-1).sum() <= 4, name
    from spsft_jax.checkpoint import adapter_digest
    from spsft_jax.interop import merged_adapters
    assert merged_adapters(merged) == (adapter_digest(adapter),)
    code, _, err = _cli(capsys, "export", *model, "--adapter", adapter, "--format", "gguf", "--out", merged)
    assert code == 0, err  # its own earlier output: replaced without --overwrite
    for _ in range(2):  # the llama.cpp adapter, written again over itself
        code, _, err = _cli(capsys, "export", *model, "--adapter", adapter, "--format", "gguf-adapter",
                            "--out", tmp_path / "adapter.gguf")
        assert code == 0, err
    written = gguf.GGUFReader(tmp_path / "adapter.gguf").fields
    assert bytes(written["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(written["spsft_jax.adapter"].parts[-1]).decode() == adapter_digest(adapter)
    # the merged file runs the adapter's text with no adapter; the adapter is refused on it
    code, out, err = _cli(capsys, "generate", "--model", merged, "--tokenizer", asset, "--prompt", "What is 2 plus 2? ")
    assert code == 0 and out == texts[0], err
    code, out, err = _cli(capsys, "generate", "--model", merged, "--tokenizer", asset, "--adapter", adapter,
                          "--prompt", "x")
    assert code == 2 and "already merged into" in err and "metadata" in err
    code, _, err = _cli(capsys, "export", "--model", merged, "--tokenizer", asset, "--adapter", adapter,
                        "--format", "gguf", "--out", tmp_path / "twice.gguf")
    assert code == 2 and "already merged" in err and not (tmp_path / "twice.gguf").exists()


@pytest.mark.parametrize("argv,words", [
    (["export", "--model", "{asset}", "--adapter", "{adapter}", "--format", "gguf", "--out", "{tmp}/x.gguf"],
     "--format gguf: writes for a GGUF --model"),
    (["generate", "--model", "{gguf}", "--quantize", "nf4", "--prompt", "x"], "--quantize nf4: --model is a GGUF file"),
    (["export", "--model", "{gguf}", "--adapter", "{adapter}", "--format", "gguf", "--out", "{gguf}"],
     "is the --model file"),
])
def test_gguf_command_line_refusals(tiny_gguf, tmp_path, capsys, argv, words):
    from spsft_jax.assets import default_asset

    adapter = tmp_path / "a.safetensors"
    adapter.write_bytes(b"")
    fill = {"asset": default_asset(), "adapter": adapter, "tmp": tmp_path, "gguf": tiny_gguf}
    code, _, err = _cli(capsys, *[a.format(**fill) for a in argv])
    assert code == 2 and words in err and err.count("\n") == 1, err


@pytest.mark.slow  # every method compiled for the plan
def test_plan_reads_a_gguf_config(tiny_gguf, capsys):
    code, out, err = _cli(capsys, "plan", "--model", tiny_gguf, "--seq-len", 32)
    assert code == 0 and "spsft" in out, err


@pytest.mark.parametrize("tied", [False, True])
def test_metadata_config_is_transformers_config(tmp_path, tied):
    from spsft_jax.interop import gguf_file
    from spsft_jax.interop.config import config_from_hf

    src = _tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    ours = gguf_file.gguf_config(src)
    theirs = config_from_hf(gguf_file.hf_config(src), source=str(src))
    assert ours == theirs and ours.tie_word_embeddings == tied


def test_metadata_we_do_not_implement_is_refused(tmp_path):
    from spsft_jax.interop import gguf_file

    src = _tiny_gguf(tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(tmp_path / "scaled.gguf"), "llama")
    w.add_float32("llama.rope.scaling.factor", 4.0)
    w.add_uint32("llama.block_count", 2)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="llama.rope.scaling.factor is not supported"):
        gguf_file.gguf_config(tmp_path / "scaled.gguf")
