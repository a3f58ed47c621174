"""The study's experiments (docs/instructlang.md section 5), each a named ``Experiment``.

Each has a ``run(study, seed)`` that trains only what it varies (in variant directories that
link the seed's finished stages, ``study.Study.variant``) and returns that seed's numbers, and a
``decide(study, results)`` that turns the seeds' numbers into a PASS/FAIL line, a table and a
plot:

- ``c3``: a small model's PPO-ptx policy against a larger base model, by gold win rate;
- ``c4``: KL to the SFT policy levels off at the preset's beta and keeps growing at beta = 0;
- ``c6``: a larger beta does not remove the alignment tax without losing gold; ptx does;
- ``c7``: grouped C(K,2) RM batches against the same comparisons as shuffled pairs;
- ``c8``: SFT's validation NLL bottoms out while the RM score and gold keep improving;
- ``c9``: Gao et al.'s over-optimisation: proxy RMs from N deterministic comparisons, best-of-n
  and PPO at beta = 0, gold and proxy against sqrt(KL), with the fitted forms;
- ``oracle``: PPO on the gold reward itself, the bound of what PPO can reach here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from rlhf_jax import config as C
from rlhf_jax import evaluate as ev
from rlhf_jax import overoptimization as oo
from rlhf_jax import sharding
from rlhf_jax.data import builders, sources
from rlhf_jax.data.records import Kind, from_storage
from rlhf_jax.instructlang import datasets, lang
from rlhf_jax.instructlang.config import names
from rlhf_jax.instructlang.evaluate import evaluate_model, rm_summary
from rlhf_jax.instructlang.pipeline import curve_callback, heldout_docs, run_pipeline
from rlhf_jax.instructlang.variants import (
    Experiment,
    Finding,
    Study,
    above,
    over_seeds,
    per_seed_table,
    save_figure,
    shown,
)
from rlhf_jax.report import fmt, read_metrics
from rlhf_jax.rundir import RunDir
from rlhf_jax.stage_table import get as stage
from rlhf_jax.stages.lineage import load_policy, load_reward_model, policy_model

# --------------------------------------------------------------------------------------------------
# Shared pieces


def plain_ppo(study: Study, seed: int, **changes):
    """The seed's config for plain PPO (no ptx) with ``changes`` to its PPO section."""
    ppo = dataclasses.replace(study.config.ppo, ptx_coef=0.0, **changes)
    return study.seed_config(seed, ppo=ppo)


def train_ppo(study: Study, config, workdir: Path, reward_fn=None) -> list[dict]:
    """PPO into ``<workdir>/ppo`` with the world's gold and NLL curves; its logged rows."""
    on_log = curve_callback(config, heldout_docs(config, workdir))
    stage("ppo").run(config, workdir, on_log=on_log, reward_fn=reward_fn)
    return read_metrics(workdir, "ppo")


def run_prompts(config, workdir) -> np.ndarray:
    """The run's test prompts (left-padded tokens), in order."""
    return sources.read_all(config, workdir, "test", ("prompt_tokens",))["prompt_tokens"]


def evaluate_policy(study: Study, seed: int, name: str, config, workdir: Path) -> dict:
    """A variant's PPO policy against the seed's SFT model: its summary row."""
    params = load_policy(config, workdir, "ppo", study.mesh)
    return study.evaluator(seed).evaluate(name, params).summary()


def column(rows: list[dict], key: str) -> np.ndarray:
    """One logged metric per row (NaN where a row lacks it)."""
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], np.float64)


def windows(values: np.ndarray) -> tuple[float, float]:
    """The means of the second quarter and of the last quarter of a curve (at least one point
    each): a plateau has them equal, a growing curve has the last above."""
    n = len(values)
    q = max(1, n // 4)
    mid = values[n // 4 : max(n // 4 + 1, n // 2)]
    return float(np.nanmean(mid)), float(np.nanmean(values[n - q :]))


def gold_reward_fn(config):
    """The world's gold reward as a traceable PPO ``reward_fn`` (a host callback)."""
    world = datasets.world(config)

    def host(prompts, tokens):
        return lang.gold_rewards(np.asarray(prompts), np.asarray(tokens), world=world).astype(
            np.float32
        )

    def reward_fn(prompts, tokens, mask):
        del mask  # the gold reads the response through its first EOS itself
        out = jax.ShapeDtypeStruct(prompts.shape[:1], jnp.float32)
        return jax.pure_callback(host, out, prompts, tokens)

    return reward_fn


def figure(panels: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(5 * panels, 3.4))
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


# --------------------------------------------------------------------------------------------------
# Oracle PPO (E8)


def run_oracle(study: Study, seed: int) -> dict:
    config = plain_ppo(study, seed)
    v = study.variant("oracle", seed, "ppo_gold")
    rows = train_ppo(study, config, v, reward_fn=gold_reward_fn(config))
    row = evaluate_policy(study, seed, "ppo_oracle", config, v)
    rm_ppo = study.summary(seed)["models"]["ppo"]
    out = {
        "oracle_gain": row["gold_gain_vs_sft"],
        "oracle_kl": row["kl_to_sft"],
        "oracle_win": row["win_rate_vs_sft"],
        "rm_gain": rm_ppo["gold_gain_vs_sft"],
        "rm_kl": rm_ppo["kl_to_sft"],
        "curve_step": [r["step"] for r in rows],
        "curve_gold": column(rows, "eval/gold").tolist(),
        "rm_curve_gold": column(read_metrics(study.main(seed), "ppo"), "eval/gold").tolist(),
    }
    # The same PPO budget at other betas, on the gold and on the RM: how much of what the
    # perfect reward reaches at a looser KL the RM keeps.
    for beta in kl_coefs(study, "oracle_kl_coefs"):
        config = plain_ppo(study, seed, kl_coef=beta)
        for reward, reward_fn in (("gold", gold_reward_fn(config)), ("rm", None)):
            key = f"{reward}_b{beta:g}"
            v = study.variant("oracle", seed, f"ppo_{key}")
            rows = train_ppo(study, config, v, reward_fn=reward_fn)
            row = evaluate_policy(study, seed, f"ppo_{key}", config, v)
            out[f"{key}_gain"] = row["gold_gain_vs_sft"]
            out[f"{key}_win"] = row["win_rate_vs_sft"]
            out[f"{key}_kl"] = row["kl_to_sft"]
            out[f"{key}_curve_gold"] = column(rows, "eval/gold").tolist()
    return out


def decide_oracle(study: Study, results: list[dict]) -> Finding:
    diff = over_seeds([r["oracle_gain"] - r["rm_gain"] for r in results])
    gain = over_seeds([r["oracle_gain"] for r in results])
    beta = study.config.ppo.kl_coef
    fig, (ax,) = figure()
    fig.set_size_inches(7.5, 3.4)
    betas = kl_coefs(study, "oracle_kl_coefs")
    curves = [("curve_gold", "gold", beta), ("rm_curve_gold", "RM", beta)]
    for b in betas:
        curves += [(f"gold_b{b:g}_curve_gold", "gold", b), (f"rm_b{b:g}_curve_gold", "RM", b)]
    colors = ("tab:green", "tab:blue", "tab:olive", "tab:purple", "tab:orange", "tab:red")
    steps = results[0]["curve_step"]
    for (key, reward, b), color in zip(curves, colors * len(curves)):
        # The mean over seeds: one iteration's ppo.batch_size samples are too few to read one seed.
        n = min(len(r[key]) for r in results)
        mean = np.nanmean([r[key][:n] for r in results], axis=0)
        style = "-" if reward == "gold" else "--"
        ax.plot(steps[:n], mean, style, color=color, label=f"reward = {reward}, beta = {b:g}")
    ax.set(xlabel="PPO iteration", ylabel="gold, mean over seeds")
    ax.set_title("gold of each iteration's samples", fontsize=9)
    # Beside the axes: the curves fill the whole plot.
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    parts = [
        f"gold gain over SFT: oracle PPO {shown(gain)}, oracle - RM PPO {shown(diff)} (need the "
        "difference's interval above 0)"
    ]
    for b in betas:
        g, m = (over_seeds([r[f"{w}_b{b:g}_gain"] for r in results]) for w in ("gold", "rm"))
        win = over_seeds([r[f"gold_b{b:g}_win"] for r in results])
        parts.append(f"at beta = {b:g}: oracle {shown(g)} (win rate {shown(win)}), RM {shown(m)}")
    evidence = "; ".join(parts)
    columns = [
        ("oracle gain", "oracle_gain", 3),
        ("oracle KL", "oracle_kl", 2),
        ("oracle win rate", "oracle_win", 3),
        ("RM-PPO gain", "rm_gain", 3),
        ("RM-PPO KL", "rm_kl", 2),
    ]
    for b in betas:
        columns += [
            (f"beta {b:g}: oracle gain", f"gold_b{b:g}_gain", 3),
            ("oracle win", f"gold_b{b:g}_win", 3),
            ("oracle KL", f"gold_b{b:g}_kl", 2),
            ("RM-PPO gain", f"rm_b{b:g}_gain", 3),
            ("RM-PPO KL", f"rm_b{b:g}_kl", 2),
        ]
    table = per_seed_table(results, tuple(columns))
    return Finding(
        "oracle", ORACLE.title, ORACLE.statement, above(diff), evidence, table,
        save_figure(study, fig, "oracle.png"),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# C4: KL levels off at beta > 0 and grows at beta = 0


def run_c4(study: Study, seed: int) -> dict:
    config = plain_ppo(study, seed, kl_coef=0.0)
    rows = train_ppo(study, config, study.variant("c4", seed, "beta0"))
    main_rows = read_metrics(study.main(seed), "ppo")
    kl0, klb = column(rows, "objective/kl"), column(main_rows, "objective/kl")
    (mid0, end0), (midb, endb) = windows(kl0), windows(klb)
    return {
        "beta": study.config.ppo.kl_coef,
        "growth_beta0": end0 - mid0,
        "growth_beta": endb - midb,
        "final_kl_beta0": end0,
        "final_kl_beta": endb,
        "curve_step": [r["step"] for r in rows],
        "kl_beta0": kl0.tolist(),
        "kl_beta": klb.tolist(),
        "main_step": [r["step"] for r in main_rows],
    }


def decide_c4(study: Study, results: list[dict]) -> Finding:
    g0 = over_seeds([r["growth_beta0"] for r in results])
    diff = over_seeds([r["growth_beta0"] - r["growth_beta"] for r in results])
    beta = results[0]["beta"]
    fig, (ax,) = figure()
    for r in results:
        ax.plot(r["curve_step"], r["kl_beta0"], color="tab:red", alpha=0.8)
        ax.plot(r["main_step"], r["kl_beta"], color="tab:blue", alpha=0.8)
    ax.plot([], [], color="tab:red", label="beta = 0")
    ax.plot([], [], color="tab:blue", label=f"beta = {beta:g}")
    ax.set(xlabel="PPO iteration", ylabel="KL to SFT (nats per response)")
    ax.legend()
    passed = above(g0) and above(diff)
    evidence = (
        f"KL growth from the second to the last quarter of PPO: beta = 0 {shown(g0, 2)}, "
        f"beta = 0 minus beta = {beta:g} {shown(diff, 2)} (need both intervals above 0)"
    )
    table = per_seed_table(
        results,
        (
            ("growth, beta = 0", "growth_beta0", 2),
            (f"growth, beta = {beta:g}", "growth_beta", 2),
            ("final KL, beta = 0", "final_kl_beta0", 2),
            (f"final KL, beta = {beta:g}", "final_kl_beta", 2),
        ),
    )
    return Finding(
        "C4", C4.title, C4.statement, passed, evidence, table, save_figure(study, fig, "c4.png")
    )


# --------------------------------------------------------------------------------------------------
# C6: a larger beta against ptx, on the alignment tax


def kl_coefs(study: Study, field: str = "c6_kl_coefs") -> list[float]:
    """The betas of a ``study.<field>`` list (C6's, or ``oracle_kl_coefs``)."""
    return [float(x) for x in names(getattr(study.config.study, field))]


def run_c6(study: Study, seed: int) -> dict:
    models = study.summary(seed)["models"]
    sft_nll = models["sft"]["pretrain_nll"]
    out = {"sft_nll": sft_nll}
    for name in ("ppo", "ppo_ptx"):
        out[f"{name}_gain"] = models[name]["gold_gain_vs_sft"]
        out[f"{name}_tax"] = models[name]["pretrain_nll"] - sft_nll
    for beta in kl_coefs(study):
        config = plain_ppo(study, seed, kl_coef=beta)
        v = study.variant("c6", seed, f"beta{beta:g}")
        train_ppo(study, config, v)
        row = evaluate_policy(study, seed, f"ppo_beta{beta:g}", config, v)
        out[f"beta{beta:g}_gain"] = row["gold_gain_vs_sft"]
        out[f"beta{beta:g}_tax"] = row["pretrain_nll"] - sft_nll
        out[f"beta{beta:g}_kl"] = row["kl_to_sft"]
    return out


def decide_c6(study: Study, results: list[dict]) -> Finding:
    ptx_helps = over_seeds([r["ppo_tax"] - r["ppo_ptx_tax"] for r in results])
    parts = [f"ptx lowers PPO's tax by {shown(ptx_helps)} nats"]
    passed = above(ptx_helps)
    fig, (ax,) = figure()
    beta = study.config.ppo.kl_coef
    points = [("ppo", f"PPO, beta = {beta:g}"), ("ppo_ptx", f"PPO-ptx, beta = {beta:g}")]
    for b in kl_coefs(study):
        key = f"beta{b:g}"
        tax_left = over_seeds([r[f"{key}_tax"] - r["ppo_ptx_tax"] for r in results])
        gold_lost = over_seeds([r["ppo_ptx_gain"] - r[f"{key}_gain"] for r in results])
        # Beta b removes the tax only when its NLL is not clearly above PPO-ptx's; the claim
        # holds for b if the tax clearly stays or the gold is clearly lost.
        holds = None if above(tax_left) is None else (above(tax_left) or above(gold_lost))
        passed = None if passed is None or holds is None else passed and holds
        parts.append(
            f"beta = {b:g}: tax above PPO-ptx's by {shown(tax_left)}, gold below PPO-ptx's by "
            f"{shown(gold_lost)}"
        )
        points.append((key, f"PPO, beta = {b:g}"))
    for (key, label), color in zip(points, ("tab:blue", "tab:green", "tab:red", "tab:purple")):
        xs = [r[f"{key}_tax"] for r in results]
        ys = [r[f"{key}_gain"] for r in results]
        ax.scatter(xs, ys, label=label, color=color)
    ax.scatter([0], [0], color="black", marker="x", label="SFT")
    ax.set(xlabel="alignment tax: pretraining NLL - SFT's", ylabel="gold gain over SFT")
    ax.legend(fontsize=8)
    evidence = "; ".join(parts) + (
        " (need ptx's reduction above 0, and for every larger beta the tax above PPO-ptx's or "
        "the gold below it)"
    )
    columns = [("PPO tax", "ppo_tax", 3), ("PPO gain", "ppo_gain", 3)]
    columns += [("PPO-ptx tax", "ppo_ptx_tax", 3), ("PPO-ptx gain", "ppo_ptx_gain", 3)]
    for b in kl_coefs(study):
        columns += [
            (f"beta {b:g} tax", f"beta{b:g}_tax", 3),
            (f"beta {b:g} gain", f"beta{b:g}_gain", 3),
        ]
    table = per_seed_table(results, tuple(columns))
    return Finding(
        "C6", C6.title, C6.statement, passed, evidence, table, save_figure(study, fig, "c6.png")
    )


# --------------------------------------------------------------------------------------------------
# C7: grouped C(K,2) batches against shuffled pairs


def comparison_records(config, workdir: Path, split: str) -> list[dict]:
    """The stored K-wise comparisons of one split: {prompt, responses, ranks} each."""
    path = sources.dataset(config, workdir, "rm")[0]
    return [from_storage(Kind.COMPARISONS, e) for e in builders.open_source(path, split)]


def as_pairs(records: list[dict]) -> list[dict]:
    """Each K-wise ranking as its C(K,2) pairs, better answer first (tied answers make no pair),
    each a record of its own: the paper's ablation, where every pair is a separate example."""
    out = []
    for rec in records:
        responses, ranks = rec["responses"], [int(r) for r in rec["ranks"]]
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                if ranks[i] == ranks[j]:
                    continue
                a, b = (i, j) if ranks[i] < ranks[j] else (j, i)
                out.append(
                    {
                        "prompt": list(rec["prompt"]),
                        "responses": [list(responses[a]), list(responses[b])],
                        "ranks": [0, 1],
                    }
                )
    return out


def run_c7(study: Study, seed: int) -> dict:
    config, main = study.seed_config(seed), study.main(seed)
    v = study.variant("c7", seed, "pairs", link=("pretrain", "sft"))
    marker = v / "pairs.json"
    if not marker.exists():
        train = as_pairs(comparison_records(config, main, "rm_train"))
        val = as_pairs(comparison_records(config, main, "rm_val"))
        # Shuffled once here; the loader shuffles again each epoch.
        order = np.random.default_rng(seed).permutation(len(train))
        sources.write(
            config, v, Kind.COMPARISONS, {"rm_train": [train[i] for i in order], "rm_val": val}
        )
        marker.write_text(json.dumps({"train_pairs": len(train), "val_pairs": len(val)}))
    pairs = json.loads(marker.read_text())["train_pairs"]
    updates = RunDir(main).committed_steps("rm")[-1]  # the grouped RM's optimiser steps
    # As many pairs per step as make the grouped RM's number of updates, rounded down to split
    # over the data-parallel devices.
    dp = sharding.data_parallel_size(config.mesh)
    batch = max(dp, pairs // updates // dp * dp)
    rm = dataclasses.replace(config.rm, batch_size=batch)
    pairs_config = dataclasses.replace(config, rm=rm)
    stage("rm").run(pairs_config, v)
    # Both RMs are measured on the seed's own K-wise validation comparisons.
    reward_from = dataclasses.replace(config.ppo, reward_from=str(v / "rm"))
    pairs_rm = rm_summary(dataclasses.replace(config, ppo=reward_from), main, study.mesh)
    grouped_rm = study.summary(seed)["rm"]
    return {
        "updates_grouped": updates,
        "updates_pairs": RunDir(v).committed_steps("rm")[-1],
        "pairs_per_step": batch,
        "loss_grouped": grouped_rm["val_loss"],
        "loss_pairs": pairs_rm["val_loss"],
        "accuracy_grouped": grouped_rm["val_accuracy_noisy"],
        "accuracy_pairs": pairs_rm["val_accuracy_noisy"],
        "gold_accuracy_grouped": grouped_rm["val_accuracy_gold"],
        "gold_accuracy_pairs": pairs_rm["val_accuracy_gold"],
    }


def decide_c7(study: Study, results: list[dict]) -> Finding:
    diff = over_seeds([r["loss_pairs"] - r["loss_grouped"] for r in results])
    fig, (ax,) = figure()
    x = np.arange(len(results))
    ax.bar(x - 0.2, [r["loss_grouped"] for r in results], 0.4, label="grouped C(K,2)")
    ax.bar(x + 0.2, [r["loss_pairs"] for r in results], 0.4, label="shuffled pairs")
    ax.set_xticks(x, [f"seed {r['seed']}" for r in results])
    ax.set(ylabel="validation ranking loss")
    ax.legend()
    evidence = (
        f"validation loss of shuffled pairs minus grouped, at equal updates: {shown(diff)} "
        "(need the interval above 0)"
    )
    table = per_seed_table(
        results,
        (
            ("updates", "updates_grouped", 0),
            ("pairs per step", "pairs_per_step", 0),
            ("loss, grouped", "loss_grouped", 4),
            ("loss, pairs", "loss_pairs", 4),
            ("accuracy, grouped", "accuracy_grouped", 3),
            ("accuracy, pairs", "accuracy_pairs", 3),
            ("gold-order accuracy, grouped", "gold_accuracy_grouped", 3),
            ("gold-order accuracy, pairs", "gold_accuracy_pairs", 3),
        ),
    )
    return Finding(
        "C7",
        C7.title,
        C7.statement,
        above(diff),
        evidence,
        table,
        save_figure(study, fig, "c7.png"),
    )


# --------------------------------------------------------------------------------------------------
# C8: SFT's validation NLL against its RM score and gold, epoch by epoch


def run_c8(study: Study, seed: int) -> dict:
    config = study.seed_config(seed)
    if config.study.c8_epochs:
        sft = dataclasses.replace(config.sft, epochs=config.study.c8_epochs)
        config = dataclasses.replace(config, sft=sft)
    v = study.variant("c8", seed, "sft_epochs", link=("pretrain", "rm"))
    world, model = datasets.world(config), policy_model(config)
    test = run_prompts(config, v)[: config.study.c8_prompts]
    reward = load_reward_model(config, v, study.mesh)
    kw = dict(batch_size=config.eval.batch_size, pad_id=lang.PAD_ID)

    def on_validate(params) -> dict:
        responses, mask = ev.sample_responses(
            params,
            model,
            test,
            rng=jax.random.key(seed + 6),
            max_new_tokens=config.data.response_len,
            eos_id=lang.EOS_ID,
            **kw,
        )
        gold = lang.gold_rewards(test, responses, world=world)
        score = ev.response_scores(reward, test, responses, mask, **kw)
        return {"eval/gold": float(gold.mean()), "eval/rm_score": float(score.mean())}

    stage("sft").run(config, v, on_validate=on_validate)
    rows = [r for r in read_metrics(v, "sft") if "val/loss" in r]
    nll, gold, score = (column(rows, k) for k in ("val/loss", "eval/gold", "eval/rm_score"))
    best = int(np.nanargmin(nll))
    return {
        "epochs": len(rows),
        "best_nll_epoch": best + 1,
        "gold_at_best_nll": gold[best],
        "gold_last": gold[-1],
        "score_at_best_nll": score[best],
        "score_last": score[-1],
        "gold_gain_after": gold[-1] - gold[best],
        "score_gain_after": score[-1] - score[best],
        "val_nll": nll.tolist(),
        "gold": gold.tolist(),
        "rm_score": score.tolist(),
    }


def decide_c8(study: Study, results: list[dict]) -> Finding:
    gold = over_seeds([r["gold_gain_after"] for r in results])
    score = over_seeds([r["score_gain_after"] for r in results])
    fig, axes = figure(3)
    for r in results:
        epochs = np.arange(1, r["epochs"] + 1)
        for ax, key in zip(axes, ("val_nll", "rm_score", "gold")):
            ax.plot(epochs, r[key], marker="o", label=f"seed {r['seed']}")
    for ax, label in zip(axes, ("validation NLL (nats per token)", "RM score", "gold")):
        ax.set(xlabel="SFT epoch", ylabel=label)
    axes[0].legend()
    passed = None if above(gold) is None else above(gold) and above(score)
    best = ", ".join(str(r["best_nll_epoch"]) for r in results)
    evidence = (
        f"validation NLL lowest at epoch {best} of {results[0]['epochs']}; from there to the last "
        f"epoch the gold changes by {shown(gold)} and the RM score by {shown(score)} "
        "(need both intervals above 0)"
    )
    table = per_seed_table(
        results,
        (
            ("best-NLL epoch", "best_nll_epoch", 0),
            ("gold there", "gold_at_best_nll", 3),
            ("gold, last epoch", "gold_last", 3),
            ("RM score there", "score_at_best_nll", 3),
            ("RM score, last epoch", "score_last", 3),
        ),
    )
    return Finding(
        "C8", C8.title, C8.statement, passed, evidence, table, save_figure(study, fig, "c8.png")
    )


# --------------------------------------------------------------------------------------------------
# C9: over-optimisation of proxy RMs (Gao et al.)


def comparison_counts(study: Study) -> list[int]:
    return sorted(int(x) for x in names(study.config.study.c9_comparisons))


def best_of_ns(study: Study) -> list[int]:
    top = study.config.study.c9_best_of
    return [2**i for i in range(int(math.log2(top)) + 1)]


def c9_ppo(study: Study, seed: int):
    """Plain PPO at beta = 0 against a proxy, at ``study.c9_lr`` (0: the preset's policy lr).
    Without the KL term the preset's lr leaves the proxy's useful range within a few
    iterations; a smaller one spreads those first nats over the run (docs/instructlang.md)."""
    opt = study.config.ppo.policy_optimizer
    lr = study.config.study.c9_lr or opt.lr
    return plain_ppo(study, seed, kl_coef=0.0, policy_optimizer=dataclasses.replace(opt, lr=lr))


def run_c9(study: Study, seed: int) -> dict:
    config = study.seed_config(seed)
    # One set of rankings by gold alone (Gao et al.) per seed, sampled like the main run's; each
    # proxy learns from the first N in their stored order, so the proxies' data are nested.
    labelled = study.seed_config(
        seed, world=dataclasses.replace(config.world, deterministic_labels=True)
    )
    labels = study.variant("c9", seed, "labels", link=("pretrain", "sft"))
    train = comparison_records(labelled, labels, "rm_train")
    val = comparison_records(labelled, labels, "rm_val")
    ns = best_of_ns(study)
    cand = candidates(study, seed, ns[-1])
    sft_gold = float(cand["gold"].mean())
    out = {"bon_n": ns, "bon_kl": [ev.best_of_n_kl(n) for n in ns], "sft_gold": sft_gold}
    for n_comparisons in comparison_counts(study):
        key = f"n{n_comparisons}"
        v = study.variant("c9", seed, f"rm{n_comparisons}", link=("pretrain", "sft"))
        marker = v / "comparisons.json"
        if not marker.exists():
            # Written under the seed's own config, so the RM and PPO stages here read it as
            # this run's comparisons and rebuild none of the other data.
            kept = train[:n_comparisons]
            sources.write(config, v, Kind.COMPARISONS, {"rm_train": kept, "rm_val": val})
            marker.write_text(json.dumps({"rm_train": len(kept)}))
        stage("rm").run(config, v)
        proxy = ev.response_scores(
            load_reward_model(config, v, study.mesh), cand["prompts"], cand["responses"],
            cand["mask"],
            batch_size=config.eval.batch_size, pad_id=lang.PAD_ID,
        ).reshape(cand["gold"].shape)  # fmt: skip
        curve = oo.best_of_n_curve(proxy, cand["gold"], ns)
        out[f"{key}_bon_gold"] = [curve[n][0] - sft_gold for n in ns]
        out[f"{key}_bon_proxy"] = [curve[n][1] for n in ns]
        rows = train_ppo(study, c9_ppo(study, seed), v)
        kl = column(rows, "objective/kl")
        gold, proxy_curve = column(rows, "eval/gold"), column(rows, "objective/score")
        out[f"{key}_rl_kl"] = kl.tolist()
        out[f"{key}_rl_gold"] = (gold - sft_gold).tolist()
        out[f"{key}_rl_proxy"] = proxy_curve.tolist()
        (g_mid, g_end), (p_mid, p_end) = windows(gold), windows(proxy_curve)
        out[f"{key}_rl_gold_fall"] = g_mid - g_end
        out[f"{key}_rl_gold_rise"] = g_mid - sft_gold
        out[f"{key}_rl_proxy_rise"] = p_end - p_mid
    return out


def candidates(study: Study, seed: int, n: int) -> dict:
    """The seed's SFT model's ``n`` answers to each of ``study.c9_prompts`` test prompts, with
    their gold, drawn once per seed and kept in ``candidates.npz``."""
    path = study.dir / "c9" / f"seed{seed}" / "candidates.npz"
    if path.exists():
        return dict(np.load(path))
    config, main = study.seed_config(seed), study.main(seed)
    test = run_prompts(config, main)[: config.study.c9_prompts]
    prompts = np.repeat(test, n, axis=0)
    params = load_policy(config, main, "sft", study.mesh)
    responses, mask = ev.sample_responses(
        params, policy_model(config), prompts, rng=jax.random.key(seed + 9),
        batch_size=config.eval.batch_size, max_new_tokens=config.data.response_len,
        eos_id=lang.EOS_ID, pad_id=lang.PAD_ID,
    )  # fmt: skip
    gold = lang.gold_rewards(prompts, responses, world=datasets.world(config)).reshape(len(test), n)
    out = {"prompts": prompts, "responses": responses, "mask": mask, "gold": gold}
    tmp = path.with_name("candidates.tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)
    return out


def _fit(d: np.ndarray, gain: np.ndarray, form: str) -> tuple[float, float, float] | None:
    ok = np.isfinite(d) & np.isfinite(gain)
    try:
        alpha, beta = oo.fit(d[ok], gain[ok], form)
    except ValueError:  # fewer than two distinct points: no fit
        return None
    return alpha, beta, oo.peak(alpha, beta, form)


def decide_c9(study: Study, results: list[dict]) -> Finding:
    counts = comparison_counts(study)
    small = f"n{counts[0]}"
    fall = over_seeds([r[f"{small}_rl_gold_fall"] for r in results])
    rise = over_seeds([r[f"{small}_rl_gold_rise"] for r in results])
    proxy = over_seeds([r[f"{small}_rl_proxy_rise"] for r in results])
    passed = None if above(fall) is None else above(fall) and above(rise) and above(proxy)
    fig, axes = figure(2)
    colors = ("tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple")
    lines = ["| proxy comparisons | form | alpha | beta | peak sqrt(KL) |", "|---|---|---|---|---|"]
    for n_comparisons, color in zip(counts, colors):
        key = f"n{n_comparisons}"
        bon_d = np.sqrt(np.concatenate([r["bon_kl"] for r in results]))
        bon_g = np.concatenate([r[f"{key}_bon_gold"] for r in results])
        rl_d = np.sqrt(np.maximum(np.concatenate([r[f"{key}_rl_kl"] for r in results]), 0.0))
        rl_g = np.concatenate([r[f"{key}_rl_gold"] for r in results])
        axes[0].scatter(bon_d, bon_g, color=color, s=10, label=f"{n_comparisons} comparisons")
        axes[1].scatter(rl_d, rl_g, color=color, s=6, label=f"{n_comparisons} comparisons")
        for ax, d, g, form in ((axes[0], bon_d, bon_g, "bon"), (axes[1], rl_d, rl_g, "rl")):
            fitted = _fit(d, g, form)
            if fitted is None:
                continue
            alpha, beta, top = fitted
            grid = np.linspace(0, np.nanmax(d), 100)
            ax.plot(grid, oo.curve(grid, alpha, beta, form), color=color)
            lines.append(f"| {n_comparisons} | {form} | {alpha:.3f} | {beta:.3f} | {fmt(top, 2)} |")
    axes[0].set(xlabel="sqrt(KL), best-of-n", ylabel="gold gain over SFT")
    axes[1].set(xlabel="sqrt(KL), PPO at beta = 0", ylabel="gold gain over SFT")
    axes[0].legend(fontsize=8)
    evidence = (
        f"PPO at beta = 0 on the {counts[0]}-comparison proxy: gold rises by {shown(rise)} by the "
        f"second quarter, then falls by {shown(fall)} to the last quarter, while the proxy score "
        f"rises by {shown(proxy)} (need all three intervals above 0)"
    )
    table = per_seed_table(
        results,
        tuple(
            (f"{n} comparisons: {what}", f"n{n}_rl_{key}", 3)
            for n in counts
            for what, key in (("gold rise", "gold_rise"), ("gold fall", "gold_fall"))
        ),
    )
    table += ["", "Fitted forms (all seeds pooled; gold gain over SFT against d = sqrt(KL)):", ""]
    return Finding(
        "C9", C9.title, C9.statement, passed, evidence, table + lines,
        save_figure(study, fig, "c9.png"),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# C3: a small PPO-ptx policy against a larger base model


def run_c3(study: Study, seed: int) -> dict:
    s, base = study.config.study, study.config.model
    keep = dict(vocab_size=base.vocab_size, max_len=base.max_len, dtype=base.dtype)
    small = study.seed_config(seed, model=C.model_config(s.c3_policy_size, **keep), methods="")
    # Its own comparisons: sampled from its own SFT model, not copied from the main run's.
    v = study.variant("c3", seed, f"policy_{s.c3_policy_size}", link=(), comparisons=False)
    small_summary = run_pipeline(small, v)
    if s.c3_base_size:
        large = study.seed_config(seed, model=C.model_config(s.c3_base_size, **keep))
        lv = study.variant("c3", seed, f"base_{s.c3_base_size}", link=())
        stage("pretrain").run(large, lv)
    else:
        large, lv = study.seed_config(seed), study.main(seed)
    big = load_policy(large, lv, "pretrain", study.mesh)
    policy = load_policy(small, v, "ppo_ptx", study.mesh)
    evaluator = study.evaluator(seed)
    common = dict(
        world=evaluator.world, test_prompts=evaluator.prompts, heldout_docs=None,
        rng=jax.random.key(seed + 6), batch_size=study.config.eval.batch_size,
        max_new_tokens=study.config.data.response_len,
        samples_per_prompt=study.config.eval.samples_per_prompt,
    )  # fmt: skip
    base_eval = evaluate_model("base", big, policy_model(large), **common)
    ref = ev.Reference(big, policy_model(large), base_eval.golds)
    small_eval = evaluate_model("ppo_ptx", policy, policy_model(small), reference=ref, **common)
    win = small_eval.win_rate_vs_sft  # against the reference: here the large base
    return {
        "policy_size": s.c3_policy_size,
        "base_size": s.c3_base_size or f"main ({base.n_layers}L/{base.d_model})",
        "win_rate": win.value,
        "win_ci95": [win.lo, win.hi],
        "policy_gold": small_eval.gold_ci95[0],
        "base_gold": base_eval.gold_ci95[0],
        "policy_sft_gold": small_summary["models"]["sft"]["gold_mean"],
    }


def decide_c3(study: Study, results: list[dict]) -> Finding:
    win = over_seeds([r["win_rate"] for r in results])
    small, large = results[0]["policy_size"], results[0]["base_size"]
    fig, (ax,) = figure()
    x = np.arange(len(results))
    ax.bar(x - 0.25, [r["base_gold"] for r in results], 0.25, label=f"{large} base")
    ax.bar(x, [r["policy_sft_gold"] for r in results], 0.25, label=f"{small} SFT")
    ax.bar(x + 0.25, [r["policy_gold"] for r in results], 0.25, label=f"{small} PPO-ptx")
    ax.set_xticks(x, [f"seed {r['seed']}" for r in results])
    ax.set(ylabel="gold")
    # Above the axes, in one row: inside them it covers the last seed's bars.
    ax.legend(fontsize=8, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    evidence = (
        f"gold win rate of the {small} PPO-ptx policy over the {large} base: {shown(win)} "
        "(need the interval above 0.5)"
    )
    table = per_seed_table(
        results,
        (
            ("win rate", "win_rate", 3),
            (f"{small} PPO-ptx gold", "policy_gold", 3),
            (f"{small} SFT gold", "policy_sft_gold", 3),
            (f"{large} base gold", "base_gold", 3),
        ),
    )
    return Finding(
        "C3", C3.title, C3.statement, above(win, 0.5), evidence, table,
        save_figure(study, fig, "c3.png"),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The registry

C3 = Experiment(
    "c3", "size ladder", "a small PPO-ptx policy beats a several-times larger base model on gold",
    run_c3, decide_c3,
)  # fmt: skip
C4 = Experiment(
    "c4", "KL plateau", "KL to the SFT policy levels off at beta > 0 and keeps growing at beta = 0",
    run_c4, decide_c4,
)  # fmt: skip
C6 = Experiment(
    "c6", "beta against ptx",
    "a larger beta cannot remove the alignment tax without a clear gold loss; ptx can",
    run_c6, decide_c6,
)  # fmt: skip
C7 = Experiment(
    "c7", "RM batching",
    "grouped C(K,2) RM batches reach a lower validation loss than shuffled pairs at equal updates",
    run_c7, decide_c7,
)  # fmt: skip
C8 = Experiment(
    "c8", "SFT epochs",
    "SFT's validation NLL bottoms out early while its RM score and gold keep improving",
    run_c8, decide_c8,
)  # fmt: skip
C9 = Experiment(
    "c9", "over-optimisation",
    "with a small-data proxy RM and beta = 0, the proxy keeps rising while gold rises, then falls",
    run_c9, decide_c9,
)  # fmt: skip
ORACLE = Experiment(
    "oracle", "oracle PPO", "PPO on the gold reward gains more gold than PPO on the RM",
    run_oracle, decide_oracle,
)  # fmt: skip
EXPERIMENTS = {e.name: e for e in (C3, C4, C6, C7, C8, C9, ORACLE)}
