"""Text generation with a key/value cache: greedy, temperature and top-p sampling.

    generate(cfg, params, [[ids of prompt 1], [ids of prompt 2]], max_new_tokens=32,
             delta=delta, stop_ids=(eos,), temperature=0.0, top_p=1.0, seed=0)
      -> [[new ids 1], [new ids 2]]   (each stops at a stop id, which is not returned)
    complete(cfg, params, tokenizer, ["text", ...], chat=True) -> ["reply", ...]

    cache: {"k": [layers, B, S, kv_heads, head_dim], "v": the same}, S = prompt + new tokens

Prompts are left-padded into one batch (length bucketed, so similar prompts share a
compilation); the prompt runs through the layers once (prefill), then one token per
step reads and extends the cache. Everything runs in one jitted function whose
parameters, delta and prompts are arguments: one compilation per shape, not per model.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spsft_jax import llama, trees


def init_cache(cfg: llama.LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def extend(cfg: llama.LlamaConfig, params: llama.Params, cache: dict, input_ids: jax.Array,
           positions: jax.Array, start: jax.Array | int, kv_valid: jax.Array,
           delta: Any = None) -> tuple[jax.Array, dict]:
    """Run `input_ids [B, T]` (rotary `positions [B, T]`) through the layers, writing their
    keys and values to cache slots `start .. start+T-1`; each token attends to the valid
    slots (`kv_valid [B, S]`) up to its own. Returns (final hidden states `[B, T, D]`
    before the norm, the new cache)."""
    b, t = input_ids.shape
    h = llama.embed(cfg, params, input_ids, delta)
    cos, sin = llama.rope_tables(cfg, positions, h.dtype)
    q_index = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    masks = llama.attention_masks(cfg, q_index, llama.default_positions(kv_valid), kv_valid)

    def body(h, xs):
        layer, layer_delta, k_cache, v_cache = xs
        q, k, v = llama.attention_inputs(cfg, layer, layer_delta, h, cos, sin)
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
        attn = llama.layer_attention(cfg, layer, q, k_cache, v_cache, masks)
        return llama.layer_output(cfg, layer, layer_delta, h, attn), (k_cache, v_cache)

    xs = (llama.layer_stack(cfg, params), trees.get(delta, "layers"), cache["k"], cache["v"])
    h, (k, v) = jax.lax.scan(body, h, xs)
    return h, {"k": k, "v": v}


def pick_token(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
               *, sample: bool) -> jax.Array:
    """The next token from `logits [B, vocab]`: argmax, or a draw at `temperature` from the
    smallest set of tokens whose probability reaches `top_p` (nucleus sampling)."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ranked, axis=-1)
    # Keep a token while the mass ranked above it is below top_p (the first is always kept).
    kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sample"))
def _generate(cfg, params, delta, prompt_ids, prompt_mask, key, temperature, top_p, stop_ids, pad_id,
              *, max_new_tokens: int, sample: bool):
    b, p = prompt_ids.shape
    kv_valid = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((b, max_new_tokens), bool)], axis=1)
    lengths = prompt_mask.sum(axis=1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = init_cache(cfg, b, p + max_new_tokens, params["embed_tokens"]["weight"].dtype)

    def next_token(h, cache_key):
        logits = llama.head(cfg, params, h[:, -1], delta)
        return pick_token(logits, cache_key, temperature, top_p, sample=sample)

    h, cache = extend(cfg, params, cache, prompt_ids, positions, 0, kv_valid, delta)
    token = next_token(h, jax.random.fold_in(key, 0))
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    def unfinished(state):
        _, _, _, done, i = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(state):
        cache, token, out, done, i = state
        out = out.at[:, i].set(jnp.where(done, pad_id, token))
        done = done | jnp.isin(token, stop_ids)
        h, cache = extend(cfg, params, cache, token[:, None], (lengths + i)[:, None], p + i, kv_valid, delta)
        return cache, next_token(h, jax.random.fold_in(key, i + 1)), out, done, i + 1

    state = jax.lax.while_loop(unfinished, step, (cache, token, out, done, jnp.int32(0)))
    return state[2]


def generate(
    cfg: llama.LlamaConfig,
    params: llama.Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    delta: Any = None,
    stop_ids: Sequence[int] | int | None = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    pad_id: int = 0,
) -> list[list[int]]:
    """New token ids for each prompt (a list of token ids), up to the first stop id.

    temperature 0 decodes greedily (as transformers' `do_sample=False`); above 0 it samples,
    from the top-p nucleus, reproducibly for a given `seed`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: temperature must be >= 0 and top_p in (0, 1]; got {temperature}, {top_p}")
    from spsft_jax.data import bucket_length

    stop = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids or [])
    width = bucket_length(max(len(p) for p in prompts))
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):  # left padding: every prompt ends in the last column
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    out = np.asarray(_generate(
        cfg, params, delta, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed),
        jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.asarray(stop or [-1], jnp.int32),
        jnp.int32(pad_id), max_new_tokens=max_new_tokens, sample=temperature > 0))
    results = []
    for row in out.tolist():
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        results.append(row[:end])
    return results


def greedy(
    cfg: llama.LlamaConfig,
    params: llama.Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    delta: Any = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """The greedy continuation of each prompt, up to `eos_token_id` (one id or several)."""
    return generate(cfg, params, prompts, max_new_tokens=max_new_tokens, delta=delta,
                    stop_ids=eos_token_id, pad_id=pad_token_id)


# Tokens `complete` generates at most when not told: a few sentences.
DEFAULT_NEW_TOKENS = 96


def complete(
    cfg: llama.LlamaConfig,
    params: llama.Params,
    tokenizer,
    texts: Sequence[str],
    *,
    chat: bool = False,
    tokens=None,
    max_new_tokens: int | None = 32,
    **options,
) -> list[str]:
    """Decoded continuations of `texts`: as raw prompts (with the tokenizer's own BOS), or
    with `chat=True` each as a user message through the chat template. `tokens`: the
    `data.SpecialTokens` giving stop and padding ids (default: the tokenizer's).
    max_new_tokens: None gives `DEFAULT_NEW_TOKENS`, or fewer where the model's context
    leaves fewer after the longest prompt."""
    from spsft_jax import data

    if not texts:
        return []
    tokens = tokens or data.special_tokens(tokenizer)
    prompts = [data.chat_prompt(tokenizer, t) if chat else data.encode_text(tokenizer, t) for t in texts]
    if max_new_tokens is None:
        room = cfg.max_position_embeddings - max(map(len, prompts))
        max_new_tokens = max(1, min(DEFAULT_NEW_TOKENS, room))
    for i, ids in enumerate(prompts, 1):
        if len(ids) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i}: {len(ids)} tokens, with max_new_tokens={max_new_tokens} more, exceed "
                             f"the model's context of {cfg.max_position_embeddings} tokens")
    outputs = generate(cfg, params, prompts, max_new_tokens=max_new_tokens, stop_ids=tokens.stop,
                       pad_id=tokens.pad, **options)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
