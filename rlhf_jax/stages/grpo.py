"""GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024): one jitted function per iteration,
on the PPO stage's rails, without a value network.

``make_grpo_iteration`` returns ``iteration(state, prompts, frozen) -> (state, metrics,
episodes)``: every prompt is repeated K = ``group_size`` times and answered by the policy (KV
cache, temperature T); the reward model scores each response (with its bias, so the SFT
demonstrations score 0), or ``reward_fn`` does; each group's rewards become advantages relative
to the group (``losses.group_advantages``, or ``losses.rloo_advantages`` with ``baseline=rloo``),
repeated over the response's tokens; then ``epochs x minibatches`` optimiser steps in a
``lax.scan`` on the clipped surrogate plus ``kl_coef`` times a KL estimate to the SFT model
(``losses.kl_penalty``, k3 by default), both aggregated over tokens as ``normalize`` says.

The state is the policy's ``TrainState`` alone; its step counts optimiser steps, so the iteration
is ``step // steps_per_iteration``. The frozen SFT reference and the reward model are loaded at
every start, fresh or resumed, and passed beside the state (``frozen``), as DPO's reference is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax import checkpoint, lora, losses, rollout, sharding, stage_table
from rlhf_jax.config import Config, ModelConfig
from rlhf_jax.data import sources
from rlhf_jax.data.loaders import placeholder_batch, prompt_batch
from rlhf_jax.data.records import Kind
from rlhf_jax.data.sources import loader
from rlhf_jax.evaluate import rollout_work
from rlhf_jax.model import predicted_logprobs
from rlhf_jax.sharding import abstract_batch
from rlhf_jax.stage_table import Pass, PlanInputs, Program
from rlhf_jax.stages.driver import OneModel, StageRun, drive, one_model, preflight
from rlhf_jax.stages.lineage import (
    base_fingerprints,
    base_name,
    initial_params,
    load_reward_model,
    policy_model,
    reward_model_config,
    reward_source,
    rm_architecture,
    start_point,
    trained_model,
)
from rlhf_jax.train_state import (
    TrainState,
    abstract_params,
    accumulate,
    apply_gradients,
    frozen_shardings,
    params_shardings,
    state_key,
)

# reward_fn(prompt_tokens [N P], prompt_mask [N P], response_tokens [N R], response_mask [N R])
# -> scores [N]: a jittable reward in place of the reward model (e.g. a verifier).
RewardFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def stage_name(config: Config) -> str:
    """The stage ``run_grpo`` writes: ``grpo``, or ``rloo`` under ``grpo.baseline=rloo``, so one
    work directory can hold both and the report compares them (``rlhf_jax.stage_table``)."""
    return stage_table.for_command("grpo", config).name


def steps_per_iteration(config: Config) -> int:
    cfg = config.grpo
    return cfg.epochs * cfg.batch_size * cfg.group_size // cfg.minibatch_size


def make_grpo_iteration(
    config: Config,
    policy_tx,
    *,
    eos_id: int,
    pad_id: int,
    critic: ModelConfig | None = None,
    reward_fn: RewardFn | None = None,
    policy: ModelConfig | None = None,
) -> Callable:
    """The whole GRPO/RLOO iteration as one traceable function (jit it with
    ``jit_grpo_iteration``). ``frozen = (ref_params, reward_params, reward_bias)``; with
    ``reward_fn`` the reward model is not called (pass ``None`` for its params). With LoRA
    (``policy`` with adapters) the state holds the adapters and ``ref_params`` is the frozen
    base they sit on: the policy is the two merged, the reference the base alone."""
    cfg = config.grpo
    policy_cfg = policy or policy_model(config)
    base = policy_cfg.adapted
    K, n_mb = cfg.group_size, steps_per_iteration(config) // cfg.epochs
    sampler = rollout.Sampler(temperature=cfg.temperature)
    if reward_fn is None and critic is None:
        raise ValueError("make_grpo_iteration: give the reward model's architecture or reward_fn")

    def iteration(state: TrainState, prompts: dict, frozen: tuple):
        ref_params, reward_params, reward_bias = frozen
        merged = lambda p: lora.merge(ref_params if base else None, p)  # noqa: E731
        sample_rng, perm_rng = jax.random.split(state_key(state.rng, state.step))
        # Each prompt K times in a row: group b is rows b K .. b K + K - 1.
        pt = jnp.repeat(prompts["prompt_tokens"], K, axis=0)
        pm = jnp.repeat(prompts["prompt_mask"], K, axis=0)
        P, N = pt.shape[1], pt.shape[0]
        sample = rollout.generate(
            merged(state.params),
            policy_cfg,
            pt,
            pm,
            sample_rng,
            max_new_tokens=cfg.max_new_tokens,
            sampler=sampler,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        mask = sample.mask
        tokens, attention = rollout.full_sequence(pt, pm, sample.tokens, mask)
        # pi_old teacher-forced, as in PPO, so the first ratio is exactly 1.
        logp = rollout.response_logprobs(
            merged(state.params), policy_cfg, tokens, attention, P, temperature=cfg.temperature
        )
        ref = rollout.response_logprobs(
            ref_params, policy_cfg, tokens, attention, P, temperature=cfg.temperature
        )
        if reward_fn is not None:
            scores = reward_fn(pt, pm, sample.tokens, mask).astype(jnp.float32)
        else:
            scores = rollout.reward_scores(
                reward_params, critic, tokens, attention, P, mask, bias=reward_bias
            )
        groups = scores.reshape(-1, K)
        if cfg.baseline == "rloo":
            adv = losses.rloo_advantages(groups)
        else:
            adv = losses.group_advantages(groups, scale=cfg.scale_rewards)
        valid = mask > 0
        batch = {
            "tokens": tokens,
            "attention": attention,
            "mask": mask,
            "old": jnp.where(valid, logp, 0.0),
            "ref": jnp.where(valid, ref, 0.0),
            "adv": jnp.where(valid, adv.reshape(N, 1), 0.0),
        }
        order = jnp.concatenate(
            [jax.random.permutation(jax.random.fold_in(perm_rng, e), N) for e in range(cfg.epochs)]
        ).reshape(cfg.epochs * n_mb, -1)

        def loss_fn(params, mb):
            new = predicted_logprobs(
                merged(params), policy_cfg, mb["tokens"], mb["attention"], P,
                temperature=cfg.temperature,
            ).logprobs  # fmt: skip
            pg, stats = losses.ppo_policy_loss(
                new, mb["old"], mb["adv"], mb["mask"], clip_eps=cfg.clip_eps,
                normalize=cfg.normalize,
            )  # fmt: skip
            kl = losses.kl_penalty(
                new, mb["ref"], mb["mask"], estimator=cfg.kl_estimator, normalize=cfg.normalize
            )
            stats = {**stats, "policy_loss": pg, "kl_loss": kl}
            return pg + cfg.kl_coef * kl, stats

        def weight(mb):  # what the loss is a mean over (losses.token_aggregate)
            if cfg.normalize == "token":
                return jnp.sum(mb["mask"])
            if cfg.normalize == "sequence":
                return jnp.sum(jnp.any(mb["mask"] > 0, axis=1))
            return mb["mask"].shape[0]

        def update(policy: TrainState, idx):
            mb = jax.tree.map(lambda x: x[idx], batch)
            out = accumulate(loss_fn, policy.params, mb, cfg.grad_accum, weight)
            return apply_gradients(policy_tx, policy, out.grads), {**out.stats, "loss": out.loss}

        policy, stats = jax.lax.scan(update, state, order)
        kl = losses.kl_estimates(logp, ref, mask).k1.sum(axis=1)  # the sequence KL, as PPO logs
        metrics = {
            "objective/score": scores.mean(),
            "objective/score_std_in_group": jnp.sqrt(groups.var(axis=1)).mean(),
            "objective/kl": kl.mean(),
            "objective/eos_rate": jnp.any(valid & (sample.tokens == eos_id), axis=1).mean(),
            "objective/response_length": mask.sum(axis=1).mean(),
            "grpo/loss/total": stats["loss"].mean(),
            "grpo/loss/policy": stats["policy_loss"].mean(),
            "grpo/loss/kl": stats["kl_loss"].mean(),
            "grpo/policy/approxkl": stats["approxkl"].mean(),
            "grpo/policy/clipfrac": stats["clipfrac"].mean(),
            "grpo/policy/ratio_max": stats["ratio_max"].max(),
            # The first minibatch still sees the sampling policy: ratio 1, approxkl 0.
            "grpo/policy/first_approxkl": stats["approxkl"][0],
        }
        return policy, metrics, rollout.Episodes(pt, sample.tokens, mask)

    return iteration


def jit_grpo_iteration(iteration, shardings: TrainState, frozen_shardings: tuple, mesh):
    b2 = sharding.batch_sharding(mesh, 2)
    return jax.jit(
        iteration,
        in_shardings=(shardings, {"prompt_tokens": b2, "prompt_mask": b2}, frozen_shardings),
        out_shardings=(shardings, None, None),
        donate_argnums=0,
    )


class GRPOSetup(NamedTuple):
    """What ``run_grpo`` drives and ``grpo_programs`` plans: the policy's state, the jitted
    iteration ``step(state, prompts, frozen)`` and the shardings of ``frozen``."""

    state: OneModel
    step: Any
    frozen_shardings: tuple


def grpo_setup(
    config: Config,
    mesh,
    critic: ModelConfig | None,
    *,
    eos_id: int,
    pad_id: int,
    reward_fn: RewardFn | None = None,
    init=None,
) -> GRPOSetup:
    cfg, model = config.grpo, grpo_model(config)
    rules = config.mesh.rules
    scalar = sharding.replicated(mesh)
    # The reference: the frozen base (LoRA) or the SFT params beside the policy's.
    ref_sh = frozen_shardings(model, mesh, rules) or params_shardings(model, mesh, rules)
    reward_sh = params_shardings(critic, mesh, rules) if reward_fn is None else None
    total = cfg.iterations * steps_per_iteration(config)
    state = one_model(config, model, cfg.policy_optimizer, total, mesh, init)
    iteration = make_grpo_iteration(
        config,
        state.tx,
        eos_id=eos_id,
        pad_id=pad_id,
        critic=critic if reward_fn is None else None,
        reward_fn=reward_fn,
        policy=model,
    )
    frozen_sh = (ref_sh, reward_sh, scalar)
    step = jit_grpo_iteration(iteration, state.shardings, frozen_sh, mesh)
    return GRPOSetup(state, step, frozen_sh)


def grpo_model(config: Config) -> ModelConfig:
    """The policy as GRPO/RLOO trains it (with adapters when ``lora.stages`` names the stage)."""
    return trained_model(config, policy_model(config), stage_name(config))


def grpo_programs(config: Config, stage: str, mesh, inputs: PlanInputs) -> list[Program]:
    """The GRPO (or RLOO) iteration, sampler included, on abstract inputs
    (``stage_table.Stage.plan``)."""
    cfg, d = config.grpo, config.data
    critic = rm_architecture(config)
    setup = grpo_setup(config, mesh, critic, eos_id=inputs.eos_id, pad_id=inputs.pad_id)
    prompts = placeholder_batch(Kind.PROMPTS, cfg.batch_size, prompt_len=d.prompt_len)
    ref_sh, reward_sh, scalar = setup.frozen_shardings
    model = grpo_model(config)
    ref = setup.state.frozen_target or checkpoint.abstract_with_shardings(
        abstract_params(policy_model(config)), ref_sh
    )
    critic_params = abstract_params(critic)
    if model.adapted:  # the RM is frozen too: held in the base's dtype
        critic_params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(model.base_dtype)),
            nn.meta.unbox(critic_params),
        )
    frozen = (
        ref,
        checkpoint.abstract_with_shardings(critic_params, reward_sh),
        jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar),
    )
    args = (setup.state.target, abstract_batch(prompt_batch(prompts), mesh), frozen)
    N, P, R = cfg.batch_size * cfg.group_size, d.prompt_len, cfg.max_new_tokens
    policy, T = model, P + R
    work = (
        *rollout_work(policy, N, P, R),
        Pass(policy, "forward", 2 * N * T, T),  # the sampling policy and the reference
        Pass(critic, "forward", N * T, T),  # the reward model
        Pass(policy, "train", cfg.epochs * N * T, T, steps_per_iteration(config)),
    )
    return [Program(f"{stage} iteration", setup.step, args, N * T, work, "grpo.minibatch_size")]


def run_grpo(
    config: Config,
    workdir: str | os.PathLike,
    stage: str | None = None,
    *,
    mesh=None,
    reward_fn: RewardFn | None = None,
    on_log: Callable[[int, Any, rollout.Episodes], dict] | None = None,
) -> dict:
    """GRPO (``grpo.baseline=group``) or RLOO (``rloo``) from this run's SFT model against the
    reward model PPO uses (this run's rm stage, or ``ppo.reward_from``), into ``<workdir>/grpo``
    or ``<workdir>/rloo`` (``stage_name``; ``stage``: another name); resumable. ``reward_fn``
    replaces the reward model (no rm stage needed); ``on_log`` as for ``run_ppo``. Exports the
    policy params, as SFT does."""
    config.validate()
    cfg, stage = config.grpo, stage or stage_name(config)
    policy_origin = start_point(config, workdir, stage, "policy")
    if reward_fn is None:
        start_point(config, workdir, stage, "reward")  # the RM must have run
    model = trained_model(config, policy_model(config), stage)
    bases = {"policy": policy_origin}
    if reward_fn is None:
        bases["reward"] = reward_source(config, workdir)
    fingerprints = preflight(
        config,
        workdir,
        stage,
        {"ppo": (cfg.batch_size, "grpo.batch_size")},
        ((cfg.batch_size, "grpo.batch_size"),),
        bases=base_fingerprints(config, workdir, model, **bases),
    )
    mesh = mesh or sharding.make_mesh(config.mesh)
    per_iteration = steps_per_iteration(config)
    prompts_it = iter(loader(config, workdir, "ppo", cfg.batch_size, config.seed))
    load = lambda: initial_params(config, workdir, policy_origin, policy_model(config), mesh)  # noqa: E731
    # Full training: the policy starts as a copy of the reference (its own buffers: the state
    # is donated). LoRA: the SFT params become the frozen base (in its dtype; the float32 copy is
    # not kept), which is the reference, and the state is fresh adapters over it.
    reference = None if model.adapted else load()
    init = load if model.adapted else lambda: jax.tree.map(jnp.copy, reference)
    critic = reward_model_config(config, workdir) if reward_fn is None else None
    eos_id, pad_id = sources.special_ids(config, workdir)
    state, step, _ = grpo_setup(
        config, mesh, critic, eos_id=eos_id, pad_id=pad_id, reward_fn=reward_fn, init=init
    )
    ref = state.frozen() if model.adapted else reference
    if reward_fn is None:
        rm = load_reward_model(config, workdir, mesh)
        reward = lora.to_base_dtype(rm.params, model) if model.adapted else rm.params
        frozen = (ref, reward, rm.bias)
    else:
        frozen = (ref, None, jnp.zeros((), jnp.float32))

    def batches():
        while True:
            yield prompt_batch(next(prompts_it))

    def step_fn(s, batch):
        s, metrics, episodes = step(s, batch, frozen)
        return s, {**metrics, "_samples": episodes}

    run = StageRun(
        stage=stage,
        model=policy_model(config),
        fingerprints=fingerprints,
        total=cfg.iterations,
        target=state.target,
        start=state.start,
        step=step_fn,
        iterators=[prompts_it],
        batches=batches(),
        export=lambda s: lora.plain(ref, s.params, model),
        position=lambda s: s.step // per_iteration,
        key_metric="objective/score",
        loss="grpo/loss/total",
        on_log=on_log,
        policy=lambda s: lora.plain(ref, s.params, model),
        adapters=lambda s: s.params,
        adapted=model,
        base=base_name(config, policy_origin),
    )
    return drive(config, workdir, run, mesh)
