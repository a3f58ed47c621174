"""What every stage shares: the language-model step, metric logging, and the thin training loop."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from rlhf_jax import checkpoint, losses, sharding
from rlhf_jax.checkpoint import StageCheckpointer
from rlhf_jax.config import Config, ModelConfig
from rlhf_jax.data import builders, loaders, prepare
from rlhf_jax.model import Transformer, abstract_params
from rlhf_jax.train_state import (
    TrainState,
    apply_gradients,
    init_model_params,
    params_shardings,
    state_key,
)


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


def make_lm_step(
    model: ModelConfig, tx: optax.GradientTransformation, shardings: TrainState, mesh
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """One optimiser step on ``sft_loss`` (pretraining and SFT).

    batch: ``tokens``, ``attention_mask``, ``loss_mask`` [B T] (loss_mask weights the tokens that
    are predicted: response tokens, prompt tokens times ``prompt_loss_weight``, pretraining text).
    Dropout is on when ``model.dropout > 0``, with the key ``fold_in(state.rng, step)``.
    """

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = state_key(state.rng, state.step)

        def loss_fn(params):
            logits = Transformer(model).apply(
                {"params": params},
                batch["tokens"],
                batch["attention_mask"],
                deterministic=model.dropout == 0.0,
                rngs={"dropout": rng},
            )
            return losses.sft_loss(logits, batch["tokens"], batch["loss_mask"])

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        new = apply_gradients(tx, state, grads)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jit_step(step, shardings, mesh)


def jit_step(step, shardings: TrainState, mesh):
    """``step(state, batch) -> (state, metrics)`` jitted with the state's shardings (donated) and
    every batch field split over (data, fsdp)."""
    batch_sh = sharding.batch_sharding(mesh, 2)
    return jax.jit(
        step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0
    )


@dataclasses.dataclass
class Loop:
    """The thin Python loop of a stage: feed batches, log, checkpoint, report."""

    name: str
    config: Config
    ckpt: StageCheckpointer
    log: MetricsLog
    mesh: Any
    key_metric: str = "loss"
    # Called at each logging step with (step, state, metrics["_samples"]); returns extra metrics.
    on_log: Callable[[int, Any, Any], dict] | None = None

    def run(
        self,
        state,
        step_fn,
        batches: Iterator[dict],
        *,
        start: int,
        total: int,
        data_state: Callable[[], dict | None],
        export: Callable[[Any], Any],
    ) -> tuple[Any, dict]:
        if start >= total:  # already finished: a re-run (e.g. of the pipeline) is a no-op
            print(f"[{self.name}] already complete ({total} steps) in {self.ckpt.directory}")
            return state, self.ckpt.read_metadata()
        t0 = time.perf_counter()
        last: dict[str, float] = {}
        bar = tqdm(
            range(start, total),
            desc=self.name,
            initial=start,
            total=total,
            disable=jax.process_index() != 0,
        )
        for i in bar:
            batch = sharding.shard_batch(next(batches), self.mesh)
            state, metrics = step_fn(state, batch)
            done = i + 1
            if done % self.config.log_every == 0 or done == total:
                extra = self.on_log(done, state, metrics.get("_samples")) if self.on_log else {}
                scalars = {k: v for k, v in metrics.items() if not k.startswith("_")}
                last = self.log.write(done, {**scalars, **extra})
                bar.set_postfix({self.key_metric: f"{last.get(self.key_metric, 0.0):.4f}"})
            every = self.config.checkpoint_every
            if every and done % every == 0 and done < total:
                self.ckpt.save(done, state, data_state=data_state())
        seconds = time.perf_counter() - t0
        meta = {"seconds": seconds, **{f"final_{k}": v for k, v in last.items()}}
        self.ckpt.save(
            total, state, data_state=data_state(), metadata=meta, export_params=export(state)
        )
        self.log.close()
        print(
            f"[{self.name}] {total} steps in {seconds:.1f}s; "
            + ", ".join(f"{k}={v:.4f}" for k, v in last.items())
        )
        return state, meta


def pad_to(x: np.ndarray, length: int, pad: int = 0) -> np.ndarray:
    """Right-pad the last axis of ``x`` to ``length``."""
    extra = length - x.shape[-1]
    if extra < 0:
        raise ValueError(f"sequence length {x.shape[-1]} exceeds {length}")
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)], constant_values=pad)


# The ModelConfig fields that fix the parameter shapes and the forward pass of a checkpoint.
ARCHITECTURE_FIELDS = (
    "family",
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "dim_head",
    "mlp_dim",
    "tie_embeddings",
    "use_bias",
    "qkv_bias",
    "norm_eps",
    "rope_theta",
)


def initial_params(config: Config, workdir, previous: str | None, model: ModelConfig, mesh):
    """Where a stage's params come from when it has no checkpoint of its own (DESIGN.md load
    order): the previous stage's exported params, else an HF import (``init_from``), else a fresh
    initialisation. All land directly in their shardings."""
    shardings = params_shardings(model, mesh, config.mesh.rules)
    if previous is not None:
        abstract = nn.meta.unbox(abstract_params(model))
        target = checkpoint.abstract_with_shardings(abstract, shardings)
        return checkpoint.exported_params(workdir, previous, target)
    if config.init_from:
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
            raise ValueError(
                f"init_from={config.init_from}: the checkpoint's architecture differs from "
                "config.model in (checkpoint, config): "
                + ", ".join(f"{f}={a!r} vs {b!r}" for f, (a, b) in different.items())
                + "; set --config.model.<field> to match"
            )
        return jax.device_put(params, shardings)
    return init_model_params(model, jax.random.key(config.seed), mesh, config.mesh.rules)


def loader(config: Config, workdir, use: str, batch_size: int, seed: int, epochs=None, **kw):
    """A grain loader over this process's shard of the dataset for ``use`` (``prepare.SPLITS``)."""
    path, split = prepare.source(config, workdir, use)
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


def split_size(config: Config, workdir, use: str) -> int:
    path, split = prepare.source(config, workdir, use)
    return int(builders.read_metadata(path)["splits"][split])


def stage_exists(workdir, stage: str) -> bool:
    """Whether ``stage`` has run (or is running) in ``workdir``."""
    return (Path(workdir) / stage).is_dir()


def config_json(config: Config) -> dict:
    return dataclasses.asdict(config)
