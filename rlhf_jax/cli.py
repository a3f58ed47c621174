"""The ``rlhf-jax`` command: one sub-command per stage, the whole pipeline, eval and generate.

    rlhf-jax --help                                     # the commands
    rlhf-jax ppo --help                                 # its flags and every config field it reads
    rlhf-jax pipeline                                   # default preset, built-in world
    rlhf-jax sft --config=tiny --workdir=runs/tiny --config.sft.epochs=2

``--config=<preset>[:arg]`` picks a preset: a name of the package's presets (``default``, ``tiny``,
``paper``; ``hf:<checkpoint dir>`` for a Hugging Face model) or a ``.py`` file with
``get_config(arg)``; ``--config.<field>=<value>`` overrides any field (``fields.apply_overrides``),
and the result is validated before any work starts. A user
mistake (a bad field or value, bad data, a stage run before the one it starts from) prints one
line and exits with status 2; ``--verbose`` (or ``RLHF_JAX_VERBOSE=1``) shows the traceback too.
The built-in world's commands dispatch to ``rlhf_jax.instructlang``; the rest is the library.
The stage commands, their help and their dispatch come from ``rlhf_jax.stage_table``. The
library is imported inside the functions that run a command, never at the top of this module, so
that ``--help`` and a mistyped flag answer at once, without loading JAX and the models.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from rlhf_jax import fields, stage_table
from rlhf_jax.errors import ConfigError, UserError

SHARED_FIELDS = (
    "name", "seed", "init_from", "keep_checkpoints", "checkpoint_every", "checkpoint_minutes",
    "log_every",
)  # fmt: skip
SHARED_SECTIONS = ("model", "mesh", "data", "world")


@dataclasses.dataclass(frozen=True)
class Command:
    summary: str
    sections: tuple[str, ...]  # config sections the command reads beyond the shared ones
    flags: tuple[str, ...] = ()
    details: str = ""
    fields: tuple[str, ...] = ()  # other fields it reads (dotted paths), beyond the shared ones


RUN_FLAGS = ("distributed",)
# The commands beside the stages' own (which come from ``rlhf_jax.stage_table``: ``commands``).
PIPELINE_DETAILS = (
    "On the built-in world: pretrain, sft, comparison sampling, rm, ppo and "
    "ppo_ptx (when ppo.ptx_coef > 0), every model evaluated with the gold reward. On your "
    "data (data.source=files, e.g. --config=hf:<checkpoint>): sft, rm, ppo (and ppo_ptx "
    "with pretraining text), evaluated by the RM on held-out prompts, then the policy and RM "
    "exported under <workdir>/export/. --config.methods={methods} adds those "
    "methods after ppo_ptx, each a row of the report. Both write report.md, summary.json "
    "and samples.jsonl; finished stages are reused (the report keeps the seconds they took "
    "when they ran)."
)
RUN_COMMANDS = {
    "pipeline": Command(
        "the whole recipe, evaluated, then report.md (the main job on the built-in world)",
        (),
        RUN_FLAGS,
        details=PIPELINE_DETAILS,
        fields=("methods",),
    ),
    "seeds": Command(
        "the pipeline once per seed, then seeds.md (mean ± sd over seeds)",
        (),
        ("seeds", *RUN_FLAGS),
        details="Each seed runs into <workdir>/seed<k>/ (default workdir: runs/<name>-seeds); "
        "finished seeds are only re-read (a seed without a model that methods asks for runs "
        "again, reusing its finished stages).",
        fields=("methods",),
    ),
    "study": Command(
        "the experiments beyond the main job (C3, C4, C6-C9, oracle PPO), then study.md",
        ("study",),
        ("seeds", *RUN_FLAGS),
        details="Runs the main job per seed into <workdir>/seed<k>/ as `rlhf-jax seeds` does "
        "(default workdir: runs/<name>-seeds, so a finished sweep is reused), then each "
        "experiment of study.experiments under <workdir>/study/, each a PASS/FAIL line decided "
        "by 95% intervals over the seeds, written to <workdir>/study.md with its PNGs. Every "
        "stage and every experiment's per-seed result resumes or is re-read.",
        fields=("methods",),
    ),
}
MODEL_COMMANDS = {
    "eval": Command(
        "evaluate one stage's policy against the SFT model and print JSON",
        ("eval",),
        ("stage",),
        details="On the built-in world: gold reward, paired gain and win rate vs SFT, KL, "
        "pretraining NLL, fact accuracy, metadata. On your data: the RM's score of its "
        "answers to the held-out prompts, the paired gain and win rate by the RM against SFT, "
        "KL, held-out NLL, EOS rate and length. --stage=best_of_n evaluates the SFT model's "
        "best of eval.best_of_n answers by the RM (no training; KL log n - (n-1)/n).",
    ),
    "export": Command(
        "write one stage as a Hugging Face directory that transformers loads",
        (),
        ("stage", "out", "adapters"),
        details="A policy stage loads with AutoModelForCausalLM (PPO stages export their EMA "
        "weights); the rm stage with AutoModelForSequenceClassification (num_labels=1, its "
        "normalising bias folded in, scoring a text at its last token: end it with EOS; its "
        "tokenizer pads on the right, never with EOS). The tokenizer and "
        "generation_config.json come along. A LoRA stage (model.lora.rank > 0) exports its "
        "adapters merged into the weights; with --adapters, a policy stage's adapters alone, as "
        "a PEFT directory that peft.PeftModel.from_pretrained loads onto the export of its base.",
    ),
    "plan": Command(
        "compile every stage for a TPU topology or a GPU and say per chip what fits (nothing runs)",
        (),
        ("topology", "json", "completions", "stages"),
        details="Compiles the jitted step (or RL iteration, with its sampler) of every stage "
        "the pipeline would run with this config, and the evaluation's sampler, ahead of time "
        "for the topology (v2-8, v3-8, v4-8, v5e-1/4/8/16/32, v5p-8, v6e-1/4/8: needs libtpu, "
        'pip install "rlhf_jax[tpu]"; t4, a100, h100, h100-8: needs jax-cuda12-plugin; cpu:N: '
        "this machine's CPU devices), with no such device present, on abstract inputs: "
        "nothing is allocated or trained. One row per program: per-chip arguments, temporaries "
        "and outputs against the chip's HBM, FLOPs and a roofline time per step. A program "
        "that does not fit ends the command with one line saying what would (exit status 1).",
        fields=("methods",),
    ),
    "generate": Command(
        "sample responses to text prompts with one stage's policy",
        (),
        ("stage", "prompt", "max_new_tokens", "temperature"),
        details='Prints one JSON line per prompt: {"prompt": ..., "response": ...}.',
    ),
}


def commands() -> dict[str, Command]:
    """Every command: the pipelines, one per stage command of ``rlhf_jax.stage_table`` (its help
    given by the command's first stage), then the commands that read a finished stage. The
    pipelines read every stage's config section."""
    stages = {}
    for name, group in stage_table.commands().items():
        first = group[0]
        stages[name] = Command(
            first.summary, (first.section, *first.reads), RUN_FLAGS, first.details, first.fields
        )
    sections = tuple(dict.fromkeys(s.section for s in stage_table.STAGES))
    pipelines = {
        name: dataclasses.replace(
            c,
            sections=(*sections, *(x for x in c.sections if x not in sections)),
            details=c.details.format(methods=",".join(stage_table.methods())),
        )
        for name, c in RUN_COMMANDS.items()
    }
    # A plan compiles every stage, so it reads every stage's section, as the pipelines do.
    model_commands = {
        name: dataclasses.replace(c, sections=sections) if name == "plan" else c
        for name, c in MODEL_COMMANDS.items()
    }
    return {**pipelines, **stages, **model_commands}


EXAMPLES = """\
  rlhf-jax pipeline                               # the main job: about 13 minutes on 2 CPU cores
  rlhf-jax pipeline --config=tiny                 # every stage for a few steps: a smoke test
  rlhf-jax ppo --workdir=runs/default --config.ppo.kl_coef=0.1 --config.ppo.ptx_coef=0"""

FLAG_HELP = {
    "config": "--config=<preset>[:arg]   a preset name (default, tiny, paper, "
    "hf:<checkpoint dir>) or a .py file with get_config(arg); default: default",
    "workdir": "--workdir=<dir>           run directory (default: runs/<config name>)",
    "verbose": "--verbose                 show the traceback of an error",
    "seeds": "--seeds=0,1,2             the seeds to run",
    "stage": "--stage=<stage>           which stage (default: ppo)",
    "out": "--out=<dir>               the new directory to write",
    "adapters": "--adapters                a LoRA stage's adapters as a PEFT directory "
    "(default: merged weights)",
    "distributed": "--distributed             one process of a multi-host run: "
    "jax.distributed.initialize() finds the\n"
    "                            coordinator (Cloud TPU), or give --coordinator=<host:port> "
    "--num_processes=<n>\n                            --process_id=<i> (CPU processes use gloo)",
    "prompt": "--prompt=<text>           a prompt (repeatable; the world has a default)",
    "max_new_tokens": "--max_new_tokens=<n>      response tokens (default: data.response_len)",
    "temperature": "--temperature=<t>         sampling temperature (default: 1; 0: greedy)",
    "topology": "--topology=<name>         v2-8, v3-8, v4-8, v5e-1 ... v5e-32, v5p-8, v6e-1/4/8, "
    "t4, a100[-N],\n                            h100[-N], or cpu:N (default: v5e-1, Colab's "
    "TPU)",
    "json": "--json                    the plan as JSON on stdout",
    "completions": "--completions=<K>         completions ranked per comparison (default: the "
    "world's most, else 2)",
    "stages": "--stages=sft,rm,...       only these stages (and eval: the sampler)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise ConfigError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _parser(command: str) -> _Parser:
    p = _Parser(prog=f"rlhf-jax {command}", add_help=False, allow_abbrev=False)
    p.add_argument("--config", default="default")
    p.add_argument("--workdir", default=None)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--help", "-h", action="store_true")
    flags = commands()[command].flags
    if "seeds" in flags:
        p.add_argument("--seeds", default="0,1,2")
    if "stage" in flags:
        p.add_argument("--stage", default="ppo")
    if "out" in flags:
        p.add_argument("--out", default=None)
    if "adapters" in flags:
        p.add_argument("--adapters", action="store_true")
    if "distributed" in flags:
        p.add_argument("--distributed", action="store_true")
        p.add_argument("--coordinator", default=None)
        p.add_argument("--num_processes", type=int, default=None)
        p.add_argument("--process_id", type=int, default=None)
    if "prompt" in flags:
        p.add_argument("--prompt", action="append", default=[])
    if "max_new_tokens" in flags:
        p.add_argument("--max_new_tokens", type=int, default=0)
    if "temperature" in flags:
        p.add_argument("--temperature", type=float, default=1.0)
    if "topology" in flags:
        p.add_argument("--topology", default="v5e-1")
        p.add_argument("--json", action="store_true")
        p.add_argument("--completions", type=int, default=None)
        p.add_argument("--stages", default="")
    return p


# --------------------------------------------------------------------------------------------------
# Presets and overrides


def load_preset(spec: str) -> Any:
    """The config of ``<preset>[:arg]``: a package preset name or a ``.py`` file."""
    name, _, arg = spec.partition(":")
    if name.endswith(".py") or os.sep in name or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--config={spec}: no such preset file {path}")
        spec_ = importlib.util.spec_from_file_location(f"rlhf_jax_preset_{path.stem}", path)
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(f"rlhf_jax.configs.{name}")
        except ModuleNotFoundError:
            known = ", ".join(sorted(_preset_names()))
            raise ConfigError(
                f"--config={spec}: no preset named {name!r}; presets: {known}, or a .py file"
            ) from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config={spec}: the preset has no get_config(arg) function")
    return module.get_config(arg or None)


def _preset_names() -> list[str]:
    files = resources.files("rlhf_jax.configs").iterdir()
    return [f.name[:-3] for f in files if f.name.endswith(".py") and not f.name.startswith("_")]


def split_overrides(rest: list[str], prog: str) -> list[tuple[str, str]]:
    """``--config.<path>=<value>`` (or ``--config.<path> <value>``) pairs from leftover args."""
    overrides, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"{prog}: unknown argument {arg!r} (see `{prog} --help`)")
        key, eq, value = arg[len("--config.") :].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ConfigError(f"{prog}: --config.{key} needs a value: --config.{key}=<value>")
            value, i = rest[i + 1], i + 1
        overrides.append((key, value))
        i += 1
    return overrides


# --------------------------------------------------------------------------------------------------
# Help


def _fmt_value(value: Any) -> str:
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, tuple):
        return "(...)"
    return str(value)


def _field_lines(config: Any, prefixes: tuple[str, ...], top: tuple[str, ...] = ()) -> list[str]:
    rows = [
        (path, _fmt_value(value), doc)
        for path, value, doc in fields.field_docs(config)
        if path in top or any(path.startswith(p + ".") for p in prefixes)
    ]
    width = max((len(p) + len(v) + 1 for p, v, _ in rows), default=0) + 2
    return [f"  {f'{p}={v}':<{width}}{doc}" for p, v, doc in rows]


def main_help() -> str:
    table = commands()
    width = max(map(len, table)) + 2
    lines = [
        "rlhf-jax: the InstructGPT recipe (SFT, K-wise reward model, PPO / PPO-ptx) in JAX, "
        "and DPO and GRPO beside it.",
        "",
        "usage: rlhf-jax <command> [--config=<preset>] [--workdir=<dir>] "
        "[--config.<field>=<value> ...]",
        "",
        "commands:",
        *[f"  {name:<{width}}{c.summary}" for name, c in table.items()],
        "",
        "examples:",
        EXAMPLES,
        "",
        "`rlhf-jax <command> --help` lists its flags and every config field it reads, with the "
        "preset's value.",
    ]
    return "\n".join(lines)


def command_help(command: str, config: Any, preset: str) -> str:
    c = commands()[command]
    flags = ("config", "workdir", "verbose", *c.flags)
    lines = [f"rlhf-jax {command}: {c.summary}.", ""]
    if c.details:
        lines += [c.details, ""]
    lines += ["flags:", *[f"  {FLAG_HELP[f]}" for f in flags], ""]
    lines.append(
        f"config fields it reads (values of the preset {preset!r}; override any with "
        "--config.<field>=<value>):"
    )
    own = tuple(s for s in c.sections if hasattr(config, s))
    if own or c.fields:
        lines += _field_lines(config, own, c.fields) + [""]
        lines.append("shared by every command:")
    shared = tuple(s for s in SHARED_SECTIONS if hasattr(config, s))
    lines += _field_lines(config, shared, SHARED_FIELDS)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Running a command


# Commands whose stdout is their result (JSON lines): progress lines go to stderr instead.
DATA_ON_STDOUT = ("eval", "generate", "plan")


class _Stdout(logging.Handler):
    """The library's progress lines on whatever ``sys.stdout`` (or ``sys.stderr``) is when they
    are written."""

    def __init__(self, to_stderr: bool = False):
        super().__init__()
        self.to_stderr = to_stderr

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr if self.to_stderr else sys.stdout, flush=True)


def setup_logging(to_stderr: bool = False) -> None:
    """The library's progress lines on stdout (``to_stderr``: on stderr), quiet Orbax and tfds:
    what the command shows, for scripts and notebooks that call the library directly."""
    library = logging.getLogger("rlhf_jax")
    handlers = [h for h in library.handlers if isinstance(h, _Stdout)]  # main() may run twice
    if handlers:
        handlers[0].to_stderr = to_stderr
    else:
        library.addHandler(_Stdout(to_stderr))
    library.setLevel(logging.INFO)
    library.propagate = False
    # Orbax and tfds log every file operation at INFO through absl.
    logging.getLogger("absl").setLevel(logging.WARNING)
    import tensorflow_datasets as tfds  # heavy: only when a command runs, not for --help

    tfds.disable_progress_bar()


def parse(argv: list[str]) -> tuple[str, argparse.Namespace, Any] | str:
    """``(command, flags, validated config)``, or the help text to print."""
    if not argv or argv[0] in ("--help", "-h", "help"):
        return main_help()
    command = argv[0]
    if command not in commands():
        raise ConfigError(
            f"unknown command {command!r}; commands: {', '.join(commands())} "
            "(see `rlhf-jax --help`)"
        )
    args, rest = _parser(command).parse_known_args(argv[1:])
    import rlhf_jax.instructlang  # noqa: F401  (registers the built-in world's data source)

    config = load_preset(args.config)
    if args.help:
        return command_help(command, config, args.config)
    overrides = split_overrides(rest, f"rlhf-jax {command}")
    config = fields.apply_overrides(config, overrides)
    from rlhf_jax.stages.lineage import adopt_architecture

    # init_from brings its architecture; a model field set here must agree with it.
    config = adopt_architecture(config, tuple(path for path, _ in overrides))
    return command, args, config.validate()


def start_distributed(args: argparse.Namespace) -> None:
    """Join a multi-process run before JAX starts its backend (``--distributed``)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(x is None for x in explicit):
        return
    import jax

    from rlhf_jax import sharding

    if all(x is None for x in explicit):
        jax.distributed.initialize()  # the platform provides the coordinator (Cloud TPU)
    elif any(x is None for x in explicit):
        raise ConfigError(
            "--distributed: give all of --coordinator=<host:port> --num_processes=<n> "
            "--process_id=<i>, or none of them"
        )
    else:
        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)


def run(command: str, args: argparse.Namespace, config: Any) -> None:
    """Run a parsed command. The library's modules are imported here, not at the top, so that
    ``--help`` and a mistyped flag answer at once, without loading JAX and the models."""
    if command == "plan":
        _plan(config, args)
        return
    if "distributed" in commands()[command].flags:
        start_distributed(args)
    from rlhf_jax.accelerator import enable_compilation_cache

    enable_compilation_cache()  # a rerun starts its first step without compiling
    workdir = Path(args.workdir or Path("runs") / config.name)
    seeds_dir = Path(args.workdir or Path("runs") / f"{config.name}-seeds")
    world = config.data.source == "instructlang"
    if command in stage_table.commands():
        stage_table.for_command(command, config).run(config, workdir)
    elif command == "pipeline" and world:
        from rlhf_jax.instructlang.pipeline import run_pipeline

        run_pipeline(config, workdir)
    elif command == "pipeline":
        from rlhf_jax.pipeline import run_pipeline

        run_pipeline(config, workdir)
    elif command == "seeds":
        from rlhf_jax.instructlang.pipeline import run_seeds

        print(run_seeds(config, seeds_dir, _seeds(args.seeds)))
    elif command == "study":
        from rlhf_jax.instructlang.study import run_study

        print(run_study(config, seeds_dir, _seeds(args.seeds)))
    elif command == "eval":
        from rlhf_jax.evaluator import Evaluator, evaluate_stage
        from rlhf_jax.instructlang.evaluate import GoldEvaluator

        evaluator = GoldEvaluator if world else Evaluator
        print(json.dumps(evaluate_stage(config, workdir, args.stage, evaluator), indent=2))
    elif command == "export":
        from rlhf_jax.export import export_adapters, export_stage

        if not args.out:
            raise ConfigError("rlhf-jax export: give --out=<new directory>")
        (export_adapters if args.adapters else export_stage)(config, workdir, args.stage, args.out)
    else:
        _generate(config, workdir, args)


def _generate(config: Any, workdir: Path, args: argparse.Namespace) -> None:
    import jax

    from rlhf_jax.data import sources
    from rlhf_jax.evaluate import generate_text
    from rlhf_jax.hf import load_tokenizer
    from rlhf_jax.stages.lineage import load_policy, policy_model

    prompts = args.prompt
    if not prompts:
        if config.data.source != "instructlang":
            raise ConfigError("rlhf-jax generate: give at least one --prompt=<text>")
        prompts = ["<bos> REV c3 c9 c1 <sep>"]  # an example in the world's text form
    policies = stage_table.names(exports=stage_table.POLICY)
    if args.stage not in policies:
        raise ConfigError(f"--stage={args.stage}: expected one of {', '.join(policies)}")
    tokenizer = load_tokenizer(sources.tokenizer_dir(config, workdir))
    params = load_policy(config, workdir, args.stage)
    for i, prompt in enumerate(prompts):
        response = generate_text(
            params,
            policy_model(config),
            tokenizer,
            prompt,
            jax.random.fold_in(jax.random.key(config.seed), i),
            max_new_tokens=args.max_new_tokens or config.data.response_len,
            temperature=args.temperature or 1.0,
            greedy=args.temperature == 0,
        )
        print(json.dumps({"prompt": prompt, "response": response}))


def plan_environment(argv: list[str]) -> None:
    """Before JAX starts, for ``rlhf-jax plan``: CPU as the backend (a plan compiles for its
    topology and runs nothing, and libtpu must not claim a TPU it does not have), and
    ``--topology=cpu:N`` devices."""
    if not argv or argv[0] != "plan":
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for arg, after in zip(argv, [*argv[1:], ""]):
        value = arg[len("--topology=") :] if arg.startswith("--topology=") else ""
        value = after if arg == "--topology" else value
        if value.startswith("cpu:") and value[4:].isdigit():
            flag = f"--xla_force_host_platform_device_count={value[4:]}"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def _plan(config: Any, args: argparse.Namespace) -> None:
    from rlhf_jax import plan

    log = logging.getLogger("rlhf_jax")
    t0 = time.perf_counter()

    def progress(row):
        log.info("[plan] %s %s compiled (%.0f s)", row.stage, row.program, time.perf_counter() - t0)

    stages = [s for s in args.stages.split(",") if s]
    result = plan.make_plan(
        config, args.topology, completions=args.completions, stages=stages, on_row=progress
    )
    print(plan.to_json(result) if args.json else plan.table(result))
    lines = plan.advice(result, config)
    for line in lines:
        print(f"rlhf-jax: plan: {line}", file=sys.stderr)
    if lines:
        sys.exit(1)


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds={text}: expected comma-separated integers") from None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or os.environ.get("RLHF_JAX_VERBOSE", "") not in ("", "0")
    plan_environment(argv)
    try:
        parsed = parse(argv)
        if isinstance(parsed, str):
            print(parsed)
            return
        setup_logging(to_stderr=parsed[0] in DATA_ON_STDOUT)
        run(*parsed)
    except UserError as e:
        if verbose:
            raise
        print(f"rlhf-jax: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
