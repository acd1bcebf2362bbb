"""Held-out loss, perplexity, and exact match of generations against references.

    held_out_loss(cfg, params, batches, delta=delta)
      -> {"loss": mean nats per loss token, "perplexity": exp(loss), "tokens": count}
    exact_match(cfg, params, tokenizer, [(prompt ids, reference text)], delta=delta)
      -> {"exact_match": fraction, "outputs": [generated text, ...]}
    evaluator(cfg, params, tokenizer, "eval.jsonl", ...)(delta)
      -> {"loss", "perplexity", "tokens", "exact_match" (None without references),
          "samples": [[prompt text, reference, output], ...]}

Parameters, deltas and batches are arguments of the jitted functions, never constants
folded into them: one compilation per batch shape serves any weights.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Iterable, Mapping, Sequence

import jax

from spsft_jax import generate, llama, losses


@partial(jax.jit, static_argnames="cfg")
def batch_loss(cfg: llama.LlamaConfig, params: llama.Params, delta: Any, batch: Mapping[str, jax.Array]):
    """(summed loss, loss tokens) of one batch, the logits a block of tokens at a time
    (`losses.chunked_causal_lm_loss`): a 262k vocabulary's never exist whole."""
    h = llama.hidden_states(cfg, params, batch["input_ids"], batch["attention_mask"], delta,
                            segment_ids=batch.get("segment_ids"))
    return losses.chunked_causal_lm_loss(lambda x: llama.head(cfg, params, x, delta), h,
                                         batch["labels"], llama.CHUNK_TOKENS)


def held_out_loss(cfg: llama.LlamaConfig, params: llama.Params, batches: Iterable[Mapping[str, Any]],
                  *, delta: Any = None) -> dict[str, float]:
    """Mean token loss over all batches (weighted by loss tokens) and its perplexity."""
    total = count = 0.0
    for batch in batches:
        s, n = batch_loss(cfg, params, delta, dict(batch))
        total, count = total + float(s), count + float(n)
    if count == 0:
        raise ValueError("held-out data has no loss tokens")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}


def exact_match(cfg: llama.LlamaConfig, params: llama.Params, tokenizer,
                pairs: Sequence[tuple[list[int], str]], *, delta: Any = None, tokens=None,
                max_new_tokens: int = 32, batch_size: int = 16) -> dict[str, Any]:
    """Greedy generations for each prompt, and the fraction equal to its reference
    (compared with surrounding whitespace stripped)."""
    from spsft_jax import data

    tokens = tokens or data.special_tokens(tokenizer)
    outputs = []
    for start in range(0, len(pairs), batch_size):
        prompts = [p for p, _ in pairs[start:start + batch_size]]
        new = generate.generate(cfg, params, prompts, max_new_tokens=max_new_tokens, delta=delta,
                                stop_ids=tokens.stop, pad_id=tokens.pad)
        outputs += [tokenizer.decode(o, skip_special_tokens=True) for o in new]
    hits = sum(o.strip() == ref.strip() for o, (_, ref) in zip(outputs, pairs))
    return {"exact_match": hits / max(len(pairs), 1), "outputs": outputs}


def evaluator(cfg: llama.LlamaConfig, params: llama.Params, tokenizer, path, *, tokens, batch_size: int,
              max_len: int, format: str | None = None, truncate: str = "right",
              max_new_tokens: int = 32, samples: int = 3):
    """`run(delta)` -> held-out loss and exact match on a file of records (see the module
    docstring); the file is read and batched once, `samples` generations are kept."""
    from spsft_jax import data

    encoded = data.load(path, tokenizer, format=format, max_len=max_len, truncate=truncate, tokens=tokens)
    batches = data.eval_batches(encoded.examples, batch_size=batch_size, pad_id=tokens.pad,
                                max_len=encoded.max_len)
    pairs = data.prompts_and_references(data.read_jsonl(path, format=encoded.format),
                                        encoded.format, tokenizer)

    def run(delta):
        result = held_out_loss(cfg, params, batches, delta=delta)
        result["exact_match"], result["samples"] = None, []
        if pairs:
            matched = exact_match(cfg, params, tokenizer, pairs, delta=delta, tokens=tokens,
                                  max_new_tokens=max_new_tokens)
            result["exact_match"] = matched["exact_match"]
            result["samples"] = [[tokenizer.decode(prompt, skip_special_tokens=True), reference, output]
                                 for (prompt, reference), output in zip(pairs[:samples], matched["outputs"])]
        return result

    return run
