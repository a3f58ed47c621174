"""Batch loaders that turn stored records into fixed-shape int32 batches, with resumable iterators.

Batch layouts (PAD = ``pad_id``; P, R, T the loader's prompt/response/text lengths):

- demonstrations: ``tokens``, ``attention_mask``, ``prompt_mask``, ``response_mask``: [B, P+R]
- comparisons: ``tokens``, ``attention_mask``, ``response_mask``: [B, K, P+R]; ``ranks``,
  ``valid``: [B, K] (K = ``max_completions``; slots past a record's own K have ``valid`` 0,
  rank -1, all-PAD tokens and zero masks)
- prompts: ``prompt_tokens``, ``prompt_mask``: [B, P]
- pretraining: ``tokens``, ``mask``: [B, T]

Prompts are LEFT-padded into the first P slots and responses right-padded into the last R, so
every response starts at position P, the position the PPO rollout samples from. Text is
right-padded. Masks are 1 on real tokens (the response's EOS included).

Order: grain's ``IndexSampler`` (a seeded permutation per epoch, this process's shard of it), the
order ``grain.DataLoader`` reads. Each batch is read from the array_record source in one call
(``__getitems__``): ``grain.DataLoader`` reads record by record, about 0.6 ms each in a
background thread, which made data loading a third of pretraining's wall time in the default
run; one call per batch costs about 0.1 ms per record, in this thread, and no thread competes
with XLA for the cores.

Iterator state: ``iterator.get_state()`` is JSON as bytes, in ``grain.DataLoader``'s format (a
checkpoint written by either restores in the other); `get_iterator_state` gives it as a
JSON-compatible dict (for the stage checkpoint) and `set_iterator_state` restores either form,
after which the iterator yields exactly the batches the saved one would have.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from rlhf_jax.data.builders import open_source, read_metadata
from rlhf_jax.data.records import Kind, as_kind, from_storage, to_storage
from rlhf_jax.errors import ConfigError


def _fit(tokens: Any, length: int, field: str) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    if tokens.size > length:
        raise ValueError(f"field '{field}': {tokens.size} tokens do not fit in {length} slots")
    return tokens


def pack_prompt(
    prompt: Sequence[int] | np.ndarray, *, prompt_len: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """``prompt_tokens``, ``prompt_mask`` [P]: the prompt left-padded."""
    p = _fit(prompt, prompt_len, "prompt")
    tokens = np.full(prompt_len, pad_id, np.int32)
    mask = np.zeros(prompt_len, np.int32)
    if p.size:
        tokens[-p.size :] = p
        mask[-p.size :] = 1
    return {"prompt_tokens": tokens, "prompt_mask": mask}


def prompt_batch(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The prompts of a prompt loader's batch (``pack_prompt``'s fields): what the RL
    iterations take."""
    return {"prompt_tokens": b["prompt_tokens"], "prompt_mask": b["prompt_mask"]}


def pack_demonstration(
    prompt: Sequence[int] | np.ndarray,
    response: Sequence[int] | np.ndarray,
    *,
    prompt_len: int,
    response_len: int,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """``tokens``, ``attention_mask``, ``prompt_mask``, ``response_mask`` [P+R]."""
    left = pack_prompt(prompt, prompt_len=prompt_len, pad_id=pad_id)
    r = _fit(response, response_len, "response")
    tokens = np.full(prompt_len + response_len, pad_id, np.int32)
    tokens[:prompt_len] = left["prompt_tokens"]
    tokens[prompt_len : prompt_len + r.size] = r
    prompt_mask = np.zeros(prompt_len + response_len, np.int32)
    prompt_mask[:prompt_len] = left["prompt_mask"]
    response_mask = np.zeros(prompt_len + response_len, np.int32)
    response_mask[prompt_len : prompt_len + r.size] = 1
    return {
        "tokens": tokens,
        "attention_mask": prompt_mask + response_mask,
        "prompt_mask": prompt_mask,
        "response_mask": response_mask,
    }


def pack_comparison(
    prompt: Sequence[int] | np.ndarray,
    responses: Sequence[Sequence[int] | np.ndarray],
    ranks: Sequence[int] | np.ndarray,
    *,
    prompt_len: int,
    response_len: int,
    max_completions: int,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """``tokens``, ``attention_mask``, ``response_mask`` [K, P+R]; ``ranks``, ``valid`` [K]."""
    k = len(responses)
    if k > max_completions:
        raise ValueError(f"field 'responses': {k} completions do not fit in {max_completions}")
    width = prompt_len + response_len
    out = {
        "tokens": np.full((max_completions, width), pad_id, np.int32),
        "attention_mask": np.zeros((max_completions, width), np.int32),
        "response_mask": np.zeros((max_completions, width), np.int32),
        "ranks": np.full(max_completions, -1, np.int32),
        "valid": np.zeros(max_completions, np.int32),
    }
    for i, response in enumerate(responses):
        one = pack_demonstration(
            prompt, response, prompt_len=prompt_len, response_len=response_len, pad_id=pad_id
        )
        for key in ("tokens", "attention_mask", "response_mask"):
            out[key][i] = one[key]
    out["ranks"][:k] = np.asarray(ranks, dtype=np.int32)
    out["valid"][:k] = 1
    return out


def pack_text(
    text: Sequence[int] | np.ndarray, *, text_len: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """``tokens``, ``mask`` [T]: the text right-padded."""
    t = _fit(text, text_len, "text")
    tokens = np.full(text_len, pad_id, np.int32)
    tokens[: t.size] = t
    mask = np.zeros(text_len, np.int32)
    mask[: t.size] = 1
    return {"tokens": tokens, "mask": mask}


def placeholder_batch(
    kind: Kind | str,
    batch_size: int,
    *,
    prompt_len: int = 0,
    response_len: int = 0,
    text_len: int = 0,
    max_completions: int = 0,
) -> dict[str, np.ndarray]:
    """A batch of ``batch_size`` one-token records of ``kind``, packed as a loader packs them:
    the keys, shapes and dtypes of a real batch (what ``rlhf-jax plan`` compiles the stages
    for, without data)."""
    one = [1]
    record = {
        Kind.DEMONSTRATIONS: {"prompt": one, "response": one},
        Kind.COMPARISONS: {"prompt": one, "responses": [one] * 2, "ranks": [0, 1]},
        Kind.PROMPTS: {"prompt": one},
        Kind.PRETRAINING: {"text": one},
    }[as_kind(kind)]
    pack = PackRecord(
        kind,
        prompt_len=prompt_len,
        response_len=response_len,
        text_len=text_len,
        max_completions=max_completions,
    )
    example = pack(to_storage(as_kind(kind), record))
    return {k: np.repeat(v[None], batch_size, axis=0) for k, v in example.items()}


class PackRecord:
    """One stored record -> its fixed-shape example (layouts in the module docstring)."""

    def __init__(
        self,
        kind: Kind | str,
        *,
        prompt_len: int = 0,
        response_len: int = 0,
        text_len: int = 0,
        max_completions: int = 0,
        pad_id: int = 0,
    ) -> None:
        self.kind = as_kind(kind)
        self.prompt_len, self.response_len, self.text_len = prompt_len, response_len, text_len
        self.max_completions, self.pad_id = max_completions, pad_id

    def __call__(self, element: Any) -> dict[str, np.ndarray]:
        rec = from_storage(self.kind, element)
        lens = {"prompt_len": self.prompt_len, "pad_id": self.pad_id}
        if self.kind is Kind.DEMONSTRATIONS:
            return pack_demonstration(
                rec["prompt"], rec["response"], response_len=self.response_len, **lens
            )
        if self.kind is Kind.COMPARISONS:
            return pack_comparison(
                rec["prompt"],
                rec["responses"],
                rec["ranks"],
                response_len=self.response_len,
                max_completions=self.max_completions,
                **lens,
            )
        if self.kind is Kind.PROMPTS:
            return pack_prompt(rec["prompt"], **lens)
        return pack_text(rec["text"], text_len=self.text_len, pad_id=self.pad_id)


# Which loader lengths each kind needs, keyed by the metadata entry that bounds them.
_NEEDED: dict[Kind, tuple[str, ...]] = {
    Kind.DEMONSTRATIONS: ("max_prompt_len", "max_response_len"),
    Kind.COMPARISONS: ("max_prompt_len", "max_response_len", "max_completions"),
    Kind.PROMPTS: ("max_prompt_len",),
    Kind.PRETRAINING: ("max_text_len",),
}
_ARG = {
    "max_prompt_len": "prompt_len",
    "max_response_len": "response_len",
    "max_text_len": "text_len",
    "max_completions": "max_completions",
}


def make_loader(
    path: str | os.PathLike,
    split: str,
    *,
    batch_size: int,
    seed: int,
    prompt_len: int | None = None,
    response_len: int | None = None,
    text_len: int | None = None,
    max_completions: int | None = None,
    pad_id: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Loader:
    """A `Loader` of fixed-shape batches from one split of a built dataset.

    Args:
      path: a dataset directory from `builders.build_dataset`; its kind is read from metadata.
      split: tfds split (``"train"``, ``"train[:90%]"``).
      batch_size: B, per process.
      seed: shuffle seed (0 <= seed < 2**32); each epoch is a different permutation of it.
      prompt_len, response_len, text_len, max_completions: P, R, T, K of the batch shapes. None
        takes the dataset's longest (metadata); a value below it fails here, not mid-training.
      num_epochs: None repeats forever.
      drop_remainder: drop the last partial batch, so every batch has B rows.
      shard_index, shard_count: this process's shard (``jax.process_index()``/``process_count()``);
        shards are equal-sized disjoint slices (up to shard_count - 1 records dropped), so every
        process takes the same number of steps.

    Iterate with ``it = iter(loader)``; ``it.get_state()``/``it.set_state()`` save and restore.
    """
    meta = read_metadata(path)
    kind = as_kind(meta["kind"])
    given = {
        "prompt_len": prompt_len,
        "response_len": response_len,
        "text_len": text_len,
        "max_completions": max_completions,
    }
    lengths: dict[str, int] = {}
    for key in _NEEDED[kind]:
        arg, longest = _ARG[key], int(meta.get(key, 0))
        value = given[arg] if given[arg] is not None else longest
        if value < longest:
            raise ConfigError(
                f"{os.fspath(path)}: {arg}={value} is below the dataset's longest ({key}={longest})"
                + (f"; set data.{arg} >= {longest}" if arg != "max_completions" else "")
            )
        lengths[arg] = value
    source = open_source(path, split)
    shard = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    pack = PackRecord(kind, pad_id=pad_id, **lengths)
    return Loader(source, sampler, shard, pack, batch_size, drop_remainder)


class Loader:
    """Batches of ``pack``ed records in ``sampler`` order; every ``iter()`` starts at the first."""

    def __init__(self, source, sampler, shard, pack: PackRecord, batch_size: int, drop_remainder):
        self.source, self.sampler, self.shard, self.pack = source, sampler, shard, pack
        self.batch_size, self.drop_remainder = batch_size, drop_remainder

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """An iterator over a `Loader`'s batches whose position can be saved and restored.

    The position is the number of this shard's records consumed. Shard ``i`` of ``n`` reads the
    sampler's global indices ``i, i + n, i + 2n, ...`` (what ``grain.DataLoader`` reads), and an
    epoch boundary may fall inside a batch when ``num_epochs`` is None.
    """

    def __init__(self, loader: Loader):
        self._loader = loader
        self._consumed = 0

    def __next__(self) -> dict[str, np.ndarray]:
        ld = self._loader
        keys = []
        for j in range(self._consumed, self._consumed + ld.batch_size):
            try:
                index = j * ld.shard.shard_count + ld.shard.shard_index
                keys.append(ld.sampler[index].record_key)
            except IndexError:  # the sampler's last epoch is over
                break
        self._consumed += len(keys)  # a dropped remainder counts as read, as in grain
        if not keys or (ld.drop_remainder and len(keys) < ld.batch_size):
            raise StopIteration
        examples = [ld.pack(record) for record in ld.source.__getitems__(keys)]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def get_state(self) -> bytes:
        shard_index, shard_count = self._loader.shard.shard_index, self._loader.shard.shard_count
        state = {
            "version": _STATE_VERSION,
            # The last global sampler index read (shard_index - shard_count before the first).
            "last_seen_indices": {"0": shard_index + (self._consumed - 1) * shard_count},
            "last_worker_index": -1,
            "worker_count": 0,
            **self._describe(),
        }
        return json.dumps(state, indent=4).encode()

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state.decode())
        if saved.get("version") != _STATE_VERSION or saved.get("worker_count") != 0:
            raise ValueError(
                f"data iterator state of another format (version {saved.get('version')}, "
                f"{saved.get('worker_count')} workers); this loader restores version "
                f"{_STATE_VERSION} with 0 workers"
            )
        for key, want in self._describe().items():
            if saved[key] != want:
                raise ValueError(f"data iterator state of another {key}: {saved[key]}, not {want}")
        shard_index, shard_count = self._loader.shard.shard_index, self._loader.shard.shard_count
        last = int(saved["last_seen_indices"]["0"])
        self._consumed = (last - shard_index) // shard_count + 1

    def _describe(self) -> dict[str, str]:
        return {"sampler": repr(self._loader.sampler), "data_source": repr(self._loader.source)}


_STATE_VERSION = 2  # grain.DataLoader's checkpoint format, version 2


def get_iterator_state(iterator: BatchIterator) -> dict[str, Any]:
    """The iterator's position as a JSON-compatible dict (grain's own state, decoded)."""
    return json.loads(iterator.get_state().decode())


def set_iterator_state(iterator: BatchIterator, state: dict[str, Any] | bytes | str) -> None:
    """Restores a position saved by `get_iterator_state` or ``iterator.get_state()``."""
    if isinstance(state, dict):
        state = json.dumps(state)
    if isinstance(state, str):
        state = state.encode()
    iterator.set_state(state)
