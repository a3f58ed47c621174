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

Length budgets (``data.prompt_len``, ``data.response_len``, ``data.text_len``) are never met by
silent truncation. A pretraining document longer than ``text_len`` becomes consecutive pieces of
at most ``text_len`` tokens. A prompt or response over its budget is an error naming the first
such record, with how many there are and the longest (so one run says what budget the file
needs), unless ``too_long="drop"`` skips them (counted in the log).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pyarrow.parquet as pq

from rlhf_jax.config import TOO_LONG
from rlhf_jax.data.formats import to_text_record
from rlhf_jax.data.records import Budgets, DataError, Kind, TooLong, as_kind, validate_record
from rlhf_jax.errors import ConfigError

log = logging.getLogger("rlhf_jax")
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

    # An HF tokenizer warns of text longer than its model_max_length; budgets are checked here (and
    # pretraining text split) instead, so its warning would only mislead.
    quiet = {"verbose": False} if hasattr(tokenizer, "model_max_length") else {}

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False, **quiet))

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


def text_pieces(records: list[dict[str, Any]], text_len: int | None) -> list[dict[str, Any]]:
    """Pretraining records with every text longer than ``text_len`` split into consecutive pieces
    of at most ``text_len`` tokens, each a sequence of its own (None: as they are)."""
    if text_len is None:
        return records
    return [
        {"text": r["text"][i : i + text_len]}
        for r in records
        for i in range(0, len(r["text"]), text_len)
    ]


def encode_records(
    kind: Kind, obj: Any, tokenizer: Tokenizer, where: str, budgets: Budgets
) -> list[dict[str, Any]]:
    """``encode_object``, except that a pretraining document over ``max_text_len`` comes back in
    pieces (``text_pieces``)."""
    if kind is not Kind.PRETRAINING:
        return [encode_object(kind, obj, tokenizer, where, budgets)]
    return text_pieces([encode_object(kind, obj, tokenizer, where)], budgets.max_text_len)


def _over_budget(kind: Kind, obj: Any, tokenizer: Tokenizer, where: str, budgets: Budgets):
    """``(budget name, length)`` of every field of a record that is over its budget."""
    record = encode_object(kind, obj, tokenizer, where)  # no budgets: every field's length
    lengths = [("data.prompt_len", budgets.max_prompt_len, len(record.get("prompt", ())))]
    responses = record.get("responses", [record["response"]] if "response" in record else [])
    longest = max((len(r) for r in responses), default=0)
    lengths.append(("data.response_len", budgets.max_response_len, longest))
    return [(f"{name}={b}", n) for name, b, n in lengths if b is not None and n > b]


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
    too_long: str = "error",
) -> Iterator[dict[str, Any]]:
    """Yields the validated token records of a JSONL or Parquet file.

    Budgets are in tokens: P ``max_prompt_len``, R ``max_response_len`` (EOS included), T
    ``max_text_len`` (longer pretraining text is split into pieces). A prompt or response over its
    budget is an error, raised once the whole file has been read so that it can say how many
    records are over and by how much, or with ``too_long="drop"`` the record is skipped.
    """
    kind = as_kind(kind)
    if too_long not in TOO_LONG:
        raise ConfigError(f"data.too_long={too_long!r}: expected one of {', '.join(TOO_LONG)}")
    if not isinstance(tokenizer.eos_token_id, int):
        raise ConfigError(
            f"the tokenizer has no EOS token id (eos_token_id={tokenizer.eos_token_id})"
        )
    budgets = Budgets(max_prompt_len, max_response_len, max_text_len)
    count, kept, first, over = 0, 0, None, {}  # over: "data.prompt_len=P" -> (records, longest)
    for where, obj in rows(path):
        count += 1
        try:
            records = encode_records(kind, obj, tokenizer, where, budgets)
        except TooLong as e:
            for name, length in _over_budget(kind, obj, tokenizer, where, budgets):
                n, longest = over.get(name, (0, 0))
                over[name] = (n + 1, max(longest, length))
            first = first or e
            continue
        if first is None or too_long == "drop":
            kept += 1
            yield from records
    if first is not None and too_long == "error":
        counts = "; ".join(f"{n} over {name} (longest {m})" for name, (n, m) in over.items())
        raise DataError(
            first.where,
            first.field,
            f"{first.detail}. In all {count} records: {counts}. Raise the budget "
            "(--config.data.prompt_len or response_len, in tokens), or skip such records with "
            "--config.data.too_long=drop",
        )
    if count and not kept and too_long == "drop":
        raise DataError(
            os.fspath(path), None, f"all {count} records are over the length budgets "
            "(data.too_long=drop skipped every one): raise data.prompt_len / data.response_len"
        )  # fmt: skip
    if first is not None:
        skipped = count - kept
        log.warning(
            "[data] %s: skipped %d of %d records over the length budgets", path, skipped, count
        )
    if count == 0:
        raise DataError(os.fspath(path), None, "no records (the file has no non-blank lines)")


def load_records(path: str | os.PathLike, kind: Kind | str, tokenizer: Tokenizer, **options):
    """All records of a file as a list (``read_records``, eagerly)."""
    return list(read_records(path, kind, tokenizer, **options))
