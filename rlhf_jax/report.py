"""A run's report on the user's data: summary.json, samples.jsonl, PNG curves and report.md.

The pieces every report shares (number formatting, intervals, the PPO curves read from
``metrics.jsonl`` and plotted, the decoded samples, writing the files) are here; the built-in
world's report (``rlhf_jax.instructlang.report``) adds its gold reward and claims to them. Plots
use matplotlib's object-oriented ``Figure`` (Agg canvas), never pyplot, so writing a report
touches no global backend state and works headless.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from rlhf_jax import stage_table
from rlhf_jax.rundir import RunDir

SAMPLES_PER_MODEL = 3
# The PPO curves of every report: name -> (metrics.jsonl key, axis label).
CURVES = {
    "score": ("objective/score", "RM score"),
    "kl": ("objective/kl", "KL to SFT (nats per response)"),
    "clipfrac": ("ppo/policy/clipfrac", "policy clip fraction"),
    "var_explained": ("ppo/val/var_explained", "value explained variance"),
    "entropy": ("objective/entropy", "entropy (nats per token)"),
    "eos_rate": ("objective/eos_rate", "EOS rate"),
}


def num(x: Any) -> float | None:
    """A finite float, or None (missing, null in JSON, NaN)."""
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def fmt(x: Any, digits: int = 3) -> str:
    v = num(x)
    return "--" if v is None else f"{v:.{digits}f}"


def interval(value: Any, ci: Any, digits: int = 3) -> str:
    """``value [lo, hi]``, or the value alone, or ``--``."""
    if num(value) is None:
        return "--"
    if not ci or any(num(c) is None for c in ci):
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def ordered(names) -> list[str]:
    """Model rows in the stage table's order (``stage_table.report_rows``), others after."""
    names, rows = list(names), stage_table.report_rows()
    return [m for m in rows if m in names] + [m for m in names if m not in rows]


STEP = "step"  # a run's x values in ``read_curves``' output: the iteration of each logged row


def read_metrics(run_dir, stage: str) -> list[dict]:
    """The rows a stage logged to ``<run_dir>/<stage>/metrics.jsonl`` (none if it never ran)."""
    return RunDir(run_dir).metrics(stage)


def read_curves(run_dir, keys: dict[str, tuple[str, str]]) -> dict[str, dict[str, list]]:
    """{stage: {name: values per logged iteration}} of the stages of a run that log RL curves
    (``Stage.curves``; GRPO and RLOO log the objective's curves under PPO's names)."""
    out = {}
    for stage in stage_table.names(curves=True):
        if rows := read_metrics(run_dir, stage):
            curves = {name: [r.get(k) for r in rows] for name, (k, _) in keys.items()}
            out[stage] = {STEP: [r["step"] for r in rows], **curves}
    return out


def plot_curves(
    run_dir: str | os.PathLike, curves: dict[str, dict[str, Any]], labels: dict[str, str]
) -> list:
    """One PNG per metric with a line per RL run, against the iteration (``curves[run]["step"]``;
    1, 2, ... when absent); a ``None`` value is a row that lacks the metric. Returns the file
    names."""
    metrics: list[str] = []
    for run in curves.values():
        metrics += [k for k in run if k != STEP and k not in metrics and _points(run, k)[0]]
    files = []
    for metric in metrics:
        fig = Figure(figsize=(5, 3.2))
        ax = fig.add_subplot()
        for run_name, run in curves.items():
            xs, ys = _points(run, metric)
            if xs:
                ax.plot(xs, ys, label=run_name)
        ax.set_xlabel("iteration")
        ax.set_ylabel(labels.get(metric, metric))
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"curve_{metric}.png"
        fig.savefig(Path(run_dir) / name, dpi=100)
        files.append(name)
    return files


def _points(run: dict[str, Any], metric: str) -> tuple[list, list]:
    values = list(run.get(metric, []))
    steps = list(run.get(STEP, range(1, len(values) + 1)))
    pairs = [(x, y) for x, y in zip(steps, values) if num(y) is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def samples_section(samples: list[dict], score: str, label: str) -> list[str]:
    """A few decoded samples per model, each with its ``score`` field."""
    by_model: dict[str, list[dict]] = {}
    for s in samples:
        by_model.setdefault(s.get("model", "?"), []).append(s)
    lines = ["## Samples", ""]
    for m in ordered(by_model):
        lines += [f"### {m}", ""]
        for s in by_model[m][:SAMPLES_PER_MODEL]:
            lines.append(
                f"- `{s.get('prompt', '')}` -> `{s.get('response', '')}` "
                f"({label} {fmt(s.get(score), 2)})"
            )
        lines.append("")
    return lines


def model_table(models: dict, columns: tuple[tuple[str, str, str | None, int], ...]) -> list:
    """One row per model: each column ``(header, key, interval key or None, digits)``."""
    lines = [
        "| model | " + " | ".join(c[0] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for m in ordered(models):
        s = models[m]
        cells = [
            interval(s.get(key), s.get(ci), digits) if ci else fmt(s.get(key), digits)
            for _, key, ci, digits in columns
        ]
        lines.append("| " + " | ".join([m, *cells]) + " |")
    return lines


class StageClock:
    """``clock(name, fn, *args)`` runs ``fn`` and records its seconds in ``clock.seconds`` (a
    report's ``summary["seconds"]``).

    A stage that had already finished (``fn`` returns a dict with ``"reused": True``: a finished
    stage's metadata, or ``build_datasets`` of datasets already built) keeps the seconds it took
    when it ran: the run's earlier ``summary.json`` (``StageClock.resuming``), else its
    checkpoint's own ``seconds``. So running a finished pipeline again, to add a method or to
    write its report anew, leaves the times of the stages it reuses as they were."""

    def __init__(self, previous: dict | None = None):
        self.seconds: dict[str, float] = {}
        self.previous = {k: v for k, v in (previous or {}).items() if num(v) is not None}

    @classmethod
    def resuming(cls, run_dir) -> StageClock:
        """A clock that knows the seconds of the run's earlier ``summary.json``, if any (none,
        or an unreadable one: everything is measured)."""
        previous = (RunDir(run_dir).summary() or {}).get("seconds")
        return cls(previous if isinstance(previous, dict) else None)

    def __call__(self, name: str, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        seconds = time.perf_counter() - t0
        if isinstance(out, dict) and out.get("reused"):
            seconds = self.previous.get(name, out.get("seconds", seconds))
        self.seconds[name] = seconds
        return out


def metrics_table(values: dict) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    for k, v in values.items():
        lines.append(f"| {k} | {fmt(v) if isinstance(v, float) and num(v) is not None else v} |")
    return lines


def write_outputs(run_dir: str | os.PathLike, summary: dict, samples: list[dict]) -> None:
    """``summary.json`` (exactly ``summary``) and ``samples.jsonl`` (one object per line)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    RunDir(run_dir).summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    with open(run_dir / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")


def seconds_line(summary: dict) -> str:
    seconds = summary.get("seconds", {})
    stages = ", ".join(f"{k} {fmt(v, 1)} s" for k, v in seconds.items()) or "not recorded"
    total = sum(v for v in seconds.values() if num(v) is not None)
    return f"Seconds per stage: {stages} (total {total:.1f} s)."


# --------------------------------------------------------------------------------------------------
# The report of a run on the user's data

HOW_TO_READ = (
    "Each row is one model answering the same held-out prompts at temperature 1 "
    "(eval.samples_per_prompt times each). There is no gold reward on your data: the RM score "
    "is the run's own reward model (normalised so that the demonstrations score 0), with a 95% "
    "interval over prompts; the paired gain and win rate judge each model against the SFT model "
    "by that RM on the same prompts, so they show what PPO optimised, not what a human would "
    "prefer. KL to SFT is in nats per response; the held-out NLL (when pretraining text is "
    "given) measures the alignment tax. DPO, GRPO and RLOO rows come from the same SFT model "
    "(`methods`); a best-of-n row is the SFT model's n answers with the RM's favourite kept, "
    "so the RM that judges it also picked it: its RM score flatters it. The reward model "
    "section gives its accuracy on the held-out comparisons."
)


COLUMNS = (  # header, summary key, its interval's key, digits
    ("RM score [95% CI]", "rm_score_mean", "rm_score_ci95", 3),
    ("RM score - SFT, paired [95% CI]", "rm_gain_vs_sft", "rm_gain_ci95", 3),
    ("win rate vs SFT by the RM [95% CI]", "rm_win_rate_vs_sft", "rm_win_rate_ci95", 3),
    ("KL to SFT (nats)", "kl_to_sft", None, 2),
    ("held-out NLL", "heldout_nll", None, 3),
    ("EOS rate", "eos_rate", None, 3),
    ("response length", "response_length", None, 1),
)


def render_markdown(summary: dict, samples: list[dict], curves: list[str]) -> str:
    """report.md's text for a run on the user's data."""
    lines = [
        f"# Run report: `{summary.get('config', '?')}`",
        "",
        f"Made by `rlhf-jax pipeline` with config `{summary.get('config', '?')}`, seed "
        f"{summary.get('seed', '?')}. {seconds_line(summary)}",
        "",
        "## How to read this report",
        "",
        HOW_TO_READ,
        "",
        "## Models",
        "",
        *model_table(summary.get("models", {}), COLUMNS),
        "",
        "## Reward model (held-out comparisons)",
        "",
        *(metrics_table(summary["rm"]) if summary.get("rm") else ["No held-out comparisons."]),
        "",
    ]
    if summary.get("exported"):
        lines += ["## Exported", ""]
        lines += [f"- `{stage}`: `{path}`" for stage, path in summary["exported"].items()] + [""]
    if curves:
        lines += ["## RL training curves", ""] + [f"![{f[6:-4]}]({f})" for f in curves] + [""]
    lines += samples_section(samples, "rm_score", "RM score")
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: str | os.PathLike, summary: dict, samples: list[dict]) -> None:
    """summary.json, samples.jsonl, the PPO curves and report.md of a run on the user's data."""
    run_dir = Path(run_dir)
    write_outputs(run_dir, summary, samples)
    labels = {name: label for name, (_, label) in CURVES.items()}
    curves = plot_curves(run_dir, read_curves(run_dir, CURVES), labels)
    (run_dir / "report.md").write_text(render_markdown(summary, samples, curves))


def inline_images(markdown: str, run_dir: str | os.PathLike) -> str:
    """``markdown`` with every ``![alt](file.png)`` of ``run_dir`` embedded as a data URI, so a
    report renders where its files are not served: a notebook cell (``IPython.display.Markdown``),
    Colab, a paste into an issue."""

    def embed(match: re.Match) -> str:
        path = Path(run_dir) / match.group(2)
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", embed, markdown)
