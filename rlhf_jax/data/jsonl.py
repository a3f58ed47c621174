"""Import of user JSONL files into token-id records, tokenised here so length budgets fail early.

One JSON object per line (blank lines are skipped, extra keys ignored):

- demonstrations: ``{"prompt": str, "response": str}``
- comparisons: ``{"prompt": str, "responses": [str, ...], "ranks": [int, ...]}`` (0 = best)
- prompts: ``{"prompt": str}``
- pretraining: ``{"text": str}``

Prompt and each response are encoded separately with ``add_special_tokens=False`` (so the response
always starts at its own token boundary, which is where the PPO rollout starts sampling), and EOS
is appended to every response unless it already ends with it. Pretraining text gets no EOS: it is
a document, not a turn the model must learn to end. Every error is a `DataError` whose message is
``file:line: field 'name': what was expected, what was found``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from rlhf_jax.data.records import FIELDS, Budgets, DataError, Kind, as_kind, validate_record
from rlhf_jax.errors import ConfigError


@runtime_checkable
class Tokenizer(Protocol):
    """What import needs of a tokenizer: the HF ``encode`` and ``eos_token_id``."""

    eos_token_id: Any

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def _json_type(value: Any) -> str:
    names = {str: "string", bool: "boolean", int: "number", float: "number"}
    names.update({list: "array", dict: "object", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(where, field, f"expected a string, got {_json_type(value)}")
    if not value.strip():
        raise DataError(where, field, "expected a non-empty string, got an empty one")
    return value


def encode_object(
    kind: Kind | str, obj: Any, tokenizer: Tokenizer, where: str, budgets: Budgets | None = None
) -> dict[str, Any]:
    """Checks one parsed JSON object, tokenises it and returns the validated record."""
    kind = as_kind(kind)
    if not isinstance(obj, dict):
        raise DataError(where, None, f"expected a JSON object, got {_json_type(obj)}")
    for field in FIELDS[kind]:
        if field not in obj:
            raise DataError(where, field, "missing")
    eos = tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def encode_response(text: str) -> list[int]:
        tokens = encode(text)
        return tokens if tokens and tokens[-1] == eos else [*tokens, eos]

    record: dict[str, Any] = {}
    if "prompt" in FIELDS[kind]:
        record["prompt"] = encode(_text(obj["prompt"], "prompt", where))
    if kind is Kind.DEMONSTRATIONS:
        record["response"] = encode_response(_text(obj["response"], "response", where))
    elif kind is Kind.COMPARISONS:
        responses = obj["responses"]
        if not isinstance(responses, list):
            raise DataError(
                where, "responses", f"expected an array of strings, got {_json_type(responses)}"
            )
        record["responses"] = [
            encode_response(_text(r, f"responses[{i}]", where)) for i, r in enumerate(responses)
        ]
        record["ranks"] = obj["ranks"]  # checked (one int >= 0 per response) by validate_record
    elif kind is Kind.PRETRAINING:
        record["text"] = encode(_text(obj["text"], "text", where))
    return validate_record(kind, record, where, budgets, eos_id=eos)


def read_jsonl(
    path: str | os.PathLike,
    kind: Kind | str,
    tokenizer: Tokenizer,
    *,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    max_text_len: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yields the validated token records of a JSONL file, one per non-blank line.

    Budgets are in tokens: P ``max_prompt_len``, R ``max_response_len`` (EOS included), T
    ``max_text_len``; a record over budget is an error, never silently truncated.
    """
    kind = as_kind(kind)
    if not isinstance(tokenizer.eos_token_id, int):
        raise ConfigError(
            f"the tokenizer has no EOS token id (eos_token_id={tokenizer.eos_token_id})"
        )
    budgets = Budgets(max_prompt_len, max_response_len, max_text_len)
    name = os.fspath(path)
    count = 0
    # Lines are read as bytes so that a bad UTF-8 sequence is reported with its line number.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(where, None, f"not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(where, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
            count += 1
            yield encode_object(kind, obj, tokenizer, where, budgets)
    if count == 0:
        raise DataError(name, None, "no records (the file has no non-blank lines)")


def load_jsonl(
    path: str | os.PathLike,
    kind: Kind | str,
    tokenizer: Tokenizer,
    *,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    max_text_len: int | None = None,
) -> list[dict[str, Any]]:
    """All records of a JSONL file as a list (`read_jsonl`, eagerly)."""
    return list(
        read_jsonl(
            path,
            kind,
            tokenizer,
            max_prompt_len=max_prompt_len,
            max_response_len=max_response_len,
            max_text_len=max_text_len,
        )
    )
