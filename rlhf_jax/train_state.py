"""TrainState and PPOState pytrees, optimisers from config, and their sharded creation.

Random keys are stored as raw ``uint32`` key data (``jax.random.key_data``) so that states are
plain arrays that Orbax saves and restores on any mesh; ``state_key`` wraps them back.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from rlhf_jax import checkpoint, lora, sharding
from rlhf_jax.config import ModelConfig, OptimizerConfig
from rlhf_jax.model import Transformer, abstract_params, init_score_head


class TrainState(struct.PyTreeNode):
    """Step, params, optimiser state and key. Leaves are arrays, or abstract values / shardings
    when the same structure describes a state's shapes or placement (hence ``Any``)."""

    step: Any
    params: Any
    opt_state: Any
    rng: Any  # uint32 key data


class PPOState(struct.PyTreeNode):
    """Trainable policy and value (each with its optimiser), frozen reference and reward params
    (no optimiser state), the reward bias, the KL coefficient and the policy-weight EMA."""

    iteration: Any
    policy: TrainState
    value: TrainState
    ref_params: Any
    reward_params: Any
    reward_bias: Any
    kl_coef: Any
    ema_params: Any  # None when the EMA is off
    rng: Any


def state_key(rng_data: jax.Array, step) -> jax.Array:
    """The key for one step: ``fold_in(key, step)`` of the stored key (docs/design.md,
    decision 10)."""
    return jax.random.fold_in(jax.random.wrap_key_data(rng_data), step)


def key_data(seed: int) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed))


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from ``warmup_init_ratio * lr``, then cosine to ``end_lr_ratio * lr``, or
    constant."""
    warm = max(cfg.warmup_steps, 0)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warm, 1), cfg.end_lr_ratio)
    elif cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r}: expected 'cosine' or 'constant'")
    if not warm:
        return main
    warmup = optax.linear_schedule(cfg.lr * cfg.warmup_init_ratio, cfg.lr, warm)
    return optax.join_schedules([warmup, main], [warm])


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Adam(W) with the configured schedule and an optional global-norm clip."""
    tx = optax.adamw(
        make_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx) if cfg.grad_clip else tx


def new_train_state(params, tx, rng) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), rng)


def apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads) -> TrainState:
    """One optimiser step: the update from ``grads``, the new params, ``step + 1``."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )


def train_state_shardings(model: ModelConfig, tx, mesh: Mesh, rules) -> TrainState:
    """NamedShardings of a whole TrainState (optimiser moments follow their parameters); with
    LoRA, of the trainable part only (``lora.split``)."""
    boxed = lora.abstract_split(model).trainable
    abstract = jax.eval_shape(lambda: new_train_state(boxed, tx, key_data(0)))
    return sharding.tree_shardings(abstract, mesh, rules)


def frozen_shardings(model: ModelConfig, mesh: Mesh, rules):
    """NamedShardings of a LoRA model's frozen base (None without LoRA)."""
    frozen = lora.abstract_split(model).frozen
    return None if frozen is None else sharding.tree_shardings(frozen, mesh, rules)


def abstract_frozen(model: ModelConfig, mesh: Mesh, rules):
    """The frozen base of a LoRA model as abstract values with shardings (None without LoRA)."""
    frozen = lora.abstract_split(model).frozen
    if frozen is None:
        return None
    return checkpoint.abstract_with_shardings(frozen, sharding.tree_shardings(frozen, mesh, rules))


def adapt(params, model: ModelConfig, rng: jax.Array) -> lora.Split:
    """A LoRA stage's start from plain ``params``: the frozen base (in ``model.base_dtype``) and
    the trainable part (fresh adapters, and the params' scalar head if it has one). Without LoRA:
    no frozen part, all of ``params`` trainable."""
    if not model.adapted:
        return lora.Split(None, params)
    parts = lora.split(lora.merge(params, lora.fresh_adapters(model, rng)), model)
    return lora.Split(lora.to_base_dtype(parts.frozen, model), parts.trainable)


class Accumulated(NamedTuple):
    """A minibatch's loss, its statistics and its gradient, from its micro-batches."""

    loss: Any
    stats: Any
    grads: Any


def accumulate(loss_fn, params, batch, micro: int, weight_fn) -> Accumulated:
    """``value_and_grad(loss_fn, has_aux=True)(params, batch)`` computed over ``micro``
    micro-batches (gradient accumulation): memory follows a micro-batch, the numbers the batch.

    ``loss_fn(params, b) -> (loss, stats)`` is a mean over some units of ``b`` (tokens, pairs,
    rows), and ``weight_fn(b)`` counts those units in ``b``. The batch's mean is the weighted
    mean of the micro-batches' means, so its loss and gradient are ``sum_i (n_i / N) L_i`` and
    ``sum_i (n_i / N) g_i``: equal to the whole batch's within float32 rounding. Statistics (a
    dict) are averaged the same way; ``*_max`` ones take the max and ``*_sum`` ones the sum.
    Micro-batch ``i`` is rows ``i, i + m, i + 2m, ...``, so each device's share of a
    data-parallel batch splits without moving rows. With ``micro == 1`` this is exactly
    ``value_and_grad``."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro == 1:
        (loss, stats), grads = grad_fn(params, batch)
        return Accumulated(loss, stats, grads)
    parts = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1), batch
    )
    weights = jax.vmap(weight_fn)(parts).astype(jnp.float32)
    total = jnp.sum(weights)
    shares = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 1.0 / micro)

    def body(acc, xs):
        part, share = xs
        (loss, stats), grads = grad_fn(params, part)
        acc = jax.tree.map(lambda a, g: a + share * g.astype(a.dtype), acc, grads)
        return acc, (loss, stats)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses_, stats) = jax.lax.scan(body, zeros, (parts, shares))
    mean = lambda x: jnp.sum(shares.reshape(-1, *[1] * (x.ndim - 1)) * x, axis=0)  # noqa: E731
    pool = {"_max": lambda v: v.max(axis=0), "_sum": lambda v: v.sum(axis=0)}
    stats = {k: pool.get(k[-4:], mean)(v) for k, v in stats.items()}
    return Accumulated(mean(losses_), stats, grads)


def create_train_state(params, tx, rng: jax.Array, shardings: TrainState) -> TrainState:
    """A fresh TrainState around existing params, created directly into ``shardings``."""
    create = jax.jit(
        lambda p, r: new_train_state(p, tx, r),
        in_shardings=(shardings.params, None),
        out_shardings=shardings,
    )
    return create(params, rng)


def init_model_params(model: ModelConfig, rng: jax.Array, mesh: Mesh, rules):
    """Randomly initialised params, materialised directly in their shardings."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params, _ = sharding.init_sharded(
        lambda: Transformer(model).init(rng, tokens)["params"], mesh, rules
    )
    return params


def scalar_head_params(lm_params: dict, scalar_model: ModelConfig, rng: jax.Array) -> dict:
    """RM initialisation (InstructGPT section 3.5): the LM's params without its unembedding, plus
    a fresh scalar head with std 1/sqrt(D+1) (N+).

    The head has the values a full ``init_params(scalar_model, rng)`` would give it, but only the
    head is initialised (``model.init_score_head``): a second whole model would not fit next to
    a 7B one."""
    params = {k: v for k, v in lm_params.items() if k != "lm_head"}
    params["score_head"] = init_score_head(scalar_model, rng)
    return params


def shift_scalar_head(params: dict, delta) -> dict:
    """``params`` of a scalar-head model whose output is shifted by ``delta`` (a copy)."""
    head = dict(params["score_head"])
    head["bias"] = head["bias"] + jnp.asarray(delta, head["bias"].dtype)
    return {**params, "score_head": head}


def params_shardings(model: ModelConfig, mesh: Mesh, rules):
    return sharding.tree_shardings(abstract_params(model), mesh, rules)


def ema_update(ema, params, decay: float):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def abstract_state(model: ModelConfig, tx) -> TrainState:
    """Shapes and dtypes of a TrainState (add shardings: ``checkpoint.abstract_with_shardings``);
    with LoRA, of the trainable part only."""
    params = nn.meta.unbox(lora.abstract_split(model).trainable)
    return jax.eval_shape(lambda: new_train_state(params, tx, key_data(0)))
