"""Trainable deltas: what a fine-tuning method adds to a frozen module.

Every method is a delta type, and every delta type follows one protocol, `Delta`,
with two operations on one (unstacked) layer:

    delta.apply(x, y)     -> y + the delta's contribution, where y is the frozen
                             module's output for x (x @ W.T for a linear; w * x for a
                             norm's weight, x the normalised input); the merged weight
                             is never formed
    delta.merge(module)   -> {"weight": W', "bias"?: b'}: the delta folded in

The model applies linears' deltas through `apply` (`llama.linear`) and the deltas of
modules that are not a product, a norm's weight and the embedding table, through
`merge` (the weight is a vector or a lookup table: merging forms nothing large).
Every method trains a delta from zero, dense and head-only tuning included
(`dense`: a DenseDelta or NormDelta on every module).

A delta pytree mirrors the parameter pytree, with a delta object where a module
sits; deltas under "layers" carry a leading [L] axis like the weights:

    delta = {"layers": {"mlp": {"up_proj": RowDelta(rows=[L, r] int32, w_f=[L, r, d_in])}},
             "norm": NormDelta(weight=[hidden])}

Types:
    RowDelta     SPSFT: W + M W_f, rows chosen by importance (W_f: [r, d_in])
    ColumnDelta  dependency-aware W_f,dep on selected input columns ([d_out, c])
    LoraDelta    LoRA: W + scale * B A
    DenseDelta   a full additive update (what dense or head-only tuning produced)
    BiasDelta    tune a linear's bias
    NormDelta    tune a norm's weight (SPSFT can, LoRA cannot)
    ScaleDelta   per-row scale of W x, used to read Taylor importance off jax.grad

Delta types are `flax.struct` dataclasses (pytrees; LoRA's scale and dropout are static).
Int fields (rows, cols) are fixed; float fields train. `split` and `combine`
separate the two so gradients and optimizer state cover only the float leaves.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spsft_jax import quant, trees
from spsft_jax.llama import Params
from spsft_jax.trees import set_nested


@runtime_checkable
class Delta(Protocol):
    """What every delta type provides (see the module docstring)."""

    def apply(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """`y` (the frozen module's output for `x`) plus this delta's contribution."""

    def merge(self, module: dict) -> dict:
        """`module` ({"weight", "bias"?}) with this delta folded in."""


def _product(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`einsum(spec, x, w)` in x's dtype (bf16 inputs stay bf16), accumulated and returned in float32."""
    return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def _added(y: jax.Array, update: jax.Array) -> jax.Array:
    """`y + update` summed in float32 and rounded once to y's dtype."""
    return (y.astype(jnp.float32) + update).astype(y.dtype)


def _masked(values: jax.Array, mask: jax.Array | None, axis: int) -> jax.Array:
    """Zero the padded slots of a variable-size selection (mask: 1 real, 0 padding)."""
    if mask is None:
        return values
    shape = [1] * values.ndim
    shape[axis] = mask.shape[-1]
    return values * mask.reshape(shape).astype(values.dtype)


@struct.dataclass
class RowDelta:
    """SPSFT rows: `h = W x + M (W_f x)`. rows: [r] int32; w_f: [r, d_in]; mask: [r] or None."""

    rows: jax.Array
    w_f: jax.Array
    mask: jax.Array | None = None
    bias: jax.Array | None = None

    def apply(self, x, y):
        z = _masked(_product("...i,ri->...r", x, self.w_f), self.mask, -1)
        # Scatter-add in float32 (padding slots repeat a row with z = 0: add, never set).
        y = y.astype(jnp.float32).at[..., self.rows].add(z).astype(y.dtype)
        return y if self.bias is None else y + self.bias.astype(y.dtype)

    def merge(self, module):
        w = module["weight"]
        update = _masked(self.w_f, self.mask, 0).astype(w.dtype)
        return _with_bias({**module, "weight": w.at[self.rows].add(update)}, self.bias)


@struct.dataclass
class ColumnDelta:
    """Dependency-aware columns: `h = W x + W_f,dep x[cols]`. cols: [c]; w_f: [d_out, c]."""

    cols: jax.Array
    w_f: jax.Array
    mask: jax.Array | None = None
    bias: jax.Array | None = None

    def apply(self, x, y):
        y = _added(y, _product("...c,oc->...o", x[..., self.cols], _masked(self.w_f, self.mask, 1)))
        return y if self.bias is None else y + self.bias.astype(y.dtype)

    def merge(self, module):
        w = module["weight"]
        update = _masked(self.w_f, self.mask, 1).astype(w.dtype)
        return _with_bias({**module, "weight": w.at[:, self.cols].add(update)}, self.bias)


@struct.dataclass
class LoraDelta:
    """LoRA: `h = W x + scale * B (A dropout(x))`. a: [r, d_in]; b: [d_out, r]; scale = alpha / r.

    Dropout (probability `dropout`, on the LoRA branch's input as PEFT) acts only while
    `key` holds a PRNG key (training sets one per step, see `with_dropout_keys`);
    with `key=None` (evaluation, generation, merging) the branch sees x unchanged.
    """

    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    key: jax.Array | None = None

    def apply(self, x, y):
        if self.key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        ax = _product("...i,ri->...r", x, self.a).astype(x.dtype)
        return _added(y, self.scale * _lora_up(ax, self.b.astype(x.dtype)))

    def merge(self, module):
        w = module["weight"]
        update = self.scale * (self.b.astype(jnp.float32) @ self.a.astype(jnp.float32))
        return {**module, "weight": w + update.astype(w.dtype)}


@struct.dataclass
class DenseDelta:
    """A full additive update of a module's weight (the result of dense or head tuning).

    It folds: `llama.linear` computes one product with `fold(module)` (W + dW in
    float32) rather than adding a second full product, so dense tuning costs what
    tuning the weight in place costs.
    """

    weight: jax.Array
    bias: jax.Array | None = None
    folds = True  # not a field: tells the linear hook to use `fold`

    def fold(self, module):
        """The module with the update added, in float32 (small updates survive a bf16 base)."""
        wide = {k: v.astype(jnp.float32) for k, v in module.items()}
        return _with_bias({**wide, "weight": wide["weight"] + self.weight.astype(jnp.float32)},
                          self.bias)

    def apply(self, x, y):
        y = _added(y, _product("...i,oi->...o", x, self.weight))
        return y if self.bias is None else y + self.bias.astype(y.dtype)

    def merge(self, module):
        w = module["weight"]
        return _with_bias({**module, "weight": w + self.weight.astype(w.dtype)}, self.bias)


@struct.dataclass
class BiasDelta:
    """Tune a linear's bias only."""

    bias: jax.Array

    def apply(self, x, y):
        return y + self.bias.astype(y.dtype)

    def merge(self, module):
        return _with_bias(module, self.bias)


@struct.dataclass
class NormDelta:
    """Additive delta on an RMSNorm weight: `(w + weight) * x` for the normalised x."""

    weight: jax.Array

    def apply(self, x, y):
        return _added(y, x.astype(jnp.float32) * self.weight.astype(jnp.float32))

    def merge(self, module):
        return {**module, "weight": module["weight"] + self.weight.astype(module["weight"].dtype)}


@struct.dataclass
class ScaleDelta:
    """Scale each output row of `W x` by `scale` ([d_out], or [B, d_out] per example).

    At scale = 1 the model is unchanged and dL/dscale_i = w_i . dL/dw_i: the Taylor
    importance of row i, for one scalar per row instead of a full weight gradient.
    """

    scale: jax.Array

    def apply(self, x, y):
        s = self.scale.astype(y.dtype)
        if s.ndim == 2:  # per example: [B, d_out] against y [B, ..., d_out]
            s = s.reshape(s.shape[:1] + (1,) * (y.ndim - 2) + s.shape[1:])
        return y * s

    def merge(self, module):
        if self.scale.ndim != module["weight"].ndim - 1:
            raise ValueError("a per-example ScaleDelta has no single merged weight")
        w = module["weight"]  # the bias is added after the scaled product: it stays
        return {**module, "weight": w * self.scale[..., None].astype(w.dtype)}


def _with_bias(module, bias):
    if bias is None:
        return module
    if "bias" not in module:
        raise ValueError("a bias delta needs a module with a bias (attention_bias / mlp_bias)")
    return {**module, "bias": module["bias"] + bias.astype(module["bias"].dtype)}


DELTA_TYPES = (RowDelta, ColumnDelta, LoraDelta, DenseDelta, BiasDelta, NormDelta, ScaleDelta)


def is_delta(node: Any) -> bool:
    return isinstance(node, DELTA_TYPES)


# --------------------------------------------------------------------------- tree operations


def _module_at(params: Params, path: tuple[str, ...]):
    module = trees.get(params, *path)
    if module is None:
        raise KeyError(f"delta targets {'/'.join(path)}, which the parameters do not have")
    return module


def _expected_shapes(d: Any, module: Any) -> dict[str, tuple[int, ...]]:
    """Field -> the shape a delta's tensor must have on `module` (weights [..., d_out, d_in])."""
    w = tuple(module["weight"].shape)
    bias = tuple(module["bias"].shape) if "bias" in module else None
    if isinstance(d, NormDelta):
        return {"weight": w}
    if isinstance(d, BiasDelta):
        return {"bias": bias} if bias is not None else {}
    *lead, d_out, d_in = w
    lead = tuple(lead)
    if isinstance(d, RowDelta):
        r = d.rows.shape[-1]
        out = {"rows": lead + (r,), "w_f": lead + (r, d_in), "mask": lead + (r,)}
    elif isinstance(d, ColumnDelta):
        c = d.cols.shape[-1]
        out = {"cols": lead + (c,), "w_f": lead + (d_out, c), "mask": lead + (c,)}
    elif isinstance(d, LoraDelta):
        r = d.a.shape[-2]
        out = {"a": lead + (r, d_in), "b": lead + (d_out, r)}
    elif isinstance(d, DenseDelta):
        out = {"weight": w}
    else:
        return {}
    if bias is not None:
        out["bias"] = bias
    return out


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate(params: Params, delta: Any) -> None:
    """Check every delta against the module it meets: a ValueError names the first
    tensor whose shape differs or whose row/column index is out of range.

    `params` may be `llama.param_shapes(cfg)` (only shapes are read). Nothing is
    ever clipped or dropped: indexing out of range inside jit would be silent.
    """
    for path, d in leaves(delta):
        where = "/".join(path)
        try:
            module = _module_at(params, path)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
        for name, shape in _expected_shapes(d, module).items():
            value = getattr(d, name, None)
            if value is None:
                continue
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"delta {where}/{name}: shape {tuple(value.shape)}, the model's "
                                 f"{where} needs {tuple(shape)}")
        if isinstance(d, BiasDelta | RowDelta | ColumnDelta | DenseDelta) and \
                getattr(d, "bias", None) is not None and "bias" not in module:
            raise ValueError(f"delta {where}/bias: the model's {where} has no bias")
        index, size = (("rows", module["weight"].shape[-2]) if isinstance(d, RowDelta) else
                       ("cols", module["weight"].shape[-1]) if isinstance(d, ColumnDelta) else
                       (None, 0))
        if index is not None and _concrete(getattr(d, index)) and getattr(d, index).size:
            values = jnp.asarray(getattr(d, index))
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= size:
                bad = low if low < 0 else high
                raise ValueError(f"delta {where}/{index}: index {bad} is out of range "
                                 f"(the model's {where} has {size})")


def merge(params: Params, delta: Any, *, dtype=jnp.float32, requantize: str | None = "rows") -> Params:
    """Fold every delta into its module: plain parameters, same structure as `params`.

    A quantized weight (`quant.QuantizedWeight`) under a row delta stays quantized with
    `requantize="rows"` (the default): only the trained rows are requantized, every other
    row keeps its bytes. Under any other delta, or with `requantize=None`, it is merged
    in float like any weight.

    Every sum is taken in float32; the merged model is stored in `dtype` (float32
    by default, whatever the base's dtype: small updates survive). `dtype=None`
    keeps each parameter's own dtype; for a bf16 result, `merge_report` tells how
    much of the update the rounding drops.

    Every delta is first checked against its module (`validate`): a shape mismatch or an
    index out of range is an error, never a clip.

    >>> merged = merge(params, result.delta)          # doctest: +SKIP
    >>> llama.forward(cfg, merged, ids)               # == forward(cfg, params, ids, delta)
    """
    validate(params, delta)

    def store(x, like):
        if quant.is_quantized(x) or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return x.astype(jnp.result_type(like) if dtype is None else dtype)

    merged = jax.tree.map(lambda x: store(x, x), params, is_leaf=quant.is_quantized)
    for path, d in leaves(delta):
        if path == ("lm_head",) and "lm_head" not in params:
            raise ValueError("cannot merge an lm_head delta into tied embeddings; untie them first")
        # Stacked layers: fold each layer's slice of the delta into its slice of the weight.
        fold = jax.vmap(type(d).merge) if path[0] == "layers" else type(d).merge
        module = _module_at(params, path)
        if quant.is_quantized(module.get("weight")):
            if requantize == "rows" and isinstance(d, RowDelta):
                merged = set_nested(merged, path, jax.tree.map(store, _merge_rows_quantized(d, module),
                                                               module, is_leaf=quant.is_quantized))
                continue
            module = {**module, "weight": quant.dequantize(module["weight"], jnp.float32)}
        wide = jax.tree.map(lambda x: store(x, jnp.float32) if dtype is None else x.astype(jnp.float32),
                            module)
        merged = set_nested(merged, path, jax.tree.map(store, fold(d, wide), module))
    return merged


def _merge_rows_quantized(d: RowDelta, module: dict) -> dict:
    """`module` with its quantized weight's trained rows requantized (host, layer by layer:
    one layer's float copy at a time); untrained rows keep their bytes."""
    w = module["weight"]
    stacked = w.ndim == 3
    rows = np.asarray(d.rows).reshape((-1,) + d.rows.shape[-1:])
    update = np.asarray(d.w_f, np.float32) * (1.0 if d.mask is None else np.asarray(d.mask)[..., None])
    update = update.reshape((-1,) + d.w_f.shape[-2:])
    if not stacked:  # one layer: as a stack of one
        w = w.replace(data=np.asarray(w.data)[None])
    stack = w.replace(data=np.array(w.data), layer_kind=None if w.layer_kind is None else np.array(w.layer_kind))
    for layer in range(stack.data.shape[0]):
        weight = w.layer(layer)
        chosen, slot = np.unique(rows[layer], return_inverse=True)
        added = np.zeros((len(chosen), w.cols), np.float32)
        np.add.at(added, slot, update[layer])  # padding slots repeat a row with a zero update
        values = np.asarray(quant.dequantize(weight, jnp.float32))[chosen] + added
        stack = quant.put_layer(stack, layer, quant.quantize_rows(weight, chosen, values))
    if not stacked:
        stack = stack.replace(data=stack.data[0])
    return _with_bias({**module, "weight": jax.tree.map(jnp.asarray, stack)}, d.bias)


def merge_report(params: Params, delta: Any, dtype=jnp.bfloat16) -> dict[str, float]:
    """How much of the update a merge stored in `dtype` keeps, over all merged weights.

    Returns {"updated": entries the delta changes, "unchanged": of those, entries
    whose stored value equals the base's (the update rounded away), "norm_kept":
    |stored - base| / |update| in the Frobenius norm (1.0 = all kept), "error":
    |stored - base - update| / |update|}.

    >>> merge_report(params, result.delta)["unchanged"]   # doctest: +SKIP
    """
    exact = merge(params, delta, dtype=jnp.float32)
    stored = merge(params, delta, dtype=dtype)
    updated = unchanged = 0
    update_sq = kept_sq = error_sq = 0.0
    for path, _ in leaves(delta):
        for key, base in _module_at(params, path).items():
            base = jnp.asarray(base, jnp.float32)
            update = _module_at(exact, path)[key] - base
            kept = jnp.asarray(_module_at(stored, path)[key], jnp.float32) - base
            changed = update != 0
            updated += int(changed.sum())
            unchanged += int((changed & (kept == 0)).sum())
            update_sq += float(jnp.sum(update**2))
            kept_sq += float(jnp.sum(kept**2))
            error_sq += float(jnp.sum((kept - update) ** 2))
    scale = update_sq**0.5 or 1.0
    return {"updated": updated, "unchanged": unchanged, "norm_kept": kept_sq**0.5 / scale,
            "error": error_sq**0.5 / scale}


def requantized_report(params: Params, merged: Params, delta: Any) -> dict[str, float]:
    """How much of a row delta's update a quantized merge (`merge`, requantize="rows")
    keeps: {"norm_kept": |merged - base| / |update|, "error": |merged - base - update| /
    |update|}, Frobenius norms over the trained rows (1.0 / 0.0: all kept, exactly).
    Reads only those rows, layer by layer: a 4-bit kind's step can be wider than a
    small update, which rounding then drops."""
    update_sq = kept_sq = error_sq = 0.0
    for path, d in leaves(delta):
        base, new = _module_at(params, path)["weight"], _module_at(merged, path)["weight"]
        if not (isinstance(d, RowDelta) and quant.is_quantized(base)):
            continue
        rows = np.asarray(d.rows).reshape((-1,) + d.rows.shape[-1:])
        update = np.asarray(d.w_f, np.float32) * (1.0 if d.mask is None else np.asarray(d.mask)[..., None])
        update = update.reshape((-1,) + d.w_f.shape[-2:])
        for layer in range(rows.shape[0]):
            pick = lambda w: np.asarray(quant.dequantize(  # noqa: E731
                w.layer(layer) if w.ndim == 3 else w, jnp.float32))[rows[layer]]
            chosen, slot = np.unique(rows[layer], return_inverse=True)
            summed = np.zeros((len(chosen), base.cols), np.float32)
            np.add.at(summed, slot, update[layer])
            added = summed[slot]  # a row picked twice carries both updates
            kept = pick(new) - pick(base)
            first = np.unique(rows[layer], return_index=True)[1]  # each row once
            update_sq += float(np.sum(added[first] ** 2))
            kept_sq += float(np.sum(kept[first] ** 2))
            error_sq += float(np.sum((kept[first] - added[first]) ** 2))
    scale = update_sq**0.5 or 1.0
    return {"norm_kept": kept_sq**0.5 / scale, "error": error_sq**0.5 / scale}


def leaves(delta: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(module path, delta object) for every delta in the tree."""
    return trees.entries(delta, is_delta, "delta")


def _is_trainable(leaf) -> bool:
    return leaf is not None and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def split(tree: Any) -> tuple[Any, Any]:
    """(trainable float leaves, fixed int leaves), each with None where the other has a leaf."""
    trainable = jax.tree.map(lambda x: x if _is_trainable(x) else None, tree)
    fixed = jax.tree.map(lambda x: None if _is_trainable(x) else x, tree)
    return trainable, fixed


def combine(trainable: Any, fixed: Any) -> Any:
    """Inverse of `split`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, fixed,
                        is_leaf=lambda x: x is None)


def num_trainable(tree: Any) -> int:
    """Trainable parameters in a delta (padding slots of a masked selection excluded)."""
    total = 0
    for _, d in leaves(tree):
        for field in dataclasses.fields(d):
            value = getattr(d, field.name)
            if not hasattr(value, "shape") or not _is_trainable(value):
                continue
            mask = getattr(d, "mask", None)
            if field.name == "w_f" and mask is not None:
                total += int(jnp.sum(mask)) * (value.size // mask.size)
            else:
                total += value.size
    return total


# --------------------------------------------------------------------------- constructors


def rows_from_selection(params: Params, selection: Any, dtype=jnp.float32, *, bias: bool = False) -> Any:
    """Zero-initialised deltas for a selection pytree: a RowDelta for `{"rows": [L, r],
    "mask"?: [L, r]}`, a ColumnDelta for `{"cols": [L, c], "mask"?}` (dependency groups)."""

    def make(path, sel):
        module = _module_at(params, path)
        d_out, d_in = module["weight"].shape[-2:]
        b = jnp.zeros(module["bias"].shape, dtype) if bias and "bias" in module else None
        mask = sel.get("mask")
        # The mask stays boolean so `split` keeps it with the fixed (untrained) leaves.
        mask = None if mask is None else jnp.asarray(mask, bool)
        if "cols" in sel:
            cols = jnp.asarray(sel["cols"], jnp.int32)
            lead = cols.shape[:-1]
            return ColumnDelta(cols, jnp.zeros(lead + (d_out, cols.shape[-1]), dtype), mask, b)
        rows = jnp.asarray(sel["rows"], jnp.int32)
        return RowDelta(rows, jnp.zeros(rows.shape + (d_in,), dtype), mask, b)

    from spsft_jax.selection import entries

    return trees.nest({path: make(path, entry) for path, entry in entries(selection)})


def lora(params: Params, modules: list[tuple[str, ...]], key: jax.Array, *, rank: int,
         alpha: float | None = None, dropout: float = 0.0, dtype=jnp.float32) -> Any:
    """LoRA deltas on the given module paths, initialised as PEFT's default: A ~
    kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)), and B = 0.

    alpha: scale = alpha / rank (default alpha = rank, scale 1; the paper's baseline
    uses 16). dropout: on the LoRA input while training (the paper's baseline: 0.1).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout={dropout}: must lie in [0, 1)")
    alpha = float(rank if alpha is None else alpha)
    tree: dict = {}
    for path, k in zip(modules, jax.random.split(key, len(modules))):
        w = _module_at(params, path)["weight"]
        *lead, d_out, d_in = w.shape
        bound = (1.0 / d_in) ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, d_in]
        a = jax.random.uniform(k, (*lead, rank, d_in), dtype, -bound, bound)
        b = jnp.zeros((*lead, d_out, rank), dtype)
        tree = set_nested(tree, path, LoraDelta(a, b, alpha / rank, float(dropout)))
    return tree


def with_dropout_keys(delta: Any, key: jax.Array) -> Any:
    """The delta with a fresh PRNG key in every LoRA delta that has dropout (one key per
    layer under "layers"), so that `apply` drops inputs; other deltas are unchanged."""
    found = [(p, d) for p, d in leaves(delta) if isinstance(d, LoraDelta) and d.dropout > 0]
    for index, (path, d) in enumerate(found):
        k = jax.random.fold_in(key, index)
        k = jax.random.split(k, d.a.shape[0]) if path[0] == "layers" else k
        delta = set_nested(delta, path, dataclasses.replace(d, key=k))
    return delta


def scales(params: Params, modules: list[tuple[str, ...]], batch: int | None = None) -> Any:
    """ScaleDeltas of ones (per example when `batch` is given) on the given module paths."""
    tree: dict = {}
    for path in modules:
        w = _module_at(params, path)["weight"]
        *lead, d_out, _ = w.shape
        shape = (*lead, d_out) if batch is None else (*lead, batch, d_out)
        tree = set_nested(tree, path, ScaleDelta(jnp.ones(shape, jnp.float32)))
    return tree


def dense(params: Params, modules: list[tuple[str, ...]] | None = None, dtype=jnp.float32) -> Any:
    """Zero deltas covering every parameter of `modules` (default: every module): a
    NormDelta on a norm, a DenseDelta (weight, and bias where the module has one) elsewhere.
    Training them is dense (or, on the LM head, head-only) fine-tuning."""
    if modules is None:
        modules = [path[:-1] for path, _ in trees.leaf_paths(params) if path[-1] == "weight"]
    tree: dict = {}
    for path in modules:
        module = _module_at(params, path)
        zeros = {k: jnp.zeros(v.shape, dtype) for k, v in module.items()}
        d = NormDelta(zeros["weight"]) if path[-1].endswith("norm") else DenseDelta(**zeros)
        tree = set_nested(tree, path, d)
    return tree


def norms(params: Params, dtype=jnp.float32) -> Any:
    """Zero NormDeltas on every RMSNorm: the layers' (two in Llama; with q/k norms and
    Gemma's sandwich norms, more) and the final one."""
    tree: dict = {}
    for path, w in trees.leaf_paths(params):
        if path[-1] == "weight" and path[-2].endswith("norm"):
            tree = set_nested(tree, path[:-1], NormDelta(jnp.zeros(w.shape, dtype)))
    return tree


def union(*trees: Any) -> Any:
    """Merge delta trees that target different modules."""
    out: dict = {}
    for tree in trees:
        for path, d in leaves(tree):
            try:
                _module_at(out, path)
            except KeyError:
                out = set_nested(out, path, d)
                continue
            raise ValueError(f"two deltas target {'/'.join(path)}")
    return out


@jax.custom_vjp
def _lora_up(ax: jax.Array, b: jax.Array) -> jax.Array:
    """`ax @ b.T` (float32 out) whose gradient for `b` contracts the tokens of the small
    `ax [..., r]` against the output gradient, so the large output gradient is never transposed."""
    return jnp.einsum("...r,or->...o", ax, b, preferred_element_type=jnp.float32)


def _lora_up_fwd(ax, b):
    return _lora_up(ax, b), (ax, b)


def _lora_up_bwd(saved, g):
    ax, b = saved
    g = g.astype(ax.dtype)
    tokens = ax.reshape(-1, ax.shape[-1]), g.reshape(-1, g.shape[-1])
    d_b = jnp.matmul(tokens[0].T, tokens[1], preferred_element_type=jnp.float32).T
    d_ax = jnp.einsum("...o,or->...r", g, b, preferred_element_type=jnp.float32)
    return d_ax.astype(ax.dtype), d_b.astype(b.dtype)


_lora_up.defvjp(_lora_up_fwd, _lora_up_bwd)
