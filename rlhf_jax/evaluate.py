"""Evaluation that needs no gold reward, for any data source: sampling, likelihoods, RM scores.

What every run can measure about a policy on held-out prompts (``evaluate_policy``): the reward
model's score of its T = 1 samples with a 95% interval over prompts, the paired RM-score gain and
RM win rate against a reference policy (the SFT model), the KL to that reference, held-out
pretraining NLL (the alignment tax), EOS rate and response length; and about a reward model
(``rm_metrics``): pairwise accuracy and ranking loss on held-out comparisons. The built-in world
adds its gold reward on top (``rlhf_jax.instructlang.evaluate``).

Model work goes through a few module-level jitted functions with the model config static, so each
model shape compiles once per batch shape; every batched loop pads its last batch to a full one
(and drops the padding rows), so shapes never change. Statistics are pure NumPy.

Choices (intervals and paired statistics are ``rlhf_jax.stats``'s):

- Paired comparisons (win rate, gain) use the same prompts and, when the caller passes the same
  ``rng`` to every model, the same random stream (common random numbers), so they hold far less
  sampling noise than two independent estimates.
- KL to the reference is the mean over this model's own samples of ``sum_t log pi(y_t) - log
  pi_ref(y_t)``, the unbiased "k1" estimate of KL(pi || pi_ref) per response; it can come out
  slightly negative by sampling noise when the two policies are close.
- RM pairwise accuracy counts a pair as right only when the preferred completion scores strictly
  higher (a reward tie is wrong), as ``losses.ranking_loss`` does; pairs are pooled over prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Shaped

from rlhf_jax import losses, rollout, sharding
from rlhf_jax.checkpoint import abstract_with_shardings
from rlhf_jax.config import ModelConfig
from rlhf_jax.model import predicted_logprobs
from rlhf_jax.rollout import RewardModel
from rlhf_jax.stage_table import Pass, PlanInputs, Program
from rlhf_jax.stats import Paired, jsonable, mean_ci95, paired, per_prompt
from rlhf_jax.train_state import abstract_params, params_shardings

# --------------------------------------------------------------------------------------------------
# Batching and the jitted model calls (one compilation per config and batch shape)


def batched(fn, arrays: tuple[np.ndarray, ...], batch_size: int) -> list[np.ndarray]:
    """``fn(i, *batch_i)`` over fixed-size batches of the rows of ``arrays``, outputs concatenated.

    The last batch is padded to ``batch_size`` by repeating row 0 and the padding rows' outputs
    are dropped, so every call has the same shapes. ``fn`` returns a tuple of per-row arrays.
    """
    n, outs = len(arrays[0]), []
    for i, start in enumerate(range(0, n, batch_size)):
        stop = min(start + batch_size, n)
        idx = np.zeros(batch_size, np.int64)
        idx[: stop - start] = np.arange(start, stop)
        outs.append([np.asarray(o)[: stop - start] for o in fn(i, *(a[idx] for a in arrays))])
    return [np.concatenate(parts) for parts in zip(*outs)]


@functools.partial(jax.jit, static_argnums=(1, 6))
def _sequence_logprob_jit(
    params, config, prompts, prompt_mask, responses, response_mask, temperature
):
    tokens, mask = rollout.full_sequence(prompts, prompt_mask, responses, response_mask)
    logp = rollout.response_logprobs(
        params, config, tokens, mask, prompts.shape[1], temperature=temperature
    )
    return (jnp.sum(jnp.where(response_mask > 0, logp, 0.0), axis=-1),)


@functools.partial(jax.jit, static_argnums=(1,))
def _nll_rows_jit(params, config, docs, real):
    # sft_loss convention: position t predicts docs[:, t + 1]; nothing predicts the first token.
    logp = predicted_logprobs(params, config, docs, real, 1).logprobs
    target = real[:, 1:] > 0
    return -jnp.sum(jnp.where(target, logp, 0.0), axis=1), jnp.sum(target, axis=1)


@functools.partial(jax.jit, static_argnums=(1, 5))
def _rm_scores_jit(params, config, tokens, attention_mask, response_mask, prompt_len, bias):
    # reward_scores is typed for [B T]: flatten the K completions of each prompt into the batch.
    flat = [x.reshape(-1, x.shape[-1]) for x in (tokens, attention_mask, response_mask)]
    scores = rollout.reward_scores(params, config, flat[0], flat[1], prompt_len, flat[2], bias=bias)
    return (scores.reshape(tokens.shape[:-1]),)


# --------------------------------------------------------------------------------------------------
# Sampling and likelihoods


class Responses(NamedTuple):
    """Sampled responses: ``tokens`` [N R] (PAD after the first EOS) and ``mask`` [N R] (1
    through the first EOS inclusive)."""

    tokens: Int[np.ndarray, "N R"]
    mask: Int[np.ndarray, "N R"]


class BestOfN(NamedTuple):
    """The answers best-of-n kept: ``tokens``, ``mask`` [N R] and their RM ``scores`` [N]."""

    tokens: Int[np.ndarray, "N R"]
    mask: Int[np.ndarray, "N R"]
    scores: Float[np.ndarray, " N"]


def real_mask(tokens, mask, pad_id: int) -> np.ndarray:
    """``mask`` (1 on real tokens) as int32, or where ``tokens != pad_id`` when it is None. Pass
    the loaders' masks whenever a real token may equal the PAD id (most real tokenizers)."""
    if mask is None:
        return (np.asarray(tokens) != pad_id).astype(np.int32)
    return np.asarray(mask, np.int32)


def sample_responses(
    params,
    config: ModelConfig,
    prompts: Int[np.ndarray | Array, "N P"],
    *,
    prompt_mask: Shaped[np.ndarray | Array, "N P"] | None = None,
    rng: jax.Array,
    batch_size: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    greedy: bool = False,
) -> Responses:
    """One response per left-padded prompt, through ``rollout.sample`` in fixed-size batches.

    Batch ``i`` draws with ``fold_in(rng, i)``. Returns NumPy ``tokens`` [N R] (PAD after the first
    EOS) and ``mask`` [N R] (1 through the first EOS inclusive).
    """

    def draw(i, batch, batch_mask):
        out = rollout.sample(
            params,
            config,
            batch,
            batch_mask,
            jax.random.fold_in(rng, i),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            greedy=greedy,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        return out.tokens, out.mask

    arrays = (np.asarray(prompts, np.int32), real_mask(prompts, prompt_mask, pad_id))
    tokens, mask = batched(draw, arrays, batch_size)
    return Responses(tokens.astype(np.int32), mask.astype(np.int32))


def sampler_programs(config: Any, mesh, inputs: PlanInputs) -> list[Program]:
    """The evaluation's sampler (``sample_responses``: ``rollout.sample``'s prefill and decode
    loop) for a batch of ``eval.batch_size`` prompts, on abstract inputs: what ``rlhf-jax plan``
    compiles. The params are sharded as ``stages.lineage.load_policy`` places them; the prompts
    arrive as host arrays, which JAX replicates."""
    model = dataclasses.replace(config.model, dropout=0.0)
    params = abstract_with_shardings(
        abstract_params(model), params_shardings(model, mesh, config.mesh.rules)
    )
    B, P, R = config.eval.batch_size, config.data.prompt_len, config.data.response_len
    rep = sharding.replicated(mesh)
    prompts = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=rep)
    prefill_args = (params, model, prompts, prompts, R, inputs.pad_id)
    prefill = inputs.compile(rollout._prefill_jit.lower(*prefill_args))
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(
            lambda p, t, m: rollout.prefill(p, model, t, m, R, inputs.pad_id),
            params,
            prompts,
            prompts,
        ),
        prefill.output_shardings,
    )
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    decode_args = (params, model, state, key, rollout.Sampler(), inputs.eos_id, inputs.pad_id)
    prefill_work, decode_work = rollout_work(model, B, P, R)
    return [
        Program(
            "eval prefill",
            rollout._prefill_jit,
            prefill_args,
            B * P,
            (prefill_work,),
            "eval.batch_size",
            compiled=prefill,
        ),
        Program(
            "eval decode",
            rollout._decode_jit,
            decode_args,
            B * R,
            (decode_work,),
            "eval.batch_size",
        ),
    ]


def rollout_work(model: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> tuple:
    """The passes of sampling ``new_tokens`` for ``batch`` prompts (``stage_table.Pass``): the
    prefill over the prompts, then one decode step per new token over the KV cache."""
    T = prompt_len + new_tokens
    return (
        Pass(model, "forward", batch * prompt_len, prompt_len),
        Pass(model, "decode", batch * new_tokens, T, new_tokens),
    )


def sequence_logprob(
    params,
    config: ModelConfig,
    prompts: Int[np.ndarray | Array, "N P"],
    responses: Int[np.ndarray | Array, "N R"],
    response_mask: Shaped[np.ndarray | Array, "N R"],
    *,
    prompt_mask: Shaped[np.ndarray | Array, "N P"] | None = None,
    batch_size: int,
    pad_id: int,
    temperature: float = 1.0,
) -> Float[np.ndarray, " N"]:
    """``log pi_T(y | x) = sum_t mask_t * log pi_T(y_t | x, y_<t)``, teacher-forced [N]."""

    def score(_, p, pmask, y, m):
        return _sequence_logprob_jit(params, config, p, pmask, y, m, float(temperature))

    arrays = (np.asarray(prompts, np.int32), real_mask(prompts, prompt_mask, pad_id))
    arrays += tuple(np.asarray(a, np.int32) for a in (responses, response_mask))
    return batched(score, arrays, batch_size)[0].astype(np.float64)


def log_ratio(
    policy: tuple[Any, ModelConfig],
    reference: tuple[Any, ModelConfig],
    prompts: Int[np.ndarray | Array, "N P"],
    responses: Int[np.ndarray | Array, "N R"],
    response_mask: Shaped[np.ndarray | Array, "N R"],
    **kw,
) -> Float[np.ndarray, " N"]:
    """``log pi(y | x) - log pi_ref(y | x)`` per response, for ``policy = (params, config)`` and
    ``reference`` likewise (``kw`` as for ``sequence_logprob``).
    Its mean over samples of ``pi`` is the k1 estimate of KL(pi || pi_ref)."""
    sequences = (prompts, responses, response_mask)
    return sequence_logprob(*policy, *sequences, **kw) - sequence_logprob(
        *reference, *sequences, **kw
    )


def heldout_nll(
    params,
    config: ModelConfig,
    docs: Int[np.ndarray | Array, "M T"],
    *,
    mask: Shaped[np.ndarray | Array, "M T"] | None = None,
    batch_size: int,
    pad_id: int,
) -> float:
    """Mean next-token NLL (nats) over every predicted real token of the right-padded ``docs``.

    ``sum_{m, t >= 1, docs[m, t] real} -log pi(docs[m, t] | docs[m, <t]) / (number of such
    tokens)``: pooled over the corpus, so long documents weigh more (not a mean of batch means).
    """
    nll, count = batched(
        lambda _, d, m: _nll_rows_jit(params, config, d, m),
        (np.asarray(docs, np.int32), real_mask(docs, mask, pad_id)),
        batch_size,
    )
    total = int(count.sum())
    return float(nll.astype(np.float64).sum() / total) if total else float("nan")


def comparison_scores(
    reward: RewardModel,
    tokens: Int[np.ndarray | Array, "N K T"],
    attention_mask: Shaped[np.ndarray | Array, "N K T"],
    response_mask: Shaped[np.ndarray | Array, "N K T"],
    *,
    prompt_len: int,
    batch_size: int,
) -> Float[np.ndarray, "N K"]:
    """The ``reward`` model's normalised score (minus its bias) of every completion in the loaders'
    comparison layout (``[prompt P ; response R]`` per completion), in batches of ``batch_size``
    prompts."""
    arrays = tuple(np.asarray(a, np.int32) for a in (tokens, attention_mask, response_mask))
    params, model, bias = reward.params, reward.model, jnp.asarray(reward.bias, jnp.float32)
    (rewards,) = batched(
        lambda _, t, am, rm: _rm_scores_jit(params, model, t, am, rm, prompt_len, bias),
        arrays,
        batch_size,
    )
    return rewards


def response_scores(
    reward: RewardModel,
    prompts: Int[np.ndarray, "N P"],
    responses: Int[np.ndarray, "N R"],
    response_mask: Int[np.ndarray, "N R"],
    *,
    prompt_mask: Int[np.ndarray, "N P"] | None = None,
    batch_size: int,
    pad_id: int,
) -> Float[np.ndarray, " N"]:
    """The ``reward`` model's normalised score of each (left-padded prompt, response) pair."""
    prompt_mask = real_mask(prompts, prompt_mask, pad_id)
    tokens = np.concatenate([prompts, responses], axis=1)[:, None]
    attention = np.concatenate([prompt_mask, response_mask], axis=1)[:, None]
    full_response_mask = np.concatenate([np.zeros_like(prompt_mask), response_mask], axis=1)
    scores = comparison_scores(
        reward,
        tokens,
        attention,
        full_response_mask[:, None],
        prompt_len=prompts.shape[1],
        batch_size=batch_size,
    )
    return scores[:, 0].astype(np.float64)


def best_of_n(
    params,
    config: ModelConfig,
    prompts: Int[np.ndarray | Array, "N P"],
    *,
    n: int,
    reward: RewardModel,
    prompt_mask: Shaped[np.ndarray | Array, "N P"] | None = None,
    rng: jax.Array,
    batch_size: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> BestOfN:
    """Best-of-n sampling, a policy made at evaluation time from a policy and a reward model
    (Nakano et al. 2021; Stiennon et al. 2020): each prompt is answered ``n`` times at T = 1 and
    the answer that the ``reward`` model scores highest is kept (the first of equal
    scores). Prompt i's candidates are rows ``i n .. i n + n - 1`` of one ``sample_responses``
    call with ``rng``. Returns the kept ``tokens`` [N R], their ``mask`` [N R] and their scores
    [N]. Its KL to the sampling policy is ``best_of_n_kl(n)``."""
    prompts = np.asarray(prompts, np.int32)
    N = len(prompts)
    rows = np.repeat(prompts, n, axis=0)
    kw = dict(
        prompt_mask=np.repeat(real_mask(prompts, prompt_mask, pad_id), n, axis=0),
        batch_size=batch_size,
        pad_id=pad_id,
    )
    responses, mask = sample_responses(
        params, config, rows, rng=rng, max_new_tokens=max_new_tokens, eos_id=eos_id, **kw
    )
    scores = response_scores(reward, rows, responses, mask, **kw).reshape(N, n)
    best = np.argmax(scores, axis=1)
    pick = np.arange(N) * n + best
    return BestOfN(responses[pick], mask[pick], scores[np.arange(N), best])


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || policy) in nats per response, ``log n - (n - 1) / n``: the analytic value
    the best-of-n literature plots gold against (Stiennon et al. 2020; Gao et al. 2023), an upper
    bound on the exact KL, which Beirami et al. (2024) show to be close to it for continuous
    rewards."""
    return math.log(n) - (n - 1) / n


# --------------------------------------------------------------------------------------------------
# Reward model


def preferred_pairs(
    order: Shaped[np.ndarray | Array, "N K"],
    valid: Shaped[np.ndarray | Array, "N K"],
    *,
    lower_is_better: bool,
) -> Bool[np.ndarray, "N K K"]:
    """``pairs[n, i, j]``: completions i and j of prompt n are valid and i is preferred, by ranks
    (``lower_is_better``: rank 0 = best) or by scores (higher = better); ties are no pair."""
    o = np.asarray(order, np.float64)
    ok = np.asarray(valid) != 0
    better = o[:, :, None] < o[:, None, :] if lower_is_better else o[:, :, None] > o[:, None, :]
    return ok[:, :, None] & ok[:, None, :] & better


def pairwise_accuracy(
    rewards: Float[np.ndarray | Array, "N K"], pairs: Bool[np.ndarray, "N K K"]
) -> float:
    """Share of ``pairs`` (i preferred to j) whose reward orders them strictly right."""
    r = np.asarray(rewards, np.float64)
    right = r[:, :, None] > r[:, None, :]
    return float((right & pairs).sum() / pairs.sum()) if pairs.any() else float("nan")


def rm_metrics(
    rewards: Float[np.ndarray | Array, "N K"],
    ranks: Int[np.ndarray | Array, "N K"],
    valid: Shaped[np.ndarray | Array, "N K"],
    golds: Float[np.ndarray | Array, "N K"] | None = None,
) -> dict[str, float]:
    """Pairwise accuracy of given rewards against the comparisons' ranks, and the ranking loss.

    ``val_accuracy`` pools every pair (i, j) of valid completions of one prompt with ``ranks_i <
    ranks_j``; ``val_loss`` is ``losses.ranking_loss`` over all prompts at once (its mean over
    prompts with a pair); ``val_pairs`` counts the pairs. With a known gold reward of every
    completion (``golds``), the ranks are a noisy labelling of it: their accuracy and pairs are
    ``val_accuracy_noisy`` and ``val_pairs_noisy``, beside ``val_accuracy_gold`` and
    ``val_pairs_gold`` against gold order (a gold pair has ``gold_i > gold_j``).
    """
    pairs = preferred_pairs(ranks, valid, lower_is_better=True)
    loss, _ = losses.ranking_loss(
        jnp.asarray(rewards, jnp.float32),
        jnp.asarray(ranks, jnp.int32),
        valid=jnp.asarray(np.asarray(valid) != 0),
    )
    accuracy, n = pairwise_accuracy(rewards, pairs), int(pairs.sum())
    if golds is None:
        return {"val_accuracy": accuracy, "val_loss": float(loss), "val_pairs": n}
    gold = preferred_pairs(golds, valid, lower_is_better=False)
    return {
        "val_accuracy_noisy": accuracy,
        "val_accuracy_gold": pairwise_accuracy(rewards, gold),
        "val_loss": float(loss),
        "val_pairs_noisy": n,
        "val_pairs_gold": int(gold.sum()),
    }


# gold(prompt tokens [N P], response tokens [N R]) -> [N]: a known true reward (the world's).
Gold = Callable[[np.ndarray, np.ndarray], np.ndarray]


def comparison_metrics(
    comparisons: dict[str, np.ndarray],
    reward: RewardModel,
    *,
    prompt_len: int,
    batch_size: int,
    gold: Gold | None = None,
) -> dict[str, float]:
    """``rm_metrics`` of ``reward``'s scores of held-out comparisons in the loaders' layout
    (``tokens``, ``attention_mask``, ``response_mask`` [N K T]; ``ranks``, ``valid`` [N K]),
    against ``gold`` order too when given."""
    c, P = comparisons, prompt_len
    rewards = comparison_scores(
        reward,
        c["tokens"],
        c["attention_mask"],
        c["response_mask"],
        prompt_len=P,
        batch_size=batch_size,
    )
    golds = None
    if gold is not None:
        n, k, _ = c["tokens"].shape
        prompts = np.repeat(c["tokens"][:, :1, :P], k, 1).reshape(n * k, P)
        golds = gold(prompts, c["tokens"][:, :, P:].reshape(n * k, -1)).reshape(n, k)
    return rm_metrics(rewards, c["ranks"], c["valid"], golds)


# --------------------------------------------------------------------------------------------------
# One policy's evaluation without gold


class Reference(NamedTuple):
    """The policy another is compared with (the SFT model): its params and architecture, and its
    own ``[N, k]`` scores of the same prompts that paired statistics compare against (the RM's
    here, the gold's in the built-in world; None: compare the policy with itself)."""

    params: Any
    model: ModelConfig
    baseline: np.ndarray | None = None


@dataclasses.dataclass
class PolicyEval:
    """One policy on the held-out prompts; ``summary()`` is its JSON-ready row."""

    name: str
    rm_scores: np.ndarray | None  # [N, k] normalised RM score of the k samples per prompt
    eos: np.ndarray  # [N, k] whether each sample ended with EOS
    lengths: np.ndarray  # [N, k] response tokens, EOS included
    heldout_nll: float
    rm_vs_sft: Paired | None
    kl_to_sft: float | None
    prompts: np.ndarray  # [N P] the test prompts
    responses: np.ndarray  # [N k, R] every sample: prompt i's are rows i k .. i k + k - 1
    response_mask: np.ndarray  # [N k, R]

    @property
    def samples_per_prompt(self) -> int:
        return int(self.eos.shape[1])

    def first(self) -> Responses:
        """The first sample of each prompt: [N R]."""
        k = self.samples_per_prompt
        return Responses(self.responses[::k], self.response_mask[::k])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.rm_scores is not None:
            mean, lo, hi = mean_ci95(per_prompt(self.rm_scores))
            out.update(rm_score_mean=mean, rm_score_ci95=[lo, hi])
        if self.rm_vs_sft is not None:
            (win, wlo, whi), (gain, glo, ghi) = self.rm_vs_sft.win_rate, self.rm_vs_sft.gain
            out.update(
                rm_win_rate_vs_sft=win,
                rm_win_rate_ci95=[wlo, whi],
                rm_gain_vs_sft=gain,
                rm_gain_ci95=[glo, ghi],
            )
        out.update(
            kl_to_sft=self.kl_to_sft,
            heldout_nll=self.heldout_nll,
            eos_rate=float(self.eos.mean()),
            response_length=float(self.lengths.mean()),
            n_prompts=len(self.eos),
            samples_per_prompt=int(self.eos.shape[1]),
        )
        return jsonable(out)


def evaluate_policy(
    name: str,
    params,
    config: ModelConfig,
    test_prompts: Int[np.ndarray | Array, "N P"],
    *,
    prompt_mask: Shaped[np.ndarray | Array, "N P"] | None = None,
    rng: jax.Array,
    batch_size: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    reward: RewardModel | None = None,
    reference: Reference | None = None,
    heldout_docs: Int[np.ndarray | Array, "M T"] | None = None,
    heldout_mask: Shaped[np.ndarray | Array, "M T"] | None = None,
    samples_per_prompt: int = 1,
    best_of: int = 1,
) -> PolicyEval:
    """Everything measurable about one policy without a gold reward (see the module docstring).

    Each test prompt is answered ``samples_per_prompt`` (k) times at T = 1. ``reward`` scores the
    samples with the RM; ``reference`` adds the KL to the reference policy and, with the
    reference's own ``[N, k]`` RM scores as its ``baseline`` (from its ``evaluate_policy`` with the
    same ``rng``), the paired RM win rate and gain; a ``None`` baseline compares the policy with
    itself (win rate 0.5, gain 0). ``heldout_docs`` adds the
    held-out NLL. The masks are 1 on real tokens (default: tokens that are not ``pad_id``).
    ``best_of = n > 1`` evaluates best-of-n of ``params`` by ``reward`` instead (``best_of_n``):
    every answer is the RM's pick of n; the KL reported is ``best_of_n_kl(n)``, its KL to
    ``params``, which is the KL to the reference in the usual case of best-of-n of the reference
    itself; its held-out NLL is that of ``params``, whose weights it leaves unchanged. Its RM
    score is the picking RM's own, so it flatters it.
    """
    test_prompts = np.asarray(test_prompts, np.int32)
    n, k = len(test_prompts), samples_per_prompt
    # prompt i's samples are rows i*k .. i*k+k-1
    prompts = np.repeat(test_prompts, k, axis=0)
    kw = dict(
        batch_size=batch_size,
        pad_id=pad_id,
        prompt_mask=np.repeat(real_mask(test_prompts, prompt_mask, pad_id), k, axis=0),
    )
    draw = dict(rng=rng, max_new_tokens=max_new_tokens, eos_id=eos_id, **kw)
    scores = None
    if best_of > 1:
        if reward is None:
            raise ValueError("evaluate_policy: best_of > 1 needs the reward model that picks")
        responses, mask, scores = best_of_n(
            params, config, prompts, n=best_of, reward=reward, **draw
        )
    else:
        responses, mask = sample_responses(params, config, prompts, **draw)
        if reward is not None:
            scores = response_scores(reward, prompts, responses, mask, **kw)
    eos = np.any((responses == eos_id) & (mask > 0), axis=1).reshape(n, k)
    scores = None if scores is None else np.asarray(scores, np.float64).reshape(n, k)
    nll = float("nan")
    if heldout_docs is not None:
        nll = heldout_nll(
            params, config, heldout_docs, mask=heldout_mask, batch_size=batch_size, pad_id=pad_id
        )
    vs_sft, kl = None, None
    if reference is not None:
        if best_of > 1:
            kl = best_of_n_kl(best_of)
        else:
            pair = ((params, config), (reference.params, reference.model))
            kl = float(np.mean(log_ratio(*pair, prompts, responses, mask, **kw)))
        if scores is not None:
            baseline = reference.baseline
            vs_sft = paired(scores, scores if baseline is None else baseline)
    return PolicyEval(
        name=name,
        rm_scores=scores,
        eos=eos,
        lengths=mask.sum(axis=1).reshape(n, k),
        heldout_nll=nll,
        rm_vs_sft=vs_sft,
        kl_to_sft=kl,
        prompts=test_prompts,
        responses=responses,
        response_mask=mask,
    )


def generate_text(
    params,
    config: ModelConfig,
    tokenizer,
    prompt: str,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
) -> str:
    """One response to a text prompt, decoded with ``tokenizer`` (a HF tokenizer)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    tokens = np.asarray([ids], np.int32)
    out = rollout.sample(
        params,
        config,
        tokens,
        np.ones_like(tokens),
        rng,
        temperature=temperature,
        greedy=greedy,
        max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id or 0,
    )
    n = int(np.asarray(out.mask).sum())
    return tokenizer.decode(np.asarray(out.tokens[0, :n]).tolist())
