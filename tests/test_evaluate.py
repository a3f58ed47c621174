"""The library's evaluation without gold: NLL, intervals, win rates, KL, RM scores and accuracy,
and a whole policy's evaluation. Models and data are random; nothing here needs the world."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import evaluate, rollout, stats
from rlhf_jax.config import model_config
from rlhf_jax.evaluate import Reference
from rlhf_jax.model import Transformer, init_params
from rlhf_jax.rollout import RewardModel

P, R, V = 8, 6, 64
EOS, PAD = 2, 0


def _model(seed=0, **kw):
    cfg = model_config("tiny", vocab_size=V, max_len=32, **kw)
    return cfg, init_params(cfg, jax.random.key(seed))


def _docs(n, length=16, seed=0):
    """Right-padded random documents of lengths 3..length."""
    rng = np.random.default_rng(seed)
    docs = np.zeros((n, length), np.int32)
    for i, size in enumerate(rng.integers(3, length + 1, n)):
        docs[i, :size] = rng.integers(3, V, size)
    return docs


def _prompts(n, seed=0):
    """Left-padded random prompts of lengths 2..P."""
    rng = np.random.default_rng(seed)
    prompts = np.zeros((n, P), np.int32)
    for i, size in enumerate(rng.integers(2, P + 1, n)):
        prompts[i, P - size :] = rng.integers(3, V, size)
    return prompts


# --------------------------------------------------------------------------------------------------
# Held-out NLL


def test_heldout_nll_matches_float64_numpy():
    cfg, params = _model()
    docs = _docs(5)  # documents of mixed length
    got = evaluate.heldout_nll(params, cfg, docs, batch_size=2, pad_id=PAD)  # 2 + 2 + 1 (padded)

    # Reference: float64 log-softmax of the model's logits, pooled over predicted real tokens.
    real = docs != PAD
    logits = jax.jit(Transformer(cfg).apply)({"params": params}, docs, real)
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp[:, :-1], docs[:, 1:, None], axis=-1)[..., 0]
    want = -picked[real[:, 1:]].sum() / real[:, 1:].sum()
    # float32 model and log-softmax against float64: ~1e-7 relative per token, so 1e-5 is ample.
    assert got == pytest.approx(want, rel=1e-5)
    # A mean of batch means would weigh the short last batch like the others; this must not.
    batch_means = [-picked[i : i + 2][real[i : i + 2, 1:]].mean() for i in range(0, 5, 2)]
    assert abs(np.mean(batch_means) - want) > 1e-4


def test_heldout_nll_of_uniform_model_is_log_v():
    # Tied embeddings at zero give logits 0 everywhere: every token costs log(64) nats.
    cfg, params = _model()
    params = {**params, "embed": jnp.zeros_like(params["embed"])}
    got = evaluate.heldout_nll(params, cfg, _docs(7), batch_size=4, pad_id=PAD)
    assert got == pytest.approx(math.log(64), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Statistics


def test_mean_ci95_hand_worked():
    # x = 1..4: mean 2.5, sample sd sqrt(5/3) = 1.290994, half width 1.96 * 1.290994 / 2 = 1.265174.
    mean, lo, hi = stats.mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert (lo, hi) == pytest.approx((2.5 - 1.265174, 2.5 + 1.265174), abs=1e-6)
    assert stats.mean_ci95([0.3]) == (0.3, 0.3, 0.3)


def test_win_rate_and_paired_gain_hand_worked():
    # Outcomes 1, 0.5, 0, 1: rate 0.625; sd of (1, .5, 0, 1) = sqrt(0.229167) = 0.478714;
    # half width 1.96 * 0.478714 / 2 = 0.469140.
    a, b = [0.9, 0.2, -1.0, 0.5], [0.1, 0.2, 0.3, -1.0]
    rate, lo, hi = stats.win_rate(a, b)
    assert rate == 0.625
    assert (lo, hi) == pytest.approx((0.625 - 0.469140, 0.625 + 0.469140), abs=1e-6)
    assert stats.win_rate([0.1, 0.7], [0.1, 0.7]) == (0.5, 0.5, 0.5)
    # Gain: differences 0.8, 0, -1.3, 1.5: mean 0.25; squared deviations 0.3025, 0.0625, 2.4025,
    # 1.5625 sum to 4.33, sd sqrt(4.33 / 3) = 1.201388, half width 1.96 * 1.201388 / 2 = 1.177360.
    win, gain = stats.paired(a, b)
    assert win == (rate, lo, hi)
    assert gain == pytest.approx((0.25, 0.25 - 1.177360, 0.25 + 1.177360), abs=1e-6)
    # k samples per prompt: each prompt's k outcomes are averaged first.
    win2, gain2 = stats.paired([[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]])
    assert win2[0] == pytest.approx((0.75 + 0.25) / 2) and gain2[0] == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------------
# Sampling and likelihoods


def test_sample_responses_batches_like_rollout_sample():
    cfg, params = _model()
    prompts = _prompts(5)
    rng = jax.random.key(3)
    kw = dict(max_new_tokens=R, eos_id=EOS, pad_id=PAD)
    tokens, mask = evaluate.sample_responses(params, cfg, prompts, rng=rng, batch_size=2, **kw)
    assert tokens.shape == mask.shape == (5, R)
    np.testing.assert_array_equal(
        mask, np.asarray(rollout.mask_through_eos(jnp.asarray(tokens), EOS))
    )
    assert np.all(tokens[mask == 0] == PAD)
    direct = rollout.sample(
        params,
        cfg,
        prompts[2:4],
        (prompts[2:4] != PAD).astype(np.int32),
        jax.random.fold_in(rng, 1),
        **kw,
    )
    np.testing.assert_array_equal(tokens[2:4], np.asarray(direct.tokens))

    # Teacher-forced sequence log-prob = the sampler's own per-token log-probs, summed.
    logp = evaluate.sequence_logprob(
        params, cfg, prompts[2:4], tokens[2:4], mask[2:4], batch_size=3, pad_id=PAD
    )
    np.testing.assert_allclose(logp, np.asarray(direct.logprobs).sum(-1), rtol=1e-5, atol=1e-5)
    # The log ratio against itself is exactly 0; against another model it is the difference.
    other_cfg, other = _model(seed=1)
    args = (prompts, tokens, mask)
    zero = evaluate.log_ratio((params, cfg), (params, cfg), *args, batch_size=2, pad_id=PAD)
    np.testing.assert_array_equal(zero, np.zeros(5))
    ratio = evaluate.log_ratio((params, cfg), (other, other_cfg), *args, batch_size=2, pad_id=PAD)
    theirs = evaluate.sequence_logprob(other, other_cfg, *args, batch_size=4, pad_id=PAD)
    ours = evaluate.sequence_logprob(params, cfg, *args, batch_size=4, pad_id=PAD)
    # Each side is a float32 sum of R log-probs of a few nats, computed here in other batchings
    # than in log_ratio, so the difference holds to their rounding (tens of nats x 1e-7).
    np.testing.assert_allclose(ratio, ours - theirs, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Reward model


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_rm_metrics_hand_worked():
    rewards = np.array([[3.0, 1.0, 2.0], [0.0, 1.0, 100.0]])
    ranks = np.array([[0, 1, 2], [1, 0, -1]])
    valid = np.array([[1, 1, 1], [1, 1, 0]])
    m = evaluate.rm_metrics(rewards, ranks, valid)
    # Pairs (winner, loser): prompt 0 (0,1) right, (0,2) right, (1,2) wrong; prompt 1 (1,0)
    # right; the invalid slot (reward 100, rank -1) is ignored: 3 / 4.
    assert m["val_accuracy"] == 0.75 and m["val_pairs"] == 4
    loss0 = -(_log_sigmoid(2.0) + _log_sigmoid(1.0) + _log_sigmoid(-1.0)) / 3
    loss1 = -_log_sigmoid(1.0)
    assert m["val_loss"] == pytest.approx((loss0 + loss1) / 2, rel=1e-6)
    # A reward tie is a wrong answer, and an order by scores counts higher-is-better.
    pairs = evaluate.preferred_pairs(np.array([[0.2, 0.1]]), np.ones((1, 2)), lower_is_better=False)
    assert pairs[0, 0, 1] and not pairs[0, 1, 0]
    assert evaluate.pairwise_accuracy(np.array([[1.0, 1.0]]), pairs) == 0.0


def _comparisons(N=3, K=4, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, R + 1, (N, K))
    tokens = np.zeros((N, K, P + R), np.int32)
    resp = np.zeros_like(tokens)
    tokens[:, :, P - 4 : P] = rng.integers(4, V, (N, K, 4))
    for i in range(N):
        for k in range(K):
            tokens[i, k, P : P + lengths[i, k]] = rng.integers(4, V, lengths[i, k])
            resp[i, k, P : P + lengths[i, k]] = 1
    return tokens, (tokens != 0).astype(np.int32), resp


def test_comparison_scores_are_reward_scores_minus_the_bias():
    cfg, params = _model(head="scalar")
    tokens, attn, resp = _comparisons()
    got = evaluate.comparison_scores(
        RewardModel(params, cfg, 0.5), tokens, attn, resp, prompt_len=P, batch_size=2
    )
    flat = [jnp.asarray(x.reshape(12, -1)) for x in (tokens, attn, resp)]
    scores = jax.jit(rollout.reward_scores, static_argnums=(1, 4))(
        params, cfg, flat[0], flat[1], P, flat[2]
    )
    np.testing.assert_allclose(got, np.asarray(scores).reshape(3, 4) - 0.5, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# A whole policy without gold


def test_evaluate_policy_against_itself_and_another_policy():
    cfg, sft = _model()
    _, other = _model(seed=1)
    rm_cfg, rm = _model(seed=2, head="scalar")
    prompts = _prompts(10, seed=1)
    docs = _docs(6, seed=2)
    kw = dict(
        rng=jax.random.key(7),
        batch_size=4,
        max_new_tokens=R,
        eos_id=EOS,
        pad_id=PAD,
        reward=RewardModel(rm, rm_cfg, 0.25),
        heldout_docs=docs,
        samples_per_prompt=3,
    )
    own = evaluate.evaluate_policy("sft", sft, cfg, prompts, reference=Reference(sft, cfg), **kw)
    s = json.loads(json.dumps(own.summary()))
    assert s["rm_win_rate_vs_sft"] == 0.5 and s["rm_gain_vs_sft"] == 0.0 and s["kl_to_sft"] == 0.0
    assert s["n_prompts"] == 10 and s["samples_per_prompt"] == 3
    assert s["heldout_nll"] == pytest.approx(
        evaluate.heldout_nll(sft, cfg, docs, batch_size=4, pad_id=PAD)
    )

    # The samples are sample_responses of the prompts repeated k times, with the same stream;
    # their RM scores are reward_scores at each response's last token, minus the bias.
    rep = np.repeat(prompts, 3, axis=0)
    tokens, mask = evaluate.sample_responses(
        other,
        cfg,
        rep,
        rng=jax.random.key(7),
        batch_size=4,
        max_new_tokens=R,
        eos_id=EOS,
        pad_id=PAD,
    )
    ppo = evaluate.evaluate_policy(
        "ppo", other, cfg, prompts, reference=Reference(sft, cfg, own.rm_scores), **kw
    )
    full = np.concatenate([rep, tokens], axis=1)
    attention = np.concatenate([(rep != PAD).astype(np.int32), mask], axis=1)
    resp_mask = np.concatenate([np.zeros_like(rep), mask], axis=1)
    direct = rollout.reward_scores(rm, rm_cfg, jnp.asarray(full), attention, P, resp_mask)
    np.testing.assert_allclose(
        ppo.rm_scores.ravel(), np.asarray(direct) - 0.25, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(ppo.responses, tokens)
    np.testing.assert_array_equal(ppo.first().tokens, tokens[::3])
    row = ppo.summary()
    assert row["eos_rate"] == pytest.approx(np.any((tokens == EOS) & (mask > 0), axis=1).mean())
    assert row["response_length"] == pytest.approx(mask.sum(axis=1).mean())
    win, gain = stats.paired(ppo.rm_scores, own.rm_scores)
    assert (row["rm_win_rate_vs_sft"], row["rm_gain_vs_sft"]) == (win.value, gain.value)
    ratio = evaluate.log_ratio(
        (other, cfg), (sft, cfg), rep, tokens, mask, batch_size=4, pad_id=PAD
    )
    assert row["kl_to_sft"] == pytest.approx(float(ratio.mean()))
    # Without an RM, only the RM columns are missing.
    bare = evaluate.evaluate_policy(
        "ppo", other, cfg, prompts, **{**kw, "reward": None, "heldout_docs": None}
    )
    assert "rm_score_mean" not in bare.summary() and bare.summary()["heldout_nll"] is None


def test_best_of_n_keeps_the_rms_favourite_of_n_draws():
    cfg, params = _model()
    rm_cfg, rm = _model(seed=2, head="scalar")
    prompts = _prompts(5, seed=3)
    kw = dict(rng=jax.random.key(4), batch_size=4, max_new_tokens=R, eos_id=EOS, pad_id=PAD)
    tokens, mask, best = evaluate.best_of_n(
        params, cfg, prompts, n=3, reward=RewardModel(rm, rm_cfg, 0.25), **kw
    )
    # Independently: the 15 candidates, their scores, and the argmax of each prompt's 3 by hand.
    rows = np.repeat(prompts, 3, axis=0)
    cand, cand_mask = evaluate.sample_responses(params, cfg, rows, **kw)
    scores = evaluate.response_scores(
        RewardModel(rm, rm_cfg, 0.25), rows, cand, cand_mask, batch_size=4, pad_id=PAD
    )
    for i in range(5):
        j = max(range(3), key=lambda c: (scores[3 * i + c], -c))  # the first of equal scores
        np.testing.assert_array_equal(tokens[i], cand[3 * i + j])
        np.testing.assert_array_equal(mask[i], cand_mask[3 * i + j])
        assert best[i] == scores[3 * i + j] == max(scores[3 * i : 3 * i + 3])
    assert len(set(map(tuple, cand[:3]))) > 1  # the draws differ, so the pick means something

    # evaluate_policy(best_of=3): these answers, the analytic KL, and params' own held-out NLL.
    docs = _docs(4, seed=5)
    out = evaluate.evaluate_policy(
        "best_of_n",
        params,
        cfg,
        prompts,
        reward=RewardModel(rm, rm_cfg, 0.25),
        reference=Reference(params, cfg),
        heldout_docs=docs,
        best_of=3,
        **kw,
    )
    np.testing.assert_allclose(out.rm_scores[:, 0], best, rtol=1e-6)
    np.testing.assert_array_equal(out.responses, tokens)
    assert out.kl_to_sft == pytest.approx(math.log(3) - 2 / 3)
    assert out.heldout_nll == evaluate.heldout_nll(params, cfg, docs, batch_size=4, pad_id=PAD)
    with pytest.raises(ValueError, match="best_of > 1 needs the reward model"):
        evaluate.evaluate_policy("x", params, cfg, prompts, best_of=3, **kw)


def test_best_of_n_kl_is_the_limit_of_the_exact_discrete_kl():
    # Independent float64 computation: n draws from M equally likely answers with distinct
    # rewards; the best is answer i (in reward order) with P = (i/M)^n - ((i-1)/M)^n. Its exact
    # KL to uniform tends to log n - (n - 1)/n as M grows, and stays below it.
    assert evaluate.best_of_n_kl(1) == 0.0
    assert evaluate.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931 by hand
    for n in (2, 4, 16, 64):
        M = 200_000
        cdf = np.arange(M + 1, dtype=np.float64) / M
        p = np.diff(cdf**n)
        exact = float(np.sum(p * np.log(p * M, where=p > 0, out=np.zeros(M))))
        assert exact <= evaluate.best_of_n_kl(n) + 1e-12
        assert exact == pytest.approx(evaluate.best_of_n_kl(n), abs=2e-3)


def test_generate_text_decodes_the_sampled_tokens():
    cfg, params = _model()

    class Tok:  # the two methods generate_text uses of a HF tokenizer
        eos_token_id, pad_token_id = EOS, PAD

        def encode(self, text, add_special_tokens=False):
            return [int(w) for w in text.split()]

        def decode(self, ids):
            return " ".join(map(str, ids))

    text = evaluate.generate_text(params, cfg, Tok(), "5 6 7", jax.random.key(0), max_new_tokens=R)
    out = rollout.sample(
        params,
        cfg,
        np.array([[5, 6, 7]], np.int32),
        np.ones((1, 3), np.int32),
        jax.random.key(0),
        max_new_tokens=R,
        eos_id=EOS,
        pad_id=PAD,
    )
    n = int(np.asarray(out.mask).sum())
    assert text == " ".join(map(str, np.asarray(out.tokens[0, :n]).tolist()))
