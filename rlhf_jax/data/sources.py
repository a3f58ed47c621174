"""Data sources: which dataset each stage reads, and building it when it is missing or stale.

A stage asks for a *use* (``"sft"``, ``"rm_val"``, ``"pretrain"``, ... in ``SPLITS``), which is one
split of one record kind. The datasets live under ``<workdir>/data/`` as tfds ``array_record``
datasets named after the source (``builders.dataset_path(kind, source, data_dir)``), each with the
fingerprint of what it was made from: its source files, the tokenizer and the length budgets. A
dataset that is missing, or whose fingerprint no longer matches, is (re)built by the source named
in ``config.data.source``, never silently reused:

- ``files`` (here): the user's JSONL or Parquet files ``data.demonstrations``,
  ``data.comparisons``, ``data.prompts`` and ``data.pretraining`` in any format of
  ``rlhf_jax.data.formats``, tokenised with ``data.tokenizer`` (default: the ``init_from``
  checkpoint's tokenizer). Each kind's held-out split comes from ``data.<kind>_val`` or, without
  one, from a ``data.heldout_fraction`` of the file;
- other sources register themselves with ``register``; the built-in InstructLang world does so
  when ``rlhf_jax.instructlang`` is imported (the CLI imports it), as a user's own generator of
  records could.

Datasets are built on process 0; the other processes wait at a barrier until it is done.
``loader`` gives a stage its batches of one use, and ``read_all`` a whole split (evaluation
data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import numpy as np

from rlhf_jax import hf
from rlhf_jax.config import Config
from rlhf_jax.data import builders, files, loaders
from rlhf_jax.data.records import Kind
from rlhf_jax.errors import ConfigError
from rlhf_jax.rundir import RunDir, barrier

log = logging.getLogger("rlhf_jax")
FORMAT_VERSION = 1  # bump when a change in import would give other records from the same files


class Use(NamedTuple):
    """What one use reads: a split of the dataset of one record kind."""

    kind: Kind
    split: str


SPLITS = {
    "pretrain": Use(Kind.PRETRAINING, "train"),
    "heldout": Use(Kind.PRETRAINING, "heldout"),
    "sft": Use(Kind.DEMONSTRATIONS, "sft_train"),
    "sft_val": Use(Kind.DEMONSTRATIONS, "sft_val"),
    "rm": Use(Kind.COMPARISONS, "rm_train"),
    "rm_val": Use(Kind.COMPARISONS, "rm_val"),
    "ppo": Use(Kind.PROMPTS, "ppo_train"),
    "test": Use(Kind.PROMPTS, "test"),
}


class Dataset(NamedTuple):
    """A built dataset's directory and the split one use reads of it."""

    path: Path
    split: str


class SpecialIds(NamedTuple):
    """The data tokenizer's EOS and PAD ids (PAD 0 when it has none)."""

    eos: int
    pad: int


@runtime_checkable
class Source(Protocol):
    """What a data source provides: the datasets of each record kind, and their tokenizer."""

    def build(self, config: Config, workdir: Path, kind: Kind) -> Path:
        """Write the dataset of ``kind`` (every split the source has) with ``write`` and return
        its path."""
        ...

    def fingerprint(self, config: Config, workdir: Path, kind: Kind) -> str:
        """A digest of everything the dataset of ``kind`` is made from."""
        ...

    def sizes(self, config: Config, workdir: Path, kind: Kind) -> dict[str, int]:
        """Records per split of ``kind``, known without building it (an upper bound is fine);
        empty when the source has no data of that kind."""
        ...

    def tokenizer_dir(self, config: Config, workdir: Path) -> Path:
        """A local Hugging Face tokenizer directory for the source's token ids."""
        ...


_SOURCES: dict[str, Source] = {}


def register(name: str, source: Source) -> None:
    """Make ``data.source=<name>`` build its datasets with ``source``."""
    _SOURCES[name] = source


def get(config: Config) -> Source:
    name = config.data.source
    if name not in _SOURCES:
        known = ", ".join(sorted(_SOURCES))
        raise ConfigError(
            f"data.source={name!r}: expected one of {known} (the built-in world registers "
            "'instructlang' when rlhf_jax.instructlang is imported)"
        )
    return _SOURCES[name]


def data_dir(workdir: str | os.PathLike) -> Path:
    return RunDir(workdir).data


def _path(config: Config, workdir, kind: Kind) -> Path:
    return builders.dataset_path(kind, config.data.source, data_dir(workdir))


def budgets(config: Config) -> dict[str, int]:
    """The length budgets every imported record must fit: P, R (EOS included), T."""
    d = config.data
    return dict(
        max_prompt_len=d.prompt_len, max_response_len=d.response_len, max_text_len=d.text_len
    )


def write(config: Config, workdir, kind: Kind, splits: dict[str, Any], **kw) -> Path:
    """Build the dataset of ``kind`` from ``splits`` (records or files, as for
    ``builders.build_dataset``), replacing a stale one, with the source's fingerprint."""
    fingerprint = get(config).fingerprint(config, Path(workdir), kind)
    path = builders.build_dataset(
        kind,
        config.data.source,
        data_dir(workdir),
        splits,
        overwrite=True,
        metadata={"fingerprint": fingerprint},
        **budgets(config),
        **kw,
    )
    counts = {s: int(n) for s, n in builders.read_metadata(path)["splits"].items()}
    log.info("[data] %s: %s", path, ", ".join(f"{s} {n:,}" for s, n in counts.items()))
    return path


def is_current(config: Config, workdir, kind: Kind) -> bool:
    """Whether the dataset of ``kind`` exists and was made from what the config names now."""
    path = _path(config, workdir, kind)
    if not path.exists():
        return False
    stored = builders.read_metadata(path).get("fingerprint")
    return stored == get(config).fingerprint(config, Path(workdir), kind)


def dataset(config: Config, workdir: str | os.PathLike, use: str) -> Dataset:
    """(dataset path, split) of one use of ``SPLITS``, built first if it is missing or stale."""
    kind, split = SPLITS[use]
    path = _path(config, workdir, kind)
    if jax.process_index() == 0 and not is_current(config, workdir, kind):
        if path.exists():
            log.info("[data] %s changed since %s was built: importing it again", kind.value, path)
        get(config).build(config, Path(workdir), kind)
    barrier(f"rlhf_jax dataset {path}")
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} is missing (data.source={config.data.source!r})")
    if split not in builders.read_metadata(path)["splits"]:
        raise ConfigError(
            f"{kind.value} have no {split!r} split: give data.{kind.value}_val, or a "
            "data.heldout_fraction > 0"
        )
    return Dataset(path, split)


def split_size(config: Config, workdir: str | os.PathLike, use: str) -> int:
    """The number of records of one use (the dataset is built first if need be)."""
    path, split = dataset(config, workdir, use)
    return int(builders.read_metadata(path)["splits"][split])


def expected_size(config: Config, workdir: str | os.PathLike, use: str) -> int:
    """The number of records of one use, without building anything (for checks before a stage
    writes): the dataset's own count if it is current, else the source's estimate."""
    kind, split = SPLITS[use]
    if is_current(config, workdir, kind):
        return int(builders.read_metadata(_path(config, workdir, kind))["splits"].get(split, 0))
    return int(get(config).sizes(config, Path(workdir), kind).get(split, 0))


def available(config: Config, workdir: str | os.PathLike, use: str) -> bool:
    """Whether the data has records for ``use`` (e.g. held-out text for the NLL)."""
    kind, split = SPLITS[use]
    return get(config).sizes(config, Path(workdir), kind).get(split, 0) > 0


def fingerprint(config: Config, workdir: str | os.PathLike, use: str) -> str:
    """The fingerprint of the dataset one use reads (what a stage records it was trained on)."""
    return get(config).fingerprint(config, Path(workdir), SPLITS[use][0])


def tokenizer_dir(config: Config, workdir: str | os.PathLike) -> Path:
    return get(config).tokenizer_dir(config, Path(workdir))


def load_tokenizer(config: Config, workdir: str | os.PathLike):
    """The data's tokenizer (``hf.load_tokenizer``: padding on the left)."""
    return hf.load_tokenizer(tokenizer_dir(config, workdir))


def special_ids(config: Config, workdir: str | os.PathLike) -> SpecialIds:
    """The EOS and PAD token ids of the data's tokenizer (PAD defaults to 0 when it has none)."""
    tok = load_tokenizer(config, workdir)
    return SpecialIds(int(tok.eos_token_id), int(tok.pad_token_id or 0))


def loader(config: Config, workdir, use: str, batch_size: int, seed: int, epochs=None, **kw):
    """A grain loader of global batches of the dataset for ``use`` (``SPLITS``), built first if
    need be. Every process reads the same batches; a stage keeps this process's rows
    (``sharding.process_rows``)."""
    path, split = dataset(config, workdir, use)
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
        **kw,
    )


def read_all(
    config: Config, workdir, use: str, keys: tuple[str, ...] | list[str] | None = None
) -> dict[str, np.ndarray]:
    """Every record of ``use`` in order, as one array per field (``keys``: only those)."""
    data = loader(config, workdir, use, 256, 0, epochs=1, shuffle=False, drop_remainder=False)
    batches = list(data)
    keys = list(batches[0]) if keys is None else keys
    return {k: np.concatenate([b[k] for b in batches]) for k in keys}


def digest(*parts: Any) -> str:
    """A short stable digest of JSON-able parts (bytes are hashed as they are)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:16]


_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (or of a directory's files), cached by name, size and time."""
    path = Path(path)
    if path.is_dir():
        return digest(*[(f.name, file_digest(f)) for f in sorted(path.iterdir()) if f.is_file()])
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]


# --------------------------------------------------------------------------------------------------
# The user's files


class FileSource:
    """The user's JSONL or Parquet files, one per record kind (and an optional held-out one)."""

    SPLIT_NAMES = {
        Kind.DEMONSTRATIONS: ("sft_train", "sft_val"),
        Kind.COMPARISONS: ("rm_train", "rm_val"),
        Kind.PROMPTS: ("ppo_train", "test"),
        Kind.PRETRAINING: ("train", "heldout"),
    }

    def _files(self, config: Config, kind: Kind) -> tuple[str, str]:
        main, val = getattr(config.data, kind.value), getattr(config.data, f"{kind.value}_val")
        if not main:
            raise ConfigError(
                f"data.{kind.value} is not set: give a JSONL or Parquet file of {kind.value} "
                f"(--config.data.{kind.value}=<file>)"
            )
        for field, path in ((kind.value, main), (f"{kind.value}_val", val)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"data.{field}={path}: no such file")
        return main, val

    def _held_out(self, n: int, fraction: float) -> int:
        return 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))

    def sizes(self, config: Config, workdir: Path, kind: Kind) -> dict[str, int]:
        if not getattr(config.data, kind.value):
            return {}
        main, val = self._files(config, kind)
        train, held = self.SPLIT_NAMES[kind]
        n = files.count_rows(main)
        if val:
            return {train: n, held: files.count_rows(val)}
        k = self._held_out(n, config.data.heldout_fraction)
        return {train: n - k, held: k} if k else {train: n}

    def fingerprint(self, config: Config, workdir: Path, kind: Kind) -> str:
        main, val = self._files(config, kind)
        parts = [FORMAT_VERSION, kind.value, file_digest(main), val and file_digest(val)]
        parts += [file_digest(self.tokenizer_dir(config, workdir)), budgets(config)]
        if config.data.too_long != "error" and kind is not Kind.PRETRAINING:
            parts.append(config.data.too_long)  # (not when it changes nothing: old datasets stay)
        return digest(*parts, 0.0 if val else config.data.heldout_fraction)

    def build(self, config: Config, workdir: Path, kind: Kind) -> Path:
        main, val = self._files(config, kind)
        tok = load_tokenizer(config, workdir)
        train, held = self.SPLIT_NAMES[kind]
        too_long = config.data.too_long
        if val:
            splits = {train: main, held: val}
            return write(config, workdir, kind, splits, tokenizer=tok, too_long=too_long)
        # Whole documents are held out: their pieces (``files.text_pieces``) are cut after.
        whole = {**budgets(config), "max_text_len": None}
        records = files.load_records(main, kind, tok, **whole, too_long=too_long)
        k = self._held_out(len(records), config.data.heldout_fraction)
        # A fixed permutation picks the held-out records, so a rebuild picks the same ones.
        held_idx = set(np.random.default_rng(0).permutation(len(records))[:k].tolist())
        splits = {
            train: [r for i, r in enumerate(records) if i not in held_idx],
            held: [r for i, r in enumerate(records) if i in held_idx],
        }
        if kind is Kind.PRETRAINING:
            splits = {s: files.text_pieces(rs, config.data.text_len) for s, rs in splits.items()}
        splits = {s: rs for s, rs in splits.items() if rs or s == train}
        return write(config, workdir, kind, splits, eos_id=tok.eos_token_id)

    def tokenizer_dir(self, config: Config, workdir: Path) -> Path:
        name = config.data.tokenizer or config.init_from
        if not name or not Path(name, "tokenizer_config.json").is_file():
            if name and not config.data.tokenizer:
                raise ConfigError(
                    f"init_from={name} has no tokenizer (no tokenizer_config.json): save the "
                    "model's tokenizer there, or give one with --config.data.tokenizer=<dir>"
                )
            raise ConfigError(
                f"data.tokenizer={config.data.tokenizer!r}: expected a local Hugging Face "
                "tokenizer directory (--config.data.tokenizer=<dir>; it defaults to init_from)"
            )
        return Path(name)


register("files", FileSource())
