"""The world's gold evaluation, fact probes, RM accuracy against gold order, the claim checks and
the report."""

import json
import math

import jax
import numpy as np
import pytest

from rlhf_jax import evaluate as ev
from rlhf_jax import report as common_report
from rlhf_jax.config import model_config
from rlhf_jax.evaluate import Reference
from rlhf_jax.instructlang import claims as C
from rlhf_jax.instructlang import corpus, evaluate, lang, report
from rlhf_jax.model import init_params
from rlhf_jax.rollout import RewardModel

R = lang.RESPONSE_LEN


def _model(seed=0, **kw):
    cfg = model_config("tiny", vocab_size=64, max_len=32, **kw)
    return cfg, init_params(cfg, jax.random.key(seed))


@pytest.fixture(scope="module")
def world():
    return lang.make_world(0)


# --------------------------------------------------------------------------------------------------
# Whole-model evaluation


def test_sft_against_itself_has_half_win_rate_and_zero_kl(world):
    cfg, params = _model()
    prompts = corpus.sample_prompts(np.random.default_rng(1), 12)
    docs = corpus.make_pretraining_corpus(world, 6, split="heldout")
    kw = dict(rng=jax.random.key(7), batch_size=8, max_new_tokens=R)
    sft = evaluate.evaluate_model(
        "sft", params, cfg, world, prompts, docs, reference=Reference(params, cfg), **kw
    )
    assert sft.win_rate_vs_sft == (0.5, 0.5, 0.5)  # an Interval: (value, lo, hi)
    assert sft.gold_gain_vs_sft == (0.0, 0.0, 0.0)
    assert sft.kl_to_sft == 0.0

    # The same rng reproduces the SFT samples, so passing its golds back gives the same answer.
    again = evaluate.evaluate_model(
        "sft", params, cfg, world, prompts, docs, reference=Reference(params, cfg, sft.golds), **kw
    )
    np.testing.assert_array_equal(again.golds, sft.golds)
    assert again.win_rate_vs_sft[0] == 0.5 and again.kl_to_sft == 0.0

    other_cfg, other = _model(seed=1)
    ppo = evaluate.evaluate_model(
        "ppo",
        other,
        other_cfg,
        world,
        prompts,
        docs,
        reference=Reference(params, cfg, sft.golds),
        **kw,
    )
    assert math.isfinite(ppo.kl_to_sft) and ppo.kl_to_sft != 0.0
    # The gain is the mean of the per-prompt differences, with the interval of that mean.
    diff = (ppo.golds - sft.golds)[:, 0]  # one sample per prompt
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff))
    np.testing.assert_allclose(
        ppo.gold_gain_vs_sft, (diff.mean(), diff.mean() - half, diff.mean() + half), rtol=1e-12
    )

    s = json.loads(json.dumps(sft.summary()))
    keys = ("gold_mean", "win_rate_vs_sft", "gold_gain_vs_sft", "kl_to_sft", "pretrain_nll")
    for key in keys + ("fact_accuracy",):
        assert isinstance(s[key], float)
    assert s["gold_mean"] == pytest.approx(float(np.mean(sft.golds)))
    assert s["gold_ci95"][0] <= s["gold_mean"] <= s["gold_ci95"][1]
    assert {"eos_rate", "attempts_task", "follows_constraint", "toxic"} <= set(s)
    assert "hallucination" in s
    samples = sft.samples(3)
    assert [x["model"] for x in samples] == ["sft"] * 3
    assert samples[0]["prompt"].startswith("<bos>") and "<pad>" not in samples[0]["prompt"]
    assert samples[0]["gold"] == sft.golds[0, 0]

    # k samples per prompt: the rows of the same stream over the prompts repeated k times; a
    # prompt's gold is the mean of its k, and its win rate the mean of its k paired outcomes.
    k4 = dict(kw, samples_per_prompt=4)
    sft4 = evaluate.evaluate_model("sft", params, cfg, world, prompts, docs, **k4)
    four = evaluate.evaluate_model(
        "ppo",
        other,
        other_cfg,
        world,
        prompts,
        docs,
        reference=Reference(params, cfg, sft4.golds),
        **k4,
    )
    assert four.golds.shape == (12, 4)
    rep = np.repeat(prompts, 4, axis=0)
    responses, _ = ev.sample_responses(
        other, other_cfg, rep, rng=jax.random.key(7), batch_size=8, max_new_tokens=R, **evaluate.IDS
    )
    np.testing.assert_array_equal(
        four.golds.ravel(), lang.gold_rewards(rep, responses, world=world)
    )
    s4 = four.summary()
    assert s4["samples_per_prompt"] == 4 and s4["n_prompts"] == 12
    assert s4["gold_mean"] == pytest.approx(four.golds.mean())
    outcome = np.where(four.golds > sft4.golds, 1.0, np.where(four.golds == sft4.golds, 0.5, 0.0))
    assert s4["win_rate_vs_sft"] == pytest.approx(outcome.mean())
    d = (four.golds - sft4.golds).mean(axis=1)
    half = 1.96 * d.std(ddof=1) / math.sqrt(12)
    np.testing.assert_allclose(four.gold_gain_vs_sft, (d.mean(), d.mean() - half, d.mean() + half))


def test_best_of_n_row_is_gold_of_the_rms_picks(world):
    cfg, params = _model()
    rm_cfg, rm = _model(seed=2, head="scalar")
    prompts = corpus.sample_prompts(np.random.default_rng(1), 6)
    docs = corpus.make_pretraining_corpus(world, 4, split="heldout")
    kw = dict(rng=jax.random.key(7), batch_size=8, max_new_tokens=R, samples_per_prompt=2)
    sft = evaluate.evaluate_model("sft", params, cfg, world, prompts, docs, **kw)
    bon = evaluate.evaluate_model(
        "best_of_n",
        params,
        cfg,
        world,
        prompts,
        docs,
        reference=Reference(params, cfg, sft.golds),
        reward=RewardModel(rm, rm_cfg, 0.0),
        best_of=4,
        **kw,
    )
    rep = np.repeat(prompts, 2, axis=0)
    picks, _, _ = ev.best_of_n(
        params, cfg, rep, n=4, reward=RewardModel(rm, rm_cfg, 0.0), rng=jax.random.key(7),
        batch_size=8,
        max_new_tokens=R, **evaluate.IDS,
    )  # fmt: skip
    np.testing.assert_array_equal(bon.golds.ravel(), lang.gold_rewards(rep, picks, world=world))
    s = bon.summary()
    assert s["kl_to_sft"] == pytest.approx(math.log(4) - 3 / 4)
    assert s["gold_gain_per_nat"] == pytest.approx(s["gold_gain_vs_sft"] / s["kl_to_sft"])
    # The weights are SFT's: the same tax columns.
    assert (s["pretrain_nll"], s["fact_accuracy"]) == (sft.pretrain_nll, sft.fact_accuracy)
    assert sft.summary()["gold_gain_per_nat"] is None  # KL 0: no ratio


def test_rm_score_of_each_answer_and_of_best_of_n_picks(world):
    cfg, params = _model()
    rm_cfg, rm = _model(seed=2, head="scalar")
    prompts = corpus.sample_prompts(np.random.default_rng(1), 6)
    kw = dict(rng=jax.random.key(7), batch_size=8, max_new_tokens=R, samples_per_prompt=3)
    plain = evaluate.evaluate_model("sft", params, cfg, world, prompts, None, **kw)
    assert plain.rm_scores is None and plain.summary()["rm_score"] is None

    scored = evaluate.evaluate_model(
        "sft", params, cfg, world, prompts, None, reward=RewardModel(rm, rm_cfg, 0.0), **kw
    )
    np.testing.assert_array_equal(scored.golds, plain.golds)  # scoring changes no sample
    rep = np.repeat(prompts, 3, axis=0)
    responses, mask = ev.sample_responses(
        params, cfg, rep, rng=jax.random.key(7), batch_size=8, max_new_tokens=R, **evaluate.IDS
    )
    one_by_one = [  # each answer alone, in a batch of one: the same score
        ev.response_scores(RewardModel(rm, rm_cfg, 0.0), rep[i : i + 1],
                           responses[i : i + 1], mask[i : i + 1], batch_size=1,
                           pad_id=lang.PAD_ID)[0]
        for i in range(len(rep))
    ]  # fmt: skip
    np.testing.assert_allclose(scored.rm_scores.ravel(), one_by_one, rtol=1e-5, atol=1e-5)
    # The bias is subtracted from every score (demonstrations score 0).
    shifted = evaluate.evaluate_model(
        "sft", params, cfg, world, prompts, None, reward=RewardModel(rm, rm_cfg, 0.5), **kw
    )
    np.testing.assert_allclose(shifted.rm_scores, scored.rm_scores - 0.5, rtol=1e-6, atol=1e-6)
    assert scored.summary()["rm_score"] == pytest.approx(float(scored.rm_scores.mean()))

    # best-of-n: the score of each pick is the largest of its n candidates' scores.
    bon = evaluate.evaluate_model(
        "best_of_n",
        params,
        cfg,
        world,
        prompts,
        None,
        reward=RewardModel(rm, rm_cfg, 0.0),
        best_of=4,
        **kw,
    )
    cand = np.repeat(rep, 4, axis=0)
    c_resp, c_mask = ev.sample_responses(
        params, cfg, cand, rng=jax.random.key(7), batch_size=8, max_new_tokens=R, **evaluate.IDS
    )
    c_scores = ev.response_scores(RewardModel(rm, rm_cfg, 0.0), cand, c_resp, c_mask,
                                  batch_size=8, pad_id=lang.PAD_ID)  # fmt: skip
    np.testing.assert_allclose(bon.rm_scores.ravel(), c_scores.reshape(-1, 4).max(axis=1))


def test_within_prompt_accuracy_counts_pairs_of_distinct_gold():
    # By hand. Prompt 0's golds (0.1, 0.5, 0.2, 0.2) make 5 ordered pairs (1>0, 1>2, 1>3, 2>0,
    # 3>0; 2 and 3 tie); scores (1, 2, 3, 3) order 1>0, 2>0 and 3>0 right, 1>2 and 1>3 wrong:
    # 3 of 5. Prompt 1's equal golds make no pair; prompt 2's (0, 1, 0, 0) make 3, all right.
    result = evaluate.ModelEval(
        name="sft",
        golds=np.array([[0.1, 0.5, 0.2, 0.2], [0.3] * 4, [0.0, 1.0, 0.0, 0.0]]),
        metadata={},
        pretrain_nll=float("nan"),
        fact_accuracy=float("nan"),
        win_rate_vs_sft=None,
        gold_gain_vs_sft=None,
        kl_to_sft=None,
        prompt_texts=[],
        response_texts=[],
        rm_scores=np.array([[1.0, 2.0, 3.0, 3.0], [0.0, 1.0, 2.0, 3.0], [0.0, 0.5, 0.1, 0.2]]),
    )
    out = evaluate.within_prompt_accuracy(result)
    assert out == {"sft_pairs_accuracy_gold": pytest.approx(6 / 8), "sft_pairs": 8}


# --------------------------------------------------------------------------------------------------
# Fact probes


def test_fact_scores_is_both_tokens_right():
    answers = np.array([[30, 40], [31, 41], [32, 42]])
    outputs = np.array([[30, 40, 2], [31, 2, 0], [41, 31, 2]])  # right, half right, swapped
    np.testing.assert_array_equal(evaluate.fact_scores(outputs, answers), [True, False, False])


def test_fact_accuracy_scores_greedy_outputs_against_kb(world, monkeypatch):
    cfg, params = _model()
    probes, kb = corpus.fact_probes(world)
    seen = {}

    def scripted(answer):
        def fake(params, config, prompts, *, rng, batch_size, max_new_tokens, greedy, **kw):
            seen.update(greedy=greedy, max_new_tokens=max_new_tokens, prompts=prompts)
            return answer.astype(np.int32), np.ones_like(answer, np.int32)

        return fake

    monkeypatch.setattr(ev, "sample_responses", scripted(kb))
    assert evaluate.fact_accuracy(params, cfg, world, batch_size=8) == 1.0
    assert seen["greedy"] and seen["max_new_tokens"] == 2
    np.testing.assert_array_equal(seen["prompts"], probes)
    monkeypatch.setattr(ev, "sample_responses", scripted(kb[:, ::-1]))
    assert evaluate.fact_accuracy(params, cfg, world, batch_size=8) == 0.0


def test_fact_accuracy_runs_a_real_model(world):
    cfg, params = _model()
    acc = evaluate.fact_accuracy(params, cfg, world, batch_size=16)
    assert 0.0 <= acc <= 1.0 and acc * 32 == int(acc * 32)


# --------------------------------------------------------------------------------------------------
# Reward model


def test_rm_metrics_against_noisy_labels_and_gold_order_hand_worked():
    # The library's hand-worked case (tests/test_evaluate.py), plus gold order.
    rewards = np.array([[3.0, 1.0, 2.0], [0.0, 1.0, 100.0]])
    ranks = np.array([[0, 1, 2], [1, 0, -1]])
    valid = np.array([[1, 1, 1], [1, 1, 0]])
    golds = np.array([[0.5, 0.9, 0.1], [0.2, 0.2, 0.0]])
    m = ev.rm_metrics(rewards, ranks, valid, golds)
    noisy = ev.rm_metrics(rewards, ranks, valid)
    assert (
        (m["val_accuracy_noisy"], m["val_pairs_noisy"])
        == (0.75, 4)
        == (
            noisy["val_accuracy"],
            noisy["val_pairs"],
        )
    )
    assert m["val_loss"] == noisy["val_loss"]
    # Gold pairs: prompt 0 (1,0) wrong, (1,2) wrong, (0,2) right; prompt 1 is a gold tie: 1 / 3.
    assert m["val_accuracy_gold"] == pytest.approx(1 / 3) and m["val_pairs_gold"] == 3


# --------------------------------------------------------------------------------------------------
# Report


def _row(gold, win, kl, nll, fact, halluc, toxic, follows):
    return {
        "gold_mean": gold,
        "gold_ci95": [gold - 0.03, gold + 0.03],
        "win_rate_vs_sft": win,
        "win_rate_ci95": [win - 0.03, win + 0.03],
        "gold_gain_vs_sft": gold - 0.70,
        "gold_gain_ci95": [gold - 0.72, gold - 0.68],
        "kl_to_sft": kl,
        "pretrain_nll": nll,
        "fact_accuracy": fact,
        "eos_rate": 0.9,
        "attempts_task": 0.8,
        "follows_constraint": follows,
        "hallucination": halluc,
        "toxic": toxic,
    }


def _summary():
    return {
        "config": "tiny",
        "seed": 0,
        "models": {
            "base": _row(0.01, 0.1, 9.0, 2.00, 0.90, 0.40, 0.05, 0.2),
            "sft": _row(0.70, 0.5, 0.0, 2.10, 0.85, 0.10, 0.02, 0.7),
            "ppo": _row(0.85, 0.7, 6.0, 2.40, 0.60, 0.05, 0.00, 0.9),
            "ppo_ptx": _row(0.83, 0.68, 5.0, 2.05, 0.80, 0.05, 0.00, 0.9),
        },
        "rm": {"val_accuracy_noisy": 0.74, "val_accuracy_gold": 0.86, "val_loss": 0.55},
        "seconds": {"pretrain": 100.0, "sft": 20.0, "rm": 15.0, "ppo": 300.0},
    }


def test_check_claims_on_hand_built_summaries():
    claims = {c.name: c for c in C.check_claims(_summary())}
    assert list(claims) == ["C1", "C2", "C4", "C5", "C10"]
    assert all(c.passed for c in claims.values()), [c.line() for c in claims.values()]
    assert "|ppo - ppo_ptx| = 0.020" in claims["C1"].evidence

    noisy = _summary()  # PPO's mean is above SFT's, but the paired interval includes 0
    noisy["models"]["ppo"]["gold_gain_ci95"] = [-0.01, 0.31]
    claims = {c.name: c for c in C.check_claims(noisy)}
    assert claims["C1"].passed is False and "lower bound -0.010" in claims["C1"].evidence

    worse = _summary()
    worse["models"]["ppo"]["gold_mean"] = 0.6  # below SFT, and 0.23 under PPO-ptx
    worse["models"]["ppo"]["win_rate_ci95"] = [0.45, 0.55]
    worse["models"]["ppo"]["kl_to_sft"] = float("nan")
    claims = {c.name: c for c in C.check_claims(worse)}
    assert claims["C1"].passed is False and claims["C2"].passed is False
    assert claims["C4"].passed is False
    assert claims["C5"].passed  # tax and recovery do not depend on PPO's own gold

    no_recovery = _summary()
    no_recovery["models"]["ppo_ptx"]["fact_accuracy"] = 0.55  # below PPO: nothing recovered
    no_recovery["models"]["base"]["toxic"] = 0.0  # PPO at the optimum still counts for C10
    claims = {c.name: c for c in C.check_claims(no_recovery)}
    assert claims["C5"].passed is False and "recovery" in claims["C5"].evidence
    assert claims["C10"].passed


def test_check_claims_without_ppo_ptx():
    s = _summary()
    del s["models"]["ppo_ptx"]
    claims = {c.name: c for c in C.check_claims(s)}
    assert claims["C1"].passed and claims["C2"].passed and claims["C10"].passed
    assert claims["C5"].passed is None and "recovery needs ppo_ptx" in claims["C5"].evidence
    assert claims["C5"].status == "N/A"


def test_curves_are_drawn_against_the_logged_iteration(tmp_path):
    # Rows logged every 10 iterations sit at x = 10, 20, 30; a row without the metric is skipped.
    run = {"step": [10, 20, 30], "kl": [0.0, None, 2.0]}
    assert common_report._points(run, "kl") == ([10, 30], [0.0, 2.0])
    assert common_report._points({"kl": [0.5, 0.7]}, "kl") == ([1, 2], [0.5, 0.7])
    files = common_report.plot_curves(tmp_path, {"ppo": run, "grpo": {"step": [5]}}, {})
    assert files == ["curve_kl.png"]  # "step" is the x axis, not a metric


@pytest.mark.parametrize("with_ptx", [True, False])
def test_write_report(tmp_path, with_ptx):
    summary = _summary()
    curves = {"ppo": {"gold": [0.7, 0.8, 0.85], "kl": [0.0, 3.0, 5.0], "clipfrac": [0.1, 0.05, 0]}}
    if with_ptx:
        curves["ppo_ptx"] = {"gold": [0.7, 0.78], "kl": [0.0, 2.5], "pretrain_nll": [2.1, 2.05]}
    else:
        del summary["models"]["ppo_ptx"]
    samples = [
        {"model": m, "prompt": "<bos> REV c3 c9 <sep>", "response": "c9 c3 <eos>", "gold": 1.0}
        for m in summary["models"]
        for _ in range(4)
    ]
    report.write_report(tmp_path / "run", summary, curves, samples)
    out = tmp_path / "run"
    assert json.loads((out / "summary.json").read_text()) == summary
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == samples
    pngs = {"gold.png", "curve_gold.png", "curve_kl.png", "curve_clipfrac.png"}
    if with_ptx:
        pngs.add("curve_pretrain_nll.png")
    assert {p.name for p in out.glob("*.png")} == pngs
    for name in pngs:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    md = (out / "report.md").read_text()
    assert "`tiny`" in md and "seed 0" in md and "ppo 300.0 s" in md
    row = "| base | 0.010 [-0.020, 0.040] | -0.690 [-0.710, -0.670] | 0.100 [0.070, 0.130] | 9.00 |"
    assert row in md
    assert "| sft | 0.700 [0.670, 0.730] |" in md
    assert ("| ppo_ptx |" in md) == with_ptx
    assert "| val_accuracy_noisy | 0.740 |" in md
    for claim in ("**C1 PASS**", "**C2 PASS**", "**C4 PASS**", "**C10 PASS**"):
        assert claim in md
    assert ("**C5 PASS**" if with_ptx else "**C5 N/A**") in md
    for name in pngs:
        assert f"]({name})" in md
    assert md.count("c9 c3 <eos>") == 3 * len(summary["models"])


def test_seeds_markdown_is_mean_and_sd_over_seeds():
    a, b, c = _summary(), _summary(), _summary()
    b["seed"], c["seed"] = 1, 2
    b["models"]["ppo"]["gold_mean"] = 0.87
    c["models"]["ppo"]["gold_mean"] = 0.60  # below SFT: C1 fails for this seed
    c["models"]["ppo"]["kl_to_sft"] = None  # left out of the mean; C4 fails for this seed
    md = report.seeds_markdown([a, b, c])
    # Hand calculation: ppo gold 0.85, 0.87, 0.60: mean 0.77333, deviations 0.07667, 0.09667,
    # -0.17333, sd = sqrt(sum of squares / 2) = 0.15044.
    assert "| ppo | 0.773 ± 0.150 |" in md
    assert "| 6.00 ± 0.00 |" in md  # KL: the two seeds that have it
    assert "over 3 seeds (0, 1, 2)" in md and "Minutes per run: 7.2 ± 0.0" in md
    assert "(1 sample per test prompt at T = 1)" in md  # rows without the key: one sample
    assert "0.740 ± 0.000 against the noisy labels" in md
    assert "| C1: gold reward: base < SFT < PPO ~ PPO-ptx | 2 of 3 |" in md
    assert "| C4: KL(pi || pi_sft) stays bounded (finite, a few nats) at beta > 0 | 2 of 3 |" in md
    assert "| C10: hallucination, toxicity and constraint following" in md and "| 3 of 3 |" in md
