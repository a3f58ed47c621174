"""Pretraining and SFT: next-token training of the policy, with SFT's pretraining mix.

Both stages run ``make_lm_step``. Pretraining predicts every text token. SFT predicts the response
tokens (EOS included) plus the prompt tokens at ``prompt_loss_weight`` (docs/method.md section
1.1), and mixes ``ptx_fraction`` of each batch from the pretraining corpus (InstructGPT appendix
C.3: the PPO init saw 10% pretraining data): demonstrations and text are concatenated into one
batch whose token-mean loss covers both.

SFT here trains the PPO init ``pi_init`` (2 epochs by default), which is also the KL reference and
the baseline the evaluation compares against. ``sft.epochs=16`` trains the paper's 16-epoch
``pi_sft16`` baseline, but exports its last epoch: choosing the epoch by RM score, as the paper
did, is not implemented (docs/method.md section 1.3).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import lora, losses, sharding
from rlhf_jax.config import Config, ModelConfig
from rlhf_jax.data import sources
from rlhf_jax.data.loaders import placeholder_batch
from rlhf_jax.data.records import Kind
from rlhf_jax.data.sources import loader
from rlhf_jax.model import predicted_logprobs
from rlhf_jax.sharding import abstract_batch
from rlhf_jax.stage_table import Pass, PlanInputs, Program
from rlhf_jax.stages.driver import (
    PLANNED_STEPS,
    OneModel,
    StageRun,
    drive,
    jit_step,
    one_model,
    preflight,
)
from rlhf_jax.stages.lineage import (
    base_fingerprints,
    base_name,
    initial_params,
    start_point,
)
from rlhf_jax.train_state import TrainState, accumulate, apply_gradients, state_key


def make_lm_step(
    model: ModelConfig,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    mesh,
    *,
    micro: int = 1,
    frozen_target=None,
) -> Callable[[TrainState, Any, dict], tuple[TrainState, dict]]:
    """One optimiser step on ``sft_loss`` (pretraining and SFT): ``step(state, frozen, batch)``,
    ``frozen`` the LoRA base (None without LoRA).

    batch: ``tokens``, ``attention_mask``, ``loss_mask`` [B T] (loss_mask weights the tokens that
    are predicted: response tokens, prompt tokens times ``prompt_loss_weight``, pretraining text).
    Dropout is on when ``model.dropout > 0``, with the key ``fold_in(state.rng, step)`` (and
    ``fold_in`` of that by the micro-batch with gradient accumulation, ``micro > 1``). The loss is
    the token mean over the batch, its gradient accumulated over ``micro`` micro-batches.
    """

    def step(state: TrainState, frozen, batch: dict) -> tuple[TrainState, dict]:
        rng = state_key(state.rng, state.step)
        rows = jnp.arange(batch["tokens"].shape[0])

        def loss_fn(params, b):
            key = rng if micro == 1 else jax.random.fold_in(rng, b["row"][0])
            logp = predicted_logprobs(
                lora.merge(frozen, params),
                model,
                b["tokens"],
                b["attention_mask"],
                1,
                deterministic=model.dropout == 0.0 and model.lora.dropout == 0.0,
                rngs={"dropout": key},
            ).logprobs
            return -losses.masked_mean(logp, b["loss_mask"][:, 1:]), {}

        weight = lambda b: jnp.sum(b["loss_mask"][:, 1:])  # noqa: E731  (the mean's tokens)
        out = accumulate(loss_fn, state.params, {**batch, "row": rows}, micro, weight)
        new = apply_gradients(tx, state, out.grads)
        return new, {"loss": out.loss, "grad_norm": optax.tree.norm(out.grads)}

    return jit_step(step, shardings, mesh, frozen_target)


def text_batch(b: dict) -> dict:
    return {"tokens": b["tokens"], "attention_mask": b["mask"], "loss_mask": b["mask"]}


def demo_batch(b: dict, prompt_loss_weight: float) -> dict:
    loss_mask = b["response_mask"] + prompt_loss_weight * b["prompt_mask"]
    return {"tokens": b["tokens"], "attention_mask": b["attention_mask"], "loss_mask": loss_mask}


def pad_to(x: np.ndarray, length: int, pad: int = 0) -> np.ndarray:
    """Right-pad the last axis of ``x`` to ``length``."""
    extra = length - x.shape[-1]
    if extra < 0:
        raise ValueError(f"sequence length {x.shape[-1]} exceeds {length}")
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)], constant_values=pad)


def concat_batches(a: dict, b: dict) -> dict:
    """Stack two LM batches along the batch axis, right-padding the shorter sequences."""
    length = max(a["tokens"].shape[1], b["tokens"].shape[1])
    out = {k: np.concatenate([pad_to(a[k], length), pad_to(b[k], length)]) for k in a}
    out["loss_mask"] = out["loss_mask"].astype(np.float32)
    return out


def validation_loss(params, model: ModelConfig, config: Config, workdir) -> float:
    """SFT's loss on the held-out demonstrations (``sft_val``): the response-token NLL pooled over
    every held-out token (``prompt_loss_weight`` as in training)."""
    weight = config.sft.prompt_loss_weight

    @jax.jit
    def sums(p, b):
        logp = predicted_logprobs(p, model, b["tokens"], b["attention_mask"], 1).logprobs
        w = (b["response_mask"] + weight * b["prompt_mask"])[:, 1:]
        return -(logp * w).sum(), w.sum()

    data = loader(config, workdir, "sft_val", 256, 0, epochs=1, shuffle=False, drop_remainder=False)
    total = np.sum([np.asarray(sums(params, b), np.float64) for b in data], axis=0)
    return float(total[0] / total[1])


def lm_section(config: Config, stage: str):
    """The config section of ``stage`` in {"pretrain", "sft"}."""
    if stage not in ("pretrain", "sft"):
        raise ValueError(f"stage={stage!r}: expected 'pretrain' or 'sft'")
    return config.sft if stage == "sft" else config.pretrain


def lm_shares(config: Config, stage: str) -> tuple[int, int]:
    """``(demonstrations, pretraining sequences)`` per batch: SFT mixes ``ptx_fraction`` of each
    batch from the pretraining corpus (InstructGPT appendix C.3); pretraining is text only."""
    cfg = lm_section(config, stage)
    if stage != "sft":
        return 0, cfg.batch_size
    n_ptx = round(cfg.batch_size * cfg.ptx_fraction)
    return cfg.batch_size - n_ptx, n_ptx


def lm_batch(config: Config, stage: str, demos: dict | None, text: dict | None) -> dict:
    """The step's batch from the loaders' batches (demonstrations, pretraining text)."""
    if stage != "sft":
        return text_batch(text)
    b = demo_batch(demos, config.sft.prompt_loss_weight)
    return concat_batches(b, text_batch(text)) if text is not None else b


def lm_model(config: Config, stage: str) -> ModelConfig:
    """The model ``stage`` trains: the policy's, with its dropout and (SFT) its adapters."""
    cfg = lm_section(config, stage)
    return dataclasses.replace(config.model.for_stage(stage), dropout=cfg.dropout)


def lm_setup(config: Config, stage: str, total: int, mesh, init=None) -> tuple[OneModel, Any]:
    """The stage's state (``OneModel``: optimiser, shardings, restore target, fresh start from
    ``init()``) and its jitted step: what the runner drives and ``lm_programs`` plans."""
    cfg = lm_section(config, stage)
    model = lm_model(config, stage)
    state = one_model(config, model, cfg.optimizer, total, mesh, init)
    micro = getattr(cfg, "grad_accum", 1)
    step = make_lm_step(
        model, state.tx, state.shardings, mesh, micro=micro, frozen_target=state.frozen_target
    )
    return state, step


def lm_programs(config: Config, stage: str, mesh, inputs: PlanInputs) -> list[Program]:
    """The step of pretraining or SFT on abstract inputs (``stage_table.Stage.plan``)."""
    d = config.data
    n_demo, n_text = lm_shares(config, stage)
    demos = text = None
    if n_demo:
        demos = placeholder_batch(
            Kind.DEMONSTRATIONS, n_demo, prompt_len=d.prompt_len, response_len=d.response_len
        )
    if n_text:
        text = placeholder_batch(Kind.PRETRAINING, n_text, text_len=d.text_len)
    batch = lm_batch(config, stage, demos, text)
    state, step = lm_setup(config, stage, PLANNED_STEPS, mesh)
    B, T = batch["tokens"].shape
    work = (Pass(lm_model(config, stage), "train", B * T, T),)
    args = (state.target, state.frozen_target, abstract_batch(batch, mesh))
    return [Program(f"{stage} step", step, args, B * T, work, f"{stage}.batch_size")]


def run_lm_stage(
    config: Config,
    workdir: str | os.PathLike,
    stage: str,
    *,
    mesh=None,
    on_validate: Callable[[Any], dict] | None = None,
) -> dict:
    """Run ``stage`` in {"pretrain", "sft"}; it resumes its own checkpoint if there is one.

    SFT logs its validation loss after every epoch; ``on_validate(params)`` may return more
    metrics to log there (the built-in world's study adds the gold and RM score per epoch)."""
    cfg = lm_section(config, stage)
    config.validate()
    is_sft = stage == "sft"
    model = lm_model(config, stage)
    origin = start_point(config, workdir, stage)
    n_demo, n_ptx = lm_shares(config, stage) if is_sft else (0, 0)
    if is_sft:
        uses = {"sft": (n_demo, "sft.batch_size")}
        if n_ptx:  # the pretraining share of every batch (InstructGPT appendix C.3)
            uses["pretrain"] = (n_ptx, "sft.ptx_fraction")
    else:
        uses = {"pretrain": (cfg.batch_size, "pretrain.batch_size")}
    why = {"pretrain": f"or set --config.sft.ptx_fraction=0 (sft.ptx_fraction={cfg.ptx_fraction} "
           "mixes pretraining text into every SFT batch)"} if is_sft else None  # fmt: skip
    sharded = ((cfg.batch_size, f"{stage}.batch_size"),)
    bases = base_fingerprints(config, workdir, model, policy=origin)
    fingerprints = preflight(config, workdir, stage, uses, sharded, why, bases)
    mesh = mesh or sharding.make_mesh(config.mesh)

    # Data: SFT = demonstrations (+ a pretraining share); pretraining = text only. Batch sizes are
    # global: every process reads the global batch and keeps its rows (sharding.process_rows).
    if is_sft:
        demos = loader(config, workdir, "sft", n_demo, config.seed, epochs=cfg.epochs)
        iters = [iter(demos)]
        if n_ptx:
            iters.append(iter(loader(config, workdir, "pretrain", n_ptx, config.seed + 1)))
        steps_per_epoch = sources.split_size(config, workdir, "sft") // n_demo
        total = cfg.epochs * steps_per_epoch
    else:
        iters = [iter(loader(config, workdir, "pretrain", cfg.batch_size, config.seed))]
        total = cfg.steps

    def batches():
        while True:
            if not is_sft:
                yield lm_batch(config, stage, None, next(iters[0]))
            else:
                text = next(iters[1]) if len(iters) > 1 else None
                yield lm_batch(config, stage, next(iters[0]), text)

    init = lambda: initial_params(config, workdir, origin, model.plain(), mesh)  # noqa: E731
    state, step = lm_setup(config, stage, total, mesh, init)
    plain = dataclasses.replace(model.plain(), dropout=0.0)

    def export(s: TrainState):  # the plain model: adapters folded into the base
        return lora.plain(state.frozen(), s.params, model)

    validate = None
    if is_sft and sources.expected_size(config, workdir, "sft_val"):

        def validate(s):
            params = export(s)
            extra = on_validate(params) if on_validate else {}
            return {"val/loss": validation_loss(params, plain, config, workdir), **extra}

    run = StageRun(
        stage=stage,
        model=plain,
        fingerprints=fingerprints,
        total=total,
        target=state.target,
        start=state.start,
        step=lambda s, b: step(s, state.frozen(), b),
        iterators=iters,
        batches=batches(),
        export=export,
        position=lambda s: s.step,
        validate=validate,
        adapters=lambda s: s.params,
        adapted=model,
        base=base_name(config, origin),
        validate_every=steps_per_epoch if is_sft else 0,
    )
    return drive(config, workdir, run, mesh)
