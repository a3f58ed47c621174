"""The jitted PPO iteration: docs/method.md section 7 checks 1, 2, 12, 13 and 15 (the bandit)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.config import (
    Config,
    LoraConfig,
    MeshConfig,
    OptimizerConfig,
    PPOConfig,
    model_config,
    rm_config,
)
from rlhf_jax.model import Transformer, init_params
from rlhf_jax.stages.ppo import (
    abstract_ppo_frozen,
    init_ppo_state,
    jit_ppo_iteration,
    make_ppo_iteration,
    ppo_models,
    ppo_state_shardings,
)
from rlhf_jax.train_state import make_optimizer


def _config(model, **ppo):
    ppo = dataclasses.replace(
        PPOConfig(batch_size=16, minibatch_size=8, max_new_tokens=5, ptx_per_episode=1),
        **ppo,
    )
    return Config(name="test", model=model, ppo=ppo, mesh=MeshConfig())


def _build(config, sft=None, reward=None, with_ptx=None, keep=None):
    """Mesh, state at iteration 0 and ``step(state, prompts, ptx)``; with LoRA in
    ``config.model`` the policy and value network are adapters over frozen bases (``keep``,
    a list, receives the ``PPOStart``)."""
    mesh = sharding.make_mesh(config.mesh)
    cfg = config.ppo
    models = ppo_models(config, "ppo")
    policy_tx = make_optimizer(cfg.policy_optimizer, cfg.iterations)
    value_tx = make_optimizer(cfg.value_optimizer, cfg.iterations)
    shardings = ppo_state_shardings(config, policy_tx, value_tx, mesh, models=models)
    plain = models.policy.plain()
    sft = init_params(plain, jax.random.key(0)) if sft is None else sft
    reward = init_params(rm_config(config).plain(), jax.random.key(1)) if reward is None else reward
    start = init_ppo_state(config, policy_tx, value_tx, shardings, sft, reward, 0.25, models)
    if keep is not None:
        keep.append(start)
    with_ptx = cfg.ptx_coef > 0 if with_ptx is None else with_ptx
    iteration = make_ppo_iteration(
        config, policy_tx, value_tx, eos_id=2, pad_id=0, critic=models.critic, policy=models.policy
    )
    frozen = abstract_ppo_frozen(models, mesh, config.mesh.rules)
    jitted = jit_ppo_iteration(iteration, shardings, mesh, with_ptx, frozen)
    return mesh, start.state, lambda s, prompts, ptx: jitted(s, start.frozen, prompts, ptx)


def _prompts(mesh, n, vocab, length=6, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (n, length)).astype(np.int32)
    mask = np.ones_like(tokens)
    tokens[::3, :2], mask[::3, :2] = 0, 0  # some left padding
    return sharding.shard_batch({"prompt_tokens": tokens, "prompt_mask": mask}, mesh)


def _ptx(mesh, n, vocab, seed=1):
    tokens = np.random.default_rng(seed).integers(3, vocab, (n, 10)).astype(np.int32)
    return sharding.shard_batch({"tokens": tokens, "mask": np.ones_like(tokens)}, mesh)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


MODEL = model_config("tiny-llama", vocab_size=32, max_len=24)


def test_first_iteration_has_ratio_one_zero_kl_and_frozen_params_stay_frozen():
    config = _config(MODEL)
    mesh, state, step = _build(config)
    frozen = _host((state.ref_params, state.reward_params, state.reward_bias))
    before = _host((state.policy.params, state.value.params))
    prompts = _prompts(mesh, 16, 32)
    state, metrics, _ = step(state, prompts, None)
    # Check 2: policy = reference at iteration 0, so the KL and the non-score reward are 0.
    assert float(metrics["objective/kl"]) == 0.0
    assert float(metrics["objective/score_total"]) == pytest.approx(
        float(metrics["objective/score"]), abs=1e-6
    )
    # Check 1: the first minibatch sees the sampling policy: ratio 1, approx KL 0.
    assert float(metrics["ppo/policy/first_approxkl"]) < 1e-10
    state, metrics, _ = step(state, _prompts(mesh, 16, 32, seed=1), None)
    assert float(metrics["objective/kl"]) != 0.0  # the policy moved
    # Check 12: reference, reward and bias bit-identical; policy and value trained.
    after = _host((state.ref_params, state.reward_params, state.reward_bias))
    jax.tree.map(np.testing.assert_array_equal, after, frozen)
    moved = jax.tree.map(
        lambda a, b: np.any(a != b), _host((state.policy.params, state.value.params)), before
    )
    assert all(jax.tree.leaves(moved))
    assert int(state.iteration) == 2 and int(state.policy.step) == 4  # 2 x 2 minibatches


def test_value_starts_as_the_normalised_reward_model():
    # The value function starts as the RM (InstructGPT section 3.5) minus the RM's bias (0.25
    # in _build), so that at iteration 0 it predicts rewards on the scale PPO actually sees.
    config = _config(MODEL)
    _, state, _ = _build(config)
    tokens = np.random.default_rng(2).integers(3, 32, (4, 9)).astype(np.int32)
    mask = np.ones_like(tokens)
    critic = Transformer(rm_config(config))
    values = critic.apply({"params": state.value.params}, tokens, mask)
    rewards = critic.apply({"params": state.reward_params}, tokens, mask)
    np.testing.assert_allclose(np.asarray(values), np.asarray(rewards) - 0.25, atol=1e-6)


def test_frozen_policy_iterations_train_only_the_value():
    config = _config(MODEL, freeze_policy_iterations=1, ema_decay=0.9)
    mesh, state, step = _build(config)
    policy, ema, value = _host((state.policy, state.ema_params, state.value.params))
    state, metrics, _ = step(state, _prompts(mesh, 16, 32), None)
    # Iteration 0 is frozen: policy params, optimiser state, step and EMA are untouched...
    jax.tree.map(np.testing.assert_array_equal, _host(state.policy), policy)
    jax.tree.map(np.testing.assert_allclose, _host(state.ema_params), ema)
    # ...while the value network trains on the same rollout.
    moved = jax.tree.map(lambda a, b: np.any(a != b), _host(state.value.params), value)
    assert all(jax.tree.leaves(moved))
    state, metrics, _ = step(state, _prompts(mesh, 16, 32, seed=1), None)
    assert int(state.policy.step) == 2  # iteration 1 updates the policy (2 minibatches)
    assert float(metrics["objective/kl"]) == 0.0  # its rollout still came from the SFT policy
    state, metrics, _ = step(state, _prompts(mesh, 16, 32, seed=2), None)
    assert float(metrics["objective/kl"]) != 0.0


def test_ptx_coef_zero_reproduces_ppo_bit_for_bit_and_ptx_touches_only_the_policy():
    prompts_seeds = (0, 1)

    def run(ptx_coef, with_ptx):
        config = _config(MODEL, ptx_coef=ptx_coef)
        mesh, state, step = _build(config, with_ptx=with_ptx)
        for s in prompts_seeds:
            ptx = _ptx(mesh, 16, 32, seed=s) if with_ptx else None
            state, metrics, _ = step(state, _prompts(mesh, 16, 32, seed=s), ptx)
            if s == 0:
                value_after_one = _host(state.value.params)
        return _host(state), value_after_one

    plain, _ = run(0.0, with_ptx=False)
    zero, _ = run(0.0, with_ptx=True)
    jax.tree.map(np.testing.assert_array_equal, zero, plain)
    ptx, value_after_one = run(5.0, with_ptx=True)
    # The ptx gradient changes the policy but never the value network (its first update only
    # depends on the rollout, which is sampled before any policy update).
    assert np.any(ptx.policy.params["embed"] != plain.policy.params["embed"])
    _, plain_value_one = run(0.0, with_ptx=False)
    jax.tree.map(np.testing.assert_array_equal, value_after_one, plain_value_one)


def test_bandit_moves_probability_onto_the_rewarded_response():
    # One-token responses from a zero-layer policy; the RM scores 1 for token 5 and 0 otherwise:
    # RMSNorm(one-hot e_x) = sqrt(8) e_x, and the head reads e_5 / sqrt(8).
    model = model_config(
        "tiny-llama", vocab_size=8, d_model=8, n_layers=0, n_heads=2, n_kv_heads=2, max_len=8
    )
    config = _config(
        model,
        batch_size=64,
        minibatch_size=16,
        max_new_tokens=1,
        kl_coef=0.0,
        ema_decay=0.0,
        policy_optimizer=OptimizerConfig(lr=3e-2, schedule="constant"),
        value_optimizer=OptimizerConfig(lr=3e-2, schedule="constant"),
    )
    reward = {
        "embed": jnp.eye(8),
        "final_norm": {"scale": jnp.ones(8)},
        "score_head": {"kernel": (jnp.eye(8)[:, 5:6] / np.sqrt(8)), "bias": jnp.zeros(1)},
    }
    mesh, state, step = _build(config, reward=reward)
    prompt = np.full((64, 2), 4, np.int32)
    batch = sharding.shard_batch(
        {"prompt_tokens": prompt, "prompt_mask": np.ones_like(prompt)}, mesh
    )

    def p_good(params):
        logits = Transformer(model).apply({"params": params}, jnp.asarray(prompt[:1]))[0, -1]
        return float(jax.nn.softmax(logits)[5])

    start = p_good(jax.device_get(state.policy.params))
    for _ in range(25):
        state, metrics, _ = step(state, batch, None)
    assert start < 0.3
    assert p_good(jax.device_get(state.policy.params)) > 0.95
    # Scores are logged after the reward bias (0.25, set in _build): 1 - 0.25 for the good token.
    assert float(metrics["objective/score"]) > 0.9 - 0.25


def _with(config, **ppo):
    return dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, **ppo))


def test_accumulated_micro_batches_give_the_update_of_the_whole_minibatch():
    """PPO-ptx with ``grad_accum=4`` (micro-batches of 2 episodes and 4 text rows) against the
    whole minibatch of 8: the same policy, value and EMA after an iteration of two updates,
    within float32 rounding, and the same losses."""
    lr = OptimizerConfig(lr=1e-3, schedule="constant")
    config = _with(_config(MODEL), ptx_coef=0.5, policy_optimizer=lr, value_optimizer=lr)
    runs = []
    for accum in (1, 4):
        mesh, state, step = _build(_with(config, grad_accum=accum))
        before = _host(state.policy.params)
        state, metrics, _ = step(state, _prompts(mesh, 16, 32), _ptx(mesh, 16, 32))
        runs.append((before, _host((state.policy.params, state.value.params, state.ema_params)),
                     {k: float(v) for k, v in metrics.items()}))  # fmt: skip
    (before, whole, m1), (_, parts, m4) = runs
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(whole[0]), jax.tree.leaves(before)))  # fmt: skip
    assert moved > 1e-4  # the updates are not negligible next to the tolerance
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    for k in ("ppo/loss/policy", "ppo/loss/value", "ppo/loss/ptx", "ppo/policy/entropy"):
        assert m4[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k


def test_lora_ppo_starts_as_full_ppo_with_one_copy_of_each_frozen_base():
    """LoRA PPO (rank 4 on every Dense, bfloat16 bases): no reference or RM trunk in the state
    (the policy's base is the reference, the RM's trunk sits under value and reward); the first
    iteration samples and scores exactly what full PPO does (adapters start as no-ops, the
    bases in float32 here); the bases never change."""
    full = _config(MODEL)
    adapted = dataclasses.replace(full, model=dataclasses.replace(MODEL, lora=LoraConfig(rank=4)))
    first = {}
    for name, config in (("full", full), ("lora", adapted)):
        kept = []
        mesh, state, step = _build(config, keep=kept)
        state, metrics, _ = step(state, _prompts(mesh, 16, 32), None)
        first[name] = {k: float(v) for k, v in metrics.items()}
    assert state.ref_params is None and set(state.reward_params) == {"score_head"}
    n_state = sum(x.size for x in jax.tree.leaves(state.policy.params))
    n_base = sum(x.size for x in jax.tree.leaves(kept[0].frozen.policy))
    assert n_state < n_base / 4
    for k in ("objective/score", "objective/kl", "objective/response_length", "ppo/returns/mean"):
        assert first["lora"][k] == first["full"][k], k
    assert first["lora"]["ppo/policy/first_approxkl"] < 1e-10
    bases = _host(kept[0].frozen)
    state, metrics, _ = step(state, _prompts(mesh, 16, 32, seed=1), None)
    assert float(metrics["objective/kl"]) != 0.0  # the adapters moved the policy
    jax.tree.map(np.testing.assert_array_equal, _host(kept[0].frozen), bases)
