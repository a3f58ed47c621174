"""``rlhf-jax pipeline``: the whole InstructGPT recipe on the built-in world, then the report.

pretrain the base -> SFT (the PPO init, 10% pretraining mix) -> sample and label comparisons ->
RM -> PPO and PPO-ptx from the same SFT model -> the ``methods`` asked for (DPO, GRPO, RLOO; none
by default) -> evaluate base, SFT, PPO, PPO-ptx, those methods and best-of-n when asked -> report.
Every stage resumes its own checkpoint, so an interrupted pipeline continues where it stopped and
a finished one only re-evaluates. The plain PPO run uses ``ppo.ptx_coef = 0``; the PPO-ptx run
uses the configured ``ppo.ptx_coef`` (skipped when it is 0). ``run_seeds`` runs it once per seed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from rlhf_jax import evaluate as ev
from rlhf_jax.config import methods
from rlhf_jax.data import sources
from rlhf_jax.data.records import Kind
from rlhf_jax.evaluator import evaluate_run
from rlhf_jax.instructlang import datasets, lang, report
from rlhf_jax.instructlang.claims import check_claims
from rlhf_jax.instructlang.config import InstructLangConfig, require_world
from rlhf_jax.instructlang.evaluate import GoldEvaluator
from rlhf_jax.pipeline import build_datasets, train
from rlhf_jax.report import StageClock, read_curves
from rlhf_jax.rollout import Episodes
from rlhf_jax.rundir import RunDir
from rlhf_jax.stages.lineage import policy_model

log = logging.getLogger("rlhf_jax")
CURVE_DOCS = 512  # held-out documents for the per-iteration pretraining-NLL curve


def curve_callback(config: InstructLangConfig, heldout: np.ndarray):
    """Per-log-step extras for RL curves: gold of the iteration's samples, held-out NLL."""
    w, model = datasets.world(config), policy_model(config)
    docs = heldout[:CURVE_DOCS]

    def on_log(step, params, episodes: Episodes):
        prompts, tokens = np.asarray(episodes.prompt_tokens), np.asarray(episodes.response_tokens)
        gold = lang.gold_rewards(prompts, tokens, world=w)
        nll = ev.heldout_nll(
            params,
            model,
            docs,
            batch_size=config.eval.batch_size,
            pad_id=lang.PAD_ID,
        )
        return {"eval/gold": float(gold.mean()), "eval/pretrain_nll": nll}

    return on_log


def heldout_docs(config: InstructLangConfig, workdir) -> np.ndarray:
    """The world's held-out pretraining documents (right-padded tokens)."""
    return sources.read_all(config, workdir, "heldout", ("tokens",))["tokens"]


def run_pipeline(config: InstructLangConfig, workdir: str | os.PathLike) -> dict:
    """Every stage in order, then evaluation and ``report.md`` in ``workdir``."""
    require_world(config).validate()
    run = RunDir(workdir)
    timed = StageClock.resuming(run)

    uses = [u for u, use in sources.SPLITS.items() if use.kind != Kind.COMPARISONS]
    timed("data", build_datasets, config, run, uses)
    on_log = curve_callback(config, heldout_docs(config, run))
    # The comparisons are sampled from the SFT model: they are made (and timed) just before the RM.
    comparisons = lambda: timed("comparisons", build_datasets, config, run, ["rm"])  # noqa: E731
    train(config, run, timed, on_log=on_log, before={"rm": comparisons})

    summary, samples = timed("eval", evaluate_run, config, run, GoldEvaluator)
    summary["seconds"] = timed.seconds
    curves = read_curves(run, report.CURVES)
    report.write_report(run, summary, curves, samples)
    log.info("[pipeline] report: %s", run / "report.md")
    for claim in check_claims(summary):
        log.info("  %s %s: %s", claim.status, claim.name, claim.evidence)
    return summary


def run_seeds(config: InstructLangConfig, workdir: str | os.PathLike, seeds: list[int]) -> str:
    """``rlhf-jax seeds``: the pipeline once per seed into ``<workdir>/seed<k>/``, then
    ``<workdir>/seeds.md``, the mean ± sd table over seeds (also returned). The world is the same
    for every seed (``world.seed``); the seed changes every initialisation and sample. Runs
    that already finished are only re-read, so an interrupted sweep resumes; a finished run
    that lacks a model ``methods`` now asks for runs again (its finished stages resume)."""
    workdir = Path(workdir)
    summaries = []
    for seed in seeds:
        run_dir = workdir / f"seed{seed}"
        summary = RunDir(run_dir).summary()
        if summary is None or not set(methods(config)) <= set(summary["models"]):
            summary = run_pipeline(dataclasses.replace(config, seed=seed), run_dir)
        summaries.append(summary)
    text = report.seeds_markdown(summaries)
    (workdir / "seeds.md").write_text(text)
    return text
