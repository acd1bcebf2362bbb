"""A training step that updates each layer as soon as its gradient is known
(`TrainConfig(update="per-layer")`), so the whole gradient is never held.

The default step (`train.make_train_step`) differentiates the whole loss, holds a
gradient the size of the trainable tree, clips it by its global norm, then updates.
This one runs the backward pass by hand, a layer at a time from the top, and applies
the optimizer to that layer's slice of the trainable tree and of the optimizer state
before going down to the next: one layer's gradient is held at a time. Same pytrees,
same signature (trainable tree and optimizer state donated and updated in place):

    step(trainable, opt_state, frozen, batch, key) -> (trainable, opt_state, metrics)

What differs from the default step, because the global norm is known only when every
layer has been updated:
- `max_grad_norm` clips each layer's gradient on its own, and the gradient of the
  parameters outside the layers on its own. `metrics["grad_norm"]` is still the norm
  of the whole (unclipped) gradient.
- A layer whose gradient or update is not finite is left as it was and the step
  reports `finite=False` (`finetune` stops); the layers above it are already updated.
  A loss that is not finite updates nothing.

The loss comes in `objective.loss_parts`' pieces: the embeddings, the layer body and the
head with its loss, so TokenTune's two-path carry runs the same way as the plain
hidden states. The forward pass keeps the input of every layer (remat "full") or of
every group of `llama.layer_group_size` layers ("nested", whose backward pass
recomputes a group's layer inputs first); each layer is recomputed in its backward
pass, as with those policies in the default step. One micro-batch per step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from spsft_jax import delta as deltas
from spsft_jax import llama, objective

# The remat policies whose kept layer inputs this step recomputes its layers from.
REMATS = ("full", "nested")


def make_step(cfg: llama.LlamaConfig, tc, optimizer: optax.GradientTransformation):
    """The per-layer step for `tc` (a `train.TrainConfig` with update="per-layer"),
    not jitted."""
    size = llama.nested_group_size(tc.remat, cfg.num_layers)  # 1: every layer's input kept
    groups = cfg.num_layers // size

    def step(trainable, opt_state, frozen, batch, key):
        micro = jax.tree.map(lambda x: x[0], batch)
        key = jax.random.split(key, 1)[0]  # the global step's key for its one micro-batch
        params = frozen["params"]
        weights = llama.layer_stack(cfg, params)
        stack, finish = objective.loss_parts(cfg, tc, params, micro, key)
        # LoRA dropout keys (not trained) join the fixed half.
        _, fixed = deltas.split(objective.with_dropout(deltas.combine(trainable["delta"], frozen["delta"]), key))
        fixed_layers = fixed.get("layers")
        rest, layers = _parts(trainable)

        def delta_of(rest):  # the whole delta, for the parts outside the layers
            return deltas.combine(rest if layers is None else {**rest, "layers": layers}, fixed)

        _, body = stack(delta_of(rest))

        def layer(carry, index, layer_trainable):
            layer_delta = deltas.combine(layer_trainable, llama.layer_at(fixed_layers, index))
            return body(carry, (llama.layer_at(weights, index), layer_delta))[0]

        def run(carry, index, layers):
            return layer(carry, index, llama.layer_at(layers, index))

        # Forward: keep each group's input.
        def group_forward(carry, first):
            out = jax.lax.scan(lambda c, i: (run(c, i, layers), None), carry, first + jnp.arange(size))[0]
            return out, carry

        start, embed_vjp = jax.vjp(lambda r: stack(delta_of(r))[0], rest)
        top, kept = jax.lax.scan(group_forward, start, size * jnp.arange(groups))
        loss_sum, head_vjp, tokens = jax.vjp(lambda c, r: finish(c, delta_of(r)), top, rest, has_aux=True)
        denom = jnp.maximum(tokens, 1).astype(jnp.float32)
        loss = loss_sum / denom

        def backward(trainable, opt_state):
            d_top, head_grads = head_vjp(jnp.ones_like(loss_sum) / denom)

            def group_backward(g, carry):
                group = groups - 1 - g
                first = group * size
                d, trainable, opt_state, sq, ok = carry
                live = _parts(trainable)[1]
                # The group's layer inputs, recomputed from its kept input.
                last, below = jax.lax.scan(lambda c, i: (run(c, i, live), c), llama.layer_at(kept, group),
                                           first + jnp.arange(size - 1))
                inputs = jax.tree.map(lambda b, x: jnp.concatenate([b, x[None]]), below, last)

                def layer_backward(j, carry):
                    d, trainable, opt_state, sq, ok = carry
                    index = first + size - 1 - j
                    _, vjp = jax.vjp(lambda x, t: layer(x, index, t), llama.layer_at(inputs, size - 1 - j),
                                     llama.layer_at(_parts(trainable)[1], index))
                    d, grads = vjp(d)
                    if layers is None:  # nothing trained inside the layers
                        return d, trainable, opt_state, sq, ok
                    trainable, opt_state, g_sq, applied = _update(
                        optimizer, tc, trainable, opt_state, {"layers": grads}, index)
                    return d, trainable, opt_state, sq + g_sq, ok & applied

                return jax.lax.fori_loop(0, size, layer_backward, (d, trainable, opt_state, sq, ok))

            zero, yes = jnp.zeros((), jnp.float32), jnp.ones((), bool)
            d, trainable, opt_state, sq, ok = jax.lax.fori_loop(
                0, groups, group_backward, (d_top, trainable, opt_state, zero, yes))
            (embed_grads,) = embed_vjp(d)
            rest_grads = jax.tree.map(jnp.add, head_grads, embed_grads)
            trainable, opt_state, g_sq, applied = _update(optimizer, tc, trainable, opt_state,
                                                          rest_grads, None)
            return trainable, opt_state, jnp.sqrt(sq + g_sq), ok & applied

        def skip(trainable, opt_state):
            return trainable, opt_state, jnp.full((), jnp.nan, jnp.float32), jnp.zeros((), bool)

        trainable, opt_state, grad_norm, applied = jax.lax.cond(
            jnp.isfinite(loss), backward, skip, trainable, opt_state)
        metrics = {"loss": loss, "tokens": tokens.astype(jnp.float32), "grad_norm": grad_norm,
                   "finite": jnp.isfinite(loss) & applied}
        return trainable, opt_state, metrics

    return step


def _parts(trainable: dict) -> tuple[dict, dict | None]:
    """(the trainable delta outside the layers, the stacked one inside them)."""
    tree = trainable["delta"]
    return {k: v for k, v in tree.items() if k != "layers"}, tree.get("layers")


def _update(optimizer, tc, trainable, opt_state, grads: dict, layer):
    """Apply `optimizer` to one part of the trainable tree: layer `layer`'s slices
    (`grads` {"layers": that layer's gradient}) or, with `layer` None, everything outside
    the layers (`grads` their gradient), where the step count advances. Returns (trainable,
    opt_state, the part's squared gradient norm before clipping, whether it was applied)."""
    views = [layer_view(t, layer) for t in (trainable, opt_state)]
    grad_view = jax.tree.map(jnp.zeros_like, views[0])
    grad_view["delta"] = ({**grad_view["delta"], **grads} if layer is not None else
                          {**grads, **{k: v for k, v in grad_view["delta"].items() if k == "layers"}})
    sq = optax.tree.norm(grad_view, squared=True).astype(jnp.float32)
    if tc.max_grad_norm is not None:
        grad_view, _ = optax.clip_by_global_norm(tc.max_grad_norm).update(grad_view, optax.EmptyState())
    updates, new_state = optimizer.update(grad_view, views[1], views[0])
    applied = jnp.isfinite(sq) & jnp.isfinite(optax.tree.norm(updates, squared=True))
    new_trainable = optax.apply_updates(views[0], updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, old)
    return (_put(trainable, keep(new_trainable, views[0]), layer),
            _put(opt_state, keep(new_state, views[1]), layer), sq, applied)


def _put(tree, view, layer):
    """`tree` with a `layer_view(tree, layer)` written back: layer `layer`'s slices, or
    with `layer` None every leaf outside the layers and the scalars (the step count)."""
    def put(path, x, v):
        if layer is None:
            return x if in_layers(path) and jnp.ndim(x) else v
        if jnp.ndim(x) == 0 or not in_layers(path):
            return x
        return jax.lax.dynamic_update_index_in_dim(x, v, layer, 0)

    return jax.tree_util.tree_map_with_path(put, tree, view)


def in_layers(path) -> bool:
    """Whether a pytree key path runs through the stacked "layers"."""
    return any(isinstance(k, jax.tree_util.DictKey) and k.key == "layers" for k in path)


def layer_view(tree, layer):
    """`tree` with each leaf under "layers" cut to layer `layer` (all of them emptied
    when `layer` is None) and every other array leaf whole (emptied otherwise); scalars
    such as the optimizer's step count stay as they are."""
    def cut(path, x):
        if jnp.ndim(x) == 0:
            return x
        if in_layers(path):
            return x[:0] if layer is None else jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)
        return x if layer is None else x[:0]
    return jax.tree_util.tree_map_with_path(cut, tree)
