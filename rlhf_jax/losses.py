"""Pure, jittable RLHF losses and RL math: SFT NLL, ranking loss, KL-penalised rewards, GAE, PPO,
DPO and its variants, GRPO and RLOO advantages, KL penalties.

Every function here maps arrays to arrays: no modules, parameters or config objects, keyword-only
knobs, and shapes written in the project's dimension alphabet (B batch, K completions per prompt,
T sequence, R response, V vocab). All of them run under ``jax.jit`` and ``jax.vmap`` (vmap adds a
leading axis in front of the annotated shapes). Logits are upcast to float32 before any log-softmax,
so bfloat16 model outputs are safe.

What a loss returns: unlike ``optax.losses``, whose losses give per-element values for the
caller to average, every loss here returns the reduced scalar (``sft_loss``, ``ptx_loss``,
``ranking_loss``'s first output, ``pairwise_loss``, ``kl_penalty``), and the PPO, value and DPO
losses return ``(scalar, stats)`` with the diagnostics computed over the same masks. In RLHF the
reduction is part of the method, not a detail: a token mean and a per-sequence mean are different
objectives (``normalize=``: PPO and DAPO take the first, GRPO the second, Dr. GRPO a constant), the
K-wise loss averages each prompt's pairs before the prompts, and padding must never count; leaving
it to each caller is how two implementations of "the same" loss come to disagree. The per-element
pieces stay public for a caller who wants another reduction: ``token_logprobs``,
``kl_estimates``, ``kl_penalized_rewards``, ``gae``, ``ranked_pairs``, and ``token_aggregate``
with a mask of their own.

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
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Real, Shaped

# Python numbers, NumPy scalars and 0-d arrays all appear here: knobs are usually Python floats,
# but become traced 0-d arrays when a caller passes them through jax.jit (e.g. an adaptive beta).
Scalar = float | int | Real[ArrayLike, ""]

__all__ = [
    "KLEstimates",
    "adaptive_kl_coef",
    "dpo_loss",
    "entropy",
    "full_kl",
    "gae",
    "group_advantages",
    "kl_estimates",
    "kl_penalized_rewards",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "pairwise_loss",
    "ppo_policy_loss",
    "ptx_loss",
    "ranked_pairs",
    "ranking_loss",
    "rloo_advantages",
    "sequence_logprobs",
    "sft_loss",
    "token_logprobs",
    "token_aggregate",
    "token_entropy",
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


def token_aggregate(
    x: Float[Array, "B R"], mask: Shaped[Array, "B R"], *, normalize: str = "token"
) -> Float[Array, ""]:
    """Per-token terms to one number, the choice that separates PPO, GRPO and Dr. GRPO.

    - ``"token"``: ``sum_{b,t} m x / sum_{b,t} m``, every valid token of the batch weighs the
      same (LHP, N+, DAPO); long responses weigh more in total.
    - ``"sequence"``: ``mean_b (sum_t m x / sum_t m)`` over rows with a valid token, every
      response weighs the same (GRPO, Shao et al. 2024, eq. 3); a token of a short response
      weighs more, which Liu et al. 2025 (Dr. GRPO) show biases toward long wrong answers.
    - ``"constant"``: ``sum_{b,t} m x / (B R)``, a fixed normaliser (Dr. GRPO), so no token's
      weight depends on its response's length.

    Args:
      x: [B, R] per-token terms.
      mask: [B, R] valid tokens; float entries weight the sums.
      normalize: static Python string, one of the three above.

    Returns:
      Scalar float32; 0 when the mask is empty. Masked entries never reach it or its gradient.
    """
    how = _choice(normalize, ("token", "sequence", "constant"), "normalize")
    if how == "token":
        return masked_mean(x, mask)
    if how == "sequence":
        per_row = masked_mean(x, mask, axis=-1)
        return masked_mean(per_row, jnp.any(mask != 0, axis=-1))
    w = mask.astype(_upcast(x).dtype)
    return jnp.sum(jnp.where(w != 0, _upcast(x), 0.0) * w) / x.size


def _choice(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")
    return value


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


def sequence_logprobs(
    logprobs: Float[Array, "B R"], mask: Shaped[Array, "B R"], *, average: bool = False
) -> Float[Array, " B"]:
    """Log-probability of each whole response: ``log pi(y | x) = sum_t m_t log pi(y_t | x, y_<t)``.

    The quantity DPO compares between policy and reference (Rafailov et al. 2023, eq. 7);
    ``average=True`` divides by the number of valid tokens, the length-normalised form IPO is
    usually run with (and SimPO's reward). Feed it ``token_logprobs`` of the response positions.

    Args:
      logprobs: [B, R] per-token log-probabilities.
      mask: [B, R] valid response tokens (bool or 0/1).
      average: static; mean instead of sum (0 for a row with no valid token).

    Returns:
      [B] float32. Masked entries (even NaN) never reach it or its gradient.
    """
    if average:
        return masked_mean(logprobs, mask, axis=-1)
    valid = mask != 0
    return jnp.sum(jnp.where(valid, _upcast(logprobs), 0.0), axis=-1)


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
    pair = ranked_pairs(ranks, valid)
    r = _upcast(rewards)
    # Unselected completions may hold garbage rewards (padding); keep them out of the graph.
    diff = jnp.where(pair, r[:, :, None] - r[:, None, :], 0.0)
    pair_f = pair.astype(r.dtype)
    n_pairs = jnp.sum(pair_f, axis=(1, 2))
    per_prompt = _safe_div(-jnp.sum(jax.nn.log_sigmoid(diff) * pair_f, axis=(1, 2)), n_pairs)
    loss = masked_mean(per_prompt, n_pairs > 0)
    accuracy = _safe_div(jnp.sum((diff > 0) * pair_f), jnp.sum(n_pairs))
    return loss, accuracy


def ranked_pairs(
    ranks: Int[Array, "B K"], valid: Shaped[Array, "B K"] | None = None
) -> Bool[Array, "B K K"]:
    """The pairs a K-wise ranking holds: ``[b, i, j]`` is True when completion i is ranked
    strictly above j (ties dropped, InstructGPT C.2) and both are valid. ``ranking_loss`` sums over
    them; DPO takes each as a (chosen, rejected) pair."""
    ok = jnp.ones(ranks.shape, bool) if valid is None else valid != 0
    return (ranks[:, :, None] < ranks[:, None, :]) & ok[:, :, None] & ok[:, None, :]


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
    normalize: str = "token",
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``rho_t = exp(logp_t - old_logp_t)``,
    ``L = masked_mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))`` over valid tokens of
    the whole batch (a token-level mean, as LHP and N+; eps = 0.2 in InstructGPT C.4).
    ``old_logprobs`` and ``advantages`` are treated as data: pass constants. ``normalize`` picks
    how the per-token terms become one number (``token_aggregate``): ``"sequence"`` is GRPO's
    per-response mean, ``"constant"`` Dr. GRPO's sum over a fixed R.

    Args:
      logprobs: [B, R] log pi_theta of the sampled tokens (differentiated).
      old_logprobs: [B, R] log pi_old from the rollout.
      advantages: [B, R] advantages (usually whitened; a sequence-level advantage repeated over
        the row's tokens for GRPO and RLOO).
      mask: [B, R] valid tokens; float entries weight the means.
      clip_eps: clipping range eps.
      normalize: static; ``"token"`` (default), ``"sequence"`` or ``"constant"``. The statistics
        are token-level means whatever it is.

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
    loss = token_aggregate(jnp.maximum(unclipped, clipped), mask, normalize=normalize)
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
# Direct preference optimisation and group baselines (DPO, IPO, GRPO, RLOO)


def dpo_loss(
    policy_chosen: Float[Array, " B"],
    policy_rejected: Float[Array, " B"],
    ref_chosen: Float[Array, " B"],
    ref_rejected: Float[Array, " B"],
    *,
    beta: Scalar = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: Scalar = 0.0,
    mask: Shaped[Array, " B"] | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """DPO and its IPO and hinge variants, on sequence log-probabilities (``sequence_logprobs``).

    With the implicit rewards ``r_w = beta (log pi(y_w) - log pi_ref(y_w))``, ``r_l`` likewise,
    and the margin ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``:

    - ``"sigmoid"`` (Rafailov et al. 2023, eq. 7), with label smoothing eps (the conservative
      DPO of Mitchell 2023: each label is wrong with probability eps):
      ``L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``;
    - ``"ipo"`` (Azar et al. 2023, eq. 17): ``L = (h - 1 / (2 beta))^2``, usually on
      length-averaged log-probs;
    - ``"hinge"`` (SLiC, Zhao et al. 2023): ``L = max(0, 1 - beta h)``.

    The batch loss is the mean over pairs (over the pairs ``mask`` keeps). At pi = pi_ref (h = 0)
    the sigmoid loss is log 2 and ``dL/dh = -beta (1 - 2 eps) / 2`` per pair. The reference
    log-probs are data: pass constants.

    Args:
      policy_chosen, policy_rejected: [B] log pi(y_w | x), log pi(y_l | x) (differentiated).
      ref_chosen, ref_rejected: [B] the same under the frozen reference (the SFT model).
      beta: the KL strength (0.1 in Rafailov et al.); may be traced.
      loss_type: static; ``"sigmoid"``, ``"ipo"`` or ``"hinge"``.
      label_smoothing: eps in [0, 0.5), sigmoid loss only (0: plain DPO).
      mask: optional [B] bool or 0/1, the pairs that count (e.g. the valid, untied pairs of a
        K-wise comparison laid out as a K x K grid); the others (even NaN) reach nothing.

    Returns:
      ``(loss, stats)``: scalar float32 loss, 0 when no pair counts; ``stats`` (stop-gradiented
      means over the pairs) has ``reward_chosen``, ``reward_rejected``, ``margin`` (``r_w -
      r_l``) and ``accuracy`` (the fraction of pairs with ``r_w > r_l``; ties count as wrong).
    """
    kind = _choice(loss_type, ("sigmoid", "ipo", "hinge"), "loss_type")
    keep = jnp.ones(policy_chosen.shape, bool) if mask is None else mask != 0
    chosen = jnp.where(keep, _upcast(policy_chosen) - _upcast(ref_chosen), 0.0)
    rejected = jnp.where(keep, _upcast(policy_rejected) - _upcast(ref_rejected), 0.0)
    h = chosen - rejected
    if kind == "sigmoid":
        per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
        per_pair = per_pair - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    elif kind == "ipo":
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        per_pair = jax.nn.relu(1.0 - beta * h)
    r_w, r_l = beta * chosen, beta * rejected
    stats = {
        "reward_chosen": masked_mean(r_w, keep),
        "reward_rejected": masked_mean(r_l, keep),
        "margin": masked_mean(r_w - r_l, keep),
        "accuracy": masked_mean((r_w > r_l).astype(r_w.dtype), keep),
    }
    return masked_mean(per_pair, keep), jax.lax.stop_gradient(stats)


def group_advantages(
    rewards: Float[Array, "B K"], *, scale: bool = True, eps: Scalar = 1e-4
) -> Float[Array, "B K"]:
    """GRPO's group-relative advantage of each of K responses to one prompt (Shao et al. 2024,
    section 4.1.2, outcome supervision): ``A_i = (r_i - mean_k r) / (std_k r + eps)``.

    ``std`` is the sample standard deviation (ddof 1, as the GRPO implementations compute it).
    ``scale=False`` leaves ``r_i - mean_k r``: Dr. GRPO (Liu et al. 2025) shows that dividing by
    the group's std up-weights prompts whose answers are all nearly alike (too easy or too hard).
    Every group's advantages sum to 0. Repeat ``A_i`` over the response's tokens for the loss.

    Args:
      rewards: [B, K] scalar rewards, row b the K >= 2 responses to prompt b.
      scale: static; divide by the group std.
      eps: added to the std (a group of equal rewards gets advantages 0, not NaN).

    Returns:
      [B, K] float32 advantages.
    """
    r = _upcast(rewards)
    # Centre around the first member first: a group of equal rewards then gives exactly 0 (the
    # float32 mean of five 4.6587973 is one ulp off, and dividing by a std of ~1e-7 + eps made
    # that -0.005).
    shifted = r - r[..., :1]
    centered = shifted - jnp.mean(shifted, axis=-1, keepdims=True)
    if not scale:
        return centered
    var = jnp.sum(centered**2, axis=-1, keepdims=True) / (r.shape[-1] - 1)
    # sqrt has an infinite slope at 0 (a group of equal rewards): keep the gradient finite.
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
    return centered / (std + eps)


def rloo_advantages(rewards: Float[Array, "B K"]) -> Float[Array, "B K"]:
    """REINFORCE leave-one-out: each response's baseline is the mean reward of the *other* K - 1
    responses to its prompt (Kool et al. 2019; Ahmadian et al. 2024, eq. 5):

    ``A_i = r_i - 1/(K-1) sum_{j != i} r_j = K/(K-1) (r_i - mean_k r)``.

    The baseline does not depend on ``r_i``, so the estimate stays unbiased; the advantages of a
    group sum to 0.

    Args:
      rewards: [B, K] scalar rewards, K >= 2 responses per prompt.

    Returns:
      [B, K] float32 advantages.
    """
    r = _upcast(rewards)
    k = r.shape[-1]
    others = (jnp.sum(r, axis=-1, keepdims=True) - r) / (k - 1)
    return r - others


# ---------------------------------------------------------------------------------------------
# KL and entropy diagnostics


class KLEstimates(NamedTuple):
    """Per-element estimators of KL(pi || pi_ref) from samples of pi (Schulman's KL note)."""

    k1: Array  # -log r: unbiased, can be negative; the one in the reward
    k2: Array  # (log r)^2 / 2: biased, low variance; LHP's approxkl
    k3: Array  # (r - 1) - log r: unbiased and never negative


def kl_estimates(
    logprobs: Float[Array, "*shape"],
    ref_logprobs: Float[Array, "*shape"],
    mask: Shaped[Array, "*shape"] | None = None,
) -> KLEstimates:
    """k1, k2, k3 estimators of KL(pi || pi_ref) per sampled token (docs/method.md section 6;
    J. Schulman, "Approximating KL divergence", 2020).

    With ``log r = ref_logprobs - logprobs`` (samples drawn from pi):
    ``k1 = -log r``, ``k2 = (log r)^2 / 2``, ``k3 = (r - 1) - log r``.

    Args:
      logprobs: log pi(y) of sampled tokens, any shape.
      ref_logprobs: log pi_ref(y) of the same tokens, same shape.
      mask: optional, same shape; where it is 0 every estimate is 0 and the inputs (even NaN or
        inf) reach neither the result nor its gradient.

    Returns:
      ``KLEstimates(k1, k2, k3)``, each the input shape, float32. Reduce with ``masked_mean``, or
      use ``kl_penalty`` for a KL loss term.
    """
    log_r = _upcast(ref_logprobs) - _upcast(logprobs)
    if mask is not None:
        log_r = jnp.where(mask != 0, log_r, 0.0)  # every estimator is exactly 0 at log r = 0
    # expm1 keeps k3 accurate near r = 1, where it is O(log_r^2).
    return KLEstimates(k1=-log_r, k2=0.5 * log_r**2, k3=jnp.expm1(log_r) - log_r)


def kl_penalty(
    logprobs: Float[Array, "B R"],
    ref_logprobs: Float[Array, "B R"],
    mask: Shaped[Array, "B R"],
    *,
    estimator: str = "k3",
    normalize: str = "token",
) -> Float[Array, ""]:
    """A KL(pi || pi_ref) estimate as a loss term, differentiable in ``logprobs``.

    ``L_KL = token_aggregate(k(log pi_ref - log pi), mask)`` with ``k`` one of ``kl_estimates``'.
    GRPO (Shao et al. 2024, eq. 4) adds ``beta * L_KL`` with k3 instead of putting the KL in the
    reward as PPO does; its gradient in ``log pi`` is ``1 - pi_ref / pi`` per token. The tokens
    must come from pi (or pi_old, close to it) for the estimate to mean KL(pi || pi_ref).

    Args:
      logprobs: [B, R] log pi_theta of the sampled tokens (differentiated).
      ref_logprobs: [B, R] log pi_ref of the same tokens (pass constants).
      mask: [B, R] valid tokens.
      estimator: static; ``"k1"``, ``"k2"`` or ``"k3"``.
      normalize: static; as in ``token_aggregate``.

    Returns:
      Scalar float32, in nats per token (``"token"``, ``"sequence"``) or per R slots
      (``"constant"``).
    """
    per_token = getattr(
        kl_estimates(logprobs, ref_logprobs, mask),
        _choice(estimator, ("k1", "k2", "k3"), "estimator"),
    )
    return token_aggregate(per_token, mask, normalize=normalize)


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
    return masked_mean(token_entropy(logits), mask)


def token_entropy(logits: Float[Array, "B T V"]) -> Float[Array, "B T"]:
    """The entropy ``-sum_v pi(v) log pi(v)`` of each position's distribution (apply any
    temperature first), in nats, float32."""
    logp = _log_softmax(logits)
    p = jnp.exp(logp)
    return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)


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
