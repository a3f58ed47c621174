"""The world's run report: summary.json, samples.jsonl, PNG plots, report.md, and seeds.md.

The claim checks it prints come from ``claims.check_claims``. Plots use matplotlib's
object-oriented ``Figure`` (Agg canvas), never pyplot, so writing a report touches no global
backend state and works headless.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from rlhf_jax import report as common
from rlhf_jax.instructlang.claims import STATEMENTS, Claim, check_claims
from rlhf_jax.report import num, ordered

# The world's PPO curves: the gold reward of each iteration's samples and the held-out NLL (logged
# by the pipeline's on_log) beside the library's.
CURVES = {
    "gold": ("eval/gold", "gold reward"),
    "score": common.CURVES["score"],
    "kl": common.CURVES["kl"],
    "pretrain_nll": ("eval/pretrain_nll", "held-out pretraining NLL (nats per token)"),
    "clipfrac": common.CURVES["clipfrac"],
    "var_explained": common.CURVES["var_explained"],
    "entropy": common.CURVES["entropy"],
}


# --------------------------------------------------------------------------------------------------
# Plots


def _plot_gold(run_dir: Path, models: dict) -> str | None:
    names = [m for m in ordered(models) if num(models[m].get("gold_mean")) is not None]
    if not names:
        return None
    means = [models[m]["gold_mean"] for m in names]
    cis = [models[m].get("gold_ci95") or [mu, mu] for m, mu in zip(names, means)]
    err = [[mu - ci[0] for mu, ci in zip(means, cis)], [ci[1] - mu for mu, ci in zip(means, cis)]]
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    ax.bar(names, means, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_ylabel("gold reward (mean, 95% CI)")
    ax.set_ylim(-1.05, 1.05)
    fig.tight_layout()
    fig.savefig(run_dir / "gold.png", dpi=100)
    return "gold.png"


# --------------------------------------------------------------------------------------------------
# Markdown

HOW_TO_READ = (
    "Each row is one model answering the same held-out test prompts at temperature 1 "
    "(eval.samples_per_prompt times each; a prompt's gold is the mean of its answers); the gold "
    "reward is the world's hidden truth (1 = the ideal answer, -1 = no EOS or toxic), shown with "
    "a 95% interval over prompts. The paired gain, win rate and KL compare each model with "
    "the SFT model on the same prompts (SFT itself must show 0, 0.5 and 0); the gain's interval "
    "comes from the per-prompt differences, so it is what decides whether a model beats SFT. "
    "Gain per nat of KL is what a method buys for its drift from SFT (left out below 0.01 nats). "
    "RM score is the reward model's mean score of the same answers (0 = the demonstrations): "
    "a method that raises it and not the gold has found what the RM gets wrong. "
    "Beside PPO and PPO-ptx, a run may hold DPO, GRPO and RLOO (trained from the same SFT "
    "model, comparisons and RM) and best-of-n: the SFT model's n answers, of which the RM keeps "
    "its favourite; its KL is the analytic log n - (n - 1)/n, and its weights (hence its "
    "pretraining NLL and fact accuracy) are SFT's. "
    "Pretraining NLL and fact accuracy measure what alignment costs in language modelling (the "
    "alignment tax). The reward model section says how often the learned reward orders a "
    "validation pair like the noisy labelers and like the gold reward, and two of the SFT "
    "model's answers to one test prompt like the gold (sft_pairs_accuracy_gold: the pairs PPO "
    "learns from are of this kind); the claims below are "
    "decided automatically from these numbers."
)


COLUMNS = (  # header, summary key, its interval's key, digits
    ("gold mean [95% CI]", "gold_mean", "gold_ci95", 3),
    ("gold - SFT, paired [95% CI]", "gold_gain_vs_sft", "gold_gain_ci95", 3),
    ("win rate vs SFT [95% CI]", "win_rate_vs_sft", "win_rate_ci95", 3),
    ("KL to SFT (nats)", "kl_to_sft", None, 2),
    ("gain per nat of KL", "gold_gain_per_nat", None, 3),
    ("RM score", "rm_score", None, 3),
    ("pretrain NLL", "pretrain_nll", None, 3),
    ("fact acc.", "fact_accuracy", None, 3),
    ("EOS rate", "eos_rate", None, 3),
    ("attempts task", "attempts_task", None, 3),
    ("follows LIM", "follows_constraint", None, 3),
    ("hallucination", "hallucination", None, 3),
    ("toxic", "toxic", None, 3),
)


def _header(summary: dict) -> list[str]:
    return [
        f"# InstructLang run report: `{summary.get('config', '?')}`",
        "",
        f"Made by the rlhf_jax pipeline with config `{summary.get('config', '?')}`, "
        f"seed {summary.get('seed', '?')}. {common.seconds_line(summary)}",
        "",
        "## How to read this report",
        "",
        HOW_TO_READ,
        "",
    ]


def render_markdown(
    summary: dict, samples: list[dict], claims: list[Claim], plots: dict[str, list[str]]
) -> str:
    """report.md's text; ``plots`` = {"gold": [file], "curves": [files]} (relative names)."""
    models = summary.get("models", {})
    lines = _header(summary)
    lines += ["## Models", ""] + common.model_table(models, COLUMNS) + [""]
    lines += [f"![gold reward per model]({f})" for f in plots.get("gold", [])] + [""]
    lines += ["## Reward model (validation comparisons; SFT answers to the test prompts)", ""]
    rm = summary.get("rm") or {}
    lines += common.metrics_table(rm) if rm else ["No reward-model metrics in this run."]
    lines += ["", "## Claims (docs/instructlang.md section 1)", ""]
    lines += [f"- **{c.name} {c.status}**: {c.statement}. {c.evidence}" for c in claims] + [""]
    if plots.get("curves"):
        lines += ["## RL training curves (PPO, PPO-ptx, GRPO, RLOO)", ""]
        lines += [f"![{f[6:-4]}]({f})" for f in plots["curves"]] + [""]
    lines += common.samples_section(samples, "gold", "gold")
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    run_dir: str | os.PathLike,
    summary: dict,
    curves: dict[str, dict[str, Any]],
    samples: list[dict],
) -> None:
    """Write summary.json, samples.jsonl, the PNG plots and report.md into ``run_dir``.

    ``curves`` = {run: {metric: per-logged-row values, "step": their iterations}} (lists or
    arrays, "step" optional; ``read_curves``);
    ``summary.json`` holds exactly ``summary``; ``samples`` go one JSON object per line.
    """
    run_dir = Path(run_dir)
    common.write_outputs(run_dir, summary, samples)
    gold = _plot_gold(run_dir, summary.get("models", {}))
    labels = {name: label for name, (_, label) in CURVES.items()}
    plots = {
        "gold": [gold] if gold else [],
        "curves": common.plot_curves(run_dir, curves or {}, labels),
    }
    text = render_markdown(summary, samples, check_claims(summary), plots)
    (run_dir / "report.md").write_text(text)


# --------------------------------------------------------------------------------------------------
# Several seeds

SEED_COLUMNS = (
    ("gold_mean", "gold reward", 3),
    ("gold_gain_vs_sft", "gold - SFT (paired)", 3),
    ("win_rate_vs_sft", "win rate vs SFT", 3),
    ("kl_to_sft", "KL to SFT (nats)", 2),
    ("gold_gain_per_nat", "gain per nat of KL", 3),
    ("rm_score", "RM score", 3),
    ("pretrain_nll", "pretraining NLL", 3),
    ("fact_accuracy", "fact accuracy", 3),
    ("eos_rate", "EOS rate", 3),
)


def _mean_sd(values: list[float | None], digits: int) -> str:
    """``mean ± sd`` (sample sd, ddof = 1) over the finite values; ``--`` if there are none."""
    xs = [v for v in (num(x) for x in values) if v is not None]
    if not xs:
        return "--"
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _samples_per_prompt(summaries: list[dict]) -> str:
    ks = sorted({m.get("samples_per_prompt", 1) for s in summaries for m in s["models"].values()})
    ks = ks or [1]
    return f"{'/'.join(map(str, ks))} sample{'' if ks == [1] else 's'} per test prompt"


def seeds_markdown(summaries: list[dict]) -> str:
    """Mean ± sd over runs of the same preset with different seeds (``rlhf-jax seeds``): the
    model table, RM accuracy, minutes per run, and how many seeds pass each claim."""
    seeds = ", ".join(str(s.get("seed", "?")) for s in summaries)
    minutes = [
        sum(v for v in s.get("seconds", {}).values() if num(v) is not None) / 60 for s in summaries
    ]
    config = summaries[0].get("config", "?") if summaries else "?"
    lines = [
        f"# `{config}` over {len(summaries)} seed{'' if len(summaries) == 1 else 's'} ({seeds})",
        "",
        "Each cell is the mean ± sd over seeds of the per-run number "
        f"({_samples_per_prompt(summaries)} at T = 1). Minutes per run: "
        + _mean_sd(minutes, 1)
        + ".",
        "",
        "| model | " + " | ".join(title for _, title, _ in SEED_COLUMNS) + " |",
        "|---|" + "---|" * len(SEED_COLUMNS),
    ]
    names = ordered({m for s in summaries for m in s.get("models", {})})
    for m in names:
        rows = [s["models"].get(m, {}) for s in summaries]
        cells = [_mean_sd([r.get(k) for r in rows], d) for k, _, d in SEED_COLUMNS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    rm = [s.get("rm") or {} for s in summaries]
    lines += [
        "",
        "RM validation accuracy: "
        + _mean_sd([r.get("val_accuracy_noisy") for r in rm], 3)
        + " against the noisy labels, "
        + _mean_sd([r.get("val_accuracy_gold") for r in rm], 3)
        + " against gold order; on pairs of the SFT model's answers to one test prompt, "
        + _mean_sd([r.get("sft_pairs_accuracy_gold") for r in rm], 3)
        + " against gold order.",
        "",
        "| claim | seeds passing |",
        "|---|---|",
    ]
    verdicts: dict[str, list[bool | None]] = {}
    for s in summaries:
        for c in check_claims(s):
            verdicts.setdefault(c.name, []).append(c.passed)
    for name, passed in verdicts.items():
        lines.append(
            f"| {name}: {STATEMENTS[name]} | {sum(p is True for p in passed)} of {len(passed)} |"
        )
    return "\n".join(lines) + "\n"
