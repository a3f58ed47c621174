"""Test setup: 8 fake CPU devices (must happen before JAX initialises) and float32 numerics."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


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
