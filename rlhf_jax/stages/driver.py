"""The one loop every stage runs, and what it checks before it writes anything.

Each stage module (``lm``, ``rm``, ``ppo``, ``dpo``, ``grpo``) builds a ``StageRun`` (its state
layout, fresh start, jitted step, data and export) and hands it to ``drive``, which owns the rest:
the checkpointer, resuming, the loop, logging, saving and closing. Where each stage starts from is
``stages.lineage``; the stages themselves are listed in ``rlhf_jax.stage_table``.

``preflight`` runs before a stage writes anything and stops it with one line naming the problem
and the fix: a tokenizer with more tokens than the model's vocabulary, fewer records than one
batch, or a stage whose existing checkpoints were made with other settings or other data (the
fields that differ are named, and its ``config.json`` is left as it was). While it runs, a
non-finite loss stops the stage at the first step it is checked at (every ``log_every`` steps,
and before every save; checking each step would wait for every step to finish), so the last good
checkpoint stays. Checkpoints are saved every ``checkpoint_every`` steps and every
``checkpoint_minutes`` minutes; a resumed stage drops the metric rows logged after its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from rlhf_jax import checkpoint, sharding
from rlhf_jax.config import Config, ModelConfig, OptimizerConfig
from rlhf_jax.data import loaders, sources
from rlhf_jax.errors import ConfigError, StageError
from rlhf_jax.fields import get_value
from rlhf_jax.rundir import RunDir, stage_settings
from rlhf_jax.train_state import (
    TrainState,
    abstract_frozen,
    abstract_state,
    adapt,
    create_train_state,
    key_data,
    make_optimizer,
    train_state_shardings,
)

log = logging.getLogger("rlhf_jax")

# --------------------------------------------------------------------------------------------------
# Before a stage writes anything


def check_settings(config: Config, workdir, stage: str, fingerprints: dict[str, str]) -> None:
    """A stage with checkpoints continues only with the settings and data it was started with."""
    run = RunDir(workdir)
    if not run.committed_steps(stage) or run.saved_config(stage) is None:
        return
    now = {**dataclasses.asdict(config), "data_fingerprints": fingerprints}
    was_, now_ = run.settings(stage), stage_settings(now, stage)
    # A setting added since the checkpoints were made binds them at its default value.
    default = stage_settings(dataclasses.asdict(Config()), stage)
    differ = [
        k for k in sorted(set(was_) | set(now_)) if was_.get(k, default.get(k)) != now_.get(k)
    ]
    if differ:
        shown = ", ".join(
            f"the frozen base of {k[len('data[base:') : -1]} (its source was run again or replaced)"
            if k.startswith("data[base:")
            else f"{k} changed"
            if k.startswith("data[")
            else f"{k}: {was_.get(k)!r} -> {now_.get(k)!r}"
            for k in differ[:6]
        ) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
        state = "finished" if run.finished(stage) else "started"
        raise StageError(
            f"stage '{stage}' in {workdir} has checkpoints made with other settings ({shown}): "
            f"run it with the settings it was {state} with, use another --workdir, or delete "
            f"{run.stage(stage)} to start it again"
        )


def preflight(
    config: Config,
    workdir,
    stage: str,
    batches: dict[str, tuple[int, str]],
    sharded: tuple[tuple[int, str], ...] = (),
    why: dict[str, str] | None = None,
    bases: dict[str, str] | None = None,
) -> dict:
    """Checks before a stage writes anything (see the module docstring); ``batches`` maps each
    data use to ``(global batch size, the config field that sets it)``, ``sharded`` lists the
    batch sizes split over the data-parallel devices, which must divide them, and ``why`` says
    for a use that a setting asks for it (added to a missing-data error). Returns the
    fingerprints of the data the stage reads, which it records."""
    n = sharding.data_parallel_size(config.mesh)
    for size, field in sharded:
        if size % n:
            raise ConfigError(
                f"{field}={size} does not split over the {n} data-parallel devices (mesh.data x "
                f"mesh.fsdp): make it a multiple of {n}"
            )
    tokenizer = sources.load_tokenizer(config, workdir)
    if len(tokenizer) > config.model.vocab_size:
        raise ConfigError(
            f"the tokenizer of {sources.tokenizer_dir(config, workdir)} has {len(tokenizer)} "
            f"tokens, more than model.vocab_size={config.model.vocab_size}: their ids would "
            "index past the embedding; use the model's own tokenizer or a larger vocab_size"
        )
    fingerprints = {}
    for use in batches:
        try:
            fingerprints[use] = sources.fingerprint(config, workdir, use)
        except ConfigError as e:
            raise ConfigError(f"{e}; {why[use]}" if why and use in why else str(e)) from None
    fingerprints.update(bases or {})
    check_settings(config, workdir, stage, fingerprints)
    for use, (batch, field) in batches.items():
        n = sources.expected_size(config, workdir, use)
        if n < batch:
            kind, value = sources.SPLITS[use].kind.value, get_value(config, field)
            raise ConfigError(
                f"stage '{stage}' needs batches of {batch} {kind} ({field}={value}), but the "
                f"data has {n}: add records, or lower {field}"
            )
    return fingerprints


class OneModel(NamedTuple):
    """The state of a stage that trains one model (pretrain, SFT, RM). With LoRA the state holds
    the trainable part only; ``frozen()`` is the base it runs on (loaded once, never saved), and
    ``frozen_target`` its abstract sharded form (None without LoRA, where ``frozen()`` is None)."""

    tx: optax.GradientTransformation
    shardings: TrainState  # of the whole state
    target: TrainState  # abstract, with shardings: what a resume restores into
    start: Callable[[], TrainState]  # the fresh state
    frozen: Callable[[], Any]  # the frozen base (LoRA), or None
    frozen_target: Any


def one_model(
    config: Config,
    model: ModelConfig,
    optimizer: OptimizerConfig,
    total: int,
    mesh,
    init: Callable[[], Any] | None,
) -> OneModel:
    """Optimiser, shardings, restore target and fresh start (``init()`` params in a new
    TrainState with the run's key) of a one-model stage of ``total`` steps. ``init`` is None
    where nothing starts (a plan). With LoRA (``model.adapted``), ``init()`` gives the plain
    base: it is split once into the frozen base and the trainable start (``adapt``)."""
    tx = make_optimizer(optimizer, total)
    shardings = train_state_shardings(model, tx, mesh, config.mesh.rules)
    target = checkpoint.abstract_with_shardings(abstract_state(model, tx), shardings)
    parts: list = []

    def split():
        if not parts:
            parts.append(adapt(init(), model, jax.random.key(config.seed + 5)))
        return parts[0]

    def start() -> TrainState:
        params = split().trainable if model.adapted else init()
        return create_train_state(params, tx, key_data(config.seed), shardings)

    def frozen():
        return split().frozen if model.adapted else None

    frozen_target = abstract_frozen(model, mesh, config.mesh.rules)
    return OneModel(tx, shardings, target, start, frozen, frozen_target)


def jit_step(step, shardings: TrainState, mesh, frozen_target=None):
    """``step(state, frozen, batch) -> (state, metrics)`` jitted with the state's shardings
    (donated), the frozen base's (``frozen_target``'s, None without LoRA) and every batch field
    split over (data, fsdp)."""
    batch_sh = sharding.batch_sharding(mesh, 2)
    frozen_sh = None if frozen_target is None else jax.tree.map(lambda x: x.sharding, frozen_target)
    return jax.jit(
        step,
        in_shardings=(shardings, frozen_sh, batch_sh),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )


# Steps assumed by a plan, which has no data to count them: the learning-rate schedule's length
# changes no shape, only constants of the compiled program.
PLANNED_STEPS = 1000


# --------------------------------------------------------------------------------------------------
# Metrics and the driver


class MetricsLog:
    """``metrics.jsonl`` plus TensorBoard event files under ``<workdir>/<stage>/`` (process 0).

    A stage resumed from step ``resumed_at`` first drops the rows logged after that step (they
    belong to the interrupted run, and the resumed one logs those steps again)."""

    def __init__(self, workdir: str | os.PathLike, stage: str, resumed_at: int = 0):
        self.enabled = jax.process_index() == 0
        run = RunDir(workdir)
        self.dir, self.path = run.stage(stage), run.metrics_file(stage)
        self.history: list[dict] = []
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            rows = run.metrics(stage)
            kept = [r for r in rows if r["step"] <= resumed_at]
            if len(kept) < len(rows):
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                tmp.replace(self.path)
            self.tb = SummaryWriter(str(self.dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        row = {k: float(np.asarray(v)) for k, v in metrics.items()}
        self.history.append({"step": step, **row})
        if self.enabled:
            with open(self.path, "a") as f:
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

    ``model`` is the architecture of what the stage exports (written to ``model.json``);
    ``fingerprints`` those of the data it reads (``preflight``); ``target`` the abstract state
    (leaves with shardings) a resume restores into; ``start()`` the fresh state when there is no
    checkpoint; ``step(state, host_batch)`` one jitted step returning ``(state, metrics)``
    (metrics whose name starts with ``_`` are not logged but go to ``on_log``); ``batches`` yields
    host batches drawn from ``iterators``, whose positions are checkpointed; ``export(state)`` is
    what the next stage loads; ``position(state)`` the state's step counter; ``loss`` the metric
    that must stay finite; ``validate(state)`` held-out metrics, logged every ``validate_every``
    steps and at the end.
    """

    stage: str
    model: ModelConfig
    fingerprints: dict[str, str]
    total: int
    target: Any
    start: Callable[[], Any]
    step: Callable[[Any, dict], tuple[Any, dict]]
    iterators: list
    batches: Iterator[dict]
    export: Callable[[Any], Any]
    position: Callable[[Any], Any]
    key_metric: str = "loss"
    loss: str = "loss"
    validate: Callable[[Any], dict[str, float]] | None = None
    validate_every: int = 0
    # Called at each logging step with (step, policy(state), metrics["_samples"]); returns extra
    # metrics. ``policy(state)``: the current policy's params as a plain model (RL stages).
    on_log: Callable[[int, Any, Any], dict] | None = None
    policy: Callable[[Any], Any] | None = None
    # LoRA: the adapters the export folded in (saved beside it for ``rlhf-jax export
    # --adapters``), the model that holds them, and where its frozen base came from.
    adapters: Callable[[Any], Any] | None = None
    adapted: ModelConfig | None = None
    base: str = ""


def drive(config: Config, workdir, run: StageRun, mesh) -> dict:
    """Resume or start ``run``, step it to ``run.total`` (logging and checkpointing on the way),
    save the final state with its export, and return the stage's metadata. The checkpointer and
    the metrics log are closed whatever happens."""
    if run.total < 1:
        raise ConfigError(f"stage '{run.stage}' has no step to take (total {run.total})")
    record = {**dataclasses.asdict(config), "data_fingerprints": run.fingerprints}
    ckpt = checkpoint.StageCheckpointer(
        workdir, run.stage, keep=config.keep_checkpoints, config=record
    )
    metrics_log = None
    try:
        RunDir(workdir).write_model(run.stage, run.model)
        state, data_state, _ = checkpoint.resume_or_start(ckpt, run.target, start=run.start)
        if data_state:
            for it, s in zip(run.iterators, data_state["iterators"]):
                loaders.set_iterator_state(it, s)
        start = int(jax.device_get(run.position(state)))
        if start >= run.total:  # already finished: a re-run (e.g. of the pipeline) is a no-op
            log.info("[%s] already complete (%d steps) in %s", run.stage, run.total, ckpt.directory)
            return {**ckpt.read_metadata(), "reused": True}
        metrics_log = MetricsLog(workdir, run.stage, resumed_at=start)
        return _loop(config, run, ckpt, metrics_log, state, start, mesh)
    finally:
        if metrics_log is not None:
            metrics_log.close()
        ckpt.close()


def _check_finite(run: StageRun, metrics: dict, done: int, ckpt) -> None:
    value = float(np.asarray(metrics[run.loss]))
    if not math.isfinite(value):
        latest = ckpt.latest_step()
        kept = f"the last good checkpoint, step {latest}, is kept" if latest else "nothing is saved"
        raise StageError(
            f"stage '{run.stage}': {run.loss} = {value} at step {done}; {kept} (the loss is "
            "checked every log_every steps and before each save). Lower the learning rate (or "
            "clip gradients: optimizer.grad_clip) and run it again"
        )


def _loop(config: Config, run: StageRun, ckpt, metrics_log: MetricsLog, state, start, mesh) -> dict:
    data_state = lambda: {"iterators": [loaders.get_iterator_state(it) for it in run.iterators]}  # noqa: E731
    t0 = last_save = time.perf_counter()
    last: dict[str, float] = {}
    bar = tqdm(
        range(start, run.total),
        desc=run.stage,
        initial=start,
        total=run.total,
        disable=jax.process_index() != 0,
    )
    for i in bar:
        batch = sharding.shard_batch(sharding.process_rows(next(run.batches)), mesh)
        state, metrics = run.step(state, batch)
        done = i + 1
        every, minutes = config.checkpoint_every, config.checkpoint_minutes
        save = done < run.total and (
            (every and done % every == 0)
            or (minutes and time.perf_counter() - last_save >= 60 * minutes)
        )
        validate = run.validate and (
            done == run.total or (run.validate_every and done % run.validate_every == 0)
        )
        if done % config.log_every == 0 or done == run.total or save or validate:
            _check_finite(run, metrics, done, ckpt)
        if done % config.log_every == 0 or done == run.total or validate:
            extra = {}
            if run.on_log:
                policy = run.policy(state) if run.policy else state
                extra = run.on_log(done, policy, metrics.get("_samples"))
            if validate:
                extra = {**extra, **run.validate(state)}
            scalars = {k: v for k, v in metrics.items() if not k.startswith("_")}
            last = metrics_log.write(done, {**scalars, **extra})
            bar.set_postfix({run.key_metric: f"{last.get(run.key_metric, 0.0):.4f}"})
        if save:
            ckpt.save(done, state, data_state=data_state())
            last_save = time.perf_counter()
    seconds = time.perf_counter() - t0
    meta = {"seconds": seconds, **{f"final_{k}": v for k, v in last.items()}}
    adapters = None
    if run.adapters is not None and run.adapted is not None and run.adapted.adapted:
        adapters = run.adapters(state)
        meta["lora"] = {**dataclasses.asdict(run.adapted.lora), "base": run.base}
    ckpt.save(
        run.total,
        state,
        data_state=data_state(),
        metadata=meta,
        export_params=run.export(state),
        adapters=adapters,
    )
    log.info(
        "[%s] %d steps in %.1fs; %s",
        run.stage,
        run.total,
        seconds,
        ", ".join(f"{k}={v:.4f}" for k, v in last.items()),
    )
    return meta
