"""``rlhf-jax export``: a finished stage as a Hugging Face directory that transformers loads.

A policy stage (every stage of ``rlhf_jax.stage_table`` that hands on a policy: ``pretrain``,
``sft``, ``ppo``, ``ppo_ptx``, ``dpo``, ``grpo``, ``rloo``; PPO stages export their EMA weights)
becomes an ``AutoModelForCausalLM`` directory; the ``rm`` stage an
``AutoModelForSequenceClassification`` one with ``num_labels=1`` whose logits are the normalised
reward (the RM's bias, which makes the demonstrations score 0 on average, is folded into the
weights: ``hf.save_checkpoint``). Beside the weights: the data's tokenizer and, for a policy,
``generation_config.json`` (its EOS, PAD and BOS ids, and ``data.response_len`` new tokens).
The directory appears only once complete; on several processes, process 0 writes it.

The RM reads its score at a response's last token, the EOS every trained response ends with.
transformers' classifiers read it at the last token that is not ``pad_token_id``, so an exported
RM must not pad with the EOS (GPT-2's tokenizers do): ``distinct_pad_token`` gives it a pad
token of its own, and its tokenizer pads on the right, where absolute positions (GPT-2's) stay
those of an unpadded text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from transformers import GenerationConfig

from rlhf_jax import checkpoint, hf, stage_table
from rlhf_jax.config import Config, LoraConfig, ModelConfig
from rlhf_jax.data import sources
from rlhf_jax.data.builders import swap_into_place
from rlhf_jax.errors import ConfigError
from rlhf_jax.rundir import RunDir, barrier
from rlhf_jax.stages.lineage import load_policy, load_reward_model, policy_model
from rlhf_jax.train_state import shift_scalar_head

log = logging.getLogger("rlhf_jax")
RM_PAD_TOKEN = "<|rm_pad|>"


def distinct_pad_token(tokenizer, model: ModelConfig, params: dict, ids: dict):
    """An exported RM's tokenizer, architecture, params and HF token ids, with a pad token that is
    not its EOS (nor absent). When the tokenizer pads with the EOS, ``RM_PAD_TOKEN`` is added; if
    its id is past the vocabulary, the embedding grows by zero rows (a pad is never attended).
    The tokenizer pads on the right. A tokenizer with a pad token of its own is kept as it is."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer, model, params, ids
    tokenizer.add_special_tokens({"pad_token": RM_PAD_TOKEN})
    pad = int(tokenizer.pad_token_id)
    if pad >= model.vocab_size:
        embed = np.asarray(params["embed"])
        rows = np.zeros((pad + 1 - model.vocab_size, embed.shape[1]), embed.dtype)
        params = {**params, "embed": np.concatenate([embed, rows])}
        model = dataclasses.replace(model, vocab_size=pad + 1)
    return tokenizer, model, params, {**ids, "pad_token_id": pad}


def _on_host(tree):
    """The whole of ``tree`` on this host (gathered from every process when sharded across)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def export_stage(config: Config, workdir: str | os.PathLike, stage: str, out: str | os.PathLike):
    """Write ``stage``'s exported params as an HF directory ``out``; returns its path."""
    run = RunDir(workdir)
    exports = stage_table.names(exports=stage_table.POLICY) + stage_table.names(
        exports=stage_table.REWARD
    )
    if stage not in exports:
        raise ConfigError(f"--stage={stage}: expected one of {', '.join(exports)}")
    if not run.has(stage):
        raise ConfigError(f"--stage={stage}: no such stage in {workdir}")
    reward = stage_table.get(stage).exports == stage_table.REWARD
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out={out} exists and is not empty: give a new directory")
    tokenizer = sources.load_tokenizer(config, workdir)
    ids = {
        name: getattr(tokenizer, name)
        for name in ("eos_token_id", "pad_token_id", "bos_token_id")
        if isinstance(getattr(tokenizer, name, None), int)
    }
    if reward:
        rm = load_reward_model(config, workdir, source=run.stage(stage))
        model = rm.model
        params = shift_scalar_head(rm.params, -rm.bias)  # the export's logits: normalised scores
    else:
        model = run.model(stage) or policy_model(config)
        params = load_policy(config, workdir, stage)
    params = _on_host(params)
    if reward:
        tokenizer, model, params, ids = distinct_pad_token(tokenizer, model, params, ids)
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            hf.save_checkpoint(tmp, model, params, hf_overrides=ids)
            tokenizer.save_pretrained(tmp)
            if not reward:
                GenerationConfig(**ids, max_new_tokens=config.data.response_len).save_pretrained(
                    tmp
                )
            if out.exists():
                out.rmdir()
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("[export] %s -> %s", run.stage(stage), out)
    return out


def export_adapters(
    config: Config, workdir: str | os.PathLike, stage: str, out: str | os.PathLike
) -> Path:
    """Write the adapters a LoRA policy stage trained as a PEFT adapter directory ``out``
    (``hf.save_adapters``), with its tokenizer; returns its path. ``peft`` loads it onto the HF
    export of the stage's base: its ``init_from`` checkpoint, or the stage it started from
    (``rlhf-jax export --stage=<that stage>``), as the log line says."""
    run = RunDir(workdir)
    policies = stage_table.names(exports=stage_table.POLICY)
    if stage not in policies:
        raise ConfigError(
            f"--stage={stage} --adapters: adapters are exported for a policy stage ("
            f"{', '.join(policies)}); export a reward model merged, without --adapters"
        )
    if not run.has(stage):
        raise ConfigError(f"--stage={stage}: no such stage in {workdir}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out={out} exists and is not empty: give a new directory")
    meta = checkpoint.read_metadata(workdir, stage)
    if "lora" not in meta:
        raise ConfigError(
            f"--stage={stage} --adapters: the stage trained every weight (no model.lora.rank), so "
            "it has no adapters: export it without --adapters"
        )
    lora = dict(meta["lora"])
    base = lora.pop("base", "")
    model = run.model(stage) or policy_model(config)
    model = dataclasses.replace(model, lora=LoraConfig(**lora))
    with checkpoint.StageCheckpointer(workdir, stage, read_only=True) as reader:
        adapters = _on_host(reader.restore_adapters())
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            on_disk = "" if base.startswith("stage:") or base == "fresh" else base
            hf.save_adapters(tmp, model, adapters, base=on_disk)
            sources.load_tokenizer(config, workdir).save_pretrained(tmp)
            if out.exists():
                out.rmdir()
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if base.startswith("stage:"):
            where = (f"the export of stage '{base[6:]}' (rlhf-jax export --stage={base[6:]} "
                     "--out=<dir>)")  # fmt: skip
        else:
            where = base
        log.info("[export] %s adapters -> %s; load them onto %s", stage, out, where)
    return out


SOURCE_FILE = "rlhf_jax_source.json"


def export_current(config: Config, workdir: str | os.PathLike, stage: str, out: str | os.PathLike):
    """``export_stage`` into ``out`` unless ``out`` already holds this very stage: the pipeline's
    ``export/policy`` follows its last RL stage when a rerun adds PPO-ptx, and a stage trained
    again (other settings or data) is exported again. ``out`` is replaced whole, never half."""
    out, run = Path(out), RunDir(workdir)
    # The settings the stage's checkpoints are bound to (a rerun rewrites its config.json with
    # every field, also those of other stages, which change nothing it exported).
    settings = json.dumps(run.settings(stage), sort_keys=True, default=str)
    source = {
        "stage": stage,
        "step": run.committed_steps(stage)[-1],
        "settings": hashlib.sha256(settings.encode()).hexdigest(),
    }
    marker = out / SOURCE_FILE
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return out
    new, old = out.with_name(out.name + ".new"), out.with_name(out.name + ".old")
    if jax.process_index() == 0:
        for leftover in (new, old):
            shutil.rmtree(leftover, ignore_errors=True)
    barrier(f"rlhf_jax export {new}")  # every process sees ``new`` gone
    export_stage(config, workdir, stage, new)
    if jax.process_index() == 0:
        (new / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        swap_into_place(new, out, old)
        shutil.rmtree(old, ignore_errors=True)
    barrier(f"rlhf_jax export {out}")
    return out
