"""Greedy decoding, for checking what a fine-tuned model says.

    greedy(cfg, params, [[ids of prompt 1], [ids of prompt 2]], max_new_tokens=16, delta=delta)
      -> [[new ids 1], [new ids 2]]   (stopping at eos_token_id, which is not returned)

Each step runs the whole fixed-length buffer through `llama.forward` (one compilation,
no cache): meant for small models and short answers, not for serving.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spsft_jax import llama


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _decode(cfg, params, delta, buffer, lengths, *, max_new_tokens):
    positions = jnp.arange(buffer.shape[1])
    rows = jnp.arange(buffer.shape[0])

    def step(_, state):
        buffer, lengths = state
        mask = (positions[None, :] < lengths[:, None]).astype(jnp.int32)
        logits = llama.forward(cfg, params, buffer, mask, delta)
        next_token = jnp.argmax(logits[rows, lengths - 1], axis=-1).astype(buffer.dtype)
        return buffer.at[rows, lengths].set(next_token), lengths + 1

    return jax.lax.fori_loop(0, max_new_tokens, step, (buffer, lengths))[0]


def greedy(
    cfg: llama.LlamaConfig,
    params: llama.Params,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 32,
    delta: Any = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """The greedy continuation of each prompt (right-padded into one batch)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy: every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    buffer = np.full((len(prompts), int(lengths.max()) + max_new_tokens), pad_token_id, np.int32)
    for row, p in enumerate(prompts):
        buffer[row, : len(p)] = p
    out = np.asarray(_decode(cfg, params, delta, jnp.asarray(buffer), jnp.asarray(lengths),
                             max_new_tokens=max_new_tokens))
    results = []
    for row, n in enumerate(lengths):
        new = out[row, n: n + max_new_tokens].tolist()
        if eos_token_id is not None and eos_token_id in new:
            new = new[: new.index(eos_token_id)]
        results.append(new)
    return results
