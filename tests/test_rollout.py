"""Sampling exactness (cache, greedy, top-k, temperature, log-probs) and scoring invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rlhf_jax import rollout, sharding
from rlhf_jax.config import MeshConfig, model_config
from rlhf_jax.model import Transformer, init_params

EOS, PAD = 2, 0


def _policy(vocab=32, seed=0, size="tiny-llama", **kw):
    cfg = model_config(size, vocab_size=vocab, max_len=32, **kw)
    return cfg, init_params(cfg, jax.random.key(seed))


def _prompts(batch=4, length=6, vocab=32, seed=1):
    """Left-padded prompts: row i has i % 3 pads."""
    tokens = np.array(jax.random.randint(jax.random.key(seed), (batch, length), 3, vocab))
    mask = np.ones_like(tokens)
    for i in range(batch):
        tokens[i, : i % 3], mask[i, : i % 3] = PAD, 0
    return jnp.asarray(tokens), jnp.asarray(mask)


def _scripted():
    """A zero-layer Llama whose greedy continuation of token x is x + 1 (mod 8).

    embed = I_8, so RMSNorm(embed[x]) = sqrt(8) e_x, and lm_head maps e_x to e_{x+1}.
    """
    cfg = model_config(
        "tiny-llama", vocab_size=8, d_model=8, n_layers=0, n_heads=2, n_kv_heads=2, max_len=32
    )
    params = {
        "embed": jnp.eye(8),
        "final_norm": {"scale": jnp.ones(8)},
        "lm_head": {"kernel": jnp.roll(jnp.eye(8), 1, axis=1)},
    }
    return cfg, params


def test_scripted_greedy_stops_at_eos_and_pads():
    cfg, params = _scripted()
    prompts = jnp.array([[0, 1, 3], [5, 6, 3], [0, 0, 6]])
    mask = jnp.array([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    out = rollout.sample(
        params,
        cfg,
        prompts,
        mask,
        jax.random.key(0),
        max_new_tokens=6,
        greedy=True,
        eos_id=7,
        pad_id=0,
    )
    # From 3: 4 5 6 7(EOS) then padding; from 6: 7(EOS) at once.
    np.testing.assert_array_equal(out.tokens[0], [4, 5, 6, 7, 0, 0])
    np.testing.assert_array_equal(out.tokens[2], [7, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out.mask[0], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out.mask[2], [1, 0, 0, 0, 0, 0])
    assert np.all(np.asarray(out.logprobs)[np.asarray(out.mask) == 0] == 0.0)
    # The decode loop stops once every row has produced EOS: after 4 of the 6 steps.
    state = rollout.prefill(params, cfg, prompts, mask, 6, 0)
    state = rollout.decode(
        params, cfg, state, jax.random.key(0), rollout.Sampler(greedy=True), 7, 0
    )
    assert int(state.step) == 4


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_teacher_forced(temperature):
    cfg, params = _policy()
    prompts, pmask = _prompts()
    out = rollout.sample(
        params,
        cfg,
        prompts,
        pmask,
        jax.random.key(3),
        max_new_tokens=8,
        temperature=temperature,
        eos_id=EOS,
        pad_id=PAD,
    )
    tokens, mask = rollout.full_sequence(prompts, pmask, out.tokens, out.mask)
    forced = rollout.response_logprobs(
        params, cfg, tokens, mask, prompts.shape[1], temperature=temperature
    )
    np.testing.assert_allclose(out.logprobs, forced * out.mask, atol=1e-5)


def _uncached_sample(params, cfg, prompts, pmask, rng, steps, sampler):
    """Reference sampler: a full forward over the whole sequence for every new token."""
    tokens, mask = prompts, pmask
    done = jnp.zeros(prompts.shape[0], bool)
    out = []
    for t in range(steps):
        logits = Transformer(cfg).apply({"params": params}, tokens, mask)[:, -1]
        token = jnp.where(done, PAD, sampler(logits, jax.random.fold_in(rng, t)))
        out.append(token)
        tokens = jnp.concatenate([tokens, token[:, None]], 1)
        mask = jnp.concatenate([mask, (~done)[:, None].astype(jnp.int32)], 1)
        done = done | (token == EOS)
    return jnp.stack(out, 1)


@pytest.mark.parametrize("greedy", [True, False])
def test_cached_decoding_gives_the_tokens_of_uncached_decoding(greedy):
    cfg, params = _policy(size="tiny")
    prompts, pmask = _prompts()
    sampler = rollout.Sampler(greedy=greedy)
    out = rollout.sample(
        params,
        cfg,
        prompts,
        pmask,
        jax.random.key(5),
        max_new_tokens=7,
        greedy=greedy,
        eos_id=EOS,
        pad_id=PAD,
    )
    ref = _uncached_sample(params, cfg, prompts, pmask, jax.random.key(5), 7, sampler)
    np.testing.assert_array_equal(out.tokens, ref)


def test_top_k_one_equals_greedy_and_top_p_tiny_equals_greedy():
    cfg, params = _policy()
    prompts, pmask = _prompts()
    kw = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD)
    greedy = rollout.sample(params, cfg, prompts, pmask, jax.random.key(0), greedy=True, **kw)
    top1 = rollout.sample(params, cfg, prompts, pmask, jax.random.key(9), top_k=1, **kw)
    nucleus = rollout.sample(params, cfg, prompts, pmask, jax.random.key(9), top_p=1e-6, **kw)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)


def test_sampled_frequencies_match_tempered_softmax():
    # A random 8-token model with large weights so its next-token distribution is far from uniform.
    cfg = model_config("tiny", vocab_size=8, max_len=8)
    params = jax.tree.map(lambda x: 8 * x, init_params(cfg, jax.random.key(2)))
    n, temperature = 4000, 0.6
    prompts = jnp.tile(jnp.array([[1, 4, 5]]), (n, 1))
    out = rollout.sample(
        params,
        cfg,
        prompts,
        jnp.ones_like(prompts),
        jax.random.key(0),
        max_new_tokens=1,
        temperature=temperature,
        eos_id=EOS,
        pad_id=PAD,
    )
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=8)
    logits = Transformer(cfg).apply({"params": params}, prompts[:1])[0, -1]

    def expected(t):  # float64 softmax, so the counts and expectations sum to exactly n
        z = np.asarray(logits, np.float64) / t
        p = np.exp(z - z.max())
        return p / p.sum() * n

    assert stats.chisquare(counts, expected(temperature)).pvalue > 1e-3
    # The test has power: the untempered softmax is rejected.
    assert stats.chisquare(counts, expected(1.0)).pvalue < 1e-6


def _score_setup():
    cfg, params = _policy()
    critic_cfg = model_config("tiny-llama", vocab_size=32, max_len=32, head="scalar")
    critic = init_params(critic_cfg, jax.random.key(7))
    ref = init_params(cfg, jax.random.key(8))
    rp = rollout.RolloutParams(params, ref, critic, jax.tree.map(lambda x: -x, critic))
    prompts, pmask = _prompts()
    out = rollout.sample(
        params, cfg, prompts, pmask, jax.random.key(4), max_new_tokens=8, eos_id=EOS, pad_id=PAD
    )
    return cfg, critic_cfg, rp, prompts, pmask, out


def test_score_is_consistent_with_sampling_and_losses():
    cfg, critic_cfg, rp, prompts, pmask, out = _score_setup()
    ro = rollout.score(
        rp,
        cfg,
        critic_cfg,
        prompts,
        pmask,
        out.tokens,
        out.mask,
        eos_id=EOS,
        kl_coef=0.1,
        reward_bias=0.5,
    )
    # Ratio 1 against the sampler's log-probs; KL and rewards as docs/method.md 3.1.
    np.testing.assert_allclose(ro.logprobs, out.logprobs, atol=1e-5)
    np.testing.assert_allclose(ro.kl, (ro.logprobs - ro.ref_logprobs) * out.mask, atol=1e-6)
    np.testing.assert_allclose(ro.rewards.sum(1), ro.scores - 0.1 * ro.kl.sum(1), atol=1e-5)
    valid = np.asarray(out.mask) > 0
    adv = np.asarray(ro.advantages)[valid]
    assert abs(adv.mean()) < 1e-5 and abs(adv.std() - 1) < 1e-3
    # The bias shifts every score; policy = reference gives zero KL.
    unbiased = rollout.score(
        rp, cfg, critic_cfg, prompts, pmask, out.tokens, out.mask, eos_id=EOS, kl_coef=0.1
    )
    np.testing.assert_allclose(unbiased.scores - ro.scores, 0.5, atol=1e-6)
    same = rollout.score(
        rp._replace(ref=rp.policy),
        cfg,
        critic_cfg,
        prompts,
        pmask,
        out.tokens,
        out.mask,
        eos_id=EOS,
        kl_coef=0.1,
    )
    assert float(jnp.abs(same.kl).max()) == 0.0


def test_left_padding_and_tokens_after_eos_do_not_change_scores():
    cfg, critic_cfg, rp, prompts, pmask, out = _score_setup()
    args = dict(eos_id=EOS, kl_coef=0.05)
    base = rollout.score(rp, cfg, critic_cfg, prompts, pmask, out.tokens, out.mask, **args)
    pad = jnp.zeros((prompts.shape[0], 3), jnp.int32)
    padded = rollout.score(
        rp,
        cfg,
        critic_cfg,
        jnp.concatenate([pad, prompts], 1),
        jnp.concatenate([pad, pmask], 1),
        out.tokens,
        out.mask,
        **args,
    )
    for name in ("logprobs", "ref_logprobs", "values", "scores"):
        np.testing.assert_allclose(getattr(padded, name), getattr(base, name), atol=1e-5)
    # Garbage after EOS (still masked) changes nothing.
    garbage = jnp.where(out.mask > 0, out.tokens, 17)
    after = rollout.score(rp, cfg, critic_cfg, prompts, pmask, garbage, out.mask, **args)
    np.testing.assert_allclose(after.scores, base.scores, atol=1e-6)


def test_missing_eos_score_replaces_only_rows_without_eos():
    cfg, critic_cfg, rp, prompts, pmask, _ = _score_setup()
    resp = jnp.array([[5, 6, EOS, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD], [9, 9, 9, 9]])
    mask = rollout.mask_through_eos(resp, EOS)
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 0])
    np.testing.assert_array_equal(mask[1], [1, 1, 1, 1])
    ro = rollout.score(
        rp, cfg, critic_cfg, prompts, pmask, resp, mask, eos_id=EOS, kl_coef=0.0, no_eos_score=-1.0
    )
    plain = rollout.score(rp, cfg, critic_cfg, prompts, pmask, resp, mask, eos_id=EOS, kl_coef=0.0)
    np.testing.assert_allclose(ro.scores, [plain.scores[0], -1.0, plain.scores[2], -1.0])


def test_sampling_on_an_8_device_mesh_equals_one_device():
    cfg, params = _policy()
    prompts, pmask = _prompts(batch=8)
    kw = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=0.9)
    single = rollout.sample(params, cfg, prompts, pmask, jax.random.key(1), **kw)
    mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))
    from rlhf_jax.model import abstract_params

    sparams = jax.device_put(
        params, sharding.tree_shardings(abstract_params(cfg), mesh, MeshConfig().rules)
    )
    batch = sharding.shard_batch({"p": np.asarray(prompts), "m": np.asarray(pmask)}, mesh)
    multi = rollout.sample(sparams, cfg, batch["p"], batch["m"], jax.random.key(1), **kw)
    np.testing.assert_array_equal(multi.tokens, single.tokens)
    np.testing.assert_allclose(multi.logprobs, single.logprobs, atol=1e-5)


def test_equal_shapes_never_recompile():
    cfg, params = _policy()
    prompts, pmask = _prompts()
    kw = dict(max_new_tokens=5, eos_id=EOS, pad_id=PAD)
    rollout.sample(params, cfg, prompts, pmask, jax.random.key(0), **kw)
    sizes = (rollout._prefill_jit._cache_size(), rollout._decode_jit._cache_size())
    for seed in (1, 2):  # new keys and new prompt values, same shapes
        rollout.sample(params, cfg, (prompts + seed) % 32, pmask, jax.random.key(seed), **kw)
    assert (rollout._prefill_jit._cache_size(), rollout._decode_jit._cache_size()) == sizes
