"""PyTorch / HF interop: checkpoint folders in and out, PEFT adapters out.

Imported as `spsft_jax.interop`. Nothing here imports torch at import time;
only reading a `pytorch_model.bin` does.
"""
from spsft_jax.interop.hf import hf_names, load_hf, parse_size, save_hf
from spsft_jax.interop.peft import save_peft_adapter

__all__ = ["hf_names", "load_hf", "parse_size", "save_hf", "save_peft_adapter"]
