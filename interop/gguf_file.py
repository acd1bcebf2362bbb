"""GGUF (llama.cpp) checkpoints of Llama, Qwen2, Qwen3 and Gemma 3 (text) in: the same
model transformers' GGUF loader gives.

    load_gguf("model.gguf")               ->  (cfg, params)   params as in `spsft_jax.llama`, float32
    convert_gguf("model.gguf", "out")     ->  out/ an HF folder: config.json, model.safetensors,
                                              tokenizer.json, tokenizer_config.json (chat template),
                                              generation_config.json
    load_gguf("model.gguf", dequantize=False)  ->  linears kept in the file's blocks (quant.QuantizedWeight)
    save_gguf("out.gguf", cfg, params, like="model.gguf")  ->  the same file with params' tensors:
                                              metadata, tokenizer, tensor order and types of `like`;
                                              every row a merge did not touch keeps its bytes

The config is read from the metadata as transformers' GGUF loader reads it (checked
against `from_pretrained(folder, gguf_file=name)` in the tests) and goes through our
own reader, which refuses what we do not implement; the tokenizer is transformers'
(`gguf_file=`). Two additions, where transformers would compute other logits than
llama.cpp and the original model: Llama 3.1/3.2 RoPE scaling, which llama.cpp stores as
a tensor that transformers passes over, and Gemma 3 27B's attention scale (llama.cpp's
rule; transformers keeps its default). Tensors are dequantized one at a time into the
stacked buffers (`hf.assemble`), named through gguf's own tensor-name map of the file's
architecture. llama.cpp reorders the q/k rows of `llama` files only, and stores Gemma's
norm weights as 1 + w: both are undone on read and redone on write, as transformers
reads them. Needs the `gguf` package, and transformers with torch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from spsft_jax import llama, outputs, quant
from spsft_jax.interop.config import config_from_hf, config_to_hf
from spsft_jax.interop.hf import LINEARS, _np_dtype, assemble, hf_names, save_hf

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
# llama.cpp's converter reorders the q/k rows of these architectures only (`permute`).
PERMUTED_QK = ("llama",)
# Gemma's RMSNorm scales by (1 + w); llama.cpp stores the 1 + w, transformers subtracts it.
NORM_PLUS_ONE = ("gemma3",)
# The HF model_type of an architecture where the names differ (a gemma3 GGUF holds the text model).
MODEL_TYPES = {"gemma3": "gemma3_text"}
# llama.cpp keeps Llama 3.1+ RoPE scaling only as per-frequency divisors in this tensor
# (transformers' GGUF loader ignores it); we recognise the settings Meta released.
ROPE_FACTORS = "rope_freqs.weight"
KNOWN_LLAMA3_ROPE = tuple(llama.RopeScaling("llama3", factor, 1.0, 4.0, 8192)
                          for factor in (8.0, 32.0))  # Llama 3.1, Llama 3.2


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF needs the gguf package: pip install 'spsft-jax[gguf]'") from None
    return gguf


def _architecture(path: Path, reader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path}: not a model GGUF (no general.architecture)")
    arch = bytes(field.parts[field.data[0]]).decode()
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return arch


def _open(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as err:  # a truncated file fails as it indexes
        raise ValueError(f"{path}: not a readable GGUF file ({err})") from None
    _architecture(path, reader)
    return path, reader


def package_gguf(package: str) -> Path:
    """The GGUF file an installed Python package ships, or a set of packages ships in parts
    (`packaged.packaged_gguf`)."""
    from spsft_jax.interop.packaged import packaged_gguf

    return packaged_gguf(package)


def hf_config(path: str | os.PathLike) -> dict:
    """The config dict transformers builds from a GGUF's metadata (imports torch;
    `metadata_config` reads the same without)."""
    from transformers import AutoConfig

    path = Path(path)
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows (each head's rotary halves interleaved
    back into HF's first-half/second-half layout)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _name_map(arch: str, num_layers: int):
    """gguf's HF -> GGUF tensor-name map of architecture `arch` (e.g. "qwen2")."""
    gguf = _gguf()
    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    return gguf.get_tensor_name_map(model_arch, num_layers)


def _gguf_names(arch: str, cfg: llama.LlamaConfig, hf: dict) -> dict[str, str]:
    """GGUF tensor name -> HF name, for the HF names in `hf`."""
    name_map = _name_map(arch, cfg.num_layers)
    out = {}
    for name in hf:
        module, kind = name.rsplit(".", 1)
        gguf_module = name_map.get_name(module)
        if gguf_module is not None:  # a tensor llama.cpp has no name for is reported missing
            out[f"{gguf_module}.{kind}"] = name
    return out


def _norm_offset(arch: str, hf_name: str) -> int:
    """What llama.cpp adds to tensor `hf_name` of an `arch` file (1 for Gemma's norms)."""
    return 1 if arch in NORM_PLUS_ONE and hf_name.endswith("norm.weight") else 0


def _rope_scaling(path: Path, reader, cfg: llama.LlamaConfig) -> llama.LlamaConfig:
    """`cfg` with the llama3 RoPE scaling whose divisors the GGUF stores, if it stores any."""
    tensor = next((t for t in reader.tensors if t.name == ROPE_FACTORS), None)
    if tensor is None:
        return cfg
    divisors = np.asarray(tensor.data, np.float32)
    plain = llama.rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    for scaling in KNOWN_LLAMA3_ROPE:
        scaled = llama.rope_inv_freq(dataclasses.replace(cfg, rope_scaling=scaling))
        if divisors.shape == plain.shape and np.allclose(plain / scaled, divisors, rtol=1e-4):
            return dataclasses.replace(cfg, rope_scaling=scaling)
    raise ValueError(f"{path}: tensor {ROPE_FACTORS} holds RoPE frequency factors of no known "
                     "Llama 3 setting (factor 8 or 32, low/high 1/4, original context 8192)")


def _tensors(path: Path, reader, cfg: llama.LlamaConfig, *,
             keep_blocks=lambda name: False) -> Iterator[tuple[Path, str, np.ndarray]]:
    """(file, HF name, float32 array) for every tensor of the GGUF; those whose HF name
    `keep_blocks` accepts, if of a kind `spsft_jax.quant` reads, come as their own blocks
    (`quant.QuantizedWeight` of the file's bytes, q/k rows put back in HF order)."""
    gguf = _gguf()
    arch = _architecture(path, reader)
    hf_of = _gguf_names(arch, cfg, hf_names(cfg) | {"lm_head.weight": None})
    # llama.cpp permutes q/k biases with their weights
    heads = ({"self_attn.q_proj": cfg.num_heads, "self_attn.k_proj": cfg.num_kv_heads}
             if arch in PERMUTED_QK else {})
    for tensor in reader.tensors:
        if tensor.name == ROPE_FACTORS:
            continue  # read into the config by `_rope_scaling`
        name = hf_of.get(tensor.name, tensor.name)
        kind = quant.KIND_OF_GGML.get(int(tensor.tensor_type))
        if kind is not None and keep_blocks(name):
            weight = quant.QuantizedWeight.from_bytes(np.asarray(tensor.data), kind)
        else:
            weight = gguf.dequantize(tensor.data, tensor.tensor_type)
            if _norm_offset(arch, name):
                weight = weight - 1  # in the stored dtype, as transformers does
        permuted = next((h for module, h in heads.items() if name.rsplit(".", 1)[0].endswith(module)), None)
        if permuted is not None and quant.is_quantized(weight):
            weight = dataclasses.replace(weight, data=unpermute(weight.data, permuted))  # rows only
        elif permuted is not None:
            weight = unpermute(weight, permuted)
        yield path, name, weight


def _is_layer_linear(name: str) -> bool:
    """A per-layer linear's weight (its bias stays float)."""
    module, kind = name.rsplit(".", 1)
    return name.startswith("model.layers.") and kind == "weight" and module.rsplit(".", 1)[-1] in LINEARS


# `{arch}.<key>` metadata -> the HF config key it is, per architecture (transformers' GGUF
# loader maps the same); every other `{arch}.` key is refused, so nothing we do not
# implement passes. The head size keys all name head_dim, so they must agree.
_COMMON_KEYS = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta",
    "rope.dimension_count": "head_dim", "attention.key_length": "head_dim",
    "attention.value_length": "head_dim", "vocab_size": "vocab_size",
}
METADATA_KEYS = {
    "llama": _COMMON_KEYS, "qwen2": _COMMON_KEYS, "qwen3": _COMMON_KEYS,
    "gemma3": _COMMON_KEYS | {"attention.sliding_window": "sliding_window"},
}
# `{arch}.<key>` metadata no model is built without.
_REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
REQUIRED_METADATA = {
    "llama": _REQUIRED, "qwen2": _REQUIRED, "qwen3": _REQUIRED,
    # without it llama.cpp runs Gemma 3 with no window, transformers with its default one
    "gemma3": _REQUIRED + ("attention.sliding_window",),
}
# What a GGUF does not store, as the architecture's transformers config class defaults it:
# token ids, and the settings that change the computation (spelled out, so the config
# says the same wherever it is read).
CONFIG_DEFAULTS = {
    "llama": {"bos_token_id": 1, "eos_token_id": 2},  # LlamaConfig
    "qwen2": {"use_sliding_window": False},  # Qwen2Config; llama.cpp has no window either
    "qwen3": {"use_sliding_window": False, "head_dim": 128},  # Qwen3Config
    "gemma3": {  # Gemma3TextConfig, as llama.cpp's gemma3 loader fixes the same
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "head_dim": 256, "rope_theta": 1e6,
        "hidden_activation": "gelu_pytorch_tanh", "rope_local_base_freq": 10000.0,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
    },
}
# Every sixth Gemma 3 layer attends globally, the others within the sliding window.
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_27B_LAYERS = 62  # llama.cpp scales this model's attention by hidden / heads
TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
             "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id"}


def _scalar(field):
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0].name == "STRING" else value[0].item()


def _qwen2(path: Path, hf: dict) -> dict:
    """A Qwen2 head is hidden_size / heads wide (its HF config has no head_dim); a file
    giving another head size is refused."""
    head_dim = hf.pop("head_dim", None)
    implied = hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim is not None and head_dim != implied:
        raise ValueError(f"{path}: GGUF metadata gives qwen2 heads of size {head_dim}; a Qwen2 "
                         f"model's are embedding_length / head_count = {implied}")
    return hf


def _gemma3(path: Path, hf: dict) -> dict:
    """Gemma 3's layer pattern and attention scale, which the file does not store: as
    llama.cpp runs it, every sixth layer global, and queries scaled by 1/sqrt(head_dim)
    (1/sqrt(hidden / heads) for the 27B)."""
    layers = hf["num_hidden_layers"]
    hf["layer_types"] = ["full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
                         for i in range(layers)]
    hf["query_pre_attn_scalar"] = (hf["hidden_size"] // hf["num_attention_heads"]
                                   if layers == GEMMA3_27B_LAYERS else hf["head_dim"])
    return hf


FINISH_CONFIG = {"qwen2": _qwen2, "gemma3": _gemma3}


def _vocab_size(path: Path, reader, arch: str) -> int:
    """Older files give no vocab_size: the token list's length, or the embedding's rows."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ValueError(f"{path}: GGUF has no {arch}.vocab_size, token list or token_embd.weight")
    return int(embedding.shape[-1])


def metadata_config(path: str | os.PathLike, reader=None) -> dict:
    """The HF config dict of a GGUF, read from its metadata in numpy (the keys
    transformers' GGUF loader gives, without importing it or torch, and the defaults of
    the architecture's config class it fills in). Metadata we do not implement (RoPE
    scaling keys, experts, per-layer values) is refused."""
    path = Path(path)
    reader = reader if reader is not None else _open(path)[1]
    arch = _architecture(path, reader)
    hf: dict = {"model_type": MODEL_TYPES.get(arch, arch),
                "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors}}
    for key, field in reader.fields.items():
        if not key.startswith(arch + "."):
            continue
        name = METADATA_KEYS[arch].get(key[len(arch) + 1:])
        if name is None:
            raise ValueError(f"{path}: GGUF metadata {key} is not supported")
        if field.types[0].name == "ARRAY":
            raise ValueError(f"{path}: GGUF metadata {key} holds one value a layer; not supported")
        value = _scalar(field)
        if name in hf and hf[name] != value:
            raise ValueError(f"{path}: GGUF metadata {key}={value} differs from {name}={hf[name]}")
        hf[name] = value
    missing = [f"{arch}.{key}" for key in REQUIRED_METADATA[arch] if f"{arch}.{key}" not in reader.fields]
    if missing:
        raise ValueError(f"{path}: GGUF metadata has no {', '.join(missing)}, which a {arch!r} model needs")
    hf = CONFIG_DEFAULTS[arch] | hf  # where the file says nothing
    for key, name in TOKEN_IDS.items():
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            hf[name] = _scalar(field)
    if "vocab_size" not in hf:
        hf["vocab_size"] = _vocab_size(path, reader, arch)
    finish = FINISH_CONFIG.get(arch)
    return finish(path, hf) if finish else hf


def _config(path: Path, reader) -> llama.LlamaConfig:
    return _rope_scaling(path, reader, config_from_hf(metadata_config(path, reader), source=str(path)))


def gguf_config(path: str | os.PathLike) -> llama.LlamaConfig:
    """The model config of a GGUF (no tensor data read)."""
    return _config(*_open(path))


def load_gguf(path: str | os.PathLike, dtype=None, *, dequantize: bool = True,
              quantized_embeddings: bool = False) -> tuple[llama.LlamaConfig, llama.Params]:
    """Load a GGUF (llama, qwen2, qwen3, gemma3) as `(cfg, params)`.

    dtype: the parameters' dtype (float32, bfloat16, float16); None gives float32,
    as transformers dequantizes.
    dequantize: False keeps every per-layer linear weight in the file's own blocks
        (`quant.QuantizedWeight`, dequantized layer by layer in the forward pass, the
        same values as the dequantized load); the embedding, norms and head are float.
    quantized_embeddings: with dequantize=False, keep the embedding table and LM head in
        the file's blocks too (a lookup decodes only the rows it reads; the head is decoded
        inside the loss); less memory for the frozen model, the same values.
    """
    path, reader = _open(path)
    cfg = _config(path, reader)
    target = _np_dtype(dtype) if dtype is not None else np.dtype(np.float32)
    embeddings = ("model.embed_tokens.weight", "lm_head.weight") if quantized_embeddings else ()
    tensors = _tensors(path, reader, cfg,
                       keep_blocks=lambda name: not dequantize and (_is_layer_linear(name) or name in embeddings))
    return cfg, assemble(cfg, tensors, target, origin=path)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype=None,
                 overwrite: bool = False) -> Path:
    """Write a GGUF as an HF folder (safetensors, config, tokenizer, chat template)
    that transformers and `load_hf` read; written beside `out_dir` and renamed into place."""
    cfg, params = load_gguf(gguf_path, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="spsft-gguf-") as tokenizer_dir:
        save_tokenizer(gguf_path, cfg, tokenizer_dir)
        return save_hf(out_dir, cfg, params, tokenizer_from=tokenizer_dir, overwrite=overwrite)


def save_tokenizer(gguf_path: str | os.PathLike, cfg: llama.LlamaConfig, folder: str | os.PathLike) -> Path:
    """The GGUF's tokenizer as HF files in `folder` (tokenizer.json, tokenizer_config.json
    with the chat template, if the file has one) and its generation_config.json: what
    `convert_gguf` puts beside the weights, and what the command line reads a GGUF's
    tokenizer from."""
    from transformers import CONFIG_MAPPING, AutoTokenizer, GenerationConfig

    path = Path(gguf_path)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    hf = config_to_hf(cfg)
    model_config = CONFIG_MAPPING[hf["model_type"]].from_dict(hf)  # the family's own config class
    GenerationConfig.from_model_config(model_config).save_pretrained(folder)
    return Path(folder)


# --------------------------------------------------------------------------- writing GGUF

def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (HF's first-half/second-half rotary layout
    interleaved per head): the inverse of `unpermute`. Works on float rows and on rows
    of quantized bytes alike (only the leading, row axis moves)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# The digests of the adapters merged into a GGUF's weights (`checkpoint.adapter_digest`),
# as an HF export records them in config.json: none is then applied to it twice.
MERGED_ADAPTERS_FIELD = outputs.GGUF_MARK


def merged_adapters(path: str | os.PathLike) -> tuple[str, ...]:
    """The adapter digests a GGUF records as merged into its weights; () when none."""
    field = _open(path)[1].fields.get(MERGED_ADAPTERS_FIELD)
    return () if field is None else tuple(bytes(field.parts[i]).decode() for i in field.data)


# Fields GGUFWriter writes itself (the header); every other key/value is copied.
_HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")


def _field_value(field, gguf):
    """(value, type, sub type) of a GGUFReader field, as GGUFWriter.add_key_value takes them;
    strings stay bytes, so they are written back exactly as read."""
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        sub = field.types[1] if len(field.types) > 1 else None
        if sub == gguf.GGUFValueType.STRING:
            items = [bytes(field.parts[i]) for i in field.data]
        else:
            items = [field.parts[i][0] for i in field.data]
        return items, vtype, sub
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]), vtype, None
    return field.parts[field.data[0]][0], vtype, None


def _param_of(like_path: Path, arch: str, cfg: llama.LlamaConfig, params) -> dict[str, tuple]:
    """GGUF tensor name -> (our leaf, layer or None, q/k heads to permute or None,
    what llama.cpp adds to the values) for `like_path`, a file of architecture `arch`."""
    from spsft_jax.trees import flatten

    flat = flatten(params, stop=quant.is_quantized)
    names = hf_names(cfg)
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads} if arch in PERMUTED_QK else {}
    gguf_of = {hf: g for g, hf in _gguf_names(arch, cfg, names).items()}
    unnamed = [name for name in names if name not in gguf_of]
    if unnamed:
        raise ValueError(f"{like_path}: parameter {unnamed[0]} has no tensor name in a {arch!r} GGUF")
    out = {}
    for name, (path, layer) in names.items():
        h = heads.get(path[-2]) if path[0] == "layers" else None
        out[gguf_of[name]] = (flat[path], layer, h, _norm_offset(arch, name))
    return out


def _float_bytes(values: np.ndarray, tensor, gguf, offset: int = 0) -> np.ndarray:
    """`values` (float, numpy row order) as the bytes of `tensor`'s ggml type, stored
    plus `offset` (Gemma's norms); `tensor`'s own bytes where `values` are what they
    decode to on read (in `values`' dtype)."""
    ttype = tensor.tensor_type
    stored = np.asarray(tensor.data)
    if not offset and values.shape == stored.shape and values.dtype == stored.dtype and \
            np.array_equal(values, stored):
        return stored.view(np.uint8)  # F32/F16 like tensors, unchanged
    decoded = gguf.dequantize(tensor.data, ttype)
    decoded = decoded - 1 if offset else decoded  # as `_tensors` reads it
    like = np.asarray(decoded, np.float32).reshape(values.shape)
    if np.array_equal(values, like.astype(values.dtype)):
        return stored.view(np.uint8)
    x = values.astype(np.float32) + np.float32(offset)
    if ttype == gguf.GGMLQuantizationType.F32:
        return x.view(np.uint8)
    if ttype == gguf.GGMLQuantizationType.F16:
        return x.astype(np.float16).view(np.uint8)
    if ttype == gguf.GGMLQuantizationType.BF16:
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16).view(np.uint8)
    kind = quant.KIND_OF_GGML.get(int(ttype))
    if kind is None:
        raise ValueError(f"tensor {tensor.name!r}: changed values cannot be written as "
                         f"{ttype.name} (not a kind spsft_jax.quant writes)")
    return np.asarray(quant.quantize(x, kind).data)


def _tensor_bytes(tensor, slot, gguf) -> np.ndarray:
    """The bytes to write for GGUF tensor `tensor` from our parameter `slot`."""
    leaf, layer, heads, offset = slot
    kind = quant.KIND_OF_GGML.get(int(tensor.tensor_type))
    if quant.is_quantized(leaf):
        leaf = leaf if layer is None else leaf.layer(layer)
        layer = None
        if leaf.kind == kind:
            rows = np.asarray(leaf.data)
            return permute(rows, heads) if heads is not None else rows
    values = np.asarray(quant.dequantize(leaf) if quant.is_quantized(leaf) else leaf)
    if layer is not None:
        values = values[layer]
    if heads is not None:
        values = permute(values, heads)
    if values.dtype not in (np.float32, np.float16) and values.dtype.name != "bfloat16":
        values = values.astype(np.float32)
    return _float_bytes(values, tensor, gguf, offset)


def save_gguf(out_path: str | os.PathLike, cfg: llama.LlamaConfig, params: llama.Params, *,
              like: str | os.PathLike, merged_adapters: tuple[str, ...] | None = None,
              overwrite: bool = False) -> Path:
    """Write `params` as a GGUF laid out as `like` (the GGUF they were loaded from).

    Every metadata key/value of `like` is copied with its type; the tensors come in
    `like`'s order, names and ggml types. Quantized per-layer linears of the same kind are
    written as their bytes (q/k rows of llama files put back in llama.cpp's order,
    `permute`); Gemma's norms get back the 1 llama.cpp adds; float
    parameters that still decode-equal `like`'s tensor keep `like`'s bytes, others are
    written as F32/F16/BF16 or quantized (`quant.quantize`) to `like`'s type. So params
    loaded with `load_gguf(like, dequantize=False)` and merged with a row delta differ
    from `like` only in the trained rows. Written beside `out_path` and renamed into
    place; an existing file is replaced only with `overwrite=True` (or when spsft-jax
    recorded it as its own). merged_adapters: digests to record under
    `MERGED_ADAPTERS_FIELD` in place of `like`'s (None: `like`'s, as copied).
    """
    gguf = _gguf()
    like_path, reader = _open(like)
    version = int(reader.fields["GGUF.version"].parts[-1][0])
    if version != gguf.GGUF_VERSION:
        raise ValueError(f"{like_path}: GGUF version {version}; only version {gguf.GGUF_VERSION} "
                         "files are written")
    arch = _architecture(like_path, reader)
    slots = _param_of(like_path, arch, cfg, params)
    names = {t.name for t in reader.tensors}
    missing = sorted(set(slots) - names)
    if missing:
        raise ValueError(f"{like_path}: has no tensor(s) {', '.join(missing[:5])} of these params "
                         "(is it the GGUF they were loaded from?)")
    unknown = [t.name for t in reader.tensors if t.name not in slots and t.name != ROPE_FACTORS]
    if unknown:
        raise ValueError(f"{like_path}: tensor(s) {', '.join(unknown[:5])} have no parameter here")

    writer = gguf.GGUFWriter(None, arch)
    writer.kv_data[0].clear()  # copied below, in `like`'s order
    for key, field in reader.fields.items():
        if key in _HEADER_FIELDS or (key == MERGED_ADAPTERS_FIELD and merged_adapters is not None):
            continue
        value, vtype, sub = _field_value(field, gguf)
        writer.add_key_value(key, value, vtype, sub)
        if key == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(value)
    if merged_adapters:
        writer.add_array(MERGED_ADAPTERS_FIELD, [d.encode() for d in merged_adapters])
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dims innermost first
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), int(t.n_bytes),
                               raw_dtype=t.tensor_type)

    with _written(writer, out_path, overwrite, gguf):
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            if t.name in slots:
                data = np.ascontiguousarray(_tensor_bytes(t, slots[t.name], gguf)).view(np.uint8)
            else:
                data = np.asarray(t.data).view(np.uint8)  # RoPE factors: kept as they are
            if data.nbytes != int(t.n_bytes):
                raise ValueError(f"tensor {t.name!r}: {data.nbytes} bytes to write, "
                                 f"{like_path} has {int(t.n_bytes)}")
            writer.write_tensor_data(data)
    return Path(out_path)


@contextlib.contextmanager
def _written(writer, out_path, overwrite: bool, gguf):
    """`writer` pointed at a temporary file renamed to `out_path` when the block ends
    (`outputs.output_file`), with its header and metadata written; the block writes the
    tensors."""
    with outputs.output_file(out_path, "wb", overwrite=overwrite) as f:
        writer.fout = [f]
        writer.state = gguf.gguf_writer.WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        yield
        f.flush()
        writer.fout = None


# --------------------------------------------------------------------------- adapters


def save_gguf_adapter(out_path: str | os.PathLike, cfg: llama.LlamaConfig, delta, *, like: str | os.PathLike,
                      source: str = "", overwrite: bool = False) -> Path:
    """A row delta as a llama.cpp LoRA adapter GGUF for the base file `like`: exact,
    since `W + M W_f` is the rank-r product `B A` with A = W_f [r, in] and B [out, r]
    the one-hot columns of the selected rows (q/k rows of a llama file put in llama.cpp's
    order). The base file stays as it is; `llama-cli -m like --lora out` (or
    llama-cpp-python's `lora_path=`) applies it at scale 1 (alpha = rank). `source` (e.g.
    the adapter file's digest) is recorded under `outputs.GGUF_ADAPTER_MARK`."""
    from spsft_jax import delta as deltas

    gguf = _gguf()
    like_path, reader = _open(like)
    names = {t.name for t in reader.tensors}
    arch = _architecture(like_path, reader)
    name_map = _name_map(arch, cfg.num_layers)
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads} if arch in PERMUTED_QK else {}
    tensors = []
    for path, d in deltas.leaves(delta):
        if not isinstance(d, deltas.RowDelta) or path[0] != "layers" or d.bias is not None:
            raise ValueError(f"{'/'.join(path)}: only row deltas of the layers' linears (no bias) are "
                             "written as a llama.cpp adapter")
        rows = np.asarray(d.rows)
        w_f = np.asarray(d.w_f, np.float32) * (1.0 if d.mask is None else np.asarray(d.mask, np.float32)[..., None])
        out = cfg.linear_shapes()[path[-1]][0]
        for layer in range(cfg.num_layers):
            name = f"{name_map.get_name(f'model.layers.{layer}.' + '.'.join(path[1:]))}.weight"
            if name not in names:
                raise ValueError(f"{like_path}: has no tensor {name} for the delta on {'/'.join(path)}")
            b = np.zeros((out, rows.shape[-1]), np.float32)
            b[rows[layer], np.arange(rows.shape[-1])] = 1.0
            if path[-1] in heads:
                b = permute(b, heads[path[-1]])
            tensors += [(f"{name}.lora_a", w_f[layer]), (f"{name}.lora_b", b)]
    rank = {a.shape[0] for n, a in tensors if n.endswith(".lora_a")}
    if len(rank) != 1:
        raise ValueError(f"a llama.cpp adapter has one rank; this delta has {sorted(rank)}")
    writer = gguf.GGUFWriter(None, arch)
    writer.add_string(gguf.Keys.General.TYPE, "adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank.pop()))  # scale alpha / rank = 1
    writer.add_string(outputs.GGUF_ADAPTER_MARK, source)
    for name, array in tensors:
        writer.add_tensor(name, np.ascontiguousarray(array))
    with _written(writer, out_path, overwrite, gguf):
        writer.write_tensors_to_file()
    return Path(out_path)
