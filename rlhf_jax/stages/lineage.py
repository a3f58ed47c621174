"""Where each stage starts, and loading what a finished stage handed on.

Where a stage starts when it has no checkpoint of its own is its ``starts_from`` in
``rlhf_jax.stage_table``: for each of its inputs, the alternatives in order of preference.
``start_point`` picks the first available one; a required stage that has not run stops with a
``StageError`` naming the command to run first.

Every stage writes ``<workdir>/<stage>/model.json``, the architecture of what it exports, so that
its params can be loaded without the config that made them: the reward model of another run (an
RM larger than the policy, as InstructGPT used one 6B RM for every policy size) loads the same way
as this run's. A reward model can also come from an HF ``...ForSequenceClassification``
directory (``rlhf-jax export`` writes one).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import checkpoint, hf, lora, sharding, stage_table
from rlhf_jax.config import MODEL_SIZES, Config, ModelConfig, rm_config
from rlhf_jax.errors import ConfigError, StageError
from rlhf_jax.model import abstract_params
from rlhf_jax.rollout import RewardModel
from rlhf_jax.rundir import RunDir, is_stage_dir, stage_model
from rlhf_jax.stage_table import FRESH, INIT_FROM
from rlhf_jax.train_state import (
    abstract_state,
    init_model_params,
    params_shardings,
    scalar_head_params,
)


def start_point(config: Config, workdir, stage: str, role: str = "policy") -> str:
    """Where ``stage``'s ``role`` input comes from: a stage name, ``INIT_FROM`` or ``FRESH``."""
    if stage == "rm" and config.rm.init_from:
        return INIT_FROM
    if role == "reward" and config.ppo.reward_from:
        return INIT_FROM
    options = stage_table.get(stage).starts_from[role]
    run = RunDir(workdir)
    for option in options:
        if option == FRESH or (option == INIT_FROM and config.init_from):
            return option
        if option not in (FRESH, INIT_FROM) and run.has(option):
            return option
    wanted = " or ".join(f"'{o}'" for o in options)
    raise StageError(
        f"stage '{stage}' starts from {wanted}, which has not run in {workdir}: "
        f"run `{stage_table.get(options[0]).command_line}` with the same --workdir first"
    )


def base_fingerprints(config: Config, workdir, model: ModelConfig, **origins) -> dict[str, str]:
    """``{"base:<role>": fingerprint}`` of each frozen base a LoRA stage's adapters sit on
    (``lora.base_fingerprint``); ``origins`` maps a role to a stage name, ``INIT_FROM``, ``FRESH``
    or a directory. Empty without LoRA, where checkpoints hold every weight."""
    if not model.adapted:
        return {}
    out = {}
    for role, origin in origins.items():
        if origin == FRESH:
            out[f"base:{role}"] = f"fresh(seed={config.seed})"
            continue
        if origin == INIT_FROM:
            path = Path(config.init_from)
        elif isinstance(origin, Path):
            path = origin
        else:
            path = RunDir(workdir).stage(origin)
        out[f"base:{role}"] = lora.base_fingerprint(path)
    return out


def base_name(config: Config, origin) -> str:
    """Where a LoRA stage's frozen base came from, as its metadata records it: ``stage:<name>``,
    an absolute checkpoint directory (``init_from``, or one given as a path), or ``fresh``."""
    if origin == FRESH:
        return "fresh"
    if origin == INIT_FROM:
        return os.path.abspath(config.init_from)
    if isinstance(origin, Path):
        return os.path.abspath(origin)
    return f"stage:{origin}"


def trained_model(config: Config, architecture: ModelConfig, stage: str) -> ModelConfig:
    """``architecture`` (of a checkpoint, a stage directory or a named size) as ``stage`` trains
    it: with the run's adapters (``model.lora``) when the stage is one of ``lora.stages``."""
    training = dict(lora=config.model.lora, frozen_dtype=config.model.frozen_dtype)
    return dataclasses.replace(architecture, **training).for_stage(stage)


def policy_model(config: Config) -> ModelConfig:
    """The policy's architecture as every RL forward and every reader of a stage's params uses
    it: no dropout, no adapters (a stage trains them with ``trained_model``)."""
    return dataclasses.replace(config.model.plain(), dropout=0.0)


# --------------------------------------------------------------------------------------------------
# Architectures


def _is_hf_dir(path: Path) -> bool:
    """An HF checkpoint directory (``config.json``), not a stage directory (which has one too)."""
    return (path / "config.json").is_file() and not is_stage_dir(path)


def rm_architecture(config: Config) -> ModelConfig:
    """The reward model's architecture: that of ``rm.init_from`` when it is an HF checkpoint or a
    stage directory of another run (with a scalar head), else ``config.rm_config``."""
    source = config.rm.init_from
    scalar = dict(head="scalar", dropout=0.0)
    if not source or source in MODEL_SIZES:
        return rm_config(config)
    path = Path(source)
    if _is_hf_dir(path):
        return hf.load_config(path, dtype=config.model.dtype, **scalar)
    model = stage_model(path)
    if model is None:
        raise ConfigError(
            f"rm.init_from={source}: expected a model size ({', '.join(MODEL_SIZES)}), an HF "
            "checkpoint directory, or a stage directory of another run (runs/<name>/<stage>)"
        )
    return dataclasses.replace(model, **scalar)


def reward_source(config: Config, workdir) -> Path:
    """Where PPO's reward model comes from: ``ppo.reward_from`` (another run's rm stage, or an
    exported RM directory), else this run's ``rm`` stage."""
    return Path(config.ppo.reward_from) if config.ppo.reward_from else RunDir(workdir).stage("rm")


def reward_model_config(config: Config, workdir) -> ModelConfig:
    """The architecture of PPO's reward model (and so of its value network)."""
    source = reward_source(config, workdir)
    if _is_hf_dir(source):
        model = hf.load_config(source, dtype=config.model.dtype)
        if model.head != "scalar":
            raise ConfigError(f"ppo.reward_from={source}: not a reward model (no scalar head)")
        return dataclasses.replace(model, dropout=0.0)
    return stage_model(source) or rm_architecture(config)


def check_same_vocabulary(config: Config, other: ModelConfig, what: str) -> None:
    """A reward model reads the policy's tokens: its vocabulary must be the policy's (an exported
    RM may have one more, its own pad token: ``export.distinct_pad_token``)."""
    if other.vocab_size not in (config.model.vocab_size, config.model.vocab_size + 1):
        raise ConfigError(
            f"{what} has vocab_size={other.vocab_size}, the policy {config.model.vocab_size}: "
            "the reward model must use the policy's tokenizer"
        )


# --------------------------------------------------------------------------------------------------
# Params: what stages hand on

# The ModelConfig fields that fix the parameter shapes and the forward pass of a checkpoint.
ARCHITECTURE_FIELDS = (
    "family",
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "resolved_head_dim",
    "mlp_dim",
    "tie_embeddings",
    "use_bias",
    "qkv_bias",
    "norm_eps",
    "rope_theta",
)


def adopt_architecture(config: Config, explicit: tuple[str, ...] = ()) -> Config:
    """``config`` with ``model.*`` taken from the ``init_from`` checkpoint's own config (its
    architecture fields; dtypes, dropout, head and remat stay the config's). A field in
    ``explicit`` (set on the command line, e.g. ``"model.d_model"``) that disagrees with the
    checkpoint is a ``ConfigError`` naming both values."""
    if not config.init_from:
        return config
    ckpt = hf.load_config(config.init_from)
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    keep = ("dtype", "param_dtype", "dropout", "head", "remat", "lora", "frozen_dtype")
    taken = {f: getattr(ckpt, f) for f in fields if f not in keep}
    for f, value in taken.items():
        if f"model.{f}" in explicit and getattr(config.model, f) != value:
            raise ConfigError(
                f"--config.model.{f}={getattr(config.model, f)!r} disagrees with the init_from "
                f"checkpoint's {f}={value!r} ({config.init_from}): drop the override, or start "
                "from another checkpoint"
            )
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **taken))


def stage_params(stage_dir: Path, target) -> object:
    """The params a stage directory exported, restored into ``target`` (abstract, sharded)."""
    stage_dir = Path(stage_dir)
    try:
        return checkpoint.exported_params(stage_dir.parent, stage_dir.name, target)
    except FileNotFoundError as e:
        try:
            command = stage_table.get(stage_dir.name).command_line
        except KeyError:  # a directory of another layout (``rm.init_from=<dir>``)
            command = "the stage's command"
        raise StageError(
            f"stage '{stage_dir.name}' in {stage_dir.parent} has not finished ({e}): run "
            f"`{command}` with that --workdir to finish it"
        ) from None


def _target(model: ModelConfig, mesh, rules):
    shardings = params_shardings(model, mesh, rules)
    abstract = nn.meta.unbox(abstract_params(model))
    return checkpoint.abstract_with_shardings(abstract, shardings), shardings


def _hf_params(path: str | os.PathLike, model: ModelConfig, shardings):
    hf_model, params = hf.load_checkpoint(path, dtype=model.dtype)
    # Learned positions (GPT-2) make the context length part of the parameter shapes.
    fields = ARCHITECTURE_FIELDS + (("max_len",) if model.family == "gpt2" else ())
    different = {
        f: (getattr(hf_model, f), getattr(model, f))
        for f in fields
        if getattr(hf_model, f) != getattr(model, f)
    }
    if different:
        raise ConfigError(
            f"{path}: the checkpoint's architecture differs from the config in (checkpoint, "
            "config): "
            + ", ".join(f"{f}={a!r} vs {b!r}" for f, (a, b) in different.items())
            + "; set --config.model.<field> to match"
        )
    return jax.device_put(params, shardings)


def initial_params(config: Config, workdir, origin: str, model: ModelConfig, mesh):
    """Params for a fresh start from ``origin`` (a stage name, ``INIT_FROM`` or ``FRESH``), in
    their shardings."""
    target, shardings = _target(model, mesh, config.mesh.rules)
    if origin == FRESH:
        return init_model_params(model, jax.random.key(config.seed), mesh, config.mesh.rules)
    if origin == INIT_FROM:
        return _hf_params(config.init_from, model, shardings)
    return stage_params(RunDir(workdir).stage(origin), target)


def load_policy(config: Config, workdir, stage: str, mesh=None):
    """The policy params ``stage`` exported (PPO stages export their EMA weights), sharded."""
    mesh = mesh or sharding.make_mesh(config.mesh)
    return initial_params(config, workdir, stage, policy_model(config), mesh)


def initial_reward_params(config: Config, workdir, model: ModelConfig, mesh):
    """The RM stage's starting params: its LM (this run's SFT, ``rm.init_from``'s checkpoint or
    stage, or a fresh model of a named size) with a fresh scalar head (InstructGPT section 3.5)."""
    rng = jax.random.key(config.seed + 2)
    source = config.rm.init_from
    lm = dataclasses.replace(model, head="lm")
    if not source:
        sft = initial_params(config, workdir, "sft", policy_model(config), mesh)
        return scalar_head_params(sft, model, rng)
    check_same_vocabulary(config, model, f"rm.init_from={source}")
    if source in MODEL_SIZES:
        return init_model_params(model, rng, mesh, config.mesh.rules)
    path = Path(source)
    if _is_hf_dir(path):
        loaded_model, params = hf.load_checkpoint(path, dtype=model.dtype)
        return params if loaded_model.head == "scalar" else scalar_head_params(params, model, rng)
    target, _ = _target(stage_model(path), mesh, config.mesh.rules)
    exported = stage_params(path, target)
    params = exported["params"] if isinstance(exported, dict) and "bias" in exported else exported
    if "score_head" in params:
        return params
    return scalar_head_params(params, dataclasses.replace(lm, head="scalar"), rng)


def load_reward_model(
    config: Config, workdir, mesh=None, source: str | os.PathLike | None = None
) -> RewardModel:
    """A reward model (default: PPO's, ``reward_source``; else a stage or exported directory):
    its params (sharded), its architecture and its bias (subtracted from every score so the
    demonstrations score 0)."""
    mesh = mesh or sharding.make_mesh(config.mesh)
    source = Path(source) if source is not None else reward_source(config, workdir)
    if _is_hf_dir(source):
        model = dataclasses.replace(hf.load_config(source, dtype=config.model.dtype), dropout=0.0)
    else:
        model = stage_model(source) or rm_architecture(config)
    check_same_vocabulary(config, model, f"the reward model of {source}")
    shardings = params_shardings(model, mesh, config.mesh.rules)
    if _is_hf_dir(source):  # an exported RM: its bias is folded into the weights
        return RewardModel(_hf_params(source, model, shardings), model, jnp.zeros((), jnp.float32))
    abstract = abstract_state(model, optax.identity()).params
    target = {
        "params": checkpoint.abstract_with_shardings(abstract, shardings),
        "bias": jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh)),
    }
    exported = stage_params(source, target)
    return RewardModel(exported["params"], model, exported["bias"])
