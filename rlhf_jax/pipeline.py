"""``rlhf-jax pipeline`` on your data: the whole recipe, evaluated without a gold reward, exported.

(pretrain, when there is no ``init_from`` and pretraining text is given) -> SFT -> RM -> PPO, and
PPO-ptx beside it when pretraining text is given and ``ppo.ptx_coef > 0`` -> the ``methods``
asked for (DPO, GRPO, RLOO) -> evaluation of every model on the held-out prompts
(``rlhf_jax.evaluator``: the RM's score, the paired gain and win rate by the RM against SFT, KL
to SFT, held-out NLL when there is pretraining text, EOS rate, length) and of the RM on the
held-out comparisons -> ``rlhf-jax export`` of the last RL policy and of the RM under
``<workdir>/export/`` -> ``report.md``. Every stage resumes its own checkpoint, so
an interrupted pipeline continues where it stopped and a finished one only re-evaluates.

``train`` runs the stages in the order of ``rlhf_jax.stage_table`` (those the config asks for and
the data allows); the built-in world's pipeline (``rlhf_jax.instructlang.pipeline``) runs the same
``train``, then evaluates with its gold.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from rlhf_jax import stage_table
from rlhf_jax.config import Config, methods
from rlhf_jax.data import sources
from rlhf_jax.errors import ConfigError
from rlhf_jax.evaluator import evaluate_run
from rlhf_jax.export import export_current
from rlhf_jax.report import StageClock, write_report
from rlhf_jax.rundir import RunDir

log = logging.getLogger("rlhf_jax")


def build_datasets(config: Config, workdir, uses) -> dict:
    """Build (or check) the dataset of each of ``uses`` (``sources.SPLITS`` keys). Returns
    ``{"reused": True}`` when every one was already built from what the config names, so that
    ``StageClock`` keeps the seconds of the run that built them."""
    kinds = {sources.SPLITS[u].kind for u in uses}
    reused = all(sources.is_current(config, workdir, kind) for kind in kinds)
    for use in uses:
        sources.dataset(config, workdir, use)
    return {"reused": reused}


def planned(config: Config, workdir) -> list[stage_table.Stage]:
    """The stages the pipeline trains (``stage_table.to_train``): those the config asks for whose
    data is there (pretraining text)."""
    available = lambda use: sources.available(config, workdir, use)  # noqa: E731
    return stage_table.to_train(config, methods(config), available)


def train(
    config: Config,
    workdir,
    clock: StageClock,
    *,
    on_log: Callable[[int, Any, Any], dict] | None = None,
    before: Mapping[str, Callable[[], Any]] | None = None,
) -> list[stage_table.Stage]:
    """Run every ``planned`` stage in order, each timed by ``clock`` under its name, and return
    them. ``on_log`` goes to the stages that log RL curves; ``before[name]()`` runs just before
    that stage (the world samples and labels its comparisons before the RM)."""
    stages = planned(config, workdir)
    for s in stages:
        if before and s.name in before:
            before[s.name]()
        hooks = {"on_log": on_log} if s.curves and on_log is not None else {}
        clock(s.name, s.run, config, workdir, **hooks)
    return stages


def run_pipeline(config: Config, workdir: str | os.PathLike) -> dict:
    """Every stage in order, then evaluation, export and ``report.md`` in ``workdir``."""
    config.validate()
    run = RunDir(workdir)
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
    timed = StageClock.resuming(run)

    # Every file is imported (and checked) before the first stage trains.
    uses = [u for u in sources.SPLITS if sources.available(config, workdir, u)]
    timed("data", build_datasets, config, workdir, uses)
    stages = train(config, run, timed)
    summary, samples = timed("eval", evaluate_run, config, run)
    # The policy the recipe ends with (PPO-ptx when it ran, else PPO), and its reward model.
    final = [s.name for s in stages if s.exports == stage_table.POLICY and not s.method][-1]
    summary["exported"] = {
        stage: str(export_current(config, run, stage, run / "export" / name))
        for stage, name in ((final, "policy"), ("rm", "rm"))
    }
    summary["seconds"] = timed.seconds
    write_report(run, summary, samples)
    log.info("[pipeline] report: %s", run / "report.md")
    return summary
