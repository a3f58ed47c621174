"""The colab/ notebooks: stored without outputs, installing what they say, and executed top to
bottom on CPU with their CPU sizes (a failing cell fails the test)."""

import json
import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import tomllib
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart", "your_data", "compose_losses")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REPOSITORY = PROJECT["urls"]["Repository"]


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def _install_cell(nb) -> str:
    (cell,) = [s for s in _code(nb) if "pip" in s and 'find_spec("rlhf_jax")' in s]
    return cell


def _parameters_index(nb) -> int:
    (i,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    return i


def _execute(
    nb, cwd: Path, parameters: str, env: dict | None = None, timeout: int = 900
) -> nbformat.NotebookNode:
    """Run ``nb`` in a fresh kernel in ``cwd`` (its environment updated with ``env``) with
    ``parameters`` as a cell after its parameters cell (as papermill injects them); raises
    ``CellExecutionError`` at a failing cell."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))  # a copy
    injected = nbformat.v4.new_code_cell(parameters)
    injected.id = "injected-parameters"
    nb.cells.insert(_parameters_index(nb) + 1, injected)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env={**os.environ, **(env or {})})
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
            out.append("".join(o.get("data", {}).get("text/markdown", "")))
    return "\n".join(out)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs_with_a_badge_and_its_sizing(name):
    nb = _read(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        assert cell.metadata in ({}, {"tags": ["parameters"]}), cell.metadata
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    intro = nb.cells[0].source
    badge = f"colab.research.google.com/github/{REPOSITORY.removeprefix('https://github.com/')}"
    assert f"{badge}/blob/main/colab/{name}.ipynb" in intro
    assert f"{badge}/blob/main/colab/{name}.ipynb" in (ROOT / "README.md").read_text()
    for words in ("What it costs", "CPU", "T4", "TPU"):  # what it was sized for, and memory
        assert words in intro, words
    assert re.search(r"\d (GB|GiB)", intro)
    assert _parameters_index(nb) == 1


def test_every_notebook_installs_the_same_pinned_releases():
    cells = {name: _install_cell(_read(name)) for name in NOTEBOOKS}
    assert len(set(cells.values())) == 1, "the install cells differ"
    cell = cells[NOTEBOOKS[0]]
    assert f'REPO, REF = "{REPOSITORY}", "main"' in cell
    assert "colab/constraints.txt" in cell and "[tpu]" in cell and "[cuda]" in cell
    pins = {}
    for line in (COLAB / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.replace("_", "-")] = spec.version
    for dependency in PROJECT["dependencies"]:
        req = Requirement(dependency)
        name = req.name.replace("_", "-")
        if name in pins:  # a pin the project's own bounds refuse would break the install
            assert req.specifier.contains(pins[name]), (dependency, pins[name])
    assert {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers"} <= set(pins)


@pytest.fixture(scope="module")
def world_workdir(tiny_run, tmp_path_factory):
    # The quickstart's run, which the losses notebook reuses, as the notebooks say: a copy of
    # the session's shared tiny run (its preset and seed), so the quickstart finds every stage
    # finished (as on a second run of it) and evaluates and reports; training is tested in
    # tests/test_stages.py.
    workdir = tmp_path_factory.mktemp("colab") / "runs" / "quickstart"
    for part in ("data", "pretrain", "sft", "rm", "ppo", "ppo_ptx", "summary.json"):
        copy = shutil.copytree if (tiny_run.workdir / part).is_dir() else shutil.copy
        copy(tiny_run.workdir / part, workdir / part)
    return workdir


@pytest.mark.e2e
def test_quickstart_runs_the_pipeline_and_shows_the_report(world_workdir, subprocess_env):
    workdir = f"WORKDIR = {str(world_workdir)!r}"
    nb = _execute(_read("quickstart"), world_workdir.parents[1], workdir, subprocess_env)
    text = _text(nb)
    assert "preset 'tiny', compute dtype float32" in text
    assert "| ppo_ptx |" in text and re.search(r"\b(PASS|FAIL)\b", text)
    assert "data:image/png;base64," in text  # the curves, inline
    assert re.search(r"ppo\s+gold [+-]\d\.\d{3}", text)
    assert "peak memory" in text and (world_workdir / "report.md").is_file()


@pytest.mark.e2e
def test_your_data_trains_exports_and_generates_in_transformers(
    tmp_path, monkeypatch, subprocess_env
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the notebook's offline path: nothing downloaded
    workdir = f"WORKDIR = {str(tmp_path / 'run')!r}"
    nb = _execute(_read("your_data"), tmp_path, workdir, subprocess_env)
    text = _text(nb)
    assert "demonstrations.jsonl: " in text and "comparisons.jsonl: " in text
    # Offline, the tiny model takes the LoRA path a checkpoint too large for the chip takes.
    assert "LoRA rank 4 over bfloat16 frozen weights" in text
    assert "RM score" in text  # the report's table
    assert re.search(r"policy: '.*' \(\d+ tokens\)\nreward model score: [+-]\d", text)
    assert (tmp_path / "run" / "export" / "policy" / "config.json").is_file()


@pytest.mark.e2e
def test_compose_losses_prints_its_gold_next_to_ppo(world_workdir, subprocess_env):
    workdir = f"WORKDIR = {str(world_workdir)!r}"
    nb = _execute(_read("compose_losses"), world_workdir.parents[1], workdir, subprocess_env)
    text = _text(nb)
    rows = {m: re.search(rf"^{m}\s+([+-]\d\.\d{{3}})", text, re.M) for m in ("sft", "ppo", "grpo")}
    assert all(rows.values()), text[-2000:]
    assert "iteration    0: RM score" in text


@pytest.mark.e2e
def test_a_failing_cell_fails_the_run(tmp_path):
    nb = _read("quickstart")
    nb.cells.insert(_parameters_index(nb) + 1, nbformat.v4.new_code_cell("1 / 0"))
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        _execute(nb, tmp_path, "pass", timeout=120)
