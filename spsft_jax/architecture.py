"""What a saved adapter, selection or training state records of the model it was made for,
and how a record is compared with a model: the lowest layer of the files we write, so that
`checkpoint`, `delta` and `selection` all build on it.

    architecture(cfg)                     -> {"vocab_size": ..., "hidden_size": ..., ...}
    first_difference(recorded, current)   -> "hidden_size: made for 64, this one has 32" | None
"""
from __future__ import annotations

from typing import Any

# The metadata key under which a file records `architecture(cfg)`.
CONFIG_KEY = "spsft_jax.config"

# LlamaConfig fields that decide whether weights, adapters and states fit one another.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                       "num_kv_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias")


def architecture(cfg: Any) -> dict[str, Any]:
    """The architecture fields of a `LlamaConfig` (what an adapter or state must match),
    and the model family where it is not Llama (a Llama record names none)."""
    fields = {f: getattr(cfg, f) for f in ARCHITECTURE_FIELDS if hasattr(cfg, f)}
    if getattr(cfg, "model_type", "llama") != "llama":
        fields["model_type"] = cfg.model_type
    return fields


def first_difference(recorded: dict, current: dict, prefix: str = "") -> str | None:
    """'field: made for X, this one has Y' for the first (nested) key whose values differ."""
    for key in list(recorded) + [k for k in current if k not in recorded]:
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b and not (isinstance(a, list | tuple) and isinstance(b, list | tuple)
                             and list(a) == list(b)):
            return f"{prefix}{key}: made for {a!r}, this one has {b!r}"
    return None
