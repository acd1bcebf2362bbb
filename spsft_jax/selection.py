"""Row selections: which rows (output neurons) of each targeted linear SPSFT trains.

A selection is plain data with the nesting of the scores it came from
(`spsft_jax.importance`) and of the trainable delta it becomes
(`delta.rows_from_selection`):

    scores    = {"layers": {"mlp": {"up_proj": [L, d_out] float}, ...}}
    selection = {"layers": {"mlp": {"up_proj": {
                    "rows": int32 [L, r],   # ascending within each layer
                    "mask": bool  [L, r],   # only when layers keep different numbers of rows
                }}, ...}}

    select(scores, rank=8)                           top-8 rows per module per layer (the LLM setting)
    select(scores, ratio=0.05, cfg=cfg)              5% of the targeted weights' parameters
    select(scores, rank=8, scope="global", cfg=cfg)  the same budget, ranked over all modules and layers
    select(scores, rank=8, cfg=cfg, dependency=True) whole MLP channels and attention heads
    save(path, selection, model=..., targets=..., metric=...);  load(path) -> (selection, metadata)

A dependency selection (paper sec. 4.3, appendix B) holds `"cols": int32 [L, c]`
(with its `"mask"`) for the modules whose input columns are selected (`down_proj`,
`o_proj`) and `"rows"` for the others; `delta.rows_from_selection` makes column
deltas of the former.

With a mask, a layer keeping fewer than r rows is padded at the end by repeating its
last real row (row 0 when it keeps none), mask False there, so `rows` stays sorted.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from spsft_jax import outputs
from spsft_jax.architecture import CONFIG_KEY, architecture, first_difference
from spsft_jax.llama import LlamaConfig
from spsft_jax import trees
from spsft_jax.trees import leaf_paths, nest

Selection = dict[str, Any]
Path = tuple[str, ...]

FORMAT = "spsft-jax/selection"
FORMAT_VERSION = "1"
SCOPES = ("layer", "global")
NORMALIZATIONS = ("none", "module", "layer")
GROUP_REDUCTIONS = ("sum", "mean", "max")


# --------------------------------------------------------------------------- selecting


def select(
    scores: Mapping[str, Any],
    *,
    rank: int | None = None,
    ratio: float | None = None,
    scope: str = "layer",
    cfg: LlamaConfig | None = None,
    params_per_row: Mapping[str, Any] | int | None = None,
    normalize: str = "none",
    dependency: bool = False,
    group_reduce: str = "sum",
) -> Selection:
    """The highest-scoring rows of every module in `scores` (one of `rank`, `ratio`).

    rank: scope "layer": the top `rank` rows of every module in every layer.
        scope "global": the parameter budget of that, spent on the best rows of all
        modules and layers ranked together (layers then keep different numbers of rows).
    ratio: the fraction of the targeted weights' parameters to train (each row of a
        module costs its d_in). Scope "layer" keeps `round(ratio * d_out)` rows of a
        module in every layer; scope "global" fills the budget to within one row.
    cfg / params_per_row: the cost of one row of each module (its d_in), from the
        config or given as a tree like `scores` with int leaves (or one int for all).
        Scope "global" counts its budget in rows when neither is given; a global
        ratio needs them.
    normalize (scope "global" only): "none" ranks raw scores; "module" divides each
        module's scores by their mean over all its layers, "layer" by their mean in
        each layer, so modules of different scale compete on relative importance.

    dependency: select whole dependency groups (needs `cfg`, scope "layer"): an MLP
        channel c is row c of gate_proj and up_proj and column c of down_proj; an
        attention head h is its head_dim rows of q_proj, the rows of its key-value
        head in k_proj and v_proj (shared by the heads of a GQA group) and its
        head_dim columns of o_proj. Only modules present in `scores` take part.
        `rank` counts MLP channels per layer, and heads as round(rank / head_dim)
        (at least 1); `ratio` keeps round(ratio * n) of the n channels and heads of
        each layer. Each group costs its members' parameters, so the trainable
        count then matches plain SPSFT's at the same ratio (the paper halves its
        ratio because each of its layers gets both a row and a column delta; here
        each module gets one of the two). Heads sharing a key-value head share its
        rows, so k/v may train fewer rows than their heads' share.
    group_reduce: how a group's score comes from its members' row scores: "sum"
        (default), "mean" or "max". Columns have no row score of their own, so
        down_proj and o_proj do not vote. Groups rank only against groups of the same
        kind in the same layer, which all have the same members, so no normalisation
        across module sizes is needed; "mean" divides by the member-row count.

    Ties go to the lower row index (a stable sort); in global scope to the earlier
    module (sorted by path), then the lower layer. A module whose every layer keeps
    no row is left out of the selection.

    >>> scores = {"layers": {"mlp": {"up_proj": np.array([[0.1, 0.9, 0.5, 0.9]])}}}
    >>> select(scores, rank=2)["layers"]["mlp"]["up_proj"]["rows"]
    array([[1, 3]], dtype=int32)
    """
    if (rank is None) == (ratio is None):
        raise ValueError("select: give exactly one of rank= or ratio=")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: choose one of {', '.join(map(repr, SCOPES))}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}: choose one of {', '.join(map(repr, NORMALIZATIONS))}")
    if scope == "layer" and normalize != "none":
        raise ValueError("normalize= only matters with scope='global' (each layer ranks its own rows)")
    if rank is not None and (not isinstance(rank, (int, np.integer)) or rank < 1):
        raise ValueError(f"rank={rank!r}: must be a positive integer")
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"ratio={ratio!r}: must lie in (0, 1]")

    flat = _flat_scores(scores)
    if dependency:
        if cfg is None or scope != "layer":
            raise ValueError("select(dependency=True) needs cfg= and scope='layer'")
        if group_reduce not in GROUP_REDUCTIONS:
            raise ValueError(f"group_reduce={group_reduce!r}: choose one of "
                             f"{', '.join(map(repr, GROUP_REDUCTIONS))}")
        return _dependency_groups(flat, cfg, rank=rank, ratio=ratio, reduce=group_reduce)
    if scope == "layer":
        picked = {path: _top_rows(path, s, rank if rank is not None else _ratio_rank(ratio, s))
                  for path, s in flat.items()}
    else:
        costs = _row_costs(flat, cfg, params_per_row)
        if ratio is not None and costs is None:
            raise ValueError("select(ratio=..., scope='global') needs cfg= or params_per_row= "
                             "to count each module's parameters per row")
        picked = _global_rows(flat, costs or {p: 1 for p in flat}, rank=rank, ratio=ratio,
                              normalize=normalize)
    return nest({path: _rows_entry(kept) for path, kept in picked.items() if any(map(len, kept))})


_MLP_ROWS, _MLP_COLS = ("gate_proj", "up_proj"), "down_proj"
_HEAD_ROWS, _KV_ROWS, _HEAD_COLS = "q_proj", ("k_proj", "v_proj"), "o_proj"


def _dependency_groups(flat, cfg: LlamaConfig, *, rank, ratio, reduce) -> Selection:
    """Top MLP channels and attention heads per layer, as rows and columns of their members."""
    by_name = {path[-1]: (path, s) for path, s in flat.items()}
    unknown = [n for n in by_name if n not in cfg.linear_shapes()]
    if unknown:
        raise ValueError(f"dependency groups cover the decoder linears; scores also hold {unknown[0]}")
    picked: dict[Path, tuple[str, list[np.ndarray]]] = {}
    hd, group = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads

    def reduce_over(members):  # members: [L, n_groups, rows per group] each
        stacked = np.concatenate(members, axis=-1)
        return {"sum": stacked.sum(-1), "mean": stacked.mean(-1), "max": stacked.max(-1)}[reduce]

    def top(group_scores, count, what):
        if count > group_scores.shape[-1]:
            raise ValueError(f"dependency groups: {count} {what} per layer, the model has "
                             f"{group_scores.shape[-1]}")
        return [np.sort(np.argsort(-g, kind="stable")[:count]) for g in group_scores]

    rows_mlp = [by_name[n] for n in _MLP_ROWS if n in by_name]
    if rows_mlp or _MLP_COLS in by_name:
        if not rows_mlp:
            raise ValueError("dependency groups: MLP channels are scored by gate_proj/up_proj rows; "
                             "scores hold only down_proj")
        channels = reduce_over([s[..., None] for _, s in rows_mlp])
        n = cfg.intermediate_size
        kept = top(channels, rank if rank is not None else _ratio_rank(ratio, np.empty(n)), "channels")
        for path, _ in rows_mlp:
            picked[path] = ("rows", kept)
        if _MLP_COLS in by_name:
            picked[by_name[_MLP_COLS][0]] = ("cols", kept)

    kv = [by_name[n] for n in _KV_ROWS if n in by_name]
    if _HEAD_ROWS in by_name or kv or _HEAD_COLS in by_name:
        members = []
        if _HEAD_ROWS in by_name:
            q = by_name[_HEAD_ROWS][1]
            members.append(q.reshape(q.shape[0], cfg.num_heads, hd))
        for _, s in kv:  # each query head sees its key-value head's rows
            members.append(np.repeat(s.reshape(s.shape[0], cfg.num_kv_heads, hd), group, axis=1))
        if not members:
            raise ValueError("dependency groups: heads are scored by q/k/v rows; scores hold only o_proj")
        heads = reduce_over(members)
        count = max(1, round(rank / hd)) if rank is not None else _ratio_rank(ratio, np.empty(cfg.num_heads))
        kept = top(heads, count, "heads")
        head_rows = [(h[:, None] * hd + np.arange(hd)).ravel() for h in kept]
        for name in (_HEAD_ROWS, _HEAD_COLS):
            if name in by_name:
                picked[by_name[name][0]] = ("rows" if name == _HEAD_ROWS else "cols", head_rows)
        kv_rows = [(np.unique(h // group)[:, None] * hd + np.arange(hd)).ravel() for h in kept]
        for path, _ in kv:
            picked[path] = ("rows", kv_rows)
    return nest({path: _rows_entry(kept, key) for path, (key, kept) in picked.items()
                 if any(map(len, kept))})


def _flat_scores(scores) -> dict[Path, np.ndarray]:
    flat = {}
    for path, leaf in leaf_paths(scores):
        s = np.asarray(leaf)
        where = "/".join(path)
        if s.ndim != 2:
            raise ValueError(f"scores {where}: expected [layers, rows], got shape {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"scores {where}: holds NaN or infinite values")
        flat[path] = s.astype(np.float64)
    if not flat:
        raise ValueError("select: scores hold no module")
    return flat


def _ratio_rank(ratio: float, s: np.ndarray) -> int:
    return math.floor(ratio * s.shape[-1] + 0.5)  # round half up, unlike Python's round


def _top_rows(path: Path, s: np.ndarray, rank: int) -> list[np.ndarray]:
    """Per layer, the ascending indices of the `rank` best rows (ties: lower index)."""
    if rank > s.shape[-1]:
        raise ValueError(f"rank={rank} exceeds the {s.shape[-1]} rows of {'/'.join(path)}")
    best = np.argsort(-s, axis=-1, kind="stable")[:, :rank]
    return list(np.sort(best, axis=-1))


def _row_costs(flat, cfg, params_per_row) -> dict[Path, int] | None:
    """Parameters per row (d_in) of each module, or None when unknown."""
    if params_per_row is not None:
        if isinstance(params_per_row, (int, np.integer)):
            return {path: int(params_per_row) for path in flat}
        given = dict(leaf_paths(params_per_row))
        missing = [("/".join(p)) for p in flat if p not in given]
        if missing:
            raise ValueError(f"params_per_row has no entry for {', '.join(missing)}")
        return {path: int(given[path]) for path in flat}
    if cfg is not None:
        return {path: _d_in(cfg, path) for path in flat}
    return None


def _global_rows(flat, costs, *, rank, ratio, normalize) -> dict[Path, list[np.ndarray]]:
    """Rank every row of every module and layer together and fill the parameter budget."""
    paths = sorted(flat)
    normalized = [_normalized(flat[p], normalize) for p in paths]
    all_scores = np.concatenate([s.ravel() for s in normalized])
    all_costs = np.concatenate([np.full(flat[p].size, costs[p], np.int64) for p in paths])
    if rank is not None:
        budget = sum(rank * flat[p].shape[0] * costs[p] for p in paths)
    else:
        budget = ratio * sum(flat[p].size * costs[p] for p in paths)

    order = np.argsort(-all_scores, kind="stable")  # ties: earlier module, layer, row
    spent = np.concatenate([[0], np.cumsum(all_costs[order])])
    count = _closest_prefix(spent, budget)
    chosen = np.zeros(all_scores.size, bool)
    chosen[order[:count]] = True

    picked, start = {}, 0
    for p in paths:
        kept = chosen[start:start + flat[p].size].reshape(flat[p].shape)
        picked[p] = [np.flatnonzero(layer) for layer in kept]
        start += flat[p].size
    return picked


def _closest_prefix(spent: np.ndarray, budget: float) -> int:
    """How many rows to take: the prefix whose cumulative cost is closest to the budget."""
    under = int(np.searchsorted(spent, budget, side="right")) - 1  # last prefix within budget
    if under + 1 < len(spent) and spent[under + 1] - budget < budget - spent[under]:
        return under + 1
    return under


def _normalized(s: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return s
    mean = s.mean(axis=None if how == "module" else -1, keepdims=True)
    return s / np.where(mean > 0, mean, 1.0)  # all-zero scores stay zero


def _rows_entry(kept: list[np.ndarray], key: str = "rows") -> dict[str, np.ndarray]:
    """`{key: [L, r]}` ("rows" or "cols"), plus `"mask"` padded as in the module
    docstring when counts differ."""
    width = max(len(k) for k in kept)
    rows = np.zeros((len(kept), width), np.int32)
    mask = np.zeros((len(kept), width), bool)
    for layer, k in enumerate(kept):
        rows[layer, :len(k)] = k
        rows[layer, len(k):] = k[-1] if len(k) else 0
        mask[layer, :len(k)] = True
    return {key: rows} if mask.all() else {key: rows, "mask": mask}


# --------------------------------------------------------------------------- counting


def num_selected_params(selection: Selection, cfg: LlamaConfig) -> int:
    """Trainable weights of a selection: real (unmasked) rows times each module's d_in."""
    total = 0
    for path, entry in entries(selection):
        key = _index_key(entry)
        real = int(np.sum(entry["mask"])) if "mask" in entry else int(np.size(entry[key]))
        # A row costs the module's d_in, a column its d_out.
        total += real * (_d_in(cfg, path) if key == "rows" else cfg.linear_shapes()[path[-1]][0])
    return total


def _index_key(entry) -> str:
    return "cols" if "cols" in entry else "rows"


def _d_in(cfg: LlamaConfig, path: Path) -> int:
    shapes = cfg.linear_shapes()
    if path[-1] not in shapes:
        raise ValueError(f"{'/'.join(path)}: not a per-layer linear of the config "
                         f"({', '.join(shapes)})")
    return shapes[path[-1]][1]


# --------------------------------------------------------------------------- save / load


def digest(selection: Selection) -> str:
    """A short fingerprint of a selection's rows and masks (what a checkpoint was made for)."""
    import hashlib

    h = hashlib.sha256()
    for module, entry in sorted(entries(selection), key=lambda item: item[0]):
        h.update("/".join(module).encode())
        for kind in ("rows", "mask"):
            if kind in entry:
                value = np.ascontiguousarray(entry[kind], np.int32)
                h.update(kind.encode() + str(value.shape).encode() + value.tobytes())
    return h.hexdigest()[:16]


def save(
    path: str | os.PathLike,
    selection: Selection,
    *,
    model: str | None = None,
    targets: str | list | tuple | None = None,
    metric: str | None = None,
    metadata: Mapping[str, str] | None = None,
    cfg: LlamaConfig | None = None,
    overwrite: bool = False,
) -> None:
    """Write a selection to a safetensors file, atomically.

    cfg: check the selection against the model (modules, layers, rows in range) and record
        its architecture, which `load(path, cfg=...)` then compares.
    overwrite: replace an existing file that spsft-jax did not write.

    Tensors are named by module path: `layers/mlp/up_proj/rows` (int32) and
    `.../mask` (bool). `model`, `targets` (a list is stored as JSON), `metric` and
    any extra `metadata` strings go into the file's metadata.
    """
    from safetensors.numpy import save as to_bytes

    tensors = {}
    for module, entry in entries(selection):
        name, key = "/".join(module), _index_key(entry)
        tensors[f"{name}/{key}"] = np.ascontiguousarray(entry[key], np.int32)
        if "mask" in entry:
            tensors[f"{name}/mask"] = np.ascontiguousarray(entry["mask"], bool)
    info = {"format": FORMAT, "format_version": FORMAT_VERSION}
    if model is not None:
        info["model"] = str(model)
    if targets is not None:
        info["targets"] = targets if isinstance(targets, str) else json.dumps(
            [t if isinstance(t, str) else list(t) for t in targets])
    if metric is not None:
        info["metric"] = str(metric)
    for key, value in (metadata or {}).items():
        if key in info or key in ("model", "targets", "metric"):
            raise ValueError(f"metadata[{key!r}]: reserved; use the keyword argument")
        if not isinstance(value, str):
            raise TypeError(f"metadata[{key!r}]: must be a string, got {type(value).__name__}")
        info[key] = value
    if cfg is not None:

        for module, entry in entries(selection):
            _check_entry(f"selection {'/'.join(module)}", module, entry, cfg)
        info[CONFIG_KEY] = json.dumps(architecture(cfg))
    with outputs.output_file(path, "wb", overwrite=overwrite) as f:
        f.write(to_bytes(tensors, metadata=info))


def load(path: str | os.PathLike, *, cfg: LlamaConfig | None = None) -> tuple[Selection, dict[str, str]]:
    """Read a selection written by `save`: (selection, metadata strings).

    With `cfg`, also check that every module exists, has `cfg.num_layers` layers
    and that every row is in range.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            info = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: not an spsft-jax selection (metadata format is "
                         f"{info.get('format')!r}, expected {FORMAT!r})")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: selection format version {info.get('format_version')!r} "
                         f"is not supported (expected {FORMAT_VERSION!r})")

    if cfg is not None:

        diff = first_difference(json.loads(info.get(CONFIG_KEY, "{}")), architecture(cfg)) \
            if CONFIG_KEY in info else None
        if diff:
            raise ValueError(f"{path}: selection does not fit the model: {diff}")
    flat: dict[Path, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        *module, kind = name.split("/")
        if not module or kind not in ("rows", "cols", "mask"):
            raise ValueError(f"{path}: tensor {name!r}: names must be a module path ending "
                             f"in /rows, /cols or /mask")
        flat.setdefault(tuple(module), {})[kind] = value
    for module, entry in flat.items():
        _check_entry(f"{path}: tensor {'/'.join(module)}", module, entry, cfg)
        entry[_index_key(entry)] = entry[_index_key(entry)].astype(np.int32)
    return nest(flat), info


def _check_entry(where: str, module: Path, entry: Mapping[str, np.ndarray], cfg) -> None:
    if "rows" not in entry and "cols" not in entry:
        raise ValueError(f"{where}/mask: has no matching /rows tensor")
    if "rows" in entry and "cols" in entry:
        raise ValueError(f"{where}: holds both /rows and /cols")
    key = _index_key(entry)
    rows = entry[key]
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"{where}/{key}: expected integer [layers, r], got {rows.dtype} {rows.shape}")
    if rows.size and rows.min() < 0:
        raise ValueError(f"{where}/{key}: negative {key[:-1]} index {rows.min()}")
    if "mask" in entry and (entry["mask"].dtype != bool or entry["mask"].shape != rows.shape):
        raise ValueError(f"{where}/mask: expected bool {rows.shape}, got "
                         f"{entry['mask'].dtype} {entry['mask'].shape}")
    if cfg is None:
        return
    shapes = cfg.linear_shapes()
    if module[0] != "layers" or module[-1] not in shapes:
        raise ValueError(f"{where}/rows: {'/'.join(module)} is not a per-layer linear of the config")
    if rows.shape[0] != cfg.num_layers:
        raise ValueError(f"{where}/rows: {rows.shape[0]} layers, the config has {cfg.num_layers}")
    d_out = shapes[module[-1]][0 if key == "rows" else 1]
    if rows.size and rows.max() >= d_out:
        raise ValueError(f"{where}/{key}: {key[:-1]} {rows.max()} is out of range "
                         f"(the module has {d_out})")


# --------------------------------------------------------------------------- pytree helpers


def entries(selection) -> list[tuple[Path, Mapping[str, np.ndarray]]]:
    """(module path, {"rows" or "cols", "mask"?}) for every module of a selection."""
    return trees.entries(selection, lambda node: isinstance(node, Mapping) and (
        "rows" in node or "cols" in node), "selection")
