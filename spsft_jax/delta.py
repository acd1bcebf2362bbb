"""Trainable deltas: what a fine-tuning method adds to a frozen module.

Every method is a delta type with two operations on one (unstacked) layer:

    delta.apply(x, y)     -> y + the delta's contribution, where y = x @ W.T is the
                             frozen product; the merged weight is never formed
    delta.merge(module)   -> {"weight": W', "bias"?: b'}: the delta folded in

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

Int fields (rows, cols) are fixed; float fields train. `split` and `combine`
separate the two so gradients and optimizer state cover only the float leaves.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from spsft_jax.llama import Params
from spsft_jax.trees import set_nested


def _pytree(*, meta: tuple[str, ...] = ()):
    """Register a dataclass as a pytree whose fields are children except `meta`."""

    def wrap(cls):
        cls = dataclasses.dataclass(cls)
        fields = [f.name for f in dataclasses.fields(cls)]
        return jax.tree_util.register_dataclass(
            cls, data_fields=[f for f in fields if f not in meta], meta_fields=list(meta)
        )

    return wrap


def _masked(values: jax.Array, mask: jax.Array | None, axis: int) -> jax.Array:
    """Zero the padded slots of a variable-size selection (mask: 1 real, 0 padding)."""
    if mask is None:
        return values
    shape = [1] * values.ndim
    shape[axis] = mask.shape[-1]
    return values * mask.reshape(shape).astype(values.dtype)


@_pytree()
class RowDelta:
    """SPSFT rows: `h = W x + M (W_f x)`. rows: [r] int32; w_f: [r, d_in]; mask: [r] or None."""

    rows: jax.Array
    w_f: jax.Array
    mask: jax.Array | None = None
    bias: jax.Array | None = None

    def apply(self, x, y):
        z = jnp.einsum("...i,ri->...r", x, self.w_f.astype(x.dtype))
        y = y.at[..., self.rows].add(_masked(z, self.mask, -1).astype(y.dtype))
        return y if self.bias is None else y + self.bias.astype(y.dtype)

    def merge(self, module):
        w = module["weight"]
        update = _masked(self.w_f, self.mask, 0).astype(w.dtype)
        return _with_bias({**module, "weight": w.at[self.rows].add(update)}, self.bias)


@_pytree()
class ColumnDelta:
    """Dependency-aware columns: `h = W x + W_f,dep x[cols]`. cols: [c]; w_f: [d_out, c]."""

    cols: jax.Array
    w_f: jax.Array
    mask: jax.Array | None = None
    bias: jax.Array | None = None

    def apply(self, x, y):
        w = _masked(self.w_f, self.mask, 1).astype(x.dtype)
        y = y + jnp.einsum("...c,oc->...o", x[..., self.cols], w).astype(y.dtype)
        return y if self.bias is None else y + self.bias.astype(y.dtype)

    def merge(self, module):
        w = module["weight"]
        update = _masked(self.w_f, self.mask, 1).astype(w.dtype)
        return _with_bias({**module, "weight": w.at[:, self.cols].add(update)}, self.bias)


@_pytree(meta=("scale",))
class LoraDelta:
    """LoRA: `h = W x + scale * B (A x)`. a: [r, d_in]; b: [d_out, r]; scale = alpha / r."""

    a: jax.Array
    b: jax.Array
    scale: float = 1.0

    def apply(self, x, y):
        ax = jnp.einsum("...i,ri->...r", x, self.a.astype(x.dtype))
        return y + self.scale * jnp.einsum("...r,or->...o", ax, self.b.astype(x.dtype)).astype(y.dtype)

    def merge(self, module):
        w = module["weight"]
        update = self.scale * (self.b.astype(jnp.float32) @ self.a.astype(jnp.float32))
        return {**module, "weight": w + update.astype(w.dtype)}


@_pytree()
class DenseDelta:
    """A full additive update of a module's weight (the result of dense or head tuning)."""

    weight: jax.Array
    bias: jax.Array | None = None

    def apply(self, x, y):
        y = y + jnp.einsum("...i,oi->...o", x, self.weight.astype(x.dtype)).astype(y.dtype)
        return y if self.bias is None else y + self.bias.astype(y.dtype)

    def merge(self, module):
        w = module["weight"]
        return _with_bias({**module, "weight": w + self.weight.astype(w.dtype)}, self.bias)


@_pytree()
class BiasDelta:
    """Tune a linear's bias only."""

    bias: jax.Array

    def apply(self, x, y):
        return y + self.bias.astype(y.dtype)

    def merge(self, module):
        return _with_bias(module, self.bias)


@_pytree()
class NormDelta:
    """Additive delta on an RMSNorm weight."""

    weight: jax.Array

    def merge(self, module):
        return {**module, "weight": module["weight"] + self.weight.astype(module["weight"].dtype)}


@_pytree()
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


def _map_with_path(fn: Callable, tree: Any, path: tuple[str, ...] = ()) -> Any:
    if is_delta(tree):
        return fn(path, tree)
    if isinstance(tree, dict):
        return {k: _map_with_path(fn, v, path + (k,)) for k, v in tree.items()}
    raise TypeError(f"delta{''.join(f'[{k!r}]' for k in path)}: expected a dict or a delta, "
                    f"found {type(tree).__name__}")


def _module_at(params: Params, path: tuple[str, ...]):
    node = params
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"delta targets {'/'.join(path)}, which the parameters do not have")
        node = node[key]
    return node


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


def merge(params: Params, delta: Any) -> Params:
    """Fold every delta into its module: plain parameters, same structure as `params`.

    Every delta is first checked against its module (`validate`): a shape mismatch or an
    index out of range is an error, never a clip.

    >>> merged = merge(params, result.delta)          # doctest: +SKIP
    >>> llama.forward(cfg, merged, ids)               # == forward(cfg, params, ids, delta)
    """
    validate(params, delta)
    merged = params
    for path, d in leaves(delta):
        if path == ("lm_head",) and "lm_head" not in params:
            raise ValueError("cannot merge an lm_head delta into tied embeddings; untie them first")
        # Stacked layers: fold each layer's slice of the delta into its slice of the weight.
        fold = jax.vmap(type(d).merge) if path[0] == "layers" else type(d).merge
        merged = set_nested(merged, path, fold(d, _module_at(params, path)))
    return merged


def leaves(delta: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(module path, delta object) for every delta in the tree."""
    found: list = []
    if delta is not None:
        _map_with_path(lambda p, d: found.append((p, d)), delta)
    return found


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
    """Zero-initialised RowDeltas for a selection pytree of `{"rows": [L, r], "mask"?: [L, r]}`."""

    def make(path, sel):
        module = _module_at(params, path)
        rows = jnp.asarray(sel["rows"], jnp.int32)
        d_in = module["weight"].shape[-1]
        b = jnp.zeros(module["bias"].shape, dtype) if bias and "bias" in module else None
        mask = sel.get("mask")
        # The mask stays boolean so `split` keeps it with the fixed (untrained) leaves.
        return RowDelta(rows, jnp.zeros(rows.shape + (d_in,), dtype),
                        None if mask is None else jnp.asarray(mask, bool), b)

    return _map_selection(make, selection)


def _map_selection(fn: Callable, selection: Any, path: tuple[str, ...] = ()) -> Any:
    if isinstance(selection, dict) and "rows" in selection:
        return fn(path, selection)
    if isinstance(selection, dict):
        return {k: _map_selection(fn, v, path + (k,)) for k, v in selection.items()}
    raise TypeError(f"selection{''.join(f'[{k!r}]' for k in path)}: expected a dict")


def lora(params: Params, modules: list[tuple[str, ...]], key: jax.Array, *, rank: int,
         alpha: float | None = None, dtype=jnp.float32) -> Any:
    """LoRA deltas on the given module paths: A ~ Kaiming-uniform, B = 0 (as PEFT)."""
    alpha = float(rank if alpha is None else alpha)
    tree: dict = {}
    for path, k in zip(modules, jax.random.split(key, len(modules))):
        w = _module_at(params, path)["weight"]
        *lead, d_out, d_in = w.shape
        bound = (1.0 / d_in) ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, d_in]
        a = jax.random.uniform(k, (*lead, rank, d_in), dtype, -bound, bound)
        b = jnp.zeros((*lead, d_out, rank), dtype)
        tree = set_nested(tree, path, LoraDelta(a, b, alpha / rank))
    return tree


def scales(params: Params, modules: list[tuple[str, ...]], batch: int | None = None) -> Any:
    """ScaleDeltas of ones (per example when `batch` is given) on the given module paths."""
    tree: dict = {}
    for path in modules:
        w = _module_at(params, path)["weight"]
        *lead, d_out, _ = w.shape
        shape = (*lead, d_out) if batch is None else (*lead, batch, d_out)
        tree = set_nested(tree, path, ScaleDelta(jnp.ones(shape, jnp.float32)))
    return tree


def norms(params: Params, dtype=jnp.float32) -> Any:
    """Zero NormDeltas on every RMSNorm (the layers' two and the final one)."""
    layers = params["layers"]
    return {
        "layers": {name: NormDelta(jnp.zeros(layers[name]["weight"].shape, dtype))
                   for name in ("input_layernorm", "post_attention_layernorm")},
        "norm": NormDelta(jnp.zeros(params["norm"]["weight"].shape, dtype)),
    }


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
