"""HF `config.json` <-> `LlamaConfig`: the HF schema of the architecture.

    config_from_hf({"model_type": "llama", "hidden_size": 576, ...})  ->  LlamaConfig
    config_to_hf(cfg)                                                  ->  dict for config.json
    read_config("folder/config.json")                                  ->  LlamaConfig
    merged_adapters("folder")                                          ->  ("sha256:...", ...)

Every key a config may carry is in one of three tables, as transformers reads it:
`FIELDS` (HF key -> our field), `MUST_EQUAL` (a key whose other values change the
computation in a way we do not implement; each value listed is the only one
accepted) and `IGNORED` (metadata, training-only switches and generation settings).
A key in none of them is refused, so a checkpoint never computes differently in
silence. RoPE settings come from `rope_parameters` (transformers 5) and
`rope_scaling` (4.x), read through the `ROPE_*` tables.

A merged export records the adapters merged into its weights under `MERGED_ADAPTERS_KEY`
(their `checkpoint.adapter_digest`s); transformers keeps it as a config attribute and
we pass over it when reading the architecture.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from spsft_jax.llama import LlamaConfig, RopeScaling

def _token_ids(value):
    return tuple(value) if isinstance(value, list) else value


# HF key -> (LlamaConfig field, how to read the value); the rope keys go through `rope_from_hf`.
FIELDS = {
    "vocab_size": ("vocab_size", int),
    "hidden_size": ("hidden_size", int),
    "intermediate_size": ("intermediate_size", int),
    "num_hidden_layers": ("num_layers", int),
    "num_attention_heads": ("num_heads", int),
    "num_key_value_heads": ("num_kv_heads", int),
    "head_dim": ("head_dim", int),
    "rms_norm_eps": ("rms_norm_eps", float),
    "max_position_embeddings": ("max_position_embeddings", int),
    "tie_word_embeddings": ("tie_word_embeddings", bool),
    "attention_bias": ("attention_bias", bool),
    "mlp_bias": ("mlp_bias", bool),
    "bos_token_id": ("bos_token_id", _token_ids),
    "eos_token_id": ("eos_token_id", _token_ids),
    "pad_token_id": ("pad_token_id", _token_ids),
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")

# Keys that change the computation: the values we implement (absent counts as the first).
MUST_EQUAL: dict[str, tuple] = {
    "model_type": ("llama",),
    "hidden_act": ("silu",),
    "sliding_window": (None,),
    "quantization_config": (None,),
    "auto_map": (None,),  # the model's own code would run, not transformers' Llama
}
# A key MUST_EQUAL checks only while another key (absent: on) does not switch it off.
SWITCHED_BY = {"sliding_window": ("use_sliding_window", False)}

MERGED_ADAPTERS_KEY = "spsft_jax_merged_adapters"

IGNORED = frozenset({
    # our record of the adapters merged into the weights: it changes no computation
    MERGED_ADAPTERS_KEY,
    # bookkeeping
    "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "_commit_hash", "name_or_path", "model_name", "tokenizer_class", "prefix", "id2label",
    "label2id", "problem_type", "finetuning_task", "task_specific_params", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "return_dict", "output_hidden_states",
    "output_attentions", "output_scores", "return_dict_in_generate", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "pruned_heads", "transformers.js_config",
    # training-only switches and initialisation; `pretraining_tp` only split matmuls
    # in older transformers, with the same result
    "initializer_range", "attention_dropout", "use_cache", "pretraining_tp",
    "gradient_checkpointing",
    # token ids we do not use
    "unk_token_id", "sep_token_id", "decoder_start_token_id", "forced_bos_token_id",
    "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens", "bad_words_ids",
    # generation settings (transformers 4.x kept them in config.json)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "num_return_sequences", "remove_invalid_values", "exponential_decay_length_penalty",
})

# RoPE: the keys each rope type needs (HF name -> RopeScaling field), and the
# keys every rope type may carry.
ROPE_TYPES: dict[str, dict[str, str]] = {
    "default": {},
    "linear": {"factor": "factor"},
    "llama3": {"factor": "factor", "low_freq_factor": "low_freq_factor",
               "high_freq_factor": "high_freq_factor",
               "original_max_position_embeddings": "original_max_position_embeddings"},
}
ROPE_COMMON = frozenset({"rope_type", "type", "rope_theta"})
ROPE_MUST_EQUAL = {"partial_rotary_factor": (1.0,)}


def _refuse_values(hf: Mapping[str, Any], table: Mapping[str, tuple], source: str, where=""):
    for key, allowed in table.items():
        switch = SWITCHED_BY.get(key)
        if switch and hf.get(switch[0]) == switch[1]:
            continue
        if hf.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{source}: {where}{key}={hf[key]!r} is not supported "
                             f"(supported: {', '.join(map(repr, allowed))})")


def rope_from_hf(hf: Mapping[str, Any], source: str = "config.json"
                 ) -> tuple[float, RopeScaling | None]:
    """`(rope_theta, scaling)` from `rope_parameters` and/or `rope_scaling`."""
    rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported "
                         f"(supported: {', '.join(map(repr, ROPE_TYPES))})")
    _refuse_values(rope, ROPE_MUST_EQUAL, source, where="rope ")
    needed = ROPE_TYPES[rope_type]
    unknown = sorted(set(rope) - set(needed) - ROPE_COMMON - set(ROPE_MUST_EQUAL))
    if unknown:
        raise ValueError(f"{source}: rope attribute(s) {', '.join(unknown)} are not supported "
                         f"with rope_type {rope_type!r}")
    missing = [k for k in needed if k not in rope]
    if missing:
        raise ValueError(f"{source}: rope_type {rope_type!r} needs {', '.join(missing)}")
    if rope_type == "default":
        return theta, None
    fields = {field: rope[key] for key, field in needed.items()}
    return theta, RopeScaling(rope_type, **{
        k: int(v) if k == "original_max_position_embeddings" else float(v)
        for k, v in fields.items()})


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> LlamaConfig:
    """The architecture an HF config dict describes; raise (naming the key) on anything
    we would compute differently from transformers."""
    _refuse_values(hf, MUST_EQUAL, source)
    known = set(FIELDS) | set(ROPE_KEYS) | set(MUST_EQUAL) | IGNORED | {
        switch for switch, _ in SWITCHED_BY.values()}
    unknown = sorted(k for k in hf if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{source}: unsupported config attribute(s): {', '.join(unknown)}")
    missing = [k for k in REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"{source}: required attribute(s) {', '.join(missing)} missing")
    values = {field: read(hf[key]) for key, (field, read) in FIELDS.items()
              if hf.get(key) is not None}
    # Defaults as transformers fills them in.
    values.setdefault("num_kv_heads", values["num_heads"])
    values.setdefault("head_dim", values["hidden_size"] // values["num_heads"])
    values["rope_theta"], values["rope_scaling"] = rope_from_hf(hf, source)
    try:
        return LlamaConfig(**values)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def config_to_hf(cfg: LlamaConfig, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` dict that transformers 4.45+ and 5.x both read as `cfg`:
    RoPE as `rope_parameters` (5.x) and as `rope_scaling` + top-level `rope_theta` (4.x)."""
    scaling = None
    if cfg.rope_scaling is not None:
        fields = ROPE_TYPES[cfg.rope_scaling.rope_type]
        scaling = {"rope_type": cfg.rope_scaling.rope_type,
                   **{key: getattr(cfg.rope_scaling, f) for key, f in fields.items()}}
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}
    for key, (field, _) in FIELDS.items():
        value = getattr(cfg, field)
        hf[key] = list(value) if isinstance(value, tuple) else value
    hf.update(
        rope_theta=cfg.rope_theta,
        rope_scaling=scaling,
        rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta},
        torch_dtype=dtype,
        dtype=dtype,
    )
    return hf


def config_path(path: str | os.PathLike) -> str:
    """The `config.json` of a model folder, or `path` itself when it names the file."""
    path = os.fspath(path)
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of a `config.json` file (or of the one in a folder)."""
    path = config_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; an HF model folder needs config.json")
    with open(path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(hf).__name__}")
    return hf


def read_config(path: str | os.PathLike) -> LlamaConfig:
    """`config_from_hf` of a `config.json` file (or of the one in a folder); the config
    remembers its folder, where the tokenizer files are."""
    path = config_path(path)
    cfg = config_from_hf(read_config_dict(path), source=path)
    return dataclasses.replace(cfg, source_dir=os.path.dirname(os.path.abspath(path)))


def merged_adapters(path: str | os.PathLike) -> tuple[str, ...]:
    """The digests of the adapters a model folder's `config.json` (or that file) records as
    merged into its weights, in merge order; () when it records none. A GGUF file records
    them in its metadata (`gguf_file.MERGED_ADAPTERS_FIELD`)."""
    if str(path).lower().endswith(".gguf") and os.path.isfile(path):
        from spsft_jax.interop import gguf_file

        return gguf_file.merged_adapters(path)
    path = config_path(path)
    recorded = read_config_dict(path).get(MERGED_ADAPTERS_KEY) or []
    if not isinstance(recorded, list) or not all(isinstance(d, str) for d in recorded):
        raise ValueError(f"{path}: {MERGED_ADAPTERS_KEY} must be a list of digest strings, "
                         f"found {recorded!r}")
    return tuple(recorded)
