"""The command explains itself: help for every command, and one clear line (no traceback, nothing
written) for every user mistake; ``--verbose`` brings the traceback back."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from rlhf_jax import cli


def _run(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``rlhf-jax *argv`` run in this process."""
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf-jax: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.e2e
def test_main_help_names_every_command():
    # Through the installed console script, as a user types it.
    out = subprocess.run(["rlhf-jax", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in cli.commands():
        assert f"\n  {command} " in out.stdout
    assert "rlhf-jax pipeline --config=tiny" in out.stdout
    assert "Traceback" not in out.stderr


def test_command_help_lists_its_fields_with_the_presets_values(capsys):
    code, out, _ = _run(capsys, "ppo", "--help")
    assert code == 0
    assert "ppo.kl_coef=0.5 " in out and "beta: per-token KL penalty" in out  # default preset
    assert "model.n_heads=4 " in out and "data.prompt_len=12 " in out and "world.seed=0 " in out
    assert "sft.epochs" not in out  # ppo reads no SFT settings
    code, out, _ = _run(capsys, "ppo", "--help", "--config=tiny")
    assert code == 0 and "ppo.kl_coef=0.02 " in out and "'tiny'" in out
    # pretrain --help used to exit 1; every command's help exits 0 and shows its own section.
    for command in cli.commands():
        code, out, _ = _run(capsys, command, "--help")
        assert code == 0 and out.startswith(f"rlhf-jax {command}: "), command
        assert "checkpoint_minutes=" in out, command  # every stage checkpoints on the clock
    # Fields outside a command's own section that it reads: the RM it trains against.
    code, out, _ = _run(capsys, "grpo", "--help")
    assert "ppo.reward_from=" in out and "rm.init_from=" in out and "ppo.kl_coef" not in out
    code, out, _ = _run(capsys, "generate", "--help")
    assert "--prompt=<text>" in out and "--temperature=<t>" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (("ppo", "--config.ppo.kl_coeff=0.1"), "did you mean ppo.kl_coef"),
        (("ppo", "--config=tiny", "--config.model.n_heads=3"), "model.n_heads=3: d_model=32"),
        (("sft", "--config.model.family=gpt3"), "model.family='gpt3': expected one of"),
        (("sft", "--config.sft.epochs=-1"), "sft.epochs=-1: expected an integer >= 1"),
        (("ppo", "--config.ppo.iterations", "ten"), "expected an integer"),
        (("sft", "--config=nope"), "no preset named 'nope'"),
        (("sft", "--epochs=2"), "unknown argument '--epochs=2'"),
        (("train",), "unknown command 'train'"),
        (("rm", "--config=tiny"), "stage 'rm' starts from 'sft', which has not run"),
        (("ppo", "--config=tiny"), "run `rlhf-jax sft` with the same --workdir first"),
        (("eval", "--config=tiny", "--config.data.source=files"), "data.tokenizer=''"),
    ],
)
def test_user_mistakes_are_one_line_before_any_work(capsys, tmp_path, argv, message):
    workdir = tmp_path / "run"
    code, _, err = _run(capsys, *argv, f"--workdir={workdir}")
    assert message in _one_line_error(code, err)
    assert not workdir.exists()  # nothing was written


def test_the_pipeline_on_files_names_a_missing_file_before_any_stage(capsys, tmp_path):
    # It used to train SFT first, then stop at the RM for want of comparisons.
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    workdir = tmp_path / "run"
    argv = ("pipeline", "--config=tiny", "--config.data.source=files", f"--workdir={workdir}")
    code, _, err = _run(capsys, *argv, f"--config.data.demonstrations={demos}")
    assert "data.comparisons and data.prompts not set" in _one_line_error(code, err)
    assert not workdir.exists()


def test_the_readmes_error_transcripts_are_what_the_command_prints(capsys, tmp_path):
    # The README shows two mistakes and their one-line answers; they must stay word for word true.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = re.findall(r"^\$ rlhf-jax (.+)\n(rlhf-jax: error: .+)$", readme, flags=re.M)
    assert len(shown) >= 2, "the README's error examples moved; update this test"
    for command, message in shown:
        code, _, err = _run(capsys, *command.split(), f"--workdir={tmp_path / 'run'}")
        assert _one_line_error(code, err) == message, command


@pytest.mark.e2e
def test_bad_data_is_one_line_naming_file_line_and_field(capsys, tmp_path, rlhf_jax_cli):
    from rlhf_jax.instructlang.tokenizer import save_tokenizer

    tokenizer = save_tokenizer(tmp_path / "tokenizer")
    demos = tmp_path / "demos.jsonl"
    good = json.dumps({"prompt": "<bos> REV c1 <sep>", "response": "c1"}) + "\n"
    bad = json.dumps({"prompt": "<bos> REV c2 <sep>"}) + "\n"  # line 2 has no response
    demos.write_text(good + bad + good * 8)
    workdir = tmp_path / "run"
    argv = (
        "sft",
        "--config=tiny",
        f"--workdir={workdir}",
        "--config.data.source=files",
        f"--config.data.tokenizer={tokenizer}",
        f"--config.data.demonstrations={demos}",
        "--config.sft.ptx_fraction=0",
        "--config.sft.batch_size=8",
    )
    code, _, err = _run(capsys, *argv)
    assert f"{demos}:2: field 'response': missing" in _one_line_error(code, err)
    assert not workdir.exists()

    # --verbose (or RLHF_JAX_VERBOSE=1) shows the traceback instead.
    out = rlhf_jax_cli(*argv, cwd=tmp_path, env={"RLHF_JAX_VERBOSE": "1"}, timeout=300)
    assert out.returncode != 0 and "Traceback" in out.stderr and "DataError" in out.stderr


@pytest.mark.e2e
def test_a_rerun_starts_its_first_step_without_compiling(tmp_path, rlhf_jax_cli):
    # The same command twice (the second in another workdir, so that it trains again), sharing
    # a compilation cache: the second loads the step's program from disk instead of compiling it.
    # Its own cache, empty at the start; one CPU device (``subprocess_env``), as a user's CPU run
    # has: the cache stays off on a fake multi-device CPU.
    env = {"RLHF_JAX_COMPILATION_CACHE": str(tmp_path / "xla"), "JAX_LOG_COMPILES": "1"}
    args = ("pretrain", "--config=tiny", "--config.pretrain.steps=2")
    runs = [rlhf_jax_cli(*args, f"--workdir=run{i}", cwd=tmp_path, env=env) for i in range(2)]
    for out in runs:
        assert out.returncode == 0, out.stderr[-3000:]
    hits = [re.findall(r"compilation cache hit for '(\w+)'", r.stderr) for r in runs]
    assert "jit_step" not in hits[0] and "jit_step" in hits[1], hits
    # The same program gives the same numbers.
    losses = [(tmp_path / f"run{i}" / "pretrain" / "metrics.jsonl").read_text() for i in range(2)]
    assert [json.loads(line)["loss"] for line in losses[0].splitlines()] == [
        json.loads(line)["loss"] for line in losses[1].splitlines()
    ]
