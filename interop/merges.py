"""The record of the adapters merged into a model's weights, in either format, and the
merged export that extends it:

    merged_adapters("folder" | "model.gguf")   -> ("sha256:...", ...)   in merge order
    check_not_merged("folder", "a.safetensors")  raises if the adapter is already merged in
    save_merged("out", cfg, merged, model_dir="base", adapter_path="a.safetensors")

An HF folder records them in config.json (`config.MERGED_ADAPTERS_KEY`), a GGUF file in its
metadata (`gguf_file.MERGED_ADAPTERS_FIELD`). This module sits above both readers.
"""
from __future__ import annotations

import os
from pathlib import Path

from spsft_jax import llama
from spsft_jax.checkpoint import adapter_digest
from spsft_jax.interop import config, gguf_file
from spsft_jax.interop.hf import save_hf


def merged_adapters(path: str | os.PathLike) -> tuple[str, ...]:
    """The digests of the adapters a model (HF folder, its config.json, or a GGUF file)
    records as merged into its weights, in merge order; () when it records none."""
    if str(path).lower().endswith(".gguf") and os.path.isfile(path):
        return gguf_file.merged_adapters(path)
    return config.merged_adapters(path)


def check_not_merged(model_dir: str | os.PathLike, adapter_path: str | os.PathLike) -> None:
    """Refuse an adapter that the model's config.json records as merged into its weights:
    applying it again would add its delta twice (ValueError)."""
    digest = adapter_digest(adapter_path)
    if digest in merged_adapters(model_dir):
        where = "metadata" if str(model_dir).lower().endswith(".gguf") else "config.json"
        raise ValueError(f"{adapter_path}: already merged into {model_dir} (its {where} "
                         f"records {digest}); apply it to the model it was trained on instead")


def save_merged(path: str | os.PathLike, cfg: llama.LlamaConfig, params: llama.Params, *,
                model_dir: str | os.PathLike, adapter_path: str | os.PathLike, **options) -> Path:
    """`save_hf` of `params`, the model of `model_dir` with the adapter at `adapter_path`
    merged in; config.json records the adapters `model_dir` records and this one.
    An adapter `model_dir` already holds is refused (`check_not_merged`)."""
    check_not_merged(model_dir, adapter_path)
    record = merged_adapters(model_dir) + (adapter_digest(adapter_path),)
    return save_hf(path, cfg, params, merged_adapters=record, **options)
