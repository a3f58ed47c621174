"""The world's datasets: the data source ``instructlang`` that the library's stages read through.

``WorldSource`` builds each record kind of the world under ``<workdir>/data/`` the first time a
stage reads it (``rlhf_jax.data.sources``), as the JSONL source imports a user's files: the
pretraining corpus and its held-out part, the demonstrations, the prompt splits, and the labelled
comparisons. Comparisons need a trained SFT model: ``build_comparisons`` samples K completions per
RM prompt from the run's SFT model (and its base model) and ranks them with the simulated
labelers. Importing ``rlhf_jax.instructlang`` registers the source.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.data import sources
from rlhf_jax.data.records import Kind
from rlhf_jax.evaluate import sample_responses
from rlhf_jax.instructlang import corpus, lang
from rlhf_jax.instructlang.config import SOURCE, InstructLangConfig
from rlhf_jax.instructlang.tokenizer import save_tokenizer
from rlhf_jax.rundir import RunDir, barrier
from rlhf_jax.stages.lineage import load_policy, policy_model

log = logging.getLogger("rlhf_jax")
NAME = SOURCE


def world(config: InstructLangConfig) -> lang.World:
    return lang.make_world(config.world.seed)


def prompt_splits(config: InstructLangConfig) -> dict[str, np.ndarray]:
    return corpus.make_splits(world(config), config.world.splits)


def _texts(docs: np.ndarray) -> list[dict]:
    return [{"text": corpus.unpad(d)} for d in docs]


def build(config: InstructLangConfig, workdir: str | os.PathLike, kind: Kind) -> Path:
    """One record kind of the world (every split of it)."""
    w = world(config)
    if kind == Kind.PRETRAINING:
        train, heldout = corpus.pretraining_corpora(
            w, config.world.pretrain_docs, config.world.heldout_docs
        )
        splits = {"train": _texts(train), "heldout": _texts(heldout)}
    elif kind == Kind.DEMONSTRATIONS:
        prompts = prompt_splits(config)
        rng = lang.stream_rng(config.world.seed, "demonstrations")
        splits = {}
        for split in ("sft_train", "sft_val"):
            demos = corpus.make_demonstrations(w, prompts[split], rng)
            splits[split] = [
                {"prompt": corpus.unpad(p), "response": corpus.unpad(r)}
                for p, r in zip(prompts[split], demos)
            ]
    elif kind == Kind.PROMPTS:
        prompts = prompt_splits(config)
        splits = {
            s: [{"prompt": corpus.unpad(p)} for p in prompts[s]]
            for s in ("rm_train", "rm_val", "ppo_train", "ppo_val", "test")
        }
    else:
        return build_comparisons(config, workdir)
    return sources.write(config, workdir, kind, splits, eos_id=lang.EOS_ID)


def build_comparisons(config: InstructLangConfig, workdir: str | os.PathLike) -> Path:
    """Sample K ~ U{rm_k_min..rm_k_max} completions per RM prompt and rank them.

    Completions come from the run's SFT policy, a ``world.base_share`` of them (per completion)
    from the base model instead (docs/instructlang.md section 4: most of InstructGPT's comparisons
    came from SFT policies, paper section 3.1); the simulated labelers rank them by gold with
    noise ``world.labeler_tau`` (or exactly, ``world.deterministic_labels``).
    """
    t0 = time.perf_counter()
    sft = load_policy(config, workdir, "sft")
    base = load_policy(config, workdir, "pretrain") if RunDir(workdir).has("pretrain") else sft
    model, R = policy_model(config), config.data.response_len
    mix = np.random.default_rng([config.world.seed, 11])

    def sample(prompts: np.ndarray, k: int) -> np.ndarray:
        rep = np.repeat(prompts, k, axis=0)
        kw = dict(
            rng=jax.random.key(config.seed + 5),
            batch_size=config.eval.batch_size,
            max_new_tokens=R,
            eos_id=lang.EOS_ID,
            pad_id=lang.PAD_ID,
        )
        use_base = mix.random(len(rep)) < config.world.base_share
        # Both models sample every row with the same key, so a row's completion does not depend on
        # the share; a model that no row takes is not sampled at all (base_share 0 or 1).
        out = None
        for params, rows in ((sft, ~use_base), (base, use_base)):
            if rows.any():
                drawn = sample_responses(params, model, rep, **kw).tokens
                out = drawn if out is None else np.where(rows[:, None], drawn, out)
        return out.reshape(len(prompts), k, R)

    wcfg, w = config.world, world(config)
    prompts = prompt_splits(config)
    rng = lang.stream_rng(wcfg.seed, "labelers")
    splits = {}
    for split in ("rm_train", "rm_val"):
        ps = prompts[split]
        ks = rng.integers(wcfg.rm_k_min, wcfg.rm_k_max + 1, len(ps))
        responses = sample(ps, wcfg.rm_k_max)  # [N K_max R]; the first k of each are used
        records = []
        for p, k, resp in zip(ps, ks, responses):
            golds = lang.gold_rewards(np.repeat(p[None], k, 0), resp[:k], world=w)
            if len(set(golds.tolist())) < 2:  # all tied: no comparison (paper C.2)
                continue
            ranks = corpus.rank_completions(
                golds, rng, tau=wcfg.labeler_tau, deterministic=wcfg.deterministic_labels
            )
            records.append(
                {
                    "prompt": corpus.unpad(p),
                    "responses": [_through_eos(r) for r in resp[:k]],
                    "ranks": [int(x) for x in ranks],
                }
            )
        splits[split] = records
    path = sources.write(config, workdir, Kind.COMPARISONS, splits, eos_id=None)
    log.info("[comparisons] sampled and labelled in %.1fs", time.perf_counter() - t0)
    return path


def _through_eos(response: np.ndarray) -> list[int]:
    """The generated tokens up to and including the first EOS (all of them if there is none)."""
    r = [int(t) for t in response]
    return r[: r.index(lang.EOS_ID) + 1] if lang.EOS_ID in r else r


class WorldSource:
    """The ``instructlang`` data source (``rlhf_jax.data.sources.Source``)."""

    def build(self, config: Config, workdir: Path, kind: Kind) -> Path:
        return build(_world_config(config), workdir, kind)

    def fingerprint(self, config: Config, workdir: Path, kind: Kind) -> str:
        # The comparisons are also sampled with the run's seed (from its own SFT model).
        seed = config.seed if kind == Kind.COMPARISONS else None
        world = dataclasses.asdict(_world_config(config).world)
        return sources.digest(
            sources.FORMAT_VERSION, kind.value, world, sources.budgets(config), seed
        )

    def sizes(self, config: Config, workdir: Path, kind: Kind) -> dict[str, int]:
        w = _world_config(config).world
        if kind == Kind.PRETRAINING:
            return {"train": w.pretrain_docs, "heldout": w.heldout_docs}
        return dataclasses.asdict(w.splits)  # comparisons: at most one record per prompt

    def tokenizer_dir(self, config: Config, workdir: Path) -> Path:
        path = RunDir(workdir).data / "tokenizer"
        if not (path / "tokenizer.json").exists() and jax.process_index() == 0:
            save_tokenizer(path)
        barrier(f"rlhf_jax tokenizer {path}")
        return path


def _world_config(config: Config) -> InstructLangConfig:
    if not isinstance(config, InstructLangConfig):
        raise TypeError(
            "data.source='instructlang' needs an InstructLangConfig (the world's settings); "
            f"got {type(config).__name__}"
        )
    return config
