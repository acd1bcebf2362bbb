"""Multiple-choice benchmarks scored by log-likelihood, as lm-evaluation-harness scores
its `output_type: multiple_choice` tasks for Hugging Face causal models.

Each choice of an item is one request, a (context, continuation) pair of strings; the
score of a choice is the summed log-probability of its continuation's tokens given the
context. An item is right (`acc`) when the highest score is the gold choice's, and
`acc_norm` divides each score by the length of the choice text in characters first.

    items: [Item(requests=((context, continuation), ...), choices=(text, ...), gold=g), ...]
    evaluate(cfg, params, tokenizer, items, delta=delta)
      -> {"n": items, "acc": mean, "acc_stderr": sample std / sqrt(n), "acc_norm", "acc_norm_stderr",
          "items": [{"log_probs": [per choice], "pred": argmax, "pred_norm": argmax of
                     log_probs / len(choice), "gold": g}, ...]}

Tokens as the harness makes them (`encode_pair`): trailing whitespace of the context moves
to the continuation, `whole = encode(context + continuation)`, `context = encode(context)`,
and the continuation is `whole[len(context):]`, with the tokenizer's own special tokens
(a BOS where the tokenizer adds one, none for a text that already starts with it). A
request longer than `max_len + 1` tokens loses its oldest context tokens.

Requests are grouped into rows of identical input (the choices " A", " B", ... of a
question share one forward pass), sorted by length and padded to a few bucketed
shapes. Parameters and the delta are arguments of the jitted scorer, so one
compilation per shape serves any adapter, and logits are formed only at the
continuation's positions, a few tokens at a time (the vocabulary may be 256k wide).
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spsft_jax import llama, losses
from spsft_jax.data import bucket_length
from spsft_jax.losses import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: a (context, continuation) request per choice, the choice texts
    (whose lengths normalise `acc_norm`) and the index of the right one."""

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    gold: int

    @classmethod
    def from_choices(cls, context: str, choices: Sequence[str], gold: int, *, delimiter: str = " ") -> Item:
        """A shared context, each choice scored as its continuation (after `delimiter`)."""
        choices = tuple(choices)
        return cls(tuple((context, delimiter + c) for c in choices), choices, int(gold))

    @classmethod
    def from_contexts(cls, contexts: Sequence[str], continuation: str, gold: int, *,
                      delimiter: str = " ") -> Item:
        """Partial scoring (WinoGrande): each choice is a context, and the shared
        continuation is scored after each; the contexts are the choice texts."""
        contexts = tuple(contexts)
        return cls(tuple((c, delimiter + continuation) for c in contexts), contexts, int(gold))


# --------------------------------------------------------------------------- tokens


def encode_pair(tokenizer, context: str, continuation: str, *,
                add_special_tokens: bool | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness tokenizes a request.

    add_special_tokens: None uses the tokenizer's default (the harness's default,
        `add_bos_token` unset); True or False forces it, as its `add_bos_token=` does.
    """
    if context == "":
        # No context: the BOS (else EOS) token conditions the continuation.
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = _prefix_id(tokenizer)
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation, add_special_tokens)
    context_ids = _encode(tokenizer, context, add_special_tokens)
    return context_ids, whole[len(context_ids):]


def _prefix_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer, text: str, add_special_tokens: bool | None) -> list[int]:
    if add_special_tokens is None:
        prefix = _prefix_id(tokenizer)
        # A text that already starts with the BOS string gets no second one.
        add_special_tokens = prefix is None or not text.startswith(tokenizer.decode(prefix))
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def request_tokens(context_ids: Sequence[int], continuation_ids: Sequence[int],
                   max_len: int) -> tuple[tuple[int, ...], int]:
    """(model input, number of scored tokens): the input is the request without its
    last token, left-truncated to `max_len`; its last n positions predict the continuation."""
    if not continuation_ids:
        raise ValueError("a continuation encodes to no tokens")
    if len(continuation_ids) > max_len:
        raise ValueError(f"a continuation of {len(continuation_ids)} tokens is longer than "
                         f"max_len={max_len}")
    tokens = (list(context_ids) + list(continuation_ids))[-(max_len + 1):]
    return tuple(tokens[:-1]), len(continuation_ids)


# --------------------------------------------------------------------------- scoring


@partial(jax.jit, static_argnames="cfg")
def row_log_probs(cfg: llama.LlamaConfig, params: llama.Params, delta: Any, input_ids: jax.Array,
                  attention_mask: jax.Array, starts: jax.Array, targets: jax.Array) -> jax.Array:
    """Summed log-probabilities `[R, K]` (float32) of K target sequences per row.

    input_ids, attention_mask: `[R, T]`, right-padded. starts: `[R]`, the first position
    whose next-token distribution is scored. targets: `[R, C, K]`, the tokens scored at
    positions start .. start + C - 1 (IGNORE_INDEX past a target's end).
    """
    hidden = llama.hidden_states(cfg, params, input_ids, attention_mask, delta)
    r, c, _ = targets.shape
    positions = jnp.minimum(starts[:, None] + jnp.arange(c), input_ids.shape[1] - 1)
    scored = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [R, C, D]

    def block(xs):
        h, t = xs
        logits = llama.head(cfg, params, h, delta).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, jnp.where(t == IGNORE_INDEX, 0, t), axis=-1)
        log_probs = picked - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        return jnp.where(t == IGNORE_INDEX, 0.0, log_probs)

    chunk = losses.logit_block_tokens(c, r, cfg.vocab_size, c)
    return llama.token_blocks(block, (scored, targets), chunk).sum(axis=1)


@dataclasses.dataclass(frozen=True)
class _Placement:
    """Where the scorer's arrays lie: as they are (no mesh), or laid out on `mesh` by
    `spsft_jax.sharding`, each batch's rows split over the batch axes."""

    mesh: Any = None

    def tree(self, tree):
        if self.mesh is None or tree is None:
            return tree
        from spsft_jax import sharding

        return sharding.shard(tree, self.mesh)

    def batch(self, arrays: dict) -> dict:
        if self.mesh is None:
            return arrays
        from spsft_jax import sharding

        return sharding.place_batch(arrays, self.mesh, axis=0)

    @property
    def rows(self) -> int:
        """The multiple of rows a batch needs."""
        if self.mesh is None:
            return 1
        from spsft_jax import sharding

        return math.prod(dict(self.mesh.shape)[a] for a in sharding.batch_axes(self.mesh))


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def log_likelihoods(cfg: llama.LlamaConfig, params: llama.Params,
                    requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, delta: Any = None,
                    batch_size: int = 16, max_len: int | None = None, progress=None, mesh=None) -> np.ndarray:
    """Log-probability of each (context ids, continuation ids) request's continuation: `[n]`.

    Requests with the same input and scored length share a row; rows are sorted longest
    first and padded to `data.bucket_length` shapes. `progress(k)` is called as k more
    requests are done. mesh: a `jax.sharding.Mesh` or spec ("data=2,fsdp=4"): params and
    delta laid out by `spsft_jax.sharding`, each batch's rows split over the devices.
    """
    max_len = max_len or cfg.max_position_embeddings
    if mesh is not None:
        from spsft_jax import sharding

        mesh = sharding.make_mesh(mesh)
    place = _Placement(mesh)
    params, delta = place.tree(params), place.tree(delta)
    rows: dict[tuple[tuple[int, ...], int], dict[tuple[int, ...], list[int]]] = {}
    for i, (context_ids, continuation_ids) in enumerate(requests):
        key = request_tokens(context_ids, continuation_ids, max_len)
        rows.setdefault(key, {}).setdefault(tuple(continuation_ids), []).append(i)
    order = sorted(rows, key=lambda key: (-len(key[0]), key))
    result = np.zeros(len(requests), np.float64)
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        r = batch_size if len(batch) == batch_size else min(batch_size, _next_power_of_two(len(batch)))
        r = -(-r // place.rows) * place.rows  # whole rows on every device
        t = bucket_length(max(len(ids) for ids, _ in batch))
        c = bucket_length(max(n for _, n in batch))
        k = _next_power_of_two(max(len(rows[key]) for key in batch))
        input_ids = np.zeros((r, t), np.int32)
        mask = np.zeros((r, t), np.int32)
        starts = np.zeros((r,), np.int32)
        targets = np.full((r, c, k), IGNORE_INDEX, np.int32)
        for row, key in enumerate(batch):
            ids, n = key
            input_ids[row, :len(ids)], mask[row, :len(ids)] = ids, 1
            starts[row] = len(ids) - n
            for j, continuation in enumerate(rows[key]):
                targets[row, :n, j] = continuation
        arrays = place.batch({"input_ids": input_ids, "mask": mask, "starts": starts, "targets": targets})
        scores = np.asarray(row_log_probs(cfg, params, delta, arrays["input_ids"], arrays["mask"],
                                          arrays["starts"], arrays["targets"]))
        done = 0
        for row, key in enumerate(batch):
            for j, indices in enumerate(rows[key].values()):
                result[indices] = scores[row, j]
                done += len(indices)
        if progress is not None:
            progress(done)
    return result


# --------------------------------------------------------------------------- metrics


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean: sample standard deviation / sqrt(n) (None below 2 values)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def item_result(item: Item, log_probs: Sequence[float]) -> dict[str, Any]:
    """The item's choice by summed log-probability and by log-probability per character
    (ties go to the first choice, as numpy's argmax)."""
    scores = np.asarray(log_probs, np.float64)
    lengths = np.array([float(len(c)) for c in item.choices])
    return {"log_probs": [float(s) for s in scores], "pred": int(np.argmax(scores)),
            "pred_norm": int(np.argmax(scores / lengths)), "gold": item.gold}


def aggregate(results: Sequence[dict[str, Any]], metrics: Sequence[str] = ("acc", "acc_norm")) -> dict[str, Any]:
    """Mean and standard error of each metric over per-item results."""
    out: dict[str, Any] = {"n": len(results)}
    for metric in metrics:
        key = {"acc": "pred", "acc_norm": "pred_norm"}[metric]
        hits = [float(r[key] == r["gold"]) for r in results]
        out[metric] = sum(hits) / len(hits) if hits else None
        out[f"{metric}_stderr"] = mean_stderr(hits)
    return out


def evaluate(cfg: llama.LlamaConfig, params: llama.Params, tokenizer, items: Sequence[Item], *,
             delta: Any = None, batch_size: int = 16, max_len: int | None = None,
             add_special_tokens: bool | None = None, metrics: Sequence[str] = ("acc", "acc_norm"),
             progress=None, mesh=None) -> dict[str, Any]:
    """Score every choice of every item; per-item results and the aggregated metrics
    (see the module docstring). `progress(total=requests)`, if given, makes a progress
    bar (`tqdm.tqdm` or alike: `update(k)`, `close()`). mesh: score on a device mesh
    (`log_likelihoods`).

    >>> from spsft_jax import assets, data, interop, multiple_choice
    >>> cfg, params = interop.load_hf(assets.default_asset())
    >>> tok = data.load_tokenizer(assets.default_asset())
    >>> item = multiple_choice.Item.from_choices("3 + 4 =", ["7.", "9."], gold=0)
    >>> multiple_choice.evaluate(cfg, params, tok, [item])["items"][0]["pred"]
    0
    """
    for i, item in enumerate(items):
        if not 0 <= item.gold < len(item.requests) or len(item.choices) != len(item.requests):
            raise ValueError(f"item {i}: gold {item.gold} for {len(item.requests)} choices")
    requests = []
    for i, item in enumerate(items):
        for j, (context, continuation) in enumerate(item.requests):
            pair = encode_pair(tokenizer, context, continuation, add_special_tokens=add_special_tokens)
            if not pair[1]:
                raise ValueError(f"item {i}, choice {j}: the continuation {continuation!r} adds no tokens "
                                 f"to its context {context[-40:]!r}")
            requests.append(pair)
    bar = progress(total=len(requests)) if progress is not None else None
    try:
        scores = log_likelihoods(cfg, params, requests, delta=delta, batch_size=batch_size,
                                 max_len=max_len, progress=bar.update if bar is not None else None, mesh=mesh)
    finally:
        if bar is not None:
            bar.close()
    results, at = [], 0
    for item in items:
        results.append(item_result(item, scores[at:at + len(item.requests)]))
        at += len(item.requests)
    return {**aggregate(results, metrics), "items": results}
