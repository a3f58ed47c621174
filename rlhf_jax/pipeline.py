"""``rlhf-jax pipeline`` on your data: the whole recipe, evaluated without a gold reward, exported.

(pretrain, when there is no ``init_from`` and pretraining text is given) -> SFT -> RM -> PPO, and
PPO-ptx beside it when pretraining text is given and ``ppo.ptx_coef > 0`` -> evaluation of every
model on the held-out prompts (``rlhf_jax.evaluate``: the RM's score, the paired gain and win
rate by the RM against SFT, KL to SFT, held-out NLL when there is pretraining text, EOS rate,
length) and of the RM on the held-out comparisons -> ``rlhf-jax export`` of the last RL policy and
of the RM under ``<workdir>/export/`` -> ``report.md``. Every stage resumes its own checkpoint, so
an interrupted pipeline continues where it stopped and a finished one only re-evaluates. The
built-in world has its own pipeline, with gold (``rlhf_jax.instructlang.pipeline``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import jax
import numpy as np

from rlhf_jax import evaluate as ev
from rlhf_jax import sharding
from rlhf_jax.config import Config, methods
from rlhf_jax.data import sources
from rlhf_jax.errors import ConfigError
from rlhf_jax.export import export_current
from rlhf_jax.report import StageClock, write_report
from rlhf_jax.stages.dpo import run_dpo
from rlhf_jax.stages.driver import loader
from rlhf_jax.stages.grpo import run_grpo
from rlhf_jax.stages.lineage import (
    BEST_OF_N,
    evaluated_models,
    load_policy,
    load_reward_model,
    policy_model,
)
from rlhf_jax.stages.lm import run_lm_stage
from rlhf_jax.stages.ppo import run_ppo
from rlhf_jax.stages.rm import run_rm, validation_metrics

log = logging.getLogger("rlhf_jax")


def _read(config: Config, workdir, use: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    data = loader(config, workdir, use, 256, 0, epochs=1, shuffle=False, drop_remainder=False)
    batches = list(data)
    return {k: np.concatenate([b[k] for b in batches]) for k in keys}


class Evaluator:
    """What every model's evaluation shares: the held-out prompts and text, the RM, one sampling
    stream, and the SFT model every other model is compared with."""

    def __init__(self, config: Config, workdir, mesh):
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self.tokenizer = sources.load_tokenizer(config, workdir)
        self.eos_id, self.pad_id = sources.special_ids(config, workdir)
        test = _read(config, workdir, "test", ("prompt_tokens", "prompt_mask"))
        n = config.eval.test_prompts
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
            text = _read(config, workdir, "heldout", ("tokens", "mask"))
            self.heldout = (text["tokens"], text["mask"])
        params, bias, model = load_reward_model(config, workdir, mesh, Path(workdir) / "rm")
        self.reward = (params, model, bias)
        self.sft = load_policy(config, workdir, "sft", mesh)
        self.sft_eval = self.evaluate("sft", self.sft, (self.sft, policy_model(config), None))

    def evaluate(
        self, name: str, params, reference: tuple | None = None, best_of: int = 1
    ) -> ev.PolicyEval:
        """Any policy with the run's architecture (a stage's, or one you trained yourself)
        against the SFT model (``reference``: another baseline, as for ``evaluate_policy``);
        ``best_of = n`` evaluates best-of-n of ``params`` by the run's RM."""
        c = self.config
        reference = reference or (self.sft, policy_model(c), self.sft_eval.rm_scores)
        return ev.evaluate_policy(
            name,
            params,
            policy_model(c),
            self.prompts,
            prompt_mask=self.prompt_mask,
            rng=jax.random.key(c.seed + 6),
            batch_size=c.eval.batch_size,
            max_new_tokens=c.data.response_len,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            reward=self.reward,
            reference=reference,
            heldout_docs=None if self.heldout is None else self.heldout[0],
            heldout_mask=None if self.heldout is None else self.heldout[1],
            samples_per_prompt=c.eval.samples_per_prompt,
            best_of=best_of,
        )

    def stage(self, name: str, stage: str) -> ev.PolicyEval:
        """A stage's policy, or ``best_of_n``: the SFT model's best of ``eval.best_of_n``."""
        if stage == "sft":
            return self.sft_eval
        if stage == BEST_OF_N:
            return self.evaluate(name, self.sft, best_of=self.config.eval.best_of_n)
        return self.evaluate(name, load_policy(self.config, self.workdir, stage, self.mesh))

    def samples(self, result: ev.PolicyEval, k: int) -> list[dict]:
        """The first ``k`` held-out prompts with the model's first answer, decoded."""
        rows = []
        for i in range(min(k, len(result.prompts))):
            prompt = result.prompts[i][self.prompt_mask[i] > 0]
            response = result.responses[i][: int(result.response_mask[i].sum())]
            score = None if result.rm_scores is None else float(result.rm_scores[i, 0])
            rows.append(
                {
                    "model": result.name,
                    "prompt": self.tokenizer.decode(prompt.tolist()),
                    "response": self.tokenizer.decode(response.tolist()),
                    "rm_score": score,
                }
            )
        return rows


def evaluate_all(config: Config, workdir) -> tuple[dict, list[dict]]:
    """Every model the run has, and the RM on the held-out comparisons: (summary, samples)."""
    mesh = sharding.make_mesh(config.mesh)
    evaluator = Evaluator(config, workdir, mesh)
    evals = {n: evaluator.stage(n, s) for n, s in evaluated_models(config, workdir).items()}
    rm = {}
    if sources.available(config, workdir, "rm_val"):
        params, model, bias = evaluator.reward
        rm = {**validation_metrics(params, model, config, workdir), "bias": float(bias)}
    summary = {
        "config": config.name,
        "seed": config.seed,
        "models": {name: e.summary() for name, e in evals.items()},
        "rm": rm,
    }
    k = config.eval.samples_per_model
    samples = [s for e in evals.values() for s in evaluator.samples(e, k)]
    return summary, samples


def evaluate_stage(config: Config, workdir, stage: str) -> dict:
    """``rlhf-jax eval`` on your data: one stage's policy against the SFT model, by the RM."""
    config.validate()
    evaluator = Evaluator(config, workdir, sharding.make_mesh(config.mesh))
    return evaluator.stage(stage, stage).summary()


def run_methods(config: Config, workdir, timed: StageClock, on_log=None) -> None:
    """The training stages ``config.methods`` names, after PPO and from the same SFT model and
    RM: ``dpo``, ``grpo`` (group baseline) and ``rloo`` (``grpo.baseline`` set by the name).
    ``best_of_n`` trains nothing: the evaluation makes it. ``on_log`` goes to GRPO and RLOO."""
    for method in methods(config):
        if method == "dpo":
            timed("dpo", run_dpo, config, workdir)
        elif method in ("grpo", "rloo"):
            baseline = "rloo" if method == "rloo" else "group"
            grpo = dataclasses.replace(config.grpo, baseline=baseline)
            timed(method, run_grpo, dataclasses.replace(config, grpo=grpo), workdir, on_log=on_log)


def build_datasets(config: Config, workdir, uses) -> dict:
    """Build (or check) the dataset of each of ``uses`` (``sources.SPLITS`` keys). Returns
    ``{"reused": True}`` when every one was already built from what the config names, so that
    ``StageClock`` keeps the seconds of the run that built them."""
    kinds = {sources.SPLITS[u][0] for u in uses}
    reused = all(sources.is_current(config, workdir, kind) for kind in kinds)
    for use in uses:
        sources.dataset(config, workdir, use)
    return {"reused": reused}


def run_pipeline(config: Config, workdir: str | os.PathLike) -> dict:
    """Every stage in order, then evaluation, export and ``report.md`` in ``workdir``."""
    config.validate()
    workdir = Path(workdir)
    # Found here, not after hours of SFT: every file the stages after it need.
    needed = {"sft": "demonstrations", "rm": "comparisons", "ppo": "prompts"}
    missing = [
        f"data.{k}" for use, k in needed.items() if not sources.available(config, workdir, use)
    ]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} not set: the pipeline trains SFT on demonstrations, the RM "
            "on comparisons and PPO on prompts (a JSONL or Parquet file each, "
            "--config.data.<kind>=<file>)"
        )
    if not sources.available(config, workdir, "test"):
        raise ConfigError(
            "the pipeline evaluates on held-out prompts: give data.prompts (with "
            "data.prompts_val, or data.heldout_fraction > 0)"
        )
    timed = StageClock.resuming(workdir)

    # Every file is imported (and checked) before the first stage trains.
    uses = [u for u in sources.SPLITS if sources.available(config, workdir, u)]
    timed("data", build_datasets, config, workdir, uses)
    text = sources.available(config, workdir, "pretrain")
    if not config.init_from and text:
        timed("pretrain", run_lm_stage, config, workdir, "pretrain")
    timed("sft", run_lm_stage, config, workdir, "sft")
    timed("rm", run_rm, config, workdir)
    plain = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, ptx_coef=0.0))
    timed("ppo", run_ppo, plain, workdir, "ppo")
    final = "ppo"
    if text and config.ppo.ptx_coef > 0:
        timed("ppo_ptx", run_ppo, config, workdir, "ppo_ptx")
        final = "ppo_ptx"
    run_methods(config, workdir, timed)
    summary, samples = timed("eval", evaluate_all, config, workdir)
    exported = {}
    for stage, name in ((final, "policy"), ("rm", "rm")):
        exported[stage] = str(export_current(config, workdir, stage, workdir / "export" / name))
    summary["exported"] = exported
    summary["seconds"] = timed.seconds
    write_report(workdir, summary, samples)
    log.info("[pipeline] report: %s", workdir / "report.md")
    return summary
