"""Nothing lost, nothing silently wrong: outputs never delete what we did not write,
adapters, selections and checkpoints are checked against the model they meet, a step
that is not finite is not applied, and every user error is one line and exit 2."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from spsft_jax import assets, checkpoint, cli, interop, llama, outputs, train
from spsft_jax import delta as deltas
from spsft_jax import selection as selection_lib

MODEL = assets.default_asset()
SMALL = llama.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=4)
FAST = ["--quiet", "--eval", "", "--metric", "magnitude", "--batch-size", "4", "--seq-len", "16"]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (what 'nothing changed' compares)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} | \
        {str(p.relative_to(root)) + "/": b"" for p in root.rglob("*") if p.is_dir()}


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_user_error(code, err, *named):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, lines
    assert "Traceback" not in err
    for name in named:
        assert str(name) in lines[0], (name, lines[0])


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A random 2-layer model of SMALL saved as an HF folder: (folder, cfg, params)."""
    folder = tmp_path_factory.mktemp("small") / "model"
    params = llama.init_params(SMALL, jax.random.key(0), std=0.2)
    interop.save_hf(folder, SMALL, params)
    return folder, SMALL, params


@pytest.fixture(scope="module")
def embedded():
    return interop.load_hf(MODEL)


def _batch(cfg, seed=0, batch=3, seq=10):
    ids = (np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, 1)) + np.arange(seq))
    return {"input_ids": (ids % cfg.vocab_size).astype(np.int32)}


def _selection(cfg, params, rank=2):
    from spsft_jax import importance

    return selection_lib.select(importance.magnitude(cfg, params, targets="mlp"), rank=rank)


# --------------------------------------------------------------------------- outputs


def test_output_dir_new_folder_is_marked_and_renamed_in(tmp_path):
    with outputs.output_dir(tmp_path / "out", kind="run") as tmp:
        (tmp / "a.txt").write_text("a")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp left beside it
    assert outputs.recorded(tmp_path / "out") == {"run": ["a.txt"]}


def test_output_dir_refuses_foreign_and_overwrite_replaces_only_ours(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "a.txt").write_text("someone's a.txt")
    (tmp_path / "beside.txt").write_text("beside")
    with pytest.raises(ValueError, match="a.txt and 1 more"):
        with outputs.output_dir(out, kind="run") as tmp:
            (tmp / "a.txt").write_text("ours")
    assert (out / "a.txt").read_text() == "someone's a.txt"
    with outputs.output_dir(out, kind="run", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("ours")
    assert (out / "thesis.tex").read_text() == "years of work"
    assert (out / "a.txt").read_text() == "ours"
    assert (tmp_path / "beside.txt").read_text() == "beside"
    assert sorted(os.listdir(tmp_path)) == ["beside.txt", "out"]
    # A second write replaces our entries and removes our stale ones, nothing else.
    with outputs.output_dir(out, kind="run", overwrite=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(os.listdir(out)) == [outputs.MARKER, "b.txt", "thesis.tex"]


def test_rerun_removes_only_our_stale_entries_and_other_kinds_are_foreign(tmp_path):
    out = tmp_path / "out"
    with outputs.output_dir(out, kind="run") as tmp:
        (tmp / "adapter.safetensors").write_text("1")
        (tmp / "selection.safetensors").write_text("1")
    (out / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match="notes.md"):  # a file we did not write
        outputs.check_dir(out, kind="run")
    with outputs.output_dir(out, kind="run", overwrite=True) as tmp:
        (tmp / "adapter.safetensors").write_text("2")
    assert sorted(os.listdir(out)) == [outputs.MARKER, "adapter.safetensors", "notes.md"]
    # An export into a run folder would replace nothing of the run's, but is refused by default.
    with pytest.raises(ValueError, match="adapter.safetensors"):
        outputs.check_dir(out, kind="hf", overwrite=False)


def test_failed_write_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    with outputs.output_dir(out, kind="run") as tmp:
        (tmp / "a.txt").write_text("1")
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError):
        with outputs.output_dir(out, kind="run") as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError("disk full")
    assert _tree(tmp_path) == before


def test_leftover_temps_of_dead_processes_are_cleaned(tmp_path):
    dead, live = 2**22 + 12345, os.getppid()
    (tmp_path / f".out.{dead}.x1.tmp").mkdir()
    (tmp_path / f".out.{dead}.x2.old").write_text("")
    (tmp_path / f".out.{dead}.old").mkdir()  # what earlier versions left on a crash
    (tmp_path / f".out.{live}.x3.tmp").mkdir()  # a writer still running
    (tmp_path / ".other.1.x.tmp").mkdir()  # not ours to judge
    with outputs.output_dir(tmp_path / "out", kind="run") as tmp:
        (tmp / "a").write_text("")
    assert sorted(os.listdir(tmp_path)) == sorted([f".out.{live}.x3.tmp", ".other.1.x.tmp", "out"])


def test_output_file_rules(tmp_path, small_model):
    _, cfg, params = small_model
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        outputs.check_file(tmp_path / "folder")
    (tmp_path / "foreign.safetensors").write_text("not ours")
    sel = _selection(cfg, params)
    with pytest.raises(ValueError, match="not written by spsft-jax"):
        selection_lib.save(tmp_path / "foreign.safetensors", sel)
    assert (tmp_path / "foreign.safetensors").read_text() == "not ours"
    selection_lib.save(tmp_path / "foreign.safetensors", sel, overwrite=True)
    selection_lib.save(tmp_path / "foreign.safetensors", sel)  # ours now: replaced freely
    delta = deltas.rows_from_selection(params, sel)
    (tmp_path / "x.safetensors").write_text("x")
    with pytest.raises(ValueError, match="not written by spsft-jax"):
        checkpoint.save_delta(tmp_path / "x.safetensors", delta)
    assert (tmp_path / "x.safetensors").read_text() == "x"
    with pytest.raises(ValueError, match="is a folder"):
        checkpoint.save_delta(tmp_path / "folder", delta)


def test_save_hf_refuses_weights_of_another_layout_left_beside(tmp_path, small_model):
    _, cfg, params = small_model
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"old weights")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        interop.save_hf(out, cfg, params, overwrite=True)
    assert sorted(os.listdir(out)) == ["pytorch_model.bin"]


# --------------------------------------------------------------------------- compatibility


def test_merge_refuses_what_it_would_clip_or_drop(small_model):
    _, cfg, params = small_model
    good = deltas.rows_from_selection(params, _selection(cfg, params))
    up = good["layers"]["mlp"]["up_proj"]
    cases = {
        "rows: index 32 is out of range": dataclasses.replace(
            up, rows=up.rows.at[0, -1].set(cfg.intermediate_size)),
        "rows: index -1 is out of range": dataclasses.replace(up, rows=up.rows.at[1, 0].set(-1)),
        "w_f: shape (2, 2, 7)": dataclasses.replace(up, w_f=jnp.zeros(up.w_f.shape[:-1] + (7,))),
        "rows: shape (1, 2)": dataclasses.replace(up, rows=up.rows[:1], w_f=up.w_f[:1]),
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=r"layers/mlp/up_proj/" + message.replace("(", r"\(")
                           .replace(")", r"\)")) as err:
            deltas.merge(params, {"layers": {"mlp": {"up_proj": bad}}})
        assert "\n" not in str(err.value)
    lora = deltas.lora(params, [("layers", "self_attn", "q_proj")], jax.random.key(0), rank=2)
    q = lora["layers"]["self_attn"]["q_proj"]
    with pytest.raises(ValueError, match="q_proj/b"):
        deltas.merge(params, {"layers": {"self_attn": {"q_proj": dataclasses.replace(q, b=q.b[:, :8])}}})


def test_adapter_for_another_model_is_refused_by_every_consumer(tmp_path, small_model):
    _, cfg, params = small_model
    # The same architecture with 8 query rows instead of 16 (head_dim 2).
    other = dataclasses.replace(cfg, head_dim=2)
    other_params = llama.init_params(other, jax.random.key(1))
    chosen = selection_lib.select(
        {"layers": {"self_attn": {"q_proj": jnp.arange(16.0)[None].repeat(2, 0)}}}, rank=4)
    delta = deltas.rows_from_selection(params, chosen)  # rows 12..15 of 16
    delta = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, delta)
    file = tmp_path / "adapter.safetensors"
    checkpoint.save_delta(file, delta, cfg=cfg)
    _, meta = checkpoint.load_delta(file, cfg=cfg, params=params)  # fits its own model
    with pytest.raises(ValueError, match="head_dim: made for 4, this one has 2"):
        checkpoint.load_delta(file, cfg=other)
    # Without the record (an older file), the tensors themselves are checked.
    bare = tmp_path / "bare.safetensors"
    checkpoint.save_delta(bare, delta)
    with pytest.raises(ValueError, match="q_proj/rows: index 15 is out of range"):
        checkpoint.load_delta(bare, cfg=other)
    loaded, _ = checkpoint.load_delta(bare)
    with pytest.raises(ValueError, match="q_proj"):
        deltas.merge(other_params, loaded)
    with pytest.raises(ValueError, match="q_proj"):
        interop.save_peft_adapter(tmp_path / "peft", other, loaded)
    # A 2-layer adapter onto a 1-layer model: refused, not cut to one layer.
    one_layer = dataclasses.replace(cfg, num_layers=1)
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        interop.save_peft_adapter(tmp_path / "peft", one_layer, loaded)
    with pytest.raises(ValueError, match="num_layers: made for 2, this one has 1"):
        checkpoint.load_delta(file, cfg=one_layer)
    # Merged weights of another shape are not written under this config.
    with pytest.raises(ValueError, match=r"params: layers/self_attn/\w_proj/weight has shape"):
        interop.save_hf(tmp_path / "hf", cfg, other_params)
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "bare.safetensors"]


def test_selection_records_and_checks_its_model(tmp_path, small_model):
    _, cfg, params = small_model
    file = tmp_path / "sel.safetensors"
    selection_lib.save(file, _selection(cfg, params), cfg=cfg)
    selection_lib.load(file, cfg=cfg)
    with pytest.raises(ValueError, match="hidden_size"):
        selection_lib.load(file, cfg=dataclasses.replace(cfg, hidden_size=24, head_dim=6))
    bare = tmp_path / "bare.safetensors"  # no record: the rows themselves are checked
    selection_lib.save(bare, _selection(cfg, params))
    with pytest.raises(ValueError, match="out of range"):
        selection_lib.load(bare, cfg=dataclasses.replace(cfg, intermediate_size=8))


# --------------------------------------------------------------------------- training faults


def test_a_step_that_overflows_is_not_applied(small_model):
    _, cfg, params = small_model
    trainable, frozen = train.prepare(params, _selection(cfg, params))
    tc = train.TrainConfig(steps=2, learning_rate=1e30, warmup=0, schedule="constant")
    optimizer = train.make_optimizer(tc)
    step = train.make_train_step(cfg, tc, optimizer)
    state = optimizer.init(trainable)
    before = jax.tree.map(np.array, trainable)
    batch = {k: v[None] for k, v in train.normalize_batch(_batch(cfg)).items()}
    after, _, metrics = step(trainable, state, frozen, batch, jax.random.key(0))
    assert not bool(metrics["finite"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after), before)


def test_finetune_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, small_model):
    _, cfg, params = small_model
    sel = _selection(cfg, params)
    ckpt = tmp_path / "ckpt"
    # Warmup: step 1 runs at learning rate 0, step 2 at 5e29, whose update overflows.
    with pytest.raises(FloatingPointError, match="step 2: .* not applied.*latest checkpoint is step 1"):
        train.finetune(params, sel, [_batch(cfg)], config=cfg, steps=4, learning_rate=1e30,
                       warmup=2, checkpoint_dir=str(ckpt), checkpoint_every=1)
    assert sorted(p.name for p in ckpt.iterdir() if p.name[0].isdigit()) == ["1"]
    # A fair learning rate resumes from step 1 and finishes.
    result = train.finetune(params, sel, [_batch(cfg)], config=cfg, steps=3, learning_rate=1e-2,
                            warmup=2, checkpoint_dir=str(ckpt), checkpoint_every=1)
    assert [h["step"] for h in result.history] == [2, 3]
    assert all(np.isfinite(h["loss"]) for h in result.history)


def test_resume_refuses_another_run(tmp_path, small_model):
    _, cfg, params = small_model
    sel = _selection(cfg, params)
    data = [_batch(cfg)]
    ckpt = str(tmp_path / "ckpt")
    train.finetune(params, sel, data, config=cfg, steps=1, checkpoint_dir=ckpt)
    from spsft_jax import importance

    scores = importance.magnitude(cfg, params, targets="mlp")
    other_rows = selection_lib.select(jax.tree.map(lambda x: -x, scores), rank=2)  # same shapes
    cases = [
        (dict(selection=other_rows), "selection: made for"),
        (dict(method="lora", rank=2), "method: made for 'spsft'"),
    ]
    for change, message in cases:
        kwargs = {"selection": sel, **change}
        with pytest.raises(ValueError, match=message):
            train.finetune(params, kwargs.pop("selection"), data, config=cfg, steps=2,
                           checkpoint_dir=ckpt, **kwargs)
    lora_ckpt = str(tmp_path / "lora")
    train.finetune(params, None, data, config=cfg, steps=1, method="lora", rank=2, checkpoint_dir=lora_ckpt)
    with pytest.raises(ValueError, match="rank: made for 2, this one has 3"):
        train.finetune(params, None, data, config=cfg, steps=2, method="lora", rank=3,
                       checkpoint_dir=lora_ckpt)
    wider = dataclasses.replace(cfg, vocab_size=64)
    wider_params = llama.init_params(wider, jax.random.key(0))
    with pytest.raises(ValueError, match="model.vocab_size: made for 48, this one has 64"):
        train.finetune(wider_params, sel, data, config=wider, steps=2, checkpoint_dir=ckpt)


# --------------------------------------------------------------------------- loading


def test_non_finite_weights_are_refused_unless_allowed(tmp_path, small_model):
    folder, cfg, _ = small_model
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 2] = np.nan
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="'model.layers.1.mlp.down_proj.weight' holds NaN or Inf"):
        interop.load_hf(bad)
    _, params = interop.load_hf(bad, allow_nonfinite=True)
    assert np.isnan(np.asarray(params["layers"]["mlp"]["down_proj"]["weight"][1, 3, 2]))


def test_truncated_safetensors_names_the_file(tmp_path, small_model):
    folder, _, _ = small_model
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    file = bad / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable safetensors file") as err:
        interop.load_hf(bad)
    assert str(file) in str(err.value)


# --------------------------------------------------------------------------- the command line


def test_cli_never_deletes_what_it_did_not_write(tmp_path, capsys, embedded):
    work = tmp_path / "work"
    out = work / "run"
    out.mkdir(parents=True)
    (work / "beside.txt").write_text("beside")
    (out / "inside.txt").write_text("inside")
    sentinels = {work / "beside.txt": "beside", out / "inside.txt": "inside"}

    def sentinels_survive():
        assert {p: p.read_text() for p in sentinels} == sentinels

    code, _, err = _cli(capsys, "finetune", "--steps", "2", *FAST, "--out", out)
    _assert_user_error(code, err, out, "inside.txt")
    sentinels_survive()
    assert sorted(os.listdir(out)) == ["inside.txt"]

    assert _cli(capsys, "finetune", "--steps", "2", *FAST, "--out", out, "--overwrite")[0] == 0
    sentinels_survive()
    assert (out / "selection.safetensors").is_file()
    # A LoRA rerun into the same folder: the SPSFT selection does not stay behind.
    assert _cli(capsys, "finetune", "--steps", "2", *FAST, "--method", "lora", "--rank", "2",
                "--out", out, "--overwrite")[0] == 0
    sentinels_survive()
    assert sorted(os.listdir(out)) == [outputs.MARKER, "adapter.safetensors", "history.json", "inside.txt"]
    adapter = out / "adapter.safetensors"

    # Export onto the run folder or onto the model itself: refused, nothing changes.
    before = _tree(work)
    code, _, err = _cli(capsys, "export", "--adapter", adapter, "--out", out)
    _assert_user_error(code, err, out)
    model = work / "model"
    shutil.copytree(MODEL, model)
    before = _tree(work)
    code, _, err = _cli(capsys, "export", "--model", model, "--adapter", adapter, "--out", model)
    _assert_user_error(code, err, model)
    assert _tree(work) == before
    # Export into a fresh folder, then generate with the adapter.
    assert _cli(capsys, "export", "--adapter", adapter, "--out", work / "merged")[0] == 0
    cfg, merged = interop.load_hf(work / "merged")
    _, params = embedded
    delta, _ = checkpoint.load_delta(adapter)
    np.testing.assert_allclose(merged["layers"]["self_attn"]["q_proj"]["weight"],
                               deltas.merge(params, delta)["layers"]["self_attn"]["q_proj"]["weight"])
    code, printed, _ = _cli(capsys, "generate", "--adapter", adapter, "--prompt", "1 plus 2 ",
                            "--max-new-tokens", "2")
    assert code == 0 and printed.startswith("1 plus 2 ")
    sentinels_survive()


def test_cli_checkpoints_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", *FAST, "--out", out, "--checkpoint-every", "1"]
    assert _cli(capsys, *args, "--steps", "2")[0] == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "1", "2", "run.json", "selection.safetensors"]
    assert _cli(capsys, *args, "--steps", "3", "--resume")[0] == 0
    history = json.loads((out / "history.json").read_text())["history"]
    assert [h["step"] for h in history] == [3]
    code, _, err = _cli(capsys, *args, "--steps", "3", "--resume")
    _assert_user_error(code, err, "has done its 3 steps")
    code, _, err = _cli(capsys, *args, "--steps", "4", "--resume", "--method", "lora")
    _assert_user_error(code, err, "method")
    code, _, err = _cli(capsys, "finetune", *FAST, "--out", tmp_path / "new", "--resume")
    _assert_user_error(code, err, "--resume")
    assert not (tmp_path / "new").exists()
    # A fresh run into the folder starts afresh: the old checkpoints are ours to replace.
    assert _cli(capsys, "finetune", *FAST, "--out", out, "--steps", "1")[0] == 0
    assert not (out / "checkpoints").exists()


def test_debug_raises_instead_of_one_line(tmp_path):
    with pytest.raises(cli.UsageError, match="--lr"):
        cli.main(["finetune", "--lr", "-1", "--debug"])
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        cli.main(["finetune", "--data", str(tmp_path / "bad.jsonl"), "--debug"])


# --------------------------------------------------------------------------- bad input, one table


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files for the bad-input table, made once, outside the folder each case must not touch."""
    root = tmp_path_factory.mktemp("inputs")
    good = '{"prompt": "a", "response": "b"}\n'
    (root / "latin1.jsonl").write_bytes(good.encode() + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    (root / "number.jsonl").write_text(good + '{"prompt": 3, "response": "b"}\n')
    (root / "null.jsonl").write_text(good + good + '{"text": null}\n')
    (root / "broken.jsonl").write_text(good + "{oops\n")
    (root / "a-folder").mkdir()
    (root / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    nan_model = root / "nan-model"
    shutil.copytree(MODEL, nan_model)
    tensors = load_file(nan_model / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name][0, 0] = np.inf
    save_file(tensors, nan_model / "model.safetensors", metadata={"format": "pt"})
    cut_model = root / "cut-model"
    shutil.copytree(MODEL, cut_model)
    weights = cut_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    cfg, params = interop.load_hf(MODEL)
    other = dataclasses.replace(cfg, intermediate_size=cfg.intermediate_size * 2)
    other_params = llama.init_params(other, jax.random.key(0))
    wide = selection_lib.select({"layers": {"mlp": {"up_proj": jnp.arange(
        float(other.intermediate_size))[None].repeat(cfg.num_layers, 0)}}}, rank=2)
    checkpoint.save_delta(root / "other-model.safetensors",
                          deltas.rows_from_selection(other_params, wide), cfg=other)
    checkpoint.save_delta(root / "other-rows.safetensors", deltas.rows_from_selection(other_params, wide))
    return root


def _table():
    m = "finetune"
    return {
        "lr negative": ([m, "--lr", "-1"], ["--lr"]),
        "lr nan": ([m, "--lr", "nan"], ["--lr"]),
        "lr inf": ([m, "--lr", "inf"], ["--lr"]),
        "lr zero": ([m, "--lr", "0"], ["--lr"]),
        "lr not a number": ([m, "--lr", "fast"], ["--lr"]),
        "tokentune zero": ([m, "--tokentune", "0"], ["--tokentune"]),
        "tokentune 1.5": ([m, "--tokentune", "1.5"], ["--tokentune"]),
        "tokentune negative": ([m, "--tokentune", "-2"], ["--tokentune"]),
        "steps zero": ([m, "--steps", "0"], ["--steps"]),
        "steps negative": ([m, "--steps", "-3"], ["--steps"]),
        "steps not an int": ([m, "--steps", "1.5"], ["--steps"]),
        "batch size zero": ([m, "--batch-size", "0"], ["--batch-size"]),
        "rank zero": ([m, "--rank", "0"], ["--rank"]),
        "seq len zero": ([m, "--seq-len", "0"], ["--seq-len"]),
        "grad accum zero": ([m, "--grad-accum", "0"], ["--grad-accum"]),
        "ratio zero": ([m, "--ratio", "0"], ["--ratio"]),
        "ratio above one": ([m, "--ratio", "1.5"], ["--ratio"]),
        "warmup negative": ([m, "--warmup", "-1"], ["--warmup"]),
        "weight decay nan": ([m, "--weight-decay", "nan"], ["--weight-decay"]),
        "checkpoint every zero": ([m, "--checkpoint-every", "0"], ["--checkpoint-every"]),
        "unknown option": ([m, "--learning-rate", "1"], ["--learning-rate"]),
        "unknown method": ([m, "--method", "qlora"], ["qlora"]),
        "data is a folder": ([m, "--data", "{in}/a-folder"], ["{in}/a-folder"]),
        "data missing": ([m, "--data", "{in}/nope.jsonl"], ["{in}/nope.jsonl"]),
        "data not utf-8": ([m, "--data", "{in}/latin1.jsonl"], ["{in}/latin1.jsonl:2"]),
        "data number field": ([m, "--data", "{in}/number.jsonl"], ["{in}/number.jsonl:2", "prompt"]),
        "data null field": ([m, "--data", "{in}/null.jsonl"], ["{in}/null.jsonl:3", "text"]),
        "data bad json": ([m, "--data", "{in}/broken.jsonl"], ["{in}/broken.jsonl:2"]),
        "eval not utf-8": ([m, "--eval", "{in}/latin1.jsonl"], ["{in}/latin1.jsonl:2"]),
        "out is a file": ([m, "--out", "{work}/file.txt"], ["{work}/file.txt"]),
        "out holds other files": ([m, "--out", "{work}/theirs"], ["{work}/theirs", "keep.me"]),
        "out under a file": ([m, "--out", "{work}/file.txt/run"], ["{work}/file.txt"]),
        "resume with nothing": ([m, "--resume", "--out", "{work}/new"], ["--resume"]),
        "model missing": ([m, "--model", "{work}/no-model", "--out", "{work}/new"], ["{work}/no-model"]),
        "model with inf": ([m, "--model", "{in}/nan-model", "--out", "{work}/new"],
                           ["model.layers.0.mlp.up_proj.weight"]),
        "model truncated": (["generate", "--model", "{in}/cut-model", "--prompt", "x"],
                            ["{in}/cut-model/model.safetensors"]),
        "select out is a folder": (["select", "--out", "{work}/theirs"], ["{work}/theirs"]),
        "select out is foreign": (["select", "--out", "{work}/file.txt"], ["{work}/file.txt"]),
        "export adapter truncated": (["export", "--adapter", "{in}/truncated.safetensors",
                                      "--out", "{work}/new"], ["{in}/truncated.safetensors"]),
        "export adapter is a folder": (["export", "--adapter", "{in}/a-folder", "--out", "{work}/new"],
                                       ["{in}/a-folder"]),
        "export adapter for another model": (["export", "--adapter", "{in}/other-model.safetensors",
                                              "--out", "{work}/new"], ["intermediate_size"]),
        "export rows out of range": (["export", "--adapter", "{in}/other-rows.safetensors",
                                      "--out", "{work}/new", "--format", "peft"], ["up_proj"]),
        "export out is a file": (["export", "--adapter", "{in}/other-rows.safetensors",
                                  "--out", "{work}/file.txt"], ["{work}/file.txt"]),
        "generate adapter for another model": (["generate", "--adapter", "{in}/other-model.safetensors",
                                                "--prompt", "x"], ["intermediate_size"]),
        "generate no tokens": (["generate", "--prompt", "x", "--max-new-tokens", "0"], ["--max-new-tokens"]),
        "no such command": (["frobnicate"], ["frobnicate"]),
    }


TABLE = _table()


@pytest.mark.parametrize("case", list(TABLE))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_inputs, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    (work / "theirs").mkdir(parents=True)
    (work / "theirs" / "keep.me").write_text("keep")
    (work / "file.txt").write_text("a file")
    monkeypatch.chdir(work)  # the default --out (runs/finetune) lands here if a case forgets one
    args, named = TABLE[case]
    fill = lambda s: s.replace("{in}", str(bad_inputs)).replace("{work}", str(work))  # noqa: E731
    before, inputs_before = _tree(work), _tree(bad_inputs)
    code, out, err = _cli(capsys, *map(fill, args))
    _assert_user_error(code, err, *map(fill, named))
    assert _tree(work) == before and _tree(bad_inputs) == inputs_before


def test_unwritable_out_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(outputs.os, "access",
                        lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    for args in (["finetune", "--out", locked / "run"], ["finetune", "--out", locked],
                 ["select", "--out", locked / "sel.safetensors"]):
        code, _, err = _cli(capsys, *args, "--model", tmp_path / "no-model-needed")
        _assert_user_error(code, err, locked, "not writable")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("value, parsed", [("0.25", 0.25), ("1", 1.0), ("2", 2), ("64", 64)])
def test_tokentune_takes_a_fraction_or_a_count(value, parsed):
    args = cli.parser().parse_args(["finetune", "--tokentune", value])
    cli._check_options(args)
    assert args.tokentune == parsed and type(args.tokentune) is type(parsed)
