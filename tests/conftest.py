"""Test setup: 8 fake CPU devices (must happen before JAX initialises) and float32 numerics; the
``e2e`` tier; and the tiny world's run that the end-to-end tests share.

Two tiers (pyproject.toml registers the marker): a test that trains a stage or starts a process
is ``e2e``; everything else is fast (``pytest -m "not e2e"``, a few minutes). A test that uses
one of ``E2E_FIXTURES`` without the marker is refused at collection, so the fast tier cannot
quietly grow a training run. CI runs both.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# The tests run on the CPU; libtpu (the test extra has it, for `rlhf-jax plan`) must not claim
# a TPU this machine does not have when JAX starts (the plan compiles for TPUs without one).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

# Fixtures that train stages or start processes: a test using one is e2e.
E2E_FIXTURES = ("tiny_run", "rm_run", "rlhf_jax_cli", "two_processes", "subprocess_env")
# Every method beside PPO, so the shared run has every stage of the stage table.
METHODS = ("dpo", "grpo", "rloo", "best_of_n")


def pytest_collection_modifyitems(config, items):
    for item in items:
        uses = [f for f in E2E_FIXTURES if f in getattr(item, "fixturenames", ())]
        if uses and item.get_closest_marker("e2e") is None:
            raise pytest.UsageError(
                f"{item.nodeid} uses {', '.join(uses)} (trains stages or starts processes) "
                "but is not marked e2e: add @pytest.mark.e2e (or pytestmark)"
            )


class TinyRun(NamedTuple):
    """The tiny world's pipeline (``rlhf-jax seeds`` with one seed and every method): its
    config, its work directory (``<root>/seed0``), its ``summary.json``, and how many times each
    stage compiled its jitted step while it ran. Read it, or copy what you change: it is shared
    by every test of the session."""

    config: object
    workdir: Path
    summary: dict
    compiles: dict[str, int]


class _Compiles(logging.Handler):
    """Counts JAX's "Compiling jit(step)" / "jit(iteration)" lines and gives them to the stage
    whose "[<stage>] N steps in" line follows them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.pending, self.per_stage = 0, {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if re.match(r"Compiling jit\((step|iteration)\)", message):
            self.pending += 1
        elif match := re.match(r"\[(\w+)\] \d+ steps in", message):
            self.per_stage[match.group(1)] = self.pending
            self.pending = 0


def _run_counting_compiles(run) -> dict[str, int]:

    handler = _Compiles()
    loggers = [logging.getLogger(n) for n in ("rlhf_jax", "jax._src.interpreters.pxla")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with jax.log_compiles(True):
            run()
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
    return handler.per_stage


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """Built once per test session, by whichever pytest worker asks first; the others wait on a
    file lock and read it (pytest-xdist's workers share the session's base temp directory)."""
    # Imported here, not at the top: the package must be imported after jaxtyping's import hook
    # is installed (by the --jaxtyping-packages option), so that its shapes are checked.
    from rlhf_jax.configs import tiny
    from rlhf_jax.instructlang.pipeline import run_seeds

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / "tiny-seeds"
    config = dataclasses.replace(tiny.get_config(), methods=",".join(METHODS))
    with FileLock(f"{root}.lock"):
        if not (root / "seeds.md").is_file():
            compiles = _run_counting_compiles(lambda: run_seeds(config, root, [0]))
            (root / "compiles.json").write_text(json.dumps(compiles))
    workdir = root / "seed0"
    summary = json.loads((workdir / "summary.json").read_text())
    return TinyRun(config, workdir, summary, json.loads((root / "compiles.json").read_text()))


@pytest.fixture(scope="session")
def rm_run(tiny_run, tmp_path_factory):
    """pretrain, sft and rm of the tiny world: the session's shared run (``tiny_run``) without
    its RL stages; each test copies it."""
    workdir = tmp_path_factory.mktemp("rm_run") / "base"
    for part in ("data", "pretrain", "sft", "rm"):
        shutil.copytree(tiny_run.workdir / part, workdir / part)
    return workdir


@pytest.fixture
def two_processes():
    """Run a script as a real 2-process JAX job (gloo collectives, 2 CPU devices each).

    The script gets ``sys.argv[1:] = [process_id, coordinator_port, *args]`` and must print
    ``OK <process_id>`` when it succeeds.
    """

    def run(source: str, *args: str) -> None:
        with socket.socket() as s:  # a free port for the coordinator
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", source, str(i), port, *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        outputs = [p.communicate(timeout=240)[0] for p in procs]
        for i, (p, out) in enumerate(zip(procs, outputs)):
            assert p.returncode == 0 and f"OK {i}" in out, out[-3000:]

    return run


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory):
    """The environment of the commands and notebook kernels the tests start: one CPU device, as
    a user's CPU run has (the suite's eight fake ones make every tiny step several times slower
    on 2 cores; meshes are tested in-process), and one compilation cache for the whole session,
    so that a program the tiny preset compiled once is loaded by every later process instead of
    compiled again (a hit runs the same program, so no number changes)."""
    return {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "RLHF_JAX_COMPILATION_CACHE": str(tmp_path_factory.mktemp("xla_cache")),
    }


@pytest.fixture(scope="session")
def rlhf_jax_cli(subprocess_env):
    """``rlhf_jax_cli(*args, cwd=...)``: ``rlhf-jax *args`` in a fresh process (this checkout
    first on the path, ``subprocess_env`` unless ``env`` says otherwise), its
    ``CompletedProcess`` with the output captured."""

    def run(*args: str, cwd, env=None, timeout: int = 900):
        env = {**os.environ, "PYTHONPATH": os.getcwd(), **subprocess_env, **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "rlhf_jax.cli", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def preempt(monkeypatch):
    """``preempt(n)``: the ``n``-th batch a stage feeds raises ``KeyboardInterrupt``, as a
    preemption would; ``preempt(0)`` feeds every batch again."""
    from rlhf_jax.stages import driver

    real = driver.sharding.shard_batch

    def arm(n: int) -> None:
        calls = {"n": 0}

        def preempted(batch, mesh):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(batch, mesh)

        monkeypatch.setattr(driver.sharding, "shard_batch", preempted if n else real)

    return arm


@pytest.fixture
def interrupted(preempt):
    """``interrupted(run, workdir, stage, at, kept)``: ``run(workdir)`` preempted at its
    ``at``-th batch, its last checkpoint asserted to be step ``kept``, then run again to the end
    (the resumed run, for a test to compare with an uninterrupted one)."""
    from rlhf_jax import checkpoint

    def go(run, workdir, stage: str, at: int, kept: int) -> None:
        preempt(at)
        with pytest.raises(KeyboardInterrupt):
            run(workdir)
        preempt(0)
        assert checkpoint.StageCheckpointer(workdir, stage).latest_step() == kept
        run(workdir)

    return go
