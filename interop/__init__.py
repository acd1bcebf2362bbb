"""PyTorch / HF interop: checkpoint folders and GGUF files in, HF folders and PEFT adapters out.

Imported as `spsft_jax.interop`. It owns the HF schema: config keys (`config`) and
tensor names (`hf`). Nothing here imports torch at import time; only reading a
`pytorch_model.bin` or a GGUF does.
"""
from spsft_jax.interop.config import config_from_hf, config_to_hf, read_config
from spsft_jax.interop.gguf_file import convert_gguf, load_gguf, save_gguf, save_gguf_adapter
from spsft_jax.interop.hf import HF_PREFIX, hf_names, load_hf, parse_size, save_hf
from spsft_jax.interop.merges import check_not_merged, merged_adapters, save_merged
from spsft_jax.interop.peft import save_peft_adapter

__all__ = ["HF_PREFIX", "check_not_merged", "config_from_hf", "config_to_hf", "convert_gguf", "hf_names",
           "load_gguf", "load_hf", "merged_adapters", "parse_size", "read_config", "save_gguf", "save_gguf_adapter", "save_hf",
           "save_merged", "save_peft_adapter"]
