"""Tests for rlhf_jax.losses: float64 NumPy references, hand-worked cases, gradients, jit/vmap.

Reference numbers come from two places, said at each use:
- ``np_*`` functions below: independent float64 re-implementations with plain Python loops, written
  from the formulas in docs/method.md (not from the JAX code);
- hand calculations, derived in a comment next to the numbers.
Tolerances: float32 JAX against float64 NumPy agrees to ~1e-6 relative on these small inputs; we
assert RTOL = ATOL = 1e-5 (2e-4 for whitening, which divides by a std).
"""

import functools
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jaxtyping import TypeCheckError

from rlhf_jax import losses as L

RTOL = ATOL = 1e-5
SEEDS = (0, 1, 2)
# (B, T, V, K): T doubles as R for response-level functions; two shapes keep compile time low.
SHAPES = ((4, 7, 11, 4), (2, 5, 6, 3))


# Jitted once per function so that the many small calls below compile one program per shape
# instead of one per primitive; the eager path is checked against these in test_jit_and_vmap_*.
J = SimpleNamespace(**{name: jax.jit(getattr(L, name)) for name in L.__all__ if name[0].islower()})
J.masked_mean = jax.jit(L.masked_mean, static_argnames="axis")
J.masked_whiten = jax.jit(L.masked_whiten, static_argnames="shift_mean")
J.ppo_policy_loss = jax.jit(L.ppo_policy_loss, static_argnames="normalize")
J.token_aggregate = jax.jit(L.token_aggregate, static_argnames="normalize")
J.sequence_logprobs = jax.jit(L.sequence_logprobs, static_argnames="average")
J.dpo_loss = jax.jit(L.dpo_loss, static_argnames="loss_type")
J.group_advantages = jax.jit(L.group_advantages, static_argnames="scale")
J.kl_penalty = jax.jit(L.kl_penalty, static_argnames=("estimator", "normalize"))


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# float64 NumPy references (plain loops)


def np_log_softmax(row):
    row = np.asarray(row, np.float64)
    m = row.max()
    return row - m - math.log(sum(math.exp(v - m) for v in row))


def np_token_logprobs(logits, tokens, temperature=1.0):
    b_, t_, _ = logits.shape
    out = np.zeros((b_, t_))
    for b in range(b_):
        for t in range(t_):
            out[b, t] = np_log_softmax(logits[b, t] / temperature)[tokens[b, t]]
    return out


def np_masked_mean(x, w):
    num = den = 0.0
    for xi, wi in zip(np.ravel(x), np.ravel(w), strict=True):
        if wi:
            num += float(wi) * float(xi)
            den += float(wi)
    return num / den if den else 0.0


def np_masked_whiten(x, w, shift_mean=True):
    mean = np_masked_mean(x, w)
    var = np_masked_mean((np.asarray(x, np.float64) - mean) ** 2, w)
    out = np.zeros(np.shape(x))
    for i in np.ndindex(np.shape(x)):
        if w[i]:
            out[i] = (x[i] - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    return out


def np_sft_loss(logits, tokens, w):
    num = den = 0.0
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            if w[b, t]:
                num -= float(w[b, t]) * np_log_softmax(logits[b, t - 1])[tokens[b, t]]
                den += float(w[b, t])
    return num / den if den else 0.0


def np_ranking_loss(rewards, ranks, valid):
    per_prompt, correct, total = [], 0, 0
    for b in range(rewards.shape[0]):
        terms = []
        for i in range(rewards.shape[1]):
            for j in range(rewards.shape[1]):
                if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]:
                    d = float(rewards[b, i]) - float(rewards[b, j])
                    terms.append(math.log1p(math.exp(-d)))  # -log sigmoid(d)
                    correct += d > 0
                    total += 1
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    loss = sum(per_prompt) / len(per_prompt) if per_prompt else 0.0
    return loss, (correct / total if total else 0.0)


def np_kl_penalized_rewards(score, logp, ref, mask, kl_coef):
    rewards, kl = np.zeros(logp.shape), np.zeros(logp.shape)
    for b in range(logp.shape[0]):
        last = None
        for t in range(logp.shape[1]):
            if mask[b, t]:
                kl[b, t] = float(logp[b, t]) - float(ref[b, t])
                rewards[b, t] = -kl_coef * kl[b, t]
                last = t
        if last is not None:
            rewards[b, last] += score[b]
    return rewards, kl


def np_gae(rewards, values, mask, gamma, lam):
    """Brute-force double loop over each row's valid positions (docs/method.md check 7)."""
    adv, ret = np.zeros(rewards.shape), np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        deltas = []
        for k, t in enumerate(idx):
            v_next = float(values[b, idx[k + 1]]) if k + 1 < len(idx) else 0.0
            deltas.append(float(rewards[b, t]) + gamma * v_next - float(values[b, t]))
        for k, t in enumerate(idx):
            adv[b, t] = sum((gamma * lam) ** j * deltas[k + j] for j in range(len(idx) - k))
            ret[b, t] = adv[b, t] + float(values[b, t])
    return adv, ret


def np_ppo_policy_loss(logp, old, adv, w, clip_eps):
    losses, clipped_flags, sq, ratios, valid_ratios = [], [], [], [], []
    for i in np.ndindex(logp.shape):
        ratio = math.exp(float(logp[i]) - float(old[i]))
        a = float(adv[i])
        l1, l2 = -a * ratio, -a * min(max(ratio, 1 - clip_eps), 1 + clip_eps)
        losses.append(max(l1, l2))
        clipped_flags.append(float(l2 > l1))
        sq.append((float(logp[i]) - float(old[i])) ** 2)
        ratios.append(ratio)
        if w[i]:
            valid_ratios.append(ratio)
    ww = np.ravel(w)
    stats = {
        "clipfrac": np_masked_mean(clipped_flags, ww),
        "approxkl": 0.5 * np_masked_mean(sq, ww),
        "ratio_mean": np_masked_mean(ratios, ww),
        "ratio_max": max(valid_ratios) if valid_ratios else 0.0,
    }
    return np_masked_mean(losses, ww), stats


def np_value_loss(v, v_old, ret, w, clip_eps):
    losses, flags, errs = [], [], []
    for i in np.ndindex(v.shape):
        v_clip = float(v_old[i]) + min(max(float(v[i]) - float(v_old[i]), -clip_eps), clip_eps)
        e1, e2 = (float(v[i]) - float(ret[i])) ** 2, (v_clip - float(ret[i])) ** 2
        losses.append(max(e1, e2))
        flags.append(float(e2 > e1))
        errs.append(e1)
    ww = np.ravel(w)
    stats = {
        "clipfrac": np_masked_mean(flags, ww),
        "vpred": np_masked_mean(np.ravel(v), ww),
        "error": np_masked_mean(errs, ww),
    }
    return 0.5 * np_masked_mean(losses, ww), stats


def np_full_kl(logits, ref_logits, mask):
    out = np.zeros(mask.shape)
    for b, t in np.ndindex(mask.shape):
        if mask[b, t]:
            lp, lq = np_log_softmax(logits[b, t]), np_log_softmax(ref_logits[b, t])
            out[b, t] = sum(math.exp(lp[v]) * (lp[v] - lq[v]) for v in range(len(lp)))
    return out


def np_entropy(logits, w):
    per_token = np.zeros(w.shape)
    for b, t in np.ndindex(w.shape):
        lp = np_log_softmax(logits[b, t])
        per_token[b, t] = -sum(math.exp(x) * x for x in lp)
    return np_masked_mean(per_token, w)


# ---------------------------------------------------------------------------------------------
# Random inputs (float32 in NumPy; both the JAX call and the reference read the same values)


def random_mask(rng, b, t):
    """Bernoulli mask with row 0 entirely masked and row 1 with at least one valid entry."""
    m = rng.random((b, t)) < 0.7
    m[0] = False
    m[1, rng.integers(t)] = True
    return m


def prefix_mask(rng, b, t):
    """Valid tokens then padding (the rollout layout); row 0 empty, last row full."""
    lengths = rng.integers(0, t + 1, b)
    lengths[0], lengths[-1] = 0, t
    return np.arange(t)[None, :] < lengths[:, None]


def normal(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def logprobs_pair(rng, b, t):
    logp = np.log(rng.uniform(0.05, 1.0, (b, t))).astype(np.float32)
    return logp, (logp + normal(rng, b, t, scale=0.3)).astype(np.float32)


cases = pytest.mark.parametrize(
    "seed,shape", [(s, sh) for s in SEEDS for sh in SHAPES], ids=lambda v: str(v)
)


# ---------------------------------------------------------------------------------------------
# Against the references


@cases
def test_token_logprobs_matches_reference(seed, shape):
    b, t, v, _ = shape
    rng = np.random.default_rng(seed)
    logits, tokens = normal(rng, b, t, v, scale=3.0), rng.integers(0, v, (b, t))
    close(
        J.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)),
        np_token_logprobs(logits, tokens),
    )
    got = J.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), temperature=0.7)
    close(got, np_token_logprobs(logits, tokens, 0.7))
    # bfloat16 logits are upcast: float32 out, equal to the reference on the bf16 values.
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    got = J.token_logprobs(bf16, jnp.asarray(tokens))
    assert got.dtype == jnp.float32
    close(got, np_token_logprobs(np.asarray(bf16, np.float64), tokens))


@cases
def test_masked_mean_and_whiten_match_reference(seed, shape):
    b, t, _, _ = shape
    rng = np.random.default_rng(seed)
    x, m = normal(rng, b, t, scale=2.0) + 1.0, random_mask(rng, b, t)
    w = (m * rng.uniform(0.1, 1.0, (b, t))).astype(np.float32)
    for mask in (m, m.astype(np.float32), w):
        close(J.masked_mean(jnp.asarray(x), jnp.asarray(mask)), np_masked_mean(x, mask))
        per_row = [np_masked_mean(x[i], mask[i]) for i in range(b)]
        close(J.masked_mean(jnp.asarray(x), jnp.asarray(mask), axis=1), per_row)
    for shift_mean in (True, False):
        got = J.masked_whiten(jnp.asarray(x), jnp.asarray(m), shift_mean=shift_mean)
        close(got, np_masked_whiten(x, m, shift_mean), rtol=2e-4, atol=2e-4)
    # docs/method.md check 8: after whitening, mean ~ 0 and std ~ 1 over valid entries.
    white = J.masked_whiten(jnp.asarray(x), jnp.asarray(m))
    close(J.masked_mean(white, jnp.asarray(m)), 0.0)
    close(J.masked_mean(white**2, jnp.asarray(m)), 1.0, rtol=1e-4)


@cases
def test_sft_and_ptx_loss_match_reference(seed, shape):
    b, t, v, _ = shape
    rng = np.random.default_rng(seed)
    logits, tokens = normal(rng, b, t, v, scale=2.0), rng.integers(0, v, (b, t))
    m = random_mask(rng, b, t)
    # Fractional weights: prompt tokens at prompt_loss_weight = 0.1, response tokens at 1.
    w = np.where(np.arange(t)[None, :] < t // 2, 0.1, 1.0).astype(np.float32) * m
    for mask in (m, w):
        expected = np_sft_loss(logits, tokens, mask)
        args = (jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
        close(J.sft_loss(*args), expected)
        close(J.ptx_loss(*args), expected)
    # Token ids at masked positions (even out of range) do not matter.
    junk = np.where(m, tokens, -100)
    close(
        J.sft_loss(jnp.asarray(logits), jnp.asarray(junk), jnp.asarray(m)),
        np_sft_loss(logits, tokens, m),
    )


@cases
def test_ranking_loss_matches_reference(seed, shape):
    b, _, _, k = shape
    rng = np.random.default_rng(seed)
    rewards, ranks = normal(rng, b, k, scale=2.0), rng.integers(0, k, (b, k))
    valid = rng.random((b, k)) < 0.8
    valid[0] = False
    valid[0, 0] = True  # one valid completion: no pair
    ranks[1] = 0  # all ties: no pair
    garbage = np.where(valid, rewards, np.nan).astype(np.float32)  # invalid rewards never read
    loss, acc = J.ranking_loss(jnp.asarray(garbage), jnp.asarray(ranks), valid=jnp.asarray(valid))
    exp_loss, exp_acc = np_ranking_loss(rewards, ranks, valid)
    close(loss, exp_loss)
    close(acc, exp_acc)
    loss, acc = J.ranking_loss(jnp.asarray(rewards), jnp.asarray(ranks))
    exp_loss, exp_acc = np_ranking_loss(rewards, ranks, np.ones((b, k), bool))
    close(loss, exp_loss)
    close(acc, exp_acc)


@cases
def test_pairwise_loss_matches_reference(seed, shape):
    b = shape[0]
    rng = np.random.default_rng(seed)
    c, r = normal(rng, b, scale=3.0), normal(rng, b, scale=3.0)
    expected = (
        sum(math.log1p(math.exp(-(float(x) - float(y)))) for x, y in zip(c, r, strict=True)) / b
    )
    close(J.pairwise_loss(jnp.asarray(c), jnp.asarray(r)), expected)


@cases
def test_kl_penalized_rewards_matches_reference(seed, shape):
    b, t, _, _ = shape
    rng = np.random.default_rng(seed)
    score, (logp, ref) = normal(rng, b), logprobs_pair(rng, b, t)
    for m in (prefix_mask(rng, b, t), random_mask(rng, b, t)):
        got = J.kl_penalized_rewards(*map(jnp.asarray, (score, logp, ref, m)), kl_coef=0.05)
        for g, e in zip(got, np_kl_penalized_rewards(score, logp, ref, m, 0.05), strict=True):
            close(g, e)


@cases
def test_gae_matches_reference(seed, shape):
    b, t, _, _ = shape
    rng = np.random.default_rng(seed)
    rewards, values = normal(rng, b, t), normal(rng, b, t)
    for m in (prefix_mask(rng, b, t), random_mask(rng, b, t)):
        for gamma, lam in ((1.0, 0.95), (0.9, 0.8)):
            got = J.gae(*map(jnp.asarray, (rewards, values, m)), gamma=gamma, lam=lam)
            for g, e in zip(got, np_gae(rewards, values, m, gamma, lam), strict=True):
                close(g, e)


@cases
def test_ppo_policy_loss_matches_reference(seed, shape):
    b, t, _, _ = shape
    rng = np.random.default_rng(seed)
    old, adv = np.log(rng.uniform(0.05, 1.0, (b, t))).astype(np.float32), normal(rng, b, t)
    logp = (old + normal(rng, b, t, scale=0.3)).astype(np.float32)  # ratios well outside 1 +- 0.2
    m = random_mask(rng, b, t)
    for mask in (m, (m * 0.5).astype(np.float32)):
        loss, stats = J.ppo_policy_loss(*map(jnp.asarray, (logp, old, adv, mask)), clip_eps=0.2)
        exp_loss, exp_stats = np_ppo_policy_loss(logp, old, adv, mask, 0.2)
        close(loss, exp_loss)
        assert set(stats) == set(exp_stats)
        for key in exp_stats:
            close(stats[key], exp_stats[key])


@cases
def test_value_loss_matches_reference(seed, shape):
    b, t, _, _ = shape
    rng = np.random.default_rng(seed)
    v_old, ret = normal(rng, b, t), normal(rng, b, t)
    v = (v_old + normal(rng, b, t, scale=0.3)).astype(np.float32)
    m = random_mask(rng, b, t)
    loss, stats = J.value_loss(*map(jnp.asarray, (v, v_old, ret, m)), clip_eps=0.2)
    exp_loss, exp_stats = np_value_loss(v, v_old, ret, m, 0.2)
    close(loss, exp_loss)
    assert set(stats) == set(exp_stats)
    for key in exp_stats:
        close(stats[key], exp_stats[key])


@cases
def test_kl_estimates_full_kl_entropy_match_reference(seed, shape):
    b, t, v, _ = shape
    rng = np.random.default_rng(seed)
    logp, ref = logprobs_pair(rng, b, t)
    est = J.kl_estimates(jnp.asarray(logp), jnp.asarray(ref))
    for i in np.ndindex(logp.shape):
        log_r = float(ref[i]) - float(logp[i])
        close(est.k1[i], -log_r)
        close(est.k2[i], 0.5 * log_r**2)
        close(est.k3[i], math.exp(log_r) - 1.0 - log_r)
    logits, ref_logits, m = normal(rng, b, t, v), normal(rng, b, t, v), random_mask(rng, b, t)
    close(J.full_kl(*map(jnp.asarray, (logits, ref_logits, m))), np_full_kl(logits, ref_logits, m))
    close(J.entropy(jnp.asarray(logits), jnp.asarray(m)), np_entropy(logits, m))


def test_adaptive_kl_coef_matches_reference():
    for beta, kl, n, target, horizon in ((0.1, 9.0, 512, 6.0, 10_000), (0.15, 5.9, 64, 6.0, 1e4)):
        error = min(max(kl / target - 1.0, -0.2), 0.2)
        expected = beta * (1.0 + error * n / horizon)
        close(J.adaptive_kl_coef(beta, kl, n, target=target, horizon=horizon), expected)


# ---------------------------------------------------------------------------------------------
# Hand-worked cases


def test_gae_three_tokens_by_hand():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma = 1, lam = 0.5, V after the last token = 0:
    #   delta_2 = 1 + 0 - 0.7 = 0.3;  delta_1 = 0 + 0.7 - 0.6 = 0.1;  delta_0 = 0 + 0.6 - 0.5 = 0.1
    #   A_2 = 0.3;  A_1 = 0.1 + 0.5 * 0.3 = 0.25;  A_0 = 0.1 + 0.5 * 0.25 = 0.225
    #   returns = A + V = [0.725, 0.85, 1.0]; the padded 4th position (garbage in it) gets 0 and 0.
    rewards = jnp.array([[0.0, 0.0, 1.0, 5.0]])
    values = jnp.array([[0.5, 0.6, 0.7, jnp.nan]])
    mask = jnp.array([[True, True, True, False]])
    adv, ret = J.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.225, 0.25, 0.3, 0.0]])
    close(ret, [[0.725, 0.85, 1.0, 0.0]])


def test_ranking_k2_equals_pairwise_loss():
    # With K = 2 and ranks (0, 1) there is one pair per prompt, so eq. 1 is the pairwise loss.
    # Row 0 by hand: -log sigmoid(1 - 0) = log(1 + e^-1) = 0.3132616875.
    rewards = jnp.array([[1.0, 0.0], [-0.3, 2.0], [0.7, 0.7]])
    ranks = jnp.array([[0, 1], [0, 1], [0, 1]])
    loss, acc = J.ranking_loss(rewards, ranks)
    close(loss, J.pairwise_loss(rewards[:, 0], rewards[:, 1]))
    close(J.pairwise_loss(rewards[:1, 0], rewards[:1, 1]), 0.3132616875)
    close(acc, 1.0 / 3.0)  # only row 0 has r_w > r_l strictly (row 2 is equal)


def test_ranking_ties_dropped_by_hand():
    # Ranks (0, 1, 1), rewards (1, 0, 2): pairs (0 > 1) with d = 1 and (0 > 2) with d = -1; the tie
    # (1, 2) is dropped. loss = (log(1 + e^-1) + log(1 + e^1)) / 2 = (0.3132617 + 1.3132617) / 2
    # = 0.8132617; accuracy = 1/2. A prompt with only ties and one with a single valid completion
    # add no pair, so they change nothing.
    rewards = jnp.array([[1.0, 0.0, 2.0], [3.0, -1.0, 0.5], [1.0, 9.0, 9.0]])
    ranks = jnp.array([[0, 1, 1], [2, 2, 2], [0, 1, 2]])
    valid = jnp.array([[True, True, True], [True, True, True], [True, False, False]])
    loss, acc = J.ranking_loss(rewards, ranks, valid=valid)
    close(loss, 0.8132616875)
    close(acc, 0.5)
    loss1, acc1 = J.ranking_loss(rewards[:1], ranks[:1])
    close(loss1, loss)
    close(acc1, acc)
    # No pair anywhere: 0, not NaN, and a zero gradient.
    no_pairs = lambda r: J.ranking_loss(r, ranks[1:2])[0]  # noqa: E731
    assert float(no_pairs(rewards[1:2])) == 0.0
    assert np.all(np.asarray(jax.grad(no_pairs)(rewards[1:2])) == 0.0)


def test_ranked_pairs_by_hand():
    # Ranks (0, 2, 1, 1), the last completion padding: 0 beats 1 and 2, 2 beats 1; the tie
    # between 2 and 3 and every pair with 3 are dropped.
    pairs = J.ranked_pairs(jnp.array([[0, 2, 1, 1]]), jnp.array([[1, 1, 1, 0]]))
    assert {tuple(x) for x in np.argwhere(np.asarray(pairs[0]))} == {(0, 1), (0, 2), (2, 1)}


def test_policy_loss_ratio_one():
    # logp == old gives rho = 1, so both surrogate terms are -A: loss = -masked_mean(A), nothing is
    # clipped, approxkl = 0 and the ratio stats are 1 (docs/method.md check 1). Here masked mean
    # of A over valid entries (1, 2, -0.5) = 2.5 / 3.
    logp = jnp.log(jnp.array([[0.2, 0.5, 0.9], [0.3, 0.3, 0.3]]))
    adv = jnp.array([[1.0, 2.0, 7.0], [-0.5, 4.0, 4.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, stats = J.ppo_policy_loss(logp, logp, adv, mask)
    close(loss, -2.5 / 3.0)
    close(stats["clipfrac"], 0.0)
    close(stats["approxkl"], 0.0)
    close(stats["ratio_mean"], 1.0)
    close(stats["ratio_max"], 1.0)


def test_kl_to_itself_is_zero():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(normal(rng, 2, 3, 5, scale=4.0))
    close(J.full_kl(logits, logits, jnp.ones((2, 3), bool)), np.zeros((2, 3)))
    logp = jax.nn.log_softmax(logits)[..., 0]
    for k in J.kl_estimates(logp, logp):
        close(k, np.zeros((2, 3)))
    # docs/method.md check 2: policy == reference gives zero non-score reward; only the score
    # remains.
    rewards, kl = J.kl_penalized_rewards(
        jnp.array([1.5, -2.0]), logp, logp, jnp.ones((2, 3)), kl_coef=0.02
    )
    close(kl, np.zeros((2, 3)))
    close(rewards, [[0.0, 0.0, 1.5], [0.0, 0.0, -2.0]])


def test_other_hand_values():
    # Uniform logits over V = 4: every token has log-prob -log 4, so the NLL and the entropy are
    # both log 4 = 1.3862944.
    logits = jnp.zeros((2, 3, 4))
    tokens = jnp.array([[0, 1, 2], [3, 0, 1]])
    close(J.sft_loss(logits, tokens, jnp.ones((2, 3))), math.log(4))
    close(J.entropy(logits, jnp.ones((2, 3))), math.log(4))
    # KL-penalised rewards, beta = 0.5: k1 = 0 - 0.1 = -0.1 per valid token, so each gets +0.05 and
    # the last valid token (index 1) adds the score 2: [0.05, 2.05, 0].
    rewards, kl = J.kl_penalized_rewards(
        jnp.array([2.0]),
        jnp.zeros((1, 3)),
        jnp.full((1, 3), 0.1),
        jnp.array([[1, 1, 0]]),
        kl_coef=0.5,
    )
    close(rewards, [[0.05, 2.05, 0.0]])
    close(kl, [[-0.1, -0.1, 0.0]])
    # Ziegler controller: KL 9 vs target 6 -> 9/6 - 1 = 0.5, clipped to 0.2; with 512 of 10,000
    # episodes beta = 0.1 * (1 + 0.2 * 0.0512) = 0.101024. Below target, 3/6 - 1 = -0.5 -> -0.2:
    # 0.1 * (1 - 0.01024) = 0.098976.
    close(J.adaptive_kl_coef(0.1, 9.0, 512, target=6.0, horizon=10_000), 0.101024)
    close(J.adaptive_kl_coef(0.1, 3.0, 512, target=6.0, horizon=10_000), 0.098976)
    # Value loss: V = 1.5, V_old = 1, R = 0, eps = 0.2: V_clip = 1.2; errors 2.25 and 1.44, the
    # max is 2.25 (unclipped), so loss = 0.5 * 2.25 = 1.125 and clipfrac = 0.
    loss, stats = J.value_loss(
        jnp.array([[1.5]]), jnp.array([[1.0]]), jnp.array([[0.0]]), jnp.ones((1, 1))
    )
    close(loss, 1.125)
    close(stats["clipfrac"], 0.0)
    close(stats["error"], 2.25)


def test_masking_equals_slicing():
    # A prefix mask of n columns gives the same numbers as slicing to n columns with a full mask,
    # whatever sits in the masked columns.
    rng = np.random.default_rng(3)
    b, t, v, n = 3, 6, 5, 4
    logits, tokens = jnp.asarray(normal(rng, b, t, v)), jnp.asarray(rng.integers(0, v, (b, t)))
    logp, old = map(jnp.asarray, logprobs_pair(rng, b, t))
    adv, vals, rew = (jnp.asarray(normal(rng, b, t)) for _ in range(3))
    score = jnp.asarray(normal(rng, b))
    cut = jnp.asarray(np.arange(t)[None, :] < n).repeat(b, 0)
    full = jnp.ones((b, n), bool)
    s = np.s_[:, :n]

    def same(masked, sliced):
        for x, y in zip(jax.tree.leaves(masked), jax.tree.leaves(sliced), strict=True):
            close(x, y)

    same(J.sft_loss(logits, tokens, cut), J.sft_loss(logits[s], tokens[s], full))
    same(J.ppo_policy_loss(logp, old, adv, cut), J.ppo_policy_loss(logp[s], old[s], adv[s], full))
    same(J.value_loss(vals, old, rew, cut), J.value_loss(vals[s], old[s], rew[s], full))
    same(J.entropy(logits, cut), J.entropy(logits[s], full))
    same(J.full_kl(logits, logits[::-1], cut)[s], J.full_kl(logits[s], logits[::-1][s], full))
    same(J.masked_mean(rew, cut), J.masked_mean(rew[s], full))
    same(J.masked_whiten(rew, cut)[s], J.masked_whiten(rew[s], full))
    same(J.gae(rew, vals, cut)[0][s], J.gae(rew[s], vals[s], full)[0])
    same(J.gae(rew, vals, cut)[1][s], J.gae(rew[s], vals[s], full)[1])
    kp_masked = J.kl_penalized_rewards(score, logp, old, cut, kl_coef=0.1)
    kp_sliced = J.kl_penalized_rewards(score, logp[s], old[s], full, kl_coef=0.1)
    same([x[s] for x in kp_masked], kp_sliced)


# ---------------------------------------------------------------------------------------------
# DPO, group baselines, loss normalisation, KL penalties: float64 references and hand cases


def np_token_aggregate(x, w, normalize):
    b_, r_ = x.shape
    if normalize == "token":
        return np_masked_mean(x, w)
    if normalize == "constant":
        return sum(float(w[i]) * float(x[i]) for i in np.ndindex(x.shape) if w[i]) / (b_ * r_)
    rows = [np_masked_mean(x[b], w[b]) for b in range(b_) if any(w[b])]
    return sum(rows) / len(rows) if rows else 0.0


def np_sequence_logprobs(logp, m, average):
    out = []
    for b in range(logp.shape[0]):
        total = sum(float(logp[b, t]) for t in range(logp.shape[1]) if m[b, t])
        n = sum(1 for t in range(logp.shape[1]) if m[b, t])
        out.append((total / n if n else 0.0) if average else total)
    return out


def np_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    losses, stats = [], {"reward_chosen": [], "reward_rejected": [], "margin": [], "accuracy": []}
    for i in range(len(pc)):
        w, lo = float(pc[i]) - float(rc[i]), float(pr[i]) - float(rr[i])
        h = w - lo
        if loss_type == "sigmoid":
            # -log sigmoid(z) = log(1 + exp(-z))
            losses.append(
                (1 - eps) * math.log1p(math.exp(-beta * h)) + eps * math.log1p(math.exp(beta * h))
            )
        elif loss_type == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(max(0.0, 1 - beta * h))
        stats["reward_chosen"].append(beta * w)
        stats["reward_rejected"].append(beta * lo)
        stats["margin"].append(beta * w - beta * lo)
        stats["accuracy"].append(float(beta * w > beta * lo))
    return sum(losses) / len(losses), {k: sum(v) / len(v) for k, v in stats.items()}


def np_group_advantages(r, scale, eps):
    out = np.zeros(r.shape)
    for b in range(r.shape[0]):
        row = [float(x) for x in r[b]]
        mean = sum(row) / len(row)
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))
        for i, x in enumerate(row):
            out[b, i] = (x - mean) / (std + eps) if scale else x - mean
    return out


def np_rloo(r):
    out = np.zeros(r.shape)
    for b, i in np.ndindex(r.shape):
        others = [float(r[b, j]) for j in range(r.shape[1]) if j != i]
        out[b, i] = float(r[b, i]) - sum(others) / len(others)
    return out


NORMALIZE = ("token", "sequence", "constant")


@cases
def test_token_aggregate_and_sequence_logprobs_match_reference(seed, shape):
    b, t, _, _ = shape
    rng = np.random.default_rng(seed)
    x, m = normal(rng, b, t), random_mask(rng, b, t)
    w = (m * rng.uniform(0.1, 1.0, (b, t))).astype(np.float32)
    for mask in (m, w):
        for how in NORMALIZE:
            got = J.token_aggregate(jnp.asarray(x), jnp.asarray(mask), normalize=how)
            close(got, np_token_aggregate(x, mask, how))
    logp, _ = logprobs_pair(rng, b, t)
    for average in (False, True):
        got = J.sequence_logprobs(jnp.asarray(logp), jnp.asarray(m), average=average)
        close(got, np_sequence_logprobs(logp, m, average))


@cases
def test_ppo_policy_loss_normalisations_match_reference(seed, shape):
    b, t, _, _ = shape
    rng = np.random.default_rng(seed)
    old, adv = np.log(rng.uniform(0.05, 1.0, (b, t))).astype(np.float32), normal(rng, b, t)
    logp = (old + normal(rng, b, t, scale=0.3)).astype(np.float32)
    m = random_mask(rng, b, t)
    per_token = np.zeros((b, t))
    for i in np.ndindex(per_token.shape):
        ratio = math.exp(float(logp[i]) - float(old[i]))
        a = float(adv[i])
        per_token[i] = max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
    for how in NORMALIZE:
        loss, _ = J.ppo_policy_loss(*map(jnp.asarray, (logp, old, adv, m)), normalize=how)
        close(loss, np_token_aggregate(per_token, m, how))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("seed", SEEDS)
def test_dpo_loss_matches_reference(seed, loss_type):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (normal(rng, 6, scale=3.0) - 20.0 for _ in range(4))
    for beta, eps in ((0.1, 0.0), (0.5, 0.2)):
        eps = eps if loss_type == "sigmoid" else 0.0
        loss, stats = J.dpo_loss(
            *map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, loss_type=loss_type, label_smoothing=eps
        )
        exp_loss, exp_stats = np_dpo(pc, pr, rc, rr, beta, loss_type, eps)
        close(loss, exp_loss)
        assert set(stats) == set(exp_stats)
        for key in exp_stats:
            close(stats[key], exp_stats[key])
    # A pair mask equals dropping the pairs (NaN in a dropped pair reaches nothing).
    keep = np.array([1, 0, 1, 1, 0, 1], bool)
    nan_pc = np.where(keep, pc, np.nan).astype(np.float32)
    loss, stats = J.dpo_loss(
        *map(jnp.asarray, (nan_pc, pr, rc, rr)), loss_type=loss_type, mask=jnp.asarray(keep)
    )
    exp_loss, exp_stats = np_dpo(pc[keep], pr[keep], rc[keep], rr[keep], 0.1, loss_type, 0.0)
    close(loss, exp_loss)
    for key in exp_stats:
        close(stats[key], exp_stats[key])


@pytest.mark.parametrize("seed", SEEDS)
def test_group_and_leave_one_out_advantages_match_reference(seed):
    rng = np.random.default_rng(seed)
    r = normal(rng, 5, 4, scale=2.0)
    for scale in (True, False):
        close(J.group_advantages(jnp.asarray(r), scale=scale), np_group_advantages(r, scale, 1e-4))
    close(J.rloo_advantages(jnp.asarray(r)), np_rloo(r))


@cases
def test_kl_penalty_and_masked_estimates_match_reference(seed, shape):
    b, t, _, _ = shape
    rng = np.random.default_rng(seed)
    logp, ref = logprobs_pair(rng, b, t)
    m = random_mask(rng, b, t)
    est = J.kl_estimates(jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(m))
    per = {k: np.zeros((b, t)) for k in ("k1", "k2", "k3")}
    for i in np.ndindex(logp.shape):
        if m[i]:
            log_r = float(ref[i]) - float(logp[i])
            per["k1"][i], per["k2"][i] = -log_r, 0.5 * log_r**2
            per["k3"][i] = math.exp(log_r) - 1.0 - log_r
    for k in per:
        close(getattr(est, k), per[k])
        for how in NORMALIZE:
            got = J.kl_penalty(*map(jnp.asarray, (logp, ref, m)), estimator=k, normalize=how)
            close(got, np_token_aggregate(per[k], m, how))


def test_dpo_at_the_reference_by_hand():
    # pi = pi_ref: every margin h is 0. Sigmoid: L = -log sigmoid(0) = log 2 for any beta; with
    # eps = 0.1 still (1 - eps) log 2 + eps log 2 = log 2. dL/dh = -beta (1 - 2 eps) sigmoid(0)
    # ... per pair: d/dh [-(1-eps) log s(beta h) - eps log s(-beta h)] at 0
    #   = -(1-eps) beta / 2 + eps beta / 2 = -beta (1 - 2 eps) / 2,
    # and dh/d(policy_chosen) = 1, dh/d(policy_rejected) = -1; the batch mean divides by B = 4.
    # IPO: L = (0 - 1/(2 beta))^2 = 1/(4 beta^2); dL/dh = -1/beta. Hinge: L = 1; dL/dh = -beta.
    lp = jnp.asarray([-3.0, -7.5, -1.25, -12.0])
    beta, eps, n = 0.3, 0.1, 4
    for loss_type, eps_, loss_0, dl_dh in (
        ("sigmoid", 0.0, math.log(2), -beta / 2),
        ("sigmoid", eps, math.log(2), -beta * (1 - 2 * eps) / 2),
        ("ipo", 0.0, 1 / (4 * beta**2), -1 / beta),
        ("hinge", 0.0, 1.0, -beta),
    ):

        def f(chosen, rejected, loss_type=loss_type, eps_=eps_):
            return L.dpo_loss(
                chosen, rejected, lp, lp[::-1], beta=beta, loss_type=loss_type, label_smoothing=eps_
            )[0]

        close(f(lp, lp[::-1]), loss_0)
        g_chosen, g_rejected = jax.grad(f, argnums=(0, 1))(lp, lp[::-1])
        close(g_chosen, np.full(n, dl_dh / n))
        close(g_rejected, np.full(n, -dl_dh / n))
    _, stats = J.dpo_loss(lp, lp[::-1], lp, lp[::-1], beta=beta)
    close(stats["margin"], 0.0)
    close(stats["accuracy"], 0.0)  # equal rewards do not count as right


def test_group_baselines_by_hand():
    # RLOO, one group of rewards (1, 2, 6): each baseline is the mean of the other two,
    # (2 + 6)/2 = 4, (1 + 6)/2 = 3.5, (1 + 2)/2 = 1.5, so A = (-3, -1.5, 4.5).
    r = jnp.asarray([[1.0, 2.0, 6.0]])
    close(J.rloo_advantages(r), [[-3.0, -1.5, 4.5]])
    # The baseline excludes the sample itself: raising r_0 from 1 to 11 leaves r_0's baseline at
    # 4 (A_0 = 11 - 4 = 7) and raises the other two baselines by (11 - 1)/2 = 5.
    moved = J.rloo_advantages(r.at[0, 0].set(11.0))
    close(moved, [[7.0, -1.5 - 5.0, 4.5 - 5.0]])
    # GRPO: mean 3, sample std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7).
    close(J.group_advantages(r, scale=False), [[-2.0, -1.0, 3.0]])
    close(J.group_advantages(r, eps=0.0), np.array([[-2.0, -1.0, 3.0]]) / math.sqrt(7))
    # A group of equal rewards gets zero advantages, not NaN.
    close(J.group_advantages(jnp.full((1, 4), 2.5)), np.zeros((1, 4)))


@settings(max_examples=30, deadline=None)
@given(rewards=hnp.arrays(np.float32, (3, 5), elements=st.floats(-5, 5, width=32)))
@example(rewards=np.full((3, 5), 4.6587973, np.float32))  # equal rewards, an inexact mean
def test_group_relative_advantages_have_zero_mean_in_every_group(rewards):
    for adv in (
        J.group_advantages(rewards),
        J.group_advantages(rewards, scale=False),
        J.rloo_advantages(rewards),
    ):
        close(np.asarray(adv, np.float64).mean(axis=1), np.zeros(3), atol=1e-4)


def test_normalisations_by_hand():
    # Two responses: per-token terms (1, 1, 1, 1) over 4 valid tokens and (5) over 1.
    # token: (4 + 5) / 5 = 1.8; sequence: (1 + 5) / 2 = 3; constant: 9 / (2 rows * 4 slots) = 1.125.
    x = jnp.asarray([[1.0, 1.0, 1.0, 1.0], [5.0, 7.0, 7.0, 7.0]])
    m = jnp.asarray([[1, 1, 1, 1], [1, 0, 0, 0]])
    for how, want in (("token", 1.8), ("sequence", 3.0), ("constant", 1.125)):
        close(J.token_aggregate(x, m, normalize=how), want)
    with pytest.raises(ValueError, match="normalize='tokens'"):
        L.token_aggregate(x, m, normalize="tokens")


# ---------------------------------------------------------------------------------------------
# Gradients, jit and vmap over every function


def make_inputs(seed, mask_kind):
    """One input set for every function; NaN sits at masked positions of per-token inputs."""
    b, t, v, k = 3, 5, 6, 4
    rng = np.random.default_rng(seed)
    m = random_mask(rng, b, t) if mask_kind == "rows_empty" else np.zeros((b, t), bool)
    valid = np.ones((b, k), bool) if mask_kind == "rows_empty" else np.zeros((b, k), bool)
    valid[0] = [True, False, False, False]

    def masked(x):
        return jnp.asarray(np.where(m, x, np.nan).astype(np.float32))

    logp, ref = logprobs_pair(rng, b, t)
    groups = np.tile(normal(rng, b, 1), (1, k))  # groups of equal rewards (std 0) but row 1
    groups[1] += normal(rng, k)
    return dict(
        logits=jnp.asarray(normal(rng, b, t, v)),
        ref_logits=jnp.asarray(normal(rng, b, t, v)),
        tokens=jnp.asarray(np.where(m, rng.integers(0, v, (b, t)), -100)),
        mask=jnp.asarray(m),
        rewards_k=jnp.asarray(np.where(valid, normal(rng, b, k), np.nan).astype(np.float32)),
        ranks=jnp.asarray(rng.integers(0, k, (b, k))),
        valid=jnp.asarray(valid),
        score=jnp.asarray(normal(rng, b)),
        logp=masked(logp),
        ref=masked(ref),
        x=masked(normal(rng, b, t)),
        y=masked(normal(rng, b, t)),
        z=masked(normal(rng, b, t)),
        rewards_g=jnp.asarray(groups),
        chosen=jnp.asarray(normal(rng, b)),
        rejected=jnp.asarray(normal(rng, b)),
        beta=jnp.float32(0.1),
        kl=jnp.float32(7.0),
    )


def total(tree):
    return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))


# name -> (function of the input dict, names of the float inputs to differentiate)
FUNCTIONS = {
    "token_logprobs": (
        lambda a: L.token_logprobs(a["logits"], jnp.abs(a["tokens"]) % 6),
        ["logits"],
    ),
    "masked_mean": (lambda a: L.masked_mean(a["x"], a["mask"]), ["x"]),
    "masked_mean_axis": (lambda a: L.masked_mean(a["x"], a["mask"], axis=1), ["x"]),
    "masked_whiten": (lambda a: L.masked_whiten(a["x"], a["mask"]), ["x"]),
    "masked_whiten_noshift": (
        lambda a: L.masked_whiten(a["x"], a["mask"], shift_mean=False),
        ["x"],
    ),
    "sft_loss": (lambda a: L.sft_loss(a["logits"], a["tokens"], a["mask"]), ["logits"]),
    "ptx_loss": (lambda a: L.ptx_loss(a["logits"], a["tokens"], a["mask"]), ["logits"]),
    "ranking_loss": (
        lambda a: L.ranking_loss(a["rewards_k"], a["ranks"], valid=a["valid"]),
        ["rewards_k"],
    ),
    "pairwise_loss": (
        lambda a: L.pairwise_loss(a["chosen"], a["rejected"]),
        ["chosen", "rejected"],
    ),
    "kl_penalized_rewards": (
        lambda a: L.kl_penalized_rewards(
            a["score"], a["logp"], a["ref"], a["mask"], kl_coef=a["beta"]
        ),
        ["score", "logp", "ref", "beta"],
    ),
    "gae": (lambda a: L.gae(a["x"], a["y"], a["mask"], gamma=0.99, lam=0.95), ["x", "y"]),
    "ppo_policy_loss": (
        lambda a: L.ppo_policy_loss(a["logp"], a["ref"], a["x"], a["mask"]),
        ["logp", "ref", "x"],
    ),
    "value_loss": (lambda a: L.value_loss(a["x"], a["y"], a["z"], a["mask"]), ["x", "y", "z"]),
    "kl_estimates": (lambda a: L.kl_estimates(a["logp"], a["ref"]), ["logp", "ref"]),
    "full_kl": (
        lambda a: L.full_kl(a["logits"], a["ref_logits"], a["mask"]),
        ["logits", "ref_logits"],
    ),
    "entropy": (lambda a: L.entropy(a["logits"], a["mask"]), ["logits"]),
    "sequence_logprobs": (lambda a: L.sequence_logprobs(a["logp"], a["mask"]), ["logp"]),
    "sequence_logprobs_average": (
        lambda a: L.sequence_logprobs(a["logp"], a["mask"], average=True),
        ["logp"],
    ),
    "token_aggregate_sequence": (
        lambda a: L.token_aggregate(a["x"], a["mask"], normalize="sequence"),
        ["x"],
    ),
    "token_aggregate_constant": (
        lambda a: L.token_aggregate(a["x"], a["mask"], normalize="constant"),
        ["x"],
    ),
    "ppo_policy_loss_sequence": (
        lambda a: L.ppo_policy_loss(a["logp"], a["ref"], a["x"], a["mask"], normalize="sequence"),
        ["logp", "ref", "x"],
    ),
    "kl_penalty": (lambda a: L.kl_penalty(a["logp"], a["ref"], a["mask"]), ["logp", "ref"]),
    "kl_estimates_masked": (
        lambda a: L.kl_estimates(a["logp"], a["ref"], a["mask"]),
        ["logp", "ref"],
    ),
    "dpo_loss": (
        lambda a: L.dpo_loss(a["chosen"], a["rejected"], a["score"], a["chosen"][::-1]),
        ["chosen", "rejected"],
    ),
    "dpo_loss_ipo": (
        lambda a: L.dpo_loss(
            a["chosen"], a["rejected"], a["score"], a["chosen"][::-1], loss_type="ipo"
        ),
        ["chosen", "rejected"],
    ),
    "dpo_loss_masked": (
        lambda a: L.dpo_loss(
            a["logp"][:, 0], a["ref"][:, 0], a["chosen"], a["rejected"], mask=a["mask"][:, 0]
        ),
        ["logp", "ref"],
    ),
    "group_advantages": (lambda a: L.group_advantages(a["rewards_g"]), ["rewards_g"]),
    "rloo_advantages": (lambda a: L.rloo_advantages(a["rewards_g"]), ["rewards_g"]),
    "adaptive_kl_coef": (
        lambda a: L.adaptive_kl_coef(a["beta"], a["kl"], 512, target=6.0, horizon=10_000),
        ["beta", "kl"],
    ),
}


@functools.cache
def jitted(name):
    return jax.jit(FUNCTIONS[name][0])


@functools.cache
def jitted_grad(name):
    fn = FUNCTIONS[name][0]
    return jax.jit(jax.grad(lambda diff, rest: total(fn({**rest, **diff}))))


@pytest.mark.parametrize("mask_kind", ["rows_empty", "all_empty"])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_outputs_and_gradients_finite(name, mask_kind):
    inputs = make_inputs(0, mask_kind)
    if name == "kl_estimates":  # unmasked and elementwise: give it finite inputs
        inputs["logp"], inputs["ref"] = map(
            jnp.asarray, logprobs_pair(np.random.default_rng(0), 3, 5)
        )
    for leaf in jax.tree.leaves(jitted(name)(inputs)):
        assert np.all(np.isfinite(np.asarray(leaf))), name
    wrt = FUNCTIONS[name][1]
    grads = jitted_grad(name)({key: inputs[key] for key in wrt}, inputs)
    for key, g in grads.items():
        assert np.all(np.isfinite(np.asarray(g))), (name, key)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_jit_and_vmap_agree_with_eager(name):
    fn = FUNCTIONS[name][0]
    a0, a1 = make_inputs(1, "rows_empty"), make_inputs(2, "rows_empty")
    eager0, eager1 = fn(a0), fn(a1)
    for x, y in zip(jax.tree.leaves(jitted(name)(a0)), jax.tree.leaves(eager0), strict=True):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)
    stacked = jax.tree.map(lambda p, q: jnp.stack([p, q]), a0, a1)
    batched = jax.vmap(fn)(stacked)
    for i, eager in enumerate((eager0, eager1)):
        for x, y in zip(jax.tree.leaves(batched), jax.tree.leaves(eager), strict=True):
            np.testing.assert_allclose(x[i], y, rtol=RTOL, atol=ATOL)


@pytest.mark.skipif(
    not hasattr(L.token_logprobs, "__wrapped__"), reason="jaxtyping runtime checks are off"
)
def test_shape_annotations_are_enforced():
    # pyproject's --jaxtyping-packages turns the annotations into runtime checks: a tokens array
    # whose T disagrees with the logits' T, or a per-prompt mask of the wrong K, is rejected.
    with pytest.raises(TypeCheckError, match="B T"):
        L.token_logprobs(jnp.zeros((2, 4, 3)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(TypeCheckError, match="B K"):
        L.ranking_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4), jnp.int32), valid=jnp.ones((2, 3)))


# ---------------------------------------------------------------------------------------------
# Properties


GRID = st.integers(-20, 20).map(lambda i: i / 4)  # exact in float32: shifts change no rounding


ranking_jit = jax.jit(lambda r, k, v: L.ranking_loss(r, k, valid=v))
gae_unit_jit = jax.jit(lambda r, v, m: L.gae(r, v, m, gamma=1.0, lam=1.0))


@settings(max_examples=30, deadline=None)
@given(
    rewards=hnp.arrays(np.float32, (3, 4), elements=GRID),
    shift=hnp.arrays(np.float32, (3, 1), elements=GRID),
    ranks=hnp.arrays(np.int32, (3, 4), elements=st.integers(0, 3)),
    valid=hnp.arrays(np.bool_, (3, 4)),
)
def test_ranking_loss_invariant_to_per_prompt_shift(rewards, shift, ranks, valid):
    base = ranking_jit(rewards, ranks, valid)
    moved = ranking_jit(rewards + shift, ranks, valid)
    for x, y in zip(base, moved, strict=True):
        close(x, y)


@settings(max_examples=30, deadline=None)
@given(
    rewards=hnp.arrays(np.float32, (3, 6), elements=st.floats(-3, 3, width=32)),
    values=hnp.arrays(np.float32, (3, 6), elements=st.floats(-3, 3, width=32)),
    mask=hnp.arrays(np.bool_, (3, 6)),
)
def test_gae_with_unit_gamma_lambda_is_reward_to_go_minus_value(rewards, values, mask):
    # gamma = lam = 1 telescopes: A_t = sum_{s >= t, valid} r_s - V_t (docs/method.md check 7).
    adv, ret = gae_unit_jit(rewards, values, mask)
    to_go = np.zeros(mask.shape)
    for b, t in np.ndindex(mask.shape):
        to_go[b, t] = sum(float(rewards[b, s]) for s in range(t, mask.shape[1]) if mask[b, s])
    close(adv, np.where(mask, to_go - values, 0.0), atol=1e-4)
    close(ret, np.where(mask, to_go, 0.0), atol=1e-4)
