"""benchmarks/vs_peft.py on a tiny random Llama: every implementation runs and reports its fields."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "vs_peft.py"
FIELDS = {"case", "implementation", "method", "rank", "tokentune", "remat", "update", "trainable_params",
          "step_s", "tokens_per_s", "peak_rss_mib", "loss_first", "loss_last"}


@pytest.fixture(scope="module")
def vs_peft():
    spec = importlib.util.spec_from_file_location("vs_peft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_peft"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(vs_peft, tmp_path_factory):
    out = tmp_path_factory.mktemp("vs-peft")
    return vs_peft.main(["--cases", "tiny", "--methods", "lora,spsft", "--steps", "2", "--no-kernel",
                         "--json", "--out", str(out)])


@pytest.mark.slow  # the benchmark: both implementations train
def test_each_row_has_the_documented_fields(rows):
    assert {(r["implementation"], r["method"]) for r in rows} == {
        ("peft", "lora"), ("spsft-jax", "lora"), ("spsft-jax", "spsft")}
    for r in rows:
        assert FIELDS <= r.keys()
        assert r["step_s"] > 0 and r["peak_rss_mib"] > 0
        # Ours also ran warm, on the compilation cache the cold run filled.
        assert ("peak_rss_warm_mib" in r) == (r["implementation"] == "spsft-jax")
        json.dumps(r)


@pytest.mark.slow  # the benchmark: both implementations train
def test_both_sides_start_from_the_same_model_and_batch(rows):
    # LoRA's B and SPSFT's W_f start at zero: every first loss is the base model's.
    first = [r["loss_first"] for r in rows if r["tokentune"] is None]
    assert max(first) - min(first) < 1e-4


@pytest.mark.slow  # the benchmark: both implementations train
def test_trainable_parameters_match_peft(rows):
    peft = next(r for r in rows if r["implementation"] == "peft")
    ours = next(r for r in rows if r["implementation"] == "spsft-jax" and r["method"] == "lora")
    assert ours["trainable_params"] == peft["trainable_params"]


def test_the_accelerator_case_is_a_1b_llama(vs_peft):
    """benchmarks/device_run.sh's shape reads as the Llama-3.2-1B architecture."""
    from spsft_jax.interop.config import config_from_hf

    cfg = config_from_hf(vs_peft.CASES["llama-1b"].hf_config)
    assert 1.2e9 < cfg.num_params() < 1.3e9
    assert cfg.tie_word_embeddings and cfg.num_kv_heads * 4 == cfg.num_heads
