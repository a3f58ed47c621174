"""The house as its imports draw it: no import cycle, run readers free of the training loop,
imports at the top, and one list of stages (``rlhf_jax.stage_table``) that everything derives
from."""

import ast
import dataclasses
from pathlib import Path

import pytest

from rlhf_jax import cli, report, stage_table
from rlhf_jax.config import Config, methods
from rlhf_jax.configs import tiny
from rlhf_jax.errors import ConfigError
from rlhf_jax.evaluator import evaluated_models
from rlhf_jax.rundir import RunDir, stage_settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhf_jax"


def _module_name(path: Path) -> str:
    if path.parent == ROOT / "configs":
        return f"rlhf_jax.configs.{path.stem}"
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "configs").glob("*.py")]}


def _imports(path: Path, *, nested_only: bool = False) -> list[tuple[str, ast.stmt]]:
    """The rlhf_jax modules a file imports anywhere in it (inside functions too), resolved to
    module names: ``from rlhf_jax import sharding`` is ``rlhf_jax.sharding``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if nested_only and id(node) in top:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub if sub in MODULES else node.module, node))
    return [(name, node) for name, node in out if name in MODULES or nested_only]


def _graph() -> dict[str, set[str]]:
    return {m: {name for name, _ in _imports(p)} - {m} for m, p in MODULES.items()}


def test_no_import_cycle_among_the_librarys_modules():
    graph = _graph()
    assert len(graph) >= 40 and graph["rlhf_jax.pipeline"]  # the graph is really built
    # Depth-first search for a back edge; the cycle is reported as the modules on it.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _closure(module: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for n in graph[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_what_reads_a_run_does_not_import_the_training_loop():
    # Export, the pipelines' evaluation, the report and the built-in world read a run through
    # rlhf_jax.rundir and the stage table; they reach the stages' training code only by name,
    # through a Stage's runner, never by importing it.
    graph = _graph()
    readers = ["rlhf_jax.export", "rlhf_jax.pipeline", "rlhf_jax.report", "rlhf_jax.evaluator"]
    readers += [m for m in MODULES if m.startswith("rlhf_jax.instructlang")]
    for reader in readers:
        reached = _closure(reader, graph) | graph[reader]
        assert "rlhf_jax.stages.driver" not in reached, reader
    # The stage table is pure data: it imports nothing that trains, evaluates or reads data.
    assert _closure("rlhf_jax.stage_table", graph) <= {"rlhf_jax.fields", "rlhf_jax.errors"}


def test_imports_are_at_the_top_but_the_clis_and_commented_ones():
    lazy = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for name, node in _imports(path, nested_only=True):
            commented = "#" in lines[node.lineno - 1]
            if module != "rlhf_jax.cli" and not commented:
                lazy.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not lazy, "imports inside functions, without a comment saying why:\n" + "\n".join(lazy)


# --------------------------------------------------------------------------------------------------
# One stage table


def test_every_list_of_stages_comes_from_the_table():
    names = stage_table.names()
    assert names == ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "dpo", "grpo", "rloo",
                     "best_of_n")  # fmt: skip
    assert stage_table.methods() == ("dpo", "grpo", "rloo", "best_of_n")
    assert stage_table.names(exports=stage_table.POLICY) == (
        "pretrain", "sft", "ppo", "ppo_ptx", "dpo", "grpo", "rloo",
    )  # fmt: skip
    assert stage_table.report_rows() == (
        "base", "sft", "ppo", "ppo_ptx", "dpo", "grpo", "rloo", "best_of_n",
    )  # fmt: skip
    assert report.ordered(["rloo", "x", "base", "sft"]) == ["base", "sft", "rloo", "x"]
    assert stage_table.names(curves=True) == ("ppo", "ppo_ptx", "grpo", "rloo")
    commands = cli.commands()
    for command, stages in stage_table.commands().items():
        assert commands[command].summary == stages[0].summary != ""
        assert all(s.section in commands["pipeline"].sections for s in stages)
    # Every stage's section is a section of the config, and every runner resolves.
    for s in stage_table.STAGES:
        assert hasattr(Config(), s.section), s.name
        assert s.command_line.startswith("rlhf-jax ")
        if isinstance(s.runner, str):
            module, _, function = s.runner.partition(":")
            assert callable(getattr(__import__(module, fromlist=[function]), function))


def test_a_command_runs_the_stage_whose_settings_the_config_has():
    config = stage_table.with_values(Config(), {"ppo.ptx_coef": 1.0})
    assert stage_table.for_command("ppo", config).name == "ppo_ptx"
    plain = stage_table.with_values(config, {"ppo.ptx_coef": 0.0})
    assert plain.ppo.ptx_coef == 0.0 and config.ppo.ptx_coef == 1.0  # a copy; config is kept
    assert stage_table.for_command("ppo", plain).name == "ppo"
    rloo = stage_table.with_values(config, {"grpo.baseline": "rloo"})
    assert stage_table.for_command("grpo", config).name == "grpo"
    assert stage_table.for_command("grpo", rloo).name == "rloo"
    # The stage-specific settings bind each stage's checkpoints: its own section and the shared.
    settings = stage_settings(dataclasses.asdict(config), "rloo")
    assert "grpo.baseline" in settings and "seed" in settings and "model.d_model" in settings
    assert not any(k.startswith(("ppo.", "sft.", "mesh.")) for k in settings)


def test_a_registered_stage_is_a_method_the_config_and_the_evaluation_know(tmp_path, monkeypatch):
    monkeypatch.setattr(stage_table, "STAGES", list(stage_table.STAGES))
    config = dataclasses.replace(tiny.get_config(), methods="dpo,copy")
    with pytest.raises(ConfigError, match="unknown copy"):
        config.validate()
    stage_table.register(
        stage_table.Stage(
            "copy", section="sft", starts_from={"policy": ("sft",)}, runner=print, method=True
        )
    )
    config.validate()
    assert methods(config) == ("dpo", "copy") and stage_table.methods()[-1] == "copy"
    run = RunDir(tmp_path)
    for stage in ("pretrain", "sft", "dpo", "copy"):
        run.stage(stage).mkdir()
    assert evaluated_models(config, run) == {
        "base": "pretrain", "sft": "sft", "dpo": "dpo", "copy": "copy",
    }  # fmt: skip
    assert report.ordered(["copy", "sft", "base"]) == ["base", "sft", "copy"]
