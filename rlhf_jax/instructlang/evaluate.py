"""Gold evaluation on the built-in world: the library's evaluation, with the gold reward added.

What docs/instructlang.md section 0 asks each model's row of the report to hold: gold reward of k
T = 1 samples per test prompt (``eval.samples_per_prompt``) with a 95% interval over prompts, the
paired gold gain over the SFT model (with its interval: the per-prompt differences share the
prompt, so it is far tighter than the two gold intervals side by side), paired win rate and KL
against the SFT model, held-out pretraining NLL (the alignment tax), fact-probe accuracy, EOS
rate and the Table-3-style metadata; plus the reward model's validation accuracy against the noisy
labels and against gold order, and how often it orders the SFT model's own answers to one test
prompt like the gold does. Each row also holds the RM's mean score of the model's answers, so the
proxy and the gold can be read side by side.

Sampling, likelihoods, RM scores, intervals and paired statistics are the library's
(``rlhf_jax.evaluate.evaluate_policy``, ``rlhf_jax.stats``): ``evaluate_model`` judges the very
samples the library draws by the gold as well. ``GoldEvaluator`` is the library's run evaluator
(``rlhf_jax.evaluator.Evaluator``) with the gold added; ``evaluate_run(config, workdir,
GoldEvaluator)`` gives the report's table and ``evaluate_stage`` one row (``rlhf-jax eval``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jaxtyping import Array, Bool, Int, Shaped

from rlhf_jax import evaluate as ev
from rlhf_jax import evaluator, stats
from rlhf_jax.config import ModelConfig
from rlhf_jax.instructlang import corpus, datasets, lang
from rlhf_jax.instructlang.config import InstructLangConfig, require_world
from rlhf_jax.rollout import RewardModel
from rlhf_jax.stages.lineage import load_reward_model

# The world's special ids, as every model call here needs them.
IDS = dict(eos_id=lang.EOS_ID, pad_id=lang.PAD_ID)


def fact_scores(
    outputs: Int[np.ndarray, "N A"], answers: Int[np.ndarray, "N 2"]
) -> Bool[np.ndarray, " N"]:
    """Per probe: the first two generated tokens equal the KB pair (the scoring of E1)."""
    outputs = np.asarray(outputs)
    if outputs.shape[1] < 2:
        return np.zeros(len(outputs), bool)
    return np.all(outputs[:, :2] == np.asarray(answers), axis=1)


def fact_accuracy(params, config: ModelConfig, world: lang.World, *, batch_size: int) -> float:
    """Share of the 32 fact probes ``BOS c_i IS`` whose greedy 2-token answer is the KB pair."""
    probes, answers = corpus.fact_probes(world)
    outputs, _ = ev.sample_responses(
        params,
        config,
        probes,
        rng=jax.random.key(0),  # unused by greedy decoding
        batch_size=min(batch_size, len(probes)),  # always 32 probes: no need for bigger batches
        max_new_tokens=2,
        greedy=True,
        **IDS,
    )
    return float(np.mean(fact_scores(outputs, answers)))


# --------------------------------------------------------------------------------------------------
# One model's evaluation

# Below this KL (nats per response) gold per nat is not reported: the k1 estimate's noise is of
# this order, and gain / KL of two near-zero numbers means nothing.
MIN_KL_FOR_RATIO = 0.01


def gain_per_nat(gain: float | None, kl: float | None) -> float | None:
    """Paired gold gain over SFT per nat of KL to SFT: what a method buys for its drift."""
    if gain is None or kl is None or not kl >= MIN_KL_FOR_RATIO:
        return None
    return gain / kl


@dataclasses.dataclass
class ModelEval:
    """One model's evaluation; ``summary()`` is its JSON-ready row of the report."""

    name: str
    golds: np.ndarray  # [N, k] gold of the k samples per test prompt
    metadata: dict[str, float]  # lang.metadata_means
    pretrain_nll: float
    fact_accuracy: float
    win_rate_vs_sft: stats.Interval | None
    gold_gain_vs_sft: stats.Interval | None  # paired gold - SFT gold
    kl_to_sft: float | None
    prompt_texts: list[str]
    response_texts: list[str]
    rm_scores: np.ndarray | None = None  # [N, k] the RM's score of each sample (None: no RM)

    @property
    def gold_ci95(self) -> stats.Interval:
        return stats.mean_ci95(stats.per_prompt(self.golds))

    def summary(self) -> dict[str, Any]:
        """Plain floats (NaN as None): the report's and ``summary.json``'s entry for this model."""
        mean, lo, hi = self.gold_ci95
        win, gain = self.win_rate_vs_sft, self.gold_gain_vs_sft
        out = {
            "gold_mean": mean,
            "gold_ci95": [lo, hi],
            "win_rate_vs_sft": None if win is None else win.value,
            "win_rate_ci95": None if win is None else [win.lo, win.hi],
            "gold_gain_vs_sft": None if gain is None else gain.value,
            "gold_gain_ci95": None if gain is None else [gain.lo, gain.hi],
            "kl_to_sft": self.kl_to_sft,
            "rm_score": None if self.rm_scores is None else float(np.mean(self.rm_scores)),
            "gold_gain_per_nat": gain_per_nat(None if gain is None else gain.value, self.kl_to_sft),
            "pretrain_nll": self.pretrain_nll,
            "fact_accuracy": self.fact_accuracy,
            "eos_rate": self.metadata["eos"],
            "n_prompts": len(self.golds),
            "samples_per_prompt": int(self.golds.shape[1]),
        }
        out.update({k: v for k, v in self.metadata.items() if k not in ("gold", "eos")})
        return stats.jsonable(out)

    def samples(self, k: int) -> list[dict[str, Any]]:
        """The first ``k`` test prompts with this model's response (through EOS) and its gold."""
        return [
            {"model": self.name, "prompt": p, "response": r, "gold": float(g)}
            for p, r, g in zip(self.prompt_texts[:k], self.response_texts[:k], self.golds[:k, 0])
        ]


def _texts(prompts: np.ndarray, responses: np.ndarray, mask: np.ndarray) -> tuple[list, list]:
    prompt_texts = [lang.decode_text(corpus.unpad(p)) for p in prompts]
    # The mask runs through the first EOS, so this keeps a PAD the model itself generated.
    response_texts = [lang.decode_text(r[: int(m.sum())]) for r, m in zip(responses, mask)]
    return prompt_texts, response_texts


def evaluate_model(
    name: str,
    params,
    config: ModelConfig,
    world: lang.World,
    test_prompts: Int[np.ndarray | Array, "N P"],
    heldout_docs: Int[np.ndarray | Array, "M T"] | None,
    *,
    rng: jax.Array,
    batch_size: int,
    max_new_tokens: int,
    reference: ev.Reference | None = None,
    samples_per_prompt: int = 1,
    reward: RewardModel | None = None,
    best_of: int = 1,
    prompt_mask: Shaped[np.ndarray | Array, "N P"] | None = None,
    heldout_mask: Shaped[np.ndarray | Array, "M T"] | None = None,
) -> ModelEval:
    """Everything the report needs about one model (see the module docstring).

    The library's ``evaluate_policy`` draws and measures the samples (RM scores, KL, held-out
    NLL, best-of-n); this adds their gold, metadata and paired gold statistics, and the model's
    fact accuracy. Each test prompt is answered ``samples_per_prompt`` (k) times; its gold is the
    mean of its k samples, and every interval is over prompts. Use the same ``rng`` for every
    model, so all models answer the same prompts with the same random stream (common random
    numbers). ``reference`` (the SFT model, its architecture and its ``[N, k]`` golds as the
    ``baseline``) adds the paired win rate, the paired gold gain and the KL to it; a ``None``
    baseline evaluates the model against itself (win rate 0.5, gain and KL 0 exactly, computed all
    the same as a check). ``reward`` adds the RM's score of every answer (``rm_scores``,
    normalised so that the demonstrations score 0), and with ``best_of = n > 1`` evaluates
    best-of-n of ``params`` instead (``rlhf_jax.evaluate.best_of_n``): each answer is the RM's
    pick of n, the KL is ``best_of_n_kl(n)`` (its KL to ``params``: pass the SFT model), and the
    pretraining NLL and fact accuracy are those of ``params``, whose weights it does not change.
    """
    if best_of > 1 and reward is None:
        raise ValueError("evaluate_model: best_of > 1 needs the reward model that picks")
    result = ev.evaluate_policy(
        name,
        params,
        config,
        test_prompts,
        prompt_mask=prompt_mask,
        rng=rng,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        reward=reward,
        # The library pairs by RM scores; the gold pairing is below.
        reference=None if reference is None else reference._replace(baseline=None),
        heldout_docs=heldout_docs,
        heldout_mask=heldout_mask,
        samples_per_prompt=samples_per_prompt,
        best_of=best_of,
        **IDS,
    )
    n, k = len(result.prompts), samples_per_prompt
    prompts = np.repeat(result.prompts, k, axis=0)  # prompt i's samples are rows i*k .. i*k+k-1
    golds = lang.gold_rewards(prompts, result.responses, world=world).reshape(n, k)
    meta = lang.metadata_means(lang.response_metadata(prompts, result.responses, world=world))
    win = gain = None
    if reference is not None:
        win, gain = stats.paired(golds, golds if reference.baseline is None else reference.baseline)
    prompt_texts, response_texts = _texts(result.prompts, *result.first())
    return ModelEval(
        name=name,
        golds=golds,
        metadata=meta,
        pretrain_nll=result.heldout_nll,
        fact_accuracy=fact_accuracy(params, config, world, batch_size=batch_size),
        win_rate_vs_sft=win,
        gold_gain_vs_sft=gain,
        kl_to_sft=result.kl_to_sft,
        prompt_texts=prompt_texts,
        response_texts=response_texts,
        rm_scores=result.rm_scores,
    )


def within_prompt_accuracy(result: ModelEval) -> dict[str, float | int]:
    """How often the RM orders two answers of one model to the same test prompt like the gold
    (pairs of distinct gold among its k samples). RL rewards the policy's own answers, so this,
    not the validation accuracy (where base-model answers make many pairs easy), says how well
    the RM tells a better answer of the policy from a worse one."""
    pairs = ev.preferred_pairs(result.golds, np.ones_like(result.golds), lower_is_better=False)
    return {
        "sft_pairs_accuracy_gold": ev.pairwise_accuracy(result.rm_scores, pairs),
        "sft_pairs": int(pairs.sum()),
    }


# --------------------------------------------------------------------------------------------------
# A run's models


def gold_fn(config: InstructLangConfig) -> ev.Gold:
    """The world's gold reward of (prompt tokens [N P], response tokens [N R]) -> [N]."""
    world = datasets.world(config)
    return lambda prompts, responses: lang.gold_rewards(prompts, responses, world=world)


class GoldEvaluator(evaluator.Evaluator):
    """The library's run evaluator on the built-in world: every model judged by the gold too,
    and the RM against gold order (``rlhf_jax.evaluator.Evaluator``)."""

    def __init__(self, config: InstructLangConfig, workdir, mesh=None):
        self.world, self.gold = datasets.world(require_world(config)), gold_fn(config)
        super().__init__(config, workdir, mesh)

    def baseline(self, result: ModelEval) -> np.ndarray:
        return result.golds

    def evaluate(
        self, name: str, params, reference: ev.Reference | None = None, best_of: int = 1
    ) -> ModelEval:
        kw = self._policy_kw(reference, best_of)
        for key in ("config", "eos_id", "pad_id"):
            del kw[key]
        return evaluate_model(
            name,
            params,
            self.model,
            self.world,
            kw.pop("test_prompts"),
            kw.pop("heldout_docs"),
            **kw,
        )

    def rm_summary(self) -> dict:
        return {**super().rm_summary(), **within_prompt_accuracy(self.sft_eval)}

    def samples(self, result: ModelEval, k: int) -> list[dict]:
        return result.samples(k)


def rm_summary(config: InstructLangConfig, workdir, mesh) -> dict:
    """PPO's RM (``ppo.reward_from``, else the run's rm stage) on the validation comparisons:
    accuracy against the noisy labels and against gold order, ranking loss, bias."""
    reward = load_reward_model(config, workdir, mesh)
    return evaluator.reward_summary(config, workdir, reward, gold_fn(config))
