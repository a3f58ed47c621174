"""Data sources: which dataset each stage reads, and building it the first time it is read.

A stage asks for a *use* (``"sft"``, ``"rm_val"``, ``"pretrain"``, ... in ``SPLITS``), which is one
split of one record kind. The datasets live under ``<workdir>/data/`` as tfds ``array_record``
datasets named after the source (``builders.dataset_path(kind, source, data_dir)``), with the
tokenizer they were made with. A dataset that is missing is built by the source named in
``config.data.source``:

- ``jsonl`` (here): the user's JSONL files ``data.demonstrations``, ``data.comparisons``,
  ``data.prompts`` and ``data.pretraining``, tokenised with ``data.tokenizer``;
- other sources register themselves with ``register``; the built-in InstructLang world does so
  when ``rlhf_jax.instructlang`` is imported (the CLI imports it), exactly as a user's own
  generator of records could.

Datasets are built on process 0 only; build them before a multi-process run, or give every process
the same shared ``<workdir>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import jax

from rlhf_jax.config import Config
from rlhf_jax.data import builders
from rlhf_jax.data.records import Kind
from rlhf_jax.errors import ConfigError

# (kind, split) read by each use.
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


@runtime_checkable
class Source(Protocol):
    """What a data source provides: the datasets of each record kind, and their tokenizer."""

    def build(self, config: Config, workdir: Path, kind: Kind) -> Path:
        """Write the dataset of ``kind`` (every split the source has) and return its path,
        ``builders.dataset_path(kind, config.data.source, data_dir(workdir))``."""
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
    return Path(workdir) / "data"


def dataset(config: Config, workdir: str | os.PathLike, use: str) -> tuple[Path, str]:
    """(dataset path, split) of one use of ``SPLITS``, building it first if it is missing."""
    kind, split = SPLITS[use]
    path = builders.dataset_path(kind, config.data.source, data_dir(workdir))
    if not path.exists() and jax.process_index() == 0:
        get(config).build(config, Path(workdir), kind)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} is missing (data.source={config.data.source!r})")
    return path, split


def split_size(config: Config, workdir: str | os.PathLike, use: str) -> int:
    """The number of records of one use."""
    path, split = dataset(config, workdir, use)
    return int(builders.read_metadata(path)["splits"][split])


def tokenizer_dir(config: Config, workdir: str | os.PathLike) -> Path:
    return get(config).tokenizer_dir(config, Path(workdir))


def special_ids(config: Config, workdir: str | os.PathLike) -> tuple[int, int]:
    """(EOS, PAD) token ids of the data's tokenizer (PAD defaults to 0 when it has none)."""
    from rlhf_jax.hf import load_tokenizer

    tok = load_tokenizer(tokenizer_dir(config, workdir))
    return int(tok.eos_token_id), int(tok.pad_token_id or 0)


def budgets(config: Config) -> dict[str, int]:
    """The length budgets every imported record must fit: P, R (EOS included), T."""
    d = config.data
    return dict(
        max_prompt_len=d.prompt_len, max_response_len=d.response_len, max_text_len=d.text_len
    )


class JsonlSource:
    """The user's JSONL files, one per record kind (``rlhf_jax.data.jsonl`` has the formats)."""

    def build(self, config: Config, workdir: Path, kind: Kind) -> Path:
        from rlhf_jax.hf import load_tokenizer

        path = getattr(config.data, kind.value)
        if not path:
            raise ConfigError(
                f"data.{kind.value} is not set: give a JSONL file of {kind.value} records "
                f"(--config.data.{kind.value}=<file>)"
            )
        split = next(s for k, s in SPLITS.values() if k == kind)
        tok = load_tokenizer(self.tokenizer_dir(config, workdir))
        return builders.build_dataset(
            kind, "jsonl", data_dir(workdir), {split: path}, tokenizer=tok, **budgets(config)
        )

    def tokenizer_dir(self, config: Config, workdir: Path) -> Path:
        path = Path(config.data.tokenizer)
        if not config.data.tokenizer or not path.is_dir():
            raise ConfigError(
                f"data.tokenizer={config.data.tokenizer!r}: expected a local Hugging Face "
                "tokenizer directory (--config.data.tokenizer=<dir>)"
            )
        return path


register("jsonl", JsonlSource())
