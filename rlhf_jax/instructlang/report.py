"""The world's run report: summary.json, samples.jsonl, PNG plots, report.md, and seeds.md.

The claim checks it prints come from ``claims.check_claims``. Plots use matplotlib's
object-oriented ``Figure`` (Agg canvas), never pyplot, so writing a report touches no global
backend state and works headless.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from rlhf_jax.instructlang.claims import (
    MODEL_ORDER,
    STATEMENTS,
    Claim,
    check_claims,
    fmt,
    num,
)

SAMPLES_PER_MODEL = 3
CURVE_LABELS = {
    "gold": "gold reward",
    "score": "RM score",
    "kl": "KL to SFT (nats per response)",
    "pretrain_nll": "held-out pretraining NLL (nats per token)",
    "clipfrac": "policy clip fraction",
    "var_explained": "value explained variance",
}


# --------------------------------------------------------------------------------------------------
# Plots


def _ordered(names) -> list[str]:
    names = list(names)
    return [m for m in MODEL_ORDER if m in names] + [m for m in names if m not in MODEL_ORDER]


def _plot_curves(run_dir: Path, curves: dict[str, dict[str, Any]]) -> list[str]:
    """One PNG per metric with a line per RL run; returns the file names."""
    metrics: list[str] = []
    for run in curves.values():
        metrics += [k for k in run if k not in metrics]
    files = []
    for metric in metrics:
        fig = Figure(figsize=(5, 3.2))
        ax = fig.add_subplot()
        for run_name, run in curves.items():
            if metric in run and len(run[metric]):
                ax.plot(range(1, len(run[metric]) + 1), run[metric], label=run_name)
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel(CURVE_LABELS.get(metric, metric))
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"curve_{metric}.png"
        fig.savefig(run_dir / name, dpi=100)
        files.append(name)
    return files


def _plot_gold(run_dir: Path, models: dict) -> str | None:
    names = [m for m in _ordered(models) if num(models[m].get("gold_mean")) is not None]
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
    "Pretraining NLL and fact accuracy measure what alignment costs in language modelling (the "
    "alignment tax). The reward model section says how often the learned reward orders a "
    "validation pair like the noisy labelers and like the gold reward; the claims below are "
    "decided automatically from these numbers."
)


def _interval(value: Any, ci: Any, digits: int = 3) -> str:
    if num(value) is None:
        return "--"
    if not ci or any(num(c) is None for c in ci):
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def _model_table(models: dict) -> list[str]:
    lines = [
        "| model | gold mean [95% CI] | gold - SFT, paired [95% CI] | win rate vs SFT [95% CI] "
        "| KL to SFT (nats) | pretrain NLL | fact acc. | EOS rate | attempts task | follows LIM "
        "| hallucination | toxic |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in _ordered(models):
        s = models[m]
        cells = [
            m,
            _interval(s.get("gold_mean"), s.get("gold_ci95")),
            _interval(s.get("gold_gain_vs_sft"), s.get("gold_gain_ci95")),
            _interval(s.get("win_rate_vs_sft"), s.get("win_rate_ci95")),
            fmt(s.get("kl_to_sft"), 2),
            fmt(s.get("pretrain_nll")),
            fmt(s.get("fact_accuracy")),
            fmt(s.get("eos_rate")),
            fmt(s.get("attempts_task")),
            fmt(s.get("follows_constraint")),
            fmt(s.get("hallucination")),
            fmt(s.get("toxic")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _header(summary: dict) -> list[str]:
    seconds = summary.get("seconds", {})
    stages = ", ".join(f"{k} {fmt(v, 1)} s" for k, v in seconds.items()) or "not recorded"
    total = sum(v for v in seconds.values() if num(v) is not None)
    return [
        f"# InstructLang run report: `{summary.get('config', '?')}`",
        "",
        f"Made by the rlhf_jax pipeline with config `{summary.get('config', '?')}`, "
        f"seed {summary.get('seed', '?')}. Seconds per stage: {stages} (total {total:.1f} s).",
        "",
        "## How to read this report",
        "",
        HOW_TO_READ,
        "",
    ]


def _samples_section(samples: list[dict]) -> list[str]:
    by_model: dict[str, list[dict]] = {}
    for s in samples:
        by_model.setdefault(s.get("model", "?"), []).append(s)
    lines = ["## Samples", ""]
    for m in _ordered(by_model):
        lines += [f"### {m}", ""]
        for s in by_model[m][:SAMPLES_PER_MODEL]:
            lines.append(
                f"- `{s.get('prompt', '')}` -> `{s.get('response', '')}` "
                f"(gold {fmt(s.get('gold'), 2)})"
            )
        lines.append("")
    return lines


def render_markdown(
    summary: dict, samples: list[dict], claims: list[Claim], plots: dict[str, list[str]]
) -> str:
    """report.md's text; ``plots`` = {"gold": [file], "curves": [files]} (relative names)."""
    models = summary.get("models", {})
    lines = _header(summary)
    lines += ["## Models", ""] + _model_table(models) + [""]
    lines += [f"![gold reward per model]({f})" for f in plots.get("gold", [])] + [""]
    lines += ["## Reward model (validation)", ""]
    rm = summary.get("rm") or {}
    if rm:
        lines += ["| metric | value |", "|---|---|"]
        for k, v in rm.items():
            shown = fmt(v) if isinstance(v, float) and num(v) is not None else v
            lines.append(f"| {k} | {shown} |")
    else:
        lines.append("No reward-model metrics in this run.")
    lines += ["", "## Claims (docs/instructlang.md section 1)", ""]
    lines += [f"- **{c.name} {c.status}**: {c.statement}. {c.evidence}" for c in claims] + [""]
    if plots.get("curves"):
        lines += ["## PPO training curves", ""]
        lines += [f"![{f[6:-4]}]({f})" for f in plots["curves"]] + [""]
    lines += _samples_section(samples)
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    run_dir: str | Path,
    summary: dict,
    curves: dict[str, dict[str, Any]],
    samples: list[dict],
) -> None:
    """Write summary.json, samples.jsonl, the PNG plots and report.md into ``run_dir``.

    ``curves`` = {run: {metric: per-iteration values}} (lists or arrays); ``summary.json`` holds
    exactly ``summary``; ``samples`` go one JSON object per line.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(run_dir / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    gold = _plot_gold(run_dir, summary.get("models", {}))
    plots = {"gold": [gold] if gold else [], "curves": _plot_curves(run_dir, curves or {})}
    text = render_markdown(summary, samples, check_claims(summary), plots)
    (run_dir / "report.md").write_text(text)


# --------------------------------------------------------------------------------------------------
# Several seeds

SEED_COLUMNS = (
    ("gold_mean", "gold reward", 3),
    ("gold_gain_vs_sft", "gold - SFT (paired)", 3),
    ("win_rate_vs_sft", "win rate vs SFT", 3),
    ("kl_to_sft", "KL to SFT (nats)", 2),
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
    names = _ordered({m for s in summaries for m in s.get("models", {})})
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
