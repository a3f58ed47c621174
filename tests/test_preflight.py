"""Every user mistake stops a stage with one line naming the problem and the fix, before anything
is written (the work directory is listed before and after); a non-finite loss keeps the last good
checkpoint; mid-stage checkpoints; and the CLI across two processes equals one process."""

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint, cli, rollout, sharding
from rlhf_jax.config import model_config
from rlhf_jax.configs import tiny
from rlhf_jax.errors import ConfigError
from rlhf_jax.fields import apply_overrides
from rlhf_jax.hf import save_checkpoint
from rlhf_jax.instructlang import corpus, lang
from rlhf_jax.instructlang.tokenizer import save_tokenizer
from rlhf_jax.model import init_params
from rlhf_jax.stages.lm import run_lm_stage


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The flags of a run on user files: world-text data read through the files source."""
    root = tmp_path_factory.mktemp("preflight")
    w, rng = lang.make_world(0), np.random.default_rng(0)
    prompts = corpus.sample_prompts(rng, 64)
    demos = corpus.make_demonstrations(w, prompts, rng)
    text = lambda row: lang.decode_text(corpus.unpad(row))  # noqa: E731
    files = {
        "tokenizer": save_tokenizer(root / "tokenizer"),
        "demonstrations": _write(
            root / "demos.jsonl",
            [{"prompt": text(p), "response": text(d)} for p, d in zip(prompts, demos)],
        ),
        "pretraining": _write(
            root / "text.jsonl", [{"text": text(d)} for d in corpus.make_pretraining_corpus(w, 64)]
        ),
    }
    flags = ["--config=tiny", "--config.data.source=files"]
    flags += [f"--config.data.{k}={v}" for k, v in files.items()]
    hf_dir = root / "hf"  # a tiny GPT-2 checkpoint with the world's tokenizer
    model = model_config("tiny", vocab_size=64, max_len=24)
    save_checkpoint(hf_dir, model, init_params(model, jax.random.key(0)))
    save_tokenizer(hf_dir)
    return root, flags, files, hf_dir


def _listing(root):
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    )


def _fails(capsys, workdir, *argv):
    """Run ``rlhf-jax *argv``; the one error line, and the work directory was left as it was."""
    capsys.readouterr()  # what came before
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "notes.txt").write_text("mine")  # a user's file in the run directory
    before = _listing(workdir)
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, f"--workdir={workdir}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert _listing(workdir) == before
    return err


def test_too_few_records_for_one_batch(capsys, tmp_path, user):
    _, flags, _, _ = user
    err = _fails(capsys, tmp_path / "run", "sft", *flags, "--config.sft.batch_size=128")
    assert "needs batches of 115 demonstrations (sft.batch_size=128)" in err
    assert "the data has 61: add records, or lower sft.batch_size" in err


def test_batch_that_does_not_split_over_the_devices(capsys, tmp_path, user):
    _, flags, _, _ = user
    err = _fails(capsys, tmp_path / "run", "sft", *flags, "--config.sft.batch_size=12")
    assert "sft.batch_size=12 does not split over the 8 data-parallel devices" in err


def test_tokenizer_larger_than_the_model(capsys, tmp_path, user):
    _, flags, _, _ = user
    err = _fails(capsys, tmp_path / "run", "sft", *flags, "--config.model.vocab_size=32")
    assert "has 64 tokens, more than model.vocab_size=32" in err


def test_missing_previous_stage_and_pretraining_file(capsys, tmp_path, user):
    _, flags, files, _ = user
    err = _fails(capsys, tmp_path / "run", "rm", *flags)
    assert "stage 'rm' starts from 'sft', which has not run" in err
    no_text = [f for f in flags if "pretraining" not in f]
    err = _fails(capsys, tmp_path / "run", "sft", *no_text)
    assert "data.pretraining is not set" in err and "--config.sft.ptx_fraction=0" in err


def test_init_from_gives_the_architecture_and_refuses_a_contradiction(capsys, tmp_path, user):
    _, flags, _, hf_dir = user
    err = _fails(
        capsys, tmp_path / "run", "sft", *flags, f"--config.init_from={hf_dir}",
        "--config.model.d_model=48",
    )  # fmt: skip
    assert "--config.model.d_model=48 disagrees with the init_from checkpoint's d_model=32" in err
    # Without the contradiction the architecture comes from the checkpoint, and the help says so.
    assert cli.main(["sft", "--help", "--config=hf:" + str(hf_dir)]) is None
    assert "model.d_model=32 " in capsys.readouterr().out


@pytest.mark.e2e
def test_a_finished_stage_refuses_other_settings_and_other_data(capsys, tmp_path, user):
    root, flags, files, _ = user
    workdir = tmp_path / "run"
    cli.main(["sft", *flags, f"--workdir={workdir}"])
    capsys.readouterr()
    saved = (workdir / "sft" / "config.json").read_bytes()
    err = _fails(capsys, workdir, "sft", *flags, "--config.sft.epochs=2")
    assert "stage 'sft' in" in err and "sft.epochs: 1 -> 2" in err
    assert "run it with the settings it was finished with" in err
    assert (workdir / "sft" / "config.json").read_bytes() == saved  # kept as it was
    demos = files["demonstrations"]
    with open(demos) as f:
        original = f.read()
    try:
        with open(demos, "a") as f:  # one more demonstration: the data changed
            f.write(original.splitlines()[0] + "\n")
        err = _fails(capsys, workdir, "sft", *flags)
        assert "data[sft] changed" in err
    finally:
        with open(demos, "w") as f:
            f.write(original)
    cli.main(["sft", *flags, f"--workdir={workdir}"])  # the same settings: a no-op
    assert "already complete" in capsys.readouterr().out


@pytest.mark.e2e
def test_a_started_stage_refuses_other_settings(capsys, tmp_path, preempt):
    config = apply_overrides(tiny.get_config(), {"checkpoint_every": "1", "pretrain.steps": "6"})
    workdir = tmp_path / "run"
    preempt(4)  # a preemption while the 4th batch is being fed
    with pytest.raises(KeyboardInterrupt):
        run_lm_stage(config, workdir, "pretrain")
    preempt(0)
    err = _fails(
        capsys, workdir, "pretrain", "--config=tiny", "--config.checkpoint_every=1",
        "--config.pretrain.steps=6", "--config.pretrain.optimizer.lr=0.01",
    )  # fmt: skip
    assert "pretrain.optimizer.lr: 0.001 -> 0.01" in err and "it was started with" in err
    # With its own settings it resumes, and its metrics hold each step once.
    run_lm_stage(config, workdir, "pretrain")
    rows = [
        json.loads(x) for x in (workdir / "pretrain" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.e2e
def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(capsys, tmp_path, user):
    _, flags, _, _ = user
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit):
        cli.main([
            "sft", *flags, f"--workdir={workdir}", "--config.sft.optimizer.lr=1e30",
            "--config.checkpoint_every=1", "--config.keep_checkpoints=100",
        ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    found = re.search(
        r"loss = (nan|inf|-inf) at step (\d+); the last good checkpoint, step (\d+)", err
    )
    assert found, err
    bad, good = int(found.group(2)), int(found.group(3))
    assert good == bad - 1 and "Lower the learning rate" in err
    assert checkpoint.StageCheckpointer(workdir, "sft").latest_step() == good


@pytest.mark.e2e
def test_checkpoints_every_few_minutes(tmp_path):
    config = apply_overrides(
        tiny.get_config(),
        {"pretrain.steps": "4", "checkpoint_minutes": "1e-9", "keep_checkpoints": "10"},
    )
    run_lm_stage(config, tmp_path, "pretrain")
    assert checkpoint.StageCheckpointer(tmp_path, "pretrain").all_steps() == [1, 2, 3, 4]


def test_right_padded_prompts_are_refused():
    model = model_config("tiny", vocab_size=64, max_len=24)
    tokens = np.array([[5, 6, 7, 0], [5, 6, 7, 8]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)  # row 0 is right-padded
    with pytest.raises(ConfigError, match=r"right-padded \(rows \[0\].*padding_side = 'left'"):
        rollout.sample(
            init_params(model, jax.random.key(0)), model, tokens, mask, jax.random.key(0),
            max_new_tokens=2, eos_id=2, pad_id=0,
        )  # fmt: skip


@pytest.mark.e2e
def test_two_processes_through_the_cli_equal_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["pretrain", "--config=tiny", "--config.pretrain.steps=3"]

    def cli_run(workdir, devices, *extra):
        env = {
            **os.environ,
            "PYTHONPATH": os.getcwd(),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        }
        return subprocess.Popen(
            [sys.executable, "-m", "rlhf_jax.cli", *args, f"--workdir={workdir}", *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    procs = [
        cli_run(
            tmp_path / "two",
            2,
            "--distributed",
            f"--coordinator=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        )  # fmt: skip
        for i in range(2)
    ]
    one = cli_run(tmp_path / "one", 4)
    for p in [*procs, one]:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]
    config = tiny.get_config()
    mesh = sharding.make_mesh(config.mesh)
    from rlhf_jax.stages.lineage import load_policy

    a = jax.device_get(load_policy(config, tmp_path / "two", "pretrain", mesh))
    b = jax.device_get(load_policy(config, tmp_path / "one", "pretrain", mesh))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
    rows = (tmp_path / "two" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3  # process 0 alone writes the metrics


def test_a_checkpoint_without_a_tokenizer_is_named(tmp_path):
    # The error used to blame data.tokenizer, which the user never set.
    from rlhf_jax.data import sources

    model = tmp_path / "model_notok"
    model.mkdir()
    config = dataclasses.replace(
        tiny.get_config(),
        init_from=str(model),
        data=dataclasses.replace(tiny.get_config().data, source="files"),
    )
    with pytest.raises(ConfigError, match=f"init_from={model} has no tokenizer"):
        sources.get(config).tokenizer_dir(config, tmp_path / "run")
