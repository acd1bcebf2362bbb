"""One functional decoder for the Llama family of models: Llama (2, 3, 3.1, 3.2),
Mistral, Qwen2/2.5, Qwen3 and Gemma 3 (text), computing the same logits as their
`transformers` `*ForCausalLM`. The families differ only by the switches of `LlamaConfig`
(`FAMILIES` in `spsft_jax.interop.config` says which each one sets).

Parameters are a plain pytree in HF layout (`[out, in]` weights) and HF names,
with the decoder layers stacked on a leading axis of length `num_layers`:

    params = {
      "embed_tokens": {"weight": [vocab, hidden]},
      "layers": {                                   # every leaf has a leading [L] axis
        "input_layernorm":          {"weight": [L, hidden]},
        "self_attn": {"q_proj": {"weight": [L, heads*head_dim, hidden], "bias"?: [L, heads*head_dim]},
                      "k_proj": {...}, "v_proj": {...}, "o_proj": {...},
                      "q_norm"?: {"weight": [L, head_dim]}, "k_norm"?: {...}},     # qk_norm
        "post_attention_layernorm": {"weight": [L, hidden]},
        "pre_feedforward_layernorm"?: {...}, "post_feedforward_layernorm"?: {...},  # sandwich_norms
        "mlp": {"gate_proj": {"weight": [L, ffn, hidden]}, "up_proj": {...}, "down_proj": {...}},
      },
      "norm": {"weight": [hidden]},
      "lm_head": {"weight": [vocab, hidden]},       # absent when embeddings are tied
    }

With `sandwich_norms` (Gemma) `post_attention_layernorm` norms the attention's output and
`pre_feedforward_layernorm` the MLP's input, as in transformers; otherwise
`post_attention_layernorm` is the MLP's input norm.

A `delta` is an optional pytree with the same nesting whose leaves are delta
objects (see `spsft_jax.delta`) sitting where a linear module or a norm is,
e.g. `{"layers": {"mlp": {"up_proj": RowDelta(...)}}}`. Every linear in the
model goes through `linear`, the one place where a frozen weight meets its
trainable delta; the model does not know which method is training.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from spsft_jax import quant
from spsft_jax.trees import get as subtree  # a module's delta, or None where it has none

Params = dict[str, Any]

# Tokens per block of attention queries and of the loss (see `token_blocks`): an
# execution setting that bounds activation memory, passed to the calls as `chunk_tokens`.
CHUNK_TOKENS = 512

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_type` "linear" or "llama3")."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a decoder of the Llama family; hashable, so it can be a static jit
    argument. The fields after `mlp_bias` are the switches other families set (all off
    for Llama). Reading and writing HF `config.json` lives in `spsft_jax.interop.config`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o
    mlp_bias: bool = False
    # HF model_type the config is written back as ("llama", "mistral", "qwen2", "qwen3",
    # "gemma3_text").
    model_type: str = "llama"
    qkv_bias: bool = False  # biases on q, k and v only (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # norms scale by (offset + w), in float32 (Gemma: 1)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma)
    hidden_act: str = "silu"  # of the gate: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    query_pre_attn_scalar: float | None = None  # scores scale by its -1/2 power, not head_dim's
    attn_logit_softcapping: float | None = None  # scores become cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits likewise
    sliding_window: int | None = None  # keys a sliding layer's query sees, itself included
    # Each layer's attention, FULL_ATTENTION or SLIDING_ATTENTION; None: all full.
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None  # RoPE base of sliding layers (Gemma 3); None: rope_theta
    # Token ids carried through to an exported config.json.
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Folder the config was read from (tokenizer files are copied from it on export);
    # not part of the architecture, so it takes no part in equality or hashing.
    source_dir: str | None = dataclasses.field(default=None, compare=False, hash=False)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_layers} layers")
            unknown = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
            if unknown:
                raise ValueError(f"layer_types: {', '.join(sorted(unknown))} not supported "
                                 f"(supported: {FULL_ATTENTION}, {SLIDING_ATTENTION})")
            if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types has sliding layers but sliding_window is not set")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """The distinct attention kinds of the layers, in a fixed order: the leading axis of
        the stacks `rope_tables` and `attention_masks` return."""
        present = set(self.layer_types or (FULL_ATTENTION,))
        return tuple(k for k in (FULL_ATTENTION, SLIDING_ATTENTION) if k in present)

    def layer_kind_indices(self) -> tuple[int, ...]:
        """Each layer's index into `attention_kinds`."""
        kinds = self.attention_kinds
        return tuple(kinds.index(t) for t in (self.layer_types or (FULL_ATTENTION,) * self.num_layers))

    def has_bias(self, module: str) -> bool:
        if module in MLP_MODULES:
            return self.mlp_bias
        return self.attention_bias or (self.qkv_bias and module != "o_proj")

    def layer_norms(self) -> tuple[str, ...]:
        """Names of a layer's hidden-size norms."""
        extra = ("pre_feedforward_layernorm", "post_feedforward_layernorm") if self.sandwich_norms else ()
        return ("input_layernorm", "post_attention_layernorm") + extra

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """`[out, in]` of every per-layer linear, keyed by module name."""
        d, f = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (self.q_size, d),
            "k_proj": (self.kv_size, d),
            "v_proj": (self.kv_size, d),
            "o_proj": (d, self.q_size),
            "gate_proj": (f, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
        }

    def num_params(self) -> int:
        shapes = self.linear_shapes()
        per_layer = sum(o * i for o, i in shapes.values()) + len(self.layer_norms()) * self.hidden_size
        per_layer += sum(shapes[m][0] for m in shapes if self.has_bias(m))
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size


# --------------------------------------------------------------------------- parameters


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal weights, zero biases, norms that scale by one), as
    transformers initialises."""
    keys = iter(jax.random.split(key, 16))
    L = cfg.num_layers

    def normal(shape):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def module(name):
        out, inp = cfg.linear_shapes()[name]
        m = {"weight": normal((L, out, inp))}
        if cfg.has_bias(name):
            m["bias"] = jnp.zeros((L, out), dtype)
        return m

    def norm(shape):  # scales by offset + w: one either way
        return {"weight": jnp.full(shape, 1.0 - cfg.norm_offset, dtype)}

    attention = {n: module(n) for n in ATTENTION_MODULES}
    if cfg.qk_norm:
        attention |= {"q_norm": norm((L, cfg.head_dim)), "k_norm": norm((L, cfg.head_dim))}
    layers = {n: norm((L, cfg.hidden_size)) for n in cfg.layer_norms()}
    layers |= {"self_attn": attention, "mlp": {n: module(n) for n in MLP_MODULES}}
    params = {
        "embed_tokens": {"weight": normal((cfg.vocab_size, cfg.hidden_size))},
        "layers": layers,
        "norm": norm((cfg.hidden_size,)),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"weight": normal((cfg.vocab_size, cfg.hidden_size))}
    return params


def param_shapes(cfg: LlamaConfig, dtype=jnp.float32) -> Params:
    """The parameter pytree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))


TARGET_GROUPS = {
    "all-linear": ("self_attn", ATTENTION_MODULES), "attention": ("self_attn", ATTENTION_MODULES),
    "mlp": ("mlp", MLP_MODULES),
}


def module_paths(targets: str | tuple | list = "all-linear") -> list[tuple[str, ...]]:
    """Paths of the per-layer linears named by `targets`.

    targets: "all-linear", "attention", "mlp" (the paper's FA variant: attention frozen),
    or a list of module names ("q_proj", "up_proj", ...) or paths ("layers", "mlp", "up_proj").
    """
    block_of = {n: "self_attn" for n in ATTENTION_MODULES} | {n: "mlp" for n in MLP_MODULES}
    if isinstance(targets, str):
        if targets not in TARGET_GROUPS:
            raise ValueError(f"targets={targets!r}: choose one of {sorted(TARGET_GROUPS)} "
                             f"or a list of module names {sorted(block_of)}")
        names = list(MLP_MODULES) if targets == "mlp" else list(ATTENTION_MODULES)
        if targets == "all-linear":
            names += list(MLP_MODULES)
        return [("layers", block_of[n], n) for n in names]
    paths = []
    for t in targets:
        if isinstance(t, str):
            if t not in block_of:
                raise ValueError(f"targets: unknown module {t!r}; choose from {sorted(block_of)}")
            paths.append(("layers", block_of[t], t))
        else:
            paths.append(tuple(t))
    return paths


# --------------------------------------------------------------------------- building blocks


def linear(x: jax.Array, module: Mapping[str, jax.Array], delta=None) -> jax.Array:
    """`x @ W.T (+ delta) (+ b)` for an HF-layout `[out, in]` weight.

    The one place where a frozen weight meets its trainable delta: a delta object
    adds its own contribution to the frozen product `y = x @ W.T` (`delta.apply(x, y)`),
    so the merged weight is never formed. A delta that `folds` (a full update, which
    would otherwise cost a second full product) is added to the weight instead.
    """
    if getattr(delta, "folds", False):
        module, delta = delta.fold(module), None
    weight = module["weight"]
    if quant.is_quantized(weight):  # one layer's at a time inside the scan; a wide head by rows
        y = quantized_product(x, weight)
    else:
        y = jnp.einsum("...i,oi->...o", x, weight)
    if delta is not None:
        y = delta.apply(x, y)
    if "bias" in module:
        y = y + module["bias"]
    return y


# Rows of a quantized weight decoded at once: an LM head of 49k-262k rows is multiplied a
# block of rows at a time, so its float copy never exists whole (nor, under a loop, hoisted).
DECODED_ROWS = 8192


def _row_blocks(rows: int) -> int:
    """Blocks of at most DECODED_ROWS that split `rows` evenly (1 when none is near)."""
    least = -(-rows // DECODED_ROWS)
    return next((n for n in range(least, 4 * least + 1) if rows % n == 0), 1)


def quantized_product(x: jax.Array, weight: quant.QuantizedWeight) -> jax.Array:
    """`x @ W.T` for a quantized [out, in] weight, decoded to `x`'s dtype: whole for a
    layer's linear, in row blocks (`lax.scan`, each block recomputed in the backward
    pass) for a weight of many rows."""
    rows = weight.data.shape[-2]
    n = _row_blocks(rows) if weight.data.ndim == 2 else 1
    if n == 1:
        return jnp.einsum("...i,oi->...o", x, weight.dequantize(x.dtype))

    @jax.checkpoint
    def block(_, data):
        return None, jnp.einsum("...i,oi->...o", x, weight.replace(data=data).dequantize(x.dtype))

    _, ys = jax.lax.scan(block, None, jnp.asarray(weight.data).reshape(n, rows // n, -1))
    return jnp.moveaxis(ys, 0, -2).reshape(x.shape[:-1] + (rows,))


def rms_norm(x: jax.Array, module: Mapping[str, jax.Array], eps: float, delta=None,
             offset: float = 0.0) -> jax.Array:
    """RMSNorm over the last axis, scaled by `w` as Llama (in `x`'s dtype), or with an
    `offset` by `offset + w` as Gemma (in float32, then cast)."""
    weight = module["weight"] if delta is None else delta.merge(module)["weight"]
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return (normed * (offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * normed.astype(x.dtype)


def norm(cfg: LlamaConfig, x: jax.Array, module, delta=None) -> jax.Array:
    """The config's RMSNorm (its eps and offset) of `x` by `module`."""
    return rms_norm(x, module, cfg.rms_norm_eps, delta, cfg.norm_offset)


def rope_inv_freq(cfg: LlamaConfig, kind: str = FULL_ATTENTION) -> np.ndarray:
    """Inverse frequencies of the rotary embedding of layers of attention `kind`: the
    config's base and scaling, or for sliding layers with a `local_rope_theta` that base
    unscaled (Gemma 3)."""
    dim = cfg.head_dim
    local = kind == SLIDING_ATTENTION and cfg.local_rope_theta is not None
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    s = None if local else cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    # llama3: leave high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_tables(cfg: LlamaConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape `[kinds, ..., head_dim]` for integer `positions`: one table per
    entry of `cfg.attention_kinds` (a layer picks its own with `layer_kind`)."""
    inv_freq = np.stack([rope_inv_freq(cfg, kind) for kind in cfg.attention_kinds])
    freqs = positions[None, ..., None].astype(jnp.float32) * jnp.asarray(
        inv_freq.reshape((len(inv_freq),) + (1,) * positions.ndim + (-1,)))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x [B, T, heads, head_dim]` by the tables `[B, T, head_dim]` (HF's rotate_half)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def token_blocks(fn: Callable, xs, chunk: int | None):
    """`fn(xs)` for a function that treats tokens (axis 1 of every array in `xs`)
    independently, computed `chunk` tokens at a time.

    Each block is recomputed in the backward pass (one block too), so only one
    block's intermediates exist at once and none are kept between the passes.
    A length that `chunk` does not divide ends with one shorter block, so no block
    is ever longer than `chunk`; `chunk=None` turns blocking and recomputation off.
    """
    if not chunk:
        return fn(xs)
    b, t = jax.tree.leaves(xs)[0].shape[:2]
    block = jax.checkpoint(fn, prevent_cse=False)
    if t <= chunk:
        return block(xs)
    n, rest = divmod(t, chunk)

    def split(x):  # [B, n * chunk, ...] -> [n, B, chunk, ...]
        return jnp.swapaxes(x[:, : n * chunk].reshape(b, n, chunk, *x.shape[2:]), 0, 1)

    def join(y):
        return jnp.swapaxes(y, 0, 1).reshape(b, n * chunk, *y.shape[3:])

    out = jax.tree.map(join, jax.lax.map(block, jax.tree.map(split, xs)))
    if not rest:
        return out
    tail = block(jax.tree.map(lambda x: x[:, n * chunk:], xs))
    return jax.tree.map(lambda y, z: jnp.concatenate([y, z], axis=1), out, tail)


def _attend_block(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                  scale: float | None, softcap: float | None) -> jax.Array:
    b, tq, heads, hd = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, tq, kv_heads, heads // kv_heads, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) * (hd**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = scores.astype(jnp.float32)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, tq, heads, hd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
           query_chunk: int | None = None, *, scale: float | None = None,
           softcap: float | None = None) -> jax.Array:
    """Grouped-query attention.

    q: [B, Tq, heads, hd]; k, v: [B, Tk, kv_heads, hd]; allowed: [B, Tq, Tk] bool.
    Returns [B, Tq, heads, hd]. Scores and softmax are in float32, as transformers' eager path.
    scale: of the scores, default `hd ** -0.5`; softcap: scores become `softcap * tanh(s / softcap)`.
    With `query_chunk`, queries go in blocks (`token_blocks`): the `[heads, Tq, Tk]`
    scores never exist at once, and every query's softmax is unchanged.
    """
    return token_blocks(lambda qa: _attend_block(qa[0], k, v, qa[1], scale, softcap),
                        (q, allowed), query_chunk)


# The leaf `layer_stack` adds to the stacked layers: each layer's index into the kinds of
# `cfg.attention_kinds`, read inside the scan where the layers' kinds differ.
LAYER_KIND = "attention_kind"


def layer_stack(cfg: LlamaConfig, params: Params) -> Params:
    """`params["layers"]` as the layer scan takes them: with each layer's attention kind
    (`LAYER_KIND`) where a model mixes full and sliding layers (Gemma 3)."""
    layers = params["layers"]
    if len(cfg.attention_kinds) == 1:
        return layers
    return {**layers, LAYER_KIND: jnp.asarray(cfg.layer_kind_indices(), jnp.int32)}


def layer_kind(cfg: LlamaConfig, layer) -> int | jax.Array:
    """A layer's index into the per-kind stacks of `rope_tables` and `attention_masks`."""
    if len(cfg.attention_kinds) == 1:
        return 0
    if LAYER_KIND not in layer:
        raise ValueError("the layers of a model with full and sliding attention layers must come "
                         "from llama.layer_stack(cfg, params), which records each layer's kind")
    return layer[LAYER_KIND]


def layer_attention(cfg: LlamaConfig, layer, q, k, v, masks, query_chunk=None) -> jax.Array:
    """`attend` as the layer's attention: its kind's mask from `masks` (`attention_masks`),
    the config's score scale and soft-capping."""
    return attend(q, k, v, masks[layer_kind(cfg, layer)], query_chunk, **attention_options(cfg))


def attention_options(cfg: LlamaConfig) -> dict:
    """`attend`'s keyword arguments for the config: score scale and soft-capping."""
    scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
    return {"scale": scale, "softcap": cfg.attn_logit_softcapping}


def attention_mask_2d(
    q_index: jax.Array, kv_index: jax.Array, kv_valid: jax.Array, *,
    q_segments: jax.Array | None = None, kv_segments: jax.Array | None = None,
) -> jax.Array:
    """`[B, Tq, Tk]` bool: causal over the tokens' indices in the sequence (not their
    rotary positions, which restart in packed rows), key padding, and with segment ids
    (packed examples) a query sees only keys of its own segment."""
    allowed = (kv_index[:, None, :] <= q_index[:, :, None]) & kv_valid[:, None, :]
    if q_segments is not None:
        allowed &= q_segments[:, :, None] == kv_segments[:, None, :]
    return allowed


def attention_masks(cfg: LlamaConfig, q_index: jax.Array, kv_index: jax.Array, kv_valid: jax.Array,
                    **segments) -> jax.Array:
    """`[kinds, B, Tq, Tk]` bool: `attention_mask_2d` for each of `cfg.attention_kinds`, a
    sliding layer's restricted to the `sliding_window` keys up to its query (as transformers'
    `sliding_window_overlay`: `kv_index > q_index - window`)."""
    allowed = attention_mask_2d(q_index, kv_index, kv_valid, **segments)
    masks = []
    for kind in cfg.attention_kinds:
        if kind == SLIDING_ATTENTION:
            masks.append(allowed & (kv_index[:, None, :] > q_index[:, :, None] - cfg.sliding_window))
        else:
            masks.append(allowed)
    return jnp.stack(masks)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 where the segment id changes along a row: `[B, T]`."""
    index = default_positions(segment_ids)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


# --------------------------------------------------------------------------- decoder layer


def attention_projections(cfg, layer, layer_delta, x, cos, sin):
    """Normed input -> rotated q `[B,T,H,hd]`, k and v `[B,T,KV,hd]`; `cos`, `sin` are
    `rope_tables`' stacks, of which the layer takes its kind's."""
    b, t, _ = x.shape
    attention, attention_delta = layer["self_attn"], subtree(layer_delta, "self_attn")
    kind = layer_kind(cfg, layer)
    cos, sin = cos[kind], sin[kind]

    def proj(name, heads):
        y = linear(x, attention[name], subtree(attention_delta, name))
        return y.reshape(b, t, heads, cfg.head_dim)

    def rotated(name, heads):
        y = checkpoint_name(proj(f"{name}_proj", heads), name)
        if cfg.qk_norm:
            y = norm(cfg, y, attention[f"{name}_norm"], subtree(attention_delta, f"{name}_norm"))
        return apply_rope(y, cos, sin)

    q = rotated("q", cfg.num_heads)
    k = rotated("k", cfg.num_kv_heads)
    v = checkpoint_name(proj("v_proj", cfg.num_kv_heads), "v")
    return q, k, v


def attention_output(cfg, layer, layer_delta, attn: jax.Array) -> jax.Array:
    """o_proj of the attention `[B, T, H, hd]`, normed after with `sandwich_norms`."""
    b, t = attn.shape[:2]
    out = linear(attn.reshape(b, t, cfg.q_size), layer["self_attn"]["o_proj"],
                 subtree(layer_delta, "self_attn", "o_proj"))
    if cfg.sandwich_norms:
        out = norm(cfg, out, layer["post_attention_layernorm"],
                   subtree(layer_delta, "post_attention_layernorm"))
    return out


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`silu(gate) * up`, keeping only `gate` and `up` for the backward pass: autodiff
    would also keep `silu(gate)` and its sigmoid, two more `[tokens, intermediate]`
    arrays per layer (the largest activations there are); they are recomputed instead."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dy):
    gate, up = residuals
    sigmoid = jax.nn.sigmoid(gate)
    # d silu(g) / dg = sigmoid(g) (1 + g (1 - sigmoid(g)))
    return dy * up * (sigmoid * (1 + gate * (1 - sigmoid))), dy * (gate * sigmoid)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def geglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`gelu_tanh(gate) * up` (transformers' "gelu_pytorch_tanh")."""
    return jax.nn.gelu(gate, approximate=True) * up


GATES = {"silu": swiglu, "gelu_pytorch_tanh": geglu}


def mlp_block(cfg, layer, layer_delta, h: jax.Array) -> jax.Array:
    """Residual MLP half of a decoder layer: `h + down(act(gate(n)) * up(n))`, the output
    normed too with `sandwich_norms`."""
    mlp, d = layer["mlp"], subtree(layer_delta, "mlp")
    input_norm = "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"
    x = norm(cfg, h, layer[input_norm], subtree(layer_delta, input_norm))
    gated = GATES[cfg.hidden_act](
        checkpoint_name(linear(x, mlp["gate_proj"], subtree(d, "gate_proj")), "gate"),
        checkpoint_name(linear(x, mlp["up_proj"], subtree(d, "up_proj")), "up"))
    out = linear(gated, mlp["down_proj"], subtree(d, "down_proj"))
    if cfg.sandwich_norms:
        out = norm(cfg, out, layer["post_feedforward_layernorm"],
                   subtree(layer_delta, "post_feedforward_layernorm"))
    return h + out


def attention_inputs(cfg, layer, layer_delta, h, cos, sin):
    """First half of a decoder layer up to attention: input norm, rotated q, k and v."""
    x = norm(cfg, h, layer["input_layernorm"], subtree(layer_delta, "input_layernorm"))
    return attention_projections(cfg, layer, layer_delta, x, cos, sin)


def layer_output(cfg, layer, layer_delta, h, attn):
    """Second half of a decoder layer: o_proj and residual, then the residual MLP."""
    attn = checkpoint_name(attn, "attn")
    h = checkpoint_name(h + attention_output(cfg, layer, layer_delta, attn), "mid")
    return mlp_block(cfg, layer, layer_delta, h)


def decoder_layer(cfg, layer, layer_delta, h, cos, sin, masks, chunk_tokens=CHUNK_TOKENS):
    """One decoder layer on hidden states `h [B, T, hidden]`; `cos`, `sin` and `masks` are
    the per-kind stacks of `rope_tables` and `attention_masks`."""
    q, k, v = attention_inputs(cfg, layer, layer_delta, h, cos, sin)
    return layer_output(cfg, layer, layer_delta, h,
                        layer_attention(cfg, layer, q, k, v, masks, chunk_tokens))


# --------------------------------------------------------------------------- model

# What the layer's backward pass keeps (besides its input) when nothing else is
# rematerialized: the attention output before o_proj, the residual stream after
# attention, gate and up, the largest activations there are. Norms, rotary, SwiGLU
# and residual adds are recomputed from them (elementwise), and q, k and v from the
# layer's input: their projections are the one matmul redone, 16% fewer activations
# kept on SmolLM2 (26% on Llama-2-7B) for the same measured step time on the CPU
# (`benchmarks/README.md`; at most 1/8 more arithmetic on 7B shapes). remat="minimal"
# keeps q, k and v too, where memory is plentiful and arithmetic is not.
SAVED_ACTIVATIONS = ("attn", "mid", "gate", "up")

REMAT_POLICIES: dict[str, Callable | None] = {
    "minimal": jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATIONS, "q", "k", "v"),
    "full": None,  # save nothing inside a layer, recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nested": None,  # "full" in groups of layers, keeping only each group's input (`scan_layers`)
}


def remat_layer(fn: Callable, remat: str | Callable | bool | None) -> Callable:
    """Wrap a scanned layer body in `jax.checkpoint`: with no `remat`, saving
    `SAVED_ACTIVATIONS` only; else with a named (`REMAT_POLICIES`) or given policy."""
    if not remat:
        policy = jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATIONS)
    elif remat is True:
        policy = REMAT_POLICIES["full"]
    elif isinstance(remat, str):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: choose one of {sorted(REMAT_POLICIES)}")
        policy = REMAT_POLICIES[remat]
    else:
        policy = remat
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


def layer_group_size(num_layers: int) -> int:
    """Layers per group for `remat="nested"`, which keeps `num_layers / size + size`
    layer inputs at once: the divisor of `num_layers` that keeps fewest, or
    `num_layers` itself (one group: plain "full") where no grouping keeps fewer than
    the `num_layers` inputs of "full"."""
    keeps = {k: num_layers // k + k for k in range(1, num_layers) if num_layers % k == 0}
    fewer = [k for k in sorted(keeps) if keeps[k] < num_layers]
    return min(fewer, key=keeps.get) if fewer else num_layers


def nested_group_size(remat, num_layers: int) -> int:
    """Layers per group whose input alone is kept: `layer_group_size` with
    remat="nested" where grouping keeps fewer inputs than "full", else 1 (no groups)."""
    size = layer_group_size(num_layers) if remat == "nested" else num_layers
    return 1 if size == num_layers else size


def layer_at(stacked, index):
    """Entry `index` of the leading (layer) axis of every leaf of `stacked`: one layer cut
    from the stacks at its use, which XLA reads in place instead of copying a slice."""
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), stacked)


def scan_layers(body: Callable, carry, weights, per_layer, remat: str | Callable | bool | None = None):
    """The final `carry` of `body(carry, (layer_weights, layer_item)) -> (carry, None)`
    run over the layers in turn: `weights` are the stacked layer parameters and
    `per_layer` anything else stacked on the same leading axis (deltas, indices). Each
    layer is checkpointed as `remat` says (`remat_layer`).

    remat="nested" keeps only the inputs of groups of `layer_group_size` layers. The
    backward pass recomputes a group's forward to get its layers' inputs, then each
    layer's as "full" does: about 2 sqrt(L) layer inputs held at once instead of L,
    for one more forward pass, and the same arithmetic as "full". Where grouping keeps
    no fewer inputs (4 layers or fewer, a prime number of layers) it is "full".
    """
    num_layers = jax.tree.leaves(weights)[0].shape[0]
    size = nested_group_size(remat, num_layers)
    if size == 1:
        return jax.lax.scan(remat_layer(body, remat), carry, (weights, per_layer))[0]

    # Layers are cut from the whole stacks at each use. Scanning the stacks reshaped
    # to [groups, size, ...] would make XLA copy them, and a group's frozen weights
    # sliced at once would be a copy of that many layers.
    def layer(carry, index_and_item):
        index, item = index_and_item
        return body(carry, (layer_at(weights, index), item))

    def group(carry, first):
        items = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, first, size), per_layer)
        indices = first + jnp.arange(size)
        return jax.lax.scan(remat_layer(layer, "full"), carry, (indices, items))[0], None

    starts = jnp.arange(0, num_layers, size)
    return jax.lax.scan(jax.checkpoint(group, prevent_cse=False), carry, starts)[0]


def embed(cfg: LlamaConfig, params: Params, input_ids: jax.Array, delta=None) -> jax.Array:
    """The embeddings of `input_ids`, times sqrt(hidden_size) in their dtype with
    `scale_embeddings` (Gemma)."""
    if delta is not None and not isinstance(delta, Mapping):  # e.g. load_delta's (delta, metadata)
        raise TypeError(f"delta must be a nested dict of delta objects or None, not a "
                        f"{type(delta).__name__} (checkpoint.load_delta returns (delta, metadata))")
    module, d = params["embed_tokens"], subtree(delta, "embed_tokens")
    table = module["weight"] if d is None else d.merge(quant.dequantize_tree(module))["weight"]
    if quant.is_quantized(table):  # decode only the rows looked up
        h = table.replace(data=jnp.asarray(table.data)[input_ids]).dequantize()
    else:
        h = table[input_ids]
    if cfg.scale_embeddings:
        h = h * jnp.asarray(cfg.hidden_size ** 0.5, jnp.float32).astype(h.dtype)
    return h


def head(cfg: LlamaConfig, params: Params, h: jax.Array, delta=None) -> jax.Array:
    """Final norm and LM head: hidden states -> logits."""
    h = norm(cfg, h, params["norm"], subtree(delta, "norm"))
    if cfg.tie_word_embeddings:
        # Tied: a delta on the embedding table is a delta on the head too (as `merge` folds it).
        weights, tied = params["embed_tokens"], subtree(delta, "embed_tokens")
        weights = weights if tied is None else tied.merge(quant.dequantize_tree(weights))
    else:
        weights = params["lm_head"]
    logits = linear(h, weights, subtree(delta, "lm_head"))
    if cfg.final_logit_softcapping is not None:
        cap = cfg.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    return logits


def default_positions(input_ids: jax.Array) -> jax.Array:
    """Positions 0..T-1 for every row, as transformers uses when none are given."""
    b, t = input_ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def decoder_stack(
    cfg: LlamaConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    delta=None,
    *,
    position_ids: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_tokens: int | None = CHUNK_TOKENS,
) -> tuple[jax.Array, Callable]:
    """(embeddings `[B, T, hidden]`, `body`): the decoder's input and its layer,
    `body(h, (layer_weights, layer_delta)) -> (h, None)`, as `scan_layers` runs it over
    `layer_stack(cfg, params)`."""
    index = default_positions(input_ids)
    if position_ids is not None:
        positions = position_ids
    else:
        positions = index if segment_ids is None else segment_positions(segment_ids)
    valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    h = embed(cfg, params, input_ids, delta)
    cos, sin = rope_tables(cfg, positions, h.dtype)
    masks = attention_masks(cfg, index, index, valid, q_segments=segment_ids, kv_segments=segment_ids)

    def body(h, layer_and_delta):
        layer, layer_delta = layer_and_delta
        return decoder_layer(cfg, layer, layer_delta, h, cos, sin, masks, chunk_tokens), None

    return h, body


def hidden_states(
    cfg: LlamaConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    delta=None,
    *,
    position_ids: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    remat: str | Callable | bool | None = None,
    chunk_tokens: int | None = CHUNK_TOKENS,
) -> jax.Array:
    """Embeddings through all decoder layers (scanned), before the final norm."""
    h, body = decoder_stack(cfg, params, input_ids, attention_mask, delta, position_ids=position_ids,
                            segment_ids=segment_ids, chunk_tokens=chunk_tokens)
    return scan_layers(body, h, layer_stack(cfg, params), subtree(delta, "layers"), remat)


def forward(
    cfg: LlamaConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    delta=None,
    *,
    position_ids: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    remat: str | Callable | bool | None = None,
    chunk_tokens: int | None = CHUNK_TOKENS,
) -> jax.Array:
    """Logits `[B, T, vocab]` for `input_ids [B, T]`.

    attention_mask: `[B, T]`, 1 for real tokens, 0 for padding (left or right).
    delta: optional trainable delta pytree (see module docstring).
    position_ids: `[B, T]`; default 0..T-1 per row, as transformers (restarting per
        segment when `segment_ids` are given).
    segment_ids: `[B, T]` int, for rows that pack several examples: attention stays
        inside each run of equal ids, so each example's logits are as if it were alone.
    remat: None (keep `SAVED_ACTIVATIONS` for the backward pass), "minimal", "full",
        "dots", "nested" (`scan_layers`) or a `jax.checkpoint` policy for the layer body.
    chunk_tokens: attention queries per block (`token_blocks`), bounding the score
        matrix held at once; None: one block. An execution setting, not architecture.

    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
    ...                   num_heads=4, num_kv_heads=2, head_dim=4)
    >>> params = init_params(cfg, jax.random.key(0))
    >>> forward(cfg, params, jnp.zeros((1, 5), jnp.int32)).shape
    (1, 5, 32)
    """
    h = hidden_states(cfg, params, input_ids, attention_mask, delta,
                      position_ids=position_ids, segment_ids=segment_ids, remat=remat,
                      chunk_tokens=chunk_tokens)
    return head(cfg, params, h, delta)
