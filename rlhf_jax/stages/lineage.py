"""Which stage starts from which, and loading what a finished stage handed on.

``LINEAGE`` is the single table of where each stage starts when it has no checkpoint of its own:
for each of its inputs, the alternatives in order of preference. A required stage that has not run
stops with a ``StageError`` naming the command to run first.

Every stage writes ``<workdir>/<stage>/model.json``, the architecture of what it exports, so that
its params can be loaded without the config that made them: the reward model of another run (an
RM larger than the policy, as InstructGPT used one 6B RM for every policy size) loads the same way
as this run's. A reward model can also come from an HF ``...ForSequenceClassification``
directory (``rlhf-jax export`` writes one).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import checkpoint, sharding
from rlhf_jax.config import MODEL_SIZES, Config, ModelConfig, methods, rm_config
from rlhf_jax.errors import ConfigError, StageError
from rlhf_jax.model import abstract_params
from rlhf_jax.train_state import (
    abstract_state,
    init_model_params,
    params_shardings,
    scalar_head_params,
)

INIT_FROM, FRESH = "init_from", "fresh"

# Where a stage starts when it has no checkpoint of its own: for each of its inputs, the
# alternatives in order of preference. A stage name is that stage's exported params in the same
# work directory, INIT_FROM the HF checkpoint `config.init_from`, FRESH a random initialisation.
# The reward model can instead start from `rm.init_from`, and PPO's reward come from
# `ppo.reward_from` (see `reward_source`).
LINEAGE: dict[str, dict[str, tuple[str, ...]]] = {
    "pretrain": {"policy": (INIT_FROM, FRESH)},
    "sft": {"policy": ("pretrain", INIT_FROM, FRESH)},
    "rm": {"policy": ("sft",)},
    "ppo": {"policy": ("sft",), "reward": ("rm",)},
    "ppo_ptx": {"policy": ("sft",), "reward": ("rm",)},
    "dpo": {"policy": ("sft",)},
    "grpo": {"policy": ("sft",), "reward": ("rm",)},
    "rloo": {"policy": ("sft",), "reward": ("rm",)},
}
MODEL_FILE = "model.json"


def stage_exists(workdir, stage: str) -> bool:
    """Whether ``stage`` has run (or is running) in ``workdir``."""
    return (Path(workdir) / stage).is_dir()


# The policies a run's evaluation compares, as report row: stage. best-of-n has no stage: it is
# the SFT model's best of eval.best_of_n by the RM, evaluated when `methods` names it.
EVALUATED = {"base": "pretrain", "sft": "sft", "ppo": "ppo", "ppo_ptx": "ppo_ptx", "dpo": "dpo",
             "grpo": "grpo", "rloo": "rloo"}  # fmt: skip
BEST_OF_N = "best_of_n"


def evaluated_models(config: Config, workdir) -> dict[str, str]:
    """{report row: stage} of every policy this run has, plus ``best_of_n`` when asked for."""
    out = {name: s for name, s in EVALUATED.items() if stage_exists(workdir, s)}
    if BEST_OF_N in methods(config):
        out[BEST_OF_N] = BEST_OF_N
    return out


def command_for(stage: str) -> str:
    """The command that runs ``stage``."""
    if stage == "ppo_ptx":
        return "rlhf-jax ppo --config.ppo.ptx_coef=<gamma > 0>"
    if stage == "rloo":
        return "rlhf-jax grpo --config.grpo.baseline=rloo"
    return f"rlhf-jax {stage}"


def start_point(config: Config, workdir, stage: str, role: str = "policy") -> str:
    """Where ``stage``'s ``role`` input comes from: a stage name, ``INIT_FROM`` or ``FRESH``."""
    if stage == "rm" and config.rm.init_from:
        return INIT_FROM
    if role == "reward" and config.ppo.reward_from:
        return INIT_FROM
    options = LINEAGE[stage][role]
    for option in options:
        if option == FRESH or (option == INIT_FROM and config.init_from):
            return option
        if option not in (FRESH, INIT_FROM) and stage_exists(workdir, option):
            return option
    wanted = " or ".join(f"'{o}'" for o in options)
    raise StageError(
        f"stage '{stage}' starts from {wanted}, which has not run in {workdir}: "
        f"run `{command_for(options[0])}` with the same --workdir first"
    )


def policy_model(config: Config) -> ModelConfig:
    """The policy's architecture as every RL forward uses it: no dropout."""
    return dataclasses.replace(config.model, dropout=0.0)


# --------------------------------------------------------------------------------------------------
# Architectures


def write_model(stage_dir: Path, model: ModelConfig) -> None:
    """Record the architecture a stage exports (process 0)."""
    if jax.process_index() == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / (MODEL_FILE + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(model), indent=2, sort_keys=True))
        tmp.replace(stage_dir / MODEL_FILE)


def stage_model(stage_dir: Path) -> ModelConfig | None:
    """The architecture a stage directory recorded (None for runs older than model.json)."""
    path = Path(stage_dir) / MODEL_FILE
    if not path.is_file():
        return None
    fields = json.loads(path.read_text())
    return ModelConfig(**{k: v for k, v in fields.items() if k in ModelConfig.__dataclass_fields__})


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / MODEL_FILE).is_file()


def rm_architecture(config: Config) -> ModelConfig:
    """The reward model's architecture: that of ``rm.init_from`` when it is an HF checkpoint or a
    stage directory of another run (with a scalar head), else ``config.rm_config``."""
    source = config.rm.init_from
    scalar = dict(head="scalar", dropout=0.0)
    if not source or source in MODEL_SIZES:
        return rm_config(config)
    path = Path(source)
    if _is_hf_dir(path):
        from rlhf_jax.hf import load_config

        return load_config(path, dtype=config.model.dtype, **scalar)
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
    return Path(config.ppo.reward_from) if config.ppo.reward_from else Path(workdir) / "rm"


def reward_model_config(config: Config, workdir) -> ModelConfig:
    """The architecture of PPO's reward model (and so of its value network)."""
    source = reward_source(config, workdir)
    if _is_hf_dir(source):
        from rlhf_jax.hf import load_config

        model = load_config(source, dtype=config.model.dtype)
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
    from rlhf_jax.hf import load_config

    ckpt = load_config(config.init_from)
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    keep = ("dtype", "param_dtype", "dropout", "head", "remat")
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
        raise StageError(
            f"stage '{stage_dir.name}' in {stage_dir.parent} has not finished ({e}): run "
            f"`{command_for(stage_dir.name)}` with that --workdir to finish it"
        ) from None


def _target(model: ModelConfig, mesh, rules):
    shardings = params_shardings(model, mesh, rules)
    abstract = nn.meta.unbox(abstract_params(model))
    return checkpoint.abstract_with_shardings(abstract, shardings), shardings


def _hf_params(path: str | os.PathLike, model: ModelConfig, shardings):
    from rlhf_jax.hf import load_checkpoint

    hf_model, params = load_checkpoint(path, dtype=model.dtype)
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
    return stage_params(Path(workdir) / origin, target)


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
        from rlhf_jax.hf import load_checkpoint

        loaded_model, params = load_checkpoint(path, dtype=model.dtype)
        return params if loaded_model.head == "scalar" else scalar_head_params(params, model, rng)
    target, _ = _target(stage_model(path), mesh, config.mesh.rules)
    exported = stage_params(path, target)
    params = exported["params"] if isinstance(exported, dict) and "bias" in exported else exported
    if "score_head" in params:
        return params
    return scalar_head_params(params, dataclasses.replace(lm, head="scalar"), rng)


def load_reward_model(
    config: Config, workdir, mesh=None, source: Path | None = None
) -> tuple[dict, jax.Array, ModelConfig]:
    """A reward model (default: PPO's, ``reward_source``; else a stage or exported directory):
    its params (sharded), its bias (subtracted from every score so the demonstrations score 0)
    and its architecture."""
    mesh = mesh or sharding.make_mesh(config.mesh)
    source = Path(source) if source is not None else reward_source(config, workdir)
    if _is_hf_dir(source):
        from rlhf_jax.hf import load_config

        model = dataclasses.replace(load_config(source, dtype=config.model.dtype), dropout=0.0)
    else:
        model = stage_model(source) or rm_architecture(config)
    check_same_vocabulary(config, model, f"the reward model of {source}")
    shardings = params_shardings(model, mesh, config.mesh.rules)
    if _is_hf_dir(source):  # an exported RM: its bias is folded into the weights
        return _hf_params(source, model, shardings), jnp.zeros((), jnp.float32), model
    abstract = abstract_state(model, optax.identity()).params
    target = {
        "params": checkpoint.abstract_with_shardings(abstract, shardings),
        "bias": jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh)),
    }
    exported = stage_params(source, target)
    return exported["params"], exported["bias"], model
