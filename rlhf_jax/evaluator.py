"""A run's evaluation: every model it has against its SFT model, and its reward model.

``Evaluator`` holds what every model's evaluation shares: the held-out prompts and text, the
reward model PPO used (when the run has one), one sampling stream (the same key for every model,
so paired comparisons share their samples' randomness), and the SFT model every other model is
compared with, evaluated once. ``evaluate_run`` evaluates every model the run has (its policy
stages and the ``methods`` it asks for that train nothing, as ``rlhf_jax.stage_table`` lists
them: ``evaluated_models``) and the RM on the held-out comparisons, giving the report's summary
and samples; ``evaluate_stage`` gives one model's row (``rlhf-jax eval``).

Without a gold reward each model is judged by the RM (``rlhf_jax.evaluate.evaluate_policy``). The
built-in world extends the class with its gold reward (``rlhf_jax.instructlang.evaluate``): it
evaluates the same samples against the gold (``evaluate``, ``baseline``), scores the held-out
comparisons' gold order (``gold``), and adds to the RM's section (``rm_summary``) and to the
samples (``samples``); everything else is this class.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import jax
import numpy as np

from rlhf_jax import evaluate as ev
from rlhf_jax import sharding, stage_table
from rlhf_jax.config import Config, methods
from rlhf_jax.data import sources
from rlhf_jax.errors import ConfigError
from rlhf_jax.rollout import RewardModel
from rlhf_jax.rundir import RunDir
from rlhf_jax.stages.lineage import load_policy, load_reward_model, policy_model

log = logging.getLogger("rlhf_jax")


class HeldOut(NamedTuple):
    """Held-out pretraining text: right-padded ``tokens`` [M T] and their ``mask`` [M T]."""

    tokens: np.ndarray
    mask: np.ndarray


def evaluated_models(config: Config, workdir) -> dict[str, str]:
    """``{report row: stage}`` of every model the run has, in table order: each policy stage
    that has run, and each ``methods`` entry that trains nothing (best-of-n)."""
    run, asked = RunDir(workdir), methods(config)
    out = {}
    for s in stage_table.STAGES:
        if s.report_row and (run.has(s.name) if s.trains else s.name in asked):
            out[s.report_row] = s.name
    return out


def reward_summary(
    config: Config, workdir, reward: RewardModel, gold: ev.Gold | None = None
) -> dict:
    """The report's reward-model section: ``reward`` on the held-out comparisons (``rm_val``;
    ``evaluate.comparison_metrics``, against ``gold`` order too when given) and its bias."""
    metrics = ev.comparison_metrics(
        sources.read_all(config, workdir, "rm_val"),
        reward,
        prompt_len=config.data.prompt_len,
        batch_size=config.eval.batch_size,
        gold=gold,
    )
    return {**metrics, "bias": float(reward.bias)}


class Evaluator:
    """What every model's evaluation in one run shares (see the module docstring)."""

    gold: ev.Gold | None = None

    def __init__(self, config: Config, workdir, mesh=None):
        self.config, self.run = config, RunDir(workdir)
        self.mesh = mesh or sharding.make_mesh(config.mesh)
        self.model = policy_model(config)
        self.ids = sources.special_ids(config, workdir)
        n = config.eval.test_prompts
        test = sources.read_all(config, workdir, "test", ("prompt_tokens", "prompt_mask"))
        self.prompts, self.prompt_mask = test["prompt_tokens"][:n], test["prompt_mask"][:n]
        if len(self.prompts) < n:
            log.warning(
                "[eval] %d held-out prompts, fewer than eval.test_prompts=%d: give more with "
                "data.prompts_val or a larger data.heldout_fraction",
                len(self.prompts),
                n,
            )
        self.heldout = None
        if sources.available(config, workdir, "heldout"):
            text = sources.read_all(config, workdir, "heldout", ("tokens", "mask"))
            self.heldout = HeldOut(text["tokens"], text["mask"])
        self.reward = None  # the RM PPO used, once there is one
        if config.ppo.reward_from or self.run.has("rm"):
            self.reward = load_reward_model(config, workdir, self.mesh)
        self.sft = load_policy(config, workdir, "sft", self.mesh)
        self.sft_eval = self.evaluate("sft", self.sft, ev.Reference(self.sft, self.model))

    def baseline(self, result: Any) -> np.ndarray | None:
        """A model's ``[N, k]`` numbers that paired statistics compare: its RM scores."""
        return result.rm_scores

    def evaluate(
        self, name: str, params, reference: ev.Reference | None = None, best_of: int = 1
    ) -> Any:
        """Any policy with the run's architecture (a stage's, or one you trained yourself)
        against the SFT model (``reference``: another baseline, as for ``evaluate_policy``);
        ``best_of = n`` evaluates best-of-n of ``params`` by the run's RM."""
        return ev.evaluate_policy(name, params, **self._policy_kw(reference, best_of))

    def _policy_kw(self, reference: ev.Reference | None, best_of: int) -> dict:
        c = self.config
        if reference is None:
            reference = ev.Reference(self.sft, self.model, self.baseline(self.sft_eval))
        return dict(
            config=self.model,
            test_prompts=self.prompts,
            prompt_mask=self.prompt_mask,
            rng=jax.random.key(c.seed + 6),
            batch_size=c.eval.batch_size,
            max_new_tokens=c.data.response_len,
            eos_id=self.ids.eos,
            pad_id=self.ids.pad,
            reward=self.reward,
            reference=reference,
            heldout_docs=None if self.heldout is None else self.heldout.tokens,
            heldout_mask=None if self.heldout is None else self.heldout.mask,
            samples_per_prompt=c.eval.samples_per_prompt,
            best_of=best_of,
        )

    def stage(self, name: str, stage: str) -> Any:
        """A stage's policy, or a stage that trains nothing (best-of-n): the best of
        ``eval.best_of_n`` answers of its policy input by the run's RM."""
        s = evaluable(stage)
        if stage == "sft":
            return self.sft_eval
        if not s.trains:
            if self.reward is None:
                raise ConfigError(
                    f"--stage={stage}: picks by the reward model, and the run has none: run "
                    f"`{stage_table.get('rm').command_line}` first (or set ppo.reward_from)"
                )
            policy = s.starts_from["policy"][0]
            params = self.sft if policy == "sft" else self._load(policy)
            return self.evaluate(name, params, best_of=self.config.eval.best_of_n)
        return self.evaluate(name, self._load(stage))

    def _load(self, stage: str):
        return load_policy(self.config, self.run, stage, self.mesh)

    def rm_summary(self) -> dict:
        """The RM on the held-out comparisons, and its bias (none without an RM or them)."""
        if self.reward is None or not sources.available(self.config, self.run, "rm_val"):
            return {}
        return reward_summary(self.config, self.run, self.reward, self.gold)

    def samples(self, result: ev.PolicyEval, k: int) -> list[dict]:
        """The first ``k`` held-out prompts with the model's first answer, decoded."""
        tokenizer = sources.load_tokenizer(self.config, self.run)
        responses, mask = result.first()
        rows = []
        for i in range(min(k, len(result.prompts))):
            prompt = result.prompts[i][self.prompt_mask[i] > 0]
            response = responses[i][: int(mask[i].sum())]
            score = None if result.rm_scores is None else float(result.rm_scores[i, 0])
            rows.append(
                {
                    "model": result.name,
                    "prompt": tokenizer.decode(prompt.tolist()),
                    "response": tokenizer.decode(response.tolist()),
                    "rm_score": score,
                }
            )
        return rows


def evaluable(stage: str) -> stage_table.Stage:
    """The stage ``--stage`` names if the evaluation can judge it (a policy, or best-of-n), else
    a ``ConfigError`` listing those it can."""
    ok = [s for s in stage_table.STAGES if s.exports == stage_table.POLICY or not s.trains]
    for s in ok:
        if s.name == stage:
            return s
    raise ConfigError(f"--stage={stage}: expected one of {', '.join(s.name for s in ok)}")


class Evaluation(NamedTuple):
    """A run's evaluation: ``summary.json``'s dict and ``samples.jsonl``'s rows."""

    summary: dict
    samples: list[dict]


def evaluate_run(config: Config, workdir, evaluator: type[Evaluator] = Evaluator) -> Evaluation:
    """Every model the run has, and the RM on the held-out comparisons: what ``report.md``,
    ``summary.json`` and ``samples.jsonl`` show."""
    e = evaluator(config, workdir)
    evals = {row: e.stage(row, stage) for row, stage in evaluated_models(config, workdir).items()}
    summary = {
        "config": config.name,
        "seed": config.seed,
        "models": {row: result.summary() for row, result in evals.items()},
        "rm": e.rm_summary(),
    }
    k = config.eval.samples_per_model
    return Evaluation(summary, [s for result in evals.values() for s in e.samples(result, k)])


def evaluate_stage(
    config: Config, workdir, stage: str, evaluator: type[Evaluator] = Evaluator
) -> dict:
    """``rlhf-jax eval``: one stage's policy (or best-of-n) against the SFT model."""
    config.validate()
    evaluable(stage)
    return evaluator(config, workdir).stage(stage, stage).summary()
