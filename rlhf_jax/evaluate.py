"""Evaluation of a policy (or any checkpoint) on the built-in InstructLang world.

What INSTRUCTLANG.md section 0 asks each model's row of the report to hold: gold reward of k
T = 1 samples per test prompt (``eval.samples_per_prompt``) with a 95% interval over prompts, the
paired gold gain over the SFT model (with its interval: the per-prompt differences share the
prompt, so it is far tighter than the two gold intervals side by side), paired win rate and KL
against the SFT model, held-out pretraining NLL (the alignment tax), fact-probe accuracy, EOS
rate and the Table-3-style metadata; plus the reward model's validation accuracy against noisy and
gold order.

Model work goes through a few module-level jitted functions with the config static, so each model
shape compiles once per batch shape; every batched loop pads its last batch to a full one (and
drops the padding rows), so shapes never change. The scoring of what the models produced (fact
answers, RM pairwise accuracy, win rates, intervals) is pure NumPy, testable without a model.

Choices the spec leaves open:

- Intervals are normal approximations, ``mean +- 1.96 * sd / sqrt(n)`` with the sample sd
  (ddof = 1); a single observation gives a zero-width interval.
- ``kl_to_sft`` is the mean over this model's own T = 1 samples of ``sum_t log pi(y_t) - log
  pi_sft(y_t)``, the unbiased "k1" estimate of KL(pi || pi_sft) per response; it can come out
  slightly negative by sampling noise when the two policies are close.
- RM pairwise accuracy counts a pair as right only when the preferred completion scores strictly
  higher (a reward tie is wrong), as ``losses.ranking_loss`` does; pairs are pooled over prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Shaped

from rlhf_jax import losses, rollout
from rlhf_jax.config import ModelConfig
from rlhf_jax.data import instructlang as il
from rlhf_jax.data import instructlang_corpus as corpus
from rlhf_jax.model import Transformer

Z95 = 1.96


# --------------------------------------------------------------------------------------------------
# Batching and the jitted model calls (one compilation per config and batch shape)


def _batched(fn, arrays: tuple[np.ndarray, ...], batch_size: int) -> list[np.ndarray]:
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
def _sequence_logprob_jit(params, config, prompts, prompt_mask, responses, resp_mask, temperature):
    tokens, mask = rollout.full_sequence(prompts, prompt_mask, responses, resp_mask)
    logp = rollout.response_logprobs(
        params, config, tokens, mask, prompts.shape[1], temperature=temperature
    )
    return (jnp.sum(jnp.where(resp_mask > 0, logp, 0.0), axis=-1),)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _nll_rows_jit(params, config, docs, pad_id):
    real = (docs != pad_id).astype(jnp.int32)
    logits = Transformer(config).apply({"params": params}, docs, real)
    # sft_loss convention: logits[:, t] predicts docs[:, t + 1]; nothing predicts the first token.
    logp = losses.token_logprobs(logits[:, :-1], docs[:, 1:])
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


def sample_responses(
    params,
    config: ModelConfig,
    prompts: Int[np.ndarray | Array, "N P"],
    *,
    rng: jax.Array,
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    eos_id: int = il.EOS_ID,
    pad_id: int = il.PAD_ID,
) -> tuple[Int[np.ndarray, "N R"], Int[np.ndarray, "N R"]]:
    """One response per left-padded prompt, through ``rollout.sample`` in fixed-size batches.

    Batch ``i`` draws with ``fold_in(rng, i)``. Returns NumPy ``tokens`` [N R] (PAD after the first
    EOS) and ``mask`` [N R] (1 through the first EOS inclusive).
    """

    def draw(i, batch):
        out = rollout.sample(
            params,
            config,
            batch,
            (batch != pad_id).astype(np.int32),
            jax.random.fold_in(rng, i),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            greedy=greedy,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        return out.tokens, out.mask

    tokens, mask = _batched(draw, (np.asarray(prompts, np.int32),), batch_size)
    return tokens.astype(np.int32), mask.astype(np.int32)


def sequence_logprob(
    params,
    config: ModelConfig,
    prompts: Int[np.ndarray | Array, "N P"],
    responses: Int[np.ndarray | Array, "N R"],
    resp_mask: Shaped[np.ndarray | Array, "N R"],
    *,
    batch_size: int,
    temperature: float = 1.0,
    pad_id: int = il.PAD_ID,
) -> Float[np.ndarray, " N"]:
    """``log pi_T(y | x) = sum_t resp_mask_t * log pi_T(y_t | x, y_<t)``, teacher-forced [N]."""

    def score(_, p, y, m):
        pmask = (p != pad_id).astype(np.int32)
        return _sequence_logprob_jit(params, config, p, pmask, y, m, float(temperature))

    arrays = tuple(np.asarray(a, np.int32) for a in (prompts, responses, resp_mask))
    return _batched(score, arrays, batch_size)[0].astype(np.float64)


def heldout_nll(
    params,
    config: ModelConfig,
    docs: Int[np.ndarray | Array, "M T"],
    *,
    batch_size: int,
    pad_id: int = il.PAD_ID,
) -> float:
    """Mean next-token NLL (nats) over every predicted real token of the right-padded ``docs``.

    ``sum_{m, t >= 1, docs[m, t] real} -log pi(docs[m, t] | docs[m, <t]) / (number of such
    tokens)``: pooled over the corpus, so long documents weigh more (not a mean of batch means).
    """
    nll, count = _batched(
        lambda _, d: _nll_rows_jit(params, config, d, pad_id),
        (np.asarray(docs, np.int32),),
        batch_size,
    )
    total = int(count.sum())
    return float(nll.astype(np.float64).sum() / total) if total else float("nan")


def fact_scores(
    outputs: Int[np.ndarray, "N A"], answers: Int[np.ndarray, "N 2"]
) -> Bool[np.ndarray, " N"]:
    """Per probe: the first two generated tokens equal the KB pair (the scoring of E1)."""
    outputs = np.asarray(outputs)
    if outputs.shape[1] < 2:
        return np.zeros(len(outputs), bool)
    return np.all(outputs[:, :2] == np.asarray(answers), axis=1)


def fact_accuracy(params, config: ModelConfig, world: il.World, *, batch_size: int) -> float:
    """Share of the 32 fact probes ``BOS c_i IS`` whose greedy 2-token answer is the KB pair."""
    probes, answers = corpus.fact_probes(world)
    outputs, _ = sample_responses(
        params,
        config,
        probes,
        rng=jax.random.key(0),  # unused by greedy decoding
        batch_size=min(batch_size, len(probes)),  # always 32 probes: no need for bigger batches
        max_new_tokens=2,
        greedy=True,
    )
    return float(np.mean(fact_scores(outputs, answers)))


# --------------------------------------------------------------------------------------------------
# Statistics


def mean_ci95(x) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` with ``lo, hi = mean -+ 1.96 * sd / sqrt(n)`` (sample sd, ddof = 1)."""
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size == 0:
        return (float("nan"),) * 3
    mean = float(x.mean())
    half = Z95 * float(x.std(ddof=1)) / math.sqrt(x.size) if x.size > 1 else 0.0
    return mean, mean - half, mean + half


def per_prompt(x) -> np.ndarray:
    """[N] per-prompt means of golds (or outcomes) shaped [N] or [N, k samples per prompt]."""
    x = np.asarray(x, np.float64)
    return x.reshape(len(x), -1).mean(axis=1)


def win_rate(gold_a, gold_b) -> tuple[float, float, float]:
    """Paired win rate of a over b, with its CI over prompts: each pair of samples scores 1 if a >
    b, 0.5 if equal, 0 if less; golds are [N] or [N, k] (the k pairs of a prompt are averaged)."""
    a, b = np.asarray(gold_a, np.float64), np.asarray(gold_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_rate needs paired golds, got shapes {a.shape} and {b.shape}")
    return mean_ci95(per_prompt(np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))))


# --------------------------------------------------------------------------------------------------
# One model's evaluation


class Reference(NamedTuple):
    """The SFT baseline: its params, its per-test-prompt golds (``None``: this model's own, for
    evaluating the SFT model against itself) and its config (``None``: the evaluated model's)."""

    params: Any
    golds: np.ndarray | None = None
    config: ModelConfig | None = None


def _none_if_nan(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclasses.dataclass
class ModelEval:
    """One model's evaluation; ``summary()`` is its JSON-ready row of the report."""

    name: str
    golds: np.ndarray  # [N, k] gold of the k samples per test prompt
    metadata: dict[str, float]  # instructlang.metadata_means
    pretrain_nll: float
    fact_accuracy: float
    win_rate_vs_sft: tuple[float, float, float] | None  # (rate, lo, hi)
    gold_gain_vs_sft: tuple[float, float, float] | None  # paired gold - SFT gold: (mean, lo, hi)
    kl_to_sft: float | None
    prompt_texts: list[str]
    response_texts: list[str]

    @property
    def gold_ci95(self) -> tuple[float, float, float]:
        return mean_ci95(per_prompt(self.golds))

    def summary(self) -> dict[str, Any]:
        """Plain floats (NaN as None): the report's and ``summary.json``'s entry for this model."""
        mean, lo, hi = self.gold_ci95
        win, gain = self.win_rate_vs_sft, self.gold_gain_vs_sft
        out = {
            "gold_mean": mean,
            "gold_ci95": [lo, hi],
            "win_rate_vs_sft": None if win is None else win[0],
            "win_rate_ci95": None if win is None else [win[1], win[2]],
            "gold_gain_vs_sft": None if gain is None else gain[0],
            "gold_gain_ci95": None if gain is None else [gain[1], gain[2]],
            "kl_to_sft": self.kl_to_sft,
            "pretrain_nll": self.pretrain_nll,
            "fact_accuracy": self.fact_accuracy,
            "eos_rate": self.metadata["eos"],
            "n_prompts": len(self.golds),
            "samples_per_prompt": int(self.golds.shape[1]),
        }
        out.update({k: v for k, v in self.metadata.items() if k not in ("gold", "eos")})
        return {k: _none_if_nan(v) if isinstance(v, float) else v for k, v in out.items()}

    def samples(self, k: int) -> list[dict[str, Any]]:
        """The first ``k`` test prompts with this model's response (through EOS) and its gold."""
        return [
            {"model": self.name, "prompt": p, "response": r, "gold": float(g)}
            for p, r, g in zip(self.prompt_texts[:k], self.response_texts[:k], self.golds[:k, 0])
        ]


def _texts(prompts: np.ndarray, responses: np.ndarray, mask: np.ndarray) -> tuple[list, list]:
    prompt_texts = [il.decode_text(corpus.unpad(p)) for p in prompts]
    # The mask runs through the first EOS, so this keeps a PAD the model itself generated.
    response_texts = [il.decode_text(r[: int(m.sum())]) for r, m in zip(responses, mask)]
    return prompt_texts, response_texts


def evaluate_model(
    name: str,
    params,
    config: ModelConfig,
    world: il.World,
    test_prompts: Int[np.ndarray | Array, "N P"],
    heldout_docs: Int[np.ndarray | Array, "M T"] | None,
    *,
    rng: jax.Array,
    batch_size: int,
    max_new_tokens: int,
    reference: tuple | None = None,
    samples_per_prompt: int = 1,
) -> ModelEval:
    """Everything the report needs about one model (see the module docstring).

    Each test prompt is answered ``samples_per_prompt`` (k) times; its gold is the mean of its k
    samples, and every interval is over prompts. Use the same ``rng`` for every model, so all
    models answer the same prompts with the same random stream (common random numbers: the
    paired differences then hold far less sampling noise than two independent estimates).
    ``reference = (sft_params, sft_golds[, sft_config])`` adds the paired win rate, the paired
    gold gain and the KL to the SFT model; pass ``(sft_params, None)`` to evaluate the
    SFT model against itself (win rate 0.5, gain and KL 0 exactly, computed all the same as a
    check).
    """
    test_prompts = np.asarray(test_prompts, np.int32)
    kw = dict(batch_size=batch_size)
    n, k = len(test_prompts), samples_per_prompt
    prompts = np.repeat(test_prompts, k, axis=0)  # prompt i's samples are rows i*k .. i*k+k-1
    responses, mask = sample_responses(
        params, config, prompts, rng=rng, max_new_tokens=max_new_tokens, **kw
    )
    golds = il.gold_rewards(prompts, responses, world=world).reshape(n, k)
    meta = il.metadata_means(il.response_metadata(prompts, responses, world=world))
    no_docs = heldout_docs is None
    nll = float("nan") if no_docs else heldout_nll(params, config, heldout_docs, **kw)

    win, gain, kl = None, None, None
    if reference is not None:
        ref = Reference(*reference)
        ref_golds = golds if ref.golds is None else np.asarray(ref.golds)
        win = win_rate(golds, ref_golds)
        gain = mean_ci95(per_prompt(golds - ref_golds))
        logp = sequence_logprob(params, config, prompts, responses, mask, **kw)
        ref_cfg = ref.config or config
        ref_logp = sequence_logprob(ref.params, ref_cfg, prompts, responses, mask, **kw)
        kl = float(np.mean(logp - ref_logp))

    prompt_texts, response_texts = _texts(test_prompts, responses[::k], mask[::k])
    return ModelEval(
        name=name,
        golds=golds,
        metadata=meta,
        pretrain_nll=nll,
        fact_accuracy=fact_accuracy(params, config, world, **kw),
        win_rate_vs_sft=win,
        gold_gain_vs_sft=gain,
        kl_to_sft=kl,
        prompt_texts=prompt_texts,
        response_texts=response_texts,
    )


# --------------------------------------------------------------------------------------------------
# Reward model


def rm_metrics(
    rewards: Float[np.ndarray | Array, "N K"],
    ranks: Int[np.ndarray | Array, "N K"],
    valid: Shaped[np.ndarray | Array, "N K"],
    golds: Float[np.ndarray | Array, "N K"],
) -> dict[str, float]:
    """Pairwise accuracy of given rewards against noisy ranks and gold order, and the ranking loss.

    A pair (i, j) of valid completions of one prompt counts for ``val_accuracy_noisy`` when
    ``ranks_i < ranks_j`` (i preferred) and for ``val_accuracy_gold`` when ``gold_i > gold_j``; it
    is right when ``r_i > r_j`` strictly. Accuracies pool all pairs; ``val_loss`` is
    ``losses.ranking_loss`` over all prompts at once (its mean over prompts with a pair).
    """
    r = np.asarray(rewards, np.float64)
    ok = np.asarray(valid) != 0
    both = ok[:, :, None] & ok[:, None, :]
    right = r[:, :, None] > r[:, None, :]
    ranks = np.asarray(ranks)
    golds = np.asarray(golds, np.float64)
    noisy = both & (ranks[:, :, None] < ranks[:, None, :])
    gold = both & (golds[:, :, None] > golds[:, None, :])
    loss, _ = losses.ranking_loss(
        jnp.asarray(rewards, jnp.float32), jnp.asarray(ranks, jnp.int32), valid=jnp.asarray(ok)
    )

    def acc(pairs: np.ndarray) -> float:
        return float((right & pairs).sum() / pairs.sum()) if pairs.any() else float("nan")

    return {
        "val_accuracy_noisy": acc(noisy),
        "val_accuracy_gold": acc(gold),
        "val_loss": float(loss),
        "val_pairs_noisy": int(noisy.sum()),
        "val_pairs_gold": int(gold.sum()),
    }


def rm_accuracy(
    rm_params,
    rm_config: ModelConfig,
    bias,
    tokens: Int[np.ndarray | Array, "N K T"],
    attention_mask: Shaped[np.ndarray | Array, "N K T"],
    response_mask: Shaped[np.ndarray | Array, "N K T"],
    ranks: Int[np.ndarray | Array, "N K"],
    valid: Shaped[np.ndarray | Array, "N K"],
    golds: Float[np.ndarray | Array, "N K"],
    *,
    prompt_len: int,
    batch_size: int,
) -> dict[str, float]:
    """RM validation metrics on the loaders' comparison layout (``[prompt P ; response R]`` per
    completion): ``rollout.reward_scores`` of every completion (minus ``bias``), in batches of
    ``batch_size`` prompts, then ``rm_metrics``."""
    arrays = tuple(np.asarray(a, np.int32) for a in (tokens, attention_mask, response_mask))
    bias = jnp.asarray(bias, jnp.float32)
    (rewards,) = _batched(
        lambda _, t, am, rm: _rm_scores_jit(rm_params, rm_config, t, am, rm, prompt_len, bias),
        arrays,
        batch_size,
    )
    return rm_metrics(rewards, ranks, valid, golds)
