"""Importance scores: one number per output row (neuron) of each targeted linear.

Scores are a pytree shaped like a selection, nested along the module paths of
`llama.module_paths(targets)`, with one float32 score per row of every layer:

    scores = {"layers": {"self_attn": {"q_proj": [L, heads*head_dim], ...},
                         "mlp":       {"gate_proj": [L, ffn], "up_proj": [L, ffn],
                                       "down_proj": [L, hidden]}}}

Metrics (paper sec. 3.2 and appendix A):

    magnitude(cfg, params)                     L2 norm of each row
    taylor(cfg, params, batches)               |w_i . dL/dw_i| over the whole data set
    classwise_taylor(cfg, params, batches)     per-class Taylor, aggregated over classes
    per_class_taylor(cfg, params, batches)     the per-class scores [C, L, d_out] themselves
    aggregate(per_class, "quantile_mean")      mean / max / Quantile-Mean over classes

Batches are dicts of int32 arrays `input_ids`, `attention_mask` (optional) and
`labels` `[B, T]` (HF convention, -100 = no loss); class-wise Taylor also needs
`classes [B]`, one class per example.

Taylor never forms a weight gradient: each targeted row i is scaled by s_i = 1 and
`jax.grad` is taken with respect to the scales, since dL/ds_i = w_i . dL/dw_i. That
is one scalar per row (per example for the class-wise variant), and the backward
pass keeps no more activations than an SPSFT training step does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from spsft_jax import delta as delta_lib
from spsft_jax import llama, losses
from spsft_jax.trees import nest

Scores = dict[str, Any]
LossFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

AGGREGATES = ("quantile_mean", "mean", "max")


# --------------------------------------------------------------------------- magnitude


def magnitude(cfg: llama.LlamaConfig, params: llama.Params, targets="all-linear") -> Scores:
    """L2 norm of each row of each targeted weight, `[L, d_out]` float32 per module.

    `cfg` is unused (the weights carry their shapes); it keeps the metrics' signatures alike.
    """
    del cfg
    return nest({
        path: jnp.linalg.norm(_weight(params, path).astype(jnp.float32), axis=-1)
        for path in _paths(targets)
    })


# --------------------------------------------------------------------------- Taylor


def taylor(
    cfg: llama.LlamaConfig,
    params: llama.Params,
    batches: Iterable[Mapping[str, Any]],
    targets="all-linear",
    *,
    remat=None,
    loss_fn: LossFn | None = None,
) -> Scores:
    """Taylor importance `|w_i . dL/dw_i|` of every targeted row over a data set.

    L is the loss of the whole data set: the mean over all loss tokens of all
    batches, so each batch weighs by its number of loss tokens. The signed
    derivative `w_i . dL/dw_i` is accumulated over batches and its absolute value
    taken at the end (appendix A: `|1/|D| sum_x w . dL(x)/dw|`), so two batches
    whose effects cancel give a small score.

    batches: any iterable of dicts with int32 `input_ids`, `labels` and optionally
        `attention_mask`, all `[B, T]`; it is read once, one batch at a time. The
        step is compiled once per batch shape.
    remat: passed to `llama.forward` ("full", "dots" or a policy).
    loss_fn: `(logits, labels) -> (summed loss, number of loss tokens)`;
        default `losses.causal_lm_loss`.

    >>> scores = taylor(cfg, params, [batch], targets="mlp")   # doctest: +SKIP
    >>> scores["layers"]["mlp"]["up_proj"].shape                # doctest: +SKIP
    (num_layers, intermediate_size)
    """
    modules = _paths(targets)
    total = _zero_scores(params, modules)
    tokens = jnp.zeros((), jnp.int32)
    for index, batch in enumerate(batches):
        total, tokens = _taylor_step(
            params, total, tokens, _model_inputs(batch, index),
            cfg=cfg, modules=modules, remat=remat, loss_fn=loss_fn or losses.causal_lm_loss,
        )
    tokens = int(tokens)
    if tokens == 0:
        raise ValueError("taylor: the batches hold no loss tokens (none given, or every label is -100)")
    return jax.tree.map(lambda t: jnp.abs(t / tokens), total)


def per_class_taylor(
    cfg: llama.LlamaConfig,
    params: llama.Params,
    batches: Iterable[Mapping[str, Any]],
    targets="all-linear",
    *,
    num_classes: int | None = None,
    remat=None,
    loss_fn: LossFn | None = None,
) -> tuple[Scores, jax.Array]:
    """Class-wise Taylor importance before aggregation (paper eq. 6).

    For class t, `eta_i^t = |w_i . dL_t/dw_i|` where L_t is the mean loss over the
    loss tokens of the examples of class t (all batches together). One backward
    pass per batch gives every example's row derivatives (a per-example scale),
    which are summed per class.

    Each batch also needs `classes [B]` int, one class per example, in
    `[0, num_classes)`. With `num_classes=None` the class axis grows to the largest
    class seen (the step recompiles when it grows; give `num_classes` to avoid that).

    Returns (scores with a leading class axis, `[C, L, d_out]` per module;
    loss tokens per class `[C]` int32). A class without loss tokens scores 0.
    """
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes={num_classes}: must be at least 1")
    modules = _paths(targets)
    total = _zero_scores(params, modules, num_classes or 0)
    tokens = jnp.zeros((num_classes or 0,), jnp.int32)
    for index, batch in enumerate(batches):
        inputs = _model_inputs(batch, index)
        classes = _classes(batch, index, inputs["input_ids"].shape[0], num_classes)
        if num_classes is None and classes.size and classes.max() >= tokens.shape[0]:
            total, tokens = _grow_classes((total, tokens), int(classes.max()) + 1)
        total, tokens = _classwise_step(
            params, total, tokens, inputs, jnp.asarray(classes),
            cfg=cfg, modules=modules, remat=remat, loss_fn=loss_fn or losses.causal_lm_loss,
        )
    denominators = jnp.maximum(tokens, 1).astype(jnp.float32)
    scores = jax.tree.map(
        lambda t: jnp.abs(t / denominators.reshape((-1,) + (1,) * (t.ndim - 1))), total)
    return scores, tokens


def classwise_taylor(
    cfg: llama.LlamaConfig,
    params: llama.Params,
    batches: Iterable[Mapping[str, Any]],
    targets="all-linear",
    aggregate: str = "quantile_mean",
    num_classes: int | None = None,
    *,
    remat=None,
    loss_fn: LossFn | None = None,
) -> Scores:
    """Class-wise Taylor importance aggregated over classes (paper eq. 6 and 7).

    aggregate: "quantile_mean" (mean of the 0%, 10%, ..., 100% quantiles over
        classes, eq. 7), "mean", or "max". Classes without any loss token in
        `batches` are left out of the aggregate.

    See `per_class_taylor` for the batches and the per-class definition.
    """
    _check_aggregate(aggregate)
    per_class, tokens = per_class_taylor(cfg, params, batches, targets, num_classes=num_classes,
                                         remat=remat, loss_fn=loss_fn)
    present = np.flatnonzero(np.asarray(tokens) > 0)
    if present.size == 0:
        raise ValueError("classwise_taylor: the batches hold no loss tokens")
    return _aggregate(jax.tree.map(lambda s: s[present], per_class), aggregate)


def aggregate(per_class_scores, how: str = "quantile_mean"):
    """Reduce per-class scores `[C, ...]` (an array or a pytree of them) over classes.

    how: "mean", "max", or "quantile_mean": the mean of the 11 quantiles at
    0%, 10%, ..., 100% over classes, with numpy's default linear interpolation.

    >>> aggregate(jnp.array([[0.0], [1.0], [5.0]]), "quantile_mean")
    Array([1.8181819], dtype=float32)
    """
    return _aggregate(per_class_scores, how)


def _aggregate(per_class_scores, how):
    # A separate name: `classwise_taylor`'s argument `aggregate` hides the public function.
    _check_aggregate(how)
    reduce = {
        "mean": lambda s: jnp.mean(s, axis=0),
        "max": lambda s: jnp.max(s, axis=0),
        "quantile_mean": lambda s: jnp.mean(
            jnp.quantile(s, jnp.linspace(0.0, 1.0, 11), axis=0), axis=0),
    }[how]
    return jax.tree.map(lambda s: reduce(jnp.asarray(s, jnp.float32)), per_class_scores)


def _check_aggregate(how):
    if how not in AGGREGATES:
        raise ValueError(f"aggregate={how!r}: choose one of {', '.join(map(repr, AGGREGATES))}")


# --------------------------------------------------------------------------- the jitted steps


@jax.custom_vjp
def _unit_scale(y: jax.Array, scale: jax.Array) -> jax.Array:
    """`y * scale` at scale == 1, i.e. `y`, with the scale's derivative `sum(y * dy)`."""
    return y


def _unit_scale_fwd(y, scale):
    # The residual is y itself, the array the rest of the layer already keeps;
    # `y * scale` would make a second activation of the same size to save.
    return y, (y, scale)


def _unit_scale_bwd(residuals, dy):
    y, scale = residuals
    spec = "...o,...o->o" if scale.ndim == 1 else "b...o,b...o->bo"
    dscale = jnp.einsum(spec, y, dy, preferred_element_type=jnp.float32)
    return dy, dscale.astype(scale.dtype)


_unit_scale.defvjp(_unit_scale_fwd, _unit_scale_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _UnitScaleDelta(delta_lib.ScaleDelta):
    """A ScaleDelta that is only ever evaluated at scale == 1 (see `_unit_scale`)."""

    def apply(self, x, y):
        return _unit_scale(y, self.scale)


def _unit_scales(params, modules, batch=None):
    scales = delta_lib.scales(params, list(modules), batch=batch)
    return jax.tree.map(lambda d: _UnitScaleDelta(d.scale), scales, is_leaf=delta_lib.is_delta)


def _row_derivatives(params, inputs, *, cfg, modules, remat, loss_fn, per_example):
    """d(summed loss)/d(row scale) per module `[L, d_out]` (or `[L, B, d_out]`), and token counts."""
    batch_size = inputs["input_ids"].shape[0] if per_example else None

    def summed_loss(scales):
        logits = llama.forward(cfg, params, inputs["input_ids"], inputs["attention_mask"],
                               scales, remat=remat)
        if not per_example:
            return loss_fn(logits, inputs["labels"])
        # Examples are independent, so example b's scales only see example b's loss.
        sums, counts = jax.vmap(lambda lg, lb: loss_fn(lg[None], lb[None]))(logits, inputs["labels"])
        return sums.sum(), counts

    grads, counts = jax.grad(summed_loss, has_aux=True)(_unit_scales(params, modules, batch_size))
    return nest({path: d.scale for path, d in delta_lib.leaves(grads)}), counts


@jax.jit(static_argnames=("cfg", "modules", "remat", "loss_fn"), donate_argnames=("total", "tokens"))
def _taylor_step(params, total, tokens, inputs, *, cfg, modules, remat, loss_fn):
    derivatives, count = _row_derivatives(params, inputs, cfg=cfg, modules=modules, remat=remat,
                                          loss_fn=loss_fn, per_example=False)
    return jax.tree.map(jnp.add, total, derivatives), tokens + count


@jax.jit(static_argnames=("cfg", "modules", "remat", "loss_fn"), donate_argnames=("total", "tokens"))
def _classwise_step(params, total, tokens, inputs, classes, *, cfg, modules, remat, loss_fn):
    derivatives, counts = _row_derivatives(params, inputs, cfg=cfg, modules=modules, remat=remat,
                                           loss_fn=loss_fn, per_example=True)
    one_hot = jax.nn.one_hot(classes, tokens.shape[0], dtype=jnp.float32)  # [B, C]
    total = jax.tree.map(lambda t, d: t + jnp.einsum("bc,lbo->clo", one_hot, d), total, derivatives)
    return total, tokens + jnp.einsum("bc,b->c", one_hot, counts).astype(jnp.int32)


def _grow_classes(tree, num_classes):
    """Zero-pad the leading class axis of every leaf to `num_classes`."""
    return jax.tree.map(
        lambda a: jnp.pad(a, [(0, num_classes - a.shape[0])] + [(0, 0)] * (a.ndim - 1)), tree)


# --------------------------------------------------------------------------- pytree helpers


def _paths(targets) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(p) for p in llama.module_paths(targets))


def _weight(params, path) -> jax.Array:
    module = llama.subtree(params, *path)
    if module is None or "weight" not in module:
        raise KeyError(f"targets name {'/'.join(path)}, which the parameters do not have")
    return module["weight"]


def _zero_scores(params, modules, num_classes: int | None = None) -> Scores:
    """Float32 zeros `[L, d_out]` per module (`[C, L, d_out]` with a class axis)."""
    lead = () if num_classes is None else (num_classes,)
    return nest({p: jnp.zeros(lead + _weight(params, p).shape[:-1], jnp.float32) for p in modules})


def _model_inputs(batch: Mapping[str, Any], index: int) -> dict[str, jax.Array | None]:
    """The arrays the model and the loss read, as int32, with their shapes checked."""
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise KeyError(f"batch {index}: no {key!r} (has {sorted(batch)})")
    inputs = {key: None if batch.get(key) is None else jnp.asarray(batch[key], jnp.int32)
              for key in ("input_ids", "attention_mask", "labels")}
    shape = inputs["input_ids"].shape
    if len(shape) != 2:
        raise ValueError(f"batch {index}: input_ids must be [batch, seq], got shape {shape}")
    for key in ("attention_mask", "labels"):
        if inputs[key] is not None and inputs[key].shape != shape:
            raise ValueError(f"batch {index}: {key} has shape {inputs[key].shape}, "
                             f"input_ids has {shape}")
    return inputs


def _classes(batch, index: int, batch_size: int, num_classes: int | None) -> np.ndarray:
    if "classes" not in batch:
        raise KeyError(f"batch {index}: class-wise Taylor needs 'classes' [batch] (has {sorted(batch)})")
    classes = np.asarray(batch["classes"])
    if classes.shape != (batch_size,) or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"batch {index}: classes must be {batch_size} integers, one per example; "
                         f"got {classes.dtype} of shape {classes.shape}")
    limit = num_classes if num_classes is not None else np.iinfo(np.int32).max
    if classes.size and (classes.min() < 0 or classes.max() >= limit):
        raise ValueError(f"batch {index}: classes must lie in [0, {limit}); "
                         f"got {classes.min()}..{classes.max()}")
    return classes.astype(np.int32)
