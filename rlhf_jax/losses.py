"""Pure, jittable RLHF losses and RL math: SFT NLL, ranking loss, KL-penalised rewards, GAE, PPO.

Every function here maps arrays to arrays: no modules, parameters or config objects, keyword-only
knobs, and shapes written in the project's dimension alphabet (B batch, K completions per prompt,
T sequence, R response, V vocab). All of them run under ``jax.jit`` and ``jax.vmap`` (vmap adds a
leading axis in front of the annotated shapes). Logits are upcast to float32 before any log-softmax,
so bfloat16 model outputs are safe.

Masks may be bool or float. In a mean, a float mask acts as per-element weights (``sft_loss`` uses
this for ``prompt_loss_weight``); anywhere a position is only kept or dropped, any nonzero entry
counts as valid. Means over an empty mask return 0 with finite (zero) gradients. Per-token inputs
at masked positions (log-probs, values, rewards, advantages, token ids, masked-out completions'
rewards) cannot leak into a result or a gradient, even as NaN or inf; logits must stay finite
everywhere, since a log-softmax over a NaN row has a NaN gradient whatever the mask says.

Python-level knobs that change the computed graph (``shift_mean``) must be static under ``jax.jit``;
numeric knobs (``kl_coef``, ``clip_eps``, ``gamma``, ...) may be Python numbers or traced scalars.

Where this module departs from the papers (each function's docstring says it again):

- ``ranking_loss`` normalises each prompt by its number of valid, non-tied pairs rather than by
  C(K, 2) (InstructGPT eq. 1); the two agree when all K completions are valid and untied. Ties are
  dropped as in InstructGPT appendix C.2.
- ``kl_penalized_rewards`` adds the score at the last valid response token (the EOS index), as
  docs/method.md 3.1 decides; LHP reads it at the last position and N+ one step after EOS.
- ``value_loss`` clips the value prediction, which is not in the PPO paper (it comes from OpenAI
  baselines, LHP and N+).
- ``masked_whiten`` uses the biased (population) variance, as LHP's ``whiten`` does.
- ``gae`` skips masked positions instead of treating them as time steps; for the usual mask (valid
  response tokens followed by padding) this is exactly GAE with V = 0 after the last token.
- ``adaptive_kl_coef`` is the LHP form of Ziegler et al.'s controller: the gain K_beta is
  ``n_steps / horizon`` instead of a constant 0.1.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, Real, Shaped

# Python numbers, NumPy scalars and 0-d arrays all appear here: knobs are usually Python floats,
# but become traced 0-d arrays when a caller passes them through jax.jit (e.g. an adaptive beta).
Scalar = float | int | Real[ArrayLike, ""]

__all__ = [
    "KLEstimates",
    "adaptive_kl_coef",
    "entropy",
    "full_kl",
    "gae",
    "kl_estimates",
    "kl_penalized_rewards",
    "masked_mean",
    "masked_whiten",
    "pairwise_loss",
    "ppo_policy_loss",
    "ptx_loss",
    "ranking_loss",
    "sft_loss",
    "token_logprobs",
    "value_loss",
]


def _upcast(x: Array) -> Array:
    """At least float32 (bfloat16 -> float32; float64 stays float64 when x64 is on)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_div(num: Array, den: Array) -> Array:
    """num / den where den > 0, else 0; the inner where keeps the gradient finite (double-where)."""
    nonzero = den > 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def _log_softmax(logits: Array) -> Array:
    return jax.nn.log_softmax(_upcast(logits), axis=-1)


# ---------------------------------------------------------------------------------------------
# Statistics over valid entries


def masked_mean(
    x: Float[Array, "*shape"],
    mask: Shaped[Array, "*shape"],
    axis: int | tuple[int, ...] | None = None,
) -> Float[Array, "..."]:
    """Weighted mean over valid entries: ``sum(m * x) / sum(m)``, and 0 where ``sum(m) == 0``.

    Args:
      x: values, any shape.
      mask: same shape as ``x``; bool, or float weights (0 drops an entry).
      axis: axes to reduce, as in ``jnp.mean``; ``None`` reduces everything.

    Returns:
      The mean with ``axis`` removed, in at least float32. Entries of ``x`` where ``mask == 0``
      never reach the result or its gradient, even if they are NaN or inf.
    """
    x = _upcast(x)
    w = mask.astype(x.dtype)
    num = jnp.sum(jnp.where(w != 0, x, 0.0) * w, axis=axis)
    return _safe_div(num, jnp.sum(w, axis=axis))


def masked_whiten(
    x: Float[Array, "*shape"], mask: Shaped[Array, "*shape"], *, shift_mean: bool = True
) -> Float[Array, "*shape"]:
    """Whitening with statistics over valid entries only (docs/method.md 3.4).

    ``mu = masked_mean(x)``, ``var = masked_mean((x - mu)^2)`` (biased, as LHP's ``whiten``),
    ``out = (x - mu) / sqrt(var + 1e-8)``; with ``shift_mean=False`` the mean is added back
    (``out + mu``), LHP's reward whitening. Used per batch for PPO advantages.

    Args:
      x: values, any shape; statistics are pooled over all of it.
      mask: same shape; bool or float weights.
      shift_mean: static Python bool; ``False`` keeps the original mean.

    Returns:
      The whitened ``x`` (at least float32), zero at masked positions.
    """
    valid = mask != 0
    x = _upcast(x)
    mean = masked_mean(x, mask)
    centered = jnp.where(valid, x - mean, 0.0)
    var = masked_mean(centered**2, mask)
    out = centered * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return jnp.where(valid, out, 0.0)


# ---------------------------------------------------------------------------------------------
# Language-model likelihoods


def token_logprobs(
    logits: Float[Array, "B T V"], tokens: Int[Array, "B T"], *, temperature: Scalar = 1.0
) -> Float[Array, "B T"]:
    """Log-probability of each token: ``log softmax(logits[b, t] / temperature)[tokens[b, t]]``.

    Logits and tokens are *aligned*: ``logits[:, t]`` is the distribution the token ``tokens[:, t]``
    was drawn from (shift them yourself; ``sft_loss`` does the shift). Divide by the sampling
    temperature so that PPO ratios are computed under the distribution that was sampled
    (docs/method.md 3.7; LHP and N+ do the same).

    Args:
      logits: [B, T, V], any float dtype; upcast to float32 first.
      tokens: [B, T] integer ids in [0, V) (an id out of range gives NaN at that position).
      temperature: positive scalar.

    Returns:
      [B, T] float32 log-probabilities.
    """
    logits = _upcast(logits) / temperature
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sft_loss(
    logits: Float[Array, "B T V"], tokens: Int[Array, "B T"], loss_mask: Shaped[Array, "B T"]
) -> Float[Array, ""]:
    """Mean next-token negative log-likelihood over weighted target tokens (docs/method.md 1.1).

    ``L = -sum_{b,t>=1} m[b,t] * log pi(tokens[b,t] | logits[b,t-1]) / sum_{b,t>=1} m[b,t]``

    ``logits[:, t]`` predicts ``tokens[:, t+1]``, so ``loss_mask[:, t]`` weights the prediction of
    ``tokens[:, t]``; ``loss_mask[:, 0]`` is ignored (nothing predicts the first token). The mask
    may hold fractional weights, e.g. 1 on response tokens (EOS included) and
    ``prompt_loss_weight`` on prompt tokens; the normaliser is the sum of the weights.

    Args:
      logits: [B, T, V] model outputs.
      tokens: [B, T] token ids; any integer (e.g. an ignore id of -100) may sit at masked
        positions without touching the loss or its gradient.
      loss_mask: [B, T] bool, or float weights in [0, 1].

    Returns:
      Scalar float32 loss; 0 when the mask is empty.
    """
    logp = token_logprobs(logits[:, :-1], tokens[:, 1:])
    return -masked_mean(logp, loss_mask[:, 1:])


def ptx_loss(
    logits: Float[Array, "B T V"], tokens: Int[Array, "B T"], mask: Shaped[Array, "B T"]
) -> Float[Array, ""]:
    """Pretraining term of PPO-ptx: mean per-token NLL of pretraining text (InstructGPT eq. 2).

    Eq. 2 maximises ``gamma * E_{x ~ D_pretrain}[log pi(x)]``; this returns its negation per token,
    ``L_ptx = -mean_{masked t} log pi(tokens[t] | tokens[<t])``, with the ``sft_loss`` conventions
    (``logits[:, t]`` predicts ``tokens[:, t+1]``; ``mask`` marks target tokens). The paper does
    not state the normalisation; the per-token mean is docs/method.md 4.2's choice, so sweep gamma
    (27.8 in the paper) when you change it. Minimise ``L_pi + gamma * L_ptx``.

    Args:
      logits: [B, T, V] policy outputs on the pretraining batch.
      tokens: [B, T] pretraining token ids.
      mask: [B, T] bool or float weights (non-pad tokens).

    Returns:
      Scalar float32 loss.
    """
    return sft_loss(logits, tokens, mask)


# ---------------------------------------------------------------------------------------------
# Reward model


def ranking_loss(
    rewards: Float[Array, "B K"],
    ranks: Int[Array, "B K"],
    *,
    valid: Shaped[Array, "B K"] | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """K-wise Bradley-Terry ranking loss of InstructGPT eq. 1, one batch element per prompt.

    For prompt b, a pair (i, j) counts when both completions are valid and ``ranks[b, i] <
    ranks[b, j]`` (i is strictly preferred; equal ranks are ties and are dropped, InstructGPT C.2):

    ``loss_b = -1/N_b * sum_{(i, j)} log sigmoid(r_{b,i} - r_{b,j})``, N_b = number of such pairs,
    ``loss = mean of loss_b over the prompts with N_b > 0``.

    Departure from the paper: eq. 1 divides by C(K, 2); here N_b excludes ties and invalid
    completions (docs/method.md 2.2), which is the same when all K completions are valid and untied.
    Prompts with fewer than two valid completions, or only ties, contribute nothing (no NaN in the
    loss or its gradient); a batch with no pair at all gives loss 0.

    Args:
      rewards: [B, K] scalar rewards r_theta(x_b, y_{b,k}).
      ranks: [B, K] integer ranks, 0 = best; equal ranks are ties.
      valid: optional [B, K] bool (or 0/1) mask of real completions (K may be padded to K_max).

    Returns:
      ``(loss, accuracy)``: scalar loss, and the pairwise accuracy pooled over the batch: the
      fraction of all counted pairs with ``r_w > r_l`` strictly (equal rewards count as wrong), so
      prompts with many pairs weigh more, as when comparisons are counted one by one. 0 with no
      pairs.
    """
    ok = jnp.ones(rewards.shape, bool) if valid is None else valid != 0
    pair = (ranks[:, :, None] < ranks[:, None, :]) & ok[:, :, None] & ok[:, None, :]
    r = _upcast(rewards)
    # Unselected completions may hold garbage rewards (padding); keep them out of the graph.
    diff = jnp.where(pair, r[:, :, None] - r[:, None, :], 0.0)
    pair_f = pair.astype(r.dtype)
    n_pairs = jnp.sum(pair_f, axis=(1, 2))
    per_prompt = _safe_div(-jnp.sum(jax.nn.log_sigmoid(diff) * pair_f, axis=(1, 2)), n_pairs)
    loss = masked_mean(per_prompt, n_pairs > 0)
    accuracy = _safe_div(jnp.sum((diff > 0) * pair_f), jnp.sum(n_pairs))
    return loss, accuracy


def pairwise_loss(chosen: Float[Array, " B"], rejected: Float[Array, " B"]) -> Float[Array, ""]:
    """Pairwise Bradley-Terry loss, the K = 2 case of InstructGPT eq. 1.

    ``loss = -mean_b log sigmoid(chosen_b - rejected_b)``

    Args:
      chosen: [B] rewards of the preferred completions.
      rejected: [B] rewards of the other completions.

    Returns:
      Scalar float32 loss.
    """
    return -jnp.mean(jax.nn.log_sigmoid(_upcast(chosen) - _upcast(rejected)))


# ---------------------------------------------------------------------------------------------
# PPO: rewards, advantages, losses


def kl_penalized_rewards(
    score: Float[Array, " B"],
    logprobs: Float[Array, "B R"],
    ref_logprobs: Float[Array, "B R"],
    mask: Shaped[Array, "B R"],
    *,
    kl_coef: Scalar,
) -> tuple[Float[Array, "B R"], Float[Array, "B R"]]:
    """Per-token PPO rewards with the KL penalty toward the SFT policy (docs/method.md 3.1).

    ``k_t = log pi(y_t) - log pi_SFT(y_t)`` (the sampled-token "k1" estimate),
    ``r_t = -kl_coef * k_t + 1[t = t_e] * score`` for valid t, and 0 at masked positions, where
    t_e is the last valid token of the row (the EOS index for the usual mask). Summed over t this is
    ``score - beta * log(pi(y|x) / pi_SFT(y|x))``, the first term of InstructGPT eq. 2 (beta = 0.02
    there, P C.4). LHP adds the score at the last position and N+ one step after EOS; we use t_e.
    A row with no valid token gets all-zero rewards (its score is dropped).

    Args:
      score: [B] normalised reward-model scores r_hat(x, y).
      logprobs: [B, R] log pi(y_t) of the sampled response tokens under the policy.
      ref_logprobs: [B, R] the same under the frozen reference (SFT) policy.
      mask: [B, R] valid response tokens (bool or 0/1).
      kl_coef: beta, scalar (may be traced, e.g. from ``adaptive_kl_coef``).

    Returns:
      ``(rewards, kl)``, both [B, R] and zero at masked positions: the total per-token rewards and
      the per-token k1 term (``-kl_coef * kl`` is the non-score reward; ``kl.sum(-1)`` is the
      sequence KL estimate logged as ``objective/kl``).
    """
    valid = mask != 0
    kl = jnp.where(valid, _upcast(logprobs) - _upcast(ref_logprobs), 0.0)
    num_r = valid.shape[-1]
    last = num_r - 1 - jnp.argmax(valid[:, ::-1], axis=-1)
    at_last = (jnp.arange(num_r)[None, :] == last[:, None]) & jnp.any(valid, -1, keepdims=True)
    rewards = -kl_coef * kl + jnp.where(at_last, _upcast(score)[:, None], 0.0)
    return rewards, kl


def gae(
    rewards: Float[Array, "B R"],
    values: Float[Array, "B R"],
    mask: Shaped[Array, "B R"],
    *,
    gamma: Scalar = 1.0,
    lam: Scalar = 0.95,
) -> tuple[Float[Array, "B R"], Float[Array, "B R"]]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16; PPO eq. 11-12).

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = sum_{l>=0} (gamma lam)^l delta_{t+l}``,
    computed backwards as ``A_t = delta_t + gamma * lam * A_{t+1}`` with a reverse ``lax.scan``;
    returns (value targets) are ``R_t = A_t + V_t`` (LHP, N+). V and A after the last valid token
    are 0: the episode ends there (docs/method.md 3.4). InstructGPT states gamma = 1 (P C.4) but not
    lambda; the default 0.95 follows LHP, N+ and Gao et al.

    Masked positions get zero advantage and zero return, and their rewards and values are ignored.
    They are skipped rather than treated as steps: "t+1" is the next *valid* position, which is
    the plain formula when the mask is valid tokens followed by padding.

    Args:
      rewards: [B, R] per-token rewards (e.g. from ``kl_penalized_rewards``).
      values: [B, R] V(s_t), read at the position that predicts token t.
      mask: [B, R] valid response tokens (bool or 0/1).
      gamma: discount; lam: GAE lambda (scalars, may be traced).

    Returns:
      ``(advantages, returns)``, both [B, R] float32, zero at masked positions. Not whitened (use
      ``masked_whiten``) and not stop-gradiented.
    """
    valid = mask != 0
    r = jnp.where(valid, _upcast(rewards), 0.0)
    v = jnp.where(valid, _upcast(values), 0.0)

    def step(carry, x):
        next_value, next_adv = carry
        r_t, v_t, ok_t = x
        adv = r_t + gamma * next_value - v_t + gamma * lam * next_adv
        carry = (jnp.where(ok_t, v_t, next_value), jnp.where(ok_t, adv, next_adv))
        return carry, jnp.where(ok_t, adv, 0.0)

    zeros = jnp.zeros(r.shape[:1], r.dtype)
    _, adv_t = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, valid.T), reverse=True)
    advantages = adv_t.T
    return advantages, jnp.where(valid, advantages + v, 0.0)


def ppo_policy_loss(
    logprobs: Float[Array, "B R"],
    old_logprobs: Float[Array, "B R"],
    advantages: Float[Array, "B R"],
    mask: Shaped[Array, "B R"],
    *,
    clip_eps: Scalar = 0.2,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``rho_t = exp(logp_t - old_logp_t)``,
    ``L = masked_mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))`` over valid tokens of
    the whole batch (a token-level mean, as LHP and N+; eps = 0.2 in InstructGPT C.4).
    ``old_logprobs`` and ``advantages`` are treated as data: pass constants.

    Args:
      logprobs: [B, R] log pi_theta of the sampled tokens (differentiated).
      old_logprobs: [B, R] log pi_old from the rollout.
      advantages: [B, R] advantages (usually whitened).
      mask: [B, R] valid tokens; float entries weight the means.
      clip_eps: clipping range eps.

    Returns:
      ``(loss, stats)``: scalar loss; ``stats`` (stop-gradiented scalars) has ``clipfrac``
      (fraction of valid tokens where the clipped term is the larger, LHP), ``approxkl``
      (``0.5 * mean((logp - old)^2)``, the k2 estimator, LHP), ``ratio_mean`` and ``ratio_max``
      (max over valid tokens; 0 if none).
    """
    valid = mask != 0
    log_ratio = jnp.where(valid, _upcast(logprobs) - _upcast(old_logprobs), 0.0)
    ratio = jnp.exp(log_ratio)
    adv = jnp.where(valid, _upcast(advantages), 0.0)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).astype(ratio.dtype), mask),
        "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
        "ratio_mean": masked_mean(ratio, mask),
        # Ratios are positive, so 0 at masked positions never wins the max unless all are masked.
        "ratio_max": jnp.max(jnp.where(valid, ratio, 0.0)),
    }
    return loss, jax.lax.stop_gradient(stats)


def value_loss(
    values: Float[Array, "B R"],
    old_values: Float[Array, "B R"],
    returns: Float[Array, "B R"],
    mask: Shaped[Array, "B R"],
    *,
    clip_eps: Scalar = 0.2,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Clipped value loss of docs/method.md 3.5 (OpenAI baselines, LHP, N+; not in the PPO paper).

    ``V_clip = V_old + clip(V - V_old, -eps, eps)``,
    ``L_V = 0.5 * masked_mean_t max((V - R)^2, (V_clip - R)^2)``.

    Args:
      values: [B, R] current value predictions (differentiated).
      old_values: [B, R] value predictions from the rollout.
      returns: [B, R] value targets R_t (from ``gae``).
      mask: [B, R] valid tokens; float entries weight the means.
      clip_eps: value clipping range eps_v (0.2 in LHP and N+).

    Returns:
      ``(loss, stats)``: scalar loss; ``stats`` (stop-gradiented scalars) has ``clipfrac`` (fraction
      of valid tokens where the clipped error is the larger), ``vpred`` (mean V) and ``error``
      (mean (V - R)^2).
    """
    valid = mask != 0
    v = jnp.where(valid, _upcast(values), 0.0)
    v_old = jnp.where(valid, _upcast(old_values), 0.0)
    ret = jnp.where(valid, _upcast(returns), 0.0)
    v_clipped = v_old + jnp.clip(v - v_old, -clip_eps, clip_eps)
    err = (v - ret) ** 2
    err_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask)
    stats = {
        "clipfrac": masked_mean((err_clipped > err).astype(err.dtype), mask),
        "vpred": masked_mean(v, mask),
        "error": masked_mean(err, mask),
    }
    return loss, jax.lax.stop_gradient(stats)


# ---------------------------------------------------------------------------------------------
# KL and entropy diagnostics


class KLEstimates(NamedTuple):
    """Per-element estimators of KL(pi || pi_ref) from samples of pi (Schulman's KL note)."""

    k1: Array  # -log r: unbiased, can be negative; the one in the reward
    k2: Array  # (log r)^2 / 2: biased, low variance; LHP's approxkl
    k3: Array  # (r - 1) - log r: unbiased and never negative


def kl_estimates(
    logprobs: Float[Array, "*shape"], ref_logprobs: Float[Array, "*shape"]
) -> KLEstimates:
    """k1, k2, k3 estimators of KL(pi || pi_ref) per sampled token (docs/method.md section 6;
    J. Schulman, "Approximating KL divergence", 2020).

    With ``log r = ref_logprobs - logprobs`` (samples drawn from pi):
    ``k1 = -log r``, ``k2 = (log r)^2 / 2``, ``k3 = (r - 1) - log r``.

    Args:
      logprobs: log pi(y) of sampled tokens, any shape.
      ref_logprobs: log pi_ref(y) of the same tokens, same shape.

    Returns:
      ``KLEstimates(k1, k2, k3)``, each the input shape, float32. No mask: reduce with
      ``masked_mean``.
    """
    log_r = _upcast(ref_logprobs) - _upcast(logprobs)
    # expm1 keeps k3 accurate near r = 1, where it is O(log_r^2).
    return KLEstimates(k1=-log_r, k2=0.5 * log_r**2, k3=jnp.expm1(log_r) - log_r)


def full_kl(
    logits: Float[Array, "B T V"], ref_logits: Float[Array, "B T V"], mask: Shaped[Array, "B T"]
) -> Float[Array, "B T"]:
    """Exact per-token KL(pi || pi_ref) = ``sum_v pi(v) (log pi(v) - log pi_ref(v))``
    (docs/method.md section 6).

    Lower-variance than the sampled estimators when V is small enough to afford; sum over t for the
    sequence KL. Vocabulary entries with pi(v) = 0 (e.g. -inf logits) contribute exactly 0.

    Args:
      logits: [B, T, V] policy logits (apply any temperature first).
      ref_logits: [B, T, V] reference-policy logits.
      mask: [B, T] valid positions.

    Returns:
      [B, T] float32 KL per token, zero at masked positions.
    """
    logp = _log_softmax(logits)
    ref_logp = _log_softmax(ref_logits)
    p = jnp.exp(logp)
    diff = jnp.where(p > 0, logp - ref_logp, 0.0)
    return jnp.where(mask != 0, jnp.sum(p * diff, axis=-1), 0.0)


def entropy(logits: Float[Array, "B T V"], mask: Shaped[Array, "B T"]) -> Float[Array, ""]:
    """Mean token entropy ``masked_mean_t(-sum_v pi(v) log pi(v))`` (logged as objective/entropy).

    Args:
      logits: [B, T, V] policy logits (apply any temperature first).
      mask: [B, T] valid positions; float entries weight the mean.

    Returns:
      Scalar float32, in nats; 0 for an empty mask.
    """
    logp = _log_softmax(logits)
    p = jnp.exp(logp)
    per_token = -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)
    return masked_mean(per_token, mask)


def adaptive_kl_coef(
    kl_coef: Scalar,
    observed_kl: Scalar,
    n_steps: Scalar,
    *,
    target: Scalar,
    horizon: Scalar,
) -> Float[Array, ""]:
    """One update of the adaptive KL controller (Ziegler et al. 2019, section 2.2; LHP).

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta' = beta * (1 + e * n_steps / horizon)``.

    Ziegler et al. write ``beta' = beta (1 + K_beta e)`` with K_beta = 0.1; this is LHP's
    ``AdaptiveKLController``, where the gain is ``n_steps / horizon`` (episodes in this update over
    a horizon such as 10,000 episodes). InstructGPT itself used a fixed beta = 0.02.

    Args:
      kl_coef: current beta.
      observed_kl: measured KL of the policy to the reference (mean sequence KL, nats).
      n_steps: episodes (or steps) since the last update.
      target: target KL (nats); horizon: controller horizon, same unit as ``n_steps``.

    Returns:
      The new beta as a float32 scalar array.
    """
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(kl_coef, jnp.float32) * (1.0 + error * n_steps / horizon)
