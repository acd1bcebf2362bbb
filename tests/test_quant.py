"""Quantized frozen weights: ggml byte layouts against gguf-py, int8 and NF4 bounds,
the bitsandbytes NF4 layout, the Q4_K/Q6_K quantizers, row requantization."""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spsft_jax import quant

GGUF_QUANTIZED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"]
GGUF_TRIVIAL = ["F16", "F32", "BF16"]
GGUF_KINDS = GGUF_QUANTIZED + GGUF_TRIVIAL
# Byte offsets of the float16 scale fields inside one block.
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}


@pytest.fixture
def gguf():
    return pytest.importorskip("gguf")


@jax.jit
def _dequantize(q):
    return q.dequantize()


@jax.jit
def _dequantize_scanned(q):
    """Dequantize layer by layer inside lax.scan, the way the model's layer loop will."""
    return jax.lax.scan(lambda carry, layer: (carry, layer.dequantize()), None, q)[1]


def _assert_bits_equal(ours, ref):
    """float32 arrays equal bit for bit (NaNs only where the other has a NaN: payloads may differ)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    bad = (ours.view(np.uint32) != ref.view(np.uint32)) & ~nan
    assert not bad.any(), f"{bad.sum()} values differ, e.g. ours {ours[bad][:4]} vs gguf {ref[bad][:4]}"


def _random_blocks(rng, kind, shape):
    """Random bytes [..., row_bytes] for `kind` whose float16 scales are finite (zeros,
    negatives, subnormals and large values among them)."""
    k = quant.KINDS[kind]
    data = rng.integers(0, 256, size=shape[:-1] + (k.row_bytes(shape[-1]),), dtype=np.uint8)
    blocks = data.reshape(-1, k.block_bytes)
    for at in F16_FIELDS.get(kind, []):
        scale = rng.standard_normal(len(blocks)) * 10.0 ** rng.uniform(-8, 3, len(blocks))
        scale[::7] = 0
        blocks[:, at:at + 2] = scale.astype("<f2").view(np.uint8).reshape(-1, 2)
    return data


def test_kind_table_matches_ggml(gguf):
    for name in GGUF_KINDS:
        t = gguf.GGMLQuantizationType[name]
        k = quant.KINDS[name]
        assert (k.block_elements, k.block_bytes) == gguf.GGML_QUANT_SIZES[t]
        assert quant.KIND_OF_GGML[t] == name and quant.GGML_OF_KIND[name] == int(t)
    assert set(quant.KIND_OF_GGML.values()) == set(GGUF_KINDS)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0"] + GGUF_TRIVIAL)
def test_quantize_and_dequantize_match_gguf(gguf, kind):
    t = gguf.GGMLQuantizationType[kind]
    x = np.random.default_rng(1).standard_normal((3, 5, 256)).astype(np.float32)
    ref_bytes = np.asarray(gguf.quants.quantize(x, t)).view(np.uint8)
    q = quant.quantize(x, kind)
    np.testing.assert_array_equal(np.asarray(q.data), ref_bytes)
    _assert_bits_equal(_dequantize(q), gguf.quants.dequantize(ref_bytes, t))


@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_dequantize_matches_gguf_on_random_bytes(gguf, kind):
    t = gguf.GGMLQuantizationType[kind]
    data = _random_blocks(np.random.default_rng(2), kind, (3, 4, 512))
    ref = gguf.quants.dequantize(data, t)
    q = quant.QuantizedWeight(jnp.asarray(data), kind=kind, cols=512)
    assert q.shape == ref.shape == (3, 4, 512)
    _assert_bits_equal(_dequantize(q), ref)  # leading layer axis
    _assert_bits_equal(_dequantize_scanned(q), ref)  # one layer at a time under scan
    _assert_bits_equal(_dequantize(q.replace(data=q.data[1])), ref[1])  # a plain [out, row_bytes]


def test_reader_data_is_ours(gguf, tmp_path):
    """A GGUF file's tensor data, as GGUFReader gives it, is a QuantizedWeight's data."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    path = str(tmp_path / "w.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    q4k = quant.quantize(x, "Q4_K")
    writer.add_tensor("q4k", np.asarray(q4k.data), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.add_tensor("f16", x.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    for name, kind, expect in [("q4k", "Q4_K", q4k.dequantize()), ("f16", "F16", x.astype(np.float16))]:
        tensor = tensors[name]
        assert quant.KIND_OF_GGML[tensor.tensor_type] == kind
        q = quant.QuantizedWeight.from_bytes(tensor.data, kind)
        assert q.shape == (6, 256)
        _assert_bits_equal(q.dequantize(), np.asarray(expect, np.float32))


def test_int8_bound_layout_and_zero_rows():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 96)).astype(np.float32) * np.float32([[1], [1e-3], [30], [1], [1]])
    x[0, 3] = 0
    q = quant.quantize(x, "int8")
    data = np.asarray(q.data)
    assert data.shape == (2, 5, 4 + 96)
    scale = data[..., :4].copy().view("<f4")[..., 0]
    np.testing.assert_array_equal(scale, np.abs(x).max(-1) / np.float32(127))
    y = np.asarray(_dequantize(q))
    np.testing.assert_array_equal(y, data[..., 4:].view(np.int8) * scale[..., None])
    assert np.all(np.abs(y - x) <= scale[..., None] * (0.5 + 1e-6))
    assert np.all(y[0, 3] == 0) and not np.isnan(y).any()


def _nf4_reference(x):
    """bitsandbytes' reference NF4 quantizer on the row-major flattened x (blocksize 64):
    (codes [n], absmax [n / 64]) by brute-force argmin, ties to the lower index."""
    blocks = x.reshape(-1, 64).astype(np.float32)
    absmax = np.abs(blocks).max(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.nan_to_num(np.clip(blocks * (np.float32(1) / absmax[:, None]), -1, 1))
    codes = np.argmin(np.abs(scaled[..., None] - quant.NF4), axis=-1)
    return codes.reshape(-1).astype(np.uint8), absmax


def _nf4_ties():
    """float32 values near the midpoints of neighbouring NF4 values whose float32 distances
    to the two are equal: exact ties, which go to the lower index."""
    mid = (quant.NF4[1:] + quant.NF4[:-1]) / 2
    near = (mid.view(np.int32)[:, None] + np.arange(-16, 17, dtype=np.int32)).view(np.float32)
    tie = np.abs(near - quant.NF4[:-1, None]) == np.abs(near - quant.NF4[1:, None])
    assert tie.sum() >= 4
    return near[tie]


def _nf4_input(rng):
    x = rng.standard_normal((2, 3, 192)).astype(np.float32)
    x[1, 2, :64] = 0  # a zero block
    x[0, 1] = 0  # a zero row
    mid = (quant.NF4[1:] + quant.NF4[:-1]) / 2
    edge = np.concatenate([[1.0], mid, _nf4_ties()])  # with absmax 1 these are the scaled values
    x[0, 0, :len(edge)] = edge
    x[0, 0, len(edge):64] = 0
    return x


def test_nf4_bound_codes_and_zeros():
    x = _nf4_input(np.random.default_rng(5))
    q = quant.quantize(x, "nf4")
    assert q.data.shape == (2, 3, 3 * 36)
    y = np.asarray(_dequantize(q))
    codes, absmax = _nf4_reference(x)
    np.testing.assert_array_equal(y, (quant.NF4[codes] * np.repeat(absmax, 64)).reshape(x.shape))
    half_gap = np.diff(quant.NF4).max() / 2
    err = np.abs(y - x).reshape(-1, 64).max(-1)
    assert np.all(err <= absmax * half_gap * (1 + 1e-6))
    assert np.all(y[0, 1] == 0) and np.all(y[1, 2, :64] == 0) and not np.isnan(y).any()
    # Our row layout: each block's absmax, then its codes, the first element high.
    block = np.asarray(q.data)[0, 0, :36]
    assert block[:4].view("<f4")[0] == 1.0 and block[4] >> 4 == 15


def test_nf4_codes_are_bitsandbytes_argmin():
    """Every float32 within 3000 ulps of a midpoint between NF4 values (ties, rounded
    midpoints) gets the code of bitsandbytes' argmin."""
    mid = (quant.NF4[1:] + quant.NF4[:-1]) / 2
    near = (mid.view(np.int32)[:, None] + np.arange(-3000, 3000, dtype=np.int32)).view(np.float32).ravel()
    near = np.pad(near, (0, -near.size % 63)).reshape(-1, 63)
    x = np.concatenate([np.ones((len(near), 1), np.float32), near], axis=1)  # absmax 1 in every block
    codes, _ = _nf4_reference(x)
    packed, _ = quant.nf4_to_bnb(quant.quantize(x, "nf4"))
    np.testing.assert_array_equal(packed[:, 0], (codes[0::2] << 4) | codes[1::2])


def test_nf4_bitsandbytes_layout_round_trip():
    rng = np.random.default_rng(6)
    x = _nf4_input(rng)
    q = quant.quantize(x, "nf4")
    codes, absmax = _nf4_reference(x)
    packed, ours_absmax = quant.nf4_to_bnb(q)
    np.testing.assert_array_equal(packed, ((codes[0::2] << 4) | codes[1::2])[:, None])
    assert ours_absmax.dtype == np.float32
    np.testing.assert_array_equal(ours_absmax.view(np.uint32), absmax.view(np.uint32))
    back = quant.nf4_from_bnb(packed, absmax, x.shape)
    assert back.shape == x.shape
    np.testing.assert_array_equal(np.asarray(back.data), np.asarray(q.data))
    # Any stored bitsandbytes state goes there and back byte for byte, whatever dtype holds the codes.
    packed = rng.integers(0, 256, size=(x.size // 2, 1), dtype=np.uint8)
    absmax = np.abs(rng.standard_normal(x.size // 64)).astype(np.float32)
    q = quant.nf4_from_bnb(packed.reshape(-1).view(np.float16)[:, None], absmax, x.shape)
    np.testing.assert_array_equal(quant.nf4_to_bnb(q)[0], packed)
    np.testing.assert_array_equal(quant.nf4_to_bnb(q)[1].view(np.uint32), absmax.view(np.uint32))
    with pytest.raises(ValueError, match="double-quantized"):
        quant.nf4_from_bnb(packed, absmax.astype(np.uint8), x.shape)


def _k_quant_input(rng):
    x = rng.standard_normal((4, 3, 512)).astype(np.float32)
    x[0] *= 0.02
    x[1, 0] += 3  # all positive
    x[1, 1] -= 3  # all negative
    x[1, 2, :256] = 0  # a zero super-block
    x[2, 0, :32] = 0  # a zero sub-block beside others
    x[3] *= rng.uniform(0.01, 5, (3, 32)).repeat(16, -1).astype(np.float32)  # uneven sub-blocks
    return x


def _k_quant_bound(x, kind):
    """The documented per-element error bound of our Q4_K / Q6_K quantizers (2^-24: float16's
    subnormal spacing, which the super-block scale d reaches for small weights)."""
    if kind == "Q4_K":
        sub = x.reshape(-1, 8, 32)
        r = np.maximum(sub.max(-1), 0) - np.minimum(sub.min(-1), 0)
        bound = (r + r.max(-1, keepdims=True) / 30) / 30
        scale = r.max(-1, keepdims=True)
    else:
        sub = x.reshape(-1, 16, 16)
        a = np.abs(sub).max(-1)
        bound = (a + a.max(-1, keepdims=True) / 120) / 62
        scale = a.max(-1, keepdims=True)
    return (bound + 2.0 ** -24 + 1e-6 * scale)[..., None]


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_quantizer_error_bound(gguf, kind):
    x = _k_quant_input(np.random.default_rng(7))
    q = quant.quantize(x, kind)
    ref = gguf.quants.dequantize(np.asarray(q.data), gguf.GGMLQuantizationType[kind])
    _assert_bits_equal(_dequantize(q), ref)
    err = np.abs(ref - x)
    bound = _k_quant_bound(x, kind)
    assert np.all(err.reshape(bound.shape[:-1] + (-1,)) <= bound)
    assert np.all(ref[1, 2, :256] == 0) and np.all(ref[2, 0, :32] == 0)
    # Closer than the plain block formats at the same or one bit less a weight
    # (Q4_0: 4.5 bits, like Q4_K; Q5_0: 5.5, against Q6_K's 6.56).
    rms = lambda y: np.sqrt(np.mean((np.asarray(y) - x) ** 2))  # noqa: E731
    assert rms(ref) < rms(quant.quantize(x, {"Q4_K": "Q4_0", "Q6_K": "Q5_0"}[kind]).dequantize())


@pytest.mark.parametrize("kind", list(quant.KINDS))
def test_quantize_rows_touches_only_those_rows(kind):
    if kind in ("Q8_0", "Q4_0", "Q4_1", "Q5_0"):
        pytest.importorskip("gguf")  # their quantizers are gguf-py's
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 6, 256)).astype(np.float32)
    q = quant.quantize(x, kind)
    before = np.asarray(q.data)
    for rows in (np.array([4, 1]), np.array([[0, 5], [3, -1]])):
        values = rng.standard_normal((2, 2, 256)).astype(np.float32) * 2
        for base in (q, q.replace(data=before)):  # on device and on the host
            after = np.asarray(quant.quantize_rows(base, rows, values).data)
            fresh = np.asarray(quant.quantize(values, kind).data)
            for layer in range(2):
                chosen = np.broadcast_to(rows, (2, 2))[layer] % 6
                np.testing.assert_array_equal(after[layer, chosen], fresh[layer])
                keep = np.setdiff1d(np.arange(6), chosen)
                np.testing.assert_array_equal(after[layer, keep], before[layer, keep])
    np.testing.assert_array_equal(np.asarray(q.data), before)  # q itself untouched
    assert quant.quantize_rows(q, np.array([], np.int32), np.zeros((2, 0, 256))) is q


def _one_line_value_error(call, *parts):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(p in message for p in parts), message


def test_bad_shapes_and_kinds():
    _one_line_value_error(lambda: quant.quantize(np.zeros((4, 100)), "Q4_K"), "(4, 100)", "Q4_K", "256")
    _one_line_value_error(lambda: quant.quantize(np.zeros((2, 4, 96)), "nf4"), "(2, 4, 96)", "nf4", "64")
    _one_line_value_error(lambda: quant.quantize(np.zeros((3, 40)), "Q8_0"), "(3, 40)", "Q8_0", "32")
    _one_line_value_error(lambda: quant.quantize(np.zeros(64), "Q8_0"), "(64,)", "Q8_0")
    _one_line_value_error(lambda: quant.quantize(np.zeros((4, 64)), "q4_0"), "'q4_0'", "Q4_0")
    _one_line_value_error(lambda: quant.quantize(np.full((2, 64), np.nan), "int8"), "(2, 64)", "int8", "NaN")
    q = quant.quantize(np.zeros((2, 4, 64)), "int8")
    _one_line_value_error(lambda: quant.quantize_rows(q, [1], np.zeros((2, 1, 32))), "(2, 1, 32)", "(2, 4, 64)")
    _one_line_value_error(lambda: quant.quantize_rows(q, [[1], [2], [3]], np.zeros((2, 1, 64))), "(3, 1)")
    _one_line_value_error(lambda: quant.quantize_rows(q, [4], np.zeros((2, 1, 64))), "[-4, 4)")
    _one_line_value_error(lambda: quant.quantize_rows(q, [1], np.full((2, 1, 64), np.inf)), "int8", "inf")
    _one_line_value_error(lambda: quant.QuantizedWeight.from_bytes(np.zeros((2, 40), np.uint8), "Q4_0"), "40", "18")


def test_missing_gguf_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setitem(sys.modules, "gguf.quants", None)
    message = r"quantizing to Q4_0 needs the gguf package: pip install 'spsft-jax\[gguf\]'"
    with pytest.raises(ImportError, match=message):
        quant.quantize(np.zeros((2, 32)), "Q4_0")
    assert quant.quantize(np.zeros((2, 256)), "Q4_K").shape == (2, 256)  # our own quantizers need no gguf


def test_pytree_and_helpers():
    x = np.random.default_rng(9).standard_normal((3, 4, 256)).astype(np.float32)
    q = quant.quantize(x, "Q6_K", dtype=jnp.bfloat16)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 1 and leaves[0].dtype == jnp.uint8
    assert (q.shape, q.ndim, q.nbytes) == ((3, 4, 256), 3, 3 * 4 * 210)
    assert q.dtype == "bfloat16" and q.dequantize().dtype == jnp.bfloat16
    assert q.dequantize(jnp.float32).dtype == jnp.float32
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.kind, rebuilt.cols, rebuilt.dtype) == ("Q6_K", 256, "bfloat16")
    assert quant.is_quantized(q) and not quant.is_quantized(x)
    assert quant.dequantize(x) is x and quant.dequantize(x, jnp.bfloat16) is x
    np.testing.assert_array_equal(quant.dequantize(q, jnp.float32), q.dequantize(jnp.float32))
    tree = quant.dequantize_tree({"w": q, "b": x, "n": None})
    assert tree["b"] is x and tree["n"] is None
    np.testing.assert_array_equal(np.asarray(tree["w"], np.float32), np.asarray(q.dequantize(), np.float32))
    # The same static fields: a second weight of another layer count reuses the jitted scan body.
    assert jax.tree_util.tree_structure(quant.quantize(x[:1], "Q6_K", dtype=jnp.bfloat16)) == treedef


def _mixed_stack(rng, kinds, shape=(5, 512)):
    """A stack with layer i in kinds[i], built layer by layer as a GGUF load builds it."""
    x = rng.standard_normal((len(kinds),) + shape).astype(np.float32)
    layers = [quant.quantize(x[i], k) for i, k in enumerate(kinds)]
    stack = quant.QuantizedWeight(np.zeros((len(kinds),) + tuple(layers[0].data.shape), np.uint8),
                                  kind=kinds[0], cols=shape[-1])
    for i, layer in enumerate(layers):
        stack = quant.put_layer(stack, i, layer)
    return x, layers, stack


def test_layers_of_mixed_kinds_decode_each_in_its_own_kind():
    rng = np.random.default_rng(10)
    kinds = ["Q4_K", "Q6_K", "Q4_K", "nf4"]
    _, layers, stack = _mixed_stack(rng, kinds)
    assert stack.kind == ("Q4_K", "Q6_K", "nf4") and np.asarray(stack.layer_kind).tolist() == [0, 1, 0, 2]
    assert stack.data.shape[-1] == max(l.data.shape[-1] for l in layers)  # padded to the widest
    ref = np.stack([np.asarray(l.dequantize()) for l in layers])
    _assert_bits_equal(_dequantize(stack), ref)  # the whole stack at once
    _assert_bits_equal(_dequantize_scanned(jax.tree.map(jnp.asarray, stack)), ref)  # one layer at a time
    for i, layer in enumerate(layers):
        np.testing.assert_array_equal(np.asarray(stack.layer(i).data), np.asarray(layer.data))
        assert stack.layer(i).kind == kinds[i]
    assert len(jax.tree.leaves(stack)) == 2  # bytes and the per-layer kind index, both scanned


def test_mixed_stack_requantizes_rows_in_each_layers_kind():
    rng = np.random.default_rng(11)
    kinds = ["Q6_K", "Q4_K", "Q6_K"]
    _, layers, stack = _mixed_stack(rng, kinds)
    rows = np.array([[1, 3], [0, 4], [2, 3]])
    values = rng.standard_normal((3, 2, 512)).astype(np.float32)
    after = quant.quantize_rows(jax.tree.map(jnp.asarray, stack), rows, values)
    assert after.kind == stack.kind
    for i, kind in enumerate(kinds):
        new, old = np.asarray(after.layer(i).data), np.asarray(layers[i].data)
        np.testing.assert_array_equal(new[rows[i]], np.asarray(quant.quantize(values[i], kind).data))
        keep = np.setdiff1d(np.arange(5), rows[i])
        np.testing.assert_array_equal(new[keep], old[keep])
    with pytest.raises(ValueError, match="does not fit"):
        quant.put_layer(stack, 0, quant.quantize(np.zeros((5, 256), np.float32), "Q4_K"))


def test_quantized_bytes_shard_by_rows():
    from spsft_jax import sharding

    q = quant.quantize(np.zeros((2, 8, 256), np.float32), "Q4_K")
    path = (jax.tree_util.DictKey("layers"), jax.tree_util.GetAttrKey("data"))
    assert sharding.leaf_spec(path, q.data.shape, q.data.dtype, 4) == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert sharding.leaf_spec(path, (2, 6, 144), jnp.uint8, 4) == jax.sharding.PartitionSpec()  # 6 rows: no
    rows = (jax.tree_util.DictKey("layers"), jax.tree_util.DictKey("rows"))
    assert sharding.leaf_spec(rows, (2, 8, 16), jnp.uint8, 4) == jax.sharding.PartitionSpec()  # not weight bytes


def test_a_wide_quantized_weight_is_multiplied_a_block_of_rows_at_a_time(monkeypatch):
    from spsft_jax import llama

    monkeypatch.setattr(llama, "DECODED_ROWS", 16)
    rng = np.random.default_rng(12)
    q = quant.quantize(rng.standard_normal((96, 64)).astype(np.float32), "Q8_0")
    x = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
    assert llama._row_blocks(96) == 6 and llama._row_blocks(97) == 1  # 97 is prime: whole
    dense = lambda x: jnp.einsum("...i,oi->...o", x, q.dequantize())  # noqa: E731
    blocked = lambda x: llama.quantized_product(x, q)  # noqa: E731
    np.testing.assert_allclose(jax.jit(blocked)(x), dense(x), rtol=1e-5, atol=1e-5)  # sums in another order
    grad = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)  # noqa: E731
    np.testing.assert_allclose(grad(blocked), grad(dense), rtol=1e-5, atol=1e-4)  # entries up to ~10
    text = jax.jit(jax.grad(lambda x: jnp.sum(blocked(x)))).lower(x).as_text()
    assert "f32[96,64]" not in text  # no float copy of the whole weight, forward or backward
