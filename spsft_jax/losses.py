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

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def token_losses(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position cross entropy `[B, T-1]` (float32) and the mask of positions that count."""
    shifted_logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    counts = targets != IGNORE_INDEX
    safe_targets = jnp.where(counts, targets, 0)
    # logsumexp - picked logit: no second [B, T, vocab] array of log-probabilities.
    picked = jnp.take_along_axis(shifted_logits, safe_targets[..., None], axis=-1)[..., 0]
    losses = jax.nn.logsumexp(shifted_logits, axis=-1) - picked
    return jnp.where(counts, losses, 0.0), counts


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
