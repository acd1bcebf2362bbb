"""HF checkpoint folders <-> (LlamaConfig, parameter pytree).

    load_hf("path/to/hf-llama")  ->  (cfg, params)      params as in `spsft_jax.llama`
    save_hf("out", cfg, params)  ->  out/config.json, out/model*.safetensors[, index], tokenizer files
    (`merges.save_merged` writes the same, config.json recording the adapters merged in.)

Names map declaratively: our pytree keeps HF's module names, so an HF key is
the prefix of its top-level entry plus the leaf path, with `{i}` the layer index
of a stacked leaf. Weights are `[out, in]` on both sides: no transposes.
Tensors are read one at a time into preallocated stacked buffers, so host memory
never holds a second copy of the model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from spsft_jax import llama, quant
from spsft_jax.interop.config import (MERGED_ADAPTERS_KEY, config_path, config_to_hf, merged_adapters,
                                      read_config)
from spsft_jax.outputs import output_dir
from spsft_jax.trees import leaf_paths, nest

# Our top-level entry -> HF key prefix; "{i}" marks leaves stacked over layers.
HF_PREFIX = {
    "embed_tokens": "model.embed_tokens",
    "layers": "model.layers.{i}",
    "norm": "model.norm",
    "lm_head": "lm_head",
}
# Buffers older checkpoints saved that carry no weights of ours.
IGNORED_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_ST_FLOATS = {"F64": np.float32, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch colours parts of its messages


def _np_dtype(dtype) -> np.dtype:
    name = jnp.dtype(dtype).name
    if name not in _NP_DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {sorted(_NP_DTYPES)}")
    return np.dtype(_NP_DTYPES[name])


def hf_names(cfg: llama.LlamaConfig) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """HF tensor name -> (our leaf path, layer index or None), for every parameter."""
    names = {}
    for path, _ in leaf_paths(llama.param_shapes(cfg)):
        prefix = HF_PREFIX[path[0]]
        suffix = ".".join(path[1:])
        if "{i}" in prefix:
            for i in range(cfg.num_layers):
                names[f"{prefix.format(i=i)}.{suffix}"] = (path, i)
        else:
            names[f"{prefix}.{suffix}"] = (path, None)
    return names


# --------------------------------------------------------------------------- reading


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in the order to read them."""
    # Safetensors first in either layout (as transformers does): a folder holding both
    # formats is read from the safe one, even when the .bin is the sharded one.
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"),
                               (BIN_INDEX, "pytorch_model.bin")):
        index = folder / index_name
        if index.exists():
            return _index_files(index)
        if (folder / single).exists():
            return [folder / single]
    raise FileNotFoundError(
        f"{folder}: no weights found (looked for model.safetensors, {SAFETENSORS_INDEX}, "
        f"pytorch_model.bin, {BIN_INDEX})"
    )


def _index_files(index: Path) -> list[Path]:
    """The shard files an index's weight_map names, each once, in order."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a valid checkpoint index ({err!r})") from None
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{index}: lists shard {f.name}, which is missing")
    return files


def _read_safetensors(path: Path) -> Iterator[tuple[str, "_StoredTensor"]]:
    from safetensors import SafetensorError

    try:
        with safe_open(path, framework="numpy") as f:
            names = list(f.keys())
        for name in names:
            # A handle keeps every page it has read mapped, and counted in the process's
            # memory, until it closes: one per tensor keeps the load's peak near the weights.
            with safe_open(path, framework="numpy") as f:
                yield name, _StoredTensor(f.get_slice(name))
    except SafetensorError as err:  # a truncated or corrupt file
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


class _StoredTensor:
    """A tensor still in its safetensors file: its shape now, its rows when sliced
    (so it is copied where it belongs a block at a time, never read whole first)."""

    def __init__(self, part):
        self.part, self.shape = part, tuple(part.get_shape())

    def __getitem__(self, index) -> np.ndarray:
        return self.part[index]


# Bytes copied (and checked) at a time from a stored tensor into its slot.
COPY_BLOCK_BYTES = 16 << 20


def _copy_finite(dest: np.ndarray, tensor, target) -> bool:
    """`dest[...] = tensor` as `target` (an array or a `_StoredTensor`), a block of rows
    at a time; whether every value is finite."""
    if not tensor.shape:
        dest[...] = np.asarray(tensor[...]).astype(target, copy=False)
        return bool(np.isfinite(dest).all())
    rows = max(1, COPY_BLOCK_BYTES // max(1, dest[0].nbytes))
    finite = True
    n = tensor.shape[0]
    for start in range(0, n, rows):
        stop = min(start + rows, n)  # a stored tensor's slice must stay inside it
        block = dest[start:stop]
        block[...] = np.asarray(tensor[start:stop]).astype(target, copy=False)
        finite &= bool(np.isfinite(block).all())
    return finite


def _read_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    import pickle

    import torch  # only the .bin format needs torch

    # mmap needs the zip format; files from torch < 1.6 use the legacy one.
    mmap = zipfile.is_zipfile(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused to load: not a pickle of tensors only, as weights_only=True "
            f"requires ({_unpickling_reason(err)})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({_first_line(err)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach()  # a saved nn.Parameter still requires grad
        if tensor.dtype == torch.bfloat16:
            yield name, tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield name, tensor.numpy()


def _read_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    reader = _read_safetensors if path.suffix == ".safetensors" else _read_torch_bin
    return reader(path)


def _first_line(err: BaseException) -> str:
    """The first sentence of an error from torch (its messages run on for paragraphs)."""
    text = _ANSI.sub("", str(err)).strip()
    return _sentence(text) if text else type(err).__name__


def _unpickling_reason(err: BaseException) -> str:
    """The part of torch's weights_only refusal that names the offending object
    (its first line only says the file could be loaded unsafely)."""
    text = _ANSI.sub("", str(err))
    blocked = re.search(r"GLOBAL\s+([\w.]+)", text)
    if blocked:  # torch names the import it refused; say which
        return f"it imports {blocked.group(1)}, which is blocked"
    match = re.search(r"WeightsUnpickler error:\s*(.*)", text, re.DOTALL)
    return _sentence(match.group(1)) if match else _first_line(err)


def _sentence(text: str, limit: int = 200) -> str:
    first = re.split(r"\.\s|\n", text.strip(), maxsplit=1)[0].strip()
    return first if len(first) <= limit else first[:limit] + "..."


def _checkpoint_dtype(files: list[Path]) -> np.dtype:
    """The dtype of the first floating-point tensor (the checkpoint's storage dtype),
    float32 where that is not one we keep (float64) or there is none."""
    first = files[0]
    if first.suffix == ".safetensors":
        from safetensors import SafetensorError

        try:
            with safe_open(first, framework="numpy") as f:
                for name in f.keys():
                    dtype = f.get_slice(name).get_dtype()
                    if dtype in _ST_FLOATS:
                        return np.dtype(_ST_FLOATS[dtype])
        except SafetensorError as err:
            raise ValueError(f"{first}: not a readable safetensors file ({err})") from None
        return np.dtype(np.float32)
    for _, tensor in _read_tensors(first):
        if tensor.dtype.name in _NP_DTYPES or tensor.dtype == np.float64:
            return np.dtype(_NP_DTYPES.get(tensor.dtype.name, np.float32))
    return np.dtype(np.float32)


def load_hf(path: str | os.PathLike, dtype=None, *, allow_nonfinite: bool = False,
            mesh=None, quantize: str | None = None) -> tuple[llama.LlamaConfig, llama.Params]:
    """Load an HF Llama checkpoint folder as `(cfg, params)`.

    dtype: the parameters' dtype (float32, bfloat16, float16); None keeps the checkpoint's.
    Reads `model.safetensors`, a sharded safetensors index, or `pytorch_model.bin`
    (with `weights_only=True`: pickles holding anything but tensors are refused).
    A tensor holding NaN or Inf is refused, naming it, unless `allow_nonfinite=True`.
    mesh: a `jax.sharding.Mesh` or spec ("data=2,fsdp=4", see `spsft_jax.sharding`):
    every parameter is built already split by the sharding rules, each device's part read
    straight from the safetensors file(s), so host memory holds one device's slice of one
    tensor at a time, never the model (safetensors only); with `quantize=`, the quantized
    model is built on the host, then split (quantized bytes by rows).
    quantize: "int8", "nf4" (or another `spsft_jax.quant` kind): every per-layer linear
    weight is quantized as it is read (`quant.QuantizedWeight`, dequantized layer by layer
    in the forward pass); embeddings, norms and the LM head stay float, as users expect.
    """
    folder = Path(path)
    cfg = read_config(folder / "config.json")
    files = _weight_files(folder)
    target = _np_dtype(dtype) if dtype is not None else _checkpoint_dtype(files)
    if mesh is not None and quantize is None:
        return cfg, load_sharded(cfg, files, target, mesh, origin=folder,
                                 allow_nonfinite=allow_nonfinite)
    named = ((file, name, tensor) for file in files for name, tensor in _read_tensors(file))
    params = assemble(cfg, named, target, origin=folder, allow_nonfinite=allow_nonfinite,
                      quantize=quantize)
    if mesh is not None:  # quantized on the host (a quarter of the float model), then split by rows
        from spsft_jax import sharding

        params = sharding.shard(params, sharding.make_mesh(mesh))
    return cfg, params


def assemble(cfg: llama.LlamaConfig, named, target, *, origin, allow_nonfinite: bool = False,
             quantize: str | None = None) -> llama.Params:
    """The parameter pytree from `(file, HF name, array)` triples, each copied (as `target`)
    into its slot of a preallocated stacked buffer; every tensor must be there once and
    finite (unless `allow_nonfinite`).

    A tensor may come quantized (`quant.QuantizedWeight` with host bytes, from a GGUF), and
    with `quantize=` every per-layer linear weight is quantized as it arrives: either way
    its layers' rows are stacked as bytes, and the float model is never held whole.
    """
    expected = hf_names(cfg)
    shapes = {p: leaf.shape for p, leaf in leaf_paths(llama.param_shapes(cfg))}
    buffers = {p: _aligned_empty(shape, target) for p, shape in shapes.items()}
    stacks: dict = {}  # leaf path -> QuantizedWeight of host bytes, all layers
    seen: set[str] = set()
    for file, name, tensor in named:
        slot = _slot(cfg, expected, shapes, file, name, tensor.shape)
        if slot is None:
            continue
        leaf_path, layer = slot
        if quantize is not None and layer is not None and leaf_path[-2] in LINEARS and \
                not quant.is_quantized(tensor):
            tensor = quant.quantize(np.asarray(tensor[...]).astype(np.float32), quantize, dtype=target)
        if quant.is_quantized(tensor):
            finite = _stack_rows(stacks, buffers, shapes, file, name, leaf_path, layer, tensor, target)
        else:
            dest = buffers[leaf_path] if layer is None else buffers[leaf_path][layer]
            finite = _copy_finite(dest, tensor, target)
        if not finite and not allow_nonfinite:
            raise ValueError(f"{file}: tensor {name!r} holds NaN or Inf values "
                             f"(allow_nonfinite=True / --allow-nonfinite loads it anyway)")
        seen.add(name)
    _check_complete(expected, seen, origin)
    leaves = {p: _to_device(buffers, p) for p in list(buffers)}
    leaves |= {p: jax.tree.map(jax.device_put, q) for p, q in stacks.items()}
    return nest(leaves)


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _stack_rows(stacks: dict, buffers: dict, shapes: dict, file, name: str, leaf_path, layer,
                tensor, target) -> bool:
    """Copy one layer's quantized rows into its leaf's byte stack (made at the first
    layer; a later layer of another kind makes it a mixed stack, `quant.put_layer`);
    whether they decode to finite values."""
    if layer is None:  # an embedding or head kept as stored
        buffers.pop(leaf_path, None)
        stacks[leaf_path] = dataclasses.replace(tensor, data=np.asarray(tensor.data), dtype=np.dtype(target).name)
        return bool(np.isfinite(np.asarray(quant.dequantize(tensor))).all())
    stack = stacks.get(leaf_path)
    if stack is None:
        buffers.pop(leaf_path)  # this leaf is held as bytes, never as floats
        data = _aligned_empty((shapes[leaf_path][0],) + tuple(tensor.data.shape), np.uint8)
        stack = dataclasses.replace(tensor, data=data, dtype=np.dtype(target).name)
    stacks[leaf_path] = quant.put_layer(stack, layer, tensor)
    return bool(np.isfinite(np.asarray(quant.dequantize(tensor))).all())


def _slot(cfg: llama.LlamaConfig, expected: dict, shapes: dict, file, name: str, shape):
    """(leaf path, layer or None) where HF tensor `name` of `shape` belongs; None for a
    tensor we leave out (rotary caches, a tied head). Unknown names and shapes are refused."""
    if name not in expected:
        if IGNORED_TENSORS.fullmatch(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            return None
        raise ValueError(f"{file}: unexpected tensor {name!r} for this config")
    leaf_path, layer = expected[name]
    want = shapes[leaf_path][1:] if layer is not None else shapes[leaf_path]
    if tuple(shape) != tuple(want):
        raise ValueError(f"{file}: tensor {name!r} has shape {tuple(shape)}, "
                         f"its config implies {tuple(want)}")
    return leaf_path, layer


def _check_complete(expected: dict, seen, origin) -> None:
    missing = sorted(set(expected) - set(seen), key=_natural_key)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{origin}: missing tensor(s) {shown}")


# On the CPU, `jax.device_put` adopts a host array aligned to this many bytes instead
# of copying it, so a loaded model is held once, never twice.
HOST_ALIGNMENT = 64


def _aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)


def _to_device(buffers: dict, path) -> jax.Array:
    # Hand each buffer to JAX (adopted on the CPU, copied to an accelerator) and drop
    # our reference before the next one.
    return jax.device_put(buffers.pop(path))


def _locate(cfg: llama.LlamaConfig, files: list[Path], *, origin) -> dict[str, Path]:
    """HF name -> the safetensors file holding it, every expected tensor checked for
    presence and shape from the file headers (no tensor data read)."""
    from safetensors import SafetensorError

    expected = hf_names(cfg)
    shapes = {p: leaf.shape for p, leaf in leaf_paths(llama.param_shapes(cfg))}
    located = {}
    for file in files:
        if file.suffix != ".safetensors":
            raise ValueError(f"{file}: a sharded load (mesh=) reads safetensors only; "
                             f"load it without a mesh, or save_hf it once as safetensors")
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    if _slot(cfg, expected, shapes, file, name, f.get_slice(name).get_shape()):
                        located[name] = file
        except SafetensorError as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from None
    _check_complete(expected, located, origin)
    return located


def load_sharded(cfg: llama.LlamaConfig, files: list[Path], target, mesh, *, origin,
                 allow_nonfinite: bool = False) -> llama.Params:
    """The parameter pytree laid out on `mesh` by `spsft_jax.sharding`, each device's slice
    read on its own (`get_slice`) from the file holding the tensor.

    Built per device with `jax.make_array_from_single_device_arrays` rather than
    `make_array_from_callback`, which gathers every device's slice on the host before
    transferring any: here each slice goes to its device before the next is read.
    """
    import contextlib

    from spsft_jax import sharding

    mesh = sharding.make_mesh(mesh)
    located = _locate(cfg, files, origin=origin)
    names = {where: name for name, where in hf_names(cfg).items()}  # (path, layer) -> HF name
    shapes = llama.param_shapes(cfg, target)
    layouts = dict(leaf_paths(sharding.tree_shardings(shapes, mesh)))
    with contextlib.ExitStack() as stack:
        opened = {}

        def tensor(name):
            file = located[name]
            if file not in opened:
                opened[file] = stack.enter_context(safe_open(file, framework="numpy"))
            return opened[file].get_slice(name)

        def read(path, index):
            """One device's block of leaf `path` (`index`: slices of the full leaf)."""
            stacked = (path, None) not in names
            if not stacked:
                return checked(names[(path, None)], index)
            layers = range(cfg.num_layers)[index[0]]  # stacked: one tensor per layer
            block = None
            for k, i in enumerate(layers):
                part = checked(names[(path, i)], index[1:])
                if block is None:
                    block = np.empty((len(layers),) + part.shape, target)
                block[k] = part
            return block

        def checked(name, index):
            part = np.asarray(tensor(name)[index]).astype(target, copy=False)
            if not allow_nonfinite and not np.isfinite(part).all():
                raise ValueError(f"{located[name]}: tensor {name!r} holds NaN or Inf values "
                                 f"(allow_nonfinite=True / --allow-nonfinite loads it anyway)")
            return part

        leaves = {}
        for path, shape in leaf_paths(shapes):
            layout = layouts[path]
            pieces = [jax.device_put(read(path, index), device).block_until_ready()
                      for device, index in layout.addressable_devices_indices_map(shape.shape).items()]
            leaves[path] = jax.make_array_from_single_device_arrays(shape.shape, layout, pieces)
    return nest(leaves)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size such as '5GB'")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(number * base**power)


def _shard_plan(names, leaves, itemsize, limit: int) -> list[list[str]]:
    """HF names grouped into shards of at most `limit` bytes (a larger tensor gets its own).

    names: `hf_names(cfg)`; leaves: our leaf path -> array.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(names, key=_natural_key):
        path, layer = names[name]
        if path not in leaves:
            raise ValueError(f"params: missing leaf {'/'.join(path)} (HF tensor {name!r})")
        shape = leaves[path].shape[1:] if layer is not None else leaves[path].shape
        nbytes = int(np.prod(shape)) * (itemsize or leaves[path].dtype.itemsize)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _host_tensors(shard: list[str], where, leaves, dtype) -> dict[str, np.ndarray]:
    """One shard's tensors gathered to the host (layer slices of the stacked leaves)."""
    out = {}
    for name in shard:
        path, layer = where[name]
        array = leaves[path] if layer is None else leaves[path][layer]
        if isinstance(array, jax.Array) and not array.is_fully_addressable:  # several hosts
            from jax.experimental import multihost_utils

            array = multihost_utils.process_allgather(array, tiled=True)
        array = np.asarray(array)  # a sharded layer gathers here, one tensor at a time
        out[name] = array if dtype is None else array.astype(dtype)
    return out


# Weight files a loader might read instead of (or beside) the ones we write.
WEIGHT_FILES = r"(model.*\.safetensors|pytorch_model.*\.bin)(\.index\.json)?"


def _check_param_shapes(cfg: llama.LlamaConfig, params: llama.Params) -> None:
    """Every leaf has the shape `cfg` implies (merged weights of another model are refused)."""
    leaves = dict(leaf_paths(params))
    for path, want in leaf_paths(llama.param_shapes(cfg)):
        if path in leaves and tuple(leaves[path].shape) != tuple(want.shape):
            raise ValueError(f"params: {'/'.join(path)} has shape {tuple(leaves[path].shape)}, "
                             f"the config implies {tuple(want.shape)}")


DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _merged_record(cfg: llama.LlamaConfig, given: Sequence[str] | None) -> list[str]:
    """The digests a saved config.json records: `given`, or (None) those of the folder
    `cfg` was loaded from, whose weights the parameters still hold."""
    if given is None:
        source = config_path(cfg.source_dir) if cfg.source_dir else None
        given = merged_adapters(source) if source and os.path.isfile(source) else ()
    if isinstance(given, str):  # one digest would otherwise be read as its characters
        given = (given,)
    for digest in given:
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise ValueError(f"merged_adapters: {digest!r} is not an adapter digest "
                             f"(checkpoint.adapter_digest gives one)")
    return list(dict.fromkeys(given))


def save_hf(
    path: str | os.PathLike,
    cfg: llama.LlamaConfig,
    params: llama.Params,
    *,
    max_shard_size: int | str = "5GB",
    dtype=None,
    tokenizer_from: str | os.PathLike | None = None,
    merged_adapters: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an HF checkpoint folder that `transformers.AutoModelForCausalLM` loads.

    dtype: storage dtype; None keeps the parameters'. Tokenizer files are copied from
    `tokenizer_from`, by default the folder the config was loaded from.
    merged_adapters: digests (`checkpoint.adapter_digest`) of the adapters merged into
    `params`, recorded in config.json under `MERGED_ADAPTERS_KEY` (see `save_merged`);
    None records those the folder the config was loaded from records, if any.
    The folder is written beside `path` and renamed into place when complete;
    shards are gathered to the host one at a time. An existing folder that spsft-jax did
    not write is refused unless `overwrite=True`, and even then only our files are
    replaced (weight files of another layout left there are refused). Every parameter
    must have the shape `cfg` gives it.
    """
    _check_param_shapes(cfg, params)
    params = quant.dequantize_tree(params)  # an HF folder holds float weights
    target = _np_dtype(dtype) if dtype is not None else None
    first = jax.tree_util.tree_leaves(params)[0]
    storage = target or _np_dtype(first.dtype)
    dtype_name = {np.dtype(v): k for k, v in _NP_DTYPES.items()}[np.dtype(storage)]
    hf_config = config_to_hf(cfg, dtype_name)
    record = _merged_record(cfg, merged_adapters)
    if record:  # left out when empty, so a plain round trip writes the same config.json
        hf_config[MERGED_ADAPTERS_KEY] = record
    where, leaves = hf_names(cfg), dict(leaf_paths(params))
    shards = _shard_plan(where, leaves, target.itemsize if target else None,
                         parse_size(max_shard_size))
    if tokenizer_from is not None and not Path(tokenizer_from).is_dir():
        # Asked for explicitly, so a typo must not silently export no tokenizer.
        raise FileNotFoundError(f"tokenizer_from={str(tokenizer_from)!r}: not a folder")
    source = Path(tokenizer_from) if tokenizer_from else (
        Path(cfg.source_dir) if cfg.source_dir else None
    )
    with output_dir(path, kind="hf", overwrite=overwrite, conflicts=WEIGHT_FILES) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if len(shards) == 1:
            save_file(_host_tensors(shards[0], where, leaves, target), tmp / "model.safetensors",
                      metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, names in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                tensors = _host_tensors(names, where, leaves, target)
                save_file(tensors, tmp / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(names, file))
                total += sum(t.nbytes for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        # Read before the old folder is replaced, so saving over the source keeps them.
        if source is not None:
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
    return Path(path)
