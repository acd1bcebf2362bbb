"""TokenTune: run the forward pass on all tokens, backpropagate through k of them.

Each example's tokens are split into a selected set (k per row, static) and the
rest. Both run through every layer, so the logits equal `llama.forward`'s; but
the rest are computed from `stop_gradient`ed inputs and a `stop_gradient`ed
delta, so the backward pass never visits them and none of their activations are
kept. Selected queries attend to the keys/values of all tokens, the unselected
ones acting as constants. Activation memory therefore scales with k, not T.

Arrays in and out (B batch, T sequence, k selected per row):

    indices, valid = sample_tokens(key, attention_mask [B, T], fraction)
        TokenTune's own sampling: each row keeps int(fraction * (len - 2)) + 2 of its
        len real tokens (the first, the last, the rest uniformly at random from the
        middle); k = that count for the padded length T keeps the shape static.
        indices: [B, k] int32, ascending, distinct; valid: [B, k] bool, False where
        a row keeps fewer than k tokens and a padding position filled the slot
    indices, valid = select_tokens(key, attention_mask, k, prefer=None)
        the lower-level choice: k per row, real tokens first
    logits = forward(cfg, params, input_ids [B, T], indices, attention_mask, delta)
        logits: [B, T, vocab], as `llama.forward`; gradients flow from the selected
        positions' logits only
    labels = restrict_labels(labels [B, T], indices, valid)
        -100 except where the logits at position t (which predict labels[t + 1])
        are selected, so a causal-LM loss counts selected positions only
    loss_sum, count = selected_causal_lm_loss(cfg, params, input_ids, indices, labels,
                                              attention_mask, delta, valid=valid)
        the same loss and gradient as `causal_lm_loss(forward(...), restrict_labels(...))`
        with the head run on the k selected tokens only: no [B, T, vocab] logits

A training step:

    indices, valid = sample_tokens(key, batch["attention_mask"], 0.25)
    loss_sum, count = selected_causal_lm_loss(cfg, params, batch["input_ids"], indices,
                                              batch["labels"], batch["attention_mask"],
                                              delta, valid=valid)
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spsft_jax import llama
from spsft_jax.llama import LlamaConfig, Params
from spsft_jax.trees import get
from spsft_jax.losses import IGNORE_INDEX, blocked_cross_entropy

# Unselected queries attend in blocks of max(k, this) (at most `chunk_tokens`):
# transients no larger than the selected path's, without a long loop of tiny blocks.
MIN_QUERY_CHUNK = 64


# --------------------------------------------------------------------------- selection


def num_selected(seq_len: int, fraction_or_count: float | int) -> int:
    """Tokens to backpropagate through per row: a fraction in (0, 1] of `seq_len`
    (rounded up) or an int count; at least 2 (the first and last token), at most `seq_len`.

    >>> [num_selected(512, 0.25), num_selected(512, 1.0), num_selected(512, 64)]
    [128, 512, 64]
    >>> num_selected(10, 0.01)  # never fewer than the first and last token
    2
    """
    if isinstance(fraction_or_count, bool):
        raise TypeError("fraction_or_count: give a fraction in (0, 1] or an int count, not a bool")
    if isinstance(fraction_or_count, numbers.Integral):
        count = int(fraction_or_count)
        if count < 1:
            raise ValueError(f"token count {count} must be at least 1")
    else:
        fraction = float(fraction_or_count)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"token fraction {fraction} must be in (0, 1]")
        # Round away float noise first (0.3 * 10 is 3.0000000000000004, not 4 tokens).
        count = math.ceil(round(fraction * seq_len, 6))
    return min(seq_len, max(2, count))


def num_slots(seq_len: int, fraction_or_count: float | int) -> int:
    """Static slots per row for `sample_tokens`: what a row of `seq_len` real tokens keeps.

    >>> [num_slots(512, 0.25), num_slots(512, 1.0), num_slots(512, 64), num_slots(10, 0.01)]
    [129, 512, 64, 2]
    """
    num_selected(seq_len, fraction_or_count)  # validates the argument
    if isinstance(fraction_or_count, numbers.Integral):
        return min(seq_len, int(fraction_or_count))
    return min(seq_len, int(float(fraction_or_count) * (seq_len - 2)) + 2)


def row_counts(attention_mask: jax.Array, fraction_or_count: float | int) -> jax.Array:
    """`[B]` int32 tokens each row keeps, from its real length n (TokenTune's reference):
    `int(fraction * (n - 2)) + 2` (a count c: `min(c, n)`), never more than n."""
    num_selected(attention_mask.shape[1], fraction_or_count)  # validates the argument
    lengths = attention_mask.astype(jnp.int32).sum(axis=1)
    if isinstance(fraction_or_count, numbers.Integral):
        return jnp.minimum(lengths, int(fraction_or_count))
    # A table over every possible length, in Python floats as the reference computes it.
    table = np.array([row_count(n, fraction_or_count) for n in range(attention_mask.shape[1] + 1)],
                     np.int32)
    return jnp.asarray(table)[lengths]


def row_count(n: int, fraction_or_count: float | int) -> int:
    """Tokens a row of n real tokens keeps (see `row_counts`)."""
    if isinstance(fraction_or_count, numbers.Integral):
        return min(n, int(fraction_or_count))
    return min(n, int(float(fraction_or_count) * (n - 2)) + 2)


def reaches_loss(labels: Sequence[int], fraction_or_count: float | int) -> bool:
    """Whether TokenTune's sampling can backpropagate through a loss-bearing token of an
    example with these labels: the first and last tokens are always kept (the last
    carries no loss), middle ones only when the row's count leaves room for them."""
    n = len(labels)
    carries = [labels[t + 1] != IGNORE_INDEX for t in range(n - 1)]  # position t predicts t + 1
    return bool(carries[:1] and carries[0]) or (row_count(n, fraction_or_count) > 2 and any(carries[1:]))


def sample_tokens(key: jax.Array, attention_mask: jax.Array, fraction_or_count: float | int, *,
                  prefer: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """TokenTune's sampling: per row, `row_counts` tokens: the first and last real token
    and uniformly random ones between them. Shapes are static: k = `num_slots(T, ...)`,
    and the slots a shorter row does not use hold padding positions with valid False.

    prefer: optional `[B, T]` bool (e.g. `loss_bearing(labels)`): draw the middle
        tokens from these first. A departure from TokenTune, which draws uniformly
        (prompt tokens then never carry gradient through their keys and values).
    Returns (indices [B, k] int32 ascending, valid [B, k] bool).
    """
    k = num_slots(attention_mask.shape[1], fraction_or_count)
    counts = row_counts(attention_mask, fraction_or_count)
    return select_tokens(key, attention_mask, k, prefer=prefer, counts=counts)


def loss_bearing(labels: jax.Array) -> jax.Array:
    """`[B, T]` bool: the positions whose logits carry loss (labels[t + 1] != -100).

    Use as `prefer=` in `select_tokens` so the selected tokens are those with a loss.
    """
    carries = labels[:, 1:] != IGNORE_INDEX
    return jnp.pad(carries, ((0, 0), (0, 1)))


def select_tokens(
    key: jax.Array, attention_mask: jax.Array, k: int, *, prefer: jax.Array | None = None,
    counts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Choose k positions per row to backpropagate through, uniformly at random.

    counts: optional `[B]` int, at most k: row b keeps exactly counts[b] real tokens
    (its first and last, then random middle ones, from `prefer` first), and its other
    slots take padding positions, valid False (see `sample_tokens`). Without it:

    Priority, highest first: the first and the last real token of each row (always
    kept), real tokens where `prefer` is True, other real tokens, padding. Within a
    tier the order is random, drawn from `key` (same key, same choice). Padding is
    only taken to keep the shape static when a row has fewer than k real tokens;
    `valid` marks those slots False, and `restrict_labels` then drops their loss.

    key: a jax PRNG key; attention_mask: [B, T] (1 real, 0 padding); k: static int;
    prefer: optional [B, T] bool, e.g. `loss_bearing(labels)`.
    Returns (indices [B, k] int32 ascending and distinct, valid [B, k] bool).
    """
    b, t = attention_mask.shape
    if not 1 <= k <= t:
        raise ValueError(f"k={k} tokens must be between 1 and the sequence length {t}")
    real = attention_mask.astype(bool)
    positions = jnp.arange(t)
    first = jnp.argmax(real, axis=1)
    last = t - 1 - jnp.argmax(real[:, ::-1], axis=1)
    ends = real & ((positions == first[:, None]) | (positions == last[:, None]))
    preferred = real if prefer is None else real & prefer.astype(bool)
    draw = jax.random.uniform(key, (b, t))
    if counts is not None:
        middle = real & ~ends
        # Rank the middle tokens of each row by a random draw (preferred ones first) and
        # keep as many as the row's count leaves after its ends.
        order = jnp.where(middle, draw + preferred, -1.0)
        rank = jnp.argsort(jnp.argsort(-order, axis=1, stable=True), axis=1, stable=True)
        wanted = counts.astype(jnp.int32) - ends.sum(axis=1)
        keep = ends | (middle & (rank < wanted[:, None]))
        # Kept tokens first, then padding; real tokens left out only if nothing else fits.
        _, chosen = jax.lax.top_k(2.0 * keep + ~real, k)
        indices = jnp.sort(chosen, axis=1).astype(jnp.int32)
        return indices, jnp.take_along_axis(keep, indices, axis=1)
    # Integer tier plus a uniform draw in [0, 1): top-k takes whole tiers first, random within.
    tier = real.astype(jnp.float32) + preferred + 2.0 * ends
    score = tier + draw
    _, chosen = jax.lax.top_k(score, k)
    indices = jnp.sort(chosen, axis=1).astype(jnp.int32)
    return indices, jnp.take_along_axis(real, indices, axis=1)


def selected_mask(token_indices: jax.Array, seq_len: int,
                  valid: jax.Array | None = None) -> jax.Array:
    """`[B, T]` bool, True at the selected (and valid) positions."""
    b = token_indices.shape[0]
    marks = jnp.ones(token_indices.shape, bool) if valid is None else valid.astype(bool)
    return jnp.zeros((b, seq_len), bool).at[jnp.arange(b)[:, None], token_indices].set(marks)


def unselected_indices(token_indices: jax.Array, seq_len: int) -> jax.Array:
    """`[B, T - k]` int32: the positions not in `token_indices`, ascending."""
    k = token_indices.shape[1]
    chosen = selected_mask(token_indices, seq_len)
    # A stable sort of "not chosen" puts the chosen first and the rest after, each in order.
    order = jnp.argsort(~chosen, axis=1, stable=True)
    return order[:, k:].astype(jnp.int32)


def selected_targets(labels: jax.Array, token_indices: jax.Array,
                     valid: jax.Array | None = None) -> jax.Array:
    """`[B, k]`: the label each selected position's logits predict, labels[t + 1]
    (-100 for the last position, which predicts nothing, and for padding fill)."""
    next_labels = jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)
    targets = jnp.take_along_axis(next_labels, token_indices, axis=1)
    return targets if valid is None else jnp.where(valid, targets, IGNORE_INDEX)


def restrict_labels(labels: jax.Array, token_indices: jax.Array,
                    valid: jax.Array | None = None) -> jax.Array:
    """Labels with -100 everywhere except the targets of the selected positions.

    HF convention: the loss at position t compares logits[t] with labels[t + 1], so a
    selected t keeps labels[t + 1]. Slots with `valid` False (padding fill) keep nothing.
    """
    keep = selected_mask(token_indices, labels.shape[1], valid)
    keep = jnp.pad(keep[:, :-1], ((0, 0), (1, 0)))  # shift: label t+1 belongs to logits t
    return jnp.where(keep, labels, IGNORE_INDEX)


# --------------------------------------------------------------------------- split forward


def _take(x: jax.Array, indices: jax.Array) -> jax.Array:
    """`x[b, indices[b]]` for `x [B, T, ...]` and `indices [B, n]` -> `[B, n, ...]`."""
    return x[jnp.arange(x.shape[0])[:, None], indices]


def _interleave(selected: jax.Array, rest: jax.Array, sel_idx: jax.Array,
                rest_idx: jax.Array) -> jax.Array:
    """Put `[B, k, ...]` and `[B, T-k, ...]` back at their original positions: `[B, T, ...]`."""
    b, t = selected.shape[0], sel_idx.shape[1] + rest_idx.shape[1]
    rows = jnp.arange(b)[:, None]
    out = jnp.zeros((b, t) + selected.shape[2:], selected.dtype)
    # Scatter-set: its transpose for `selected` is a gather of only k positions.
    out = out.at[rows, sel_idx].set(selected, unique_indices=True)
    return out.at[rows, rest_idx].set(rest.astype(selected.dtype), unique_indices=True)


def _attend_constant(q, keys, values, allowed, chunk: int, options: dict):
    """`llama.attend` for the unselected queries, `chunk` queries at a time.

    Nothing here is differentiated, so its values need not be kept: running the
    queries in blocks bounds the transient scores to `[B, heads, chunk, T]`
    instead of `[B, heads, T - k, T]`. `jax.checkpoint` stops the scan's partial
    evaluation from hoisting the loop-invariant mask broadcasts out of the layer
    loop, where they would be materialised at full `[B, heads, T - k, T]` size.
    """

    def one_query(q_and_allowed):
        q_t, allowed_t = q_and_allowed  # [B, heads, hd], [B, Tk]
        return llama.attend(q_t[:, None], keys, values, allowed_t[:, None], **options)[:, 0]

    def blocks(q, allowed):
        if q.shape[1] <= chunk:
            return llama.attend(q, keys, values, allowed, **options)
        out = jax.lax.map(one_query, (q.swapaxes(0, 1), allowed.swapaxes(0, 1)), batch_size=chunk)
        return out.swapaxes(0, 1)

    return jax.checkpoint(blocks, prevent_cse=False)(q, allowed)


def _rest_query_chunk(k: int, chunk_tokens: int | None) -> int:
    chunk = max(k, MIN_QUERY_CHUNK)
    return min(chunk, chunk_tokens) if chunk_tokens else chunk


def split_stack(
    cfg: LlamaConfig,
    params: Params,
    input_ids: jax.Array,
    token_indices: jax.Array,
    attention_mask: jax.Array | None = None,
    delta: Any = None,
    *,
    position_ids: jax.Array | None = None,
    query_chunk: int | None = None,
    chunk_tokens: int | None = llama.CHUNK_TOKENS,
) -> tuple[tuple[jax.Array, jax.Array], Callable, jax.Array]:
    """((h_selected [B, k, D], h_rest [B, T-k, D]), body, rest_indices [B, T-k]): the
    two halves' embeddings and the layer that carries both, `body((h_sel, h_rest),
    (layer_weights, layer_delta)) -> ((h_sel, h_rest), None)`, as `llama.scan_layers`
    runs it (`llama.decoder_stack` for the split forward; arguments as `forward`)."""
    b, t = input_ids.shape
    chunk = query_chunk or _rest_query_chunk(token_indices.shape[1], chunk_tokens)
    sel_idx = token_indices.astype(jnp.int32)
    rest_idx = unselected_indices(sel_idx, t)
    positions = llama.default_positions(input_ids) if position_ids is None else position_ids
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    frozen_params, frozen_delta = jax.lax.stop_gradient((params, delta))

    h_sel = llama.embed(cfg, params, _take(input_ids, sel_idx), delta)
    h_rest = llama.embed(cfg, frozen_params, _take(input_ids, rest_idx), frozen_delta)
    pos_sel, pos_rest = _take(positions, sel_idx), _take(positions, rest_idx)
    cos_sel, sin_sel = llama.rope_tables(cfg, pos_sel, h_sel.dtype)
    cos_rest, sin_rest = llama.rope_tables(cfg, pos_rest, h_sel.dtype)
    # Keys are laid out [selected, rest]; the mask compares original token indices, so no reorder.
    kv_index = jnp.concatenate([sel_idx, rest_idx], axis=1)
    kv_valid = jnp.concatenate([_take(valid, sel_idx), _take(valid, rest_idx)], axis=1)
    masks_sel = llama.attention_masks(cfg, sel_idx, kv_index, kv_valid)
    masks_rest = llama.attention_masks(cfg, rest_idx, kv_index, kv_valid)
    options = llama.attention_options(cfg)

    def body(carry, layer_and_delta):
        h_sel, h_rest = carry
        layer, layer_delta = layer_and_delta
        # The rest path sees only constants: no tangent, hence nothing saved for it.
        h_rest = jax.lax.stop_gradient(h_rest)
        frozen_layer, frozen_layer_delta = jax.lax.stop_gradient((layer, layer_delta))
        q_sel, k_sel, v_sel = llama.attention_inputs(cfg, layer, layer_delta, h_sel, cos_sel, sin_sel)
        q_rest, k_rest, v_rest = llama.attention_inputs(
            cfg, frozen_layer, frozen_layer_delta, h_rest, cos_rest, sin_rest)
        keys = jnp.concatenate([k_sel, k_rest], axis=1)
        values = jnp.concatenate([v_sel, v_rest], axis=1)
        attn_sel = llama.layer_attention(cfg, layer, q_sel, keys, values, masks_sel, chunk_tokens)
        kind = llama.layer_kind(cfg, layer)
        attn_rest = _attend_constant(q_rest, jax.lax.stop_gradient(keys), jax.lax.stop_gradient(values),
                                     masks_rest[kind], chunk, options)
        h_sel = llama.layer_output(cfg, layer, layer_delta, h_sel, attn_sel)
        h_rest = llama.layer_output(cfg, frozen_layer, frozen_layer_delta, h_rest, attn_rest)
        return (h_sel, h_rest), None

    return (h_sel, h_rest), body, rest_idx


def split_hidden_states(
    cfg: LlamaConfig,
    params: Params,
    input_ids: jax.Array,
    token_indices: jax.Array,
    attention_mask: jax.Array | None = None,
    delta: Any = None,
    *,
    position_ids: jax.Array | None = None,
    remat: str | Callable | bool | None = None,
    query_chunk: int | None = None,
    chunk_tokens: int | None = llama.CHUNK_TOKENS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decoder output before the final norm, split: (h_selected [B, k, D],
    h_rest [B, T-k, D] (constant: no gradient), rest_indices [B, T-k]).

    One `lax.scan` over the stacked layers carries both halves; arguments as `forward`.
    """
    carry, body, rest_idx = split_stack(cfg, params, input_ids, token_indices, attention_mask, delta,
                                        position_ids=position_ids, query_chunk=query_chunk,
                                        chunk_tokens=chunk_tokens)
    h_sel, h_rest = llama.scan_layers(body, carry, llama.layer_stack(cfg, params), get(delta, "layers"), remat)
    return h_sel, jax.lax.stop_gradient(h_rest), rest_idx


def split_logits(cfg: LlamaConfig, params: Params, h_sel: jax.Array, h_rest: jax.Array,
                 token_indices: jax.Array, rest_indices: jax.Array, delta: Any = None) -> jax.Array:
    """Logits `[B, T, vocab]` from the split decoder output, gradients from the selected
    positions only. The head runs per half: the backward pass multiplies only k rows."""
    logits_sel = llama.head(cfg, params, h_sel, delta)
    frozen_params, frozen_delta, h_rest = jax.lax.stop_gradient((params, delta, h_rest))
    logits_rest = llama.head(cfg, frozen_params, h_rest, frozen_delta)
    return _interleave(logits_sel, logits_rest, token_indices.astype(jnp.int32), rest_indices)


def selected_loss(cfg: LlamaConfig, params: Params, h_sel: jax.Array, targets: jax.Array,
                  delta: Any = None, chunk_tokens: int | None = llama.CHUNK_TOKENS
                  ) -> tuple[jax.Array, jax.Array]:
    """(summed loss, loss tokens) of the selected positions' `targets` (`selected_targets`),
    the head run on `h_sel` only, `chunk_tokens` at a time."""
    token_losses, counts = blocked_cross_entropy(lambda h: llama.head(cfg, params, h, delta), h_sel,
                                                 targets, chunk_tokens)
    return token_losses.sum(), counts.sum(dtype=jnp.int32)


def forward(
    cfg: LlamaConfig,
    params: Params,
    input_ids: jax.Array,
    token_indices: jax.Array,
    attention_mask: jax.Array | None = None,
    delta: Any = None,
    *,
    position_ids: jax.Array | None = None,
    remat: str | Callable | bool | None = None,
    query_chunk: int | None = None,
    chunk_tokens: int | None = llama.CHUNK_TOKENS,
) -> jax.Array:
    """Logits `[B, T, vocab]`, equal to `llama.forward`'s, with gradients through
    the selected tokens only.

    token_indices: `[B, k]` distinct positions (e.g. from `select_tokens`) whose
    activations keep their gradient; every other token is a constant.
    query_chunk: the unselected queries attend this many at a time (default
    max(k, 64), at most `chunk_tokens`); it bounds their transient scores and
    does not change the values. Other arguments as `llama.forward`.

    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
    ...                   num_heads=4, num_kv_heads=2, head_dim=4)
    >>> params = llama.init_params(cfg, jax.random.key(0))
    >>> ids, mask = jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 6), jnp.int32)
    >>> indices, valid = select_tokens(jax.random.key(1), mask, 3)
    >>> forward(cfg, params, ids, indices, mask).shape
    (1, 6, 32)
    """
    h_sel, h_rest, rest_idx = split_hidden_states(
        cfg, params, input_ids, token_indices, attention_mask, delta,
        position_ids=position_ids, remat=remat, query_chunk=query_chunk, chunk_tokens=chunk_tokens)
    return split_logits(cfg, params, h_sel, h_rest, token_indices, rest_idx, delta)


def selected_causal_lm_loss(
    cfg: LlamaConfig,
    params: Params,
    input_ids: jax.Array,
    token_indices: jax.Array,
    labels: jax.Array,
    attention_mask: jax.Array | None = None,
    delta: Any = None,
    *,
    valid: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    remat: str | Callable | bool | None = None,
    query_chunk: int | None = None,
    chunk_tokens: int | None = llama.CHUNK_TOKENS,
) -> tuple[jax.Array, jax.Array]:
    """(summed loss, number of loss tokens) over the selected positions: the value and
    gradient of `causal_lm_loss(forward(...), restrict_labels(labels, token_indices, valid))`
    without ever forming the `[B, T, vocab]` logits.

    Only the selected tokens go through the head (`chunk_tokens` at a time), so
    the logits and their gradient are `[B, k, vocab]`; the unselected tokens' logits,
    which carry no loss, are never computed.
    """
    h_sel, _, _ = split_hidden_states(
        cfg, params, input_ids, token_indices, attention_mask, delta,
        position_ids=position_ids, remat=remat, query_chunk=query_chunk, chunk_tokens=chunk_tokens)
    return selected_loss(cfg, params, h_sel, selected_targets(labels, token_indices, valid), delta,
                         chunk_tokens)
