"""Reward model: K-wise rankings, all C(K,2) pairs of a prompt in one batch element (eq. 1).

The RM is the SFT model with its unembedding replaced by a scalar head (InstructGPT section 3.5),
read at each completion's EOS (the last response token when there is none; docs/method.md section
2.1). After training, a bias is fitted so that the SFT demonstrations score 0 on average (section
2.3); it is exported with the params as ``{"params": ..., "bias": ...}`` and subtracted whenever
the RM scores.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, rollout, sharding
from rlhf_jax.config import Config, ModelConfig, rm_config
from rlhf_jax.data import sources
from rlhf_jax.stages.driver import (
    StageRun,
    drive,
    initial_params,
    jit_step,
    loader,
    one_model,
    policy_model,
    start_point,
)
from rlhf_jax.train_state import TrainState, apply_gradients, scalar_head_params


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
    config.validate()
    mesh = mesh or sharding.make_mesh(config.mesh)
    cfg, model, P = config.rm, rm_config(config), config.data.prompt_len
    origin = start_point(config, workdir, "rm")
    procs = jax.process_count()  # batch sizes are global; each process loads its share
    data = loader(config, workdir, "rm", cfg.batch_size // procs, config.seed, epochs=cfg.epochs)
    iters = [iter(data)]
    total = cfg.epochs * (sources.split_size(config, workdir, "rm") // cfg.batch_size)

    def init():
        sft = initial_params(config, workdir, origin, policy_model(config), mesh)
        return scalar_head_params(jax.device_get(sft), model, jax.random.key(config.seed + 2))

    state = one_model(config, model, cfg.optimizer, total, mesh, init)

    def batches():
        for b in iters[0]:
            yield {k: b[k] for k in ("tokens", "attention_mask", "response_mask", "ranks", "valid")}

    def export(s: TrainState):
        scores = demonstration_scores(s.params, model, config, workdir)
        return {"params": s.params, "bias": jnp.asarray(scores.mean(), jnp.float32)}

    run = StageRun(
        stage="rm",
        total=total,
        target=state.target,
        start=state.start,
        step=make_rm_step(model, state.tx, state.shardings, mesh, P),
        iterators=iters,
        batches=batches(),
        export=export,
        position=lambda s: s.step,
        key_metric="accuracy",
    )
    return drive(config, workdir, run, mesh)
