"""Frozen weights kept quantized: GGUF blocks (llama.cpp), int8 rows, NF4 (QLoRA).

A `QuantizedWeight` is a pytree standing in for a frozen HF-layout weight. It holds the
weight row by row as raw bytes, each row a run of blocks along `in`:

    w: float [..., out, in]                      e.g. [L, d_ff, d_model] for stacked layers
    q = quantize(w, "Q4_K")
      -> QuantizedWeight(data=uint8 [..., out, row_bytes],    the only pytree leaf
                         kind="Q4_K", cols=in, dtype="float32")   static
    q.dequantize()  -> float32 [..., out, in]    pure jnp: runs under jit, inside a lax.scan
                                                 body that slices the leading axes

Kinds (`KINDS`):

    Q8_0 Q4_0 Q4_1 Q5_0 Q4_K Q6_K F16 F32 BF16
        ggml's block layouts, byte for byte: the uint8 [out, row_bytes] array that
        `gguf.GGUFReader` gives for a tensor is `data` as it stands (`from_bytes` also
        takes the typed F16/F32 arrays it gives). `dequantize` is bit-identical to
        `gguf.quants.dequantize`: every product in a block's decode is exact in float32
        (a float16 scale has at most 11 significant bits and the integer factors at most
        12 more, Q6_K's 7-bit scale times its 6-bit signed code), so the one rounding is
        the final multiply or add, whatever order or fusion XLA picks.
    int8
        per row: a float32 scale (little-endian) then `in` int8 codes;
        value = code * scale, scale = max|row| / 127.
    nf4
        QLoRA's NormalFloat4 as bitsandbytes defines it: blocks of 64 along the row, each
        with a float32 absmax and 4-bit indices into the 16 NF4 values, two per byte, the
        first element in the high nibble. Our row layout puts each block's absmax
        (4 bytes) before its 32 code bytes; bitsandbytes keeps the absmax apart,
        `nf4_from_bnb` / `nf4_to_bnb` convert between the two byte for byte.

`quantize` and `quantize_rows` run on the host in numpy (Q8_0, Q4_0, Q4_1 and Q5_0
through gguf-py, whose quantizers match llama.cpp's reference ones).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct
from jax import lax

# --------------------------------------------------------------------------- decoding
# Decoders map uint8 blocks [..., n_blocks, block_bytes] to float32 [..., n_blocks, block_elements].
# Multi-byte fields are assembled from their bytes explicitly, so nothing rests on the
# host's byte order.


def _u16(b):
    """Little-endian uint16 from bytes [..., 2]."""
    return b[..., 0].astype(jnp.uint16) | (b[..., 1].astype(jnp.uint16) << 8)


def _u32(b):
    """Little-endian uint32 from bytes [..., 4]."""
    b = b.astype(jnp.uint32)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _f16(b):
    """A float16 field [..., 2] as float32 (exact: every float16 is a float32)."""
    return lax.bitcast_convert_type(_u16(b), jnp.float16).astype(jnp.float32)


def _f32(b):
    return lax.bitcast_convert_type(_u32(b), jnp.float32)


def _i8(b):
    return lax.bitcast_convert_type(b, jnp.int8)


def _split_nibbles(b):
    """ggml order: the low nibbles of n bytes are elements 0..n-1, the high nibbles n..2n-1."""
    return jnp.concatenate([b & 0xF, b >> 4], axis=-1)


def _interleave_nibbles(b):
    """bitsandbytes order: byte i holds element 2i (high nibble) and 2i+1 (low)."""
    return jnp.stack([b >> 4, b & 0xF], axis=-1).reshape(b.shape[:-1] + (2 * b.shape[-1],))


def _decode_f32(b):
    return _f32(b)[..., None]


def _decode_f16(b):
    return _f16(b)[..., None]


def _decode_bf16(b):
    return lax.bitcast_convert_type(_u16(b).astype(jnp.uint32) << 16, jnp.float32)[..., None]


def _decode_q8_0(b):  # d f16 | 32 x int8
    return _f16(b[..., 0:2])[..., None] * _i8(b[..., 2:34]).astype(jnp.float32)


def _decode_q4_0(b):  # d f16 | 16 bytes of nibbles; value = d * (q - 8)
    q = _split_nibbles(b[..., 2:18]).astype(jnp.int32) - 8
    return _f16(b[..., 0:2])[..., None] * q.astype(jnp.float32)


def _decode_q4_1(b):  # d f16 | m f16 | 16 bytes of nibbles; value = d * q + m
    q = _split_nibbles(b[..., 4:20]).astype(jnp.float32)
    return _f16(b[..., 0:2])[..., None] * q + _f16(b[..., 2:4])[..., None]


def _decode_q5_0(b):  # d f16 | 32 high bits (uint32 LE) | 16 bytes of low nibbles; value = d * (q - 16)
    high = (b[..., 2:6, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1  # bit i of byte j: element 8j + i
    high = high.reshape(b.shape[:-1] + (32,))
    q = (_split_nibbles(b[..., 6:22]) | (high << 4)).astype(jnp.int32) - 16
    return _f16(b[..., 0:2])[..., None] * q.astype(jnp.float32)


def _q4_k_scales(s):
    """Q4_K's 12 scale bytes -> 8 six-bit scales and 8 six-bit mins.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the
    same for the mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7.
    """
    sc = jnp.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = jnp.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc.astype(jnp.float32), mn.astype(jnp.float32)


def _decode_q4_k(b):
    """d f16 | dmin f16 | 12 scale bytes | 128 code bytes; 8 sub-blocks of 32:
    value = d * scale_j * q - dmin * min_j. Bytes 32c..32c+31 hold sub-block 2c in their
    low nibbles and 2c+1 in their high nibbles."""
    lead = b.shape[:-1]
    sc, mn = _q4_k_scales(b[..., 4:16])
    qs = b[..., 16:144].reshape(lead + (4, 1, 32))
    q = jnp.concatenate([qs & 0xF, qs >> 4], axis=-2).reshape(lead + (8, 32)).astype(jnp.float32)
    step = (_f16(b[..., 0:2])[..., None] * sc)[..., None]
    low = (_f16(b[..., 2:4])[..., None] * mn)[..., None]
    return (step * q - low).reshape(lead + (256,))


def _decode_q6_k(b):
    """128 bytes of low nibbles | 64 bytes of 2-bit highs | 16 int8 scales | d f16;
    value = d * scale_(e // 16) * (q - 32). In each half h of 128 elements, element
    h*128 + 64s + j has its low bits in nibble s of byte h*64 + j and element h*128 + 32k + i
    its high bits at bits 2k..2k+1 of byte 128 + h*32 + i."""
    lead = b.shape[:-1]
    ql = b[..., 0:128].reshape(lead + (2, 1, 64))
    ql = jnp.concatenate([ql & 0xF, ql >> 4], axis=-2).reshape(lead + (2, 128))
    qh = b[..., 128:192].reshape(lead + (2, 1, 32))
    qh = ((qh >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]) & 3).reshape(lead + (2, 128))
    q = ((ql | (qh << 4)).astype(jnp.int32) - 32).reshape(lead + (16, 16)).astype(jnp.float32)
    step = _f16(b[..., 208:210])[..., None] * _i8(b[..., 192:208]).astype(jnp.float32)
    return (step[..., None] * q).reshape(lead + (256,))


def _decode_int8(b):  # the whole row is one block: scale f32 | cols x int8
    return _f32(b[..., 0:4])[..., None] * _i8(b[..., 4:]).astype(jnp.float32)


# bitsandbytes' NF4 table, copied from bitsandbytes' source (`_NF4_QUANT_TABLE` in
# bitsandbytes/backends/utils.py, the same numbers as `get_4bit_type("nf4")` in
# functional.py; the QLoRA paper lists them too): normalised N(0, 1) quantiles in float32.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
NF4_BLOCK = 64


def _decode_nf4(b):  # absmax f32 | 32 bytes of codes, two per byte, high nibble first
    codes = _interleave_nibbles(b[..., 4:36]).astype(jnp.int32)
    return jnp.asarray(NF4)[codes] * _f32(b[..., 0:4])[..., None]


# --------------------------------------------------------------------------- encoding
# Encoders map float32 rows [n, cols] to uint8 rows [n, row_bytes] (numpy, host).


def _le_bytes(x, dtype):
    """x as little-endian `dtype`, its bytes along a new last axis."""
    x = np.ascontiguousarray(x, dtype=np.dtype(dtype).newbyteorder("<"))
    return x.view(np.uint8).reshape(x.shape + (x.dtype.itemsize,))


def _safe_inverse(x):
    """1 / x, and 0 where x is 0 (an all-zero block gets codes that decode to 0)."""
    with np.errstate(divide="ignore"):
        return np.where(x == 0, np.float32(0), np.float32(1) / x).astype(np.float32)


def _f16_at_least(x):
    """float16 nearest x, raised one ulp where it fell below x, so scale * max code
    still reaches the block's largest value."""
    h = np.asarray(x, np.float32).astype(np.float16)
    return np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)


def _encode_f32(x):
    return _le_bytes(x, np.float32).reshape(x.shape[0], -1)


def _encode_f16(x):
    return _le_bytes(x, np.float16).reshape(x.shape[0], -1)


def _encode_bf16(x):
    bits = x.astype(ml_dtypes.bfloat16).view(np.uint16)  # round to nearest even, like ggml
    return _le_bytes(bits, np.uint16).reshape(x.shape[0], -1)


def _encode_int8(x):
    scale = (np.abs(x).max(axis=-1) / np.float32(127)).astype(np.float32)
    codes = np.clip(np.rint(x * _safe_inverse(scale)[:, None]), -127, 127).astype(np.int8)
    return np.concatenate([_le_bytes(scale, np.float32), codes.view(np.uint8)], axis=-1)


def _nf4_codes(scaled):
    """Index of the nearest NF4 value to each of `scaled` (in [-1, 1]), the one the argmin
    over float32 |scaled - NF4| in bitsandbytes' reference quantizer picks (the lower on a
    tie). A search over the midpoints puts ties low; a value on a rounded midpoint can still
    be strictly nearer the upper neighbour, so look there once."""
    i = np.searchsorted((NF4[1:] + NF4[:-1]) / 2, scaled)
    upper = np.minimum(i + 1, 15)
    return np.where(np.abs(scaled - NF4[upper]) < np.abs(scaled - NF4[i]), upper, i)


def _encode_nf4(x):
    blocks = x.reshape(x.shape[0], -1, NF4_BLOCK)
    absmax = np.abs(blocks).max(axis=-1)
    # Scale by a reciprocal and clip, as bitsandbytes does.
    scaled = np.clip(blocks * _safe_inverse(absmax)[..., None], -1, 1)
    codes = _nf4_codes(scaled).astype(np.uint8)
    packed = (codes[..., 0::2] << 4) | codes[..., 1::2]
    return np.concatenate([_le_bytes(absmax, np.float32), packed], axis=-1).reshape(x.shape[0], -1)


def _encode_q4_k(x):
    """Per 32-element sub-block j: value = step_j * q - low_j, q in 0..15, with low_j >= 0
    the sub-block's min negated (or 0, as llama.cpp clamps a positive min) and step_j
    spanning up to its max. The 6-bit scale and min codes are rounded up, so the range is
    covered and no code is clipped: |error| <= step_j / 2 <= (r_j + R / 30) / 30 + 2^-24,
    r_j the sub-block's range with 0 included, R the largest r_j of the super-block (the
    2^-24 is float16's subnormal spacing, which d and dmin reach once R < ~0.06)."""
    n = x.shape[0] * x.shape[1] // 256
    sub = x.reshape(n, 8, 32)
    low = -np.minimum(sub.min(axis=-1), 0)
    dmin = _f16_at_least(low.max(axis=-1) / 63)
    mins = np.clip(np.ceil(low * _safe_inverse(dmin.astype(np.float32))[:, None]), 0, 63)
    low = dmin.astype(np.float32)[:, None] * mins  # what a reader will subtract
    need = (sub.max(axis=-1) + low) / 15
    d = _f16_at_least(need.max(axis=-1) / 63)
    scales = np.clip(np.ceil(need * _safe_inverse(d.astype(np.float32))[:, None]), 0, 63)
    step = d.astype(np.float32)[:, None] * scales
    q = np.clip(np.rint((sub + low[..., None]) * _safe_inverse(step)[..., None]), 0, 15).astype(np.uint8)
    sc, mn = scales.astype(np.uint8), mins.astype(np.uint8)
    packed_scales = np.concatenate([
        (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
        (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4),
    ], axis=-1)
    q = q.reshape(n, 4, 2, 32)
    codes = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    out = np.concatenate([_le_bytes(d, np.float16), _le_bytes(dmin, np.float16), packed_scales, codes], axis=-1)
    return out.reshape(x.shape[0], -1)


def _encode_q6_k(x):
    """Per 16-element sub-block j: value = d * scale_j * q, q in -31..31 (code -32 left
    unused, so the grid is symmetric), scale_j an int8 rounded up so that
    step_j >= max|sub-block| / 31: |error| <= step_j / 2 <= (a_j + A / 120) / 62 + 2^-24,
    a_j the sub-block's max |value|, A the super-block's (the 2^-24 is float16's subnormal
    spacing, which d reaches once A < ~0.24, as for most LLM weights)."""
    n = x.shape[0] * x.shape[1] // 256
    sub = x.reshape(n, 16, 16)
    need = np.abs(sub).max(axis=-1) / np.float32(31)
    d = _f16_at_least(need.max(axis=-1) / 127)
    scales = np.clip(np.ceil(need * _safe_inverse(d.astype(np.float32))[:, None]), 0, 127)
    step = d.astype(np.float32)[:, None] * scales
    q = np.clip(np.rint(sub * _safe_inverse(step)[..., None]), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(n, 2, 2, 64)  # [half, nibble, byte]
    ql = (q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)
    q = q.reshape(n, 2, 4, 32)  # [half, bit pair, byte]
    qh = ((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=-2, dtype=np.uint8)
    out = np.concatenate([
        ql.reshape(n, 128), qh.reshape(n, 64), scales.astype(np.int8).view(np.uint8), _le_bytes(d, np.float16),
    ], axis=-1)
    return out.reshape(x.shape[0], -1)


def _gguf_encoder(name: str) -> Callable[[np.ndarray], np.ndarray]:
    def encode(x):
        try:
            from gguf import GGMLQuantizationType
            from gguf.quants import quantize as gguf_quantize
        except ImportError as e:
            raise ImportError(f"quantizing to {name} needs the gguf package: pip install 'spsft-jax[gguf]'") from e
        return gguf_quantize(x, GGMLQuantizationType[name])
    return encode


# --------------------------------------------------------------------------- kinds


@dataclasses.dataclass(frozen=True)
class Kind:
    """A storage format: a row of `cols` elements is cols / block_elements blocks of
    `block_bytes` each. block_elements == 0 means the row is one block of
    block_bytes + cols bytes (int8: a 4-byte scale, then a byte a code)."""
    name: str
    block_elements: int
    block_bytes: int
    decode: Callable[[jax.Array], jax.Array]  # uint8 blocks -> float32 values
    encode: Callable[[np.ndarray], np.ndarray]  # float32 rows -> uint8 rows
    ggml: int | None = None  # GGMLQuantizationType value

    def row_bytes(self, cols: int) -> int:
        if self.block_elements == 0:
            return self.block_bytes + cols
        return cols // self.block_elements * self.block_bytes

    def cols(self, row_bytes: int) -> int:
        if self.block_elements == 0:
            return row_bytes - self.block_bytes
        return row_bytes // self.block_bytes * self.block_elements

    def blocks(self, cols: int) -> tuple[int, int]:
        """(blocks per row, bytes per block)."""
        if self.block_elements == 0:
            return 1, self.block_bytes + cols
        return cols // self.block_elements, self.block_bytes


KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("F32", 1, 4, _decode_f32, _encode_f32, 0),
    Kind("F16", 1, 2, _decode_f16, _encode_f16, 1),
    Kind("BF16", 1, 2, _decode_bf16, _encode_bf16, 30),
    Kind("Q4_0", 32, 18, _decode_q4_0, _gguf_encoder("Q4_0"), 2),
    Kind("Q4_1", 32, 20, _decode_q4_1, _gguf_encoder("Q4_1"), 3),
    Kind("Q5_0", 32, 22, _decode_q5_0, _gguf_encoder("Q5_0"), 6),
    Kind("Q8_0", 32, 34, _decode_q8_0, _gguf_encoder("Q8_0"), 8),
    Kind("Q4_K", 256, 144, _decode_q4_k, _encode_q4_k, 12),
    Kind("Q6_K", 256, 210, _decode_q6_k, _encode_q6_k, 14),
    Kind("int8", 0, 4, _decode_int8, _encode_int8),
    Kind("nf4", NF4_BLOCK, 4 + NF4_BLOCK // 2, _decode_nf4, _encode_nf4),
]}
KIND_OF_GGML: dict[int, str] = {k.ggml: k.name for k in KINDS.values() if k.ggml is not None}
GGML_OF_KIND: dict[str, int] = {name: t for t, name in KIND_OF_GGML.items()}


def _kind(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown quantization kind {name!r} (known: {', '.join(KINDS)})")
    return KINDS[name]


def _check_shape(shape: tuple[int, ...], kind: Kind) -> None:
    if len(shape) < 2:
        raise ValueError(f"cannot quantize shape {tuple(shape)} to {kind.name}: a weight is [..., out, in]")
    if kind.block_elements and shape[-1] % kind.block_elements:
        raise ValueError(f"cannot quantize shape {tuple(shape)} to {kind.name}: "
                         f"in={shape[-1]} is not a multiple of its block of {kind.block_elements}")


def _check_finite(x: np.ndarray, kind: Kind) -> None:
    # A NaN or inf would poison its whole block's scale.
    if not np.isfinite(x).all():
        raise ValueError(f"cannot quantize shape {x.shape} to {kind.name}: it holds NaN or inf")


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype if dtype is not None else jnp.float32).name


# --------------------------------------------------------------------------- the pytree


@struct.dataclass
class QuantizedWeight:
    """A frozen weight [..., out, in] as bytes `data` uint8 [..., out, row_bytes].

    `data` is a leaf, so `lax.scan` over stacked layers hands the body one layer's
    [out, row_bytes]; `kind`, `cols` and `dtype` are static.

    A stack of layers may mix kinds (llama.cpp's Q4_K_M files give some layers' ffn_down
    Q6_K and others Q4_K): then `kind` is the tuple of kinds, `layer_kind` int32 [L] (a
    leaf, sliced by the scan like `data`) indexes it per layer, and every layer's rows
    are padded with zeros to the widest kind's row bytes. Decoding picks the layer's
    kind with `lax.switch`.
    """
    data: jax.Array
    kind: str | tuple[str, ...] = struct.field(pytree_node=False)
    cols: int = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False, default="float32")
    layer_kind: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[:-1]) + (self.cols,)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def nbytes(self) -> int:
        kinds = 0 if self.layer_kind is None else int(np.prod(np.shape(self.layer_kind))) * 4
        return int(np.prod(self.data.shape)) + kinds

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.kind if isinstance(self.kind, tuple) else (self.kind,)

    def _decode(self, name: str, data: jax.Array) -> jax.Array:
        kind = KINDS[name]
        lead = tuple(data.shape[:-1])
        blocks = data[..., :kind.row_bytes(self.cols)].reshape(lead + kind.blocks(self.cols))
        return kind.decode(blocks).reshape(lead + (self.cols,))

    def dequantize(self, dtype=None) -> jax.Array:
        """The weight [..., out, in] as `dtype` (default: self.dtype), in jnp."""
        data = jnp.asarray(self.data)
        if self.layer_kind is None:
            values = self._decode(self.kind, data)
        else:
            branches = [lambda d, name=name: self._decode(name, d) for name in self.kinds]
            pick = lambda index, d: lax.switch(index, branches, d)  # noqa: E731
            index = jnp.asarray(self.layer_kind)
            for _ in range(index.ndim):  # a whole stack: every branch, then a select
                pick = jax.vmap(pick)
            values = pick(index, data)
        return values.astype(self.dtype if dtype is None else dtype)

    def layer(self, i: int) -> QuantizedWeight:
        """Leading index `i` (a layer of a stack) as a one-kind weight of host bytes."""
        name = self.kinds[0 if self.layer_kind is None else int(np.asarray(self.layer_kind)[i])]
        rows = np.asarray(self.data[i])[..., :KINDS[name].row_bytes(self.cols)]
        return QuantizedWeight(rows, kind=name, cols=self.cols, dtype=self.dtype)

    @classmethod
    def from_bytes(cls, data, kind: str, *, dtype=None) -> QuantizedWeight:
        """Wrap stored rows as they are, e.g. a tensor's data from `gguf.GGUFReader`
        (uint8 [..., out, row_bytes]; F16/F32 tensors come typed [..., out, in])."""
        k = _kind(kind)
        data = np.ascontiguousarray(data)
        if data.ndim < 2:
            raise ValueError(f"{kind} rows must be [..., out, row_bytes], got shape {data.shape}")
        data = data.view(np.uint8)
        row = data.shape[-1]
        if k.block_elements and row % k.block_bytes or row < k.block_bytes:
            raise ValueError(f"{kind} rows of {row} bytes are not whole blocks of {k.block_bytes}")
        return cls(jnp.asarray(data), kind=k.name, cols=k.cols(row), dtype=_dtype_name(dtype))


def put_layer(stack: QuantizedWeight, i: int, weight: QuantizedWeight) -> QuantizedWeight:
    """`stack` (host numpy data) with layer `i` set to the one-kind `weight`: written in
    place when its kind is already in the stack, else into a copy that adds the kind
    (mixed, rows padded to the widest kind)."""
    if weight.cols != stack.cols or tuple(weight.data.shape[:-1]) != tuple(stack.data.shape[1:-1]):
        raise ValueError(f"a {weight.kind} layer of shape {weight.shape} does not fit a stack of {stack.shape}")
    if weight.kind not in stack.kinds:
        kinds = stack.kinds + (weight.kind,)
        width = max(KINDS[k].row_bytes(stack.cols) for k in kinds)
        data = np.zeros(stack.data.shape[:-1] + (width,), np.uint8)
        data[..., :stack.data.shape[-1]] = np.asarray(stack.data)
        index = np.zeros(stack.data.shape[:1], np.int32) if stack.layer_kind is None else \
            np.array(stack.layer_kind, np.int32)
        stack = stack.replace(data=data, kind=kinds, layer_kind=index)
    rows = np.asarray(weight.data)
    stack.data[i, ..., :rows.shape[-1]] = rows
    stack.data[i, ..., rows.shape[-1]:] = 0
    if stack.layer_kind is not None:
        stack.layer_kind[i] = stack.kinds.index(weight.kind)
    return stack


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def dequantize(x: Any, dtype=None) -> Any:
    """A QuantizedWeight's values; any other array is passed through unchanged (dtype too)."""
    return x.dequantize(dtype) if is_quantized(x) else x


def dequantize_tree(tree: Any, dtype=None) -> Any:
    """`tree` with every QuantizedWeight replaced by its values (a float copy of each)."""
    return jax.tree.map(lambda x: dequantize(x, dtype), tree, is_leaf=is_quantized)


# --------------------------------------------------------------------------- quantizing


def _encode_rows(kind: Kind, x: np.ndarray) -> np.ndarray:
    """float [..., n, cols] -> uint8 [..., n, row_bytes], a bounded number of elements at a time."""
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty((rows.shape[0], kind.row_bytes(x.shape[-1])), np.uint8)
    step = max(1, (1 << 22) // max(1, x.shape[-1]))
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = np.asarray(kind.encode(rows[i:i + step])).view(np.uint8)
    return out.reshape(x.shape[:-1] + (out.shape[-1],))


def quantize(w, kind: str, *, dtype=None) -> QuantizedWeight:
    """Quantize a float weight [..., out, in] (host numpy) to `kind`; `dtype` is what
    `dequantize` returns by default (float32)."""
    k = _kind(kind)
    x = np.asarray(w, dtype=np.float32)
    _check_shape(x.shape, k)
    _check_finite(x, k)
    return QuantizedWeight(jnp.asarray(_encode_rows(k, x)), kind=k.name, cols=x.shape[-1], dtype=_dtype_name(dtype))


def abstract(w: jax.ShapeDtypeStruct, kind: str) -> QuantizedWeight:
    """The shape of `quantize(w, kind)` for a weight shape [..., out, in], nothing computed:
    for compiling a step on a quantized model that is not there (memory plans)."""
    k = _kind(kind)
    _check_shape(tuple(w.shape), k)
    data = jax.ShapeDtypeStruct(tuple(w.shape[:-1]) + (k.row_bytes(w.shape[-1]),), jnp.uint8)
    return QuantizedWeight(data, kind=k.name, cols=w.shape[-1], dtype=_dtype_name(w.dtype))


def quantize_rows(q: QuantizedWeight, rows, values) -> QuantizedWeight:
    """Requantize rows `rows` of `q` from float `values` [..., r, in]; every other row's
    bytes stay as they are. `rows` is [r] (the same rows under every leading index) or
    [..., r] (per leading index, e.g. per layer). Blocks never cross rows, so a row's
    bytes depend on that row alone. A mixed stack requantizes each layer in its own kind."""
    lead, out = tuple(q.data.shape[:-2]), q.data.shape[-2]
    rows = np.asarray(rows)
    x = np.asarray(values, dtype=np.float32)
    r = rows.shape[-1] if rows.ndim else -1
    if rows.ndim not in (1, len(lead) + 1) or rows.shape[:-1] not in ((), lead) or x.shape != lead + (r, q.cols):
        raise ValueError(f"quantize_rows: rows {rows.shape} and values {x.shape} "
                         f"do not fit a weight of shape {q.shape}")
    if rows.size and not (rows.dtype.kind in "iu" and -out <= rows.min() and rows.max() < out):
        raise ValueError(f"quantize_rows: rows must be integers in [-{out}, {out}), got {rows.min()}..{rows.max()}")
    if r == 0:
        return q
    if q.layer_kind is not None:
        rows = np.broadcast_to(rows, lead + (r,))
        stack = q.replace(data=np.array(q.data), layer_kind=np.array(q.layer_kind, np.int32))
        for i in range(lead[0]):
            stack = put_layer(stack, i, quantize_rows(q.layer(i), rows[i], x[i]))
        return stack.replace(data=jnp.asarray(stack.data), layer_kind=jnp.asarray(stack.layer_kind))
    k = _kind(q.kind)
    _check_finite(x, k)
    new = _encode_rows(k, x).reshape((-1, r, q.data.shape[-1]))
    rows = np.broadcast_to(rows % out, lead + (r,)).reshape(-1, r)
    layer = np.arange(rows.shape[0])[:, None]
    flat = q.data.reshape((-1,) + tuple(q.data.shape[-2:]))
    if isinstance(flat, np.ndarray):
        flat = flat.copy()
        flat[layer, rows] = new
    else:
        flat = flat.at[layer, rows].set(jnp.asarray(new))
    return q.replace(data=flat.reshape(q.data.shape))


# --------------------------------------------------------------------------- bitsandbytes NF4


def nf4_from_bnb(packed_codes, absmax, shape) -> QuantizedWeight:
    """bitsandbytes' NF4 storage (blocksize 64, no double quantization) -> a QuantizedWeight.

    packed_codes: the codes of the row-major flattened weight, two per byte, high nibble
    first (bnb's [n / 2, 1] uint8, or any dtype it was stored as); absmax: float32, one per
    64 consecutive elements; shape: the weight's [..., out, in], `in` a multiple of 64 so
    that blocks never cross rows.
    """
    shape = tuple(int(s) for s in shape)
    _check_shape(shape, KINDS["nf4"])
    n_blocks = int(np.prod(shape)) // NF4_BLOCK
    absmax = np.asarray(absmax)
    if absmax.dtype != np.float32:
        raise ValueError(f"nf4 absmax must be float32 (dequantize a double-quantized absmax first), got {absmax.dtype}")
    codes = np.ascontiguousarray(packed_codes).reshape(-1).view(np.uint8)
    if codes.size != n_blocks * NF4_BLOCK // 2 or absmax.size != n_blocks:
        raise ValueError(f"nf4 codes ({codes.size} bytes) and absmax ({absmax.size}) do not fit shape {shape}")
    blocks = np.concatenate([_le_bytes(absmax.reshape(-1), np.float32), codes.reshape(n_blocks, -1)], axis=-1)
    return QuantizedWeight(jnp.asarray(blocks.reshape(shape[:-1] + (-1,))), kind="nf4", cols=shape[-1])


def nf4_to_bnb(q: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """An nf4 QuantizedWeight -> (packed codes uint8 [n / 2, 1], absmax float32 [n / 64]),
    bitsandbytes' layout for the row-major flattened weight."""
    if q.kind != "nf4":
        raise ValueError(f"nf4_to_bnb needs an nf4 weight, got {q.kind}")
    blocks = np.asarray(q.data).reshape(-1, 4 + NF4_BLOCK // 2)
    absmax = np.ascontiguousarray(blocks[:, :4]).view("<f4").reshape(-1).astype(np.float32)
    return np.ascontiguousarray(blocks[:, 4:]).reshape(-1, 1), absmax
