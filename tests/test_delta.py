"""Delta types: apply and merge agree, and the dependency-aware column delta's gradient
is the selected columns of the dense gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spsft_jax import delta as deltas

D_OUT, D_IN = 6, 5


@pytest.fixture
def module():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"weight": jax.random.normal(k1, (D_OUT, D_IN)), "bias": jax.random.normal(k2, (D_OUT,))}


def _random(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape)


CASES = {
    "rows": lambda: deltas.RowDelta(jnp.array([1, 4]), _random((2, D_IN), 1)),
    "rows-masked-bias": lambda: deltas.RowDelta(jnp.array([0, 3, 3]), _random((3, D_IN), 2),
                                                jnp.array([True, True, False]), _random((D_OUT,), 3)),
    "columns": lambda: deltas.ColumnDelta(jnp.array([0, 2]), _random((D_OUT, 2), 4)),
    "lora": lambda: deltas.LoraDelta(_random((2, D_IN), 5), _random((D_OUT, 2), 6), 0.5),
    "dense": lambda: deltas.DenseDelta(_random((D_OUT, D_IN), 7), _random((D_OUT,), 8)),
    "bias": lambda: deltas.BiasDelta(_random((D_OUT,), 9)),
    "scale": lambda: deltas.ScaleDelta(1.0 + _random((D_OUT,), 13)),
}


def test_every_delta_type_follows_the_protocol():
    for cls in deltas.DELTA_TYPES:
        assert callable(getattr(cls, "apply", None)) and callable(getattr(cls, "merge", None)), cls
    assert all(isinstance(make(), deltas.Delta) for make in CASES.values())


def test_norm_delta_apply_equals_merged_norm_weight():
    """For a norm the frozen output is w * x (x normalised): apply adds delta * x."""
    d = deltas.NormDelta(_random((D_IN,), 14))
    module = {"weight": 1.0 + _random((D_IN,), 15)}
    x = _random((3, D_IN), 16)
    np.testing.assert_allclose(d.apply(x, module["weight"] * x), d.merge(module)["weight"] * x,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_apply_equals_merged_weight(module, case):
    """x W^T + delta.apply == x W'^T with W' = delta.merge(W): the additive form is exact."""
    d = CASES[case]()
    x = _random((3, D_IN), 10)
    y = d.apply(x, x @ module["weight"].T) + module["bias"]
    merged = d.merge(module)
    np.testing.assert_allclose(y, x @ merged["weight"].T + merged["bias"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(merged["weight"], module["weight"]) or case == "bias"


def test_column_delta_gradient_is_selected_columns_of_dense_gradient(module):
    cols = jnp.array([1, 3])
    x = _random((4, D_IN), 11)
    target = _random((4, D_OUT), 12)

    def loss_dense(w):
        return jnp.sum((x @ w.T - target) ** 2)

    def loss_cols(w_f):
        d = deltas.ColumnDelta(cols, w_f)
        return jnp.sum((d.apply(x, x @ module["weight"].T) - target) ** 2)

    dense = jax.grad(loss_dense)(module["weight"])
    got = jax.grad(loss_cols)(jnp.zeros((D_OUT, 2)))
    np.testing.assert_allclose(got, dense[:, cols], rtol=1e-6)


def test_split_keeps_indices_and_masks_fixed():
    d = CASES["rows-masked-bias"]()
    trainable, fixed = deltas.split({"m": d})
    assert trainable["m"].rows is None and trainable["m"].mask is None
    assert fixed["m"].w_f is None and fixed["m"].bias is None
    back = deltas.combine(trainable, fixed)["m"]
    assert all(np.array_equal(getattr(back, f), getattr(d, f)) for f in ("rows", "w_f", "mask", "bias"))
    assert deltas.num_trainable({"m": d}) == 2 * D_IN + D_OUT  # the padded row does not count


def test_union_refuses_two_deltas_on_one_module():
    d = CASES["rows"]()
    with pytest.raises(ValueError, match="two deltas target a/b"):
        deltas.union({"a": {"b": d}}, {"a": {"b": d}})


def test_lora_gradient_matches_plain_autodiff():
    # LoraDelta.apply's hand-written backward (no transposed output gradient) against jax.grad
    # of the same product written as plain einsums.
    from spsft_jax.delta import LoraDelta

    keys = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(keys[0], (2, 5, 6))
    a, b = jax.random.normal(keys[1], (3, 6)), jax.random.normal(keys[2], (4, 3))
    y, probe = jax.random.normal(keys[3], (2, 5, 4)), jnp.arange(40.0).reshape(2, 5, 4)

    def ours(x, a, b):
        return (LoraDelta(a, b, scale=0.5).apply(x, y) * probe).sum()

    def plain(x, a, b):
        return ((y + 0.5 * jnp.einsum("tsr,or->tso", jnp.einsum("tsi,ri->tsr", x, a), b)) * probe).sum()

    for got, want in zip(jax.grad(ours, (0, 1, 2))(x, a, b), jax.grad(plain, (0, 1, 2))(x, a, b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
