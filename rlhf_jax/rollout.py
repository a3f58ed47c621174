"""Jitted sampling with a KV cache, and scoring a rollout into a PPO batch.

Layout (docs/method.md section 3.7): prompts are left-padded to length P, exactly
R = ``max_new_tokens`` response tokens follow, and everything after a row's first EOS is padding
with mask 0. The full sequence is ``[prompt; response]`` of length T = P + R, and response token
``t`` sits at position ``P + t``; the logits and values that predict it are read at ``P + t - 1``.

Sampling is a prefill over the prompt followed by a ``lax.while_loop`` of one-token decodes over an
explicit ``KVCache``; the loop stops as soon as every row has produced EOS. The log-probability
stored for each sampled token is that of the temperature-scaled full softmax, the same quantity a
teacher-forced forward computes (``losses.token_logprobs`` with the same temperature); top-k/top-p
only restrict which token is drawn.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Shaped

from rlhf_jax import losses
from rlhf_jax.config import ModelConfig
from rlhf_jax.errors import ConfigError
from rlhf_jax.model import KVCache, Transformer, init_cache, predicted_logprobs, unembed

# --------------------------------------------------------------------------------------------------
# Sampling


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How one token is drawn from next-token logits [B V]."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False

    def __call__(self, logits: Float[Array, "B V"], rng: jax.Array) -> Int[Array, " B"]:
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits.astype(jnp.float32) / self.temperature
        if self.top_k is not None:
            kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p is not None:
            # Keep the smallest set of most likely tokens whose mass reaches top_p.
            sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            cutoff = jnp.min(
                jnp.where(mass_before < self.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True
            )
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class SamplingState(NamedTuple):
    """The ``lax.while_loop`` carry: step ``t`` draws response token ``t`` from ``next_logits``."""

    step: Int[Array, ""]
    tokens: Int[Array, "B R"]
    logprobs: Float[Array, "B R"]
    done: Bool[Array, " B"]
    next_logits: Float[Array, "B V"]
    cache: KVCache


class Sample(NamedTuple):
    tokens: Int[Array, "B R"]  # padding after the first EOS
    mask: Int[Array, "B R"]  # 1 through the first EOS, inclusive
    logprobs: Float[Array, "B R"]  # log pi_T(token); 0 where masked


def prefill(
    params, config: ModelConfig, prompt_tokens, prompt_mask, max_new_tokens: int, pad_id: int
) -> SamplingState:
    """Run the prompt through the model into a fresh cache of length P + R."""
    B, P = prompt_tokens.shape
    cache = init_cache(config, B, P + max_new_tokens)
    # Only the last position's logits are needed: [B, P, V] float32 would be 8 GB for 64
    # prompts of 256 tokens over a 128k vocabulary.
    hidden, cache = Transformer(config).apply(
        {"params": params}, prompt_tokens, prompt_mask, cache=cache, hidden=True
    )
    logits = unembed(params, config, hidden[:, -1:])
    return SamplingState(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((B, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((B, max_new_tokens), jnp.float32),
        done=jnp.zeros((B,), bool),
        next_logits=logits[:, -1],
        cache=cache,
    )


def decode(
    params,
    config: ModelConfig,
    state: SamplingState,
    rng: jax.Array,
    sampler: Sampler,
    eos_id: int,
    pad_id: int,
) -> SamplingState:
    """Draw tokens until every row has emitted EOS or R tokens exist (``lax.while_loop``)."""
    model = Transformer(config)
    R = state.tokens.shape[1]

    def cond(s: SamplingState):
        return (s.step < R) & ~jnp.all(s.done)

    def body(s: SamplingState):
        token = sampler(s.next_logits, jax.random.fold_in(rng, s.step))
        logp = jax.nn.log_softmax(s.next_logits.astype(jnp.float32) / sampler.temperature)
        logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        live = ~s.done
        token = jnp.where(live, token, pad_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(
            s.logprobs, jnp.where(live, logp, 0.0)[:, None], s.step, axis=1
        )
        logits, cache = model.apply(
            {"params": params}, token[:, None], live[:, None].astype(jnp.int32), cache=s.cache
        )
        return SamplingState(
            s.step + 1, tokens, logprobs, s.done | (token == eos_id), logits[:, -1], cache
        )

    return jax.lax.while_loop(cond, body, state)


def mask_through_eos(tokens: Int[Array, "B R"], eos_id: int) -> Int[Array, "B R"]:
    """1 on every token up to and including the first EOS (all ones when there is none)."""
    is_eos = (tokens == eos_id).astype(jnp.int32)
    eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
    return (eos_before == 0).astype(jnp.int32)


def generate(
    params,
    config: ModelConfig,
    prompt_tokens,
    prompt_mask,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    sampler: Sampler,
    eos_id: int,
    pad_id: int,
) -> Sample:
    """The traceable core of ``sample``, for use inside a larger jitted function."""
    state = prefill(params, config, prompt_tokens, prompt_mask, max_new_tokens, pad_id)
    state = decode(params, config, state, rng, sampler, eos_id, pad_id)
    mask = mask_through_eos(state.tokens, eos_id)
    # Rows stop writing after EOS, so masked slots already hold pad_id and log-prob 0.
    return Sample(state.tokens, mask, state.logprobs)


@functools.partial(jax.jit, static_argnums=(1, 4, 5))
def _prefill_jit(params, config, prompt_tokens, prompt_mask, max_new_tokens, pad_id):
    return prefill(params, config, prompt_tokens, prompt_mask, max_new_tokens, pad_id)


@functools.partial(jax.jit, static_argnums=(1, 4, 5, 6), donate_argnums=(2,))
def _decode_jit(params, config, state, rng, sampler, eos_id, pad_id):
    # Returning the whole state lets XLA reuse every donated buffer (the cache included).
    return decode(params, config, state, rng, sampler, eos_id, pad_id)


def sample(
    params,
    config: ModelConfig,
    prompt_tokens: Int[Array | np.ndarray, "B P"],
    prompt_mask: Shaped[Array | np.ndarray, "B P"],
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    eos_id: int,
    pad_id: int,
) -> Sample:
    """Sample ``max_new_tokens`` response tokens per left-padded prompt.

    Returns ``Sample(tokens [B R], mask [B R], logprobs [B R])``: tokens after the first EOS are
    ``pad_id`` with mask 0 and log-prob 0; ``logprobs`` are under ``softmax(logits / temperature)``.
    Two jitted calls: the prefill, then the decode loop with the sampling state (and its cache)
    donated. The batch keeps the sharding of ``prompt_tokens``; equal shapes never recompile.
    Prompts must be left-padded (their last token real), the layout every response position
    depends on; right-padded ones, what many tokenizers give by default, raise ``ConfigError``.
    """
    check_left_padded(prompt_mask)
    sampler = Sampler(temperature, top_k, top_p, greedy)
    state = _prefill_jit(params, config, prompt_tokens, prompt_mask, max_new_tokens, pad_id)
    state = _decode_jit(params, config, state, rng, sampler, eos_id, pad_id)
    return Sample(state.tokens, mask_through_eos(state.tokens, eos_id), state.logprobs)


# --------------------------------------------------------------------------------------------------
# Scoring


def check_left_padded(prompt_mask) -> None:
    """``ConfigError`` when a concrete prompt mask has padding after a real token."""
    if isinstance(prompt_mask, jax.core.Tracer):
        return
    mask = np.asarray(prompt_mask)
    if mask.ndim == 2 and mask.shape[1] and np.any((mask[:, -1] == 0) & (mask.sum(axis=1) > 0)):
        rows = np.flatnonzero((mask[:, -1] == 0) & (mask.sum(axis=1) > 0))
        raise ConfigError(
            f"prompts are right-padded (rows {rows[:5].tolist()} end in padding): sampling "
            "continues from the last position, so pad prompts on the left "
            "(tokenizer.padding_side = 'left', as rlhf_jax.hf.load_tokenizer sets)"
        )


def full_sequence(prompt_tokens, prompt_mask, response_tokens, response_mask):
    """``[prompt; response]`` tokens and attention mask [B P+R]."""
    tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
    return tokens, mask


def response_logprobs(
    params,
    config: ModelConfig,
    tokens: Int[Array, "B T"],
    mask,
    prompt_len: int,
    *,
    temperature: float = 1.0,
) -> Float[Array, "B R"]:
    """Teacher-forced log pi_T of each response token (positions ``P..T-1``), the logits made a
    chunk of tokens at a time (``model.predicted_logprobs``)."""
    return predicted_logprobs(
        params, config, tokens, mask, prompt_len, temperature=temperature
    ).logprobs


def response_values(
    params, config: ModelConfig, tokens: Int[Array, "B T"], mask, prompt_len: int
) -> Float[Array, "B R"]:
    """V(x, y_<t): the scalar head read at the position that predicts response token t."""
    values = Transformer(config).apply({"params": params}, tokens, mask)
    return values[:, prompt_len - 1 : -1]


def reward_scores(
    params,
    config: ModelConfig,
    tokens: Int[Array, "*B T"],
    mask,
    prompt_len: int,
    response_mask,
    *,
    bias=0.0,
) -> Float[Array, "*B"]:
    """The reward model's scalar at each row's last valid response token (the EOS, if any), minus
    ``bias`` (the normalisation of docs/method.md section 2.3). Any leading batch shape works."""
    lead = tokens.shape[:-1]
    flat = Transformer(config).apply(
        {"params": params}, tokens.reshape(-1, tokens.shape[-1]), mask.reshape(-1, mask.shape[-1])
    )
    last = prompt_len + jnp.sum(response_mask.reshape(flat.shape[0], -1), axis=-1) - 1
    score = jnp.take_along_axis(flat, last[:, None], axis=1)[:, 0]
    return score.reshape(lead) - bias


class RewardModel(NamedTuple):
    """A reward model as the evaluation and the RL stages use it: its params, its architecture
    (a scalar head) and its bias, subtracted from every score so that the demonstrations score 0
    on average (docs/method.md section 2.3; 0 for an exported RM, whose bias is in its weights)."""

    params: dict
    model: ModelConfig
    bias: Float[Array, ""] | float


class Episodes(NamedTuple):
    """What an RL iteration sampled, as it hands it to ``on_log``: the prompts and the responses
    (padding after the first EOS) with their mask (1 through the first EOS)."""

    prompt_tokens: Int[Array, "B P"]
    response_tokens: Int[Array, "B R"]
    response_mask: Int[Array, "B R"]


class RolloutParams(NamedTuple):
    """The four networks of InstructGPT's PPO (the last two share ``critic_config``)."""

    policy: dict
    ref: dict
    value: dict
    reward: dict


class Rollout(NamedTuple):
    """A scored batch of episodes, everything PPO's update needs."""

    prompt_tokens: Int[Array, "B P"]
    prompt_mask: Int[Array, "B P"]
    response_tokens: Int[Array, "B R"]
    response_mask: Int[Array, "B R"]
    logprobs: Float[Array, "B R"]  # pi_old, teacher-forced
    ref_logprobs: Float[Array, "B R"]
    values: Float[Array, "B R"]
    scores: Float[Array, " B"]  # normalised RM score (after bias, and the missing-EOS rule)
    kl: Float[Array, "B R"]  # per-token k1 estimate log pi - log pi_ref, masked
    rewards: Float[Array, "B R"]  # KL-penalised per-token rewards
    advantages: Float[Array, "B R"]  # GAE, whitened over valid tokens
    returns: Float[Array, "B R"]


def score(
    params: RolloutParams,
    policy_config: ModelConfig,
    critic_config: ModelConfig,
    prompt_tokens: Int[Array, "B P"],
    prompt_mask: Shaped[Array, "B P"],
    response_tokens: Int[Array, "B R"],
    response_mask: Shaped[Array, "B R"],
    *,
    eos_id: int,
    kl_coef: float | Float[Array, ""],
    temperature: float = 1.0,
    gamma: float = 1.0,
    lam: float = 0.95,
    reward_bias: float | Float[Array, ""] = 0.0,
    no_eos_score: float | None = None,
    whiten_rewards: bool = False,
    scores: Float[Array, " B"] | None = None,
) -> Rollout:
    """Turn sampled responses into a PPO batch (docs/method.md sections 3.1-3.4).

    Policy log-probs are recomputed by a teacher-forced forward with the sampling temperature (so
    the first PPO ratio is exactly 1); reference log-probs likewise; values and the RM score come
    from the critic-shaped networks; the score is read at EOS (the last response token when there
    is none) and, if ``no_eos_score`` is set, replaced by it for rows without EOS (LHP/N+). Rewards,
    GAE and whitening all go through ``rlhf_jax.losses``. ``whiten_rewards`` (LHP, off by default)
    whitens the per-token rewards without shifting their mean before GAE. ``scores`` [B], when
    given, replace the reward model's (``params.reward`` is then unused): a programmatic reward,
    such as the built-in world's gold for its oracle-PPO run.
    """
    P = prompt_tokens.shape[1]
    response_mask = response_mask.astype(jnp.int32)
    tokens, mask = full_sequence(prompt_tokens, prompt_mask, response_tokens, response_mask)
    logprobs = response_logprobs(
        params.policy, policy_config, tokens, mask, P, temperature=temperature
    )
    ref_logprobs = response_logprobs(
        params.ref, policy_config, tokens, mask, P, temperature=temperature
    )
    values = response_values(params.value, critic_config, tokens, mask, P)
    if scores is None:
        scores = reward_scores(
            params.reward, critic_config, tokens, mask, P, response_mask, bias=reward_bias
        )
    if no_eos_score is not None:
        has_eos = jnp.any((response_tokens == eos_id) & (response_mask > 0), axis=1)
        scores = jnp.where(has_eos, scores, no_eos_score)

    rewards, kl = losses.kl_penalized_rewards(
        scores, logprobs, ref_logprobs, response_mask, kl_coef=kl_coef
    )
    if whiten_rewards:
        rewards = losses.masked_whiten(rewards, response_mask, shift_mean=False)
    advantages, returns = losses.gae(rewards, values, response_mask, gamma=gamma, lam=lam)
    advantages = losses.masked_whiten(advantages, response_mask)
    zero = lambda x: jnp.where(response_mask > 0, x, 0.0)  # noqa: E731
    return Rollout(
        prompt_tokens,
        prompt_mask.astype(jnp.int32),
        response_tokens,
        response_mask,
        zero(logprobs),
        zero(ref_logprobs),
        zero(values),
        scores,
        kl,
        rewards,
        advantages,
        returns,
    )
