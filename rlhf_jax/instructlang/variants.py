"""What every experiment of ``rlhf-jax study`` shares: variants of a seed's main run, and deciding
a claim over seeds.

``Study`` knows the seeds' main runs (``<workdir>/seed<k>/``, made by ``rlhf-jax seeds``) and makes
each experiment's *variant* directories, ``<workdir>/study/<experiment>/seed<k>/<variant>/``: a
variant starts as a copy of the seed's data and links to the seed's finished stages it does not
change (its pretrained base, its SFT model, its RM), so a C4 run trains one PPO policy and nothing
else. Each experiment's per-seed numbers are kept in ``result.json`` beside its variants
(``Study.result``), so an interrupted study continues where it stopped. An ``Experiment`` is a
``run(study, seed)`` and a ``decide(study, results)`` that ends in a ``Finding``: one PASS/FAIL line
decided by 95% intervals over the seeds (Student's t, ``stats.seeds_ci95``; ``over_seeds``,
``above``), with its table and plot. The experiments themselves are
``rlhf_jax.instructlang.experiments``; the command is ``rlhf_jax.instructlang.study``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import sharding, stats
from rlhf_jax.data import builders
from rlhf_jax.data.records import Kind
from rlhf_jax.errors import StageError
from rlhf_jax.instructlang.claims import verdict
from rlhf_jax.instructlang.config import InstructLangConfig
from rlhf_jax.instructlang.evaluate import GoldEvaluator
from rlhf_jax.report import fmt
from rlhf_jax.rundir import RunDir, barrier, flat_settings

log = logging.getLogger("rlhf_jax")
STUDY_DIR = "study"
RESULT = "result.json"
# Settings that change no experiment's numbers (checkpoint cadence, the mesh, which methods the
# main runs compare), so a result made under others is still reused.
FREE_SETTINGS = ("methods", "keep_checkpoints", "checkpoint_", "mesh.",
                 "eval.samples_per_model")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Finding:
    """One experiment's conclusion: ``passed`` None when it could not be decided."""

    name: str
    title: str
    statement: str
    passed: bool | None
    evidence: str
    table: list[str]  # markdown lines: the per-seed numbers
    plot: str | None = None  # a PNG in the study directory

    @property
    def status(self) -> str:
        return verdict(self.passed)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """``run(study, seed)`` trains and measures one seed (its dict is cached in result.json);
    ``decide(study, results)`` turns the seeds' dicts into a ``Finding``."""

    name: str
    title: str
    statement: str
    run: Callable[[Study, int], dict]
    decide: Callable[[Study, list[dict]], Finding]


class Study:
    """What the experiments share: the config, the seeds' main runs, their variants, and one
    gold evaluator per seed (its SFT model's evaluation is made once)."""

    def __init__(self, config: InstructLangConfig, workdir, seeds: list[int]):
        self.config, self.workdir, self.seeds = config, Path(workdir), list(seeds)
        self.dir = self.workdir / STUDY_DIR
        self.mesh = sharding.make_mesh(config.mesh)
        self._evaluators: dict[int, GoldEvaluator] = {}

    def seed_config(self, seed: int, **sections) -> InstructLangConfig:
        """The preset at ``seed``, with ``sections`` replaced (``ppo=...``, ``model=...``)."""
        return dataclasses.replace(self.config, seed=seed, **sections)

    def main(self, seed: int) -> Path:
        return self.workdir / f"seed{seed}"

    def summary(self, seed: int) -> dict:
        return json.loads(RunDir(self.main(seed)).summary_file.read_text())

    def variant(
        self,
        experiment: str,
        seed: int,
        name: str,
        link: tuple[str, ...] = ("pretrain", "sft", "rm"),
        comparisons: bool = True,
    ) -> Path:
        """``<study>/<experiment>/seed<k>/<name>/``: made once, atomically, as a copy of the seed's
        data (without its comparisons if not ``comparisons``: a variant with its own SFT model
        samples its own) and links to its finished ``link`` stages (never trained here)."""
        path = self.dir / experiment / f"seed{seed}" / name
        if not path.exists() and jax.process_index() == 0:
            self._make_variant(path, seed, link, comparisons)
        barrier(f"rlhf_jax study variant {path}")
        return path

    def _make_variant(self, path: Path, seed: int, link: tuple[str, ...], comparisons: bool):
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        main = self.main(seed)
        skip = builders.dataset_path(Kind.COMPARISONS, self.config.data.source, "").parts[0]
        ignore = None if comparisons else shutil.ignore_patterns(skip)
        shutil.copytree(RunDir(main).data, RunDir(tmp).data, ignore=ignore)
        for stage in link:
            if (main / stage).is_dir():
                # Relative, so a study directory can move as a whole.
                target = os.path.relpath(main / stage, path)
                os.symlink(target, tmp / stage, target_is_directory=True)
        os.replace(tmp, path)

    def evaluator(self, seed: int) -> GoldEvaluator:
        """The seed's gold evaluator: its test prompts, held-out text and SFT model."""
        if seed not in self._evaluators:
            config, main = self.seed_config(seed), self.main(seed)
            self._evaluators[seed] = GoldEvaluator(config, main, self.mesh)
        return self._evaluators[seed]

    def result(self, experiment: Experiment, seed: int) -> dict:
        """The experiment's numbers for one seed: re-read, or measured and written once. A
        result made with other settings is an error, never silently reused."""
        path = self.dir / experiment.name / f"seed{seed}" / RESULT
        settings = flat(dataclasses.asdict(self.seed_config(seed)))
        if path.exists():
            out = json.loads(path.read_text())
            made = out.get("settings", settings)
            if differ := changed(made, settings, experiment.name):
                was = ", ".join(f"{k}: {made.get(k)!r} -> {settings.get(k)!r}" for k in differ[:4])
                raise StageError(
                    f"{path.parent} was made with other settings ({was}): run the study with "
                    f"the settings it was made with, use another --workdir, or delete "
                    f"{path.parent} to run {experiment.name} again"
                )
            return out
        log.info("[study] %s, seed %d", experiment.name, seed)
        t0 = time.perf_counter()
        out = {"seed": seed, **experiment.run(self, seed)}
        out["seconds"] = time.perf_counter() - t0
        out["settings"] = settings
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stats.jsonable(out), indent=2))
            os.replace(tmp, path)
        return out


def changed(made: dict, now: dict, experiment: str) -> list[str]:
    """The settings that differ between a result and this run, but for the free ones and the
    other experiments' own ``study.<name>_*`` fields."""
    own = f"study.{experiment}_"

    def counts(k: str) -> bool:
        return not k.startswith(FREE_SETTINGS) and (k.startswith(own) or not k.startswith("study."))

    return sorted(k for k in set(made) | set(now) if counts(k) and made.get(k) != now.get(k))


def flat(d: dict) -> dict[str, Any]:
    """A nested config dict as {dotted.path: value} (tuples as lists, as JSON keeps them)."""
    return {k: json.loads(json.dumps(v)) for k, v in flat_settings(d).items()}


# --------------------------------------------------------------------------------------------------
# Deciding from seeds


def over_seeds(values) -> stats.Interval:
    """Mean and 95% interval (Student's t) of one number per seed."""
    return stats.seeds_ci95([np.nan if v is None else v for v in values])


def shown(ci: stats.Interval, digits: int = 3) -> str:
    mean, lo, hi = ci
    return f"{fmt(mean, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def above(ci: stats.Interval, value: float = 0.0) -> bool | None:
    """Whether the interval lies above ``value`` (None when it is undefined)."""
    return None if not np.isfinite(ci[1]) else bool(ci[1] > value)


def per_seed_table(results: list[dict], columns: tuple[tuple[str, str, int], ...]) -> list[str]:
    """A markdown table with a row per seed: (header, result key, digits) per column."""
    head = "| seed | " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    rows = [
        f"| {r['seed']} | " + " | ".join(fmt(r.get(k), d) for _, k, d in columns) + " |"
        for r in results
    ]
    return [head, rule, *rows]


def save_figure(study: Study, fig: Any, name: str) -> str:
    study.dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(study.dir / name, dpi=100)
    return name
