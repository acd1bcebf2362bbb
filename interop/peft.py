"""Export a delta as a PEFT LoRA adapter folder that `peft.PeftModel` loads.

    save_peft_adapter("out", cfg, delta)  ->  out/adapter_config.json, out/adapter_model.safetensors

SPSFT rows are exactly a LoRA of rank r: `W + M W_f = W + B A` with `A = W_f`
(padded slots zeroed) and `B = M`, the one-hot `[d_out, r]` row-selection matrix,
at scale 1 (lora_alpha = r). Dependency columns are exact too: `W + W_f,dep M_dep
= W + B A` with `B = W_f,dep` and `A = M_dep`, the one-hot `[c, d_in]` column
selection. LoRA deltas are written as they are. Modules of
different rank get PEFT's `rank_pattern` / `alpha_pattern`. Norm and bias deltas
have no LoRA form: export merged weights with `save_hf` instead.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from spsft_jax import delta as deltas
from spsft_jax import llama
from spsft_jax.outputs import output_dir
from spsft_jax.trees import set_nested

PEFT_PREFIX = "base_model.model.model.layers.{i}."


def _as_lora(d, d_out: int, d_in: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(A [L, r, d_in], B [L, d_out, r], alpha) of a stacked delta."""
    if isinstance(d, deltas.LoraDelta):
        rank = d.a.shape[-2]
        return np.asarray(d.a, np.float32), np.asarray(d.b, np.float32), float(d.scale * rank)
    if isinstance(d, deltas.RowDelta) and d.bias is None:
        w_f = np.asarray(d.w_f, np.float32)
        if d.mask is not None:
            w_f = w_f * np.asarray(d.mask, np.float32)[..., None]
        one_hot = np.eye(d_out, dtype=np.float32)[np.asarray(d.rows)]  # [L, r, d_out]
        return w_f, np.swapaxes(one_hot, -1, -2), float(w_f.shape[-2])
    if isinstance(d, deltas.ColumnDelta) and d.bias is None:
        w_f = np.asarray(d.w_f, np.float32)  # [L, d_out, c]
        if d.mask is not None:
            w_f = w_f * np.asarray(d.mask, np.float32)[..., None, :]
        d_in = int(np.max(np.asarray(d.cols))) + 1 if d_in is None else d_in
        one_hot = np.eye(d_in, dtype=np.float32)[np.asarray(d.cols)]  # [L, c, d_in]
        return one_hot, w_f, float(w_f.shape[-1])
    raise ValueError(
        f"{type(d).__name__} has no LoRA form for a PEFT adapter; "
        "export merged weights with spsft_jax.interop.save_hf instead"
    )


def save_peft_adapter(
    path: str | os.PathLike,
    cfg: llama.LlamaConfig,
    delta: Any,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `delta` (SPSFT rows or LoRA on the decoder linears) as a PEFT LoRA adapter.

    The delta is checked against `cfg` first (layers, shapes, rows in range): nothing is
    dropped. overwrite: write into an existing folder spsft-jax did not write (only the
    adapter files are replaced).
    """
    model_shapes = llama.param_shapes(cfg)
    shapes = cfg.linear_shapes()
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for module_path, d in deltas.leaves(delta):
        name = module_path[-1]
        if module_path[0] != "layers" or name not in shapes:
            raise ValueError(f"delta at {'/'.join(module_path)}: PEFT adapters here cover the "
                             "decoder layers' linear modules only")
        if isinstance(d, deltas.LoraDelta | deltas.RowDelta | deltas.ColumnDelta) and getattr(d, "bias", None) is None:
            try:  # layers, shapes and rows must fit the model: nothing is dropped or clipped
                deltas.validate(model_shapes, set_nested({}, module_path, d))
            except (ValueError, KeyError) as err:
                raise ValueError(f"PEFT export: {err.args[0]}") from None
        a, b, alpha = _as_lora(d, *shapes[name])
        ranks[name], alphas[name] = a.shape[-2], alpha
        block = ".".join(module_path[1:])
        for i in range(cfg.num_layers):
            prefix = PEFT_PREFIX.format(i=i) + block
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i])
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i])
    if not tensors:
        raise ValueError("delta is empty: nothing to export")
    # The most common rank is the default; the others go to the patterns.
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = next(alphas[n] for n in ranks if ranks[n] == r)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or cfg.source_dir,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: a for n, a in alphas.items() if ranks[n] != r or a != alpha},
        "lora_dropout": max((d.dropout for _, d in deltas.leaves(delta)
                             if isinstance(d, deltas.LoraDelta)), default=0.0),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with output_dir(path, kind="peft", overwrite=overwrite) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)
