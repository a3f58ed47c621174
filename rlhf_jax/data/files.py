"""Import of the user's files (JSONL or Parquet) into token-id records, tokenised here so that
length budgets fail early, with the file, line and field of every problem.

A ``.jsonl`` file holds one JSON object per line (blank lines are skipped); a ``.parquet`` file
one record per row. Records are in any of the formats of ``rlhf_jax.data.formats`` (extra keys are
ignored). Prompt and each response are encoded separately with ``add_special_tokens=False`` (so
the response always starts at its own token boundary, which is where the PPO rollout starts
sampling), and EOS is appended to every response unless it already ends with it. Pretraining text
gets no EOS: it is a document, not a turn the model must learn to end. Every error is a
``DataError`` whose message is ``file:line: field 'name': what was expected, what was found``
(``file:row N`` for Parquet).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rlhf_jax.data.formats import to_text_record
from rlhf_jax.data.records import Budgets, DataError, Kind, as_kind, validate_record
from rlhf_jax.errors import ConfigError

SUFFIXES = (".jsonl", ".parquet")


@runtime_checkable
class Tokenizer(Protocol):
    """What import needs of a tokenizer: the HF ``encode`` and ``eos_token_id`` (and, for chat
    messages, ``apply_chat_template`` when it has a ``chat_template``)."""

    eos_token_id: Any

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def encode_object(
    kind: Kind | str, obj: Any, tokenizer: Tokenizer, where: str, budgets: Budgets | None = None
) -> dict[str, Any]:
    """Checks one parsed row, tokenises it and returns the validated token record."""
    kind = as_kind(kind)
    record = to_text_record(kind, obj, tokenizer, where)
    eos = tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def encode_response(text: str) -> list[int]:
        tokens = encode(text)
        return tokens if tokens and tokens[-1] == eos else [*tokens, eos]

    out: dict[str, Any] = {}
    if "prompt" in record:
        out["prompt"] = encode(record["prompt"])
    if kind is Kind.DEMONSTRATIONS:
        out["response"] = encode_response(record["response"])
    elif kind is Kind.COMPARISONS:
        out["responses"] = [encode_response(r) for r in record["responses"]]
        out["ranks"] = record["ranks"]
    elif kind is Kind.PRETRAINING:
        out["text"] = encode(record["text"])
    return validate_record(kind, out, where, budgets, eos_id=eos)


def _suffix(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            os.fspath(path), None, f"expected a {' or '.join(SUFFIXES)} file, got {suffix!r}"
        )
    return suffix


def rows(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every record of a JSONL or Parquet file, ``where`` = ``file:line``."""
    name, suffix = os.fspath(path), _suffix(path)
    if not os.path.isfile(name):
        raise DataError(name, None, "no such file")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(name).to_pylist(), start=1):
            yield f"{name}:row {i}", row
        return
    # Lines are read as bytes so that a bad UTF-8 sequence is reported with its line number.
    with open(name, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(where, None, f"not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(where, None, f"invalid JSON: {e.msg} (column {e.colno})") from None


def count_rows(path: str | os.PathLike) -> int:
    """How many records a file holds, without parsing them (non-blank lines, Parquet rows)."""
    name, suffix = os.fspath(path), _suffix(path)
    if not os.path.isfile(name):
        raise DataError(name, None, "no such file")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(name).metadata.num_rows
    with open(name, "rb") as f:
        return sum(1 for line in f if line.strip())


def read_records(
    path: str | os.PathLike,
    kind: Kind | str,
    tokenizer: Tokenizer,
    *,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    max_text_len: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yields the validated token records of a JSONL or Parquet file.

    Budgets are in tokens: P ``max_prompt_len``, R ``max_response_len`` (EOS included), T
    ``max_text_len``; a record over budget is an error, never silently truncated.
    """
    kind = as_kind(kind)
    if not isinstance(tokenizer.eos_token_id, int):
        raise ConfigError(
            f"the tokenizer has no EOS token id (eos_token_id={tokenizer.eos_token_id})"
        )
    budgets = Budgets(max_prompt_len, max_response_len, max_text_len)
    count = 0
    for where, obj in rows(path):
        count += 1
        yield encode_object(kind, obj, tokenizer, where, budgets)
    if count == 0:
        raise DataError(os.fspath(path), None, "no records (the file has no non-blank lines)")


def load_records(path: str | os.PathLike, kind: Kind | str, tokenizer: Tokenizer, **budgets):
    """All records of a file as a list (``read_records``, eagerly)."""
    return list(read_records(path, kind, tokenizer, **budgets))
