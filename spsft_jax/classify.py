"""Sequence classification with a causal LM: a class head on the last token.

The LM head is swapped for a `[num_classes, hidden]` class head, so the model's
"vocabulary" becomes the classes and every tool built for the LM loss (finetune,
Taylor and class-wise Taylor importance, held-out loss) trains and scores a
classifier unchanged. An example is its tokens plus one position whose label is
the class: the last real token's logits predict it (causal shift), and no other
position carries a loss.

    cfg_c, params_c = with_class_head(cfg, params, num_classes)   # head zeros [C, hidden]
    example = class_example(token_ids, class_id, pad_id)           # (ids + [pad], -100s + [class])
    batch = class_batch(examples, classes, seq_len, pad_id)        # data.pad_batch + "classes" [B]
    predicted, true = predict(cfg_c, params_c, batches, delta=d)    # [N] int arrays
    stats = accuracy_stats(per_class_accuracy(predicted, true, C))  # mean, worst, lower quartile, median
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spsft_jax import data, llama
from spsft_jax.losses import IGNORE_INDEX


def with_class_head(cfg: llama.LlamaConfig, params: llama.Params, num_classes: int,
                    weight: jax.Array | None = None) -> tuple[llama.LlamaConfig, llama.Params]:
    """(config, params) whose head maps the final hidden state to `num_classes` logits.

    weight: the head `[num_classes, hidden]`; default zeros (train it with
    `finetune(method="head")` first: with a zero head every other gradient is zero).
    The embedding table is kept (untied from the head when it was tied).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    shape = (num_classes, cfg.hidden_size)
    weight = jnp.zeros(shape, params["embed_tokens"]["weight"].dtype) if weight is None else weight
    if tuple(weight.shape) != shape:
        raise ValueError(f"class head weight has shape {tuple(weight.shape)}, expected {shape}")
    class_cfg = dataclasses.replace(cfg, vocab_size=num_classes, tie_word_embeddings=False)
    return class_cfg, {**params, "lm_head": {"weight": weight}}


def class_example(token_ids: Sequence[int], class_id: int, pad_id: int) -> data.Example:
    """(input ids, labels): the tokens and one padding position labelled with the class,
    which the last real token's logits predict."""
    ids = list(token_ids)
    if not ids:
        raise ValueError("class_example: no tokens")
    return ids + [pad_id], [IGNORE_INDEX] * len(ids) + [int(class_id)]


def class_batch(examples: Sequence[data.Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """`data.pad_batch` plus `classes [B]` (read back from the labels), as class-wise
    Taylor importance needs them. Each example must fit `seq_len`."""
    if any(len(ids) > seq_len for ids, _ in examples):
        raise ValueError(f"class_batch: an example is longer than seq_len={seq_len}")
    batch = data.pad_batch(examples, seq_len, pad_id)
    return {**batch, "classes": _labelled(batch["labels"])[1]}


def _labelled(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of each row's class label, the class) from labels `[B, T]`."""
    has = labels != IGNORE_INDEX
    if not has.any(axis=1).all():
        raise ValueError("class batch: a row has no class label")
    where = has.argmax(axis=1)
    return where, labels[np.arange(len(labels)), where].astype(np.int32)


@partial(jax.jit, static_argnames="cfg")
def _logits_at(cfg: llama.LlamaConfig, params, delta, input_ids, attention_mask, positions):
    h = llama.hidden_states(cfg, params, input_ids, attention_mask, delta)
    last = jnp.take_along_axis(h, positions[:, None, None], axis=1)  # [B, 1, D]
    return llama.head(cfg, params, last, delta)[:, 0]


def predict(cfg: llama.LlamaConfig, params: llama.Params, batches: Iterable[Mapping[str, Any]], *,
            delta: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, true class) of every example, from the logits of the position
    just before each row's label."""
    predicted, true = [], []
    for batch in batches:
        where, classes = _labelled(np.asarray(batch["labels"]))
        logits = _logits_at(cfg, params, delta, jnp.asarray(batch["input_ids"]),
                            jnp.asarray(batch["attention_mask"]), jnp.asarray(where - 1))
        predicted.append(np.asarray(logits.argmax(-1)))
        true.append(classes)
    return np.concatenate(predicted), np.concatenate(true)


def per_class_accuracy(predicted: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class `[num_classes]` (NaN for a class with no example)."""
    hits = np.bincount(true, weights=(predicted == true), minlength=num_classes)
    counts = np.bincount(true, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def accuracy_stats(per_class: np.ndarray) -> dict[str, float]:
    """The paper's Table 1 statistics over classes: mean, worst, lower quartile, median."""
    acc = per_class[~np.isnan(per_class)]
    if acc.size == 0:
        raise ValueError("accuracy_stats: no class has an example")
    return {"mean": float(acc.mean()), "worst": float(acc.min()),
            "q25": float(np.percentile(acc, 25)), "median": float(np.median(acc))}
