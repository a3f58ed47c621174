"""DPO (Rafailov et al. 2023) and its IPO and hinge variants: the SFT policy trained directly on
the comparisons, with the SFT model as the frozen reference; no reward model, no sampling.

A comparison batch holds B prompts with K completions each (``tokens`` [B K T]). One step runs
the policy and the reference over all B K sequences once, sums (or averages) each response's
token log-probs (``losses.sequence_logprobs``), and lays the K x K grid of pairs over them:
pair (i, j) counts when completion i is ranked strictly above j and both are real, so a K-wise
ranking gives its C(K,2) pairs without a forward pass per pair, and ties are dropped as in the
reward model (InstructGPT appendix C.2). ``losses.dpo_loss`` averages over the counted pairs.

The reference params are loaded from the SFT stage's export at every start, fresh or resumed, and
passed to the jitted step beside the state (not saved with it): a resumed run sees the same
reference, and the checkpoint holds one model.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint, lora, losses, sharding
from rlhf_jax.config import Config, DPOConfig, ModelConfig
from rlhf_jax.data import sources
from rlhf_jax.data.sources import loader
from rlhf_jax.model import predicted_logprobs
from rlhf_jax.sharding import abstract_batch
from rlhf_jax.stage_table import Pass, PlanInputs, Program
from rlhf_jax.stages.driver import PLANNED_STEPS, OneModel, StageRun, drive, one_model, preflight
from rlhf_jax.stages.lineage import (
    base_fingerprints,
    base_name,
    initial_params,
    policy_model,
    start_point,
    trained_model,
)
from rlhf_jax.stages.rm import comparison_batch, planned_comparisons
from rlhf_jax.train_state import (
    TrainState,
    abstract_params,
    accumulate,
    apply_gradients,
    frozen_shardings,
    params_shardings,
)


def completion_logprobs(
    params, model: ModelConfig, batch: dict, prompt_len: int, *, average: bool = False
) -> jax.Array:
    """log pi(y_k | x) [B K] of every completion of a comparison batch (tokens [B K T])."""
    B, K, T = batch["tokens"].shape
    tokens = batch["tokens"].reshape(B * K, T)
    attention = batch["attention_mask"].reshape(B * K, T)
    per_token = predicted_logprobs(params, model, tokens, attention, prompt_len).logprobs
    mask = batch["response_mask"].reshape(B * K, T)[:, prompt_len:]
    return losses.sequence_logprobs(per_token, mask, average=average).reshape(B, K)


def dpo_batch_loss(
    policy_params, ref_params, model: ModelConfig, cfg: DPOConfig, batch: dict, prompt_len: int
):
    """``losses.dpo_loss`` over every counted pair of the batch; ``(loss, stats)``."""
    logp = completion_logprobs(
        policy_params, model, batch, prompt_len, average=cfg.average_logprobs
    )
    ref = completion_logprobs(ref_params, model, batch, prompt_len, average=cfg.average_logprobs)
    ref = jax.lax.stop_gradient(ref)
    pairs = losses.ranked_pairs(batch["ranks"], batch["valid"])
    B, K = logp.shape

    def grid(x, axis):  # [B K] -> [B*K*K]: the chosen (axis 2) or rejected (axis 1) side
        return jnp.broadcast_to(jnp.expand_dims(x, axis), (B, K, K)).reshape(-1)

    loss, stats = losses.dpo_loss(
        grid(logp, 2),
        grid(logp, 1),
        grid(ref, 2),
        grid(ref, 1),
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        mask=pairs.reshape(-1),
    )
    return loss, {**stats, "pairs": jnp.sum(pairs).astype(jnp.float32)}


def make_dpo_step(
    model: ModelConfig, cfg: DPOConfig, tx, shardings: TrainState, mesh, ref_sh, prompt_len: int
):
    """``step(state, batch, ref_params) -> (state, metrics)``, jitted (state donated). With
    LoRA (``model`` with adapters) ``ref_params`` is the frozen base: the policy is the base
    with the state's adapters, the reference the base alone."""

    def step(state: TrainState, batch: dict, ref_params):
        base = ref_params if model.adapted else None

        def loss_fn(params, b):
            return dpo_batch_loss(lora.merge(base, params), ref_params, model, cfg, b, prompt_len)

        def pairs(b):  # the loss is a mean over the counted pairs
            return jnp.sum(losses.ranked_pairs(b["ranks"], b["valid"]))

        out = accumulate(loss_fn, state.params, batch, cfg.grad_accum, pairs)
        stats = {**out.stats, "pairs": pairs(batch).astype(jnp.float32)}  # (a count, not a mean)
        return apply_gradients(tx, state, out.grads), {"loss": out.loss, **stats}

    batch_sh = sharding.batch_sharding(mesh, 2)
    return jax.jit(
        step,
        in_shardings=(shardings, batch_sh, ref_sh),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )


def validation_metrics(params, ref_params, model: ModelConfig, config: Config, workdir) -> dict:
    """DPO loss and implicit-reward accuracy over every counted pair of the held-out comparisons
    (``rm_val``), pooled over pairs."""
    P = config.data.prompt_len

    @jax.jit
    def sums(p, r, b):
        loss, stats = dpo_batch_loss(p, r, model, config.dpo, b, P)
        n = stats["pairs"]
        return jnp.stack([loss * n, stats["accuracy"] * n, stats["margin"] * n, n])

    data = loader(config, workdir, "rm_val", 64, 0, epochs=1, shuffle=False, drop_remainder=False)
    total = np.sum(
        [np.asarray(sums(params, ref_params, comparison_batch(b)), np.float64) for b in data],
        axis=0,
    )
    n = max(total[3], 1.0)
    return {"val/loss": total[0] / n, "val/accuracy": total[1] / n, "val/margin": total[2] / n}


class DPOSetup(NamedTuple):
    state: OneModel
    step: Any  # step(state, batch, ref_params)
    ref_shardings: Any


def dpo_setup(config: Config, total: int, mesh, init=None) -> DPOSetup:
    """DPO's state, jitted step and the reference's shardings: what ``run_dpo`` drives and
    ``dpo_programs`` plans."""
    model = dpo_model(config)
    # The reference: the frozen base (LoRA) or the SFT params beside the policy's.
    rules = config.mesh.rules
    ref_sh = frozen_shardings(model, mesh, rules) or params_shardings(model, mesh, rules)
    state = one_model(config, model, config.dpo.optimizer, total, mesh, init)
    step = make_dpo_step(
        model, config.dpo, state.tx, state.shardings, mesh, ref_sh, config.data.prompt_len
    )
    return DPOSetup(state, step, ref_sh)


def dpo_model(config: Config, stage: str = "dpo") -> ModelConfig:
    """The policy as DPO trains it (with adapters when ``lora.stages`` names the stage)."""
    return trained_model(config, policy_model(config), stage)


def dpo_programs(config: Config, stage: str, mesh, inputs: PlanInputs) -> list[Program]:
    """The DPO step on abstract inputs (``stage_table.Stage.plan``)."""
    batch = planned_comparisons(config, config.dpo.batch_size, inputs)
    setup, model = dpo_setup(config, PLANNED_STEPS, mesh), dpo_model(config, stage)
    ref = setup.state.frozen_target or checkpoint.abstract_with_shardings(
        abstract_params(model), setup.ref_shardings
    )
    args = (setup.state.target, abstract_batch(batch, mesh), ref)
    B, K, T = batch["tokens"].shape
    work = (Pass(model, "train", B * K * T, T), Pass(model, "forward", B * K * T, T))
    return [Program(f"{stage} step", setup.step, args, B * K * T, work, "dpo.batch_size")]


def run_dpo(config: Config, workdir: str | os.PathLike, stage: str = "dpo", *, mesh=None) -> dict:
    """DPO from this run's SFT model on the comparison dataset, into ``<workdir>/<stage>``;
    resumable. Exports the policy params, as SFT does (``rlhf-jax export --stage=dpo``)."""
    config.validate()
    cfg = config.dpo
    model, trained = policy_model(config), dpo_model(config, stage)
    origin = start_point(config, workdir, stage)
    fingerprints = preflight(
        config,
        workdir,
        stage,
        {"rm": (cfg.batch_size, "dpo.batch_size")},
        ((cfg.batch_size, "dpo.batch_size"),),
        bases=base_fingerprints(config, workdir, trained, policy=origin),
    )
    mesh = mesh or sharding.make_mesh(config.mesh)
    data = loader(config, workdir, "rm", cfg.batch_size, config.seed, epochs=cfg.epochs)
    iters = [iter(data)]
    total = cfg.epochs * (sources.split_size(config, workdir, "rm") // cfg.batch_size)
    load = lambda: initial_params(config, workdir, origin, model, mesh)  # noqa: E731
    # Full training: the policy starts as a copy of the reference (its own buffers: the state
    # is donated). LoRA: the SFT params become the frozen base (in its dtype; the float32 copy is
    # not kept), which is the reference, and the state is fresh adapters over it.
    reference = None if trained.adapted else load()
    init = load if trained.adapted else lambda: jax.tree.map(jnp.copy, reference)
    state, step, _ = dpo_setup(config, total, mesh, init)
    if trained.adapted:
        reference = state.frozen()

    def batches():
        for b in iters[0]:
            yield comparison_batch(b)

    validate = None
    if sources.expected_size(config, workdir, "rm_val"):

        def validate(s: TrainState) -> dict[str, float]:
            return validation_metrics(
                lora.plain(reference, s.params, trained), reference, model, config, workdir
            )

    run = StageRun(
        stage=stage,
        model=model,
        fingerprints=fingerprints,
        total=total,
        target=state.target,
        start=state.start,
        step=lambda s, batch: step(s, batch, reference),
        iterators=iters,
        batches=batches(),
        export=lambda s: lora.plain(reference, s.params, trained),
        adapters=lambda s: s.params,
        adapted=trained,
        base=base_name(config, origin),
        position=lambda s: s.step,
        key_metric="accuracy",
        validate=validate,
    )
    return drive(config, workdir, run, mesh)
