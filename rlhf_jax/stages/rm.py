"""Reward model: K-wise rankings, all C(K,2) pairs of a prompt in one batch element (eq. 1).

The RM is the SFT model with its unembedding replaced by a scalar head (InstructGPT section 3.5),
read at each completion's EOS (the last response token when there is none; METHOD.md 2.1). After
training, a bias is fitted so that the SFT demonstrations score 0 on average (section 2.3); it is
exported with the params as ``{"params": ..., "bias": ...}`` and subtracted whenever the RM scores.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import checkpoint, losses, rollout, sharding
from rlhf_jax.config import Config, ModelConfig
from rlhf_jax.data import loaders
from rlhf_jax.stages.common import (
    Loop,
    MetricsLog,
    config_json,
    initial_params,
    jit_step,
    loader,
    split_size,
    stage_exists,
)
from rlhf_jax.train_state import (
    TrainState,
    abstract_state,
    apply_gradients,
    create_train_state,
    key_data,
    make_optimizer,
    scalar_head_params,
    train_state_shardings,
)


def rm_config(config: Config) -> ModelConfig:
    """The reward/value architecture: the policy's, with a scalar head and no dropout."""
    return dataclasses.replace(config.model, head="scalar", dropout=0.0)


def completion_rewards(params, model: ModelConfig, batch: dict, prompt_len: int):
    """Scores [B K] of every completion in a comparison batch (tokens [B K T])."""
    return rollout.reward_scores(
        params, model, batch["tokens"], batch["attention_mask"], prompt_len, batch["response_mask"]
    )


def make_rm_step(model: ModelConfig, tx, shardings: TrainState, mesh, prompt_len: int):
    def step(state: TrainState, batch: dict):
        def loss_fn(params):
            rewards = completion_rewards(params, model, batch, prompt_len)
            return losses.ranking_loss(rewards, batch["ranks"], valid=batch["valid"])

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return apply_gradients(tx, state, grads), {"loss": loss, "accuracy": accuracy}

    return jit_step(step, shardings, mesh)


def demonstration_scores(
    params, model: ModelConfig, config: Config, workdir, *, batch_size: int = 256
) -> np.ndarray:
    """Raw RM scores of every SFT-train demonstration (the normalisation set of section 2.3)."""
    data = loader(
        config, workdir, "sft", batch_size, 0, epochs=1, shuffle=False, drop_remainder=False
    )
    score = jax.jit(
        lambda p, b: rollout.reward_scores(
            p, model, b["tokens"], b["attention_mask"], config.data.prompt_len, b["response_mask"]
        )
    )
    return np.concatenate([np.asarray(score(params, b)) for b in data])


def run_rm(config: Config, workdir: str | os.PathLike, *, mesh=None) -> dict:
    """Train the RM on the comparison dataset; resumes its own checkpoint if there is one."""
    mesh = mesh or sharding.make_mesh(config.mesh)
    cfg, model, P = config.rm, rm_config(config), config.data.prompt_len
    procs = jax.process_count()  # batch sizes are global; each process loads its share
    data = loader(config, workdir, "rm", cfg.batch_size // procs, config.seed, epochs=cfg.epochs)
    iters = [iter(data)]
    total = cfg.epochs * (split_size(config, workdir, "rm") // cfg.batch_size)
    tx = make_optimizer(cfg.optimizer, total)
    shardings = train_state_shardings(model, tx, mesh, config.mesh.rules)
    ckpt = checkpoint.StageCheckpointer(
        workdir, "rm", keep=config.keep_checkpoints, config=config_json(config)
    )

    def start():
        lm = dataclasses.replace(config.model, dropout=0.0)
        previous = "sft" if stage_exists(workdir, "sft") else None
        sft = jax.device_get(initial_params(config, workdir, previous, lm, mesh))
        params = scalar_head_params(sft, model, jax.random.key(config.seed + 2))
        return create_train_state(params, tx, key_data(config.seed), shardings)

    target = checkpoint.abstract_with_shardings(abstract_state(model, tx), shardings)
    state, data_state, _ = checkpoint.resume_or_start(ckpt, target, start=start)
    if data_state:
        loaders.set_iterator_state(iters[0], data_state["iterators"][0])

    def batches():
        for b in iters[0]:
            yield {k: b[k] for k in ("tokens", "attention_mask", "response_mask", "ranks", "valid")}

    def export(s: TrainState):
        scores = demonstration_scores(s.params, model, config, workdir)
        return {"params": s.params, "bias": jnp.asarray(scores.mean(), jnp.float32)}

    loop = Loop("rm", config, ckpt, MetricsLog(workdir, "rm"), mesh, key_metric="accuracy")
    _, meta = loop.run(
        state,
        make_rm_step(model, tx, shardings, mesh, P),
        batches(),
        start=int(jax.device_get(state.step)),
        total=total,
        data_state=lambda: {"iterators": [loaders.get_iterator_state(iters[0])]},
        export=export,
    )
    ckpt.close()
    return meta


def load_reward_model(config: Config, workdir, mesh) -> tuple[dict, jax.Array]:
    """The exported RM params (sharded) and its bias."""
    model = rm_config(config)
    from rlhf_jax.train_state import params_shardings

    shardings = params_shardings(model, mesh, config.mesh.rules)
    abstract = abstract_state(model, optax.identity()).params
    target = {
        "params": checkpoint.abstract_with_shardings(abstract, shardings),
        "bias": jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh)),
    }
    exported = checkpoint.exported_params(workdir, "rm", target)
    return exported["params"], exported["bias"]
