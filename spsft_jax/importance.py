"""Importance scores: one number per output row (neuron) of each targeted linear.

Scores are a pytree shaped like a selection, nested along the module paths of
`llama.module_paths(targets)`, with one float32 score per row of every layer:

    scores = {"layers": {"self_attn": {"q_proj": [L, heads*head_dim], ...},
                         "mlp":       {"gate_proj": [L, ffn], "up_proj": [L, ffn],
                                       "down_proj": [L, hidden]}}}

Metrics (paper sec. 3.2 and appendix A), with g = dL/dW the gradient of the
mean loss L over the whole data set:

    scores(cfg, params, batches, metric=...)   any of the below by name (METRICS)
    magnitude(cfg, params)                     L2 norm of each row
    taylor(cfg, params, batches)               sum_j |w_ij g_ij|: the paper's (form="elementwise")
    taylor(..., form="row")                    |sum_j w_ij g_ij|: the derivative of L by a row scale
    classwise_taylor(cfg, params, batches)     per-class Taylor, aggregated over classes
    per_class_taylor(cfg, params, batches)     the per-class scores [C, L, d_out] themselves
    aggregate(per_class, "quantile_mean")      mean / max / Quantile-Mean over classes

Batches are dicts of int32 arrays `input_ids`, `attention_mask` (optional) and
`labels` `[B, T]` (HF convention, -100 = no loss); class-wise Taylor also needs
`classes [B]`, one class per example.

The mean loss L averages over `average="tokens"` (every loss token of the data set
weighs the same: long examples weigh more) or `average="examples"` (each example's
mean token loss, then the mean over examples, as the paper's 1/|D| sum over x).

The row form never forms a weight gradient: each targeted row i is scaled by
s_i = 1 and `jax.grad` is taken with respect to the scales, since
dL/ds_i = w_i . dL/dw_i; its memory stays below an SPSFT step's. The element-wise
form needs the gradient of every targeted weight over the whole data set before
taking absolute values. It never holds the whole model's gradient: the layers
are visited `layers_per_pass` at a time, from the last group down, each pass
reading the data once and forming only that group's weight gradient. A pass runs
the layers below its group forward only, and starts the group's backward from the
gradient by the group's output that the pass above returned (one `[B, T, hidden]`
array kept per batch), so every layer's backward runs once in all: the passes cost
one backward over the model plus a forward per pass up to its group, and the memory
is a group's activations and weight gradient.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spsft_jax import delta as delta_lib
from spsft_jax import llama, losses, quant
from spsft_jax.data import normalize_batch
from spsft_jax.trees import get, nest

Scores = dict[str, Any]
LossFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

AGGREGATES = ("quantile_mean", "mean", "max")
FORMS = ("elementwise", "row")
AVERAGES = ("tokens", "examples")


# --------------------------------------------------------------------------- magnitude


def magnitude(cfg: llama.LlamaConfig, params: llama.Params, targets="all-linear", *,
              mesh=None) -> Scores:
    """L2 norm of each row of each targeted weight, `[L, d_out]` float32 per module.

    `cfg` is unused (the weights carry their shapes); it keeps the metrics' signatures alike.
    mesh: compute on the weights laid out by `spsft_jax.sharding` (a Mesh or a spec).
    """
    del cfg
    params, _ = _on_mesh(params, mesh)
    return nest({path: _row_norms(_weight(params, path)) for path in _paths(targets)})


@jax.jit
def _row_norms(weight) -> jax.Array:
    # Compiled, so the float32 copy and the squares fuse into the reduction: no
    # temporary the size of the weight (they are the largest arrays there are).
    return jnp.linalg.norm(quant.dequantize(weight, jnp.float32), axis=-1)


# --------------------------------------------------------------------------- Taylor


def taylor(
    cfg: llama.LlamaConfig,
    params: llama.Params,
    batches: Iterable[Mapping[str, Any]],
    targets="all-linear",
    *,
    form: str = "elementwise",
    average: str = "tokens",
    layers_per_pass: int | None = None,
    remat=None,
    loss_fn: LossFn | None = None,
    mesh=None,
) -> Scores:
    """Taylor importance of every targeted row over a data set, `[L, d_out]` float32 per module.

    form: "elementwise" (the paper's, appendix A, final line, and torch-pruning's
        default): `sum_j |w_ij g_ij|`; "row": `|sum_j w_ij g_ij|`, the derivative of the
        loss by a scale on row i, which needs no weight gradient. In both, g is the
        gradient of the data set's mean loss, accumulated over all batches before
        the absolute value is taken, so two batches whose effects cancel give a
        small score.
    average: "tokens" (L is the mean over all loss tokens of all batches) or
        "examples" (the mean over examples of each example's mean token loss;
        examples without a loss token are left out).
    layers_per_pass ("elementwise" only): decoder layers whose weight gradient is
        held at once; the data are read ceil(num_layers / layers_per_pass) times.
        Larger groups trade memory for fewer passes. None: a quarter of the layers
        (at most four passes); 1 holds the least.

    batches: an iterable of dicts with int32 `input_ids`, `labels` and optionally
        `attention_mask`, all `[B, T]`. The row form reads it once, one batch at a
        time; the element-wise form keeps the batches (host arrays) to read them
        once per pass. The steps compile once per batch shape (and group of layers).
    remat: passed to the layer scan (`llama.scan_layers`: "full", "dots", "nested" or a policy).
    loss_fn: `(logits, labels) -> (summed loss, number of loss tokens)`, applied to
        each example; default: the causal-LM cross entropy, `llama.CHUNK_TOKENS` positions at a time.
    mesh: a `jax.sharding.Mesh` or spec ("data=2,fsdp=4"): weights laid out by
        `spsft_jax.sharding`, each batch split over its data and fsdp axes.

    >>> scores = taylor(cfg, params, [batch], targets="mlp")   # doctest: +SKIP
    >>> scores["layers"]["mlp"]["up_proj"].shape                # doctest: +SKIP
    (num_layers, intermediate_size)
    """
    scores, counts = _taylor(cfg, params, batches, _paths(targets), form=form, average=average,
                             classwise=False, num_classes=1, layers_per_pass=layers_per_pass,
                             remat=remat, loss_fn=loss_fn, mesh=mesh)
    if int(counts[0]) == 0:
        raise ValueError("taylor: the batches hold no loss tokens (none given, or every label is -100)")
    return jax.tree.map(lambda s: s[0], scores)


def per_class_taylor(
    cfg: llama.LlamaConfig,
    params: llama.Params,
    batches: Iterable[Mapping[str, Any]],
    targets="all-linear",
    *,
    num_classes: int | None = None,
    form: str = "elementwise",
    average: str = "tokens",
    layers_per_pass: int | None = None,
    remat=None,
    loss_fn: LossFn | None = None,
    mesh=None,
) -> tuple[Scores, jax.Array]:
    """Class-wise Taylor importance before aggregation (paper eq. 6).

    For class t, `eta_i^t` is the Taylor score of row i (`form` and `average` as in
    `taylor`) for L_t, the mean loss over the examples of class t (all batches
    together). One backward pass per batch gives every class's derivatives:
    examples are independent, so each example's share of the gradient is its own.

    Each batch also needs `classes [B]` int, one class per example, in
    `[0, num_classes)`. With `num_classes=None` the class axis is the largest
    class seen plus one.

    Returns (scores with a leading class axis, `[C, L, d_out]` per module;
    loss tokens, or with average="examples" examples, per class `[C]` int32).
    A class without loss tokens scores 0.
    """
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes={num_classes}: must be at least 1")
    return _taylor(cfg, params, batches, _paths(targets), form=form, average=average,
                   classwise=True, num_classes=num_classes, layers_per_pass=layers_per_pass,
                   remat=remat, loss_fn=loss_fn, mesh=mesh)


def classwise_taylor(
    cfg: llama.LlamaConfig,
    params: llama.Params,
    batches: Iterable[Mapping[str, Any]],
    targets="all-linear",
    aggregate: str = "quantile_mean",
    num_classes: int | None = None,
    *,
    form: str = "elementwise",
    average: str = "tokens",
    layers_per_pass: int | None = None,
    remat=None,
    loss_fn: LossFn | None = None,
    mesh=None,
) -> Scores:
    """Class-wise Taylor importance aggregated over classes (paper eq. 6 and 7).

    aggregate: "quantile_mean" (mean of the 0%, 10%, ..., 100% quantiles over
        classes, eq. 7), "mean", or "max". Classes without any loss token in
        `batches` are left out of the aggregate.

    See `per_class_taylor` for the batches and the per-class definition, and
    `taylor` for `form`, `average` and `layers_per_pass`.
    """
    _check_aggregate(aggregate)
    per_class, counts = per_class_taylor(cfg, params, batches, targets, num_classes=num_classes,
                                         form=form, average=average,
                                         layers_per_pass=layers_per_pass, remat=remat,
                                         loss_fn=loss_fn, mesh=mesh)
    present = np.flatnonzero(np.asarray(counts) > 0)
    if present.size == 0:
        raise ValueError("classwise_taylor: the batches hold no loss tokens")
    return _aggregate(jax.tree.map(lambda s: s[present], per_class), aggregate)


PASSES = 4  # passes over the data the element-wise form makes by default


def _taylor(cfg, params, batches, modules, *, form, average, classwise, num_classes,
            layers_per_pass, remat, loss_fn, mesh=None):
    """(scores `[C, L, d_out]` per module, loss tokens or examples per class `[C]`)."""
    params, place = _on_mesh(params, mesh)
    if form not in FORMS:
        raise ValueError(f"form={form!r}: choose one of {', '.join(map(repr, FORMS))}")
    if average not in AVERAGES:
        raise ValueError(f"average={average!r}: choose one of {', '.join(map(repr, AVERAGES))}")
    options = dict(cfg=cfg, modules=modules, remat=remat, loss_fn=loss_fn, average=average)
    if form == "row":
        return _row_taylor(params, batches, classwise=classwise, num_classes=num_classes, place=place,
                           **options)
    if layers_per_pass is None:  # a quarter of the layers: four passes over the data at most
        layers_per_pass = -(-cfg.num_layers // PASSES)
    if not isinstance(layers_per_pass, (int, np.integer)) or layers_per_pass < 1:
        raise ValueError(f"layers_per_pass={layers_per_pass!r}: must be a positive integer")
    return _elementwise_taylor(params, batches, classwise=classwise, num_classes=num_classes,
                               layers_per_pass=int(layers_per_pass), place=place, **options)


def _row_taylor(params, batches, *, classwise, num_classes, place=jnp.asarray, **options):
    modules = options["modules"]
    total = _zero_scores(params, modules, num_classes or 0)
    counts = jnp.zeros((num_classes or 0,), jnp.int32)
    for index, batch in enumerate(batches):
        inputs = _model_inputs(batch, index, place)
        if not classwise:
            total, counts = _taylor_step(params, total, counts, inputs, **options)
            continue
        classes = _classes(batch, index, inputs["input_ids"].shape[0], num_classes)
        if num_classes is None and classes.size and classes.max() >= counts.shape[0]:
            total, counts = _grow_classes((total, counts), int(classes.max()) + 1)
        total, counts = _classwise_step(params, total, counts, inputs, jnp.asarray(classes), **options)
    scores = jax.tree.map(lambda t: jnp.abs(t / _per_class(counts, t.ndim)), total)
    return scores, counts


def _elementwise_taylor(params, batches, *, classwise, num_classes, layers_per_pass, place=jnp.asarray,
                        **options):
    cfg, modules = options["cfg"], options["modules"]
    outside = [p for p in modules if p[0] != "layers"]
    if outside:
        raise ValueError(f"form='elementwise' scores the decoder layers' linears; "
                         f"{'/'.join(outside[0])} is not one")
    batches = list(batches)  # read once per pass
    inputs = [_model_inputs(batch, index, place) for index, batch in enumerate(batches)]
    onehots = [np.ones((x["input_ids"].shape[0], 1), np.float32) for x in inputs]
    if classwise:
        classes = [_classes(batch, index, x["input_ids"].shape[0], num_classes)
                   for index, (batch, x) in enumerate(zip(batches, inputs))]
        if num_classes is None:
            num_classes = max((int(c.max()) + 1 for c in classes if c.size), default=1)
        onehots = [np.eye(num_classes, dtype=np.float32)[c] for c in classes]
    scores = _zero_scores(params, modules, num_classes)
    hidden_dtype = params["embed_tokens"]["weight"].dtype
    # Per batch, the loss's gradient by the hidden states where the last pass began
    # (unused by the first pass, which starts from the loss).
    above = [place(np.zeros(x["input_ids"].shape + (cfg.hidden_size,), hidden_dtype)) for x in inputs]
    counts = None
    group = min(layers_per_pass, cfg.num_layers)
    for end in range(cfg.num_layers, 0, -group):  # from the last layers down
        start = max(end - group, 0)
        grads = {p: jnp.zeros((group, num_classes) + _weight(params, p).shape[1:], jnp.float32)
                 for p in modules}
        pass_counts = jnp.zeros((num_classes,), jnp.int32)
        for index, (x, onehot) in enumerate(zip(inputs, onehots)):
            grads, pass_counts, above[index] = _elementwise_step(
                params, grads, pass_counts, x, jnp.asarray(onehot), jnp.int32(start), jnp.int32(end),
                above[index], group=group, **options)
        if counts is None:  # the first pass reads the loss, and so counts its tokens
            counts = pass_counts
        found = _elementwise_scores(params, grads, counts, jnp.int32(start))
        scores = nest({p: get(scores, *p).at[:, start:end].set(found[p][:, :end - start])
                       for p in modules})
    return scores, counts


def _per_class(counts, ndim):
    """Counts `[C]` as divisors broadcasting against `[C, ...]` (1 where a class has none)."""
    return jnp.maximum(counts, 1).astype(jnp.float32).reshape((-1,) + (1,) * (ndim - 1))


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


@struct.dataclass
class _UnitScaleDelta(delta_lib.ScaleDelta):
    """A ScaleDelta that is only ever evaluated at scale == 1 (see `_unit_scale`)."""

    def apply(self, x, y):
        return _unit_scale(y, self.scale)


def _unit_scales(params, modules, batch=None):
    scales = delta_lib.scales(params, list(modules), batch=batch)
    return jax.tree.map(lambda d: _UnitScaleDelta(d.scale), scales, is_leaf=delta_lib.is_delta)


@jax.custom_vjp
def _weight_probe(x: jax.Array, y: jax.Array, probe: jax.Array, classes: jax.Array) -> jax.Array:
    """`y + x @ probe[c].T` at probe == 0, i.e. `y`; the probe's cotangent is the weight
    gradient split by class: `sum_b classes[b, c] dy_b^T x_b` (probe, `[C, d_out, d_in]`)."""
    return y


def _weight_probe_fwd(x, y, probe, classes):
    # x is kept as an SPSFT step keeps it for W_f; nothing else is saved.
    return y, (x, classes)


def _weight_probe_bwd(residuals, dy):
    x, classes = residuals  # the probe is float32 zeros; classes are zero outside the group

    def gradient():
        return jnp.einsum("bc,b...o,b...i->coi", classes.astype(dy.dtype), dy, x,
                          preferred_element_type=jnp.float32)

    shape = (classes.shape[-1], dy.shape[-1], x.shape[-1])
    grad = jax.lax.cond(jnp.any(classes != 0), gradient, lambda: jnp.zeros(shape, jnp.float32))
    return jnp.zeros_like(x), dy, grad, jnp.zeros_like(classes)


_weight_probe.defvjp(_weight_probe_fwd, _weight_probe_bwd)


@struct.dataclass
class _WeightProbe:
    """Reads the gradient of one linear's weight (per class) off `jax.grad` of `probe`."""

    probe: jax.Array     # [C, d_out, d_in] zeros
    classes: jax.Array   # [B, C] one-hot class of each example

    def apply(self, x, y):
        return _weight_probe(x, y, self.probe, self.classes)


def _example_losses(cfg, params, h, labels, loss_fn):
    """(summed loss `[B]`, loss tokens `[B]` int32) per example from final hidden states."""
    if loss_fn is not None:
        logits = llama.head(cfg, params, h)
        return jax.vmap(lambda lg, lb: loss_fn(lg[None], lb[None]))(logits, labels)
    targets = jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=losses.IGNORE_INDEX)
    token_losses, counts = losses.blocked_cross_entropy(lambda x: llama.head(cfg, params, x), h,
                                                        targets, llama.CHUNK_TOKENS)
    return token_losses.sum(-1), counts.sum(-1, dtype=jnp.int32)


def _mean_loss_numerator(sums, counts, average):
    """The summed loss to differentiate, and each example's count (tokens or 0/1)."""
    if average == "tokens":
        return sums.sum(), counts
    has_loss = counts > 0
    return jnp.sum(jnp.where(has_loss, sums / jnp.maximum(counts, 1), 0.0)), has_loss.astype(jnp.int32)


def _row_derivatives(params, inputs, *, cfg, modules, remat, loss_fn, average, per_example):
    """d(summed loss)/d(row scale) per module `[L, d_out]` (or `[L, B, d_out]`), and counts `[B]`."""
    batch_size = inputs["input_ids"].shape[0] if per_example else None

    def summed_loss(scales):
        h = llama.hidden_states(cfg, params, inputs["input_ids"], inputs["attention_mask"],
                                scales, remat=remat)
        # Examples are independent, so example b's scales only see example b's loss.
        sums, counts = _example_losses(cfg, params, h, inputs["labels"], loss_fn)
        return _mean_loss_numerator(sums, counts, average)

    grads, counts = jax.grad(summed_loss, has_aux=True)(_unit_scales(params, modules, batch_size))
    return nest({path: d.scale for path, d in delta_lib.leaves(grads)}), counts


_STATIC = ("cfg", "modules", "remat", "loss_fn", "average")


@jax.jit(static_argnames=_STATIC, donate_argnames=("total", "tokens"))
def _taylor_step(params, total, tokens, inputs, *, cfg, modules, remat, loss_fn, average):
    derivatives, counts = _row_derivatives(params, inputs, cfg=cfg, modules=modules, remat=remat,
                                           loss_fn=loss_fn, average=average, per_example=False)
    return jax.tree.map(lambda t, d: t + d[None], total, derivatives), tokens + counts.sum()


@jax.jit(static_argnames=_STATIC, donate_argnames=("total", "tokens"))
def _classwise_step(params, total, tokens, inputs, classes, *, cfg, modules, remat, loss_fn, average):
    derivatives, counts = _row_derivatives(params, inputs, cfg=cfg, modules=modules, remat=remat,
                                           loss_fn=loss_fn, average=average, per_example=True)
    one_hot = jax.nn.one_hot(classes, tokens.shape[0], dtype=jnp.float32)  # [B, C]
    total = jax.tree.map(lambda t, d: t + jnp.einsum("bc,lbo->clo", one_hot, d), total, derivatives)
    return total, tokens + jnp.einsum("bc,b->c", one_hot, counts).astype(jnp.int32)


@jax.jit(static_argnames=_STATIC + ("group",), donate_argnames=("grads", "counts", "above"))
def _elementwise_step(params, grads, counts, inputs, classes, start, end, above, *, cfg, modules,
                      remat, loss_fn, average, group):
    """Add one batch's summed-loss gradient of the targeted weights of layers
    [start, end) (at most `group` of them) to `grads` (`[group, C, d_out, d_in]` per
    module), and return the loss's gradient by the hidden states entering layer
    `start`, for the pass over the layers below.

    The layers below `start` run forward only, keeping nothing. Above `end`, the
    gradient by the hidden states leaving layer `end - 1` is `above` (the pass over
    the layers above returned it), or, when `end` is the last layer, the loss's own.
    So each layer's backward runs once over the whole scoring, not once per pass.
    Layers are cut from the stacks at each use (slicing a group out would copy its
    weights); `start` and `end` are traced, so one program serves every pass.
    """
    ids, labels = inputs["input_ids"], inputs["labels"]
    positions = llama.default_positions(ids)
    mask = inputs["attention_mask"]
    valid = jnp.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    h = llama.embed(cfg, params, ids)
    cos, sin = llama.rope_tables(cfg, positions, h.dtype)
    allowed = llama.attention_masks(cfg, positions, positions, valid)

    layers = llama.layer_stack(cfg, params)

    def below(i, h):
        return llama.decoder_layer(cfg, llama.layer_at(layers, i), None, h, cos, sin, allowed)

    entering = jax.lax.fori_loop(0, start, below, h)

    def through_group(probes, h):
        def body(h, slot):
            i = start + slot
            probe_delta = nest({p[1:]: _WeightProbe(probes[p][slot], classes) for p in modules})
            # A pass over fewer than `group` layers (the lowest) leaves the rest out.
            return jax.lax.cond(i < end, lambda h: llama.decoder_layer(
                cfg, llama.layer_at(layers, i), probe_delta, h, cos, sin, allowed), lambda h: h, h), None

        return jax.lax.scan(llama.remat_layer(body, remat), h, jnp.arange(group))[0]

    zeros = {p: jnp.zeros_like(g) for p, g in grads.items()}
    leaving, pullback = jax.vjp(through_group, zeros, entering)

    def from_loss():
        def summed_loss(h):
            sums, per_example = _example_losses(cfg, params, h, labels, loss_fn)
            return _mean_loss_numerator(sums, per_example, average)

        gradient, per_example = jax.grad(summed_loss, has_aux=True)(leaving)
        return gradient.astype(above.dtype), per_example

    def from_above():
        return above, jnp.zeros(ids.shape[:1], jnp.int32)

    gradient, per_example = jax.lax.cond(end == cfg.num_layers, from_loss, from_above)
    batch_grads, entering_gradient = pullback(gradient)
    grads = {p: grads[p] + batch_grads[p] for p in modules}
    counts = counts + jnp.einsum("bc,b->c", classes, per_example).astype(jnp.int32)
    return grads, counts, entering_gradient


@jax.jit
def _elementwise_scores(params, grads, counts, start):
    """sum_j |w_ij g_ij| per class from the summed gradients `[g, C, d_out, d_in]`: `[C, g, d_out]`."""
    out = {}
    for path, g in grads.items():
        # The group's layers (a quantized weight's bytes and kinds alike), then their values.
        w = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, g.shape[0]), _weight(params, path))
        w = quant.dequantize(w, jnp.float32).astype(jnp.float32)
        summed = jnp.sum(jnp.abs(w[:, None] * g), axis=-1)           # [g, C, d_out]
        out[path] = jnp.swapaxes(summed, 0, 1) / _per_class(counts, 3)
    return out


def _grow_classes(tree, num_classes):
    """Zero-pad the leading class axis of every leaf to `num_classes`."""
    return jax.tree.map(
        lambda a: jnp.pad(a, [(0, num_classes - a.shape[0])] + [(0, 0)] * (a.ndim - 1)), tree)


# --------------------------------------------------------------------------- pytree helpers


def _paths(targets) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(p) for p in llama.module_paths(targets))


def _weight(params, path) -> jax.Array:
    module = get(params, *path)
    if module is None or "weight" not in module:
        raise KeyError(f"targets name {'/'.join(path)}, which the parameters do not have")
    return module["weight"]


def _zero_scores(params, modules, num_classes: int) -> Scores:
    """Float32 zeros `[C, L, d_out]` per module."""
    return nest({p: jnp.zeros((num_classes,) + _weight(params, p).shape[:-1], jnp.float32)
                 for p in modules})


def _model_inputs(batch: Mapping[str, Any], index: int, place=jnp.asarray) -> dict[str, jax.Array]:
    """The arrays the model and the loss read, int32, checked (`data.normalize_batch`)."""
    inputs = normalize_batch(batch, index, labels_required=True)
    return {key: place(inputs[key]) for key in ("input_ids", "attention_mask", "labels")}


def _on_mesh(params, mesh):
    """(params, how to place a `[batch, seq]` array): as they are without a mesh, else laid
    out by `spsft_jax.sharding` (weights split over fsdp, batches over data and fsdp)."""
    if mesh is None:
        return params, jnp.asarray
    from spsft_jax import sharding

    mesh = sharding.make_mesh(mesh)
    return sharding.shard(params, mesh), lambda x: sharding.place_batch({"x": x}, mesh, axis=0)["x"]


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


# --------------------------------------------------------------------------- by name

METRICS = ("taylor", "taylor-row", "magnitude", "qm-taylor")


def scores(cfg: llama.LlamaConfig, params: llama.Params, batches: Iterable[Mapping[str, Any]] = (), *,
           metric: str = "taylor", targets="all-linear", remat: str | None = None,
           mesh=None) -> Scores:
    """Scores by metric name: "taylor" (the paper's sum_j |w g|), "taylor-row" (|sum_j w g|),
    "magnitude" (batches unused) or "qm-taylor" (class-wise Quantile-Mean; batches carry `classes`);
    `mesh` as in `taylor`."""
    if metric == "magnitude":
        return magnitude(cfg, params, targets=targets, mesh=mesh)
    if metric == "qm-taylor":
        return classwise_taylor(cfg, params, batches, targets=targets, aggregate="quantile_mean",
                                remat=remat, mesh=mesh)
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: choose one of {', '.join(map(repr, METRICS))}")
    return taylor(cfg, params, batches, targets=targets, remat=remat, mesh=mesh,
                  form="row" if metric == "taylor-row" else "elementwise")


# --------------------------------------------------------------------------- measuring


def lowered_step(cfg: llama.LlamaConfig, params, batch, *, targets="all-linear", form: str = "row",
                 remat: str | None = None):
    """One scoring step lowered for `batch` (arrays or `jax.ShapeDtypeStruct`s), without
    running it: the row form's step, or the element-wise form's over one layer (one
    program for every pass). `spsft_jax.memory` reads its compiled memory."""
    if form not in FORMS:
        raise ValueError(f"form={form!r}: choose one of {', '.join(map(repr, FORMS))}")
    modules = _paths(targets)
    options = dict(cfg=cfg, modules=modules, remat=remat, loss_fn=None, average="tokens")
    counts = jax.ShapeDtypeStruct((1,), jnp.int32)
    if form == "row":
        total = jax.eval_shape(lambda p: _zero_scores(p, modules, 1), params)
        return _taylor_step.lower(params, total, counts, batch, **options)
    grads = {p: jax.ShapeDtypeStruct((1, 1) + _weight(params, p).shape[1:], jnp.float32)
             for p in modules}
    classes = jax.ShapeDtypeStruct((batch["input_ids"].shape[0], 1), jnp.float32)
    layer = jax.ShapeDtypeStruct((), jnp.int32)
    above = jax.ShapeDtypeStruct(batch["input_ids"].shape + (cfg.hidden_size,),
                                 params["embed_tokens"]["weight"].dtype)
    return _elementwise_step.lower(params, grads, counts, batch, classes, layer, layer, above,
                                   group=1, **options)
