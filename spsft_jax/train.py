"""Training: jitted optax steps that differentiate only the trainable pytree, and `finetune`.

A model under training is split in two pytrees:

    trainable = {"delta": float leaves of the delta (W_f, LoRA A/B, dense and norm deltas)}
    frozen    = {"delta": fixed leaves (selected rows, masks), "params": the model's parameters}

with None in each delta half where the other holds the leaf (`delta.split`); `join`
puts them back together. Every method trains a delta from zero (see spsft_jax.delta).
The step takes `frozen` as a plain argument (never differentiated) and donates
`trainable` and the optimizer state.

`finetune` is `prepare` (the two pytrees), `Checkpoints.restore`, `train_loop` (one
`step_record` per step, `Checkpoints.after_step` / `fault`) and the result:

    result = finetune(params, selection, batches, config=cfg, steps=20, learning_rate=1e-3)
    result.delta      # delta pytree (see spsft_jax.delta); merge(params, result.delta)
    result.history    # [{"step", "loss", "learning_rate", "tokens", "loss_tokens", "step_s", ...}, ...]

A checkpoint folder holds the orbax steps (the latest `keep_checkpoints`), `run.json`
(what the state belongs to, checked on resume, and the caller's `checkpoint_info`), the
run's `selection.safetensors` (SPSFT) and `history.json` (every step up to the latest
checkpoint, across resumes). `restart=True` starts afresh beside an old folder and puts
the new one in its place only once it holds its first checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spsft_jax import delta as deltas
from spsft_jax import layerwise, llama
from spsft_jax.data import normalize_batch
from spsft_jax.host import release_host_memory
from spsft_jax.layerwise import in_layers, layer_view
from spsft_jax.objective import loss_parts, with_dropout
from spsft_jax.trees import get as subtree

# Learning rates that suit pretrained checkpoints, per method (the embedded model's job
# sets its own). SPSFT on SmolLM2-135M-Instruct, 24 steps of 8 chat examples
# (examples/chat_finetune.py): held-out loss 3.23 -> 2.08 at 2e-4, -> 1.68 at 1e-3.
# LoRA and dense follow common practice (dense moves every weight, so it gets the least).
DEFAULT_LR = {"spsft": 1e-3, "lora": 2e-4, "dense": 2e-5, "head": 1e-4}


METHODS = ("spsft", "lora", "dense", "head")
SCHEDULES = ("linear", "cosine", "constant")
UPDATES = ("global", "per-layer")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (hashable: a static argument of the jitted step).

    warmup: steps of linear warmup, or a fraction of `steps` when below 1.
    schedule: decay after warmup, "linear" or "cosine" to zero (as in the paper), or "constant".
    grad_accum: micro-batches per optimizer step (their gradients are token-weighted).
    remat: None (each layer keeps `llama.SAVED_ACTIVATIONS`; of its matmuls only q, k and v
        are recomputed) or a policy name of `llama.REMAT_POLICIES` for the scanned layer
        body ("minimal" recomputes no matmul).
    chunk_tokens: attention queries and loss positions per block (`llama.token_blocks`),
        recomputed in the backward pass; None: one block.
    tokentune: fraction (0, 1] or count of tokens to backpropagate through; None for all.
    tokentune_loss: "selected" (loss on the selected positions, as TokenTune) or "all".
    tokentune_prefer: None (TokenTune's sampling: first, last and uniformly random tokens,
        `int(f * (len - 2)) + 2` per row) or "loss": draw the random tokens from the
        loss-bearing positions first (a departure from TokenTune).
    update: "global" (the whole gradient, clipped by its global norm, then AdamW) or
        "per-layer": each layer updated inside the backward pass, so no gradient buffer
        is held, with `max_grad_norm` clipping each layer's gradient on its own
        (`spsft_jax.layerwise`; needs remat "full" or "nested", and grad_accum=1).
    """

    steps: int = 20
    learning_rate: float = 1e-3
    warmup: float = 0.1
    schedule: str = "linear"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1
    remat: str | None = None
    tokentune: float | None = None
    tokentune_loss: str = "selected"
    seed: int = 0
    tokentune_prefer: str | None = None
    chunk_tokens: int | None = llama.CHUNK_TOKENS
    update: str = "global"

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be at least 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: choose one of {SCHEDULES}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum={self.grad_accum}: must be at least 1")
        if self.remat is not None and self.remat not in llama.REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: choose one of {sorted(llama.REMAT_POLICIES)}")
        if self.tokentune is not None and not (0 < self.tokentune <= 1 or float(self.tokentune).is_integer()):
            raise ValueError(f"tokentune={self.tokentune}: a fraction in (0, 1] or a token count")
        if self.tokentune_loss not in ("selected", "all"):
            raise ValueError(f"tokentune_loss={self.tokentune_loss!r}: 'selected' or 'all'")
        if self.tokentune_prefer not in (None, "loss"):
            raise ValueError(f"tokentune_prefer={self.tokentune_prefer!r}: None or 'loss'")
        if self.update not in UPDATES:
            raise ValueError(f"update={self.update!r}: choose one of {UPDATES}")
        if self.update == "per-layer":
            if self.remat not in layerwise.REMATS:
                raise ValueError(f"update='per-layer' recomputes each layer in its backward pass: "
                                 f"set remat='full' or 'nested' (not {self.remat!r})")
            if self.grad_accum != 1:
                raise ValueError("update='per-layer' takes one micro-batch per step: set grad_accum=1")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0, then linear or cosine decay to 0 (or constant)."""
    warm = min(tc.warmup_steps, tc.steps)
    rest = max(tc.steps - warm, 1)
    decay = {
        "linear": optax.linear_schedule(tc.learning_rate, 0.0, rest),
        "cosine": optax.cosine_decay_schedule(tc.learning_rate, rest),
        "constant": optax.constant_schedule(tc.learning_rate),
    }[tc.schedule]
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, tc.learning_rate, warm), decay], [warm])


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW on the schedule. It acts element by element; the global-norm clipping
    (`tc.max_grad_norm`) is applied to the whole gradient by the step before it."""
    return optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                       weight_decay=tc.weight_decay)


# --------------------------------------------------------------------------- trainable / frozen


def prepare(
    params: llama.Params,
    selection: Any = None,
    *,
    method: str = "spsft",
    targets: Any = "all-linear",
    rank: int = 8,
    alpha: float | None = None,
    tune_norms: bool = False,
    tune_bias: bool = False,
    key: jax.Array | None = None,
    dropout: float = 0.0,
) -> tuple[dict, dict]:
    """Build the (trainable, frozen) pair for a method.

    spsft: zero W_f on the selected rows (`selection` from `spsft_jax.selection.select`);
           a dependency selection's `cols` entries become column deltas.
    lora:  LoRA of `rank` (alpha defaults to rank; the paper's baseline: alpha 16,
           dropout 0.1) on `targets`.
    dense: a zero delta on every parameter (`delta.dense`). head: on the LM head only.
    tune_norms adds norm-weight deltas (and tune_bias bias deltas) to spsft and lora.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {METHODS}")
    key = jax.random.key(0) if key is None else key
    delta: Any = {}
    if method == "spsft":
        if selection is None:
            raise ValueError("method='spsft' needs a selection (see spsft_jax.selection.select)")
        delta = deltas.rows_from_selection(params, selection, bias=tune_bias)
    elif method == "lora":
        delta = deltas.lora(params, llama.module_paths(targets), key, rank=rank, alpha=alpha,
                            dropout=dropout)
    elif method == "dense":
        delta = deltas.dense(params)
    else:  # head: the LM head, or the embedding table it is tied to
        delta = deltas.dense(params, [("lm_head",) if "lm_head" in params else ("embed_tokens",)])
    if tune_norms and method in ("spsft", "lora"):
        delta = deltas.union(delta, deltas.norms(params))
    trained, fixed = deltas.split(delta)
    return {"delta": trained}, {"delta": fixed, "params": params}


def join(trainable: dict, frozen: dict) -> tuple[llama.Params, Any]:
    """(params, delta) for the model from the two halves."""
    return frozen["params"], (deltas.combine(trainable["delta"], frozen["delta"]) or None)


# --------------------------------------------------------------------------- loss and step


def batch_loss(cfg: llama.LlamaConfig, tc: TrainConfig, params, delta, batch, key) -> tuple[jax.Array, jax.Array]:
    """(summed token loss, number of loss tokens) for one micro-batch."""
    stack, finish = loss_parts(cfg, tc, params, batch, key)
    delta = with_dropout(delta, key)
    carry, body = stack(delta)
    carry = llama.scan_layers(body, carry, llama.layer_stack(cfg, params), subtree(delta, "layers"),
                              tc.remat)
    return finish(carry, delta)


def make_train_step(cfg: llama.LlamaConfig, tc: TrainConfig, optimizer: optax.GradientTransformation):
    """`step(trainable, opt_state, frozen, batch, key) -> (trainable, opt_state, metrics)`.

    batch: dict of int32 `[grad_accum, micro_batch, seq]` arrays. Gradients of the summed
    loss are accumulated over micro-batches with `lax.scan` and divided by the token
    count, so accumulation gives the same step as one large batch. With
    `tc.update == "per-layer"`, `spsft_jax.layerwise`'s step instead.
    """
    if tc.update == "per-layer":
        return jax.jit(layerwise.make_step(cfg, tc, optimizer), donate_argnums=(0, 1))

    def micro_grads(trainable, frozen, micro, key):
        def loss_of(t):
            params, delta = join(t, frozen)
            return batch_loss(cfg, tc, params, delta, micro, key)

        (loss_sum, tokens), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        return loss_sum, tokens, grads

    def step(trainable, opt_state, frozen, batch, key):
        keys = jax.random.split(key, tc.grad_accum)

        def accumulate(carry, xs):
            loss_sum, tokens, grads = carry
            micro, k = xs
            l, n, g = micro_grads(trainable, frozen, micro, k)
            return (loss_sum + l, tokens + n, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        if tc.grad_accum == 1:
            loss_sum, tokens, grads = micro_grads(trainable, frozen, jax.tree.map(lambda x: x[0], batch), keys[0])
        else:
            (loss_sum, tokens, grads), _ = jax.lax.scan(accumulate, init, (batch, keys))
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss, grad_norm = loss_sum / denom, optax.global_norm(grads)
        if tc.max_grad_norm is not None:
            grads, _ = optax.clip_by_global_norm(tc.max_grad_norm).update(grads, optax.EmptyState())
        # A step whose loss, gradient or update is not finite (an update whose norm
        # overflows counts) is not applied: the state stays as it was, and finetune stops.
        # The check runs before the update, so the update itself is made in place.
        update_sq = layerwise_update_sq_norm(optimizer, grads, opt_state, trainable, cfg.num_layers)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_sq)
        trainable, opt_state = jax.lax.cond(finite, functools.partial(_apply_update, optimizer),
                                            lambda g, s, t: (t, s), grads, opt_state, trainable)
        metrics = {"loss": loss, "tokens": tokens, "grad_norm": grad_norm, "finite": finite}
        return trainable, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


class CompiledStep:
    """A jitted step, compiled ahead of its first run once per batch shape (and per
    placement). Freed host memory is handed back (`host.release_host_memory`) before
    compiling, and the compiler's scratch after it, before the step allocates its own
    buffers: otherwise each would add to the process's peak."""

    def __init__(self, step):
        self.step, self.executables = step, {}

    def __call__(self, *args):
        signature = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in jax.tree.leaves(args))
        executable = self.executables.get(signature)
        if executable is None:
            release_host_memory()
            executable = self.executables[signature] = self.step.lower(*args).compile()
            release_host_memory()
        return executable(*args)


def use_compilation_cache(folder, *, min_compile_seconds: float = 1.0,
                          max_bytes: int = 2**30) -> None:
    """Keep compiled programs in `folder` (JAX's persistent compilation cache, process-wide).

    A later run with the same shapes and options loads its step from there instead of
    compiling it: no compile time, and none of the compiler's host scratch (about 200
    MiB for a small model's step on the CPU, more than the step's own temporaries with
    remat). Programs that compile faster than `min_compile_seconds` are not kept; the
    folder is trimmed, oldest first, to `max_bytes`.
    """
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_compilation_cache_max_size", int(max_bytes))


def _apply_update(optimizer, grads, opt_state, trainable):
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state


def layerwise_update_sq_norm(optimizer, grads, opt_state, trainable, num_layers: int) -> jax.Array:
    """The squared norm of `optimizer`'s update, computed one layer at a time.

    The optimizer must act element by element (AdamW does): then each layer's slice of
    the update is the update of that layer's slices, and no update the size of the whole
    trainable tree is ever held beside the state it would replace."""
    def sq_norm(layer):
        views = [layer_view(t, layer) for t in (grads, opt_state, trainable)]
        updates, _ = optimizer.update(*views)
        return sum((jnp.sum(jnp.square(u.astype(jnp.float32))) for u in jax.tree.leaves(updates)),
                   jnp.zeros((), jnp.float32))

    if not any(in_layers(path) for path, _ in jax.tree_util.tree_leaves_with_path(trainable)):
        return sq_norm(None)
    return jax.lax.fori_loop(0, num_layers, lambda i, total: total + sq_norm(i), sq_norm(None))


# --------------------------------------------------------------------------- data


def _batches(data: Iterable, steps: int, grad_accum: int, skip: int = 0):
    """Yield stacked groups of `grad_accum` batches for steps `skip..steps-1`;
    cycle a re-iterable dataset."""
    reusable = isinstance(data, Sequence) or hasattr(data, "__len__") and not hasattr(data, "__next__")
    source = itertools.cycle(data) if reusable else iter(data)
    source = itertools.islice(source, skip * grad_accum, None)
    index = skip * grad_accum
    for _ in range(skip, steps):
        group = []
        for _ in range(grad_accum):
            try:
                group.append(normalize_batch(next(source), index))
            except StopIteration:
                return
            index += 1
        shapes = {g["input_ids"].shape for g in group}
        if len(shapes) > 1:
            raise ValueError(f"batches {index - grad_accum}..{index - 1}: accumulated batches must "
                             f"share one shape, got {sorted(shapes)}")
        yield {k: np.stack([g[k] for g in group]) for k in group[0]}


# --------------------------------------------------------------------------- finetune


@dataclasses.dataclass
class FinetuneResult:
    delta: Any
    history: list[dict]            # the steps this call ran
    trainable_params: int
    config: TrainConfig
    earlier_history: list[dict] = dataclasses.field(default_factory=list)  # before a resume

    @property
    def full_history(self) -> list[dict]:
        """Every step of the run, those before a resume included."""
        return self.earlier_history + self.history


def finetune(
    params: llama.Params,
    selection: Any,
    data: Iterable[Mapping[str, Any]],
    *,
    config: llama.LlamaConfig,
    steps: int = 20,
    learning_rate: float = 1e-3,
    method: str = "spsft",
    targets: Any = "all-linear",
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    tune_norms: bool = False,
    tune_bias: bool = False,
    tokentune: float | None = None,
    remat: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int | None = 3,
    restart: bool = False,
    checkpoint_info: Mapping[str, Any] | None = None,
    **train_options,
) -> FinetuneResult:
    """Fine-tune and return the trained delta and the per-step history.

    params: frozen parameters (any float dtype; bf16 keeps the base in bf16 while the
        trainable pytree and optimizer state stay float32).
    selection: rows to train for method="spsft" (`spsft_jax.selection.select`); ignored otherwise.
    data: iterable of batches, dicts of int32 `input_ids`, `attention_mask`, `labels`
        (`[batch, seq]`, labels -100 where no loss). A list is cycled; an iterator ends
        training early when exhausted.
    method: "spsft", "lora", "dense" or "head".
    alpha, dropout: LoRA's scale numerator and input dropout (the paper's baseline: 16, 0.1).
    tokentune: fraction (or count) of tokens to backpropagate through (TokenTune).
    mesh: a `jax.sharding.Mesh` with "data" / "fsdp" axes (`spsft_jax.sharding.make_mesh`),
        or a spec such as "data=2,fsdp=4": batches split over both axes, frozen weights,
        trainable delta and optimizer state split over fsdp (`spsft_jax.sharding`).
    checkpoint_dir: save the trainable pytree and optimizer state there (orbax) every
        `checkpoint_every` steps and at the end; a run pointed at a folder holding a
        checkpoint resumes from its step (skipping the batches already seen).
    keep_checkpoints: how many of the latest checkpoints to keep (None: all).
    restart: start afresh even when `checkpoint_dir` holds checkpoints; they are kept
        until this run has saved its first, which then takes the folder's place.
    checkpoint_info: JSON-able notes recorded in `run.json` (not checked on resume), for
        the caller to read back with `checkpoint.read_run_info`.
    train_options: further `TrainConfig` fields (warmup, schedule, weight_decay, grad_accum, seed...).
    """
    tc = TrainConfig(steps=steps, learning_rate=learning_rate, tokentune=tokentune, remat=remat,
                     **train_options)
    trainable, frozen = prepare(params, selection, method=method, targets=targets, rank=rank,
                                alpha=alpha, tune_norms=tune_norms, tune_bias=tune_bias,
                                key=jax.random.key(tc.seed), dropout=dropout)
    # A float32 copy: the step donates it, and the caller's parameters must survive.
    trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)
    optimizer = make_optimizer(tc)
    state = {"trainable": trainable, "opt_state": optimizer.init(trainable)}
    run = None if checkpoint_dir is None else run_info(config, trainable, method=method,
                                                       selection=selection, rank=rank, alpha=alpha)
    checkpoints = Checkpoints(checkpoint_dir, checkpoint_every, run, keep=keep_checkpoints,
                              restart=restart, info=dict(checkpoint_info or {}),
                              selection=selection if method == "spsft" else None, config=config)
    first, state = checkpoints.restore(state)
    state, history = train_loop(config, tc, optimizer, state, frozen, data, first=first, mesh=mesh,
                                progress=progress, callback=callback, checkpoints=checkpoints)
    if not history and first < tc.steps:
        raise ValueError("data yielded no batches")
    if history and not any(h["loss_tokens"] for h in history):
        raise ValueError(f"no step saw a loss token in {len(history)} steps: every label was -100 "
                         f"(or TokenTune selected none); nothing was trained")
    delta = deltas.combine(state["trainable"]["delta"], frozen["delta"])
    return FinetuneResult(delta, history, deltas.num_trainable(delta), tc, checkpoints.earlier)


def train_loop(cfg: llama.LlamaConfig, tc: TrainConfig, optimizer: optax.GradientTransformation,
               state: dict, frozen: dict, data: Iterable[Mapping[str, Any]], *, first: int = 0,
               mesh: jax.sharding.Mesh | None = None, progress: bool = False,
               callback: Callable[[dict], None] | None = None,
               checkpoints: Checkpoints | None = None) -> tuple[dict, list[dict]]:
    """Steps `first .. tc.steps - 1` over `data` from `state` ({"trainable", "opt_state"}):
    (the final state, one `step_record` per step). A step that was not applied raises."""
    checkpoints = checkpoints or Checkpoints(None)
    step = make_train_step(cfg, tc, optimizer)
    if mesh is not None:
        mesh, state, frozen, step = _on_mesh(mesh, state, frozen, step)
    step = CompiledStep(step)
    place, schedule, base_key = _placement(mesh), learning_rate_schedule(tc), jax.random.key(tc.seed + 1)
    history: list[dict] = []
    bar = _progress(tc.steps, first, progress)
    for i, batch in enumerate(_batches(data, tc.steps, tc.grad_accum, skip=first), start=first):
        start = time.perf_counter()
        trainable, opt_state, metrics = step(state["trainable"], state["opt_state"], frozen, place(batch),
                                             jax.random.fold_in(base_key, i))
        jax.block_until_ready(metrics)
        record = step_record(i, metrics, int(batch["attention_mask"].sum()),
                             time.perf_counter() - start, schedule)
        if not bool(metrics["finite"]):
            checkpoints.fault(i + 1, record)
        state = {"trainable": trainable, "opt_state": opt_state}
        history.append(record)
        if callback is not None:
            callback(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        bar.update(1)
        checkpoints.after_step(i + 1, tc.steps, state, history)
    bar.close()
    return state, history


def step_record(index: int, metrics: Mapping[str, jax.Array], tokens: int, seconds: float,
                schedule: optax.Schedule) -> dict:
    """The history entry of step `index` (0-based) from the step's metrics."""
    return {"step": index + 1, "loss": float(metrics["loss"]), "learning_rate": float(schedule(index)),
            "grad_norm": float(metrics["grad_norm"]), "tokens": tokens,
            "loss_tokens": int(metrics["tokens"]), "step_s": seconds, "tokens_per_s": tokens / seconds}


@dataclasses.dataclass
class Checkpoints:
    """Where a run keeps its training state (`folder` None: nowhere), every how many
    steps (and at the last), what it belongs to (`run_info`), and the steps it saved.

    restart: the folder's old checkpoints are not resumed; the run saves into a staging
    folder beside it, which takes the folder's place at the first save."""

    folder: str | None
    every: int = 0
    run: dict | None = None
    keep: int | None = None
    restart: bool = False
    info: dict = dataclasses.field(default_factory=dict)
    selection: Any = None          # saved beside the state, so a resume trains the same rows
    config: Any = None
    saved: list[int] = dataclasses.field(default_factory=list)  # latest last
    resumed_from: int = 0
    earlier: list[dict] = dataclasses.field(default_factory=list)  # history before the resume

    def restore(self, state: dict) -> tuple[int, dict]:
        """(first step to run, state): the folder's latest checkpoint, else (0, state)."""
        if self.folder is None or self.restart:
            return 0, state
        from spsft_jax import checkpoint

        restored = checkpoint.restore_state(self.folder, state, run=self.run)
        if restored is None:
            return 0, state
        self.resumed_from = restored[0]
        self.earlier = [h for h in checkpoint.read_history(self.folder) if h.get("step", 0) <= restored[0]]
        return restored

    def after_step(self, step: int, last: int, state: dict, history: Sequence[dict] = ()) -> None:
        """Save at every `every`-th step and the last; `history`: this call's steps so far."""
        if self.folder is None or not (step == last or (self.every and step % self.every == 0)):
            return
        from spsft_jax import checkpoint, outputs

        folder = outputs.staging_dir(self.folder) if self.restart else self.folder
        if not self.saved:
            self._first_files(folder)
        run = {**self.run, "info": self.info} if self.run is not None else None
        checkpoint.save_state(folder, step, state, run=run, keep=self.keep)
        checkpoint.write_history(folder, self.earlier + list(history))
        self.saved.append(step)
        if self.restart:
            outputs.swap_in(folder, self.folder)
            self.restart = False  # from here on the new folder is the run's

    def _first_files(self, folder) -> None:
        """What a resume needs besides the state: the rows this run trains."""
        if self.selection is not None:
            from spsft_jax import selection as selection_lib

            file = Path(folder) / "selection.safetensors"
            selection_lib.save(file, self.selection, cfg=self.config, overwrite=True)

    def fault(self, step: int, record: dict) -> None:
        _stop_on_fault(step, record, self.folder, self.saved, resumed_from=self.resumed_from)


def run_info(cfg: llama.LlamaConfig, trainable: Any, *, method: str, selection: Any, rank: int,
             alpha: float | None) -> dict:
    """What a training state belongs to; a resume must match it field by field."""
    from spsft_jax import checkpoint
    from spsft_jax import selection as selection_lib

    return {
        "method": method,
        "selection": selection_lib.digest(selection) if method == "spsft" else None,
        "rank": rank if method == "lora" else None,
        "alpha": alpha if method == "lora" else None,
        "model": checkpoint.architecture(cfg),
        "trainable": {jax.tree_util.keystr(k): list(v.shape)
                      for k, v in jax.tree_util.tree_leaves_with_path(trainable)},
    }


def _stop_on_fault(step: int, record: dict, checkpoint_dir, saved: list[int], *, resumed_from: int) -> None:
    """Raise for a step that was not applied. A non-finite loss means the state it started
    from is already bad: its checkpoint, when this run just wrote it, is removed, so the
    last good one stays the latest."""
    loss = record["loss"]
    if not math.isfinite(loss) and saved and saved[-1] == step - 1 and checkpoint_dir is not None:
        from spsft_jax import checkpoint

        checkpoint.delete_state(checkpoint_dir, saved.pop())
    what = (f"loss is {loss}" if not math.isfinite(loss) else
            f"gradient norm is {record['grad_norm']}" if not math.isfinite(record["grad_norm"]) else
            "the update is not finite")
    latest = saved[-1] if saved else resumed_from
    kept = f"; the latest checkpoint is step {latest}" if checkpoint_dir is not None and latest else ""
    raise FloatingPointError(f"step {step}: {what}, so it was not applied; lower the learning "
                             f"rate{kept}")


def _progress(total: int, first: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=first, desc="finetune", unit="step", disable=not enabled)


def _on_mesh(mesh, state: dict, frozen: dict, step):
    """(mesh, state, frozen, step) laid out by `spsft_jax.sharding`'s rules."""
    from spsft_jax import sharding

    mesh = sharding.make_mesh(mesh)
    state, frozen = sharding.shard(state, mesh), sharding.shard(frozen, mesh)
    return mesh, state, frozen, sharding.sharded_step(step, mesh, state["trainable"], state["opt_state"])


def _placement(mesh):
    if mesh is None:
        return lambda batch: jax.tree.map(jnp.asarray, batch)
    from spsft_jax import sharding

    # [grad_accum, batch, seq]: the batch axis split over ("data", "fsdp").
    return lambda batch: sharding.place_batch(batch, mesh, axis=1)
