"""The one way to walk the nested-dict pytrees used throughout (params, deltas, scores,
selections): path-keyed views from `flax.traverse_util`, with tuple paths such as
("layers", "mlp", "up_proj").

    flat = flatten(params)          {("layers", "mlp", "up_proj", "weight"): [L, d_out, d_in], ...}
    nest(flat)                      the nested dict back
    entries(delta, is_delta)        [(("layers", "mlp", "up_proj"), RowDelta), ...]: stop at the
                                    nodes a predicate names (delta objects, selection entries)
    get(tree, "layers", "mlp")      the subtree, or None where a level is missing
    set_nested(tree, path, value)   a copy with `value` at `path`
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

from flax import traverse_util

Path = tuple[str, ...]


def flatten(tree: Mapping, *, stop: Callable[[Any], bool] | None = None) -> dict[Path, Any]:
    """{path: leaf} of a nested dict; a node for which `stop(node)` holds is a leaf too."""
    is_leaf = None if stop is None else (lambda path, node: stop(node))
    return traverse_util.flatten_dict(dict(tree), is_leaf=is_leaf)


def nest(flat: Mapping[Path, Any]) -> dict:
    """{("layers", "mlp", "up_proj"): x} -> {"layers": {"mlp": {"up_proj": x}}}."""
    return traverse_util.unflatten_dict(dict(flat))


def leaf_paths(tree: Any) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) for every non-dict value of a nested dict, in insertion order."""
    if not isinstance(tree, Mapping):
        yield (), tree
        return
    yield from flatten(tree).items()


def entries(tree: Any, is_entry: Callable[[Any], bool], what: str) -> list[tuple[Path, Any]]:
    """(path, node) for every node of a nested dict that `is_entry` names; anything else
    that is not a dict is a TypeError naming its path (`what` names the tree)."""
    if tree is None:
        return []
    if is_entry(tree):
        return [((), tree)]
    if not isinstance(tree, Mapping):
        raise TypeError(f"{what}: expected a dict, found {type(tree).__name__}")
    found = list(flatten(tree, stop=is_entry).items())
    for path, node in found:
        if not is_entry(node):
            raise TypeError(f"{what}{''.join(f'[{k!r}]' for k in path)}: expected a dict or an "
                            f"entry, found {type(node).__name__}")
    return found


def get(tree: Any, *keys: str) -> Any:
    """`tree[k1][k2]...`, or None where a level is missing (deltas cover few modules)."""
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def set_nested(tree: Mapping, path: Path, value) -> dict:
    """A copy of `tree` with `value` at `path` (levels created as needed)."""
    flat = {k: v for k, v in flatten(tree).items() if k[:len(path)] != tuple(path)}
    if isinstance(value, Mapping) and value:
        flat.update({tuple(path) + k: v for k, v in flatten(value).items()})
    else:
        flat[tuple(path)] = value
    return nest(flat)
