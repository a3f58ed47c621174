"""The four record kinds (demonstrations, comparisons, prompts, pretraining text) and their checks.

A record is a dict of token-id sequences. In memory (what the built-in world generates and what
`files.read_records` yields) the kinds are:

- demonstrations: ``{"prompt": int[], "response": int[]}``
- comparisons: ``{"prompt": int[], "responses": [int[], ...] (K >= 2), "ranks": int[K]}``
  (rank 0 = best; equal ranks = tie; at least two distinct ranks)
- prompts: ``{"prompt": int[]}``
- pretraining: ``{"text": int[]}``

Responses are stored with their EOS token (file import appends it); `validate_record` checks that
when given ``eos_id``. Every check raises `DataError`, naming where the record came from and the
field, so a bad line of a user file is found without reading the code.

Storage form: tfds features cannot hold nested ragged sequences without TensorFlow, so comparisons
are stored flattened, ``responses`` concatenated plus ``response_lengths`` [K]
(`to_storage` / `from_storage`). The other kinds are stored as they are.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.errors import UserError

_INT32_MAX = np.iinfo(np.int32).max


class Kind(str, enum.Enum):
    """A record kind; the value is the name used in configs, metadata and builder names."""

    DEMONSTRATIONS = "demonstrations"
    COMPARISONS = "comparisons"
    PROMPTS = "prompts"
    PRETRAINING = "pretraining"


# Fields of the in-memory form, in the order they are checked.
FIELDS: dict[Kind, tuple[str, ...]] = {
    Kind.DEMONSTRATIONS: ("prompt", "response"),
    Kind.COMPARISONS: ("prompt", "responses", "ranks"),
    Kind.PROMPTS: ("prompt",),
    Kind.PRETRAINING: ("text",),
}


class DataError(UserError, ValueError):
    """Malformed input data; the message starts with where (``file:line``) and the field."""

    def __init__(self, where: str, field: str | None, message: str) -> None:
        prefix = f"{where}: field '{field}': " if field is not None else f"{where}: "
        super().__init__(prefix + message)
        self.where = where
        self.field = field


@dataclasses.dataclass(frozen=True)
class Budgets:
    """Length budgets in tokens (None = unlimited): P prompt, R response (EOS included), T text."""

    max_prompt_len: int | None = None
    max_response_len: int | None = None
    max_text_len: int | None = None


def as_kind(kind: Kind | str) -> Kind:
    """`Kind` from its value, with the valid values in the error."""
    try:
        return Kind(kind)
    except ValueError:
        valid = ", ".join(k.value for k in Kind)
        raise ValueError(f"unknown record kind {kind!r}; expected one of: {valid}") from None


def _is_int(x: Any) -> bool:
    # bool is an int subclass, but True as a rank or token id is a data bug, not a 1.
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


class TooLong(DataError):
    """A sequence over its length budget (``data.too_long`` decides: an error, or the record is
    skipped)."""

    def __init__(self, where: str, field: str, length: int, budget: int, budget_name: str) -> None:
        self.detail = f"{length} tokens, over {budget_name}={budget}"
        super().__init__(where, field, self.detail)
        self.length, self.budget, self.budget_name = length, budget, budget_name


def check_tokens(
    value: Any,
    where: str,
    field: str,
    *,
    budget: int | None = None,
    budget_name: str = "",
) -> np.ndarray:
    """A non-empty 1-D sequence of int32 token ids (0 <= id < 2**31), within ``budget`` tokens."""
    if isinstance(value, np.ndarray):
        ok = value.ndim == 1 and (value.dtype.kind in "iu" or value.size == 0)
    else:
        ok = isinstance(value, Sequence) and not isinstance(value, str)
        ok = ok and all(_is_int(t) for t in value)
    if not ok:
        raise DataError(
            where, field, f"expected a 1-D sequence of integer token ids, got {value!r}"
        )
    try:
        tokens = np.asarray(value, dtype=np.int64).reshape(-1)
    except OverflowError:
        raise DataError(where, field, f"token ids must be in [0, 2**31), got {value!r}") from None
    if tokens.size == 0:
        raise DataError(where, field, "expected at least one token, got an empty sequence")
    if tokens.min() < 0 or tokens.max() > _INT32_MAX:
        raise DataError(where, field, f"token ids must be in [0, 2**31), got {tokens.tolist()}")
    if budget is not None and tokens.size > budget:
        raise TooLong(where, field, int(tokens.size), budget, budget_name)
    return tokens.astype(np.int32)


def check_ranks(value: Any, num_responses: int, where: str) -> np.ndarray:
    """K non-negative integer ranks (0 = best) with at least two distinct values."""
    expected = f"expected {num_responses} integers (one per response)"
    if isinstance(value, np.ndarray):
        ok = value.ndim == 1 and value.dtype.kind in "iu"
    else:
        ok = isinstance(value, Sequence) and not isinstance(value, str)
        ok = ok and all(_is_int(r) for r in value)
    if not ok:
        raise DataError(where, "ranks", f"{expected}, got {value!r}")
    if len(value) != num_responses:
        raise DataError(where, "ranks", f"{expected}, got {len(value)}")
    try:
        ranks = np.asarray(value, dtype=np.int64)
    except OverflowError:
        raise DataError(where, "ranks", f"ranks must be below 2**31, got {value!r}") from None
    if ranks.min() < 0 or ranks.max() > _INT32_MAX:
        raise DataError(where, "ranks", f"ranks must be non-negative (0 = best), got {value!r}")
    # All-equal ranks give no ordered pair, so the record would add nothing but a 0/0 to the loss.
    if np.unique(ranks).size < 2:
        raise DataError(where, "ranks", f"expected at least two distinct ranks, got {value!r}")
    return ranks.astype(np.int32)


def _check_response(
    value: Any, where: str, field: str, budgets: Budgets, eos_id: int | None
) -> np.ndarray:
    tokens = check_tokens(
        value, where, field, budget=budgets.max_response_len, budget_name="data.response_len"
    )
    if eos_id is not None and tokens[-1] != eos_id:
        raise DataError(where, field, f"expected the last token to be EOS ({eos_id})")
    return tokens


def validate_record(
    kind: Kind | str,
    record: Mapping[str, Any],
    where: str,
    budgets: Budgets | None = None,
    *,
    eos_id: int | None = None,
) -> dict[str, Any]:
    """Checks one in-memory record and returns it normalised (int32 arrays).

    ``where`` names the record in errors (``"data/train.jsonl:17"``, ``"split 'train' record 3"``).
    Extra fields are ignored. Comparisons come back with ``responses`` as a list of arrays.
    """
    kind = as_kind(kind)
    budgets = budgets or Budgets()
    if not isinstance(record, Mapping):
        raise DataError(where, None, f"expected a record (mapping), got {type(record).__name__}")
    for field in FIELDS[kind]:
        if field not in record:
            raise DataError(where, field, "missing")
    out: dict[str, Any] = {}
    if kind in (Kind.DEMONSTRATIONS, Kind.COMPARISONS, Kind.PROMPTS):
        out["prompt"] = check_tokens(
            record["prompt"],
            where,
            "prompt",
            budget=budgets.max_prompt_len,
            budget_name="data.prompt_len",
        )
    if kind is Kind.DEMONSTRATIONS:
        out["response"] = _check_response(record["response"], where, "response", budgets, eos_id)
    elif kind is Kind.COMPARISONS:
        responses = record["responses"]
        if not isinstance(responses, Sequence) or isinstance(responses, str):
            raise DataError(where, "responses", f"expected a list of responses, got {responses!r}")
        if len(responses) < 2:
            raise DataError(where, "responses", f"expected K >= 2 responses, got {len(responses)}")
        out["responses"] = [
            _check_response(r, where, f"responses[{i}]", budgets, eos_id)
            for i, r in enumerate(responses)
        ]
        out["ranks"] = check_ranks(record["ranks"], len(responses), where)
    elif kind is Kind.PRETRAINING:
        out["text"] = check_tokens(
            record["text"], where, "text", budget=budgets.max_text_len, budget_name="data.text_len"
        )
    return out


def to_storage(kind: Kind | str, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The tfds feature dict of a validated record (comparisons flattened)."""
    if as_kind(kind) is not Kind.COMPARISONS:
        return {k: np.asarray(v, dtype=np.int32) for k, v in record.items()}
    responses = record["responses"]
    return {
        "prompt": np.asarray(record["prompt"], dtype=np.int32),
        "responses": np.concatenate([np.asarray(r, dtype=np.int32) for r in responses]),
        "response_lengths": np.asarray([len(r) for r in responses], dtype=np.int32),
        "ranks": np.asarray(record["ranks"], dtype=np.int32),
    }


def from_storage(kind: Kind | str, stored: Mapping[str, Any]) -> dict[str, Any]:
    """The in-memory record of a stored one (comparisons reassembled); int32 arrays."""
    # Some read paths hand back float64 or Python lists, so every field is cast explicitly.
    out = {k: np.asarray(v, dtype=np.int32) for k, v in stored.items()}
    if as_kind(kind) is not Kind.COMPARISONS:
        return out
    lengths = out.pop("response_lengths")
    out["responses"] = np.split(out["responses"], np.cumsum(lengths)[:-1])
    return out
