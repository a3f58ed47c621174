"""Which dataset each stage reads, and building them: from the InstructLang world or user JSONL.

Datasets live under ``<workdir>/data/`` (``builders.dataset_path``); each is built once, and a
stage that finds its dataset already there reads it as it is. The comparisons of the built-in world
need a trained SFT model, so the pipeline builds them with ``build_world_comparisons``.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.data import builders
from rlhf_jax.data import instructlang as il
from rlhf_jax.data import instructlang_corpus as ic
from rlhf_jax.data.records import Kind

# (kind, split) read by each stage; JSONL imports use the same split names.
SPLITS = {
    "pretrain": (Kind.PRETRAINING, "train"),
    "heldout": (Kind.PRETRAINING, "heldout"),
    "sft": (Kind.DEMONSTRATIONS, "sft_train"),
    "sft_val": (Kind.DEMONSTRATIONS, "sft_val"),
    "rm": (Kind.COMPARISONS, "rm_train"),
    "rm_val": (Kind.COMPARISONS, "rm_val"),
    "ppo": (Kind.PROMPTS, "ppo_train"),
    "test": (Kind.PROMPTS, "test"),
}
WORLD, USER = "world", "user"


def data_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / "data"


def source(config: Config, workdir: str | os.PathLike, use: str) -> tuple[Path, str]:
    """(dataset path, split) for one use of ``SPLITS``, building it first if it is missing."""
    kind, split = SPLITS[use]
    name = WORLD if config.data.source == "instructlang" else USER
    path = builders.dataset_path(kind, name, data_dir(workdir))
    if not path.exists() and jax.process_index() == 0:
        if name == WORLD:
            build_world(config, workdir, kind)
        else:
            build_from_jsonl(config, workdir, kind)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} is missing (data.source={config.data.source!r})")
    return path, split


def tokenizer_dir(config: Config, workdir: str | os.PathLike) -> Path:
    if config.data.source == "jsonl":
        return Path(config.data.tokenizer)
    path = data_dir(workdir) / "tokenizer"
    if not (path / "tokenizer.json").exists():
        from rlhf_jax.data.tokenizer import save_tokenizer

        save_tokenizer(path)
    return path


def special_ids(config: Config, workdir: str | os.PathLike) -> tuple[int, int]:
    """(EOS, PAD) token ids: the world's, or those of the user's tokenizer (PAD defaults to 0)."""
    if config.data.source == "instructlang":
        return il.EOS_ID, il.PAD_ID
    from rlhf_jax.hf import load_tokenizer

    tok = load_tokenizer(config.data.tokenizer)
    return int(tok.eos_token_id), int(tok.pad_token_id or 0)


def world(config: Config) -> il.World:
    return il.make_world(config.data.world_seed)


def world_splits(config: Config) -> dict[str, np.ndarray]:
    d = config.data
    sizes = ic.SplitSizes(
        sft_train=d.sft_train,
        sft_val=d.sft_val,
        rm_train=d.rm_train,
        rm_val=d.rm_val,
        ppo_train=d.ppo_train,
        ppo_val=d.ppo_val,
        test=d.test,
    )
    return ic.make_splits(world(config), sizes)


def _budgets(config: Config) -> dict:
    d = config.data
    return dict(
        max_prompt_len=d.prompt_len, max_response_len=d.response_len, max_text_len=d.text_len
    )


def build_world(config: Config, workdir: str | os.PathLike, kind: Kind) -> Path:
    """One record kind of the InstructLang world (every split of it)."""
    w, out = world(config), data_dir(workdir)
    if kind == Kind.PRETRAINING:
        train, heldout = ic.pretraining_corpora(
            w, config.data.pretrain_docs, config.data.heldout_docs
        )
        splits = {"train": _texts(train), "heldout": _texts(heldout)}
    elif kind == Kind.DEMONSTRATIONS:
        prompts = world_splits(config)
        rng = il.stream_rng(config.data.world_seed, "demonstrations")
        splits = {}
        for split in ("sft_train", "sft_val"):
            demos = ic.make_demonstrations(w, prompts[split], rng)
            splits[split] = [
                {"prompt": ic.unpad(p), "response": ic.unpad(r)}
                for p, r in zip(prompts[split], demos)
            ]
    elif kind == Kind.PROMPTS:
        prompts = world_splits(config)
        splits = {
            s: [{"prompt": ic.unpad(p)} for p in prompts[s]]
            for s in ("rm_train", "rm_val", "ppo_train", "ppo_val", "test")
        }
    else:
        raise ValueError("world comparisons need an SFT model: use build_world_comparisons")
    return builders.build_dataset(kind, WORLD, out, splits, eos_id=il.EOS_ID, **_budgets(config))


def _texts(docs: np.ndarray) -> list[dict]:
    return [{"text": ic.unpad(d)} for d in docs]


def build_from_jsonl(config: Config, workdir: str | os.PathLike, kind: Kind) -> Path:
    """Import the user's JSONL file for ``kind`` (``data.<kind>`` in the config)."""
    from rlhf_jax.hf import load_tokenizer

    path = getattr(config.data, kind.value)
    if not path:
        raise FileNotFoundError(
            f"data.{kind.value} is not set: give a JSONL file of {kind.value} records"
        )
    split = next(s for k, s in SPLITS.values() if k == kind)
    tok = load_tokenizer(config.data.tokenizer)
    return builders.build_dataset(
        kind, USER, data_dir(workdir), {split: path}, tokenizer=tok, **_budgets(config)
    )


def build_world_comparisons(config: Config, workdir: str | os.PathLike, sample_fn) -> Path:
    """Label K ~ U{k_min..k_max} samples per RM prompt with the simulated labelers.

    ``sample_fn(prompts [N P], k) -> responses [N k R]`` draws the completions (the pipeline uses
    the SFT policy, as most of InstructGPT's comparisons came from SFT policies, paper 3.1).
    """
    d, w = config.data, world(config)
    prompts = world_splits(config)
    rng = il.stream_rng(d.world_seed, "labelers")
    splits = {}
    for split in ("rm_train", "rm_val"):
        ps = prompts[split]
        ks = rng.integers(d.rm_k_min, d.rm_k_max + 1, len(ps))
        responses = sample_fn(ps, d.rm_k_max)  # [N K_max R]; the first k of each are used
        records = []
        for p, k, resp in zip(ps, ks, responses):
            golds = il.gold_rewards(np.repeat(p[None], k, 0), resp[:k], world=w)
            if len(set(golds.tolist())) < 2:  # all tied: no comparison (paper C.2)
                continue
            ranks = ic.rank_completions(
                golds, rng, tau=d.labeler_tau, deterministic=d.deterministic_labels
            )
            records.append(
                {
                    "prompt": ic.unpad(p),
                    "responses": [_through_eos(r) for r in resp[:k]],
                    "ranks": [int(x) for x in ranks],
                }
            )
        splits[split] = records
    return builders.build_dataset(
        Kind.COMPARISONS,
        WORLD,
        data_dir(workdir),
        splits,
        eos_id=None,
        overwrite=True,
        **_budgets(config),
    )


def _through_eos(response: np.ndarray) -> list[int]:
    """The generated tokens up to and including the first EOS (all of them if there is none)."""
    r = [int(t) for t in response]
    return r[: r.index(il.EOS_ID) + 1] if il.EOS_ID in r else r
