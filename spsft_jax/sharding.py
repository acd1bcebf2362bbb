"""Mesh axes and partition rules: how params, deltas, optimizer state and batches lie on devices.

JAX's SPMD partitioner does the distributed work: we only say where each array
lives (`NamedSharding`), jit the step with those shardings, and XLA inserts the
all-gathers and reduce-scatters. Two mesh axes:

    data   pure data parallelism: the batch is split, everything else replicated
    fsdp   the batch is split too, and every large float matrix is split along one
           of its large dimensions (FSDP / ZeRO-3: gathered layer by layer when used)

    mesh = make_mesh("data=2,fsdp=4")          # or {"data": 2, "fsdp": 4}, or None: all on fsdp
    frozen    {"params": {"layers": {"mlp": {"up_proj": {"weight": [L, out, in]  -> P(None, "fsdp", None)}}},
                          quantized weight bytes [L, out, row_bytes] -> P(None, "fsdp", None) (by rows),
                          "embed_tokens": {"weight": [V, d] -> P("fsdp", None)}, norms -> P()},
               "delta": rows / masks (int, bool)  -> P()}
    trainable {"delta": W_f [L, r, d_in] -> P(None, None, "fsdp"), LoRA A/B alike}
    opt_state mirrors trainable leaf by leaf (Adam's mu and nu), step counts P()
    batch     [grad_accum, batch, seq] -> P(None, ("data", "fsdp"))

A leaf is split along its largest dimension that the fsdp size divides (never the
stacked layer axis, which `lax.scan` walks); vectors, integer metadata and leaves
with no such dimension are replicated. The same rules hold for arrays and for
`jax.ShapeDtypeStruct`s, so memory plans compile exactly what training runs.
There is no tensor-parallel axis: fsdp already splits every large array, and the
measured plans (benchmarks/README.md) fit Llama-3.1-70B on 8 devices without one.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # both split the batch: fsdp is data parallel with split weights
LAYERS = "layers"  # leaves under this key carry the stacked layer axis first


# --------------------------------------------------------------------------- meshes


def parse_mesh(spec: str | Mapping[str, int] | None, num_devices: int | None = None) -> dict[str, int]:
    """{"data": n, "fsdp": m} from "data=2,fsdp=4", a dict, or None (every device on fsdp).

    An axis left out has size 1; one axis may be -1 (the devices the others leave).
    """
    if spec is None:
        return {"data": 1, "fsdp": jax.device_count() if num_devices is None else num_devices}
    if isinstance(spec, str):
        sizes = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, eq, value = part.partition("=")
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise ValueError(f"mesh {spec!r}: {part!r} is not AXIS=SIZE (e.g. data=2,fsdp=4)") from None
            if not eq:
                raise ValueError(f"mesh {spec!r}: {part!r} is not AXIS=SIZE (e.g. data=2,fsdp=4)")
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"mesh {spec!r}: unknown axis {unknown[0]!r}; axes are {', '.join(AXES)}")
    sizes = {a: int(sizes.get(a, 1)) for a in AXES}
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1 or any(n < 1 and n != -1 for n in sizes.values()):
        raise ValueError(f"mesh {spec!r}: sizes must be positive (one may be -1)")
    if free:
        rest = math.prod(n for n in sizes.values() if n != -1)
        num_devices = jax.device_count() if num_devices is None else num_devices
        if num_devices % rest:
            raise ValueError(f"mesh {spec!r}: {num_devices} devices do not split by {rest}")
        sizes[free[0]] = num_devices // rest
    return sizes


def mesh_devices(spec) -> int:
    """Devices a mesh spec needs (without looking at the devices there are, unless -1 or None)."""
    if isinstance(spec, Mesh):
        return spec.size
    return math.prod(parse_mesh(spec).values())


def make_mesh(spec: str | Mapping[str, int] | Mesh | None = None, devices=None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp") over `devices` (default: all of them, every host's)."""
    if isinstance(spec, Mesh):
        return spec
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh(spec, len(devices))
    needed = math.prod(sizes.values())
    if needed != len(devices):
        if needed > len(devices):
            raise ValueError(f"mesh {_show(sizes)}: needs {needed} devices, {len(devices)} present")
        devices = devices[:needed]
    shape = tuple(sizes[a] for a in AXES)
    # jax.make_mesh orders devices so each axis runs on fast links; Auto axes leave the
    # layout of intermediates to XLA's sharding propagation.
    return jax.make_mesh(shape, AXES, (jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def _show(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in sizes.items())


def fsdp_size(mesh: Mesh) -> int:
    return dict(mesh.shape).get("fsdp", 1)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"mesh axes {mesh.axis_names}: name one of them 'data' or 'fsdp'")
    return axes


# --------------------------------------------------------------------------- rules


def leaf_spec(path: tuple, shape: tuple[int, ...], dtype, fsdp: int) -> PartitionSpec:
    """Where one leaf lies: split along its largest dimension that `fsdp` divides, or replicated.

    path: the leaf's key path (a "layers" key means axis 0 is the stacked layer axis).
    Integer and boolean leaves (selected rows, masks), PRNG keys, vectors and scalars
    stay replicated: they are small, and every device needs all of them.
    """
    stacked = any(getattr(k, "key", getattr(k, "name", None)) == LAYERS for k in path)
    first = 1 if stacked else 0
    if fsdp > 1 and _quantized_rows(path, dtype) and len(shape) - first >= 2 and shape[-2] % fsdp == 0:
        # A quantized weight's bytes [..., out, row_bytes] split by rows: blocks never cross them.
        return PartitionSpec(*[("fsdp" if d == len(shape) - 2 else None) for d in range(len(shape))])
    if fsdp == 1 or not jnp.issubdtype(dtype, jnp.floating) or len(shape) - first < 2:
        return PartitionSpec()
    dims = [d for d in range(first, len(shape)) if shape[d] % fsdp == 0]
    if not dims:
        return PartitionSpec()
    split = max(dims, key=lambda d: (shape[d], -d))  # the largest; ties: the earlier (rows)
    return PartitionSpec(*[("fsdp" if d == split else None) for d in range(len(shape))])


def _quantized_rows(path: tuple, dtype) -> bool:
    """Whether a leaf is the bytes of a `quant.QuantizedWeight` (its `data` field)."""
    return jnp.dtype(dtype) == jnp.uint8 and bool(path) and getattr(path[-1], "name", None) == "data"


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A `NamedSharding` per leaf of a pytree of arrays or `jax.ShapeDtypeStruct`s
    (params, frozen, trainable, optimizer state)."""
    n = fsdp_size(mesh)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, leaf_spec(path, x.shape, x.dtype, n)), tree)


def batch_sharding(mesh: Mesh, ndim: int = 3, axis: int = 1) -> NamedSharding:
    """Arrays whose `axis` is the batch: split over ("data", "fsdp"), the rest whole."""
    spec = [None] * ndim
    spec[axis] = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch(size: int, mesh: Mesh) -> None:
    ways = math.prod(dict(mesh.shape)[a] for a in batch_axes(mesh))
    if size % ways:
        raise ValueError(f"batch of {size} examples: does not split over the mesh's "
                         f"{'*'.join(batch_axes(mesh))} = {ways} devices; use a multiple of {ways}")


# --------------------------------------------------------------------------- placing


def shard(tree: Any, mesh: Mesh) -> Any:
    """`tree` moved onto the mesh by the rules (arrays split or replicated per leaf)."""
    return jax.device_put(tree, tree_shardings(tree, mesh))


def place_batch(batch: Mapping[str, Any], mesh: Mesh, axis: int = 1) -> dict:
    """Host batch arrays split over the batch axes (`axis`: 1 for stacked [accum, batch, seq])."""
    def put(x):
        x = np.asarray(x)
        check_batch(x.shape[axis], mesh)
        sharding = batch_sharding(mesh, x.ndim, axis)
        # Each process hands over the whole host batch and keeps its own devices' part.
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return {k: put(v) for k, v in batch.items()}


def abstract(tree: Any, mesh: Mesh) -> Any:
    """`jax.ShapeDtypeStruct`s carrying the rules' shardings (for compiling without data)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, tree_shardings(tree, mesh))


def abstract_batch(batch: Mapping[str, Any], mesh: Mesh, axis: int = 1) -> dict:
    for x in batch.values():
        check_batch(x.shape[axis], mesh)
    return {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh, len(x.shape), axis))
            for k, x in batch.items()}


def sharded_step(step, mesh: Mesh, trainable: Any, opt_state: Any):
    """The training step jitted so that its new trainable and optimizer state keep the
    rules' shardings (so step after step sees the same layout); metrics replicated."""
    out = (tree_shardings(trainable, mesh), tree_shardings(opt_state, mesh), replicated(mesh))
    return jax.jit(step, out_shardings=out, donate_argnums=(0, 1))


def per_device_bytes(tree: Any, sizes: Mapping[str, int]) -> int:
    """Bytes one device holds of a pytree laid out by the rules on a mesh of these axis
    sizes ({"data": 1, "fsdp": 8}); no devices needed, so plans can ask for any mesh."""
    fsdp = sizes.get("fsdp", 1)

    def share(path, x):
        spec = leaf_spec(path, x.shape, x.dtype, fsdp)
        shape = [d // (fsdp if axis == "fsdp" else 1) for d, axis in
                 zip(x.shape, tuple(spec) + (None,) * (len(x.shape) - len(spec)))]
        return math.prod(shape) * jnp.dtype(x.dtype).itemsize

    return sum(jax.tree.leaves(jax.tree_util.tree_map_with_path(share, tree)))
