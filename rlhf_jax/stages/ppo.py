"""PPO and PPO-ptx (InstructGPT section 3.5, appendix C.4): one jitted function per iteration.

``make_ppo_iteration`` returns ``iteration(state, prompts, ptx) -> (state, metrics, episodes)``:
sample responses with the policy (KV cache, temperature T), score them into a ``Rollout`` (frozen
reference, value network, RM with its bias; KL-penalised per-token rewards; GAE), then
``epochs x minibatches`` updates in a ``lax.scan``, each one optimiser step of the policy on
``L_pi + ptx_coef * L_ptx`` and one of the separate value network on the clipped value loss, then
the policy-weight EMA and (optionally) the adaptive KL coefficient.

PPO-ptx is this function with ``ptx_coef > 0`` and a pretraining batch of ``ptx_per_episode``
sequences per episode. As in the paper the two gradients are computed separately and added
(``g = g_pi + ptx_coef * g_ptx``) before one optimiser step, so ``ptx_coef = 0`` reproduces PPO
bit for bit (docs/method.md section 7, check 13).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax import checkpoint, lora, losses, rollout, sharding
from rlhf_jax.config import Config, ModelConfig, rm_config
from rlhf_jax.data import sources
from rlhf_jax.data.loaders import placeholder_batch, prompt_batch
from rlhf_jax.data.records import Kind
from rlhf_jax.data.sources import loader
from rlhf_jax.evaluate import rollout_work
from rlhf_jax.fields import validate
from rlhf_jax.model import predicted_logprobs
from rlhf_jax.sharding import abstract_batch
from rlhf_jax.stage_table import Pass, PlanInputs, Program
from rlhf_jax.stages.driver import StageRun, drive, preflight
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
    PPOState,
    TrainState,
    abstract_frozen,
    abstract_state,
    accumulate,
    adapt,
    apply_gradients,
    create_train_state,
    ema_update,
    key_data,
    make_optimizer,
    shift_scalar_head,
    state_key,
    train_state_shardings,
)


def make_ppo_iteration(
    config: Config,
    policy_tx,
    value_tx,
    *,
    eos_id: int,
    pad_id: int,
    critic: ModelConfig | None = None,
    reward_fn: Callable | None = None,
    policy: ModelConfig | None = None,
) -> Callable:
    """The whole PPO iteration as one traceable function (jit it with ``jit_ppo_iteration``):
    ``iteration(state, frozen, prompts, ptx)``, ``frozen`` the ``PPOFrozen`` bases of LoRA PPO
    (None when every weight is trained).

    ``critic`` is the architecture of the reward and value networks (default: the policy's with
    a scalar head, ``config.rm_config``); it may differ from the policy's. ``policy`` is the
    policy's (default ``policy_model(config)``); either may carry adapters (``ppo_models``).
    ``reward_fn(prompt
    tokens [B P], response tokens [B R], response mask [B R]) -> scores [B]``, traceable (e.g.
    a ``jax.pure_callback``), replaces the reward model's score; the value network still starts
    from the RM."""
    cfg = config.ppo
    policy_cfg = policy or policy_model(config)
    critic_cfg = critic or rm_config(config)
    validate(cfg, "ppo")
    n_mb = cfg.batch_size // cfg.minibatch_size
    sampler = rollout.Sampler(temperature=cfg.temperature)
    micro = cfg.grad_accum

    def iteration(state: PPOState, frozen: PPOFrozen | None, prompts: dict, ptx: dict | None):
        nets = networks(state, frozen)
        policy_base = None if frozen is None else frozen.policy
        critic_base = None if frozen is None else frozen.critic
        # 1. Rollout: sample, then score into a PPO batch (docs/method.md sections 3.1-3.4).
        rng = state_key(state.rng, state.iteration)
        sample_rng, perm_rng = jax.random.split(rng)
        pt, pm = prompts["prompt_tokens"], prompts["prompt_mask"]
        P = pt.shape[1]
        sample = rollout.generate(
            nets.policy,
            policy_cfg,
            pt,
            pm,
            sample_rng,
            max_new_tokens=cfg.max_new_tokens,
            sampler=sampler,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        scores = None if reward_fn is None else reward_fn(pt, sample.tokens, sample.mask)
        ro = rollout.score(
            nets,
            policy_cfg,
            critic_cfg,
            pt,
            pm,
            sample.tokens,
            sample.mask,
            eos_id=eos_id,
            kl_coef=state.kl_coef,
            temperature=cfg.temperature,
            gamma=cfg.gamma,
            lam=cfg.lam,
            reward_bias=state.reward_bias,
            no_eos_score=cfg.no_eos_score if cfg.no_eos_penalty else None,
            whiten_rewards=cfg.whiten_rewards,
            scores=scores,
        )

        # 2. Epochs x minibatches of updates.
        order = jnp.concatenate(
            [
                jax.random.permutation(jax.random.fold_in(perm_rng, e), cfg.batch_size)
                for e in range(cfg.epochs)
            ]
        )
        order = order.reshape(cfg.epochs * n_mb, cfg.minibatch_size)
        if ptx is not None:
            # The pretraining batch enters only after scoring (see the barrier in ``update``).
            ro, ptx = jax.lax.optimization_barrier((ro, ptx))
            ptx = jax.tree.map(lambda x: x.reshape(cfg.epochs * n_mb, -1, x.shape[-1]), ptx)

        def policy_loss(params, mb: rollout.Rollout):
            tokens, mask = rollout.full_sequence(
                mb.prompt_tokens, mb.prompt_mask, mb.response_tokens, mb.response_mask
            )
            out = predicted_logprobs(
                lora.merge(policy_base, params),
                policy_cfg,
                tokens,
                mask,
                P,
                temperature=cfg.temperature,
                with_entropy=True,
            )
            loss, stats = losses.ppo_policy_loss(
                out.logprobs, mb.logprobs, mb.advantages, mb.response_mask, clip_eps=cfg.clip_eps
            )
            stats["entropy"] = jax.lax.stop_gradient(
                losses.masked_mean(out.entropy, mb.response_mask)
            )
            return loss, stats

        def ptx_loss(params, batch):
            logp = predicted_logprobs(
                lora.merge(policy_base, params), policy_cfg, batch["tokens"], batch["mask"], 1
            ).logprobs
            return -losses.masked_mean(logp, batch["mask"][:, 1:]), {}

        def value_loss(params, mb: rollout.Rollout):
            tokens, mask = rollout.full_sequence(
                mb.prompt_tokens, mb.prompt_mask, mb.response_tokens, mb.response_mask
            )
            values = rollout.response_values(
                lora.merge(critic_base, params), critic_cfg, tokens, mask, P
            )
            return losses.value_loss(
                values, mb.values, mb.returns, mb.response_mask, clip_eps=cfg.value_clip_eps
            )

        # Gradient accumulation: every loss is a mean over valid tokens.
        response_tokens = lambda mb: jnp.sum(mb.response_mask)  # noqa: E731
        text_tokens = lambda b: jnp.sum(b["mask"][:, 1:])  # noqa: E731

        def update(carry, xs):
            policy, value, ema = carry
            idx, ptx_mb = xs
            mb = jax.tree.map(lambda x: x[idx], ro)
            out = accumulate(policy_loss, policy.params, mb, micro, response_tokens)
            pg_loss, pstats, grads = out.loss, out.stats, out.grads
            if ptx_mb is not None:
                # Consecutive, as in the paper: the barrier makes the ptx pass start after the
                # PPO gradient is complete, so XLA cannot merge the two passes' matmuls.
                grads, params = jax.lax.optimization_barrier((grads, policy.params))
                ptx_out = accumulate(ptx_loss, params, ptx_mb, micro, text_tokens)
                pstats["ptx_loss"] = ptx_out.loss
                # A zero coefficient adds nothing: even "g + 0 * h" is not bitwise g once XLA
                # fuses it into the optimiser, and ptx_coef = 0 must reproduce PPO exactly.
                if cfg.ptx_coef != 0:
                    grads = jax.tree.map(lambda g, h: g + cfg.ptx_coef * h, grads, ptx_out.grads)
            updated = apply_gradients(policy_tx, policy, grads)
            if cfg.freeze_policy_iterations > 0:  # critic warm-up: keep policy and its optimiser
                frozen_now = state.iteration < cfg.freeze_policy_iterations
                updated = jax.tree.map(lambda o, n: jnp.where(frozen_now, o, n), policy, updated)
            policy = updated
            vout = accumulate(value_loss, value.params, mb, micro, response_tokens)
            value = apply_gradients(value_tx, value, vout.grads)
            if ema is not None:
                ema = ema_update(ema, policy.params, cfg.ema_decay)
            stats = {
                "policy_loss": pg_loss,
                "value_loss": vout.loss,
                **pstats,
                **{f"val_{k}": v for k, v in vout.stats.items()},
            }
            return (policy, value, ema), stats

        (policy, value, ema), stats = jax.lax.scan(
            update, (state.policy, state.value, state.ema_params), (order, ptx)
        )

        # 3. KL controller (Ziegler et al. 2019 section 2.2) when a target is set.
        seq_kl = ro.kl.sum(axis=1).mean()
        kl_coef = state.kl_coef
        if cfg.kl_target > 0:
            kl_coef = losses.adaptive_kl_coef(
                kl_coef, seq_kl, cfg.batch_size, target=cfg.kl_target, horizon=cfg.kl_horizon
            )

        new_state = state.replace(
            iteration=state.iteration + 1,
            policy=policy,
            value=value,
            ema_params=ema,
            kl_coef=kl_coef,
        )
        metrics = _iteration_metrics(ro, stats, state.kl_coef, seq_kl, cfg.ptx_coef, eos_id)
        return new_state, metrics, rollout.Episodes(pt, sample.tokens, sample.mask)

    return iteration


def _iteration_metrics(ro: rollout.Rollout, stats: dict, kl_coef, seq_kl, ptx_coef, eos_id):
    """The statistics of docs/method.md section 3.8 (LHP ``record_step_stats`` names)."""
    mask = ro.response_mask
    ret_var = losses.masked_mean((ro.returns - losses.masked_mean(ro.returns, mask)) ** 2, mask)
    err = losses.masked_mean((ro.values - ro.returns) ** 2, mask)
    mean = {k: v.mean() for k, v in stats.items()}
    out = {
        "objective/kl": seq_kl,
        "objective/kl_coef": kl_coef,
        "objective/score": ro.scores.mean(),
        "objective/score_total": ro.rewards.sum(axis=1).mean(),
        "objective/entropy": mean["entropy"],
        "objective/eos_rate": jnp.any(
            (ro.response_mask > 0) & (ro.response_tokens == eos_id), axis=1
        ).mean(),
        "objective/response_length": mask.sum(axis=1).mean(),
        "ppo/loss/policy": mean["policy_loss"],
        "ppo/loss/value": mean["value_loss"],
        "ppo/loss/total": mean["policy_loss"] + mean["value_loss"],
        "ppo/policy/approxkl": mean["approxkl"],
        "ppo/policy/clipfrac": mean["clipfrac"],
        "ppo/policy/entropy": mean["entropy"],
        "ppo/policy/ratio_max": stats["ratio_max"].max(),
        # Sanity check 1: the first minibatch still sees the sampling policy, so ratio = 1.
        "ppo/policy/first_approxkl": stats["approxkl"][0],
        "ppo/returns/mean": losses.masked_mean(ro.returns, mask),
        "ppo/returns/var": ret_var,
        "ppo/val/vpred": mean["val_vpred"],
        "ppo/val/error": err,
        "ppo/val/clipfrac": mean["val_clipfrac"],
        "ppo/val/var_explained": 1.0 - err / jnp.maximum(ret_var, 1e-8),
    }
    if "ptx_loss" in mean:
        out["ppo/loss/ptx"] = mean["ptx_loss"]
        out["ppo/loss/total"] = out["ppo/loss/total"] + ptx_coef * mean["ptx_loss"]
    return out


class PPOModels(NamedTuple):
    """The policy's architecture and the critic's (reward and value networks), as PPO trains
    them: with adapters when the stage is one of ``model.lora.stages``."""

    policy: ModelConfig
    critic: ModelConfig


def ppo_models(config: Config, stage: str, critic: ModelConfig | None = None) -> PPOModels:
    return PPOModels(
        trained_model(config, policy_model(config), stage),
        trained_model(config, critic or rm_config(config), stage),
    )


class PPOFrozen(NamedTuple):
    """The frozen bases of LoRA PPO (never saved: loaded again from SFT and the RM). The
    policy's base is also the reference policy (the adapters switched off); the critic's base is
    the RM's trunk, under the reward model (its own head) and the value network (its adapters
    and head): no second copy of either network."""

    policy: Any
    critic: Any


def networks(state: PPOState, frozen: PPOFrozen | None) -> rollout.RolloutParams:
    """The four networks' params as the forward passes take them (no copies are made)."""
    if frozen is None:
        return rollout.RolloutParams(
            state.policy.params, state.ref_params, state.value.params, state.reward_params
        )
    return rollout.RolloutParams(
        lora.merge(frozen.policy, state.policy.params),
        frozen.policy,
        lora.merge(frozen.critic, state.value.params),
        lora.merge(frozen.critic, state.reward_params),
    )


def _layout(config: Config, policy: TrainState, value: TrainState, scalar, adapted: bool):
    """A PPOState-shaped tree of per-leaf descriptions (shardings or abstract values), built from
    those of the two TrainStates: reference and EMA mirror the policy params, the reward model
    mirrors the value params, and the counters and key mirror the policy's. With LoRA the
    reference is the frozen base (``PPOFrozen``) and the reward model keeps only its head."""
    return PPOState(
        iteration=policy.step,
        policy=policy,
        value=value,
        ref_params=None if adapted else policy.params,
        reward_params={"score_head": value.params["score_head"]} if adapted else value.params,
        reward_bias=scalar,
        kl_coef=scalar,
        ema_params=policy.params if config.ppo.ema_decay > 0 else None,
        rng=policy.rng,
    )


def ppo_state_shardings(
    config: Config, policy_tx, value_tx, mesh, critic: ModelConfig | None = None, models=None
) -> PPOState:
    models = models or ppo_models(config, "ppo", critic)
    rules = config.mesh.rules
    pol = train_state_shardings(models.policy, policy_tx, mesh, rules)
    val = train_state_shardings(models.critic, value_tx, mesh, rules)
    return _layout(config, pol, val, sharding.replicated(mesh), models.policy.adapted)


def abstract_ppo_frozen(models: PPOModels, mesh, rules) -> PPOFrozen | None:
    """The frozen bases as abstract values with shardings (None without LoRA)."""
    if not models.policy.adapted:
        return None
    return PPOFrozen(
        abstract_frozen(models.policy, mesh, rules), abstract_frozen(models.critic, mesh, rules)
    )


class PPOStart(NamedTuple):
    """PPO at iteration 0: its state and (LoRA) its frozen bases."""

    state: PPOState
    frozen: PPOFrozen | None


def init_ppo_state(
    config: Config,
    policy_tx,
    value_tx,
    shardings: PPOState,
    sft_params,
    reward_params,
    reward_bias,
    models: PPOModels | None = None,
) -> PPOStart:
    """The state at iteration 0: policy, reference (and EMA) from the SFT params; value and
    reward from the RM params (InstructGPT section 3.5: the value function starts as the RM).

    The value network starts as the *normalised* RM, the function that gives the reward: its head
    bias absorbs ``-reward_bias``. Starting from the raw RM instead would offset every value by the
    bias (about 5 in the default run) against returns near 0, and GAE turns that offset into a
    length-dependent advantage at the last tokens, which Adam at the value LR (about 1e-4 per step
    on the head bias) would take tens of thousands of steps to remove.

    With LoRA (``models`` with adapters) the SFT params become the policy's frozen base and the
    RM's trunk the critic's; the policy and the value network get fresh adapters (zero B: they
    start as the SFT model and the normalised RM exactly) and the value network a copy of the
    RM's head.
    """
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (distinct, donatable buffers)
    cfg = config.ppo
    models = models or ppo_models(config, "ppo")
    shift = -jnp.asarray(reward_bias, jnp.float32)
    frozen = None
    if models.policy.adapted:
        pol = adapt(sft_params, models.policy, jax.random.key(config.seed + 6))
        crit = adapt(reward_params, models.critic, jax.random.key(config.seed + 7))
        frozen = PPOFrozen(pol.frozen, crit.frozen)
        policy_params, value_params = pol.trainable, shift_scalar_head(copy(crit.trainable), shift)
        ref_params = None
        reward_params = {"score_head": copy(reward_params["score_head"])}
    else:
        policy_params, value_params = sft_params, shift_scalar_head(copy(reward_params), shift)
        ref_params = jax.device_put(copy(sft_params), shardings.ref_params)
        reward_params = copy(reward_params)
    state = PPOState(
        iteration=jnp.zeros((), jnp.int32),
        policy=create_train_state(
            policy_params, policy_tx, key_data(config.seed), shardings.policy
        ),
        value=create_train_state(value_params, value_tx, key_data(config.seed), shardings.value),
        ref_params=ref_params,
        reward_params=jax.device_put(reward_params, shardings.reward_params),
        reward_bias=jnp.asarray(reward_bias, jnp.float32),
        kl_coef=jnp.asarray(cfg.kl_coef, jnp.float32),
        ema_params=(
            jax.device_put(copy(policy_params), shardings.ema_params) if cfg.ema_decay > 0 else None
        ),
        rng=key_data(config.seed + 4),
    )
    # Every leaf where the jitted iteration returns it: a counter or key left on one device is
    # another trace-cache key than the mesh-replicated one the iteration gives back, and the
    # second iteration would compile the whole program again.
    return PPOStart(jax.device_put(state, shardings), frozen)


def abstract_ppo_state(
    config: Config, policy_tx, value_tx, critic: ModelConfig | None = None, models=None
) -> PPOState:
    models = models or ppo_models(config, "ppo", critic)
    pol = abstract_state(models.policy, policy_tx)
    val = abstract_state(models.critic, value_tx)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    return _layout(config, pol, val, scalar, models.policy.adapted)


def jit_ppo_iteration(
    iteration, shardings: PPOState, mesh, with_ptx: bool, frozen: PPOFrozen | None = None
):
    """``step(state, frozen, prompts, ptx)`` jitted (``frozen``: the abstract bases, or None)."""
    b2 = sharding.batch_sharding(mesh, 2)
    prompts_sh = {"prompt_tokens": b2, "prompt_mask": b2}
    ptx_sh = {"tokens": b2, "mask": b2} if with_ptx else None
    frozen_sh = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    return jax.jit(
        iteration,
        in_shardings=(shardings, frozen_sh, prompts_sh, ptx_sh),
        out_shardings=(shardings, None, None),
        donate_argnums=0,
    )


class PPOSetup(NamedTuple):
    """What ``run_ppo`` drives and ``ppo_programs`` plans: the two optimisers, the state's
    shardings and restore target, the models, the frozen bases' abstract target (LoRA; else
    None), and the jitted iteration ``step(state, frozen, prompts, ptx)``."""

    policy_tx: Any
    value_tx: Any
    shardings: PPOState
    target: PPOState
    models: PPOModels
    frozen_target: PPOFrozen | None
    step: Any


def ppo_setup(
    config: Config,
    mesh,
    critic: ModelConfig,
    *,
    eos_id: int,
    pad_id: int,
    reward_fn: Callable | None = None,
    stage: str = "ppo",
) -> PPOSetup:
    cfg = config.ppo
    models = ppo_models(config, stage, critic)
    policy_tx = make_optimizer(cfg.policy_optimizer, cfg.iterations)
    value_tx = make_optimizer(cfg.value_optimizer, cfg.iterations)
    shardings = ppo_state_shardings(config, policy_tx, value_tx, mesh, models=models)
    iteration = make_ppo_iteration(
        config,
        policy_tx,
        value_tx,
        eos_id=eos_id,
        pad_id=pad_id,
        critic=models.critic,
        reward_fn=reward_fn,
        policy=models.policy,
    )
    target = checkpoint.abstract_with_shardings(
        abstract_ppo_state(config, policy_tx, value_tx, models=models), shardings
    )
    frozen = abstract_ppo_frozen(models, mesh, config.mesh.rules)
    step = jit_ppo_iteration(iteration, shardings, mesh, cfg.ptx_coef > 0, frozen)
    return PPOSetup(policy_tx, value_tx, shardings, target, models, frozen, step)


def ptx_rows(config: Config) -> int:
    """Pretraining sequences per PPO-ptx iteration: ``ptx_per_episode`` per episode and epoch."""
    cfg = config.ppo
    return cfg.epochs * cfg.batch_size * cfg.ptx_per_episode


def ppo_programs(config: Config, stage: str, mesh, inputs: PlanInputs) -> list[Program]:
    """The PPO (or PPO-ptx) iteration, sampler included, on abstract inputs
    (``stage_table.Stage.plan``)."""
    cfg, d = config.ppo, config.data
    prompts = placeholder_batch(Kind.PROMPTS, cfg.batch_size, prompt_len=d.prompt_len)
    ptx = None
    if cfg.ptx_coef > 0:
        ptx = placeholder_batch(Kind.PRETRAINING, ptx_rows(config), text_len=d.text_len)
    prompts = prompt_batch(prompts)
    setup = ppo_setup(
        config,
        mesh,
        rm_architecture(config),
        eos_id=inputs.eos_id,
        pad_id=inputs.pad_id,
        stage=stage,
    )
    prompts, ptx = abstract_batch(prompts, mesh), abstract_batch(ptx, mesh)
    args = (setup.target, setup.frozen_target, prompts, ptx)
    B, P, R = cfg.batch_size, d.prompt_len, cfg.max_new_tokens
    (policy, critic), T = setup.models, P + R
    updates = cfg.epochs * (cfg.batch_size // cfg.minibatch_size)
    work = (
        *rollout_work(policy, B, P, R),
        Pass(policy, "forward", 2 * B * T, T),  # the sampling policy and the reference
        Pass(critic, "forward", 2 * B * T, T),  # the value network and the reward model
        Pass(policy, "train", cfg.epochs * B * T, T, updates),
        Pass(critic, "train", cfg.epochs * B * T, T, updates),
    )
    if ptx is not None:
        work += (Pass(policy, "train", ptx["tokens"].size, d.text_len, updates),)
    return [Program(f"{stage} iteration", setup.step, args, B * T, work, "ppo.minibatch_size")]


def run_ppo(
    config: Config,
    workdir: str | os.PathLike,
    stage: str = "ppo",
    *,
    mesh=None,
    on_log: Callable[[int, Any, rollout.Episodes], dict] | None = None,
    reward_fn: Callable | None = None,
) -> dict:
    """PPO (``ppo.ptx_coef == 0``) or PPO-ptx into ``<workdir>/<stage>``; resumable.

    ``on_log(iteration, state, episodes)`` may return extra metrics to log (``rollout.Episodes``;
    the built-in world's pipeline adds the gold reward of the samples and the held-out NLL).
    ``reward_fn`` replaces the RM's score (``make_ppo_iteration``), as the world's oracle-PPO
    run does with its gold reward.
    """
    config.validate()
    cfg = config.ppo
    policy_origin = start_point(config, workdir, stage, "policy")
    start_point(config, workdir, stage, "reward")  # the RM must have run
    critic = reward_model_config(config, workdir)
    uses = {"ppo": (cfg.batch_size, "ppo.batch_size")}
    if cfg.ptx_coef > 0:
        uses["pretrain"] = (ptx_rows(config), "ppo.ptx_per_episode")
    sharded = (
        (cfg.batch_size, "ppo.batch_size"),
        *([uses["pretrain"]] if cfg.ptx_coef > 0 else []),
    )
    why = {"pretrain": f"or set --config.ppo.ptx_coef=0 for plain PPO (ppo.ptx_coef={cfg.ptx_coef} "
           "is PPO-ptx, which mixes in pretraining text)"}  # fmt: skip
    bases = base_fingerprints(
        config,
        workdir,
        trained_model(config, policy_model(config), stage),
        policy=policy_origin,
        critic=reward_source(config, workdir),
    )
    fingerprints = preflight(config, workdir, stage, uses, sharded, why, bases)
    mesh = mesh or sharding.make_mesh(config.mesh)
    with_ptx = cfg.ptx_coef > 0
    prompts_it = iter(loader(config, workdir, "ppo", cfg.batch_size, config.seed))
    iters = [prompts_it]
    if with_ptx:
        iters.append(iter(loader(config, workdir, "pretrain", ptx_rows(config), config.seed + 3)))
    eos_id, pad_id = sources.special_ids(config, workdir)
    setup = ppo_setup(
        config, mesh, critic, eos_id=eos_id, pad_id=pad_id, reward_fn=reward_fn, stage=stage
    )
    models = setup.models
    begun: list[PPOStart] = []

    def begin() -> PPOStart:  # the fresh state and (LoRA) the frozen bases, made once
        if not begun:
            sft = initial_params(config, workdir, policy_origin, policy_model(config), mesh)
            rm = load_reward_model(config, workdir, mesh)
            begun.append(
                init_ppo_state(
                    config,
                    setup.policy_tx,
                    setup.value_tx,
                    setup.shardings,
                    sft,
                    rm.params,
                    rm.bias,
                    models,
                )
            )
        return begun[0]

    def start() -> PPOState:
        return begin().state

    def frozen() -> PPOFrozen | None:
        # A resumed LoRA stage still needs its bases; the state it restores is tiny.
        return begin().frozen if models.policy.adapted else None

    def plain(params):  # a policy as a plain model: adapters folded into the base
        bases = frozen()
        return lora.plain(bases and bases.policy, params, models.policy)

    def batches():
        while True:
            ptx = next(iters[1]) if with_ptx else None
            yield {"prompts": prompt_batch(next(iters[0])), "ptx": ptx}

    def step_fn(state, batch):
        state, metrics, episodes = setup.step(state, frozen(), batch["prompts"], batch["ptx"])
        return state, {**metrics, "_samples": episodes}

    run = StageRun(
        stage=stage,
        model=policy_model(config),
        fingerprints=fingerprints,
        total=cfg.iterations,
        target=setup.target,
        start=start,
        step=step_fn,
        iterators=iters,
        batches=batches(),
        export=lambda s: plain(s.ema_params if s.ema_params is not None else s.policy.params),
        position=lambda s: s.iteration,
        key_metric="objective/score",
        loss="ppo/loss/total",
        on_log=on_log,
        policy=lambda s: plain(s.policy.params),
        adapters=lambda s: s.ema_params if s.ema_params is not None else s.policy.params,
        adapted=models.policy,
        base=base_name(config, policy_origin),
    )
    return drive(config, workdir, run, mesh)
