"""HF `config.json` <-> `LlamaConfig`: the HF schema of each model family.

    config_from_hf({"model_type": "qwen2", "hidden_size": 896, ...})  ->  LlamaConfig
    config_to_hf(cfg)                                                  ->  dict for config.json
    read_config("folder/config.json")                                  ->  LlamaConfig
    merged_adapters("folder")                                          ->  ("sha256:...", ...)

`FAMILIES` holds one `Family` per `model_type` we compute (llama, mistral, qwen2, qwen3,
gemma3_text): the switches of `LlamaConfig` it fixes, the keys it reads beyond the common
`FIELDS`, its transformers config class's defaults for absent keys, and the values it
accepts of keys that would change the computation. Every key a config may carry is in one
of the tables, as transformers reads it: `FIELDS` and the family's `fields` (HF key -> our
field), `MUST_EQUAL` and the family's `must_equal` (a key whose other values change the
computation in a way we do not implement; each value listed is the only one accepted),
the family's `layout` keys (sliding-window layers) and `IGNORED` (metadata, training-only
switches and generation settings). A key in none of them is refused, so a checkpoint never
computes differently in silence. RoPE settings come from `rope_parameters` (transformers 5)
and `rope_scaling` (4.x), read through the `ROPE_*` tables.

A merged export records the adapters merged into its weights under `MERGED_ADAPTERS_KEY`
(their `checkpoint.adapter_digest`s); transformers keeps it as a config attribute and
we pass over it when reading the architecture.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from spsft_jax.llama import FULL_ATTENTION, SLIDING_ATTENTION, LlamaConfig, RopeScaling

def _token_ids(value):
    return tuple(value) if isinstance(value, list) else value


# HF key -> (LlamaConfig field, how to read the value), for every family; the rope keys go
# through `rope_from_hf`, the sliding-window keys through the family's `layout`.
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
    "bos_token_id": ("bos_token_id", _token_ids),
    "eos_token_id": ("eos_token_id", _token_ids),
    "pad_token_id": ("pad_token_id", _token_ids),
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")

# Keys that change the computation, for every family: the values we implement (absent
# counts as the first).
MUST_EQUAL: dict[str, tuple] = {
    "quantization_config": (None,),
    "auto_map": (None,),  # the model's own code would run, not transformers' class
}


def _number(value):  # an int stays an int, as transformers' strict configs want it back
    return int(value) if float(value).is_integer() else float(value)


def _optional_float(value):
    return None if value is None else float(value)


def _no_sliding(hf, num_layers, source):
    """Llama: every layer full; a sliding window is refused unless switched off."""
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window") is not False:
        raise ValueError(f"{source}: sliding_window={hf['sliding_window']!r} is not supported "
                         f"by model_type {hf.get('model_type', 'llama')!r} (supported: None)")
    return {}


def _all_sliding(hf, num_layers, source):
    """Mistral: every layer slides when `sliding_window` is set."""
    window = hf["sliding_window"]
    return {} if window is None else {"sliding_window": int(window),
                                      "layer_types": (SLIDING,) * num_layers}


def _upper_layers_sliding(hf, num_layers, source):
    """Qwen2/3: with `use_sliding_window`, the layers from `max_window_layers` up slide
    (or as `layer_types` says)."""
    window = hf["sliding_window"] if hf["use_sliding_window"] else None
    types = hf.get("layer_types") or [
        SLIDING if window is not None and i >= hf["max_window_layers"] else FULL
        for i in range(num_layers)]
    if SLIDING in types and window is None:
        raise ValueError(f"{source}: layer_types names sliding layers but use_sliding_window "
                         f"is off (no window is set)")
    return _layer_types(types, window)


def _pattern_sliding(hf, num_layers, source):
    """Gemma 3: every `sliding_window_pattern`-th layer full, the rest slide (or as
    `layer_types` says)."""
    pattern = hf["sliding_window_pattern"]
    types = hf.get("layer_types") or [FULL if (i + 1) % pattern == 0 else SLIDING
                                      for i in range(num_layers)]
    return _layer_types(types, hf["sliding_window"])


def _layer_types(types, window):
    if SLIDING not in types:
        return {}
    return {"sliding_window": int(window), "layer_types": tuple(types)}


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF `model_type` maps onto `LlamaConfig`."""

    architecture: str  # the *ForCausalLM class an export names
    switches: Mapping[str, Any]  # LlamaConfig fields the family fixes
    fields: Mapping[str, tuple[str, Any]]  # keys it reads beyond FIELDS
    defaults: Mapping[str, Any]  # its transformers config class's values of absent keys
    must_equal: Mapping[str, tuple]  # keys beyond MUST_EQUAL with the values we implement
    layout: Any  # (hf, num_layers, source) -> sliding_window / layer_types fields
    layout_keys: tuple[str, ...] = ()  # the keys `layout` reads

    def known_keys(self) -> set[str]:
        return (set(FIELDS) | set(self.fields) | set(ROPE_KEYS) | set(MUST_EQUAL)
                | set(self.must_equal) | set(self.layout_keys) | IGNORED)


FULL, SLIDING = FULL_ATTENTION, SLIDING_ATTENTION
_BIASES = {"attention_bias": ("attention_bias", bool), "mlp_bias": ("mlp_bias", bool)}
_QWEN_LAYOUT = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
_QWEN_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 32768,
                  "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}

FAMILIES: dict[str, Family] = {
    "llama": Family(
        "LlamaForCausalLM", {}, _BIASES,
        {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 2048,
         "bos_token_id": 1, "eos_token_id": 2},
        {"hidden_act": ("silu",)}, _no_sliding, ("sliding_window", "use_sliding_window")),
    "mistral": Family(
        "MistralForCausalLM", {}, {},
        {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 131072,
         "sliding_window": 4096, "num_key_value_heads": 8, "bos_token_id": 1, "eos_token_id": 2},
        {"hidden_act": ("silu",)}, _all_sliding, ("sliding_window",)),
    "qwen2": Family(
        "Qwen2ForCausalLM", {"qkv_bias": True}, {}, _QWEN_DEFAULTS,
        {"hidden_act": ("silu",)}, _upper_layers_sliding, _QWEN_LAYOUT),
    "qwen3": Family(
        "Qwen3ForCausalLM", {"qk_norm": True}, {"attention_bias": ("attention_bias", bool)},
        {**_QWEN_DEFAULTS, "head_dim": 128},
        {"hidden_act": ("silu",)}, _upper_layers_sliding, _QWEN_LAYOUT),
    "gemma3_text": Family(
        "Gemma3ForCausalLM",
        {"qk_norm": True, "norm_offset": 1.0, "scale_embeddings": True, "sandwich_norms": True},
        {"attention_bias": ("attention_bias", bool), "hidden_activation": ("hidden_act", str),
         "query_pre_attn_scalar": ("query_pre_attn_scalar", _number),
         "final_logit_softcapping": ("final_logit_softcapping", _optional_float)},
        {"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 131072,
         "vocab_size": 262208, "head_dim": 256, "num_key_value_heads": 4, "hidden_activation": "gelu_pytorch_tanh",
         "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
         "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
        # transformers' Gemma 3 attention never applies attn_logit_softcapping: a value we
        # would apply is refused rather than computed differently.
        {"use_bidirectional_attention": (None, False), "attn_logit_softcapping": (None,)},
        _pattern_sliding,
        ("sliding_window", "sliding_window_pattern", "layer_types", "rope_local_base_freq")),
}

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
        if hf.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{source}: {where}{key}={hf[key]!r} is not supported "
                             f"(supported: {', '.join(map(repr, allowed))})")


def rope_from_hf(hf: Mapping[str, Any], source: str = "config.json", default_theta: float = 10000.0
                 ) -> tuple[float, RopeScaling | None]:
    """`(rope_theta, scaling)` from `rope_parameters` and/or `rope_scaling`."""
    rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", default_theta)))
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


# Gemma 3's RoPE bases where the config names none (transformers' Gemma3TextConfig).
GEMMA_THETA = {FULL_ATTENTION: 1_000_000.0, SLIDING_ATTENTION: 10_000.0}


def _rope_fields(hf: Mapping[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """rope_theta, rope_scaling and (Gemma 3) local_rope_theta of a config dict. Gemma 3
    keeps one rope per attention kind (`rope_parameters` keyed by kind in transformers 5;
    `rope_local_base_freq` for the sliding layers in 4.x), the sliding one unscaled."""
    if model_type != "gemma3_text":
        theta, scaling = rope_from_hf(hf, source)
        return {"rope_theta": theta, "rope_scaling": scaling}
    per_kind = hf.get("rope_parameters") or {}
    if per_kind and not set(per_kind) <= set(GEMMA_THETA):
        per_kind = {FULL_ATTENTION: per_kind}
    full = {"rope_parameters": per_kind.get(FULL_ATTENTION), "rope_scaling": hf.get("rope_scaling"),
            "rope_theta": hf.get("rope_theta")}
    theta, scaling = rope_from_hf({k: v for k, v in full.items() if v is not None}, source,
                                  GEMMA_THETA[FULL_ATTENTION])
    local = dict(per_kind.get(SLIDING_ATTENTION) or {})
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", GEMMA_THETA[SLIDING_ATTENTION]))
    local_theta, local_scaling = rope_from_hf({"rope_parameters": local}, source)
    if local_scaling is not None:
        raise ValueError(f"{source}: rope scaling of the sliding layers is not supported")
    return {"rope_theta": theta, "rope_scaling": scaling, "local_rope_theta": local_theta}


def family(model_type: str, source: str = "config.json") -> Family:
    if model_type not in FAMILIES:
        hint = (" (a multimodal Gemma 3: use its text model, model_type 'gemma3_text')"
                if model_type == "gemma3" else "")
        raise ValueError(f"{source}: model_type={model_type!r} is not supported{hint} "
                         f"(supported: {', '.join(map(repr, FAMILIES))})")
    return FAMILIES[model_type]


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> LlamaConfig:
    """The architecture an HF config dict describes; raise (naming the key) on anything
    we would compute differently from transformers."""
    model_type = hf.get("model_type", "llama")
    fam = family(model_type, source)
    unknown = sorted(k for k in hf if k not in fam.known_keys() | {"model_type"}
                     and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{source}: unsupported config attribute(s) for model_type "
                         f"{model_type!r}: {', '.join(unknown)}")
    _refuse_values(hf, MUST_EQUAL | dict(fam.must_equal), source)
    missing = [k for k in REQUIRED if k not in hf and k not in fam.defaults]
    if missing:
        raise ValueError(f"{source}: required attribute(s) {', '.join(missing)} missing")
    hf = {**fam.defaults, **hf}  # a key set to None stays None, as transformers keeps it
    values = {field: read(hf[key]) for key, (field, read) in (FIELDS | dict(fam.fields)).items()
              if hf.get(key) is not None}
    # Defaults as transformers fills them in.
    values.setdefault("num_kv_heads", values["num_heads"])
    values.setdefault("head_dim", values["hidden_size"] // values["num_heads"])
    values.update(fam.switches, model_type=model_type)
    values.update(_rope_fields(hf, model_type, source))
    values.update(fam.layout(hf, values["num_layers"], source))
    try:
        return LlamaConfig(**values)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def _rope_dicts(cfg: LlamaConfig) -> tuple[dict | None, dict]:
    """(rope_scaling as 4.x writes it, rope_parameters as 5.x does) of the full layers."""
    scaling = None
    if cfg.rope_scaling is not None:
        fields = ROPE_TYPES[cfg.rope_scaling.rope_type]
        scaling = {"rope_type": cfg.rope_scaling.rope_type,
                   **{key: getattr(cfg.rope_scaling, f) for key, f in fields.items()}}
    return scaling, {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta}


def _family_keys(cfg: LlamaConfig) -> dict[str, Any]:
    """The keys of `cfg`'s family beyond the common ones: its fields and its layer layout."""
    fam = FAMILIES[cfg.model_type]
    hf = {key: getattr(cfg, field) for key, (field, _) in fam.fields.items()}
    window = cfg.sliding_window if cfg.layer_types else None
    types = list(cfg.layer_types or (FULL_ATTENTION,) * cfg.num_layers)
    if cfg.model_type == "llama":
        hf["hidden_act"] = cfg.hidden_act
    elif cfg.model_type == "mistral":
        hf.update(hidden_act=cfg.hidden_act, sliding_window=window)
    elif cfg.model_type in ("qwen2", "qwen3"):
        hf.update(hidden_act=cfg.hidden_act, use_sliding_window=window is not None,
                  sliding_window=window, max_window_layers=cfg.num_layers, layer_types=types)
    else:  # gemma3_text: the window is always set; layer_types say where it is used
        hf.update(sliding_window=cfg.sliding_window or FAMILIES[cfg.model_type].defaults["sliding_window"],
                  layer_types=types, rope_local_base_freq=cfg.local_rope_theta)
    return hf


def config_to_hf(cfg: LlamaConfig, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` dict that transformers 4.45+ and 5.x both read as `cfg`:
    RoPE as `rope_parameters` (5.x) and as `rope_scaling` + top-level `rope_theta` (4.x)."""
    fam = FAMILIES[cfg.model_type]
    scaling, rope_parameters = _rope_dicts(cfg)
    if cfg.model_type == "gemma3_text":
        rope_parameters = {FULL_ATTENTION: rope_parameters, SLIDING_ATTENTION: {
            "rope_type": "default", "rope_theta": cfg.local_rope_theta}}
    hf = {"architectures": [fam.architecture], "model_type": cfg.model_type}
    for key, (field, _) in FIELDS.items():
        value = getattr(cfg, field)
        hf[key] = list(value) if isinstance(value, tuple) else value
    hf.update(_family_keys(cfg))
    hf.update(
        rope_theta=cfg.rope_theta,
        rope_scaling=scaling,
        rope_parameters=rope_parameters,
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
    merged into its weights, in merge order; () when it records none. (`interop.merged_adapters`
    reads a GGUF file's record too.)"""
    path = config_path(path)
    recorded = read_config_dict(path).get(MERGED_ADAPTERS_KEY) or []
    if not isinstance(recorded, list) or not all(isinstance(d, str) for d in recorded):
        raise ValueError(f"{path}: {MERGED_ADAPTERS_KEY} must be a list of digest strings, "
                         f"found {recorded!r}")
    return tuple(recorded)
