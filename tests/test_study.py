"""``rlhf-jax study``: its statistics and estimators against hand values, and every experiment
end to end through the CLI at the tiny size (two seeds), including what each must hold whatever
its numbers: equal updates in C7, deterministic rankings in C9, the gold as the oracle's reward,
C8's SFT equal to the main run's, links instead of copies, and a rerun that trains nothing."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest

from rlhf_jax import overoptimization as oo
from rlhf_jax import stats
from rlhf_jax.configs import tiny
from rlhf_jax.data.sources import read_all
from rlhf_jax.errors import ConfigError
from rlhf_jax.instructlang import datasets, lang
from rlhf_jax.instructlang.experiments import (
    EXPERIMENTS,
    as_pairs,
    c9_ppo,
    comparison_records,
    windows,
)
from rlhf_jax.instructlang.study import markdown, selected
from rlhf_jax.instructlang.variants import Finding, Study
from rlhf_jax.report import read_metrics
from rlhf_jax.rundir import RunDir

SEEDS = ("0", "1")
C9_LR = 3e-4  # not the tiny preset's PPO lr (checked below)
T_975_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (tables)


def test_seeds_ci95_is_students_t():
    mean, lo, hi = stats.seeds_ci95([1.0, 2.0, 3.0])  # sd 1, n 3
    assert mean == 2.0
    assert hi - mean == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-9)
    assert mean - lo == pytest.approx(hi - mean, rel=1e-12)
    assert stats.seeds_ci95([0.7]) == (0.7, 0.7, 0.7)


def test_best_of_n_curve_keeps_the_proxys_pick_of_each_disjoint_group():
    rng = np.random.default_rng(0)
    proxy = rng.normal(size=(5, 8))
    proxy[0, :2] = 1.0  # a tie: the first of equal scores is kept
    gold = rng.normal(size=(5, 8))
    curve = oo.best_of_n_curve(proxy, gold, [1, 2, 8])
    # An independent loop over prompts and groups.
    for n in (1, 2, 8):
        picks = []
        for i in range(5):
            for g in range(8 // n):
                group = range(g * n, g * n + n)
                best = max(group, key=lambda j: (proxy[i, j], -j))
                picks.append((gold[i, best], proxy[i, best]))
        assert curve[n] == pytest.approx(tuple(np.mean(picks, axis=0)), rel=1e-12)
    assert curve[1] == pytest.approx((gold.mean(), proxy.mean()))
    with pytest.raises(ValueError, match="does not divide"):
        oo.best_of_n_curve(proxy, gold, [3])


def test_as_pairs_makes_one_record_per_untied_pair_better_first():
    rec = {"prompt": [5, 6], "responses": [[7], [8, 2], [9]], "ranks": [1, 0, 1]}
    pairs = as_pairs([rec])
    # Answers 0 and 2 tie (rank 1): no pair. Answer 1 (rank 0) beats both.
    assert [p["responses"] for p in pairs] == [[[8, 2], [7]], [[8, 2], [9]]]
    assert all(p["ranks"] == [0, 1] and p["prompt"] == [5, 6] for p in pairs)


def test_c9_ppo_keeps_the_presets_lr_unless_study_c9_lr_is_set(tmp_path):
    config = tiny.get_config()
    preset = config.ppo.policy_optimizer
    for c9_lr, lr in ((0.0, preset.lr), (C9_LR, C9_LR)):
        study = dataclasses.replace(config.study, c9_lr=c9_lr)
        ppo = c9_ppo(Study(dataclasses.replace(config, study=study), tmp_path, [0]), 0).ppo
        assert (ppo.kl_coef, ppo.ptx_coef) == (0.0, 0.0)
        assert ppo.policy_optimizer == dataclasses.replace(preset, lr=lr)  # only the lr moves


def test_windows_are_the_second_and_last_quarters():
    assert windows(np.arange(8.0)) == (2.5, 6.5)
    assert windows(np.array([1.0, 2.0, 4.0])) == (1.0, 4.0)  # one point each at least


def test_study_experiments_selects_every_one_or_those_named():
    config = tiny.get_config()
    assert config.study.experiments == "all"
    assert [e.name for e in selected(config)] == list(EXPERIMENTS)
    two = dataclasses.replace(
        config, study=dataclasses.replace(config.study, experiments="oracle,c4")
    )
    assert [e.name for e in selected(two)] == ["oracle", "c4"]
    bad = dataclasses.replace(config, study=dataclasses.replace(config.study, experiments="c4,c5"))
    with pytest.raises(ConfigError, match="study.experiments='c4,c5': unknown c5; known: all, c3"):
        selected(bad)


def test_study_markdown_gives_each_finding_a_row_a_cost_and_a_section():
    finding = Finding(
        "C4", "KL plateau", "KL levels off", True, "KL 0.3 [0.2, 0.4]", ["| seed |", "|---|"],
        "c4.png",
    )  # fmt: skip
    undecided = Finding("C9", "over-optimisation", "gold falls", None, "one seed", [], None)
    text = markdown(tiny.get_config(), [0, 1], [finding, undecided], {"c4": 90.0}, 600.0)
    assert text.startswith("# rlhf_jax study: config `tiny`, seeds 0, 1\n")
    assert "| C4: KL plateau | KL levels off | **PASS** | KL 0.3 [0.2, 0.4] |" in text
    assert "| C9: over-optimisation | gold falls | **N/A** | one seed |" in text
    assert "- main runs (the pipeline per seed): 10.0 min" in text and "- c4: 1.5 min" in text
    assert "## C4: KL plateau\n\n**PASS**: KL levels off.\n" in text
    assert "![C4](study/c4.png)" in text and "![C9]" not in text


@pytest.fixture(scope="module")
def study(tmp_path_factory, rlhf_jax_cli):
    root = tmp_path_factory.mktemp("study")
    # Two SFT epochs, so C8 has a curve; the main runs use them too. C9's PPO at its own lr.
    args = ("study", "--config=tiny", f"--seeds={','.join(SEEDS)}", f"--workdir={root}",
            f"--config.study.c9_lr={C9_LR}")  # fmt: skip
    out = rlhf_jax_cli(*args, "--config.sft.epochs=2", cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, args, out


@pytest.mark.e2e
def test_study_writes_every_experiment_with_a_verdict_and_a_plot(study):
    root, _, out = study
    text = (root / "study.md").read_text()
    assert out.stdout.strip().endswith(text.strip())  # the log comes first
    record = json.loads((root / "study.json").read_text())
    assert [f["name"].lower() for f in record["findings"]] == list(EXPERIMENTS)
    for finding in record["findings"]:
        assert finding["status"] in ("PASS", "FAIL", "N/A")
        assert f"| **{finding['status']}** |" in text
        png = root / "study" / f"{finding['name'].lower()}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(study/{png.name})" in text
    for name in EXPERIMENTS:
        for seed in SEEDS:
            assert (root / "study" / name / f"seed{seed}" / "result.json").is_file()


@pytest.mark.e2e
def test_variants_link_the_main_runs_stages_and_copy_their_data(study):
    root, _, _ = study
    beta0 = root / "study" / "c4" / "seed0" / "beta0"
    for stage in ("pretrain", "sft", "rm"):
        assert (beta0 / stage).is_symlink()
        assert (beta0 / stage).resolve() == (root / "seed0" / stage).resolve()
    assert not (beta0 / "data").is_symlink()
    assert json.loads((beta0 / "ppo" / "config.json").read_text())["ppo"]["kl_coef"] == 0.0
    # C3's small model samples its own comparisons: the data is copied (same times) but for them.
    c3 = root / "study" / "c3" / "seed0" / "policy_tiny"
    assert (c3 / "rm").is_dir() and not (c3 / "rm").is_symlink()

    def stamp(run, kind):
        files = sorted(p for p in (run / "data" / kind).rglob("*") if p.is_file())
        assert files
        return [(p.relative_to(run).as_posix(), p.stat().st_mtime) for p in files]

    for kind in ("rlhf_pretraining", "rlhf_prompts", "rlhf_demonstrations"):
        assert stamp(c3, kind) == stamp(root / "seed0", kind)
    assert stamp(c3, "rlhf_comparisons") != stamp(root / "seed0", "rlhf_comparisons")


@pytest.mark.e2e
def test_oracle_ppo_is_rewarded_with_the_gold(study):
    root, _, _ = study
    # The logged score is the mean reward of the iteration's samples and eval/gold the mean
    # gold of the same samples (the pipeline's callback): with the gold as reward they agree.
    # So are the runs at the other beta (tiny: 0.1), whose RM-rewarded twin is not.
    for run in ("ppo_gold", "ppo_gold_b0.1"):
        rows = read_metrics(root / "study" / "oracle" / "seed0" / run, "ppo")
        assert rows
        for row in rows:
            assert row["objective/score"] == pytest.approx(row["eval/gold"], abs=1e-5)
    # The main run's PPO is rewarded by its RM, which is not the gold.
    for rm_rewarded in (root / "seed0", root / "study" / "oracle" / "seed0" / "ppo_rm_b0.1"):
        rows = read_metrics(rm_rewarded, "ppo")
        assert any(abs(r["objective/score"] - r["eval/gold"]) > 1e-3 for r in rows)
    # Each beta's PPO ran at its own beta: its logged config says so.
    preset = tiny.get_config().ppo.kl_coef
    assert preset != 0.1
    for run, beta in (("ppo_gold", preset), ("ppo_gold_b0.1", 0.1), ("ppo_rm_b0.1", 0.1)):
        logged = root / "study" / "oracle" / "seed0" / run / "ppo" / "config.json"
        assert json.loads(logged.read_text())["ppo"]["kl_coef"] == beta


@pytest.mark.e2e
def test_c7_trains_shuffled_pairs_with_the_grouped_rms_number_of_updates(study):
    root, _, _ = study
    config = tiny.get_config()
    main = root / "seed0"
    result = json.loads((root / "study" / "c7" / "seed0" / "result.json").read_text())
    # Pairs counted independently, from the packed K-wise ranks and their valid slots.
    data = read_all(config, main, "rm", ("ranks", "valid"))
    expected = 0
    for ranks, valid in zip(data["ranks"], data["valid"]):
        r = ranks[valid > 0]
        expected += int(sum(r[i] != r[j] for i in range(len(r)) for j in range(i + 1, len(r))))
    marker = json.loads((root / "study" / "c7" / "seed0" / "pairs" / "pairs.json").read_text())
    assert marker["train_pairs"] == expected
    grouped, paired = result["updates_grouped"], result["updates_pairs"]
    assert grouped == RunDir(main).committed_steps("rm")[-1]
    assert grouped <= paired <= grouped * 1.1 + 1


def canonical(rec: dict) -> tuple:
    return (
        tuple(int(t) for t in rec["prompt"]),
        tuple(tuple(int(t) for t in r) for r in rec["responses"]),
        tuple(int(r) for r in rec["ranks"]),
    )


@pytest.mark.e2e
def test_c9_proxies_learn_from_the_first_n_deterministic_rankings(study):
    root, _, _ = study
    config = tiny.get_config()
    labels = root / "study" / "c9" / "seed0" / "labels"
    det = dataclasses.replace(
        config, world=dataclasses.replace(config.world, deterministic_labels=True)
    )
    records = comparison_records(det, labels, "rm_train")
    world = datasets.world(config)
    for rec in records:
        k = len(rec["responses"])
        width = max(len(r) for r in rec["responses"])
        responses = np.full((k, width), lang.PAD_ID, np.int32)
        for i, r in enumerate(rec["responses"]):
            responses[i, : len(r)] = r
        prompt = np.array(rec["prompt"], np.int32)
        prompts = np.repeat(np.pad(prompt, (lang.PROMPT_LEN - len(prompt), 0))[None], k, 0)
        gold = lang.gold_rewards(prompts, responses, world=world)
        ranks = np.asarray(rec["ranks"])
        for i in range(k):
            for j in range(k):
                if gold[i] > gold[j]:
                    assert ranks[i] < ranks[j]  # labels follow the gold exactly
    kept = {}
    for n in (32, 96):
        proxy = root / "study" / "c9" / "seed0" / f"rm{n}"
        kept[n] = set(map(canonical, comparison_records(config, proxy, "rm_train")))
        # The datasets store records in their own (hashed) order: compare them as sets.
        assert kept[n] == set(map(canonical, records[:n])) and len(kept[n]) == n
    assert kept[32] < kept[96]  # nested
    result = json.loads((root / "study" / "c9" / "seed0" / "result.json").read_text())
    assert result["bon_n"] == [1, 2, 4]
    assert result["n32_bon_gold"][0] == pytest.approx(0.0, abs=1e-12)  # best-of-1 is SFT
    # Each proxy's PPO ran at beta = 0 and at study.c9_lr; the main run's at the preset's lr.
    preset = config.ppo.policy_optimizer.lr
    assert preset != C9_LR
    for n in (32, 96):
        ppo = json.loads(
            (root / "study" / "c9" / "seed0" / f"rm{n}" / "ppo" / "config.json").read_text()
        )["ppo"]
        assert (ppo["kl_coef"], ppo["ptx_coef"], ppo["policy_optimizer"]["lr"]) == (0.0, 0.0, C9_LR)
    main = json.loads((root / "seed0" / "ppo" / "config.json").read_text())["ppo"]
    assert main["policy_optimizer"]["lr"] == preset


@pytest.mark.e2e
def test_c8_retrains_the_main_sft_and_scores_every_epoch(study):
    root, _, _ = study
    rows = [r for r in read_metrics(root / "study" / "c8" / "seed0" / "sft_epochs", "sft")]
    validated = [r for r in rows if "val/loss" in r]
    assert len(validated) == 2 and all("eval/gold" in r and "eval/rm_score" in r for r in validated)
    # Same pretrained start, data, seed and settings: the same model as the main run's SFT.
    main = [r["val/loss"] for r in read_metrics(root / "seed0", "sft") if "val/loss" in r]
    assert [r["val/loss"] for r in validated] == pytest.approx(main, rel=1e-5)


@pytest.mark.e2e
def test_a_finished_study_is_only_reread(study, rlhf_jax_cli):
    root, args, first = study
    before = {p: p.stat().st_mtime for p in (root / "study").rglob("result.json")}
    out = rlhf_jax_cli(*args, "--config.sft.epochs=2", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith((root / "study.md").read_text().strip())
    assert first.stdout.strip().endswith((root / "study.md").read_text().strip())
    assert re.search(r"\[study\] \w+, seed \d", first.stdout + first.stderr)
    log = out.stdout + out.stderr
    assert not re.search(r"\[study\] \w+, seed \d", log) and "steps in" not in log
    assert {p: p.stat().st_mtime for p in before} == before


@pytest.mark.e2e
def test_a_result_made_with_other_settings_is_an_error_not_reused(study, rlhf_jax_cli):
    root, args, _ = study
    before = (root / "study.md").read_text()
    changed = ("--config.sft.epochs=2", "--config.study.c6_kl_coefs=3.0")
    out = rlhf_jax_cli(*args, *changed, cwd=root)
    assert out.returncode == 2, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "study.c6_kl_coefs: '2.0' -> '3.0'" in line and "delete" in line
    assert "Traceback" not in out.stderr
    assert (root / "study.md").read_text() == before


@pytest.mark.e2e
@pytest.mark.parametrize(
    "override, field",
    [
        ("--config.study.experiments=c4,c5", "study.experiments"),
        ("--config.study.c9_comparisons=many", "study.c9_comparisons"),
        ("--config.study.c3_base_size=XXL", "study.c3_base_size"),
        ("--config.study.oracle_kl_coefs=0.1,-1", "study.oracle_kl_coefs"),
    ],
)
def test_a_bad_study_setting_is_one_line_before_anything_is_written(
    tmp_path, rlhf_jax_cli, override, field
):
    out = rlhf_jax_cli(
        "study", "--config=tiny", f"--workdir={tmp_path / 'w'}", override, cwd=tmp_path
    )
    assert out.returncode == 2
    assert field in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
