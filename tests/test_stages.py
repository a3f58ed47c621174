"""Stages end to end on the tiny preset: the pipeline, the CLI, resume, a mesh change, and
docs/method.md section 7 checks 1, 2, 5 and 6 on real checkpoints."""

import dataclasses
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint, sharding
from rlhf_jax.config import MeshConfig, rm_config
from rlhf_jax.configs import tiny
from rlhf_jax.errors import ConfigError
from rlhf_jax.instructlang import lang, pipeline
from rlhf_jax.instructlang import report as report_module
from rlhf_jax.instructlang.pipeline import run_seeds
from rlhf_jax.report import StageClock, read_curves, read_metrics
from rlhf_jax.stages import lineage
from rlhf_jax.stages.driver import committed_steps, loader
from rlhf_jax.stages.lineage import load_policy, load_reward_model
from rlhf_jax.stages.lm import run_lm_stage
from rlhf_jax.stages.ppo import run_ppo
from rlhf_jax.stages.rm import demonstration_scores, run_rm

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


METHODS = ("dpo", "grpo", "rloo", "best_of_n")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    # Through ``rlhf-jax seeds`` with one seed and every other method: the pipeline runs into
    # <root>/seed0.
    root = tmp_path_factory.mktemp("tiny")
    config = dataclasses.replace(tiny.get_config(), methods=",".join(METHODS))
    run_seeds(config, root, [0])
    workdir = root / "seed0"
    return config, workdir, json.loads((workdir / "summary.json").read_text())


def test_seeds_table_and_finished_runs_are_only_reread(tiny_run, monkeypatch):
    config, workdir, summary = tiny_run
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


def test_pipeline_writes_summary_samples_and_report(tiny_run):
    config, workdir, summary = tiny_run
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


def test_a_rerun_keeps_the_seconds_of_the_stages_it_reuses(tiny_run, tmp_path):
    # Running a finished pipeline again (as `rlhf-jax seeds` does to add a method) reuses every
    # stage; its summary must keep the times the stages took, not the near-zero of the reuse.
    config, workdir, summary = tiny_run
    again = tmp_path / "run"
    shutil.copytree(workdir, again, symlinks=True)
    rerun = pipeline.run_pipeline(config, again)
    reused = set(summary["seconds"]) - {"eval"}
    assert {"data", "pretrain", "comparisons", "ppo", "dpo", "rloo"} <= reused
    assert {k: rerun["seconds"][k] for k in reused} == {k: summary["seconds"][k] for k in reused}
    assert rerun["models"]["ppo"] == summary["models"]["ppo"]  # the same evaluation


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


def test_ppo_logs_ratio_one_and_zero_initial_kl(tiny_run):
    _, workdir, _ = tiny_run
    for stage in ("ppo", "ppo_ptx", "grpo", "rloo"):
        rows = read_metrics(workdir, stage)
        assert rows[0]["objective/kl"] == 0.0  # check 2
        name = "grpo" if stage in ("grpo", "rloo") else "ppo"
        assert all(r[f"{name}/policy/first_approxkl"] < 1e-8 for r in rows)  # check 1
        assert ("ppo/loss/ptx" in rows[0]) == (stage == "ppo_ptx")


def test_rm_bias_centres_the_demonstrations(tiny_run):
    config, workdir, _ = tiny_run
    mesh = sharding.make_mesh(config.mesh)
    params, bias, _ = load_reward_model(config, workdir, mesh)
    scores = demonstration_scores(params, rm_config(config), config, workdir)
    assert len(scores) == config.world.splits.sft_train
    assert abs(float(np.mean(scores) - bias)) < 1e-5  # check 6
    assert float(np.std(scores)) > 0


def test_rm_reads_the_eos_token(tiny_run):
    config, workdir, _ = tiny_run
    P = config.data.prompt_len
    batch = next(iter(loader(config, workdir, "rm_val", 16, 0, epochs=1, shuffle=False)))
    last = P + batch["response_mask"].sum(-1) - 1  # the index reward_scores reads
    tokens = np.take_along_axis(batch["tokens"], last[..., None], -1)[..., 0]
    has_eos = (batch["tokens"][..., P:] == lang.EOS_ID).any(-1) & (batch["valid"] > 0)
    assert has_eos.any()
    np.testing.assert_array_equal(tokens[has_eos], lang.EOS_ID)  # check 5


@pytest.mark.parametrize("share, sampled", [(0.0, "sft"), (1.0, "pretrain")])
def test_comparisons_sample_only_the_model_the_share_takes(
    tiny_run, tmp_path, monkeypatch, share, sampled
):
    # base_share 0 (or 1) used to sample both models and throw one away.
    from rlhf_jax import evaluate
    from rlhf_jax.instructlang import datasets

    config, workdir, _ = tiny_run
    config = dataclasses.replace(config, world=dataclasses.replace(config.world, base_share=share))
    run = tmp_path / "run"
    for stage in ("pretrain", "sft"):
        shutil.copytree(workdir / stage, run / stage)
    first_leaf = lambda params: float(np.asarray(jax.tree.leaves(params)[0]).sum())  # noqa: E731
    which = {first_leaf(load_policy(config, run, s)): s for s in ("pretrain", "sft")}
    calls, real = [], evaluate.sample_responses
    monkeypatch.setattr(
        evaluate,
        "sample_responses",
        lambda p, *a, **k: calls.append(which[first_leaf(p)]) or real(p, *a, **k),
    )
    datasets.build_comparisons(config, run)
    assert calls == [sampled, sampled]  # one call per split: rm_train, rm_val


def _small(**kw):
    config = tiny.get_config()
    return dataclasses.replace(
        config, sft=dataclasses.replace(config.sft, epochs=1), checkpoint_every=3, **kw
    )


def _export(config, workdir, stage):
    return jax.tree.map(np.asarray, jax.device_get(load_policy(config, workdir, stage)))


def test_interrupted_stage_resumes_to_the_uninterrupted_result(tmp_path, preempt):
    config = _small()
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for workdir in (whole, parts):
        run_lm_stage(config, workdir, "pretrain")
    run_lm_stage(config, whole, "sft")

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


def test_checkpoint_from_a_data8_mesh_feeds_a_2x2x2_mesh(tmp_path):
    flat = _small(mesh=MeshConfig(data=8))
    cube = _small(mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    run_lm_stage(flat, tmp_path, "pretrain")
    on_cube = load_policy(cube, tmp_path, "pretrain")
    q = on_cube["layers_0"]["attn"]["q"]["kernel"]
    assert q.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert q.sharding.spec == jax.P("fsdp", "tensor", None)
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(on_cube), _export(flat, tmp_path, "pretrain")
    )
    run_lm_stage(cube, tmp_path, "sft")  # the next stage runs on the other mesh
    assert checkpoint.StageCheckpointer(tmp_path, "sft").latest_step() == 8


def test_cli_runs_every_stage_eval_and_generate(tmp_path, rlhf_jax_cli):
    _cli = rlhf_jax_cli
    preset = os.path.abspath("configs/tiny.py")
    # A relative work directory, as the CLI's default runs/<name> is.
    common_args = (f"--config={preset}", "--workdir=run", "--config.log_every=1")
    runs = [
        ("pretrain", "--config.pretrain.steps=3"),
        ("sft",),
        ("rm",),
        ("ppo", "--config.ppo.iterations=1", "--config.ppo.ptx_coef=0"),
    ]
    for command, *overrides in runs:
        out = _cli(command, *common_args, *overrides, cwd=tmp_path)
        assert out.returncode == 0, (command, out.stderr[-3000:])
        assert f"[{command}]" in out.stdout, out.stdout[-2000:]
    lines = (tmp_path / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()
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


def test_cli_rejects_unknown_fields_and_commands(tmp_path, rlhf_jax_cli):
    _cli = rlhf_jax_cli
    preset = os.path.abspath("configs/tiny.py")
    bad = _cli("pretrain", f"--config={preset}", "--config.pretrain.stepz=3", cwd=tmp_path)
    assert bad.returncode != 0 and "stepz" in bad.stderr
    bad = _cli("train", f"--config={preset}", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown command 'train'" in bad.stderr


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_stages_run_on_user_jsonl_data(tmp_path):
    from rlhf_jax.data import sources
    from rlhf_jax.instructlang import corpus
    from rlhf_jax.instructlang.tokenizer import save_tokenizer
    from rlhf_jax.stages.dpo import run_dpo
    from rlhf_jax.stages.grpo import run_grpo
    from rlhf_jax.stages.ppo import run_ppo
    from rlhf_jax.stages.rm import run_rm

    w = lang.make_world(0)
    rng = np.random.default_rng(0)
    prompts = corpus.sample_prompts(rng, 64)
    demos = corpus.make_demonstrations(w, prompts, rng)
    text = lambda row: lang.decode_text(corpus.unpad(row))  # noqa: E731
    data = dataclasses.replace(
        tiny.get_config().data,
        source="files",
        tokenizer=save_tokenizer(tmp_path / "tokenizer"),
        demonstrations=_write_jsonl(
            tmp_path / "demos.jsonl",
            [
                {"prompt": text(p), "response": text(d).removesuffix(" <eos>")}
                for p, d in zip(prompts, demos)
            ],
        ),
        comparisons=_write_jsonl(
            tmp_path / "comparisons.jsonl",
            [
                {"prompt": text(p), "responses": [text(d), "c0 c1", "x0"], "ranks": [0, 1, 2]}
                for p, d in zip(prompts[:32], demos)
            ],
        ),
        prompts=_write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text(p)} for p in prompts]),
        pretraining=_write_jsonl(
            tmp_path / "text.jsonl",
            [{"text": text(d)} for d in corpus.make_pretraining_corpus(w, 64)],
        ),
    )
    config = _small(data=data)
    config = dataclasses.replace(
        config, ppo=dataclasses.replace(config.ppo, iterations=1, ptx_coef=0.0)
    )
    workdir = tmp_path / "run"
    run_lm_stage(config, workdir, "sft")  # no pretrain stage: starts from a fresh init
    run_rm(config, workdir)
    run_ppo(config, workdir, "ppo")
    assert checkpoint.StageCheckpointer(workdir, "ppo").latest_step() == 1
    assert (workdir / "data" / "rlhf_comparisons" / "files").is_dir()
    run_dpo(config, workdir)  # the comparisons' 3 ranked responses as 3 pairs each
    steps = sources.split_size(config, workdir, "rm") // config.dpo.batch_size
    assert checkpoint.StageCheckpointer(workdir, "dpo").latest_step() == steps >= 1
    grpo = dict(iterations=1, batch_size=8, group_size=2, minibatch_size=16)
    run_grpo(dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, **grpo)), workdir)
    assert checkpoint.StageCheckpointer(workdir, "grpo").latest_step() == 1


def test_init_from_an_hf_checkpoint_checks_the_architecture(tmp_path):
    from rlhf_jax.config import model_config
    from rlhf_jax.hf import save_checkpoint
    from rlhf_jax.model import init_params

    model = model_config("tiny", vocab_size=64, max_len=24)
    params = init_params(model, jax.random.key(3))
    save_checkpoint(tmp_path / "hf", model, params)
    mesh = sharding.make_mesh(MeshConfig())
    config = dataclasses.replace(tiny.get_config(), init_from=str(tmp_path / "hf"))
    loaded = lineage.initial_params(config, tmp_path, lineage.INIT_FROM, config.model, mesh)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)
    wider = dataclasses.replace(config.model, mlp_dim=128)
    with pytest.raises(ConfigError, match="mlp_dim=64 vs 128"):
        lineage.initial_params(config, tmp_path, lineage.INIT_FROM, wider, mesh)


def test_each_stage_compiles_its_step_once(tmp_path, caplog):
    # A second compilation of the same step means some input came back from the jitted call with
    # another sharding, weak type or committedness than it went in with (PPO's counters and key
    # did, until init_ppo_state placed them in the iteration's shardings).
    config = _small()
    config = dataclasses.replace(
        config, pretrain=dataclasses.replace(config.pretrain, steps=3), checkpoint_every=100
    )
    plain = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, ptx_coef=0.0))
    runs = {
        "pretrain": lambda: run_lm_stage(config, tmp_path, "pretrain"),
        "sft": lambda: run_lm_stage(config, tmp_path, "sft"),
        "rm": lambda: run_rm(config, tmp_path),
        "ppo": lambda: run_ppo(plain, tmp_path, "ppo"),
        "ppo_ptx": lambda: run_ppo(config, tmp_path, "ppo_ptx"),
    }
    for stage, run in runs.items():
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            run()
        assert committed_steps(tmp_path, stage)[-1] >= 3, stage
        compiled = re.findall(r"Compiling jit\((step|iteration)\)", caplog.text)
        assert len(compiled) == 1, (stage, compiled)
