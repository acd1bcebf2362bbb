"""Small helpers for the nested-dict pytrees used throughout (params, deltas, scores,
selections), addressed by key paths such as ("layers", "mlp", "up_proj")."""
from __future__ import annotations

from typing import Any, Iterator, Mapping

Path = tuple[str, ...]


def leaf_paths(tree: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) for every non-dict value of a nested dict, in insertion order."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from leaf_paths(value, path + (key,))
    else:
        yield path, tree


def nest(flat: Mapping[Path, Any]) -> dict:
    """{("layers", "mlp", "up_proj"): x} -> {"layers": {"mlp": {"up_proj": x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def set_nested(tree: dict, path: Path, value) -> dict:
    """A copy of `tree` with `value` at `path` (levels created as needed)."""
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: set_nested(tree.get(path[0], {}), path[1:], value)}
