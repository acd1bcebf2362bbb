"""Save and load deltas (adapter files) and training state.

An adapter file is one safetensors file holding only the delta: selected rows and
`W_f` for SPSFT, A/B for LoRA, norm and bias deltas; its metadata records the delta
types and what the caller adds (base model, targets, metric, ...):

    tensors:  "layers/mlp/up_proj/rows" int32 [L, r], "layers/mlp/up_proj/w_f" [L, r, d_in], ...
    metadata: {"spsft_jax.deltas": '{"layers/mlp/up_proj": {"type": "RowDelta"}, ...}', "model": ...}

Training state (trainable pytree, optimizer state, step) goes through orbax.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from spsft_jax import delta as deltas
from spsft_jax import trees
from spsft_jax.atomic import atomic_file

DELTAS_KEY = "spsft_jax.deltas"
_TYPES = {cls.__name__: cls for cls in deltas.DELTA_TYPES}


def save_delta(path: str | os.PathLike, delta: Any, **metadata: str) -> Path:
    """Write `delta` to one safetensors file (atomically); `metadata` values are strings."""
    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, dict] = {}
    for module_path, d in deltas.leaves(delta):
        key = "/".join(module_path)
        meta = {"type": type(d).__name__}
        for field in dataclasses.fields(d):
            value = getattr(d, field.name)
            if value is None:
                continue
            if hasattr(value, "shape"):
                tensors[f"{key}/{field.name}"] = np.asarray(value)
            else:
                meta[field.name] = value
        layout[key] = meta
    info = {k: str(v) for k, v in metadata.items()}
    info[DELTAS_KEY] = json.dumps(layout)
    with atomic_file(path, "wb") as f:
        f.write(save(tensors, metadata=info))
    return Path(path)


def load_delta(path: str | os.PathLike) -> tuple[Any, dict[str, str]]:
    """(delta pytree, metadata) from a file written by `save_delta`."""
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors adapter ({err})") from None
    if DELTAS_KEY not in metadata:
        raise ValueError(f"{path}: no '{DELTAS_KEY}' metadata; not an spsft-jax adapter file")
    tree: dict = {}
    for key, meta in json.loads(metadata.pop(DELTAS_KEY)).items():
        meta = dict(meta)
        kind = meta.pop("type")
        if kind not in _TYPES:
            raise ValueError(f"{path}: module {key} has unknown delta type {kind!r}")
        cls = _TYPES[kind]
        fields = {}
        for field in dataclasses.fields(cls):
            name = f"{key}/{field.name}"
            if name in arrays:
                fields[field.name] = jax.numpy.asarray(arrays.pop(name))
            elif field.name in meta:
                fields[field.name] = meta[field.name]
        try:
            tree = trees.set_nested(tree, tuple(key.split("/")), cls(**fields))
        except TypeError as err:
            raise ValueError(f"{path}: module {key}: {err}") from None
    if arrays:
        raise ValueError(f"{path}: tensors not described by the metadata: {sorted(arrays)[:5]}")
    return tree, metadata


# --------------------------------------------------------------------------- training state


def save_state(directory: str | os.PathLike, step: int, state: Any) -> None:
    """Save a training-state pytree under `directory/<step>` with orbax."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(directory).absolute()) as manager:
        manager.save(step, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()


def restore_state(directory: str | os.PathLike, like: Any) -> tuple[int, Any] | None:
    """(step, state) of the latest checkpoint in `directory` shaped like `like`, or None."""
    import orbax.checkpoint as ocp

    if not Path(directory).exists():
        return None
    with ocp.CheckpointManager(Path(directory).absolute()) as manager:
        step = manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return step, manager.restore(step, args=ocp.args.StandardRestore(abstract))
