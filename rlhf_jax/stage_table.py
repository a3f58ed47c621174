"""The stage table: one record per stage, the one list of stages everything else derives from.

Each ``Stage`` says what a stage is: its directory name under the work directory, the config
section whose settings bind its checkpoints, the command that runs it (and its ``--help``), where
it starts (for each of its inputs, the alternatives in order of preference), the function that
runs it, what it hands on (a policy or a reward model), its row in the report, whether it is one
of the ``methods`` a config may add beside PPO, and whether it logs RL curves. From this table
come the CLI's stage commands and their help, the pipelines' order (``rlhf-jax pipeline`` on the
user's data and on the built-in world), ``eval`` / ``export`` / ``generate --stage``, the
report's rows and curves, the names ``methods`` accepts, the settings a stage's checkpoints are
bound to, and the command a missing stage asks for.

The module is pure data and sits below every module that reads it: runners are named
(``"module:function"``) and imported only when a stage runs, so the table never imports the
training code. ``register`` adds a stage at run time (a method of your own): the pipeline, the
CLI, the evaluation, the export and the report then pick it up as they do the built-in ones.

A runner is called as ``runner(config, workdir, stage_name, **hooks)`` with the config's
``settings`` applied (the pipeline's plain PPO runs with ``ppo.ptx_coef=0``) and returns the
stage's metadata (a dict; ``{"reused": True, ...}`` when it had already finished). The hooks
are ``mesh`` for every stage, ``on_log(step, policy_params, samples)`` for stages that log RL
curves (the current policy as a plain model: adapters folded in) and ``on_validate(params)`` for
SFT.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from rlhf_jax.fields import get_value, with_values

# Where a stage's input comes from when the stage has no checkpoint of its own: the name of
# another stage (its exported params in the same work directory), INIT_FROM (the HF checkpoint
# `config.init_from`) or FRESH (a random initialisation).
INIT_FROM, FRESH = "init_from", "fresh"
# What a stage hands on: a policy (loads with AutoModelForCausalLM once exported), a reward
# model (AutoModelForSequenceClassification), or nothing (best-of-n trains nothing).
POLICY, REWARD = "policy", "reward"


def _no_init_from(config: Any) -> bool:
    return not config.init_from


def _with_ptx(config: Any) -> bool:
    return config.ppo.ptx_coef > 0


class Pass(NamedTuple):
    """Work one program does with one network, for the roofline (``rlhf_jax.plan``): ``kind``
    ``forward`` (a teacher-forced pass over ``tokens``), ``train`` (forward and backward, then
    an Adam update) or ``decode`` (``tokens`` sampled one position at a time); ``context`` the
    positions each token attends over; ``steps`` how many times the weights are read in turn
    (the optimiser steps of a scan, the positions of a decode loop)."""

    model: Any  # the network's ModelConfig
    kind: str
    tokens: int
    context: int
    steps: int = 1


class Program(NamedTuple):
    """One jitted function a stage runs, with the abstract, sharded inputs it is called with:
    what ``rlhf-jax plan`` compiles for a topology (``rlhf_jax.plan``). A stage's ``programs``
    function and its runner build the function through one setup function of the stage module,
    so the plan compiles the very program the stage runs. ``tokens`` is the number of tokens one
    call processes (trained on, or the episodes' prompt and response tokens of an RL iteration),
    for the tokens/s ceiling; ``work`` its passes (``Pass``), for the FLOPs and bytes a
    compiler's cost analysis undercounts (it counts a loop's body once); ``batch`` the config
    field whose size sets its activations (what a plan suggests lowering)."""

    name: str
    fn: Any  # jax.jit-wrapped: fn.lower(*args).compile()
    args: tuple
    tokens: int
    work: tuple[Pass, ...]
    batch: str
    compiled: Any = None  # already compiled for this mesh (the sampler's prefill)


class PlanInputs(NamedTuple):
    """What a plan assumes of the data, which it does not read: ``completions`` ranked per
    comparison (K), and the EOS and pad ids (constants of the program, not its size); and the
    compiler options a deviceless compile for its target needs."""

    completions: int = 2
    eos_id: int = 1
    pad_id: int = 0
    compiler_options: tuple[tuple[str, Any], ...] = ()

    def compile(self, lowered) -> Any:
        return lowered.compile(compiler_options=dict(self.compiler_options) or None)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage (see the module docstring).

    ``settings`` are the config fields a stage always runs with (``(("ppo.ptx_coef", 0.0),)``);
    they also pick the stage when several share a command (``rlhf-jax ppo`` runs ``ppo`` when
    the config has ``ppo.ptx_coef=0`` and ``ppo_ptx`` otherwise: the first stage of a command
    whose settings the config has). ``when(config)`` and ``needs`` (data uses that must have
    records, ``data.sources.SPLITS``) say whether the pipeline runs it; a ``method`` runs only
    when ``config.methods`` names it. A stage without a runner trains nothing: it is the best of
    ``eval.best_of_n`` answers of its ``policy`` input, picked by its ``reward`` input, made by
    the evaluation. ``summary``, ``details``, ``reads`` (config sections beyond its own) and
    ``fields`` (other dotted fields) are its command's ``--help``, given on the first stage of a
    command; ``how`` is the command line that runs it when that is more than
    ``rlhf-jax <command>``. ``programs(config, name, mesh, inputs)`` returns its jitted
    programs with abstract inputs (``Program``), what ``rlhf-jax plan`` compiles.
    """

    name: str
    section: str
    starts_from: Mapping[str, tuple[str, ...]]
    runner: str | Callable[..., dict] | None
    command: str | None = None
    exports: str | None = POLICY
    row: str | None = None
    method: bool = False
    curves: bool = False
    settings: tuple[tuple[str, Any], ...] = ()
    when: Callable[[Any], bool] | None = None
    needs: tuple[str, ...] = ()
    # Trains low-rank adapters when model.lora.rank > 0 (and lora.stages names it).
    adapts: bool = True
    summary: str = ""
    details: str = ""
    reads: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    how: str = ""
    programs: str | Callable[..., list] | None = None

    @property
    def trains(self) -> bool:
        return self.runner is not None

    @property
    def report_row(self) -> str | None:
        """The stage's row in the report: ``row``, else its name when it hands on a policy or
        makes one (best-of-n), else none (the reward model has a section of its own)."""
        if self.row:
            return self.row
        return self.name if self.exports == POLICY or not self.trains else None

    @property
    def command_line(self) -> str:
        """The command that runs this stage."""
        return self.how or f"rlhf-jax {self.command}"

    def runs_with(self, config: Any) -> bool:
        """Whether ``config`` already has every one of ``settings``."""
        return all(get_value(config, path) == value for path, value in self.settings)

    def run(self, config: Any, workdir, **hooks: Any) -> dict:
        """Run the stage into ``<workdir>/<name>`` with its settings applied; its metadata."""
        if not self.trains:
            raise ValueError(f"stage {self.name!r} trains nothing (the evaluation makes it)")
        runner = _resolve(self.runner)
        return runner(with_values(config, dict(self.settings)), workdir, self.name, **hooks)

    def plan(self, config: Any, mesh, inputs: PlanInputs) -> list[Program]:
        """The jitted programs the stage runs, with abstract inputs on ``mesh`` (its settings
        applied): what ``rlhf-jax plan`` compiles. Nothing is allocated or read."""
        if self.programs is None:
            return []
        programs = _resolve(self.programs)
        return programs(with_values(config, dict(self.settings)), self.name, mesh, inputs)


def _resolve(ref: str | Callable) -> Callable:
    """A ``"module:function"`` reference imported (the table never imports the training code
    itself), or the callable given."""
    if isinstance(ref, str):
        module, _, function = ref.partition(":")
        return getattr(importlib.import_module(module), function)
    return ref


_PPO_INPUTS = {"policy": ("sft",), "reward": ("rm",)}

STAGES: list[Stage] = [
    Stage(
        "pretrain",
        section="pretrain",
        command="pretrain",
        runner="rlhf_jax.stages.lm:run_lm_stage",
        programs="rlhf_jax.stages.lm:lm_programs",
        starts_from={"policy": (INIT_FROM, FRESH)},
        row="base",
        when=_no_init_from,
        needs=("pretrain",),
        adapts=False,  # it trains every weight: there is no base to adapt
        summary="train the base model on the pretraining text",
        details="Starts from init_from (an HF checkpoint directory) or a fresh initialisation.",
    ),
    Stage(
        "sft",
        section="sft",
        command="sft",
        runner="rlhf_jax.stages.lm:run_lm_stage",
        programs="rlhf_jax.stages.lm:lm_programs",
        starts_from={"policy": ("pretrain", INIT_FROM, FRESH)},
        summary="supervised fine-tuning on demonstrations: the PPO init and KL reference",
        details="Starts from the pretrain stage of --workdir, else init_from, else a fresh "
        "initialisation.",
    ),
    Stage(
        "rm",
        section="rm",
        command="rm",
        runner="rlhf_jax.stages.rm:run_rm",
        programs="rlhf_jax.stages.rm:rm_programs",
        starts_from={"policy": ("sft",)},
        exports=REWARD,
        summary="train the reward model on ranked comparisons",
        details="Starts from the sft stage of --workdir (its unembedding replaced by a scalar "
        "head), or from rm.init_from (an HF checkpoint, another run's stage directory, or a "
        "model size: an RM larger than the policy). On the built-in world the comparisons are "
        "first sampled from that SFT model and labelled.",
        reads=("eval",),
    ),
    Stage(
        "ppo",
        section="ppo",
        command="ppo",
        runner="rlhf_jax.stages.ppo:run_ppo",
        programs="rlhf_jax.stages.ppo:ppo_programs",
        starts_from=_PPO_INPUTS,
        curves=True,
        settings=(("ppo.ptx_coef", 0.0),),
        how="rlhf-jax ppo --config.ppo.ptx_coef=0",
        summary="PPO from the SFT model against the reward model; PPO-ptx when ppo.ptx_coef > 0",
        details="Starts from the sft (policy, KL reference) and rm (reward, value init) stages "
        "of --workdir, or the RM of ppo.reward_from (another run's rm stage or an exported "
        "RM); writes <workdir>/ppo, or <workdir>/ppo_ptx when ppo.ptx_coef > 0.",
        fields=("rm.init_from",),  # the value network's shape, when the RM is not the policy's
    ),
    Stage(
        "ppo_ptx",
        section="ppo",
        command="ppo",
        runner="rlhf_jax.stages.ppo:run_ppo",
        programs="rlhf_jax.stages.ppo:ppo_programs",
        starts_from=_PPO_INPUTS,
        curves=True,
        when=_with_ptx,
        needs=("pretrain",),
        how="rlhf-jax ppo --config.ppo.ptx_coef=<gamma > 0>",
    ),
    Stage(
        "dpo",
        section="dpo",
        command="dpo",
        runner="rlhf_jax.stages.dpo:run_dpo",
        programs="rlhf_jax.stages.dpo:dpo_programs",
        starts_from={"policy": ("sft",)},
        method=True,
        summary="DPO (or IPO, hinge) from the SFT model on the ranked comparisons; no reward model",
        details="Starts from the sft stage of --workdir, which is also the frozen reference; "
        "each K-wise comparison counts as its C(K,2) pairs (ties dropped). Writes <workdir>/dpo, "
        "a policy stage like sft: rlhf-jax eval/export/generate --stage=dpo. On the built-in "
        "world the comparisons are first sampled from that SFT model and labelled.",
    ),
    Stage(
        "grpo",
        section="grpo",
        command="grpo",
        runner="rlhf_jax.stages.grpo:run_grpo",
        programs="rlhf_jax.stages.grpo:grpo_programs",
        starts_from=_PPO_INPUTS,
        method=True,
        curves=True,
        settings=(("grpo.baseline", "group"),),
        summary="GRPO (or RLOO) from the SFT model against the reward model; no value network",
        details="Starts from the sft stage (policy, KL reference) and the reward model PPO uses "
        "(the rm stage of --workdir, or ppo.reward_from). grpo.group_size responses per prompt "
        "are each other's baseline: the group mean (grpo.baseline=group, divided by the group's "
        "std unless grpo.scale_rewards=False) or the mean of the others (grpo.baseline=rloo). "
        "Writes <workdir>/grpo (<workdir>/rloo for RLOO, so a run can hold both), a policy "
        "stage: rlhf-jax eval/export/generate --stage=grpo (or rloo).",
        fields=("ppo.reward_from", "rm.init_from"),
    ),
    Stage(
        "rloo",
        section="grpo",
        command="grpo",
        runner="rlhf_jax.stages.grpo:run_grpo",
        programs="rlhf_jax.stages.grpo:grpo_programs",
        starts_from=_PPO_INPUTS,
        method=True,
        curves=True,
        settings=(("grpo.baseline", "rloo"),),
        how="rlhf-jax grpo --config.grpo.baseline=rloo",
    ),
    Stage(
        "best_of_n",
        section="eval",
        runner=None,
        starts_from=_PPO_INPUTS,
        exports=None,
        method=True,
        adapts=False,  # it trains nothing
        how="rlhf-jax eval --stage=best_of_n",
    ),
]


def register(stage: Stage) -> Stage:
    """Add ``stage`` to the table (after the built-in ones), or replace the one of its name."""
    names = [s.name for s in STAGES]
    if stage.name in names:
        STAGES[names.index(stage.name)] = stage
    else:
        STAGES.append(stage)
    return stage


def get(name: str) -> Stage:
    """The stage called ``name``; ``KeyError`` naming the known ones if there is none."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def names(**where: Any) -> tuple[str, ...]:
    """The names of the stages whose attributes equal ``where`` (all of them by default), in
    table order: ``names(exports=POLICY)``, ``names(method=True)``."""
    return tuple(s.name for s in STAGES if all(getattr(s, k) == v for k, v in where.items()))


def methods() -> tuple[str, ...]:
    """What ``config.methods`` may name: the stages beside PPO and PPO-ptx."""
    return names(method=True)


def commands() -> dict[str, list[Stage]]:
    """``{command: its stages}`` in table order."""
    out: dict[str, list[Stage]] = {}
    for s in STAGES:
        if s.command:
            out.setdefault(s.command, []).append(s)
    return out


def for_command(command: str, config: Any) -> Stage:
    """The stage ``rlhf-jax <command>`` runs with ``config``: the first of the command's stages
    whose ``settings`` the config has."""
    stages = commands()[command]
    return next((s for s in stages if s.runs_with(config)), stages[-1])


def to_train(config: Any, asked: tuple[str, ...], available: Callable[[str], bool]) -> list[Stage]:
    """The stages a pipeline trains, in table order: every stage that trains, but the methods
    not ``asked`` for, those whose ``when`` fails (pretraining under ``init_from``, PPO-ptx at
    ``ppo.ptx_coef = 0``) and those with a data use in ``needs`` that is not ``available``."""
    return [
        s
        for s in STAGES
        if s.trains
        and (not s.method or s.name in asked)
        and (s.when is None or s.when(config))
        and all(available(use) for use in s.needs)
    ]


def report_rows() -> tuple[str, ...]:
    """The report's model rows, in table order."""
    return tuple(s.report_row for s in STAGES if s.report_row)


def section_of(stage: str) -> str:
    return get(stage).section
