"""Gold evaluation on the built-in world: one policy, the RM, and every model of a run.

What docs/instructlang.md section 0 asks each model's row of the report to hold: gold reward of k
T = 1 samples per test prompt (``eval.samples_per_prompt``) with a 95% interval over prompts, the
paired gold gain over the SFT model (with its interval: the per-prompt differences share the
prompt, so it is far tighter than the two gold intervals side by side), paired win rate and KL
against the SFT model, held-out pretraining NLL (the alignment tax), fact-probe accuracy, EOS
rate and the Table-3-style metadata; plus the reward model's validation accuracy against the noisy
labels and against gold order, and how often it orders the SFT model's own answers to one test
prompt like the gold does. Each row also holds the RM's mean score of the model's answers, so the
proxy and the gold can be read side by side. Sampling, likelihoods, intervals and paired
statistics are the library's (``rlhf_jax.evaluate`` and ``rlhf_jax.stats``); this module adds the
gold.
``evaluate_all`` evaluates a run's models against its SFT model (the report's table) and
``evaluate_stage`` one of them (``rlhf-jax eval``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Shaped

from rlhf_jax import evaluate as ev
from rlhf_jax import sharding, stats
from rlhf_jax.config import ModelConfig
from rlhf_jax.instructlang import corpus, datasets, lang
from rlhf_jax.instructlang.config import InstructLangConfig, require_world
from rlhf_jax.stages.driver import loader, read_all
from rlhf_jax.stages.lineage import (
    BEST_OF_N,
    evaluated_models,
    load_policy,
    load_reward_model,
    policy_model,
    stage_exists,
)

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


class Reference(NamedTuple):
    """The SFT baseline: its params, its per-test-prompt golds (``None``: this model's own, for
    evaluating the SFT model against itself) and its config (``None``: the evaluated model's)."""

    params: Any
    golds: np.ndarray | None = None
    config: ModelConfig | None = None


@dataclasses.dataclass
class ModelEval:
    """One model's evaluation; ``summary()`` is its JSON-ready row of the report."""

    name: str
    golds: np.ndarray  # [N, k] gold of the k samples per test prompt
    metadata: dict[str, float]  # lang.metadata_means
    pretrain_nll: float
    fact_accuracy: float
    win_rate_vs_sft: tuple[float, float, float] | None  # (rate, lo, hi)
    gold_gain_vs_sft: tuple[float, float, float] | None  # paired gold - SFT gold: (mean, lo, hi)
    kl_to_sft: float | None
    prompt_texts: list[str]
    response_texts: list[str]
    rm_scores: np.ndarray | None = None  # [N, k] the RM's score of each sample (None: no RM)

    @property
    def gold_ci95(self) -> tuple[float, float, float]:
        return stats.mean_ci95(stats.per_prompt(self.golds))

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
            "rm_score": None if self.rm_scores is None else float(np.mean(self.rm_scores)),
            "gold_gain_per_nat": gain_per_nat(None if gain is None else gain[0], self.kl_to_sft),
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
    reference: tuple | None = None,
    samples_per_prompt: int = 1,
    reward: tuple | None = None,
    best_of: int = 1,
) -> ModelEval:
    """Everything the report needs about one model (see the module docstring).

    Each test prompt is answered ``samples_per_prompt`` (k) times; its gold is the mean of its k
    samples, and every interval is over prompts. Use the same ``rng`` for every model, so all
    models answer the same prompts with the same random stream (common random numbers).
    ``reference = (sft_params, sft_golds[, sft_config])`` adds the paired win rate, the paired
    gold gain and the KL to the SFT model; pass ``(sft_params, None)`` to evaluate the
    SFT model against itself (win rate 0.5, gain and KL 0 exactly, computed all the same as a
    check). ``reward = (rm_params, rm_config, bias)`` adds the RM's score of every answer
    (``rm_scores``, normalised so that the demonstrations score 0), and with ``best_of = n > 1``
    evaluates best-of-n of ``params`` instead (``rlhf_jax.evaluate.best_of_n``): each answer is the
    RM's pick of n, the KL is ``best_of_n_kl(n)`` (its KL to ``params``: pass the SFT model), and
    the pretraining NLL and fact accuracy are those of ``params``, whose weights it does not
    change.
    """
    test_prompts = np.asarray(test_prompts, np.int32)
    n, k = len(test_prompts), samples_per_prompt
    prompts = np.repeat(test_prompts, k, axis=0)  # prompt i's samples are rows i*k .. i*k+k-1
    kw = dict(batch_size=batch_size, pad_id=lang.PAD_ID)
    draw = dict(rng=rng, max_new_tokens=max_new_tokens, eos_id=lang.EOS_ID, **kw)
    if best_of > 1:
        if reward is None:
            raise ValueError("evaluate_model: best_of > 1 needs the reward model that picks")
        responses, mask, scores = ev.best_of_n(
            params, config, prompts, n=best_of, reward=reward, **draw
        )
    else:
        responses, mask = ev.sample_responses(params, config, prompts, **draw)
        scores = (
            None if reward is None else ev.response_scores(*reward, prompts, responses, mask, **kw)
        )
    golds = lang.gold_rewards(prompts, responses, world=world).reshape(n, k)
    meta = lang.metadata_means(lang.response_metadata(prompts, responses, world=world))
    nll = float("nan")
    if heldout_docs is not None:
        nll = ev.heldout_nll(params, config, heldout_docs, **kw)

    win, gain, kl = None, None, None
    if reference is not None:
        ref = Reference(*reference)
        win, gain = stats.paired(golds, golds if ref.golds is None else ref.golds)
        if best_of > 1:
            kl = ev.best_of_n_kl(best_of)
        else:
            pair = ((params, config), (ref.params, ref.config or config))
            kl = float(np.mean(ev.log_ratio(*pair, prompts, responses, mask, **kw)))

    prompt_texts, response_texts = _texts(test_prompts, responses[::k], mask[::k])
    return ModelEval(
        name=name,
        golds=golds,
        metadata=meta,
        pretrain_nll=nll,
        fact_accuracy=fact_accuracy(params, config, world, batch_size=batch_size),
        win_rate_vs_sft=win,
        gold_gain_vs_sft=gain,
        kl_to_sft=kl,
        prompt_texts=prompt_texts,
        response_texts=response_texts,
        rm_scores=None if scores is None else np.asarray(scores, np.float64).reshape(n, k),
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
# Reward model


def rm_metrics(
    rewards: Float[np.ndarray | Array, "N K"],
    ranks: Int[np.ndarray | Array, "N K"],
    valid: Shaped[np.ndarray | Array, "N K"],
    golds: Float[np.ndarray | Array, "N K"],
) -> dict[str, float]:
    """Pairwise accuracy of given rewards against the noisy labels and against gold order, and
    the ranking loss (``rlhf_jax.evaluate.rm_metrics``; a gold pair has ``gold_i > gold_j``)."""
    noisy = ev.rm_metrics(rewards, ranks, valid)
    gold = ev.preferred_pairs(golds, valid, lower_is_better=False)
    return {
        "val_accuracy_noisy": noisy["val_accuracy"],
        "val_accuracy_gold": ev.pairwise_accuracy(rewards, gold),
        "val_loss": noisy["val_loss"],
        "val_pairs_noisy": noisy["val_pairs"],
        "val_pairs_gold": int(gold.sum()),
    }


# --------------------------------------------------------------------------------------------------
# A run's models


class Evaluator:
    """What every evaluation shares: the world, the test prompts and held-out documents, one
    sampling stream for all models, and the SFT model every other model is compared with."""

    def __init__(self, config: InstructLangConfig, workdir, heldout: np.ndarray, mesh):
        self.config, self.workdir, self.mesh, self.heldout = config, workdir, mesh, heldout
        self.world, self.model = datasets.world(config), policy_model(config)
        self.test = read_all(config, workdir, "test", "prompt_tokens")[: config.eval.test_prompts]
        self.sft = load_policy(config, workdir, "sft", mesh)
        self.reward = None  # (params, architecture, bias) once the RM has run
        if config.ppo.reward_from or stage_exists(workdir, "rm"):
            rm_params, bias, rm_model = load_reward_model(config, workdir, mesh)
            self.reward = (rm_params, rm_model, bias)
        self.sft_eval = self.evaluate("sft", self.sft, reference=(self.sft, None))

    def evaluate(
        self, name: str, params, reference: tuple | None = None, best_of: int = 1
    ) -> ModelEval:
        """Any policy with the run's architecture (a stage's, or one you trained yourself)
        against the SFT model (``reference``: another baseline, as for ``evaluate_model``);
        ``best_of = n`` evaluates best-of-n of ``params`` by the run's RM."""
        reference = reference or (self.sft, self.sft_eval.golds)
        return evaluate_model(
            name,
            params,
            self.model,
            self.world,
            self.test,
            self.heldout,
            rng=jax.random.key(self.config.seed + 6),
            batch_size=self.config.eval.batch_size,
            max_new_tokens=self.config.data.response_len,
            reference=reference,
            samples_per_prompt=self.config.eval.samples_per_prompt,
            reward=self.reward,
            best_of=best_of,
        )

    def stage(self, name: str, stage: str) -> ModelEval:
        """A stage's policy, or ``best_of_n``: the SFT model's best of ``eval.best_of_n``."""
        if stage == "sft":
            return self.sft_eval
        if stage == BEST_OF_N:
            return self.evaluate(name, self.sft, best_of=self.config.eval.best_of_n)
        return self.evaluate(name, load_policy(self.config, self.workdir, stage, self.mesh))


def evaluate_all(
    config: InstructLangConfig, workdir, heldout: np.ndarray
) -> tuple[dict, list[dict]]:
    """Evaluate every model the run has, and the RM; returns (summary, samples)."""
    mesh = sharding.make_mesh(config.mesh)
    evaluator = Evaluator(config, workdir, heldout, mesh)
    evals = {n: evaluator.stage(n, s) for n, s in evaluated_models(config, workdir).items()}
    summary = {
        "config": config.name,
        "seed": config.seed,
        "models": {name: e.summary() for name, e in evals.items()},
        "rm": {**rm_summary(config, workdir, mesh), **within_prompt_accuracy(evaluator.sft_eval)},
    }
    samples = [s for e in evals.values() for s in e.samples(config.eval.samples_per_model)]
    return summary, samples


def rm_summary(config: InstructLangConfig, workdir, mesh) -> dict:
    """RM accuracy on the validation comparisons, against the noisy labels and gold order."""
    params, bias, model = load_reward_model(config, workdir, mesh)
    data = loader(config, workdir, "rm_val", 64, 0, epochs=1, shuffle=False, drop_remainder=False)
    batches = list(data)
    cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    P = config.data.prompt_len
    n, k, _ = cat["tokens"].shape
    golds = lang.gold_rewards(
        np.repeat(cat["tokens"][:, :1, :P], k, 1).reshape(n * k, P),
        cat["tokens"][:, :, P:].reshape(n * k, -1),
        world=datasets.world(config),
    ).reshape(n, k)
    rewards = ev.comparison_scores(
        params,
        model,
        bias,
        cat["tokens"],
        cat["attention_mask"],
        cat["response_mask"],
        prompt_len=P,
        batch_size=config.eval.batch_size,
    )
    out = rm_metrics(rewards, cat["ranks"], cat["valid"], golds)
    out["bias"] = float(bias)
    return out


def evaluate_stage(config: InstructLangConfig, workdir, stage: str) -> dict:
    """``rlhf-jax eval``: one stage's exported policy against the SFT model, with gold."""
    require_world(config).validate()
    heldout = read_all(config, workdir, "heldout", "tokens")
    evaluator = Evaluator(config, workdir, heldout, sharding.make_mesh(config.mesh))
    return evaluator.stage(stage, stage).summary()
