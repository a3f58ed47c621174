"""Low-rank adapters over a frozen base: which leaves are trained, and moving between the forms.

A LoRA model's params (``model.Transformer`` with ``config.lora.rank > 0``) are its base's plus
``lora_a`` [*in, r] and ``lora_b`` [r, *out] beside each adapted kernel. A stage splits them into

- the *frozen* base: every other leaf, held in ``model.frozen_dtype``, loaded from where the stage
  starts and never saved in its checkpoints (they name it instead: ``base_fingerprint``); and
- the *trainable* part: the adapters, and a scalar head where there is one (an RM, a value
  network), in ``param_dtype``, with the optimiser state.

``merge(frozen, trainable)`` is the params tree the model runs on (no copy is made: it is the
union of two dicts), and the frozen tree alone is the base with its adapters off. ``fold`` writes
the adapters into the kernels, the plain model a LoRA stage exports (and the next stage, the
evaluation and ``rlhf-jax export`` load, as they load any stage's params).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.config import ModelConfig
from rlhf_jax.model import abstract_params

ADAPTER_LEAVES = ("lora_a", "lora_b")
# A scalar head (reward and value networks) is trained whole beside the adapters.
TRAINED_MODULES = ("score_head",)


class Split(NamedTuple):
    """A params tree in two: the frozen base and what is trained (either may be None)."""

    frozen: Any
    trainable: Any


def _trained(path: tuple[str, ...]) -> bool:
    return path[-1] in ADAPTER_LEAVES or path[0] in TRAINED_MODULES


def _partition(tree: dict, keep, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        path = (*prefix, k)
        if isinstance(v, dict):
            sub = _partition(v, keep, path)
            if sub:
                out[k] = sub
        elif keep(path):
            out[k] = v
    return out


def split(params: dict, model: ModelConfig) -> Split:
    """The frozen base and the trainable part of ``params`` (``model`` without adapters: all of
    it is trainable, nothing frozen)."""
    if not model.adapted:
        return Split(None, params)
    frozen = _partition(params, lambda p: not _trained(p))
    return Split(frozen, _partition(params, _trained))


def merge(frozen: dict | None, trainable: dict) -> dict:
    """The params tree the model runs on: the union of the two parts."""
    if frozen is None:
        return trainable
    out = dict(frozen)
    for k, v in trainable.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and k in out else v
    return out


def abstract_split(model: ModelConfig) -> Split:
    """The boxed abstract params of ``model`` in two (frozen leaves in ``model.base_dtype``), with
    their logical axes: what shardings and restore targets are made from."""
    boxed = abstract_params(model)
    if not model.adapted:
        return Split(None, boxed)
    dtype = jnp.dtype(model.base_dtype)
    is_leaf = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    cast = lambda b: b.replace_boxed(jax.ShapeDtypeStruct(b.unbox().shape, dtype))  # noqa: E731
    frozen = _partition(boxed, lambda p: not _trained(p))
    frozen = jax.tree.map(cast, frozen, is_leaf=is_leaf)
    return Split(frozen, _partition(boxed, _trained))


def to_base_dtype(frozen: dict, model: ModelConfig) -> dict:
    """The frozen base in ``model.base_dtype`` (a no-op where it already is)."""
    dtype = jnp.dtype(model.base_dtype)
    return jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), frozen)


def adapter_key(rng: jax.Array, path: tuple[str, ...]) -> jax.Array:
    """The key of one adapter leaf, from its path (so it does not depend on the other leaves)."""
    digest = hashlib.sha256("/".join(path).encode()).digest()
    return jax.random.fold_in(rng, int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)


def fresh_adapters(model: ModelConfig, rng: jax.Array) -> dict:
    """New adapters for ``model`` (A uniform in +-1/sqrt(fan in), B zero: the model starts as
    its base), as a tree holding only the ``lora_*`` leaves."""
    abstract = nn.meta.unbox(_partition(abstract_params(model), lambda p: p[-1] in ADAPTER_LEAVES))

    def init(path, leaf):
        names = tuple(str(getattr(k, "key", k)) for k in path)
        if names[-1] == "lora_b":
            return jnp.zeros(leaf.shape, leaf.dtype)
        bound = (leaf.size // leaf.shape[-1]) ** -0.5
        return jax.random.uniform(adapter_key(rng, names), leaf.shape, leaf.dtype, -bound, bound)

    return jax.tree_util.tree_map_with_path(init, abstract)


def fold(params: dict, model: ModelConfig) -> dict:
    """Plain params with every adapter written into its kernel: ``W + (alpha / r) A B`` in
    float32, stored in ``param_dtype`` (what a LoRA stage exports)."""
    if not model.adapted:
        return params
    scale = model.lora.alpha / model.lora.rank
    dtype = jnp.dtype(model.param_dtype)

    def walk(tree):
        if "lora_a" in tree:
            a, b = tree["lora_a"].astype(jnp.float32), tree["lora_b"].astype(jnp.float32)
            w = tree["kernel"].astype(jnp.float32) + scale * jnp.tensordot(a, b, axes=1)
            drop = (*ADAPTER_LEAVES, "kernel")
            rest = {k: v.astype(dtype) for k, v in tree.items() if k not in drop}
            return {**rest, "kernel": w.astype(dtype)}
        return {k: walk(v) if isinstance(v, dict) else v.astype(dtype) for k, v in tree.items()}

    return walk(params)


def plain(frozen: dict | None, trainable: dict, model: ModelConfig) -> dict:
    """The plain model a stage hands on: its trainable part over its frozen base, the adapters
    folded in (without LoRA: ``trainable`` itself)."""
    if not model.adapted:
        return trainable
    return fold(merge(frozen, trainable), model)


def base_fingerprint(source: str | os.PathLike) -> str:
    """What a LoRA stage's checkpoints record about the base its adapters sit on: for a stage
    directory, its final step's metadata and config; for an HF checkpoint, its config and the
    names, sizes and first and last MiB of its weight files. A base that changed under a
    checkpoint's adapters is then refused like changed settings."""
    path = Path(source)
    h = hashlib.sha256()
    for name in ("config.json", "model.json"):
        if (path / name).is_file():
            h.update((path / name).read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = f.stat().st_size
        h.update(json.dumps([f.name, size]).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    # A stage directory: the latest step that exported params, and its metadata (which holds
    # the seconds the stage took, so a stage run again gives another fingerprint).
    steps = [p for p in path.iterdir() if p.name.isdigit() and (p / "params").exists()] \
        if path.is_dir() else []  # fmt: skip
    if steps:
        last = max(steps, key=lambda p: int(p.name))
        h.update(last.name.encode())
        for f in sorted((last / "meta").rglob("*")):
            if f.is_file():
                h.update(f.read_bytes())
    return h.hexdigest()[:16]
