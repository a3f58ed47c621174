"""DPO stage on the tiny world: the pair expansion against a float64 pairwise reference, the first
step at the reference (loss log 2), resume after a kill, and the CLI (another mesh:
tests/test_stages.py)."""

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.configs import tiny
from rlhf_jax.data.sources import loader
from rlhf_jax.report import read_metrics
from rlhf_jax.stages.dpo import completion_logprobs, dpo_batch_loss, run_dpo
from rlhf_jax.stages.lineage import load_policy, policy_model

FIELDS = ("tokens", "attention_mask", "response_mask", "ranks", "valid")


def _config(**kw):
    config = tiny.get_config()
    return dataclasses.replace(
        config, sft=dataclasses.replace(config.sft, epochs=1), checkpoint_every=3, **kw
    )


@pytest.fixture(scope="module")
def sft_run(tiny_run, tmp_path_factory):
    """pretrain + sft of the tiny world, and its comparisons (sampled from the SFT model and
    labelled by the world): the session's shared run (conftest's ``tiny_run``) without its
    later stages; each test copies it."""
    workdir = tmp_path_factory.mktemp("dpo") / "base"
    for part in ("data", "pretrain", "sft"):
        shutil.copytree(tiny_run.workdir / part, workdir / part)
    return workdir


def _rows(workdir):
    return {r["step"]: r for r in read_metrics(workdir, "dpo")}


def _export(config, workdir, stage):
    return jax.tree.map(np.asarray, jax.device_get(load_policy(config, workdir, stage)))


@pytest.mark.e2e
def test_dpo_loss_over_a_k_wise_batch_equals_its_pairs_one_by_one(sft_run, tmp_path):
    # Reference: every (chosen, rejected) pair of each prompt written out in Python loops from the
    # ranks (ties and padding slots skipped), DPO's formula in float64 on each, averaged. Policy
    # and reference are two different models (SFT and the pretrained base), so margins are not 0.
    config = _config()
    workdir = shutil.copytree(sft_run, tmp_path / "run")
    model, P = policy_model(config), config.data.prompt_len
    policy, ref = load_policy(config, workdir, "sft"), load_policy(config, workdir, "pretrain")
    batch = next(iter(loader(config, workdir, "rm", 8, 0)))
    batch = {k: jnp.asarray(batch[k]) for k in FIELDS}
    assert bool((batch["valid"].sum(1) >= 2).all())
    for cfg in (
        config.dpo,
        dataclasses.replace(config.dpo, beta=0.5, label_smoothing=0.2),
        dataclasses.replace(config.dpo, loss_type="ipo", average_logprobs=True),
        dataclasses.replace(config.dpo, loss_type="hinge"),
    ):
        loss, stats = jax.jit(lambda p, r, b, c=cfg: dpo_batch_loss(p, r, model, c, b, P))(
            policy, ref, batch
        )
        avg = cfg.average_logprobs
        lp = np.asarray(completion_logprobs(policy, model, batch, P, average=avg), np.float64)
        lr = np.asarray(completion_logprobs(ref, model, batch, P, average=avg), np.float64)
        terms, correct = [], 0
        for b in range(lp.shape[0]):
            for i in range(lp.shape[1]):
                for j in range(lp.shape[1]):
                    ok = batch["valid"][b, i] and batch["valid"][b, j]
                    if not ok or batch["ranks"][b, i] >= batch["ranks"][b, j]:
                        continue
                    h = (lp[b, i] - lr[b, i]) - (lp[b, j] - lr[b, j])
                    z, eps = cfg.beta * h, cfg.label_smoothing
                    if cfg.loss_type == "sigmoid":
                        terms.append(
                            (1 - eps) * math.log1p(math.exp(-z)) + eps * math.log1p(math.exp(z))
                        )
                    elif cfg.loss_type == "ipo":
                        terms.append((h - 1 / (2 * cfg.beta)) ** 2)
                    else:
                        terms.append(max(0.0, 1 - z))
                    correct += z > 0
        assert float(stats["pairs"]) == len(terms) > 8
        np.testing.assert_allclose(float(loss), sum(terms) / len(terms), rtol=1e-5)
        np.testing.assert_allclose(float(stats["accuracy"]), correct / len(terms), rtol=1e-6)


@pytest.mark.e2e
def test_dpo_starts_at_the_reference_and_learns_the_comparisons(sft_run, tmp_path):
    config = _config()
    workdir = shutil.copytree(sft_run, tmp_path / "run")
    config = dataclasses.replace(
        config, dpo=dataclasses.replace(config.dpo, epochs=2, optimizer=config.sft.optimizer)
    )
    meta = run_dpo(config, workdir)
    rows = _rows(workdir)
    # Step 1's loss is computed before its update, with the policy equal to the reference: every
    # margin is 0, so the sigmoid loss is log 2 and no pair is "right" (docs/method.md section 6.1).
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["margin"] == pytest.approx(0.0, abs=1e-6)
    last = rows[max(rows)]
    assert last["accuracy"] > 0.6 and last["loss"] < math.log(2)
    assert meta["final_val/accuracy"] > 0.55  # held-out comparisons, implicit reward
    sft, dpo = _export(config, workdir, "sft"), _export(config, workdir, "dpo")
    assert not np.array_equal(sft["embed"], dpo["embed"])


@pytest.mark.e2e
def test_interrupted_dpo_resumes_to_the_uninterrupted_result(
    tiny_run, sft_run, tmp_path, interrupted
):
    config = _config()
    whole = tiny_run.workdir  # the shared run's DPO: the same settings, never interrupted
    parts = shutil.copytree(sft_run, tmp_path / "parts")
    interrupted(lambda w: run_dpo(config, w), parts, "dpo", at=5, kept=3)
    jax.tree.map(
        np.testing.assert_array_equal, _export(config, parts, "dpo"), _export(config, whole, "dpo")
    )
    assert _rows(parts) == _rows(whole)


@pytest.mark.e2e
def test_cli_dpo_then_eval_and_export(sft_run, tmp_path, rlhf_jax_cli):
    workdir = shutil.copytree(sft_run, tmp_path / "run")
    preset = os.path.abspath("configs/tiny.py")
    args = (f"--config={preset}", f"--workdir={workdir}", "--config.sft.epochs=1")
    out = rlhf_jax_cli("dpo", *args, "--config.dpo.loss_type=ipo", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[dpo]" in out.stdout
    # The test prompts are built by this eval ("[data]" line): stdout must still be pure JSON.
    ev = rlhf_jax_cli("eval", *args, "--stage=dpo", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert {"gold_mean", "win_rate_vs_sft", "kl_to_sft"} <= set(json.loads(ev.stdout))
    bad = rlhf_jax_cli(
        "dpo",
        *args,
        "--config.dpo.loss_type=hinge",
        "--config.dpo.label_smoothing=0.1",
        cwd=tmp_path,
    )
    assert bad.returncode != 0 and "label_smoothing" in bad.stderr
