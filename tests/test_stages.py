"""Stages end to end on the tiny preset: the pipeline (the session's shared run, conftest's
``tiny_run``), the CLI, resume, a mesh change, a method added through the stage table alone, and
docs/method.md section 7 checks 1, 2, 5 and 6 on real checkpoints."""

import dataclasses
import itertools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, cli, hf, sharding, stage_table
from rlhf_jax.config import MeshConfig, model_config, rm_config
from rlhf_jax.configs import tiny
from rlhf_jax.data.sources import loader
from rlhf_jax.errors import ConfigError
from rlhf_jax.instructlang import datasets, lang, pipeline
from rlhf_jax.instructlang import report as report_module
from rlhf_jax.model import init_params
from rlhf_jax.report import StageClock, read_curves, read_metrics
from rlhf_jax.stages import lineage
from rlhf_jax.stages.driver import StageRun, drive, one_model, preflight
from rlhf_jax.stages.lineage import load_policy, load_reward_model
from rlhf_jax.stages.lm import run_lm_stage
from rlhf_jax.stages.rm import demonstration_scores

MODEL_KEYS = (
    "gold_mean",
    "gold_ci95",
    "win_rate_vs_sft",
    "kl_to_sft",
    "rm_score",
    "pretrain_nll",
    "fact_accuracy",
    "eos_rate",
)


METHODS = ("dpo", "grpo", "rloo", "best_of_n")  # conftest's tiny_run has every one


@pytest.mark.e2e
def test_seeds_table_and_finished_runs_are_only_reread(tiny_run, monkeypatch):
    config, workdir, summary, _ = tiny_run
    table = (workdir.parent / "seeds.md").read_text()
    assert "over 1 seed (0)" in table
    assert all(f"| {m} |" in table for m in ("ppo_ptx", *METHODS))

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished seed ran again")

    monkeypatch.setattr(pipeline, "run_pipeline", must_not_run)
    assert pipeline.run_seeds(config, workdir.parent, [0]) == table
    assert pipeline.run_seeds(dataclasses.replace(config, methods=""), workdir.parent, [0]) == table


def test_seeds_rerun_a_finished_seed_that_lacks_an_asked_method(tmp_path, monkeypatch):
    summary = {"config": "tiny", "seed": 0, "models": {"sft": {}, "ppo": {}}, "rm": {}}
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "summary.json").write_text(json.dumps(summary))
    ran = []

    def run_pipeline(config, workdir):
        ran.append((config.seed, config.methods, workdir))
        return {**summary, "models": {**summary["models"], "rloo": {}}}

    monkeypatch.setattr(pipeline, "run_pipeline", run_pipeline)
    config = dataclasses.replace(tiny.get_config(), methods="rloo")
    assert "| rloo |" in pipeline.run_seeds(config, tmp_path, [0])
    assert ran == [(0, "rloo", tmp_path / "seed0")]


@pytest.mark.e2e
def test_pipeline_writes_summary_samples_and_report(tiny_run):
    config, workdir, summary, _ = tiny_run
    saved = json.loads((workdir / "summary.json").read_text())
    models = saved["models"]
    assert list(models) == ["base", "sft", "ppo", "ppo_ptx", *METHODS]
    for name in models:
        assert set(MODEL_KEYS) <= set(models[name]), name
        assert isinstance(models[name]["rm_score"], float), name  # the run has its RM
    assert {"val_accuracy_noisy", "val_accuracy_gold", "sft_pairs_accuracy_gold"} <= set(
        saved["rm"]
    )
    assert {"pretrain", "sft", "rm", "ppo", "ppo_ptx", "dpo", "grpo", "rloo", "eval"} <= set(
        saved["seconds"]
    )
    # Best-of-n is the SFT model's weights: its KL is analytic and its tax columns are SFT's.
    n = config.eval.best_of_n
    assert models["best_of_n"]["kl_to_sft"] == pytest.approx(np.log(n) - (n - 1) / n)
    for key in ("pretrain_nll", "fact_accuracy"):
        assert models["best_of_n"][key] == models["sft"][key]
    assert json.loads((workdir / "rloo" / "config.json").read_text())["grpo"]["baseline"] == "rloo"
    assert json.loads((workdir / "grpo" / "config.json").read_text())["grpo"]["baseline"] == "group"
    # The SFT model against itself: win rate 0.5 and KL 0 by construction.
    assert saved["models"]["sft"]["win_rate_vs_sft"] == 0.5
    assert saved["models"]["sft"]["kl_to_sft"] == 0.0
    assert saved["models"]["sft"]["gold_gain_vs_sft"] == 0.0
    assert saved["models"]["ppo"]["samples_per_prompt"] == config.eval.samples_per_prompt == 2
    rows = [json.loads(line) for line in (workdir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(models) * config.eval.samples_per_model
    w = lang.make_world(config.world.seed)
    for row in rows[:16]:  # the text form round-trips into the same gold reward
        prompt, response = lang.encode_text(row["prompt"]), lang.encode_text(row["response"])
        assert row["gold"] == pytest.approx(lang.gold_reward(prompt, response, world=w))
    report = (workdir / "report.md").read_text()
    assert all(f"| {m} |" in report for m in models) and (workdir / "gold.png").exists()
    curves = read_curves(workdir, report_module.CURVES)  # the RL stages' curves, gold included
    assert set(curves) == {"ppo", "ppo_ptx", "grpo", "rloo"}
    assert curves["rloo"]["step"] == list(range(1, config.grpo.iterations + 1))
    assert None not in curves["rloo"]["gold"] and None not in curves["ppo"]["kl"]


@pytest.mark.e2e
def test_a_rerun_keeps_the_seconds_of_the_stages_it_reuses(tiny_run, tmp_path):
    # Running a finished pipeline again (as `rlhf-jax seeds` does to add a method) reuses every
    # stage; its summary must keep the times the stages took, not the near-zero of the reuse.
    config, workdir, summary, _ = tiny_run
    again = tmp_path / "run"
    shutil.copytree(workdir, again, symlinks=True)
    rerun = pipeline.run_pipeline(config, again)
    reused = set(summary["seconds"]) - {"eval"}
    assert {"data", "pretrain", "comparisons", "ppo", "dpo", "rloo"} <= reused
    assert {k: rerun["seconds"][k] for k in reused} == {k: summary["seconds"][k] for k in reused}
    assert rerun["models"]["ppo"] == summary["models"]["ppo"]  # the same evaluation


def run_copy(config, workdir, stage, *, mesh=None):
    """A toy method: the SFT model's weights, handed on after one step that changes nothing. Its
    module (this one) and its record in the stage table are all it takes."""
    mesh = mesh or sharding.make_mesh(config.mesh)
    model = lineage.policy_model(config)
    origin = lineage.start_point(config, workdir, stage)
    fingerprints = preflight(config, workdir, stage, {})  # it reads no data
    init = lambda: lineage.initial_params(config, workdir, origin, model, mesh)  # noqa: E731
    state = one_model(config, model, config.sft.optimizer, 1, mesh, init)
    run = StageRun(
        stage=stage,
        model=model,
        fingerprints=fingerprints,
        total=1,
        target=state.target,
        start=state.start,
        step=lambda s, _: (s.replace(step=s.step + 1), {"loss": jnp.zeros(())}),
        iterators=[],
        batches=itertools.repeat({}),
        export=lambda s: s.params,
        position=lambda s: s.step,
    )
    return drive(config, workdir, run, mesh)


@pytest.mark.e2e
def test_a_method_added_through_the_stage_table_alone(tiny_run, tmp_path, monkeypatch, capsys):
    config, workdir, summary, _ = tiny_run
    monkeypatch.setattr(stage_table, "STAGES", list(stage_table.STAGES))
    stage_table.register(
        stage_table.Stage(
            "copy",
            section="sft",
            command="copy",
            runner=run_copy,
            starts_from={"policy": ("sft",)},
            method=True,
            summary="the SFT model again (a toy method)",
        )
    )
    run = tmp_path / "run"
    shutil.copytree(workdir, run, symlinks=True)
    out = pipeline.run_pipeline(dataclasses.replace(config, methods=f"{config.methods},copy"), run)
    # The pipeline trains it after the other stages and evaluates it: SFT's weights, so SFT's
    # row to the last digit (the same samples, KL 0, gain 0, win rate 0.5).
    assert list(out["seconds"])[-2:] == ["copy", "eval"]
    assert list(out["models"]) == [*summary["models"], "copy"]
    assert out["models"]["copy"] == out["models"]["sft"] == summary["models"]["sft"]
    assert "| copy |" in (run / "report.md").read_text()

    def command(*argv):
        cli.main(list(argv))
        return capsys.readouterr().out

    assert "\n  copy " in command("--help") and "(a toy method)" in command("copy", "--help")
    common = ("--config=tiny", f"--workdir={run}")
    assert json.loads(command("eval", *common, "--stage=copy")) == out["models"]["sft"]
    for stage in ("copy", "sft"):
        command("export", *common, f"--stage={stage}", f"--out={tmp_path / stage}")
    copied, sft = (hf.load_checkpoint(tmp_path / s).params for s in ("copy", "sft"))
    jax.tree.map(np.testing.assert_array_equal, copied, sft)


def test_stage_clock_falls_back_to_the_checkpoints_own_seconds(tmp_path):
    (tmp_path / "summary.json").write_text("{not json")  # unreadable: measure, never crash
    clock = StageClock.resuming(tmp_path)
    clock("ran", lambda: {"seconds": 99.0})  # not reused: measured here
    clock("finished", lambda: {"seconds": 12.5, "reused": True})  # no earlier summary: its own
    clock("built", lambda: {"reused": True})  # neither: measured
    assert clock.seconds["ran"] < 1 and clock.seconds["built"] < 1
    assert clock.seconds["finished"] == 12.5
    (tmp_path / "summary.json").write_text(json.dumps({"seconds": {"finished": 40.0}}))
    clock = StageClock.resuming(tmp_path)
    clock("finished", lambda: {"seconds": 12.5, "reused": True})
    assert clock.seconds == {"finished": 40.0}  # the whole stage, as the first run timed it


@pytest.mark.e2e
def test_ppo_logs_ratio_one_and_zero_initial_kl(tiny_run):
    _, workdir, _, _ = tiny_run
    for stage in ("ppo", "ppo_ptx", "grpo", "rloo"):
        rows = read_metrics(workdir, stage)
        assert rows[0]["objective/kl"] == 0.0  # check 2
        name = "grpo" if stage in ("grpo", "rloo") else "ppo"
        assert all(r[f"{name}/policy/first_approxkl"] < 1e-8 for r in rows)  # check 1
        assert ("ppo/loss/ptx" in rows[0]) == (stage == "ppo_ptx")


@pytest.mark.e2e
def test_rm_bias_centres_the_demonstrations(tiny_run):
    config, workdir, _, _ = tiny_run
    mesh = sharding.make_mesh(config.mesh)
    rm = load_reward_model(config, workdir, mesh)
    scores = demonstration_scores(rm.params, rm_config(config), config, workdir)
    assert len(scores) == config.world.splits.sft_train
    assert abs(float(np.mean(scores) - rm.bias)) < 1e-5  # check 6
    assert float(np.std(scores)) > 0


@pytest.mark.e2e
def test_rm_reads_the_eos_token(tiny_run):
    config, workdir, _, _ = tiny_run
    P = config.data.prompt_len
    batch = next(iter(loader(config, workdir, "rm_val", 16, 0, epochs=1, shuffle=False)))
    last = P + batch["response_mask"].sum(-1) - 1  # the index reward_scores reads
    tokens = np.take_along_axis(batch["tokens"], last[..., None], -1)[..., 0]
    has_eos = (batch["tokens"][..., P:] == lang.EOS_ID).any(-1) & (batch["valid"] > 0)
    assert has_eos.any()
    np.testing.assert_array_equal(tokens[has_eos], lang.EOS_ID)  # check 5


@pytest.mark.e2e
@pytest.mark.parametrize("share, sampled", [(0.0, "sft"), (1.0, "pretrain")])
def test_comparisons_sample_only_the_model_the_share_takes(
    tiny_run, tmp_path, monkeypatch, share, sampled
):
    # base_share 0 (or 1) used to sample both models and throw one away.
    config, workdir, _, _ = tiny_run
    config = dataclasses.replace(config, world=dataclasses.replace(config.world, base_share=share))
    run = tmp_path / "run"
    for stage in ("pretrain", "sft"):
        shutil.copytree(workdir / stage, run / stage)
    first_leaf = lambda params: float(np.asarray(jax.tree.leaves(params)[0]).sum())  # noqa: E731
    which = {first_leaf(load_policy(config, run, s)): s for s in ("pretrain", "sft")}
    calls, real = [], datasets.sample_responses
    monkeypatch.setattr(
        datasets,
        "sample_responses",
        lambda p, *a, **k: calls.append(which[first_leaf(p)]) or real(p, *a, **k),
    )
    datasets.build_comparisons(config, run)
    assert calls == [sampled, sampled]  # one call per split: rm_train, rm_val


def _export(config, workdir, stage):
    return jax.tree.map(np.asarray, jax.device_get(load_policy(config, workdir, stage)))


@pytest.mark.e2e
def test_interrupted_stage_resumes_to_the_uninterrupted_result(tiny_run, tmp_path, preempt):
    config, whole, _, _ = tiny_run  # its SFT ran uninterrupted (it saved only at the end)
    config = dataclasses.replace(config, checkpoint_every=3)  # free: binds no checkpoint
    parts = tmp_path / "parts"
    shutil.copytree(whole / "pretrain", parts / "pretrain")
    shutil.copytree(whole / "data", parts / "data")
    preempt(5)  # a preemption while the 5th SFT batch is being fed
    with pytest.raises(KeyboardInterrupt):
        run_lm_stage(config, parts, "sft")
    preempt(0)
    assert checkpoint.StageCheckpointer(parts, "sft").latest_step() == 3
    run_lm_stage(config, parts, "sft")  # resumes from step 3: params, optimiser, rng, data

    jax.tree.map(
        np.testing.assert_array_equal, _export(config, parts, "sft"), _export(config, whole, "sft")
    )

    def rows(workdir):  # the last row logged for each step
        lines = (workdir / "sft" / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines)}

    assert rows(parts) == rows(whole)


@pytest.mark.e2e
def test_a_data8_run_continues_on_a_2x2x2_mesh(tiny_run, tmp_path):
    # The shared run trained every stage on the 8 devices' data axis. Its params restore onto a
    # data x fsdp x tensor mesh, sharded there, and the stages after them train on it: DPO's
    # losses and GRPO's first scores follow the data-8 run's.
    config, workdir, _, _ = tiny_run
    cube = dataclasses.replace(config, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    on_cube = load_policy(cube, workdir, "pretrain")
    q = on_cube["layers_0"]["attn"]["q"]["kernel"]
    assert q.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert q.sharding.spec == jax.P("fsdp", "tensor", None)
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(on_cube), _export(config, workdir, "pretrain")
    )
    run = tmp_path / "cube"
    for stage in ("data", "pretrain", "sft", "rm"):
        shutil.copytree(workdir / stage, run / stage)
    stage_table.get("dpo").run(cube, run)
    stage_table.get("grpo").run(cube, run)
    flat, cubed = (read_metrics(w, "dpo") for w in (workdir, run))
    assert [r["step"] for r in flat] == [r["step"] for r in cubed]
    for a, b in zip(flat, cubed):  # the same batches; only the order of the sums differs
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    # The first iteration samples from the same SFT params with the same key: equal scores.
    first = [read_metrics(w, "grpo")[0]["objective/score"] for w in (workdir, run)]
    assert first[1] == pytest.approx(first[0], rel=1e-5)


@pytest.mark.e2e
def test_cli_runs_a_stage_then_eval_and_generate(tiny_run, tmp_path, rlhf_jax_cli):
    _cli = rlhf_jax_cli
    preset = os.path.abspath("configs/tiny.py")
    # A relative work directory, as the CLI's default runs/<name> is. Pretraining from scratch,
    # and PPO from the shared run's SFT model and RM: every stage command dispatches the same
    # way (through the stage table), so two of them train here.
    for stage in ("data", "sft", "rm"):
        shutil.copytree(tiny_run.workdir / stage, tmp_path / "run" / stage)
    common_args = (f"--config={preset}", "--workdir=run", "--config.log_every=1")
    runs = [
        ("pretrain", "--workdir=fresh", "--config.pretrain.steps=3"),
        ("ppo", "--config.ppo.iterations=1", "--config.ppo.ptx_coef=0"),
    ]
    for command, *overrides in runs:
        out = _cli(command, *common_args, *overrides, cwd=tmp_path)
        assert out.returncode == 0, (command, out.stderr[-3000:])
        assert f"[{command}]" in out.stdout, out.stdout[-2000:]
    lines = (tmp_path / "fresh" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert checkpoint.StageCheckpointer(tmp_path / "run", "ppo").latest_step() == 1

    ev = _cli("eval", *common_args, "--stage=ppo", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert {"gold_mean", "win_rate_vs_sft", "kl_to_sft"} <= set(json.loads(ev.stdout))
    gen = _cli(
        "generate", *common_args, "--stage=ppo", "--prompt=<bos> REV c3 c9 c1 <sep>", cwd=tmp_path
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    row = json.loads(gen.stdout.strip().splitlines()[-1])
    assert row["prompt"] == "<bos> REV c3 c9 c1 <sep>"
    lang.encode_text(row["response"])  # decodes into the world's tokens


@pytest.mark.e2e
def test_cli_rejects_unknown_fields_and_commands(tmp_path, rlhf_jax_cli):
    _cli = rlhf_jax_cli
    preset = os.path.abspath("configs/tiny.py")
    bad = _cli("pretrain", f"--config={preset}", "--config.pretrain.stepz=3", cwd=tmp_path)
    assert bad.returncode != 0 and "stepz" in bad.stderr
    bad = _cli("train", f"--config={preset}", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown command 'train'" in bad.stderr


def test_init_from_an_hf_checkpoint_checks_the_architecture(tmp_path):
    model = model_config("tiny", vocab_size=64, max_len=24)
    params = init_params(model, jax.random.key(3))
    hf.save_checkpoint(tmp_path / "hf", model, params)
    mesh = sharding.make_mesh(MeshConfig())
    config = dataclasses.replace(tiny.get_config(), init_from=str(tmp_path / "hf"))
    loaded = lineage.initial_params(config, tmp_path, lineage.INIT_FROM, config.model, mesh)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)
    wider = dataclasses.replace(config.model, mlp_dim=128)
    with pytest.raises(ConfigError, match="mlp_dim=64 vs 128"):
        lineage.initial_params(config, tmp_path, lineage.INIT_FROM, wider, mesh)


@pytest.mark.e2e
def test_each_stage_compiles_its_step_once(tiny_run):
    # A second compilation of the same step means some input came back from the jitted call with
    # another sharding, weak type or committedness than it went in with (PPO's counters and key
    # did, until init_ppo_state placed them in the iteration's shardings). The shared run counted
    # them while every stage took several steps on the 8 devices' mesh.
    trained = [s.name for s in stage_table.STAGES if s.trains]
    assert tiny_run.compiles == {stage: 1 for stage in trained}
