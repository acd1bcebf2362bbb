"""Losses shared by importance scoring and training.

Labels follow the HF convention: `labels [B, T]` are aligned with `input_ids`, the
loss shifts internally (logits at position t predict the label at t + 1), and
positions whose label is -100 carry no loss.

    logits [B, T, vocab], labels [B, T] int  ->  causal_lm_loss:  (sum_loss [], num_tokens [])
                                            ->  per_example_causal_lm_loss:  ([B], [B])
                                            ->  mean_causal_lm_loss:  []

Cross entropy is computed in float32 whatever the logits' dtype.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from spsft_jax import llama

IGNORE_INDEX = -100


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross entropy (float32) of each position against its target, and the mask of
    positions that count (target != -100); no shift."""
    logits = logits.astype(jnp.float32)
    counts = targets != IGNORE_INDEX
    safe_targets = jnp.where(counts, targets, 0)
    # logsumexp - picked logit: no second [B, T, vocab] array of log-probabilities.
    picked = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    losses = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.where(counts, losses, 0.0), counts


def token_losses(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position cross entropy `[B, T-1]` (float32) and the mask of positions that count."""
    return cross_entropy(logits[:, :-1], labels[:, 1:])


def per_example_causal_lm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed loss `[B]`, number of loss tokens `[B]` int32) for each example."""
    losses, counts = token_losses(logits, labels)
    return losses.sum(axis=-1), counts.sum(axis=-1, dtype=jnp.int32)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed loss, number of loss tokens) over the batch.

    Returning the sum lets callers weight batches by their token counts (gradient
    accumulation, streaming importance) and divide once at the end.
    """
    losses, counts = token_losses(logits, labels)
    return losses.sum(), counts.sum(dtype=jnp.int32)


def mean_causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean loss over the tokens whose label is not -100 (0 when there are none)."""
    total, count = causal_lm_loss(logits, labels)
    return total / jnp.maximum(count, 1)


# Logit elements per block of the loss: a block's logits, their softmax and their
# gradient are the loss's working memory, so a larger vocabulary or batch gets fewer
# tokens per block (Llama 3's 128k vocabulary: 32 tokens a row; 16 MiB of float32).
LOGIT_BLOCK_ELEMENTS = 2**22


def logit_block_tokens(chunk: int | None, batch: int, vocab: int, tokens: int) -> int | None:
    """Tokens per loss block: at most `chunk`, and at most `LOGIT_BLOCK_ELEMENTS`
    logits per block; `None` (no blocking) stays `None`. A size down to half that
    which divides `tokens` is preferred: no shorter last block to compile apart."""
    if not chunk:
        return chunk
    bound = max(1, min(chunk, LOGIT_BLOCK_ELEMENTS // (batch * vocab)))
    return next((size for size in range(bound, bound // 2, -1) if tokens % size == 0), bound)


def blocked_cross_entropy(
    head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, chunk: int | None
) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy(head(hidden), targets)` a block of tokens at a time: `([B, T], [B, T])`.

    head: hidden states `[B, c, D]` -> logits `[B, c, vocab]`. Each block's logits are
    recomputed in the backward pass, so the `[B, T, vocab]` logits and their gradient
    never exist at once (they dominate memory for large vocabularies).
    """
    vocab = jax.eval_shape(head, hidden[:, :1]).shape[-1]
    block = logit_block_tokens(chunk, hidden.shape[0], vocab, hidden.shape[1])
    return llama.token_blocks(lambda hy: cross_entropy(head(hy[0]), hy[1]), (hidden, targets), block)


def chunked_causal_lm_loss(
    head: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array, chunk: int | None
) -> tuple[jax.Array, jax.Array]:
    """`causal_lm_loss(head(hidden), labels)` computed in blocks of at most `chunk`
    positions (`blocked_cross_entropy`)."""
    b = labels.shape[0]
    # Position t predicts labels[t + 1]; the last position predicts nothing.
    targets = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE_INDEX, labels.dtype)], axis=1)
    losses, counts = blocked_cross_entropy(head, hidden, targets, chunk)
    return losses.sum(), counts.sum(dtype=jnp.int32)
