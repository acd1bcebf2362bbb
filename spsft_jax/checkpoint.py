"""Save and load deltas (adapter files) and training state.

An adapter file is one safetensors file holding only the delta: selected rows and
`W_f` for SPSFT, A/B for LoRA, norm and bias deltas; its metadata records the delta
types and what the caller adds (base model, targets, metric, ...):

    tensors:  "layers/mlp/up_proj/rows" int32 [L, r], "layers/mlp/up_proj/w_f" [L, r, d_in], ...
    metadata: {"spsft_jax.deltas": '{"layers/mlp/up_proj": {"type": "RowDelta"}, ...}', "model": ...}

Adapters saved with `cfg=` also record what they were made for, and `load_delta(path,
cfg=cfg)` refuses a model they do not fit, naming the first field or tensor that differs:

    "spsft_jax.config":  '{"vocab_size": 96, "hidden_size": 32, "num_layers": 2, ...}'
    "spsft_jax.targets": '{"layers/mlp/up_proj": [2, 64, 32], ...}'   (each target's weight shape)

An adapter is known by `adapter_digest` (the SHA-256 of its file), which a merged export
records so that the same adapter is not applied to it a second time.

Training state (trainable pytree, optimizer state, step) goes through orbax, with a
`run.json` beside it recording the run it belongs to (method, rank, selection digest,
model), which a resume must match.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from spsft_jax import delta as deltas
from spsft_jax import llama
from spsft_jax import trees
from spsft_jax.architecture import CONFIG_KEY, architecture, first_difference
from spsft_jax.outputs import output_file

DELTAS_KEY = "spsft_jax.deltas"
TARGETS_KEY = "spsft_jax.targets"
RUN_FILE = "run.json"
_TYPES = {cls.__name__: cls for cls in deltas.DELTA_TYPES}


def _weight_shape(shapes: Any, module_path: tuple[str, ...]) -> list[int]:
    try:
        return list(deltas._module_at(shapes, module_path)["weight"].shape)
    except KeyError as err:
        raise ValueError(err.args[0]) from None


def target_shapes(cfg: Any, delta: Any) -> dict[str, list[int]]:
    """Module path -> the weight shape each delta of `delta` targets in a model of `cfg`."""
    shapes = llama.param_shapes(cfg)
    return {"/".join(p): _weight_shape(shapes, p) for p, _ in deltas.leaves(delta)}


def check_delta(where: str, delta: Any, metadata: dict[str, str], cfg: Any, params: Any = None) -> None:
    """Refuse an adapter that does not fit the model of `cfg` (and `params`), naming the
    first architecture field or tensor that differs (ValueError)."""
    if CONFIG_KEY in metadata:
        diff = first_difference(json.loads(metadata[CONFIG_KEY]), architecture(cfg))
        if diff:
            raise ValueError(f"{where}: adapter does not fit the model: {diff}")
    shapes = llama.param_shapes(cfg)
    for module, shape in json.loads(metadata.get(TARGETS_KEY, "{}")).items():
        here = _weight_shape(shapes, tuple(module.split("/")))
        if list(shape) != here:
            raise ValueError(f"{where}: adapter made for {module} of shape {tuple(shape)}, "
                             f"the model's is {tuple(here)}")
    try:
        deltas.validate(shapes if params is None else params, delta)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def save_delta(path: str | os.PathLike, delta: Any, *, cfg: Any = None, overwrite: bool = False,
               **metadata: str) -> Path:
    """Write `delta` to one safetensors file (atomically); `metadata` values are strings.

    cfg: the model's `LlamaConfig`; recorded (architecture and each target's shape) so that
        `load_delta(path, cfg=...)` can refuse a model the adapter does not fit.
    overwrite: replace an existing file that spsft-jax did not write.
    """
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
    if cfg is not None:
        deltas.validate(llama.param_shapes(cfg), delta)
        info[CONFIG_KEY] = json.dumps(architecture(cfg))
        info[TARGETS_KEY] = json.dumps(target_shapes(cfg, delta))
    with output_file(path, "wb", overwrite=overwrite) as f:
        f.write(save(tensors, metadata=info))
    return Path(path)


def load_delta(path: str | os.PathLike, *, cfg: Any = None, params: Any = None,
               allow_nonfinite: bool = False) -> tuple[Any, dict[str, str]]:
    """(delta pytree, metadata) from a file written by `save_delta`.

    With `cfg` (and optionally `params`), refuse an adapter that does not fit that model
    (see `check_delta`). A tensor holding NaN or Inf is refused, naming it, unless
    `allow_nonfinite=True`.
    """
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors adapter ({err})") from None
    if DELTAS_KEY not in metadata:
        raise ValueError(f"{path}: no '{DELTAS_KEY}' metadata; not an spsft-jax adapter file")
    if not allow_nonfinite:
        check_finite(path, arrays)
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
    if cfg is not None:
        check_delta(str(path), tree, metadata, cfg, params)
    return tree, metadata


def check_finite(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Refuse the first floating tensor (by name) holding NaN or Inf: merged or applied, it
    would turn every output it touches into NaN."""
    for name in sorted(arrays):
        array = arrays[name]
        # jnp's test, not np's: it counts bfloat16 as floating.
        if jax.numpy.issubdtype(array.dtype, jax.numpy.floating) and not np.isfinite(array).all():
            raise ValueError(f"{path}: tensor {name!r} holds NaN or Inf values "
                             f"(allow_nonfinite=True / --allow-nonfinite loads it anyway)")


# Bytes hashed at a time, so a large adapter is never read whole.
DIGEST_CHUNK_BYTES = 1 << 20


def adapter_digest(path: str | os.PathLike) -> str:
    """"sha256:<hex>" of an adapter file's bytes: what a merged export records of it."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(DIGEST_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as err:
        raise ValueError(f"{path}: adapter file cannot be read ({err.strerror or err})") from None
    return f"sha256:{digest.hexdigest()}"


# --------------------------------------------------------------------------- training state


def save_state(directory: str | os.PathLike, step: int, state: Any, *, run: dict | None = None,
               keep: int | None = None) -> None:
    """Save a training-state pytree under `directory/<step>` with orbax; `run` (what the
    state belongs to) goes to `run.json` beside it, for `restore_state` to check.
    keep: how many of the latest steps to keep (None: all)."""
    import orbax.checkpoint as ocp

    if run is not None:
        save_run_info(directory, run)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep)
    with ocp.CheckpointManager(Path(directory).absolute(), options=options) as manager:
        manager.save(step, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()


def delete_state(directory: str | os.PathLike, step: int) -> None:
    """Remove the checkpoint of `step` (one found unusable), so an earlier one is the latest."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(directory).absolute()) as manager:
        if step in manager.all_steps():
            manager.delete(step)


def restore_state(directory: str | os.PathLike, like: Any, *, run: dict | None = None) -> tuple[int, Any] | None:
    """(step, state) of the latest checkpoint in `directory` shaped like `like`, or None.

    With `run`, a checkpoint whose `run.json` records another run (method, selection, rank,
    model, trainable shapes) is refused, naming the first field that differs; a state that
    does not fit `like` is refused too (ValueError).
    """
    import orbax.checkpoint as ocp

    if not Path(directory).exists():
        return None
    with ocp.CheckpointManager(Path(directory).absolute()) as manager:
        step = manager.latest_step()
        if step is None:
            return None
        if run is not None:
            check_run_info(directory, run)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            return step, manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{directory}/{step}: checkpoint does not fit this run "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def latest_step(directory: str | os.PathLike) -> int | None:
    """The latest finished checkpoint step in `directory` (None: none), read from the
    folder names alone, so a command can decide before it loads anything."""
    try:
        steps = [int(e.name) for e in Path(directory).iterdir() if e.is_dir() and e.name.isdigit()]
    except OSError:
        return None
    return max(steps, default=None)


def read_run_info(directory: str | os.PathLike) -> dict:
    """`run.json` of a checkpoint folder ({} when there is none)."""
    try:
        info = json.loads((Path(directory) / RUN_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ValueError(f"{Path(directory) / RUN_FILE}: unreadable ({err})") from None
    return info if isinstance(info, dict) else {}


HISTORY_FILE = "history.json"


def write_history(directory: str | os.PathLike, history: list[dict]) -> None:
    """Every step's record up to the latest checkpoint, beside it (a resume carries it on)."""
    with output_file(Path(directory) / HISTORY_FILE, overwrite=True) as f:
        json.dump(history, f)


def read_history(directory: str | os.PathLike) -> list[dict]:
    try:
        history = json.loads((Path(directory) / HISTORY_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []


def save_run_info(directory: str | os.PathLike, info: dict) -> None:
    """Record what a training state belongs to (`run.json` beside the orbax steps)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    with output_file(Path(directory) / RUN_FILE, overwrite=True) as f:
        json.dump(info, f, indent=1, sort_keys=True)


def check_run_info(directory: str | os.PathLike, info: dict) -> None:
    """Refuse to resume from `directory` when its `run.json` records another run
    (ValueError naming the first field that differs)."""
    file = Path(directory) / RUN_FILE
    try:
        recorded = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{file}: missing; the checkpoints in {directory} do not say which run "
                         f"they belong to, so they cannot be resumed") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{file}: unreadable ({err})") from None
    recorded.pop("info", None)  # the caller's notes, not part of what must match
    diff = first_difference(recorded, json.loads(json.dumps(info)))
    if diff:
        raise ValueError(f"{file}: checkpoint made for another run: {diff}")
