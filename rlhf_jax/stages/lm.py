"""Pretraining and SFT: next-token training of the policy, with SFT's pretraining mix.

Both stages run ``common.make_lm_step``. Pretraining predicts every text token. SFT predicts the
response tokens (EOS included) plus the prompt tokens at ``prompt_loss_weight`` (METHOD.md 1.1),
and mixes ``ptx_fraction`` of each batch from the pretraining corpus (InstructGPT appendix C.3:
the PPO init saw 10% pretraining data): demonstrations and text are concatenated into one batch
whose token-mean loss covers both.

SFT here trains the PPO init ``pi_init`` (2 epochs by default), which is also the KL reference and
the baseline the evaluation compares against; the 16-epoch, RM-selected ``pi_sft16`` baseline of
the paper is the same stage with ``sft.epochs=16``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from rlhf_jax import checkpoint, sharding
from rlhf_jax.config import Config
from rlhf_jax.data import loaders
from rlhf_jax.stages.common import (
    Loop,
    MetricsLog,
    config_json,
    initial_params,
    loader,
    make_lm_step,
    pad_to,
    split_size,
    stage_exists,
)
from rlhf_jax.train_state import (
    abstract_state,
    create_train_state,
    key_data,
    make_optimizer,
    train_state_shardings,
)


def text_batch(b: dict) -> dict:
    return {"tokens": b["tokens"], "attention_mask": b["mask"], "loss_mask": b["mask"]}


def demo_batch(b: dict, prompt_loss_weight: float) -> dict:
    loss_mask = b["response_mask"] + prompt_loss_weight * b["prompt_mask"]
    return {"tokens": b["tokens"], "attention_mask": b["attention_mask"], "loss_mask": loss_mask}


def concat_batches(a: dict, b: dict) -> dict:
    """Stack two LM batches along the batch axis, right-padding the shorter sequences."""
    length = max(a["tokens"].shape[1], b["tokens"].shape[1])
    out = {k: np.concatenate([pad_to(a[k], length), pad_to(b[k], length)]) for k in a}
    out["loss_mask"] = out["loss_mask"].astype(np.float32)
    return out


def run_lm_stage(config: Config, workdir: str | os.PathLike, stage: str, *, mesh=None) -> dict:
    """Run ``stage`` in {"pretrain", "sft"}; it resumes its own checkpoint if there is one."""
    if stage not in ("pretrain", "sft"):
        raise ValueError(f"stage={stage!r}: expected 'pretrain' or 'sft'")
    mesh = mesh or sharding.make_mesh(config.mesh)
    is_sft = stage == "sft"
    cfg = config.sft if is_sft else config.pretrain
    model = dataclasses.replace(config.model, dropout=cfg.dropout)

    # Data: SFT = demonstrations (+ a pretraining share); pretraining = text only. Batch sizes are
    # global; each process loads its share.
    procs = jax.process_count()
    if is_sft:
        n_ptx = round(cfg.batch_size * cfg.ptx_fraction)
        n_demo = cfg.batch_size - n_ptx
        demos = loader(config, workdir, "sft", n_demo // procs, config.seed, epochs=cfg.epochs)
        iters = [iter(demos)]
        if n_ptx:
            iters.append(iter(loader(config, workdir, "pretrain", n_ptx // procs, config.seed + 1)))
        total = cfg.epochs * (split_size(config, workdir, "sft") // n_demo)
    else:
        iters = [iter(loader(config, workdir, "pretrain", cfg.batch_size // procs, config.seed))]
        total = cfg.steps

    def batches():
        while True:
            if not is_sft:
                yield text_batch(next(iters[0]))
                continue
            b = demo_batch(next(iters[0]), cfg.prompt_loss_weight)
            yield concat_batches(b, text_batch(next(iters[1]))) if len(iters) > 1 else b

    # State: resume this stage, else previous stage's params (pretrain -> sft), HF import, init.
    tx = make_optimizer(cfg.optimizer, total)
    shardings = train_state_shardings(model, tx, mesh, config.mesh.rules)
    ckpt = checkpoint.StageCheckpointer(
        workdir, stage, keep=config.keep_checkpoints, config=config_json(config)
    )
    previous = "pretrain" if is_sft and stage_exists(workdir, "pretrain") else None

    def start():
        params = initial_params(config, workdir, previous, model, mesh)
        return create_train_state(params, tx, key_data(config.seed), shardings)

    target = checkpoint.abstract_with_shardings(abstract_state(model, tx), shardings)
    state, data_state, _ = checkpoint.resume_or_start(ckpt, target, start=start)
    if data_state:
        for it, s in zip(iters, data_state["iterators"]):
            loaders.set_iterator_state(it, s)

    loop = Loop(stage, config, ckpt, MetricsLog(workdir, stage), mesh)
    _, meta = loop.run(
        state,
        make_lm_step(model, tx, shardings, mesh),
        batches(),
        start=int(jax.device_get(state.step)),
        total=total,
        data_state=lambda: {"iterators": [loaders.get_iterator_state(it) for it in iters]},
        export=lambda s: s.params,
    )
    ckpt.close()
    return meta
