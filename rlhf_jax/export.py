"""``rlhf-jax export``: a finished stage as a Hugging Face directory that transformers loads.

A policy stage (``pretrain``, ``sft``, ``ppo``, ``ppo_ptx``, ``dpo``, ``grpo``, ``rloo``; PPO stages
export their EMA weights)
becomes an ``AutoModelForCausalLM`` directory; the ``rm`` stage an
``AutoModelForSequenceClassification`` one with ``num_labels=1`` whose logits are the normalised
reward (the RM's bias, which makes the demonstrations score 0 on average, is folded into the
weights: ``hf.save_checkpoint``). Beside the weights: the data's tokenizer and, for a policy,
``generation_config.json`` (its EOS, PAD and BOS ids, and ``data.response_len`` new tokens).
The directory appears only once complete; on several processes, process 0 writes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import jax

from rlhf_jax import hf
from rlhf_jax.config import Config
from rlhf_jax.data import sources
from rlhf_jax.errors import ConfigError
from rlhf_jax.stages.lineage import (
    load_policy,
    load_reward_model,
    policy_model,
    stage_exists,
    stage_model,
)
from rlhf_jax.train_state import shift_scalar_head

log = logging.getLogger("rlhf_jax")
POLICY_STAGES = ("pretrain", "sft", "ppo", "ppo_ptx", "dpo", "grpo", "rloo")


def _on_host(tree):
    """The whole of ``tree`` on this host (gathered from every process when sharded across)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def export_stage(config: Config, workdir: str | os.PathLike, stage: str, out: str | os.PathLike):
    """Write ``stage``'s exported params as an HF directory ``out``; returns its path."""
    if stage not in (*POLICY_STAGES, "rm"):
        raise ConfigError(f"--stage={stage}: expected one of {', '.join((*POLICY_STAGES, 'rm'))}")
    if not stage_exists(workdir, stage):
        raise ConfigError(f"--stage={stage}: no such stage in {workdir}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out={out} exists and is not empty: give a new directory")
    tokenizer = sources.load_tokenizer(config, workdir)
    ids = {
        name: getattr(tokenizer, name)
        for name in ("eos_token_id", "pad_token_id", "bos_token_id")
        if isinstance(getattr(tokenizer, name, None), int)
    }
    if stage == "rm":
        params, bias, model = load_reward_model(config, workdir, source=Path(workdir) / "rm")
        params = shift_scalar_head(params, -bias)  # the export's logits are normalised scores
    else:
        model = stage_model(Path(workdir) / stage) or policy_model(config)
        params = load_policy(config, workdir, stage)
    params = _on_host(params)
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            hf.save_checkpoint(tmp, model, params, hf_overrides=ids)
            tokenizer.save_pretrained(tmp)
            if stage != "rm":
                from transformers import GenerationConfig

                GenerationConfig(**ids, max_new_tokens=config.data.response_len).save_pretrained(
                    tmp
                )
            if out.exists():
                out.rmdir()
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("[export] %s -> %s", Path(workdir) / stage, out)
    return out
