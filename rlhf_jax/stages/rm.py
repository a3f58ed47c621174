"""Reward model: K-wise rankings, all C(K,2) pairs of a prompt in one batch element (eq. 1).

The RM is the SFT model with its unembedding replaced by a scalar head (InstructGPT section 3.5),
read at each completion's EOS (the last response token when there is none; docs/method.md section
2.1). After training, a bias is fitted so that the SFT demonstrations score 0 on average (section
2.3); it is exported with the params as ``{"params": ..., "bias": ...}`` and subtracted whenever
the RM scores.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses, rollout, sharding
from rlhf_jax.config import Config, ModelConfig
from rlhf_jax.data import sources
from rlhf_jax.data.loaders import placeholder_batch
from rlhf_jax.data.records import Kind
from rlhf_jax.data.sources import loader
from rlhf_jax.evaluate import comparison_metrics
from rlhf_jax.rollout import RewardModel
from rlhf_jax.sharding import abstract_batch
from rlhf_jax.stage_table import Pass, PlanInputs, Program
from rlhf_jax.stages.driver import (
    PLANNED_STEPS,
    OneModel,
    StageRun,
    drive,
    jit_step,
    one_model,
    preflight,
)
from rlhf_jax.stages.lineage import initial_reward_params, rm_architecture, start_point
from rlhf_jax.train_state import TrainState, apply_gradients


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


def validation_metrics(params, model: ModelConfig, config: Config, workdir) -> dict[str, float]:
    """The RM's pairwise accuracy, ranking loss and number of pairs on the held-out comparisons
    (``rm_val``; ``rlhf_jax.evaluate.comparison_metrics``), before its bias is fitted."""
    return comparison_metrics(
        sources.read_all(config, workdir, "rm_val"),
        RewardModel(params, model, 0.0),
        prompt_len=config.data.prompt_len,
        batch_size=config.eval.batch_size,
    )


COMPARISON_FIELDS = ("tokens", "attention_mask", "response_mask", "ranks", "valid")


def comparison_batch(b: dict) -> dict:
    """The step's batch from a comparison loader's batch (RM and DPO)."""
    return {k: b[k] for k in COMPARISON_FIELDS}


def planned_comparisons(config: Config, batch_size: int, inputs: PlanInputs) -> dict:
    """A comparison batch as a plan assumes it (K = ``inputs.completions``), packed as the
    loader packs one (RM and DPO)."""
    d = config.data
    return comparison_batch(
        placeholder_batch(
            Kind.COMPARISONS,
            batch_size,
            prompt_len=d.prompt_len,
            response_len=d.response_len,
            max_completions=inputs.completions,
        )
    )


def rm_setup(config: Config, total: int, mesh, init=None) -> tuple[OneModel, Any]:
    """The RM's state (``OneModel``) and jitted step: what ``run_rm`` drives and
    ``rm_programs`` plans."""
    model = rm_architecture(config)
    state = one_model(config, model, config.rm.optimizer, total, mesh, init)
    return state, make_rm_step(model, state.tx, state.shardings, mesh, config.data.prompt_len)


def rm_programs(config: Config, stage: str, mesh, inputs: PlanInputs) -> list[Program]:
    """The RM step on abstract inputs (``stage_table.Stage.plan``)."""
    batch = planned_comparisons(config, config.rm.batch_size, inputs)
    state, step = rm_setup(config, PLANNED_STEPS, mesh)
    B, K, T = batch["tokens"].shape
    work = (Pass(rm_architecture(config), "train", B * K * T, T),)
    args = (state.target, abstract_batch(batch, mesh))
    return [Program(f"{stage} step", step, args, B * K * T, work, "rm.batch_size")]


def run_rm(config: Config, workdir: str | os.PathLike, stage: str = "rm", *, mesh=None) -> dict:
    """Train the RM on the comparison dataset; resumes its own checkpoint if there is one.

    It starts from this run's SFT model, or from ``rm.init_from`` (an HF checkpoint, another
    run's stage, or a named size): the RM may be larger than the policy, as InstructGPT's 6B RM
    was for every policy size (``stages.lineage``)."""
    config.validate()
    cfg = config.rm
    model = rm_architecture(config)
    start_point(config, workdir, stage)
    fingerprints = preflight(
        config,
        workdir,
        stage,
        {"rm": (cfg.batch_size, "rm.batch_size"), "sft": (1, "")},
        ((cfg.batch_size, "rm.batch_size"),),
    )
    mesh = mesh or sharding.make_mesh(config.mesh)
    data = loader(config, workdir, "rm", cfg.batch_size, config.seed, epochs=cfg.epochs)
    iters = [iter(data)]
    total = cfg.epochs * (sources.split_size(config, workdir, "rm") // cfg.batch_size)
    init = lambda: initial_reward_params(config, workdir, model, mesh)  # noqa: E731
    state, step = rm_setup(config, total, mesh, init)

    def batches():
        for b in iters[0]:
            yield comparison_batch(b)

    def export(s: TrainState):
        scores = demonstration_scores(s.params, model, config, workdir)
        return {"params": s.params, "bias": jnp.asarray(scores.mean(), jnp.float32)}

    validate = None
    if sources.expected_size(config, workdir, "rm_val"):

        def validate(s: TrainState) -> dict[str, float]:
            metrics = validation_metrics(s.params, model, config, workdir)
            return {"val/accuracy": metrics["val_accuracy"], "val/loss": metrics["val_loss"]}

    run = StageRun(
        stage=stage,
        model=model,
        fingerprints=fingerprints,
        total=total,
        target=state.target,
        start=state.start,
        step=step,
        iterators=iters,
        batches=batches(),
        export=export,
        position=lambda s: s.step,
        key_metric="accuracy",
        validate=validate,
    )
    return drive(config, workdir, run, mesh)
