"""One micro-batch's training loss in the parts that a layer scan joins, shared by the
default step (`train.batch_loss`, one `llama.scan_layers`) and the per-layer step
(`layerwise`, one layer at a time):

    stack, finish = loss_parts(cfg, tc, params, batch, key)
    carry, body = stack(delta)                 # embeddings, and the layer as a scan body
    summed_loss, tokens = finish(carry, delta) # head and loss over the last layer's carry

`tc` is a `train.TrainConfig` (TokenTune and block settings are read from it).
"""
from __future__ import annotations

from typing import Callable

import jax

from spsft_jax import delta as deltas
from spsft_jax import llama
from spsft_jax.losses import causal_lm_loss, chunked_causal_lm_loss


def loss_parts(cfg: llama.LlamaConfig, tc, params, batch, key) -> tuple[Callable, Callable]:
    """One micro-batch's loss in the parts that a layer scan joins:

        stack(delta) -> (carry, body)        the decoder's input and its layer,
                                             body(carry, (layer_weights, layer_delta)) -> (carry, None)
        finish(carry, delta) -> (summed token loss, number of loss tokens)

    The carry is the hidden states `[B, T, D]`, or TokenTune's (selected, rest) pair.
    `batch_loss` runs the layers with `llama.scan_layers`; `spsft_jax.layerwise` one at a
    time. `key` draws TokenTune's tokens."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    segments = batch.get("segment_ids")  # packed rows: attention stays inside each example
    if tc.tokentune is None:
        def stack(delta):
            return llama.decoder_stack(cfg, params, ids, mask, delta, segment_ids=segments,
                                       chunk_tokens=tc.chunk_tokens)

        def finish(h, delta):
            return chunked_causal_lm_loss(lambda x: llama.head(cfg, params, x, delta), h, labels,
                                          tc.chunk_tokens)

        return stack, finish
    from spsft_jax import tokentune

    if segments is not None:
        raise NotImplementedError("tokentune with packed batches (segment_ids) is not supported")
    prefer = tokentune.loss_bearing(labels) if tc.tokentune_prefer == "loss" else None
    fraction = int(tc.tokentune) if tc.tokentune > 1 else float(tc.tokentune)
    indices, valid = tokentune.sample_tokens(key, mask, fraction, prefer=prefer)

    def split(delta):
        carry, body, _ = tokentune.split_stack(cfg, params, ids, indices, mask, delta,
                                               chunk_tokens=tc.chunk_tokens)
        return carry, body

    if tc.tokentune_loss == "selected":
        targets = tokentune.selected_targets(labels, indices, valid)
        return split, lambda carry, delta: tokentune.selected_loss(cfg, params, carry[0], targets, delta,
                                                                   tc.chunk_tokens)
    rest = tokentune.unselected_indices(indices, ids.shape[1])
    return split, lambda carry, delta: causal_lm_loss(
        tokentune.split_logits(cfg, params, *carry, indices, rest, delta), labels)


def with_dropout(delta, key):
    """The delta with LoRA dropout drawn from the micro-batch's `key` (None: no dropout)."""
    return delta if key is None else deltas.with_dropout_keys(delta, jax.random.fold_in(key, 1))
