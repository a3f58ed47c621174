"""GRPO and RLOO stage on the tiny world: the first iteration at the reference (ratio 1, KL 0),
group-relative advantages in the jitted iteration, a reward function in place of the RM, resume
after a kill, and the CLI (another mesh: tests/test_stages.py)."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.configs import tiny
from rlhf_jax.instructlang import lang
from rlhf_jax.report import read_metrics
from rlhf_jax.stages.grpo import run_grpo, stage_name
from rlhf_jax.stages.lineage import load_policy


def _config(**grpo):
    config = tiny.get_config()
    return dataclasses.replace(
        config,
        sft=dataclasses.replace(config.sft, epochs=1),
        grpo=dataclasses.replace(
            config.grpo, iterations=4, batch_size=8, group_size=4, minibatch_size=16, **grpo
        ),
        checkpoint_every=2,
    )


def _rows(config, workdir):
    """The stage's metric rows by step (``grpo``, or ``rloo`` under its baseline)."""
    return {r["step"]: r for r in read_metrics(workdir, stage_name(config))}


def _export(config, workdir):
    params = load_policy(config, workdir, stage_name(config))
    return jax.tree.map(np.asarray, jax.device_get(params))


@pytest.mark.e2e
@pytest.mark.parametrize("baseline", ["group", "rloo"])
def test_grpo_starts_at_the_reference_and_moves_the_policy(rm_run, tmp_path, baseline):
    config = _config(baseline=baseline)
    workdir = shutil.copytree(rm_run, tmp_path / "run")
    run_grpo(config, workdir)
    first = _rows(config, workdir)[1]
    # Iteration 1 samples from the SFT model itself: the sequence KL is 0 and the first
    # minibatch's ratio is 1 (docs/method.md check 1, 2), up to float32 rounding of two forward
    # passes that XLA fuses differently (2e-14 nats measured).
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["grpo/policy/first_approxkl"] == pytest.approx(0.0, abs=1e-9)
    assert first["objective/score_std_in_group"] > 0  # the groups carry a learning signal
    sft = jax.device_get(load_policy(config, workdir, "sft"))
    assert not np.array_equal(_export(config, workdir)["embed"], np.asarray(sft["embed"]))
    assert _rows(config, workdir)[4]["objective/kl"] > 0


@pytest.mark.e2e
def test_a_reward_function_replaces_the_reward_model(rm_run, tmp_path):
    # Reward = the response's length in tokens (EOS included): RLOO should lengthen responses.
    # No rm stage is needed for it (the run directory has none).
    workdir = shutil.copytree(rm_run, tmp_path / "run")
    shutil.rmtree(workdir / "rm")
    config = _config(baseline="rloo", kl_coef=0.0)
    config = dataclasses.replace(
        config,
        grpo=dataclasses.replace(
            config.grpo,
            iterations=6,
            policy_optimizer=dataclasses.replace(config.grpo.policy_optimizer, lr=3e-3),
        ),
    )
    seen = []

    def length(prompt_tokens, prompt_mask, tokens, mask):
        return mask.sum(axis=1).astype(jnp.float32)

    def on_log(step, state, samples):
        _, tokens, mask = samples
        seen.append(float(np.asarray(mask).sum(axis=1).mean()))
        return {}

    run_grpo(config, workdir, reward_fn=length, on_log=on_log)
    rows = _rows(config, workdir)
    for step, row in rows.items():  # the score is the reward function's value
        assert row["objective/score"] == pytest.approx(row["objective/response_length"])
        assert row["objective/score"] == pytest.approx(seen[step - 1])
    assert rows[6]["objective/response_length"] > rows[1]["objective/response_length"]


@pytest.mark.e2e
def test_interrupted_grpo_resumes_to_the_uninterrupted_result(rm_run, tmp_path, interrupted):
    config = _config()
    whole = shutil.copytree(rm_run, tmp_path / "whole")
    parts = shutil.copytree(rm_run, tmp_path / "parts")
    run_grpo(config, whole)
    interrupted(lambda w: run_grpo(config, w), parts, "grpo", at=3, kept=2)
    jax.tree.map(np.testing.assert_array_equal, _export(config, parts), _export(config, whole))
    assert _rows(config, parts) == _rows(config, whole)


@pytest.mark.e2e
def test_cli_grpo_rloo_then_generate(rm_run, tmp_path, rlhf_jax_cli):
    workdir = shutil.copytree(rm_run, tmp_path / "run")
    preset = os.path.abspath("configs/tiny.py")
    args = (f"--config={preset}", f"--workdir={workdir}", "--config.sft.epochs=1")
    out = rlhf_jax_cli("grpo", *args, "--config.grpo.baseline=rloo", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[rloo]" in out.stdout and not (workdir / "grpo").exists()  # RLOO has its own stage
    gen = rlhf_jax_cli("generate", *args, "--stage=rloo", "--prompt=<bos> REV c3 c9 c1 <sep>",
                       cwd=tmp_path)  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-3000:]
    lang.encode_text(json.loads(gen.stdout.strip().splitlines()[-1])["response"])
    # Best-of-3 of the SFT model by the same RM, from the eval command alone.
    bon = rlhf_jax_cli("eval", *args, "--stage=best_of_n", "--config.eval.best_of_n=3",
                       cwd=tmp_path)  # fmt: skip
    assert bon.returncode == 0, bon.stderr[-3000:]
    assert json.loads(bon.stdout)["kl_to_sft"] == pytest.approx(np.log(3) - 2 / 3)
    bad = rlhf_jax_cli("grpo", *args, "--config.grpo.minibatch_size=7", cwd=tmp_path)
    assert bad.returncode != 0 and "minibatch_size" in bad.stderr
