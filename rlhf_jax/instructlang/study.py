"""``rlhf-jax study``: the experiments of docs/instructlang.md section 5 beyond the main job.

The study first runs (or re-reads) the main job once per seed, ``<workdir>/seed<k>/``, exactly as
``rlhf-jax seeds`` does, so a finished seeds sweep is its starting point. Each experiment of
``study.experiments`` (``rlhf_jax.instructlang.experiments.EXPERIMENTS``) then trains what it
varies in its own variant directories (``rlhf_jax.instructlang.variants.Study``). Every stage
resumes its own checkpoint, and each experiment's per-seed numbers are kept in ``result.json``
beside its variants, so an interrupted study continues where it stopped and a finished one only
re-decides and rewrites ``<workdir>/study.md`` (with its PNGs) and ``study.json``.

Each experiment ends in one PASS/FAIL line decided by 95% intervals over the seeds (Student's t,
``stats.seeds_ci95``): a claim passes only when its interval excludes the opposite. One seed
gives a zero-width interval: enough to try the study, not to decide a claim.
"""

from __future__ import annotations

import json
import logging
import os

from rlhf_jax.errors import ConfigError
from rlhf_jax.instructlang.config import InstructLangConfig, names, require_world
from rlhf_jax.instructlang.experiments import EXPERIMENTS
from rlhf_jax.instructlang.pipeline import run_seeds
from rlhf_jax.instructlang.variants import STUDY_DIR, Experiment, Finding, Study

log = logging.getLogger("rlhf_jax")


# --------------------------------------------------------------------------------------------------
# The study


def selected(config: InstructLangConfig) -> list[Experiment]:
    """The experiments ``study.experiments`` names (``all``: every one, in table order); an
    unknown name is a ``ConfigError`` listing the known ones."""
    asked = names(config.study.experiments)
    if asked == ["all"]:
        return list(EXPERIMENTS.values())
    if unknown := [e for e in asked if e not in EXPERIMENTS]:
        raise ConfigError(
            f"invalid config: study.experiments={config.study.experiments!r}: unknown "
            f"{', '.join(unknown)}; known: all, {', '.join(EXPERIMENTS)}"
        )
    return [EXPERIMENTS[name] for name in asked]


def run_study(config: InstructLangConfig, workdir: str | os.PathLike, seeds: list[int]) -> str:
    """``rlhf-jax study``: the main job per seed, then each experiment of ``study.experiments``
    for every seed, then ``<workdir>/study.md`` and ``study.json``; returns the markdown."""
    require_world(config).validate()
    experiments = selected(config)
    study = Study(config, workdir, seeds)
    run_seeds(config, workdir, seeds)
    findings, seconds = [], {}
    for experiment in experiments:
        results = [study.result(experiment, seed) for seed in seeds]
        seconds[experiment.name] = sum(r.get("seconds", 0.0) for r in results)
        findings.append(experiment.decide(study, results))
        log.info("[study] %s %s: %s", findings[-1].name, findings[-1].status, findings[-1].evidence)
    text = markdown(config, seeds, findings, seconds, main_seconds(study))
    study.dir.mkdir(parents=True, exist_ok=True)
    (study.workdir / "study.md").write_text(text)
    record = {
        "seeds": seeds,
        "findings": [
            {"name": f.name, "status": f.status, "statement": f.statement, "evidence": f.evidence}
            for f in findings
        ],
        "seconds": seconds,
    }
    (study.workdir / "study.json").write_text(json.dumps(record, indent=2))
    return text


def main_seconds(study: Study) -> float:
    total = 0.0
    for seed in study.seeds:
        total += sum((study.summary(seed).get("seconds") or {}).values())
    return total


HOW_TO_READ = (
    "Each experiment ran once per seed; a claim's verdict comes from the 95% interval over seeds "
    "(Student's t, so with 3 seeds the interval is mean -+ 2.48 sd) of the number its line "
    "names: PASS when the interval lies on the claim's side, FAIL otherwise. Gold is the world's "
    "hidden reward (1 = the ideal answer); KL is in nats per response; every model answers the "
    "same test prompts as its seed's main run. The experiments reuse the main runs "
    "(`seed<k>/`) and train only what they vary, under `study/<experiment>/seed<k>/`."
)


def markdown(
    config: InstructLangConfig,
    seeds: list[int],
    findings: list[Finding],
    seconds: dict[str, float],
    main_total: float,
) -> str:
    lines = [
        f"# rlhf_jax study: config `{config.name}`, seeds {', '.join(map(str, seeds))}",
        "",
        HOW_TO_READ,
        "",
        "| experiment | claim | result | evidence |",
        "|---|---|---|---|",
    ]
    for f in findings:
        lines.append(f"| {f.name}: {f.title} | {f.statement} | **{f.status}** | {f.evidence} |")
    lines += ["", "## Cost", ""]
    lines.append(f"- main runs (the pipeline per seed): {main_total / 60:.1f} min")
    for name, s in seconds.items():
        lines.append(f"- {name}: {s / 60:.1f} min (all seeds, as measured when each ran)")
    for f in findings:
        lines += ["", f"## {f.name}: {f.title}", "", f"**{f.status}**: {f.statement}.", ""]
        lines += [f.evidence, "", *f.table]
        if f.plot:
            lines += ["", f"![{f.name}]({STUDY_DIR}/{f.plot})"]
    return "\n".join(lines) + "\n"
