"""Row selection from scores: top-r, ratio and global budgets, padding, save/load."""
import re

import jax
import numpy as np
import pytest

from spsft_jax import delta, llama, selection
from spsft_jax.trees import leaf_paths, nest

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                        num_heads=4, num_kv_heads=2, head_dim=8)
PATHS = llama.module_paths("all-linear")
SHAPES = CFG.linear_shapes()


def _scores(seed=0, paths=PATHS):
    rng = np.random.default_rng(seed)
    return nest({p: rng.random((CFG.num_layers, SHAPES[p[-1]][0])).astype(np.float32)
                            for p in paths})


def _leaf(tree, path):
    return llama.subtree(tree, *path)


def _total_params(paths=PATHS):
    return sum(CFG.num_layers * SHAPES[p[-1]][0] * SHAPES[p[-1]][1] for p in paths)


def test_top_rank_rows_per_layer_match_numpy():
    scores = _scores()
    picked = selection.select(scores, rank=5)
    for path in PATHS:
        entry = _leaf(picked, path)
        assert set(entry) == {"rows"} and entry["rows"].dtype == np.int32
        expected = np.sort(np.argsort(-_leaf(scores, path), axis=-1)[:, :5], axis=-1)
        np.testing.assert_array_equal(entry["rows"], expected)
    assert selection.num_selected_params(picked, CFG) == sum(
        CFG.num_layers * 5 * SHAPES[p[-1]][1] for p in PATHS)


def test_ties_go_to_the_lower_row_index():
    scores = {"layers": {"mlp": {"up_proj": np.array([[1.0, 3, 3, 2, 3, 3], [0, 0, 0, 0, 0, 0]])}}}
    rows = selection.select(scores, rank=3)["layers"]["mlp"]["up_proj"]["rows"]
    np.testing.assert_array_equal(rows, [[1, 2, 4], [0, 1, 2]])
    # Across modules in global scope: the earlier module path wins a tie.
    tied = {"layers": {"mlp": {"up_proj": np.ones((1, 4)), "gate_proj": np.ones((1, 4))}}}
    picked = selection.select(tied, rank=1, scope="global")
    assert set(picked["layers"]["mlp"]) == {"gate_proj"}
    np.testing.assert_array_equal(picked["layers"]["mlp"]["gate_proj"]["rows"], [[0, 1]])


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5])
def test_ratio_per_layer_trains_that_fraction(ratio):
    picked = selection.select(_scores(1), ratio=ratio)
    target = ratio * _total_params()
    # Every module keeps round(ratio * d_out) rows in every layer: off by at most half a
    # row of each module in each layer.
    slack = sum(CFG.num_layers * SHAPES[p[-1]][1] / 2 for p in PATHS)
    assert abs(selection.num_selected_params(picked, CFG) - target) <= slack
    for path in PATHS:
        r = _leaf(picked, path)["rows"].shape[1]
        assert r == int(np.floor(ratio * SHAPES[path[-1]][0] + 0.5))


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.3])
def test_global_ratio_is_within_one_row_of_the_budget(ratio):
    picked = selection.select(_scores(2), ratio=ratio, scope="global", cfg=CFG)
    biggest_row = max(d_in for _, d_in in SHAPES.values())
    assert abs(selection.num_selected_params(picked, CFG) - ratio * _total_params()) <= biggest_row


def _real_rows(entry):
    mask = entry.get("mask", np.ones(entry["rows"].shape, bool))
    return [set(r[m].tolist()) for r, m in zip(entry["rows"], mask)]


def test_global_scope_ranks_all_layers_together_and_pads_with_a_mask():
    scores = _scores(3, [("layers", "mlp", "up_proj"), ("layers", "mlp", "down_proj")])
    scores["layers"]["mlp"]["up_proj"][0] += 1.0  # layer 0 of up_proj outranks everything
    picked = selection.select(scores, rank=6, scope="global")  # no cfg: the budget counts rows

    # Reference: the 6 * 3 layers * 2 modules best rows of all, by score.
    flat = [(s, path, layer, row) for path, module_scores in leaf_paths(scores)
            for layer, layer_scores in enumerate(module_scores) for row, s in enumerate(layer_scores)]
    flat.sort(key=lambda item: -item[0])
    expected = {(path, layer, row) for _, path, layer, row in flat[:6 * 3 * 2]}
    got = {(path, layer, row) for path, entry in selection.entries(picked)
           for layer, rows in enumerate(_real_rows(entry)) for row in rows}
    assert got == expected

    up = picked["layers"]["mlp"]["up_proj"]
    counts = up["mask"].sum(-1)
    assert counts[0] > counts[1] and counts[0] > counts[2]  # different r per layer
    assert up["rows"].shape == (3, counts.max()) and up["rows"].dtype == np.int32
    for rows, mask in zip(up["rows"], up["mask"]):
        real = rows[mask]
        assert np.all(mask[:len(real)]) and not np.any(mask[len(real):])  # real rows first
        assert np.all(np.diff(rows) >= 0)  # ascending, padding repeats the last real row
        assert np.all(rows[len(real):] == (real[-1] if len(real) else 0))


def test_global_rank_with_cfg_spends_the_per_layer_parameter_budget():
    scores = _scores(4)
    budget = selection.num_selected_params(selection.select(scores, rank=4), CFG)
    picked = selection.select(scores, rank=4, scope="global", cfg=CFG)
    assert abs(selection.num_selected_params(picked, CFG) - budget) <= max(d for _, d in SHAPES.values())


def test_global_normalization_lets_modules_of_different_scale_compete():
    scores = _scores(5, [("layers", "mlp", "up_proj"), ("layers", "mlp", "down_proj")])
    scores["layers"]["mlp"]["down_proj"] *= 1000.0
    raw = selection.select(scores, rank=4, scope="global")
    assert set(raw["layers"]["mlp"]) == {"down_proj"}
    normalized = selection.select(scores, rank=4, scope="global", normalize="module")
    assert set(normalized["layers"]["mlp"]) == {"up_proj", "down_proj"}


def test_a_masked_selection_builds_row_deltas():
    params = llama.init_params(CFG, jax.random.key(0))
    picked = selection.select(_scores(6), ratio=0.1, scope="global", cfg=CFG)
    assert any("mask" in entry for _, entry in selection.entries(picked))
    rows = delta.rows_from_selection(params, picked)
    assert delta.num_trainable(rows) == selection.num_selected_params(picked, CFG)


def test_select_rejects_bad_arguments():
    scores = _scores()
    with pytest.raises(ValueError, match="exactly one of rank= or ratio="):
        selection.select(scores, rank=2, ratio=0.1)
    with pytest.raises(ValueError, match="rank=17 exceeds the 16 rows of layers/self_attn/k_proj"):
        selection.select(scores, rank=17)
    with pytest.raises(ValueError, match="needs cfg= or params_per_row="):
        selection.select(scores, ratio=0.1, scope="global")
    with pytest.raises(ValueError, match="scope='row'"):
        selection.select(scores, rank=2, scope="row")
    scores["layers"]["mlp"]["up_proj"][1, 3] = np.nan
    with pytest.raises(ValueError, match="scores layers/mlp/up_proj: holds NaN"):
        selection.select(scores, rank=2)


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    picked = selection.select(_scores(7), ratio=0.1, scope="global", cfg=CFG)
    path = tmp_path / "sel" / "selection.safetensors"
    selection.save(path, picked, model="tiny-llama", targets="all-linear", metric="taylor",
                   metadata={"note": "test"})
    loaded, info = selection.load(path, cfg=CFG)
    assert info["model"] == "tiny-llama" and info["targets"] == "all-linear"
    assert info["metric"] == "taylor" and info["note"] == "test"
    assert jax.tree.structure(loaded) == jax.tree.structure(picked)
    for (p, a), (q, b) in zip(selection.entries(picked), selection.entries(loaded)):
        assert p == q and set(a) == set(b)
        for key in a:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])
    assert [p.name for p in path.parent.iterdir()] == ["selection.safetensors"]  # no temp left


def test_load_names_the_file_and_the_bad_tensor(tmp_path):
    from safetensors.numpy import save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=re.escape(f"{garbage}: not a readable safetensors file")):
        selection.load(garbage)

    meta = {"format": selection.FORMAT, "format_version": selection.FORMAT_VERSION}
    rows = np.zeros((3, 2), np.int32)
    cases = {
        "layers/mlp/up_proj/weights": ({"layers/mlp/up_proj/weights": rows}, None),
        "layers/mlp/up_proj/mask": ({"layers/mlp/up_proj/rows": rows,
                                     "layers/mlp/up_proj/mask": np.ones((3, 2), np.int32)}, None),
        "layers/mlp/up_proj/rows: row 48": ({"layers/mlp/up_proj/rows": rows + 48}, CFG),
        "layers/mlp/up_proj/rows: 2 layers": ({"layers/mlp/up_proj/rows": rows[:2]}, CFG),
    }
    for i, (needle, (tensors, cfg)) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.safetensors"
        save_file(tensors, bad, metadata=meta)
        with pytest.raises(ValueError, match=re.escape(f"{bad}: tensor ") + ".*" + re.escape(needle)):
            selection.load(bad, cfg=cfg)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": rows}, foreign)
    with pytest.raises(ValueError, match=re.escape(f"{foreign}: not an spsft-jax selection")):
        selection.load(foreign)
    with pytest.raises(FileNotFoundError):
        selection.load(tmp_path / "missing.safetensors")
