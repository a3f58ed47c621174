"""What every stage shares: where it starts from, its data, its metrics, and the one driver loop.

``LINEAGE`` is the single table of which stage starts from which. A stage with a checkpoint of its
own resumes it (params, optimiser, step, key, data-iterator positions); otherwise each of its
inputs comes from the first available alternative in the table: a previous stage's exported
params in the same work directory, the HF checkpoint ``config.init_from``, or a fresh
initialisation. A required stage that has not run stops with a ``StageError`` naming the command
to run first.

Each stage module (``lm``, ``rm``, ``ppo``) builds a ``StageRun`` (its state layout, fresh start,
jitted step, data and export) and hands it to ``drive``, which owns the rest: the checkpointer,
resuming, the loop, logging, saving and closing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from rlhf_jax import checkpoint, sharding
from rlhf_jax.config import Config, ModelConfig, OptimizerConfig, rm_config
from rlhf_jax.data import loaders, sources
from rlhf_jax.errors import ConfigError, StageError
from rlhf_jax.model import abstract_params
from rlhf_jax.train_state import (
    TrainState,
    abstract_state,
    create_train_state,
    init_model_params,
    key_data,
    make_optimizer,
    params_shardings,
    train_state_shardings,
)

log = logging.getLogger("rlhf_jax")

INIT_FROM, FRESH = "init_from", "fresh"

# Where a stage starts when it has no checkpoint of its own: for each of its inputs, the
# alternatives in order of preference. A stage name is that stage's exported params in the same
# work directory, INIT_FROM the HF checkpoint `config.init_from`, FRESH a random initialisation.
LINEAGE: dict[str, dict[str, tuple[str, ...]]] = {
    "pretrain": {"policy": (INIT_FROM, FRESH)},
    "sft": {"policy": ("pretrain", INIT_FROM, FRESH)},
    "rm": {"policy": ("sft",)},
    "ppo": {"policy": ("sft",), "reward": ("rm",)},
    "ppo_ptx": {"policy": ("sft",), "reward": ("rm",)},
}


def stage_exists(workdir, stage: str) -> bool:
    """Whether ``stage`` has run (or is running) in ``workdir``."""
    return (Path(workdir) / stage).is_dir()


def command_for(stage: str) -> str:
    """The command that runs ``stage``."""
    if stage == "ppo_ptx":
        return "rlhf-jax ppo --config.ppo.ptx_coef=<gamma > 0>"
    return f"rlhf-jax {stage}"


def start_point(config: Config, workdir, stage: str, role: str = "policy") -> str:
    """Where ``stage``'s ``role`` input comes from: a stage name, ``INIT_FROM`` or ``FRESH``."""
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


def stage_params(workdir, stage: str, target: Any) -> Any:
    """The params ``stage`` exported, restored into ``target`` (abstract, with shardings)."""
    try:
        return checkpoint.exported_params(workdir, stage, target)
    except FileNotFoundError as e:
        raise StageError(
            f"stage '{stage}' in {workdir} has not finished ({e}): run `{command_for(stage)}` "
            "with the same --workdir to finish it"
        ) from None


def initial_params(config: Config, workdir, origin: str, model: ModelConfig, mesh):
    """Params for a fresh start from ``origin`` (a stage name, ``INIT_FROM`` or ``FRESH``), in
    their shardings."""
    shardings = params_shardings(model, mesh, config.mesh.rules)
    if origin == FRESH:
        return init_model_params(model, jax.random.key(config.seed), mesh, config.mesh.rules)
    if origin == INIT_FROM:
        from rlhf_jax.hf import load_checkpoint

        hf_model, params = load_checkpoint(config.init_from, dtype=model.dtype)
        # Learned positions (GPT-2) make the context length part of the parameter shapes.
        fields = ARCHITECTURE_FIELDS + (("max_len",) if model.family == "gpt2" else ())
        different = {
            f: (getattr(hf_model, f), getattr(model, f))
            for f in fields
            if getattr(hf_model, f) != getattr(model, f)
        }
        if different:
            raise ConfigError(
                f"init_from={config.init_from}: the checkpoint's architecture differs from "
                "config.model in (checkpoint, config): "
                + ", ".join(f"{f}={a!r} vs {b!r}" for f, (a, b) in different.items())
                + "; set --config.model.<field> to match"
            )
        return jax.device_put(params, shardings)
    abstract = nn.meta.unbox(abstract_params(model))
    return stage_params(workdir, origin, checkpoint.abstract_with_shardings(abstract, shardings))


def load_policy(config: Config, workdir, stage: str, mesh=None):
    """The policy params ``stage`` exported (PPO stages export their EMA weights), sharded."""
    mesh = mesh or sharding.make_mesh(config.mesh)
    return initial_params(config, workdir, stage, policy_model(config), mesh)


def load_reward_model(config: Config, workdir, mesh=None) -> tuple[dict, jax.Array]:
    """The reward model's exported params (sharded) and its bias."""
    mesh = mesh or sharding.make_mesh(config.mesh)
    model = rm_config(config)
    shardings = params_shardings(model, mesh, config.mesh.rules)
    abstract = abstract_state(model, optax.identity()).params
    target = {
        "params": checkpoint.abstract_with_shardings(abstract, shardings),
        "bias": jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh)),
    }
    exported = stage_params(workdir, "rm", target)
    return exported["params"], exported["bias"]


def policy_model(config: Config) -> ModelConfig:
    """The policy's architecture as every RL forward uses it: no dropout."""
    return dataclasses.replace(config.model, dropout=0.0)


# --------------------------------------------------------------------------------------------------
# Data


def loader(config: Config, workdir, use: str, batch_size: int, seed: int, epochs=None, **kw):
    """A grain loader over this process's shard of the dataset for ``use`` (``sources.SPLITS``)."""
    path, split = sources.dataset(config, workdir, use)
    d = config.data
    return loaders.make_loader(
        path,
        split,
        batch_size=batch_size,
        seed=seed,
        prompt_len=d.prompt_len,
        response_len=d.response_len,
        text_len=d.text_len,
        num_epochs=epochs,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        **kw,
    )


def read_all(config: Config, workdir, use: str, key: str) -> np.ndarray:
    """One field of every record of ``use``, in order (evaluation data)."""
    data = loader(config, workdir, use, 256, 0, epochs=1, shuffle=False, drop_remainder=False)
    return np.concatenate([b[key] for b in data])


class OneModel(NamedTuple):
    """The state of a stage that trains one model (pretrain, SFT, RM)."""

    tx: optax.GradientTransformation
    shardings: TrainState  # of the whole state
    target: TrainState  # abstract, with shardings: what a resume restores into
    start: Callable[[], TrainState]  # the fresh state


def one_model(
    config: Config,
    model: ModelConfig,
    optimizer: OptimizerConfig,
    total: int,
    mesh,
    init: Callable[[], Any],
) -> OneModel:
    """Optimiser, shardings, restore target and fresh start (``init()`` params in a new
    TrainState with the run's key) of a one-model stage of ``total`` steps."""
    tx = make_optimizer(optimizer, total)
    shardings = train_state_shardings(model, tx, mesh, config.mesh.rules)
    target = checkpoint.abstract_with_shardings(abstract_state(model, tx), shardings)

    def start() -> TrainState:
        return create_train_state(init(), tx, key_data(config.seed), shardings)

    return OneModel(tx, shardings, target, start)


def jit_step(step, shardings: TrainState, mesh):
    """``step(state, batch) -> (state, metrics)`` jitted with the state's shardings (donated) and
    every batch field split over (data, fsdp)."""
    batch_sh = sharding.batch_sharding(mesh, 2)
    return jax.jit(
        step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0
    )


# --------------------------------------------------------------------------------------------------
# Metrics and the driver


class MetricsLog:
    """``metrics.jsonl`` plus TensorBoard event files under ``<workdir>/<stage>/`` (process 0)."""

    def __init__(self, workdir: str | os.PathLike, stage: str):
        self.enabled = jax.process_index() == 0
        self.dir = Path(workdir) / stage
        self.history: list[dict] = []
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        row = {k: float(np.asarray(v)) for k, v in metrics.items()}
        self.history.append({"step": step, **row})
        if self.enabled:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **row}) + "\n")
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)
        return row

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


@dataclasses.dataclass
class StageRun:
    """One stage, ready for ``drive``.

    ``target`` is the abstract state (leaves with shardings) a resume restores into; ``start()``
    the fresh state when there is no checkpoint; ``step(state, host_batch)`` one jitted step
    returning ``(state, metrics)`` (metrics whose name starts with ``_`` are not logged but go
    to ``on_log``); ``batches`` yields host batches drawn from ``iterators``, whose positions are
    checkpointed; ``export(state)`` is what the next stage loads; ``position(state)`` the state's
    step counter.
    """

    stage: str
    total: int
    target: Any
    start: Callable[[], Any]
    step: Callable[[Any, dict], tuple[Any, dict]]
    iterators: list
    batches: Iterator[dict]
    export: Callable[[Any], Any]
    position: Callable[[Any], Any]
    key_metric: str = "loss"
    # Called at each logging step with (step, state, metrics["_samples"]); returns extra metrics.
    on_log: Callable[[int, Any, Any], dict] | None = None


def drive(config: Config, workdir, run: StageRun, mesh) -> dict:
    """Resume or start ``run``, step it to ``run.total`` (logging and checkpointing on the way),
    save the final state with its export, and return the stage's metadata. The checkpointer and
    the metrics log are closed whatever happens."""
    ckpt = checkpoint.StageCheckpointer(
        workdir, run.stage, keep=config.keep_checkpoints, config=dataclasses.asdict(config)
    )
    metrics_log = MetricsLog(workdir, run.stage)
    try:
        state, data_state, _ = checkpoint.resume_or_start(ckpt, run.target, start=run.start)
        if data_state:
            for it, s in zip(run.iterators, data_state["iterators"]):
                loaders.set_iterator_state(it, s)
        start = int(jax.device_get(run.position(state)))
        if start >= run.total:  # already finished: a re-run (e.g. of the pipeline) is a no-op
            log.info("[%s] already complete (%d steps) in %s", run.stage, run.total, ckpt.directory)
            return ckpt.read_metadata()
        return _loop(config, run, ckpt, metrics_log, state, start, mesh)
    finally:
        metrics_log.close()
        ckpt.close()


def _loop(config: Config, run: StageRun, ckpt, metrics_log: MetricsLog, state, start, mesh) -> dict:
    data_state = lambda: {"iterators": [loaders.get_iterator_state(it) for it in run.iterators]}  # noqa: E731
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    bar = tqdm(
        range(start, run.total),
        desc=run.stage,
        initial=start,
        total=run.total,
        disable=jax.process_index() != 0,
    )
    for i in bar:
        batch = sharding.shard_batch(next(run.batches), mesh)
        state, metrics = run.step(state, batch)
        done = i + 1
        if done % config.log_every == 0 or done == run.total:
            extra = run.on_log(done, state, metrics.get("_samples")) if run.on_log else {}
            scalars = {k: v for k, v in metrics.items() if not k.startswith("_")}
            last = metrics_log.write(done, {**scalars, **extra})
            bar.set_postfix({run.key_metric: f"{last.get(run.key_metric, 0.0):.4f}"})
        every = config.checkpoint_every
        if every and done % every == 0 and done < run.total:
            ckpt.save(done, state, data_state=data_state())
    seconds = time.perf_counter() - t0
    meta = {"seconds": seconds, **{f"final_{k}": v for k, v in last.items()}}
    ckpt.save(
        run.total, state, data_state=data_state(), metadata=meta, export_params=run.export(state)
    )
    log.info(
        "[%s] %d steps in %.1fs; %s",
        run.stage,
        run.total,
        seconds,
        ", ".join(f"{k}={v:.4f}" for k, v in last.items()),
    )
    return meta
