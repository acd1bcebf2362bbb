"""The paper's methods as it defines them: element-wise Taylor, dependency groups,
TokenTune's sampling, the LoRA baseline, and exact low-precision sums and merges."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spsft_jax import delta as deltas
from spsft_jax import assets, importance, llama, selection, tokentune, train
from spsft_jax.trees import nest

# GQA: 4 query heads over 2 key-value heads.
CFG = llama.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_layers=3,
                        num_heads=4, num_kv_heads=2, head_dim=4)
PATHS = llama.module_paths("all-linear")


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CFG, jax.random.key(0), std=0.2)


def _batch(seed, batch=3, seq=9, pad=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    labels = ids.copy()
    labels[:, :2] = -100
    if pad:
        mask[-1, -pad:] = 0
        labels[-1, -pad:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


BATCHES = [_batch(1, pad=3), _batch(2, batch=2, seq=7)]


def _dense_grad(params, batches, example_weights):
    """Gradient of sum_b weight_b * (summed token loss of b) w.r.t. all layer weights."""

    def loss(layers):
        p = {**params, "layers": layers}
        total = 0.0
        for b, w in zip(batches, example_weights):
            logits = llama.forward(CFG, p, jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]))
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            y = jnp.asarray(b["labels"])[:, 1:]
            picked = jnp.take_along_axis(logp, jnp.where(y >= 0, y, 0)[..., None], -1)[..., 0]
            total = total + jnp.sum(jnp.where(y >= 0, -picked, 0.0).sum(-1) * jnp.asarray(w))
        return total

    return {"layers": jax.grad(loss)(params["layers"])}


def _loss_tokens(b):
    return (np.asarray(b["labels"])[:, 1:] != -100).sum(-1)


def _w_g(params, grads, path):
    w = np.asarray(llama.subtree(params, *path)["weight"], np.float64)
    return w * np.asarray(llama.subtree(grads, *path)["weight"], np.float64)


# --------------------------------------------------------------------------- Taylor


@pytest.fixture(scope="module")
def token_grads(params):
    tokens = sum(_loss_tokens(b).sum() for b in BATCHES)
    return _dense_grad(params, BATCHES, [np.full(len(b["input_ids"]), 1.0 / tokens) for b in BATCHES])


def test_elementwise_taylor_is_sum_of_abs_w_g(params, token_grads):
    scores = importance.taylor(CFG, params, iter(BATCHES))  # the default: the paper's form
    grouped = importance.taylor(CFG, params, BATCHES, layers_per_pass=2)
    for path in PATHS:
        ref = np.abs(_w_g(params, token_grads, path)).sum(-1)
        got = np.asarray(llama.subtree(scores, *path))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * ref.max())
        np.testing.assert_allclose(np.asarray(llama.subtree(grouped, *path)), got, rtol=1e-5,
                                   atol=1e-7 * ref.max())


def test_elementwise_passes_share_one_program_and_remat_agrees(params):
    # Three passes of one layer, and two of up to two layers (the lowest holding one).
    single = importance.taylor(CFG, params, BATCHES[:1], layers_per_pass=1)
    compiled = importance._elementwise_step._cache_size()
    again = importance.taylor(CFG, params, BATCHES[:1] * 2, layers_per_pass=1)
    assert importance._elementwise_step._cache_size() == compiled
    rematted = importance.taylor(CFG, params, BATCHES[:1], layers_per_pass=2, remat="full")
    for path in PATHS:
        got = np.asarray(llama.subtree(single, *path))
        np.testing.assert_allclose(np.asarray(llama.subtree(again, *path)), got, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(llama.subtree(rematted, *path)), got, rtol=1e-5,
                                   atol=1e-7 * got.max())


def test_row_taylor_is_abs_of_sum_and_ranks_differently(params, token_grads):
    row = importance.taylor(CFG, params, BATCHES, form="row")
    elementwise = importance.taylor(CFG, params, BATCHES)
    overlaps = []
    for path in PATHS:
        ref = np.abs(_w_g(params, token_grads, path).sum(-1))
        np.testing.assert_allclose(np.asarray(llama.subtree(row, *path)), ref, rtol=1e-4,
                                   atol=1e-6 * ref.max())
        a = np.argsort(-np.asarray(llama.subtree(row, *path)), axis=-1)[:, :4]
        b = np.argsort(-np.asarray(llama.subtree(elementwise, *path)), axis=-1)[:, :4]
        overlaps += [len(set(x) & set(y)) / 4 for x, y in zip(a, b)]
    # Signed sums cancel within a row, absolute values do not: the top rows disagree.
    assert np.mean(overlaps) < 0.9


def test_example_average_weighs_each_example_equally(params):
    examples = sum(int((_loss_tokens(b) > 0).sum()) for b in BATCHES)
    weights = [np.where(_loss_tokens(b) > 0, 1.0 / np.maximum(_loss_tokens(b), 1), 0) / examples
               for b in BATCHES]
    grads = _dense_grad(params, BATCHES, weights)
    scores = importance.taylor(CFG, params, BATCHES, average="examples")
    row = importance.taylor(CFG, params, BATCHES, average="examples", form="row")
    for path in PATHS:
        wg = _w_g(params, grads, path)
        ref = np.abs(wg).sum(-1)
        np.testing.assert_allclose(np.asarray(llama.subtree(scores, *path)), ref, rtol=1e-4,
                                   atol=1e-6 * ref.max())
        ref_row = np.abs(wg.sum(-1))
        np.testing.assert_allclose(np.asarray(llama.subtree(row, *path)), ref_row, rtol=1e-4,
                                   atol=1e-6 * ref_row.max())


def test_classwise_elementwise_matches_per_class_references(params):
    batches = [{**BATCHES[0], "classes": np.array([1, 0, 1], np.int32)},
               {**BATCHES[1], "classes": np.array([0, 0], np.int32)}]
    scores, counts = importance.per_class_taylor(CFG, params, batches, targets="mlp")
    for t in range(2):
        in_class = [np.asarray(b["classes"]) == t for b in batches]
        count = sum(_loss_tokens(b)[m].sum() for b, m in zip(batches, in_class))
        assert int(counts[t]) == count
        grads = _dense_grad(params, batches, [m / count for m in in_class])
        for path in llama.module_paths("mlp"):
            ref = np.abs(_w_g(params, grads, path)).sum(-1)
            np.testing.assert_allclose(np.asarray(llama.subtree(scores, *path))[t], ref,
                                       rtol=1e-4, atol=1e-6 * ref.max())
    qm = importance.classwise_taylor(CFG, params, batches, targets="mlp", aggregate="mean")
    path = ("layers", "mlp", "up_proj")
    np.testing.assert_allclose(llama.subtree(qm, *path), np.asarray(llama.subtree(scores, *path)).mean(0),
                               rtol=1e-5)


def test_taylor_rejects_unknown_options(params):
    with pytest.raises(ValueError, match="form='paper'"):
        importance.taylor(CFG, params, BATCHES, form="paper")
    with pytest.raises(ValueError, match="average='rows'"):
        importance.taylor(CFG, params, BATCHES, average="rows")
    with pytest.raises(ValueError, match="layers_per_pass=0"):
        importance.taylor(CFG, params, BATCHES, layers_per_pass=0)


# --------------------------------------------------------------------------- dependency groups


def _random_scores(seed):
    rng = np.random.default_rng(seed)
    return nest({p: rng.random((CFG.num_layers, CFG.linear_shapes()[p[-1]][0]))
                            for p in PATHS})


@pytest.fixture(scope="module")
def dependency():
    scores = _random_scores(0)
    return scores, selection.select(scores, rank=4, cfg=CFG, dependency=True)


def test_dependency_groups_follow_the_scores(dependency):
    scores, chosen = dependency
    hd, group = CFG.head_dim, CFG.num_heads // CFG.num_kv_heads
    mlp, attn = chosen["layers"]["mlp"], chosen["layers"]["self_attn"]
    for layer in range(CFG.num_layers):
        s = scores["layers"]["mlp"]
        channel = s["gate_proj"][layer] + s["up_proj"][layer]
        best = np.sort(np.argsort(-channel)[:4])
        np.testing.assert_array_equal(mlp["gate_proj"]["rows"][layer], best)
        np.testing.assert_array_equal(mlp["up_proj"]["rows"][layer], best)
        np.testing.assert_array_equal(mlp["down_proj"]["cols"][layer], best)
        a = scores["layers"]["self_attn"]
        heads = (a["q_proj"][layer].reshape(CFG.num_heads, hd).sum(-1)
                 + np.repeat(a["k_proj"][layer].reshape(-1, hd).sum(-1), group)
                 + np.repeat(a["v_proj"][layer].reshape(-1, hd).sum(-1), group))
        head = np.argmax(heads)  # rank 4 = one head of head_dim 4
        np.testing.assert_array_equal(attn["q_proj"]["rows"][layer], head * hd + np.arange(hd))
        np.testing.assert_array_equal(attn["o_proj"]["cols"][layer], head * hd + np.arange(hd))
        kv = head // group
        np.testing.assert_array_equal(attn["k_proj"]["rows"][layer], kv * hd + np.arange(hd))


def test_dependency_ratio_matches_plain_budget_and_reductions_differ():
    scores = _random_scores(1)
    plain = selection.num_selected_params(selection.select(scores, ratio=0.5, cfg=CFG), CFG)
    dep = selection.select(scores, ratio=0.5, cfg=CFG, dependency=True)
    mlp_plain = sum(0.5 * o * i for n, (o, i) in CFG.linear_shapes().items() if n.endswith("proj")
                    and n in ("gate_proj", "up_proj", "down_proj"))
    mlp_dep = selection.num_selected_params({"layers": {"mlp": dep["layers"]["mlp"]}}, CFG)
    assert mlp_dep == CFG.num_layers * mlp_plain
    assert 0.8 * plain <= selection.num_selected_params(dep, CFG) <= 1.25 * plain
    picks = {how: selection.select(scores, rank=6, cfg=CFG, dependency=True, group_reduce=how)
             ["layers"]["mlp"]["up_proj"]["rows"] for how in ("sum", "max")}
    assert not np.array_equal(picks["sum"], picks["max"])
    with pytest.raises(ValueError, match="needs cfg"):
        selection.select(scores, rank=2, dependency=True)


def test_dependency_finetune_changes_exactly_the_group_members(params, dependency, tmp_path):
    _, chosen = dependency
    path = tmp_path / "dep.safetensors"
    selection.save(path, chosen)
    loaded, _ = selection.load(path, cfg=CFG)
    result = train.finetune(params, loaded, BATCHES[:1], config=CFG, steps=2, learning_rate=1e-2,
                            warmup=0)
    assert result.trainable_params == selection.num_selected_params(chosen, CFG)
    merged = deltas.merge(params, result.delta)
    hd, group = CFG.head_dim, CFG.num_heads // CFG.num_kv_heads
    for layer in range(CFG.num_layers):
        mlp = chosen["layers"]["mlp"]["up_proj"]["rows"][layer]
        head = chosen["layers"]["self_attn"]["q_proj"]["rows"][layer]
        kv = np.unique(head // hd // group)[:, None] * hd + np.arange(hd)
        expected = {"gate_proj": ("rows", mlp), "up_proj": ("rows", mlp), "down_proj": ("cols", mlp),
                    "q_proj": ("rows", head), "o_proj": ("cols", head),
                    "k_proj": ("rows", kv.ravel()), "v_proj": ("rows", kv.ravel())}
        for p in PATHS:
            axis, index = expected[p[-1]]
            changed = (np.asarray(llama.subtree(merged, *p)["weight"][layer])
                       != np.asarray(llama.subtree(params, *p)["weight"][layer]))
            want = np.zeros_like(changed)
            if axis == "rows":
                want[index] = True
            else:
                want[:, index] = True
            np.testing.assert_array_equal(changed, want, err_msg=f"{p[-1]} layer {layer}")


def test_column_delta_gradient_in_the_model_is_the_dense_gradients_columns(params, dependency):
    _, chosen = dependency
    trainable, fixed = deltas.split(deltas.rows_from_selection(params, chosen))
    batch = {k: jnp.asarray(v) for k, v in BATCHES[0].items()}

    def loss(t):
        logits = llama.forward(CFG, params, batch["input_ids"], batch["attention_mask"],
                               deltas.combine(t, fixed))
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    grads = jax.grad(loss)(trainable)

    def loss_of_weights(layers):
        logits = llama.forward(CFG, {**params, "layers": layers}, batch["input_ids"],
                               batch["attention_mask"])
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    dense = jax.grad(loss_of_weights)(params["layers"])
    for block, name in (("mlp", "down_proj"), ("self_attn", "o_proj")):
        got = np.asarray(grads["layers"][block][name].w_f)
        cols = chosen["layers"][block][name]["cols"]
        ref = np.stack([np.asarray(dense[block][name]["weight"][i])[:, cols[i]]
                        for i in range(CFG.num_layers)])
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)


def test_column_delta_exports_as_an_exact_lora(params, dependency):
    from spsft_jax.interop import peft

    _, chosen = dependency
    delta = deltas.rows_from_selection(params, chosen)
    d = delta["layers"]["mlp"]["down_proj"]
    d = deltas.ColumnDelta(d.cols, jax.random.normal(jax.random.key(1), d.w_f.shape), d.mask)
    a, b, alpha = peft._as_lora(d, *CFG.linear_shapes()["down_proj"])
    assert alpha == a.shape[-2]
    merged = deltas.merge(params, {"layers": {"mlp": {"down_proj": d}}})
    update = np.asarray(merged["layers"]["mlp"]["down_proj"]["weight"]) - np.asarray(
        params["layers"]["mlp"]["down_proj"]["weight"])
    np.testing.assert_allclose(b @ a, update, atol=1e-6)


# --------------------------------------------------------------------------- TokenTune sampling


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.3])
def test_tokentune_counts_follow_the_reference_formula(fraction):
    lengths = [20, 13, 2, 7, 1]
    t = 20
    mask = np.zeros((len(lengths), t), np.int32)
    for row, n in enumerate(lengths):
        start = 3 if row == 1 else 0  # one row left-padded
        mask[row, start:start + n] = 1
    for seed in range(3):
        indices, valid = tokentune.sample_tokens(jax.random.key(seed), jnp.asarray(mask), fraction)
        indices, valid = np.asarray(indices), np.asarray(valid)
        assert indices.shape[1] == min(t, int(fraction * (t - 2)) + 2)
        for row, n in enumerate(lengths):
            kept = indices[row][valid[row]]
            assert len(kept) == min(n, int(fraction * (n - 2)) + 2)
            real = np.flatnonzero(mask[row])
            assert set(kept) <= set(real) and len(set(indices[row])) == indices.shape[1]
            assert real[0] in kept and real[-1] in kept


def test_tokentune_draws_middle_tokens_uniformly_and_prefers_loss_only_when_asked():
    mask = jnp.ones((1, 12), jnp.int32)
    prefer = jnp.asarray([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0]], bool)
    seen = np.zeros(12)
    for seed in range(200):
        indices, valid = tokentune.sample_tokens(jax.random.key(seed), mask, 0.4)
        seen[np.asarray(indices)[np.asarray(valid)]] += 1
        preferred, _ = tokentune.sample_tokens(jax.random.key(seed), mask, 0.4, prefer=prefer)
        assert set(np.asarray(preferred)[0]) == {0, 7, 8, 9, 10, 11}
    assert seen[0] == seen[11] == 200
    middle = seen[1:11] / 200
    assert np.all(np.abs(middle - 0.4) < 0.15)  # int(0.4 * 10) = 4 of 10 middle tokens


# --------------------------------------------------------------------------- LoRA baseline


def test_lora_dropout_changes_training_not_evaluation(params):
    common = dict(config=CFG, method="lora", rank=2, alpha=16, steps=3, learning_rate=1e-2, warmup=0)
    with_dropout = train.finetune(params, None, BATCHES[:1], dropout=0.1, **common)
    without = train.finetune(params, None, BATCHES[:1], **common)
    losses = lambda r: [h["loss"] for h in r.history]  # noqa: E731
    assert losses(with_dropout)[0] == pytest.approx(losses(without)[0], rel=1e-6)  # B = 0 at first
    assert losses(with_dropout)[1:] != pytest.approx(losses(without)[1:], rel=1e-6)
    d = with_dropout.delta["layers"]["mlp"]["up_proj"]
    assert d.dropout == 0.1 and d.key is None and d.scale == 8.0
    ids = jnp.asarray(BATCHES[0]["input_ids"])
    a = llama.forward(CFG, params, ids, None, with_dropout.delta)
    merged = llama.forward(CFG, deltas.merge(params, with_dropout.delta), ids)
    np.testing.assert_allclose(a, merged, atol=1e-5)


def test_lora_init_matches_peft_bounds(params):
    import torch
    from peft import LoraConfig, get_peft_model

    d_in = CFG.intermediate_size
    net = torch.nn.Sequential(torch.nn.Linear(d_in, 64))
    torch.manual_seed(0)
    model = get_peft_model(net, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=["0"]))
    ref_a = model.base_model.model[0].lora_A["default"].weight.detach().numpy()
    ref_b = model.base_model.model[0].lora_B["default"].weight.detach().numpy()
    ours = deltas.lora(params, [("layers", "mlp", "down_proj")], jax.random.key(0), rank=64,
                       alpha=16, dropout=0.1)["layers"]["mlp"]["down_proj"]
    a = np.asarray(ours.a)
    bound = 1 / np.sqrt(d_in)
    for sample in (ref_a, a):
        assert np.abs(sample).max() <= bound * (1 + 1e-6)
        assert np.abs(sample).max() > 0.95 * bound
        assert abs(sample.std() - bound / np.sqrt(3)) < 0.05 * bound
    assert not ref_b.any() and not np.asarray(ours.b).any()
    assert ours.scale == 16 / 64


# --------------------------------------------------------------------------- low precision


def test_bf16_base_gives_the_float32_w_f_gradient():
    params = llama.init_params(CFG, jax.random.key(0))  # a realistic init scale
    chosen = selection.select(_random_scores(3), rank=3)
    batch = {k: jnp.asarray(v) for k, v in BATCHES[0].items()}
    tc = train.TrainConfig()

    def grads(p):
        delta = deltas.rows_from_selection(p, chosen)
        trainable, fixed = deltas.split(delta)

        def loss(t):
            s, n = train.batch_loss(CFG, tc, p, deltas.combine(t, fixed), batch, jax.random.key(0))
            return s / n

        return jax.grad(loss)(trainable)

    exact = grads(params)
    low = grads(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    error = sum(np.sum((np.asarray(g.w_f, np.float32) - np.asarray(e.w_f)) ** 2)
                for (_, e), (_, g) in zip(deltas.leaves(exact), deltas.leaves(low)))
    norm = sum(np.sum(np.asarray(e.w_f) ** 2) for _, e in deltas.leaves(exact))
    assert (error / norm) ** 0.5 < 1e-2


def test_float32_merge_keeps_small_updates_that_bf16_drops(params):
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    chosen = selection.select(_random_scores(4), rank=3)
    delta = deltas.rows_from_selection(base, chosen)
    delta = {"layers": {blk: {n: deltas.RowDelta(d.rows, jnp.full(d.w_f.shape, 1e-5), d.mask)
                              for n, d in mods.items()} for blk, mods in delta["layers"].items()}}
    merged = deltas.merge(base, delta)
    path = ("layers", "mlp", "up_proj")
    w = np.asarray(llama.subtree(merged, *path)["weight"])
    assert w.dtype == np.float32
    rows = chosen["layers"]["mlp"]["up_proj"]["rows"]
    update = w - np.asarray(llama.subtree(base, *path)["weight"], np.float32)
    np.testing.assert_allclose(np.take_along_axis(update, rows[..., None], 1), 1e-5, rtol=1e-2)
    exact, low = deltas.merge_report(base, delta, jnp.float32), deltas.merge_report(base, delta)
    assert exact["unchanged"] == 0 and exact["norm_kept"] == pytest.approx(1.0, abs=1e-3)
    assert low["unchanged"] > 0.9 * low["updated"] and low["norm_kept"] < 0.5
    kept = deltas.merge(base, delta, dtype=jnp.bfloat16)
    assert llama.subtree(kept, *path)["weight"].dtype == jnp.bfloat16


# --------------------------------------------------------------------------- command line


def _labelled_data(folder, with_labels=True):
    from spsft_jax import cli

    records = [json.loads(line) for line in
               (assets.default_asset("train.jsonl")).read_text().splitlines()[:24]]
    path = folder / "labelled.jsonl"
    lines = []
    for r in records:
        if with_labels:  # the class: whether the answer has two digits
            r = {**r, "label": "two" if len(r["response"]) > 2 else "one"}
        lines.append(json.dumps(r))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("metric", ["taylor-row", "qm-taylor"])
def test_cli_select_metrics(tmp_path, metric):
    from spsft_jax import cli

    data = _labelled_data(tmp_path)
    out = tmp_path / "sel.safetensors"
    assert cli.main(["select", "--metric", metric, "--rank", "3", "--data", str(data),
                     "--batch-size", "8", "--importance-batches", "2", "--out", str(out)]) == 0
    chosen, meta = selection.load(out)
    assert meta["metric"] == metric and chosen["layers"]["mlp"]["up_proj"]["rows"].shape[1] == 3


def test_cli_qm_taylor_needs_labels(tmp_path, capsys):
    from spsft_jax import cli

    data = _labelled_data(tmp_path, with_labels=False)
    out = tmp_path / "sel.safetensors"
    assert cli.main(["select", "--metric", "qm-taylor", "--data", str(data), "--out", str(out)]) == 2
    assert "record 1 has no 'label'" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------- export of dependency deltas


def test_dependency_delta_exports_to_peft_and_merged_hf(tmp_path):
    import spsft_jax as sj
    from conftest import hf_logits, make_hf_model, rel_max_err
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    make_hf_model(tmp_path / "base", seed=3)  # GQA: 4 heads over 2 key-value heads
    cfg, params = sj.interop.load_hf(tmp_path / "base")
    rng = np.random.default_rng(0)
    scores = nest({p: rng.random((cfg.num_layers, cfg.linear_shapes()[p[-1]][0])) for p in PATHS})
    chosen = selection.select(scores, ratio=0.25, cfg=cfg, dependency=True)
    delta = jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)
                         if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         deltas.rows_from_selection(params, chosen))
    assert isinstance(delta["layers"]["self_attn"]["o_proj"], deltas.ColumnDelta)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    ours = np.asarray(llama.forward(cfg, params, jnp.asarray(ids), None, delta))
    assert rel_max_err(ours, np.asarray(llama.forward(cfg, params, jnp.asarray(ids)))) > 1e-3

    adapter = sj.interop.save_peft_adapter(tmp_path / "adapter", cfg, delta)
    load = lambda folder: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        folder, attn_implementation="eager").eval()
    peft_model = PeftModel.from_pretrained(load(tmp_path / "base"), str(adapter)).eval()
    assert rel_max_err(hf_logits(peft_model, ids), ours) < 1e-5
    merged = sj.interop.save_hf(tmp_path / "merged", cfg, deltas.merge(params, delta))
    assert rel_max_err(hf_logits(load(merged), ids), ours) < 1e-5
