"""The `spsft-jax` command on its embedded default model: finetune, export, generate,
and how it fails on bad input (exit 2, one line naming the file, nothing written)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import hf_logits, rel_max_err
from spsft_jax import assets, checkpoint, cli, data, interop, llama, outputs
from spsft_jax import delta as deltas
from spsft_jax import selection as selection_lib

MODEL = assets.default_asset()
PROMPT = "What is 1 plus 2? "


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short `spsft-jax finetune` on the default model and task: its output folder."""
    tmp = tmp_path_factory.mktemp("cli")
    small_eval = tmp / "eval.jsonl"  # one record keeps the exact-match decoding short
    small_eval.write_text(json.dumps({"prompt": PROMPT, "response": "3!"}) + "\n")
    out = tmp / "run"
    assert cli.main(["finetune", "--steps", "5", "--quiet", "--importance-batches", "2",
                     "--eval", str(small_eval), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def model():
    return interop.load_hf(MODEL)


def test_finetune_writes_adapter_selection_history(run, model):
    cfg, params = model
    assert sorted(p.name for p in run.iterdir() if p.name != outputs.MARKER) == [
        "adapter.safetensors", "history.json", "selection.safetensors"]
    summary = json.loads((run / "history.json").read_text())
    assert summary["method"] == "spsft" and summary["steps"] == len(summary["history"]) == 5
    losses = [h["loss"] for h in summary["history"]]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]

    delta, metadata = checkpoint.load_delta(run / "adapter.safetensors")
    assert metadata["method"] == "spsft" and metadata["model"] == str(MODEL)
    chosen, _ = selection_lib.load(run / "selection.safetensors", cfg=cfg)
    assert {p for p, _ in deltas.leaves(delta)} == set(llama.module_paths("all-linear"))
    for path, d in deltas.leaves(delta):
        np.testing.assert_array_equal(d.rows, llama.subtree(chosen, *path)["rows"])
        assert np.abs(np.asarray(d.w_f)).max() > 0
    assert summary["trainable_params"] == selection_lib.num_selected_params(chosen, cfg)


_jit_forward = jax.jit(llama.forward, static_argnums=0)


def _our_logits(cfg, params, delta, ids):
    return np.asarray(_jit_forward(cfg, params, ids, None, delta))


def test_export_hf_loads_in_transformers(run, model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    cfg, params = model
    out = tmp_path / "merged"
    assert cli.main(["export", "--adapter", str(run / "adapter.safetensors"), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file()  # copied from the model folder

    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 12)).astype(np.int32)
    delta, _ = checkpoint.load_delta(run / "adapter.safetensors")
    ours = _our_logits(cfg, params, delta, ids)
    assert rel_max_err(ours, _our_logits(cfg, params, None, ids)) > 1e-3  # the adapter matters
    assert rel_max_err(hf_logits(hf, ids), ours) < 1e-5


def test_export_peft_loads_in_peft(run, model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, params = model
    out = tmp_path / "peft"
    assert cli.main(["export", "--adapter", str(run / "adapter.safetensors"), "--out", str(out),
                     "--format", "peft"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != outputs.MARKER) == [
        "adapter_config.json", "adapter_model.safetensors"]
    base = AutoModelForCausalLM.from_pretrained(MODEL, attn_implementation="eager").eval()
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 12)).astype(np.int32)
    delta, _ = checkpoint.load_delta(run / "adapter.safetensors")
    assert rel_max_err(hf_logits(peft_model, ids), _our_logits(cfg, params, delta, ids)) < 1e-5


def test_generate_with_adapter(run, model, capsys):
    """The CLI's cached decoding with the adapter equals greedy decoding computed here
    without a cache, on the merged weights, one full forward pass per token."""
    cfg, params = model
    adapter = run / "adapter.safetensors"
    # (The default 16 new tokens: the decoding compiled for the evaluation above is reused.)
    assert cli.main(["generate", "--adapter", str(adapter), "--prompt", PROMPT]) == 0
    lines = capsys.readouterr().out.splitlines()
    tokenizer = data.load_tokenizer(MODEL)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    prompt = [tokenizer.convert_tokens_to_ids("<s>")] + tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    merged = deltas.merge(params, checkpoint.load_delta(adapter)[0])
    logits_of = jax.jit(lambda ids: llama.forward(cfg, merged, ids))
    # One buffer of fixed length: causal attention keeps later pad slots from mattering.
    buffer = np.zeros((1, len(prompt) + 16), np.int32)
    buffer[0, : len(prompt)] = prompt
    n = len(prompt)
    while n < buffer.shape[1]:
        token = int(np.argmax(np.asarray(logits_of(buffer))[0, n - 1]))
        if token == eos:
            break
        buffer[0, n] = token
        n += 1
    assert lines == [PROMPT + tokenizer.decode(buffer[0, len(prompt):n].tolist())]
    assert n > len(prompt)  # it said something


# --------------------------------------------------------------------------- bad input


def _bad_jsonl(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n' + line + "\n")
    return path


@pytest.mark.parametrize("case", ["missing-model", "missing-data", "bad-json-line", "bad-record-line",
                                  "missing-eval"])
def test_finetune_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case):
    out = tmp_path / "out"
    args = ["finetune", "--steps", "2", "--quiet", "--out", str(out)]
    if case == "missing-model":
        named = str(tmp_path / "no-such-model")
        args += ["--model", named]
    elif case == "missing-data":
        named = str(tmp_path / "no-such-data.jsonl")
        args += ["--data", named]
    elif case == "missing-eval":
        named = str(tmp_path / "no-such-eval.jsonl")
        args += ["--eval", named]
    else:
        bad = "{not json" if case == "bad-json-line" else '{"prompt": "only a prompt"}'
        named = f"{_bad_jsonl(tmp_path, bad)}:3"
        args += ["--data", named[:-2]]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("spsft-jax finetune: error:") and named in err[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["bad.jsonl"])


@pytest.mark.parametrize("extra,named", [([], "--remat full or --remat nested"),
                                         (["--remat", "dots"], "--remat full or --remat nested"),
                                         (["--remat", "full", "--grad-accum", "2"], "--grad-accum")])
def test_per_layer_update_without_what_it_needs_exits_2(tmp_path, capsys, extra, named):
    out = tmp_path / "out"
    assert cli.main(["finetune", "--update", "per-layer", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spsft-jax finetune: error: --update per-layer")
    assert named in err[0]
    assert not out.exists()


@pytest.mark.slow  # the default job run again, per layer
def test_per_layer_update_trains_the_default_job(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["finetune", "--steps", "3", "--quiet", "--remat", "nested", "--update", "per-layer",
                     "--out", str(out)]) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history["history"]) == 3 and history["train_loss_last"] < history["train_loss_first"]


@pytest.mark.parametrize("command", ["export", "generate"])
def test_missing_adapter_exits_2_and_writes_nothing(tmp_path, capsys, command):
    adapter = tmp_path / "no-such-adapter.safetensors"
    out = tmp_path / "out"
    args = [command, "--adapter", str(adapter)]
    args += ["--out", str(out)] if command == "export" else ["--prompt", PROMPT]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(adapter) in err[0], err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- console script


@pytest.mark.slow
def test_console_script_runs(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "spsft_jax.cli", "finetune", "--steps", "3", "--quiet", "--eval", "",
         "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "adapter.safetensors").is_file() and (out / "history.json").is_file()
    summary = json.loads((out / "history.json").read_text())
    assert summary["steps"] == 3 and summary["eval_before"] is None
    assert "wrote" in proc.stdout


@pytest.mark.slow  # every method compiled for the plan
def test_plan_prints_memory_per_method(capsys):
    assert cli.main(["plan", "--seq-len", "16", "--rank", "2", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    by_method = {r["method"]: r for r in records}
    assert {"inference", "dense", "lora", "spsft"} <= set(by_method)
    assert by_method["dense"]["mem_bytes"] > by_method["spsft"]["mem_bytes"] > by_method["inference"]["mem_bytes"]


def test_select_writes_a_selection(tmp_path, capsys):
    out = tmp_path / "sel.safetensors"
    assert cli.main(["select", "--metric", "magnitude", "--rank", "3", "--out", str(out)]) == 0
    chosen, meta = selection_lib.load(out)
    rows = chosen["layers"]["mlp"]["up_proj"]["rows"]
    assert rows.shape[1] == 3 and meta["metric"] == "magnitude"


# --------------------------------------------------------------------------- data options


def test_finetune_epochs_pack_and_summary_line(tmp_path, capsys):
    """--epochs counts packed rows; the summary line before training names the model,
    the trainable parameters and the compiled step's memory."""
    out = tmp_path / "run"
    assert cli.main(["finetune", "--epochs", "0.5", "--pack", "--seq-len", "64", "--max-len", "64",
                     "--eval", "", "--quiet", "--method", "lora", "--rank", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    enc = data.load(MODEL / "train.jsonl", data.load_tokenizer(MODEL), max_len=64)
    rows = data.pack_examples(enc.examples, 64)
    assert len(rows) < len(enc.examples)  # two short examples share a row
    steps = math.ceil(0.5 * (len(rows) // 16))
    summary = json.loads((out / "history.json").read_text())
    assert summary["steps"] == steps and summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    first = lines[0]
    assert str(MODEL) in first and f"lora: {summary['trainable_params']:,} trainable" in first
    assert "step memory" in first and "MiB" in first and f"{steps} steps" in first


def test_generate_chat_without_template_exits_2(capsys):
    assert cli.main(["generate", "--chat", "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no chat template" in err[0] and str(MODEL) in err[0], err


# --------------------------------------------------------------------------- compilation cache


def test_compile_cache_folder_follows_the_environment(tmp_path):
    assert cli.compile_cache_folder({"SPSFT_JAX_COMPILE_CACHE": "off"}) is None
    assert cli.compile_cache_folder({"SPSFT_JAX_COMPILE_CACHE": str(tmp_path)}) == tmp_path
    assert cli.compile_cache_folder({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "spsft-jax" / "xla"


def test_an_unusable_compile_cache_is_named_and_skipped(tmp_path, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    before = jax.config.jax_compilation_cache_dir
    cli._use_compile_cache(taken)
    assert f"compilation cache off ({taken}: is a file" in capsys.readouterr().err
    assert jax.config.jax_compilation_cache_dir == before and taken.read_text() == "mine"


_CACHED_COMPILE = """
import sys, jax, jax.numpy as jnp
from spsft_jax import train
train.use_compilation_cache(sys.argv[1], min_compile_seconds=0)
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
print(float(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.float32(1))))
print(sum(e.endswith("cache_hits") for e in events), sum(e.endswith("cache_misses") for e in events))
"""


def test_a_second_process_loads_the_compiled_program(tmp_path):
    """What one run compiles, the next loads from the folder: same result, no compile."""
    def run():
        proc = subprocess.run([sys.executable, "-c", _CACHED_COMPILE, str(tmp_path / "cache")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        value, counts = proc.stdout.strip().splitlines()[-2:]
        return value, tuple(map(int, counts.split()))

    first_value, (first_hits, first_misses) = run()
    assert first_hits == 0 and first_misses > 0 and any((tmp_path / "cache").iterdir())
    second_value, (second_hits, second_misses) = run()
    assert second_value == first_value and second_hits > 0 and second_misses == 0


def test_remat_choices_are_the_models_policies():
    from spsft_jax import cli, llama

    assert sorted(cli.REMAT_CHOICES) == sorted(llama.REMAT_POLICIES)


def test_update_choices_are_the_training_steps():
    from spsft_jax import cli, train

    assert cli.UPDATE_CHOICES == list(train.UPDATES)
