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
    assert "=True" not in err, err  # the command line's words, not Python's
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
        "1", "2", "history.json", "run.json", "selection.safetensors"]
    assert _cli(capsys, *args, "--steps", "3", "--resume")[0] == 0
    summary = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in summary["history"]] == [1, 2, 3] and summary["steps"] == 3  # the whole run
    code, _, err = _cli(capsys, *args, "--steps", "3", "--resume")
    _assert_user_error(code, err, "has done 3 steps already")
    code, _, err = _cli(capsys, *args, "--steps", "4", "--resume", "--method", "lora")
    _assert_user_error(code, err, "--method lora", "--method spsft")
    code, _, err = _cli(capsys, "finetune", *FAST, "--out", tmp_path / "new", "--resume")
    _assert_user_error(code, err, "--resume")
    assert not (tmp_path / "new").exists()


def test_resume_takes_the_options_it_is_not_given(tmp_path, capsys):
    out = tmp_path / "lora"
    assert _cli(capsys, "finetune", *FAST, "--method", "lora", "--rank", "2", "--lr", "0.003", "--steps", "3",
                "--checkpoint-every", "1", "--out", out)[0] == 0
    first = json.loads((out / "history.json").read_text())["history"]
    shutil.rmtree(out / "checkpoints" / "3")  # as if stopped after step 2
    # Neither --method, --rank nor --steps: the run's own (LoRA rank 2, 3 steps) go on.
    code, printed, _ = _cli(capsys, "finetune", "--quiet", "--eval", "", "--out", out, "--resume")
    assert code == 0, printed
    summary = json.loads((out / "history.json").read_text())
    assert summary["method"] == "lora" and [h["step"] for h in summary["history"]] == [1, 2, 3]
    assert summary["history"][2]["learning_rate"] == first[2]["learning_rate"]  # the run's --lr


def test_checkpoints_survive_a_rerun_until_it_has_its_own(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    assert _cli(capsys, "finetune", *FAST, "--out", out, "--steps", "3", "--checkpoint-every", "1",
                "--keep", "2")[0] == 0
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["2", "3"]  # --keep 2
    before = _tree(out)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    # Reruns with --overwrite that stop before their first checkpoint: nothing of the old run is lost.
    monkeypatch.setattr(train, "step_record", interrupt)
    for checkpointing in (["--checkpoint-every", "1"], []):
        code, _, err = _cli(capsys, "finetune", *FAST, "--out", out, "--steps", "2", "--overwrite", *checkpointing)
        assert code == 130
        assert err.strip().splitlines() == [f"spsft-jax finetune: interrupted; the latest checkpoint is step 3 "
                                            f"in {ckpt} (--resume continues)"]
        assert _tree(out) == before
    monkeypatch.undo()
    # One that saves its first checkpoint replaces them.
    assert _cli(capsys, "finetune", *FAST, "--out", out, "--steps", "2", "--checkpoint-every", "1",
                "--overwrite")[0] == 0
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "2", "history.json", "run.json", "selection.safetensors"]
    assert sorted(os.listdir(out)) == [outputs.MARKER, "adapter.safetensors", "checkpoints", "history.json",
                                       "selection.safetensors"]
    # Without --checkpoint-every, they go (stale) only once the new run's outputs are written.
    assert _cli(capsys, "finetune", *FAST, "--out", out, "--steps", "1", "--overwrite")[0] == 0
    assert not ckpt.exists()


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_finishes_the_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = train.step_record

    def stop_in_step_3(index, *args, **kwargs):
        if index == 2:
            raise KeyboardInterrupt
        return real(index, *args, **kwargs)

    monkeypatch.setattr(train, "step_record", stop_in_step_3)
    code, _, err = _cli(capsys, "finetune", *FAST, "--out", out, "--steps", "4", "--checkpoint-every", "1")
    assert code == 130 and len(err.strip().splitlines()) == 1
    assert "interrupted; the latest checkpoint is step 2" in err
    assert sorted(os.listdir(out)) == [outputs.MARKER, "checkpoints"]  # no adapter, no lock
    monkeypatch.undo()
    assert _cli(capsys, "finetune", *FAST, "--out", out, "--resume")[0] == 0  # its 4 steps
    summary = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4]


def test_a_folder_we_did_not_write_is_never_taken(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "7").write_text("their step 7")
    # Without checkpointing the run writes beside their folder, and never lists it as ours.
    assert _cli(capsys, "finetune", *FAST, "--steps", "1", "--out", out, "--overwrite")[0] == 0
    assert "checkpoints" not in outputs.recorded(out)["run"]
    assert _cli(capsys, "finetune", *FAST, "--steps", "1", "--out", out, "--overwrite")[0] == 0  # a rerun
    assert (out / "checkpoints" / "7").read_text() == "their step 7"
    code, _, err = _cli(capsys, "finetune", *FAST, "--steps", "1", "--out", out, "--resume")
    _assert_user_error(code, err, "did not write (checkpoints)")
    # The library refuses to put a folder of ours in the place of theirs.
    with pytest.raises(ValueError, match="checkpoints/ was not written by spsft-jax"):
        with outputs.output_dir(out, kind="run", overwrite=True) as tmp:
            (tmp / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="checkpoints/ was not written by spsft-jax"):
        outputs.claim_dir(out, ["checkpoints"], kind="run", overwrite=True)
    assert (out / "checkpoints" / "7").read_text() == "their step 7"


def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path, capsys, live_pid):
    out = tmp_path / "run"
    out.mkdir()
    (out / outputs.LOCK).write_text("4194000 1\n")  # a writer that has ended
    assert _cli(capsys, "finetune", *FAST, "--steps", "1", "--out", out)[0] == 0
    assert not (out / outputs.LOCK).exists()
    # A live writer's pid, but a start time not its own: the pid was reused, the lock is stale.
    (out / outputs.LOCK).write_text(f"{live_pid} 1\n")
    assert _cli(capsys, "finetune", *FAST, "--steps", "1", "--out", out)[0] == 0
    with outputs.lock(tmp_path / "new" / "deeper"):
        assert (tmp_path / "new" / "deeper" / outputs.LOCK).is_file()
    assert not (tmp_path / "new").exists()  # the folders made for the lock go with it


def test_examples_without_targets_are_left_out_with_one_warning(tmp_path, capsys):
    long = {"prompt": "What is 1 plus 2 plus 3 plus 4? " * 3, "response": "10!"}
    short = {"prompt": "1+2 ", "response": "3!"}  # BOS, 6 characters and EOS: 8 tokens
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [long, short] * 4))
    code, printed, err = _cli(capsys, "finetune", *FAST, "--data", data, "--max-len", "8", "--truncate", "right",
                              "--steps", "1", "--out", tmp_path / "right")
    assert code == 0, err
    assert "warning: 4 of 8 examples have no loss token (4 cut by --max-len 8); left out" in err
    assert "4 prompt examples" in printed
    # The default truncation cuts the prompt and keeps every response.
    code, printed, err = _cli(capsys, "finetune", *FAST, "--data", data, "--max-len", "8", "--steps", "1",
                              "--out", tmp_path / "left")
    assert code == 0 and "warning" not in err and "8 prompt examples" in printed


def test_a_run_without_loss_tokens_fails(small_model):
    _, cfg, params = small_model
    batch = _batch(cfg)
    batch["labels"] = np.full_like(batch["input_ids"], -100)
    with pytest.raises(ValueError, match="no step saw a loss token in 2 steps"):
        train.finetune(params, _selection(cfg, params), [batch], config=cfg, steps=2)


def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno

    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", **kw: Full(real(fd, mode, **kw)) if mode == "wb"
                        else real(fd, mode, **kw))
    out = tmp_path / "run"
    code, _, err = _cli(capsys, "finetune", *FAST, "--steps", "1", "--out", out)
    _assert_user_error(code, err, f"{out / 'adapter.safetensors'}: No space left on device")
    assert not out.exists() and os.listdir(tmp_path) == []


def test_a_non_finite_adapter_loads_when_allowed(bad_inputs, capsys):
    code, printed, err = _cli(capsys, "generate", "--adapter", bad_inputs / "nan-adapter.safetensors",
                              "--prompt", "1 plus 2 ", "--max-new-tokens", "2", "--allow-nonfinite")
    assert code == 0, err


def test_debug_raises_instead_of_one_line(tmp_path):
    with pytest.raises(cli.UsageError, match="--lr"):
        cli.main(["finetune", "--lr", "-1", "--debug"])
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        cli.main(["finetune", "--data", str(tmp_path / "bad.jsonl"), "--debug"])


# --------------------------------------------------------------------------- bad input, one table


@pytest.fixture(scope="module")
def live_pid():
    """The pid of another live process (a writer that holds a lock)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield child.pid
    child.kill()
    child.wait()


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
    # A run interrupted after 2 of its steps, with rank 2 rows (what a rerun must not lose).
    assert cli.main(["finetune", *FAST, "--rank", "2", "--steps", "2", "--checkpoint-every", "1",
                     "--out", str(root / "ckpt-run")]) == 0
    from spsft_jax import importance

    reversed_rows = jax.tree.map(lambda x: -x, importance.magnitude(cfg, params, targets="all-linear"))
    selection_lib.save(root / "other-rows-sel.safetensors", selection_lib.select(reversed_rows, rank=2), cfg=cfg)
    # Adapters that must not be applied: one holding NaN, and one merged into a model already.
    sel = selection_lib.select({"layers": {"mlp": {"up_proj": jnp.arange(
        float(cfg.intermediate_size))[None].repeat(cfg.num_layers, 0)}}}, rank=2)
    delta = deltas.rows_from_selection(params, sel)
    up = delta["layers"]["mlp"]["up_proj"]
    checkpoint.save_delta(root / "adapter.safetensors", delta, cfg=cfg)
    bad = {"layers": {"mlp": {"up_proj": dataclasses.replace(up, w_f=up.w_f.at[1, 0, 3].set(jnp.nan))}}}
    checkpoint.save_delta(root / "nan-adapter.safetensors", bad, cfg=cfg)
    assert cli.main(["export", "--adapter", str(root / "adapter.safetensors"), "--out", str(root / "merged")]) == 0
    # Data that trains nothing: long prompts whose responses --max-len 8 cuts on the right.
    (root / "long-prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": "What is 1 plus 2 plus 3 plus 4? " * 3, "response": "10!"}) + "\n"
                for _ in range(8)))
    # One record of 17 MiB: far beyond what --max-len 32 could use, refused unread.
    with open(root / "huge-line.jsonl", "w") as f:
        f.write('{"prompt": "' + "1 plus 2 " * (17 * 2**20 // 9) + '", "response": "3!"}\n')
    os.mkfifo(root / "a-pipe")
    (root / "model.gguf").write_bytes(b"GGUF")
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
        # A rerun never loses a run's checkpoints, and never takes a folder it did not write.
        "rerun over checkpoints": ([m, *FAST, "--out", "{in}/ckpt-run", "--steps", "3"],
                                   ["{in}/ckpt-run holds checkpoints up to step 2", "--resume", "--overwrite"]),
        "their checkpoints folder": ([m, *FAST, "--out", "{work}/mine", "--overwrite", "--checkpoint-every", "1"],
                                     ["{work}/mine", "checkpoints/", "not written by spsft-jax"]),
        "another writer": ([m, *FAST, "--out", "{work}/busy"], ["{work}/busy", "another spsft-jax process"]),
        "select beside another writer": (["select", "--metric", "magnitude", "--out", "{work}/busy-sel.safetensors"],
                                         ["another spsft-jax process"]),
        # A run that would train nothing.
        "max-len cuts every response": ([m, *FAST, "--data", "{in}/long-prompts.jsonl", "--max-len", "8",
                                         "--truncate", "right", "--out", "{work}/new"],
                                        ["--max-len 8 cut every response"]),
        "tokentune picks no loss token": ([m, *FAST, "--tokentune", "0.0001", "--out", "{work}/new"],
                                          ["--tokentune 0.0001 picks no loss token in 512 examples"]),
        # Adapters: not finite, given twice, merged already.
        "adapter holds nan": (["generate", "--adapter", "{in}/nan-adapter.safetensors", "--prompt", "x"],
                              ["layers/mlp/up_proj/w_f", "NaN", "--allow-nonfinite"]),
        "adapter twice": (["generate", "--adapter", "{in}/adapter.safetensors", "--adapter",
                           "{in}/other-rows.safetensors", "--prompt", "x"], ["--adapter given 2 times"]),
        "export adapter twice": (["export", "--adapter", "{in}/adapter.safetensors", "--adapter",
                                  "{in}/adapter.safetensors", "--out", "{work}/new"], ["--adapter given 2 times"]),
        "adapter merged already": (["generate", "--model", "{in}/merged", "--adapter", "{in}/adapter.safetensors",
                                    "--prompt", "x"], ["already merged into {in}/merged"]),
        "export adapter merged already": (["export", "--model", "{in}/merged", "--adapter",
                                           "{in}/adapter.safetensors", "--out", "{work}/new"],
                                          ["already merged"]),
        # Options never silently ignored.
        "resume another rank": ([m, *FAST, "--out", "{in}/ckpt-run", "--resume", "--rank", "4", "--steps", "3"],
                                ["--rank 4", "--rank 2"]),
        "resume another method": ([m, *FAST, "--out", "{in}/ckpt-run", "--resume", "--method", "lora"],
                                  ["--method lora", "--method spsft"]),
        "resume with tokentune": ([m, *FAST, "--out", "{in}/ckpt-run", "--resume", "--tokentune", "0.5"],
                                  ["--tokentune 0.5", "--tokentune"]),
        "resume other targets": ([m, *FAST, "--out", "{in}/ckpt-run", "--resume", "--targets", "mlp"],
                                 ["--targets mlp", "--targets all-linear"]),
        "resume other rows": ([m, *FAST, "--out", "{in}/ckpt-run", "--resume", "--selection",
                               "{in}/other-rows-sel.safetensors"], ["{in}/other-rows-sel.safetensors",
                                                                    "holds other rows"]),
        "resume with a ratio": ([m, *FAST, "--out", "{in}/ckpt-run", "--resume", "--ratio", "0.5"],
                                ["--ratio 0.5", "no --ratio"]),
        "resume done already": ([m, *FAST, "--out", "{in}/ckpt-run", "--resume", "--steps", "2"],
                                ["has done 2 steps already", "--steps 2"]),
        "resume done, steps recorded": ([m, *FAST, "--out", "{in}/ckpt-run", "--resume"],
                                        ["has done 2 steps already"]),
        "max-len above context": ([m, "--max-len", "4096", "--out", "{work}/new"],
                                  ["--max-len 4096", "context of 64 tokens"]),
        "seq-len above context": ([m, "--seq-len", "65", "--out", "{work}/new"], ["--seq-len 65"]),
        "generate past the context": (["generate", "--prompt", "1 plus 2 " * 30], ["prompt 1", "context of 64"]),
        "generate too many tokens": (["generate", "--prompt", "x", "--max-new-tokens", "64"],
                                     ["--max-new-tokens 64", "context of 64"]),
        # Small things.
        "keep zero": ([m, "--keep", "0"], ["--keep"]),
        "quantize blocks do not fit": ([m, "--quantize", "nf4", "--out", "{work}/new"], ["(256, 96)", "nf4"]),
        "data record far too long": ([m, "--data", "{in}/huge-line.jsonl", "--max-len", "32"],
                                     ["{in}/huge-line.jsonl:1", "16 MiB"]),
        "data is a pipe": ([m, "--data", "{in}/a-pipe"], ["{in}/a-pipe", "named pipe"]),
        "data is a device": ([m, "--data", "/dev/null"], ["/dev/null", "character device"]),
        "model is a broken gguf": ([m, "--model", "{in}/model.gguf"], ["{in}/model.gguf", "not a readable GGUF file"]),
    }


TABLE = _table()


@pytest.mark.parametrize("case", list(TABLE))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_inputs, live_pid, tmp_path, capsys,
                                                         monkeypatch):
    work = tmp_path / "work"
    (work / "theirs").mkdir(parents=True)
    (work / "theirs" / "keep.me").write_text("keep")
    (work / "file.txt").write_text("a file")
    (work / "mine" / "checkpoints").mkdir(parents=True)  # a user's folder, named as ours are
    (work / "mine" / "checkpoints" / "7").write_text("their step 7")
    (work / "busy").mkdir()  # another process is writing here
    for lock in (work / "busy" / outputs.LOCK, work / f".busy-sel.safetensors{outputs.LOCK}"):
        lock.write_text(f"{live_pid} {outputs._start_time(live_pid)}\n")
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
