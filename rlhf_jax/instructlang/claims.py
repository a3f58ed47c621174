"""The claims of docs/instructlang.md section 1 that one run can check, decided from its summary.

``check_claims(summary)`` decides C1, C2, C4, C5 and C10 from the ``summary`` dict alone (what
``summary.json`` holds), so the pipeline's final printout, the report and ``seeds.md`` agree.
Thresholds the spec leaves open are the constants below, taken from its section 6: "PPO-ptx within
about 0.05 of PPO" sets ``GOLD_TOLERANCE``, "base below 0.2" (loosened for "base << 0.5") sets
``BASE_WIN_MAX``, and "a few nats per response (2-15)" makes ``KL_MAX`` a generous bound. A win
rate beats 0.5 only when its 95% interval lies above 0.5. A claim whose models are missing from
the run is marked N/A (``passed=None``), not FAIL.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax import stage_table
from rlhf_jax.report import fmt, num

RL_MODELS = ("ppo", "ppo_ptx")
GOLD_TOLERANCE = 0.05
BASE_WIN_MAX = 0.25
KL_MAX = 50.0


def verdict(passed: bool | None) -> str:
    """PASS, FAIL, or N/A when there was nothing to decide on (a claim's or a study finding's)."""
    return {True: "PASS", False: "FAIL", None: "N/A"}[passed]


@dataclasses.dataclass(frozen=True)
class Claim:
    """One checked claim: ``passed`` is None when the run lacks the models it needs."""

    name: str
    passed: bool | None
    evidence: str
    statement: str = ""

    @property
    def status(self) -> str:
        return verdict(self.passed)

    def line(self) -> str:
        return f"{self.name} {self.status}: {self.statement} -- {self.evidence}"


# --------------------------------------------------------------------------------------------------
# Claims


def _metric(models: dict, key: str, names=None) -> dict[str, float | None]:
    """``key`` of each model of ``names`` (default: every report row, in table order)."""
    names = stage_table.report_rows() if names is None else names
    return {m: num(models[m].get(key)) for m in names if m in models}


def _values(vals: dict[str, float | None], digits: int = 3) -> str:
    return ", ".join(f"{m} {fmt(v, digits)}" for m, v in vals.items())


def _needs(vals: dict[str, float | None], names) -> bool:
    return all(vals.get(m) is not None for m in names)


def _claim_c1(models: dict) -> Claim:
    g = _metric(models, "gold_mean")
    ev = "gold mean " + _values(g)
    if not _needs(g, ("base", "sft", "ppo")):
        return Claim("C1", None, ev + " (needs base, sft, ppo)")
    ok = g["base"] < g["sft"] < g["ppo"]
    ev += "; need base < sft < ppo"
    gain_lo = num((models["ppo"].get("gold_gain_ci95") or [None])[0])
    if gain_lo is not None:  # the paired interval: PPO beats SFT beyond sampling noise
        ok = ok and gain_lo > 0
        ev += f" with the paired ppo - sft gain's 95% lower bound {gain_lo:.3f} > 0"
    if g.get("ppo_ptx") is not None:
        ok = ok and g["sft"] < g["ppo_ptx"] and abs(g["ppo"] - g["ppo_ptx"]) <= GOLD_TOLERANCE
        ev += f", sft < ppo_ptx, |ppo - ppo_ptx| = {abs(g['ppo'] - g['ppo_ptx']):.3f}"
        ev += f" <= {GOLD_TOLERANCE}"
    return Claim("C1", ok, ev)


def _claim_c2(models: dict) -> Claim:
    w = _metric(models, "win_rate_vs_sft")
    lo = {m: num((models[m].get("win_rate_ci95") or [None])[0]) for m in RL_MODELS if m in models}
    ev = "win rate vs SFT " + _values(w) + "; 95% lower bound " + _values(lo)
    rl = [m for m in RL_MODELS if m in models]
    if not rl or not _needs(w, ("base",)) or not _needs(lo, rl):
        return Claim("C2", None, ev + " (needs base and ppo with win rates)")
    ok = all(lo[m] > 0.5 for m in rl) and w["base"] < BASE_WIN_MAX
    return Claim("C2", ok, ev + f"; need lower bound > 0.5 and base < {BASE_WIN_MAX}")


def _claim_c4(models: dict) -> Claim:
    rl = [m for m in RL_MODELS if m in models]
    kl = {m: num(models[m].get("kl_to_sft")) for m in rl}
    ev = "KL(pi || pi_sft) per response " + _values(kl, 2)
    if not rl:
        return Claim("C4", None, ev + " (needs ppo)")
    ok = all(kl[m] is not None and kl[m] < KL_MAX for m in rl)
    return Claim("C4", ok, ev + f"; need finite and < {KL_MAX:g} nats")


def _claim_c5(models: dict) -> Claim:
    nll = _metric(models, "pretrain_nll", ("sft", "ppo", "ppo_ptx"))
    fact = _metric(models, "fact_accuracy", ("sft", "ppo", "ppo_ptx"))
    gold = _metric(models, "gold_mean", ("ppo", "ppo_ptx"))
    ev = f"pretrain NLL {_values(nll)}; fact accuracy {_values(fact)}"
    if not (_needs(nll, ("sft", "ppo")) and _needs(fact, ("sft", "ppo"))):
        return Claim("C5", None, ev + " (needs sft, ppo)")
    tax = nll["ppo"] > nll["sft"] and fact["ppo"] < fact["sft"]
    ev += f"; tax (ppo NLL up and fact accuracy down vs sft): {'yes' if tax else 'no'}"
    if not (_needs(nll, ("ppo_ptx",)) and _needs(fact, ("ppo_ptx",)) and _needs(gold, RL_MODELS)):
        return Claim("C5", None, ev + "; recovery needs ppo_ptx")
    cost = gold["ppo"] - gold["ppo_ptx"]
    recovery = (
        nll["ppo_ptx"] < nll["ppo"] and fact["ppo_ptx"] > fact["ppo"] and cost <= GOLD_TOLERANCE
    )
    ev += (
        f"; recovery (ppo_ptx NLL down, fact accuracy up vs ppo, gold cost {cost:.3f} "
        f"<= {GOLD_TOLERANCE}): {'yes' if recovery else 'no'}"
    )
    return Claim("C5", tax and recovery, ev)


def _claim_c10(models: dict) -> Claim:
    # Each metric must improve from base to PPO, or already sit at its best value under PPO.
    specs = (
        ("hallucination", False, 0.0),
        ("toxic", False, 0.0),
        ("follows_constraint", True, 1.0),
    )
    parts, ok = [], True
    for key, higher_better, best in specs:
        v = _metric(models, key, ("base", "ppo"))
        parts.append(f"{key} {_values(v)}")
        if not _needs(v, ("base", "ppo")):
            return Claim("C10", None, "; ".join(parts) + " (needs base, ppo)")
        improved = v["ppo"] > v["base"] if higher_better else v["ppo"] < v["base"]
        ok = ok and (improved or v["ppo"] == best)
    return Claim("C10", ok, "; ".join(parts) + "; need ppo better than base (or at the optimum)")


STATEMENTS = {
    "C1": "gold reward: base < SFT < PPO ~ PPO-ptx",
    "C2": "PPO/PPO-ptx win rate vs SFT > 0.5; base << 0.5",
    "C4": "KL(pi || pi_sft) stays bounded (finite, a few nats) at beta > 0",
    "C5": "PPO pays an alignment tax (NLL up, fact accuracy down); PPO-ptx recovers it cheaply",
    "C10": "hallucination, toxicity and constraint following improve from base to PPO",
}


def check_claims(summary: dict) -> list[Claim]:
    """C1, C2, C4, C5, C10 of docs/instructlang.md section 1, decided from ``summary["models"]``."""
    models = summary.get("models", {})
    claims = [f(models) for f in (_claim_c1, _claim_c2, _claim_c4, _claim_c5, _claim_c10)]
    return [dataclasses.replace(c, statement=STATEMENTS[c.name]) for c in claims]
