"""spsft-jax: memory-frugal fine-tuning of Llama models in JAX.

    import spsft_jax as sj
    cfg, params = sj.interop.load_hf("path/to/llama")
    logits = sj.llama.forward(cfg, params, input_ids)
"""
import importlib.util as _util
import os as _os
import sys as _sys


def _checkout_interop():
    """In a source checkout `interop/` sits beside the package (pyproject maps it to
    `spsft_jax.interop` on install); register it under that name when run from the tree."""
    if _util.find_spec(__name__ + ".interop") is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "interop")
    spec = _util.spec_from_file_location(
        __name__ + ".interop", _os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = _util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_checkout_interop()

from spsft_jax import (  # noqa: E402
    checkpoint, data, delta, evaluate, generate, importance, llama, losses, memory, multiple_choice, outputs,
    quant, selection, tasks, tokentune, train, trees,
)
from spsft_jax import interop  # noqa: E402
from spsft_jax.delta import merge  # noqa: E402
from spsft_jax.train import FinetuneResult, finetune  # noqa: E402

__version__ = "0.1.0"
__all__ = ["FinetuneResult", "checkpoint", "data", "delta", "evaluate", "finetune", "generate",
           "importance", "interop", "llama", "losses", "memory", "merge", "multiple_choice", "outputs", "quant",
           "selection", "tasks", "tokentune", "train", "trees"]
