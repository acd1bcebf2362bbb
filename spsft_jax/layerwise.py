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

The forward pass keeps the input of every layer (remat "full") or of every group of
`llama.layer_group_size` layers ("nested", whose backward pass recomputes a group's
layer inputs first); each layer is recomputed in its backward pass, as with those
policies in the default step. One micro-batch per step, no TokenTune.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from spsft_jax import delta as deltas
from spsft_jax import llama


def make_step(cfg: llama.LlamaConfig, tc, optimizer: optax.GradientTransformation):
    """The per-layer step for `tc` (a `train.TrainConfig` with update="per-layer"),
    not jitted."""
    from spsft_jax import train  # train imports this module

    size = llama.layer_group_size(cfg.num_layers) if tc.remat == "nested" else cfg.num_layers
    if size == cfg.num_layers:  # as `llama.scan_layers`: one group is "full", every input kept
        size = 1
    groups = cfg.num_layers // size

    def step(trainable, opt_state, frozen, batch, key):
        micro = jax.tree.map(lambda x: x[0], batch)
        ids, mask, labels = micro["input_ids"], micro["attention_mask"], micro["labels"]
        params, weights = frozen["params"], frozen["params"]["layers"]
        # LoRA dropout keys (not trained) join the fixed half, as `batch_loss` adds them.
        _, fixed = deltas.split(deltas.with_dropout_keys(
            deltas.combine(trainable["delta"], frozen["delta"]), jax.random.fold_in(key, 1)))
        fixed_layers = fixed.get("layers")

        def delta_of(rest, layers):
            tree = dict(rest) if layers is None else {**rest, "layers": layers}
            return deltas.combine(tree, fixed)

        def stack(rest, layers):
            return llama.decoder_stack(cfg, params, ids, mask, delta_of(rest, layers),
                                       segment_ids=micro.get("segment_ids"),
                                       chunk_tokens=tc.chunk_tokens)

        rest, layers = _parts(trainable)
        _, body = stack(rest, layers)

        def layer(h, index, layer_trainable):
            layer_delta = deltas.combine(layer_trainable, _at(fixed_layers, index))
            return body(h, (_at(weights, index), layer_delta))[0]

        def run(h, index, layers):
            return layer(h, index, _at(layers, index))

        # Forward: keep each group's input.
        def group_forward(h, first):
            h_out = jax.lax.scan(lambda c, i: (run(c, i, layers), None), h, first + jnp.arange(size))[0]
            return h_out, h

        h0, embed_vjp = jax.vjp(lambda r: stack(r, layers)[0], rest)
        top, kept = jax.lax.scan(group_forward, h0, size * jnp.arange(groups))
        loss_sum, head_vjp, tokens = jax.vjp(
            lambda h, r: train.head_loss(cfg, tc, params, delta_of(r, layers), h, labels),
            top, rest, has_aux=True)
        denom = jnp.maximum(tokens, 1).astype(jnp.float32)
        loss = loss_sum / denom

        def backward(trainable, opt_state):
            d_top, head_grads = head_vjp(jnp.ones_like(loss_sum) / denom)

            def group_backward(g, carry):
                group = groups - 1 - g
                first = group * size
                dh, trainable, opt_state, sq, ok = carry
                live = _parts(trainable)[1]
                h = jax.lax.dynamic_index_in_dim(kept, group, keepdims=False)
                # The group's layer inputs, recomputed from its kept input.
                last, below = jax.lax.scan(lambda c, i: (run(c, i, live), c), h,
                                           first + jnp.arange(size - 1))
                inputs = jnp.concatenate([below, last[None]])

                def layer_backward(j, carry):
                    dh, trainable, opt_state, sq, ok = carry
                    index = first + size - 1 - j
                    mine = _at(_parts(trainable)[1], index)
                    _, vjp = jax.vjp(lambda x, t: layer(x, index, t),
                                     jax.lax.dynamic_index_in_dim(inputs, size - 1 - j, keepdims=False),
                                     mine)
                    dh, grads = vjp(dh)
                    if layers is None:  # nothing trained inside the layers
                        return dh, trainable, opt_state, sq, ok
                    trainable, opt_state, g_sq, applied = _update(
                        optimizer, tc, trainable, opt_state, {"layers": grads}, index)
                    return dh, trainable, opt_state, sq + g_sq, ok & applied

                return jax.lax.fori_loop(0, size, layer_backward, (dh, trainable, opt_state, sq, ok))

            zero, yes = jnp.zeros((), jnp.float32), jnp.ones((), bool)
            dh, trainable, opt_state, sq, ok = jax.lax.fori_loop(
                0, groups, group_backward, (d_top, trainable, opt_state, zero, yes))
            (embed_grads,) = embed_vjp(dh)
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


def _at(tree, index):
    """Layer `index` of stacked leaves (`index` None: the tree as it is)."""
    if index is None or tree is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), tree)


def _update(optimizer, tc, trainable, opt_state, grads: dict, layer):
    """Apply `optimizer` to one part of the trainable tree: layer `layer`'s slices
    (`grads` {"layers": that layer's gradient}) or, with `layer` None, everything outside
    the layers (`grads` their gradient), where the step count advances. Returns (trainable,
    opt_state, the part's squared gradient norm before clipping, whether it was applied)."""
    from spsft_jax.train import _layer_view  # train imports this module

    views = [_layer_view(t, layer) for t in (trainable, opt_state)]
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
    """`tree` with a `_layer_view(tree, layer)` written back: layer `layer`'s slices, or
    with `layer` None every leaf outside the layers and the scalars (the step count)."""
    from spsft_jax.train import _in_layers

    def put(path, x, v):
        if layer is None:
            return x if _in_layers(path) and jnp.ndim(x) else v
        if jnp.ndim(x) == 0 or not _in_layers(path):
            return x
        return jax.lax.dynamic_update_index_in_dim(x, v, layer, 0)

    return jax.tree_util.tree_map_with_path(put, tree, view)
