"""Reward model: K-wise rankings, all C(K,2) pairs of a prompt in one batch element (eq. 1).

The RM is the SFT model with its unembedding replaced by a scalar head (InstructGPT section 3.5),
read at each completion's EOS (the last response token when there is none; docs/method.md section
2.1). After training, a bias is fitted so that the SFT demonstrations score 0 on average (section
2.3); it is exported with the params as ``{"params": ..., "bias": ...}`` and subtracted whenever
the RM scores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import lora, losses, rollout, sharding
from rlhf_jax.config import MODEL_SIZES, Config, ModelConfig
from rlhf_jax.data import sources
from rlhf_jax.data.loaders import placeholder_batch
from rlhf_jax.data.records import Kind
from rlhf_jax.data.sources import loader
from rlhf_jax.evaluate import comparison_metrics
from rlhf_jax.rollout import RewardModel
from rlhf_jax.sharding import abstract_batch
from rlhf_jax.stage_table import FRESH, Pass, PlanInputs, Program
from rlhf_jax.stages.driver import (
    PLANNED_STEPS,
    OneModel,
    StageRun,
    drive,
    jit_step,
    one_model,
    preflight,
)
from rlhf_jax.stages.lineage import (
    base_fingerprints,
    base_name,
    initial_reward_params,
    rm_architecture,
    start_point,
    trained_model,
)
from rlhf_jax.train_state import TrainState, accumulate, apply_gradients


def completion_rewards(params, model: ModelConfig, batch: dict, prompt_len: int):
    """Scores [B K] of every completion in a comparison batch (tokens [B K T])."""
    return rollout.reward_scores(
        params, model, batch["tokens"], batch["attention_mask"], prompt_len, batch["response_mask"]
    )


def make_rm_step(
    model: ModelConfig, tx, shardings: TrainState, mesh, prompt_len: int, *, micro=1, frozen=None
):
    """``step(state, frozen, batch)``: one optimiser step on the ranking loss, its gradient
    accumulated over ``micro`` micro-batches (``frozen``: the LoRA base's abstract target)."""

    def step(state: TrainState, frozen_params, batch: dict):
        def loss_fn(params, b):
            rewards = completion_rewards(lora.merge(frozen_params, params), model, b, prompt_len)
            loss, accuracy = losses.ranking_loss(rewards, b["ranks"], valid=b["valid"])
            pairs = jnp.sum(losses.ranked_pairs(b["ranks"], b["valid"])).astype(jnp.float32)
            # The accuracy is pooled over pairs: its sums add over micro-batches.
            return loss, {"correct_sum": accuracy * pairs, "pairs_sum": pairs}

        def weight(b):  # the loss is a mean over the prompts that have a pair
            return jnp.sum(jnp.any(losses.ranked_pairs(b["ranks"], b["valid"]), axis=(1, 2)))

        out = accumulate(loss_fn, state.params, batch, micro, weight)
        correct, pairs = out.stats["correct_sum"], out.stats["pairs_sum"]
        accuracy = jnp.where(pairs > 0, correct / jnp.maximum(pairs, 1.0), 0.0)
        metrics = {"loss": out.loss, "accuracy": accuracy}
        return apply_gradients(tx, state, out.grads), metrics

    return jit_step(step, shardings, mesh, frozen)


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


def rm_model(config: Config) -> ModelConfig:
    """The reward model as the RM stage trains it (with adapters when ``lora.stages`` has rm)."""
    return trained_model(config, rm_architecture(config), "rm")


def rm_setup(config: Config, total: int, mesh, init=None) -> tuple[OneModel, Any]:
    """The RM's state (``OneModel``) and jitted step: what ``run_rm`` drives and
    ``rm_programs`` plans."""
    model = rm_model(config)
    state = one_model(config, model, config.rm.optimizer, total, mesh, init)
    step = make_rm_step(
        model,
        state.tx,
        state.shardings,
        mesh,
        config.data.prompt_len,
        micro=config.rm.grad_accum,
        frozen=state.frozen_target,
    )
    return state, step


def rm_programs(config: Config, stage: str, mesh, inputs: PlanInputs) -> list[Program]:
    """The RM step on abstract inputs (``stage_table.Stage.plan``)."""
    batch = planned_comparisons(config, config.rm.batch_size, inputs)
    state, step = rm_setup(config, PLANNED_STEPS, mesh)
    B, K, T = batch["tokens"].shape
    work = (Pass(rm_model(config), "train", B * K * T, T),)
    args = (state.target, state.frozen_target, abstract_batch(batch, mesh))
    return [Program(f"{stage} step", step, args, B * K * T, work, "rm.batch_size")]


def run_rm(config: Config, workdir: str | os.PathLike, stage: str = "rm", *, mesh=None) -> dict:
    """Train the RM on the comparison dataset; resumes its own checkpoint if there is one.

    It starts from this run's SFT model, or from ``rm.init_from`` (an HF checkpoint, another
    run's stage, or a named size): the RM may be larger than the policy, as InstructGPT's 6B RM
    was for every policy size (``stages.lineage``)."""
    config.validate()
    cfg = config.rm
    model = rm_model(config)
    start_point(config, workdir, stage)
    base = Path(cfg.init_from) if cfg.init_from else "sft"
    base = FRESH if cfg.init_from in MODEL_SIZES else base
    fingerprints = preflight(
        config,
        workdir,
        stage,
        {"rm": (cfg.batch_size, "rm.batch_size"), "sft": (1, "")},
        ((cfg.batch_size, "rm.batch_size"),),
        bases=base_fingerprints(config, workdir, model, reward=base),
    )
    mesh = mesh or sharding.make_mesh(config.mesh)
    data = loader(config, workdir, "rm", cfg.batch_size, config.seed, epochs=cfg.epochs)
    iters = [iter(data)]
    total = cfg.epochs * (sources.split_size(config, workdir, "rm") // cfg.batch_size)
    init = lambda: initial_reward_params(config, workdir, model.plain(), mesh)  # noqa: E731
    state, step = rm_setup(config, total, mesh, init)
    plain = model.plain()

    def batches():
        for b in iters[0]:
            yield comparison_batch(b)

    def params_of(s: TrainState):  # the plain RM: adapters folded into the base
        return lora.plain(state.frozen(), s.params, model)

    def export(s: TrainState):
        params = params_of(s)
        scores = demonstration_scores(params, plain, config, workdir)
        return {"params": params, "bias": jnp.asarray(scores.mean(), jnp.float32)}

    validate = None
    if sources.expected_size(config, workdir, "rm_val"):

        def validate(s: TrainState) -> dict[str, float]:
            metrics = validation_metrics(params_of(s), plain, config, workdir)
            return {"val/accuracy": metrics["val_accuracy"], "val/loss": metrics["val_loss"]}

    run = StageRun(
        stage=stage,
        model=plain,
        fingerprints=fingerprints,
        total=total,
        target=state.target,
        start=state.start,
        step=lambda s, b: step(s, state.frozen(), b),
        iterators=iters,
        batches=batches(),
        export=export,
        position=lambda s: s.step,
        key_metric="accuracy",
        validate=validate,
        adapters=lambda s: s.params,
        adapted=model,
        base=base_name(config, base),
    )
    return drive(config, workdir, run, mesh)
