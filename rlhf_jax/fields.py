"""Config fields: each with its one-line meaning and its checks; validation, help and overrides.

Every config dataclass declares its fields with ``field(default, doc, **checks)``. From those
declarations alone come what ``rlhf-jax <command> --help`` prints (``field_docs``), what
``validate`` enforces (bounds and allowed values per field, plus each class's own ``problems()``
for checks that tie fields together), and how ``--config.<dotted.path>=<value>`` is parsed
(``apply_overrides``, by each field's annotated type, suggesting the closest valid paths for a
typo), so the help, the checks and the parsing cannot drift from the dataclasses. Errors are
``ConfigError``s naming the field.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import operator
import typing
from collections.abc import Iterator
from typing import Any

from rlhf_jax.errors import ConfigError


def field(default: Any, doc: str, **checks: Any) -> Any:
    """A config field: its default, its one-line meaning, and what ``validate`` checks.

    ``checks``: ``ge``/``gt``/``le``/``lt`` (numeric bounds) and ``choices`` (allowed values). A
    dataclass default is copied per instance (``default_factory``).
    """
    unknown = set(checks) - {"ge", "gt", "le", "lt", "choices"}
    if unknown:
        raise TypeError(f"unknown field checks {sorted(unknown)}")
    metadata = {"doc": doc, "checks": checks}
    if dataclasses.is_dataclass(default):
        return dataclasses.field(
            default_factory=lambda: dataclasses.replace(default), metadata=metadata
        )
    return dataclasses.field(default=default, metadata=metadata)


def _fields(config: Any) -> Iterator[tuple[dataclasses.Field, Any]]:
    for f in dataclasses.fields(config):
        yield f, getattr(config, f.name)


def field_docs(config: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted path, value, one-line meaning)`` of every leaf field, depth first."""
    out = []
    for f, value in _fields(config):
        path = prefix + f.name
        if dataclasses.is_dataclass(value):
            out += field_docs(value, path + ".")
        else:
            out.append((path, value, f.metadata.get("doc", "")))
    return out


def _expected(kind: type | None, checks: dict) -> str:
    noun = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        kind, "a value"
    )
    if "choices" in checks:
        return "one of " + ", ".join(repr(c) for c in checks["choices"])
    bounds = [f"{s} {checks[k]}" for k, s in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if k in checks]  # fmt: skip
    return noun + (" " + " and ".join(bounds) if bounds else "")


def _field_problem(value: Any, kind: type | None, checks: dict) -> bool:
    if kind is bool:
        return not isinstance(value, bool)
    if kind in (int, float):
        ok_type = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok_type or (kind is int and not isinstance(value, int)):
            return True
    elif kind is str and not isinstance(value, str):
        return True
    if "choices" in checks and value not in checks["choices"]:
        return True
    bounds = {"ge": lambda a, b: a >= b, "gt": lambda a, b: a > b, "le": lambda a, b: a <= b,
              "lt": lambda a, b: a < b}  # fmt: skip
    return any(not test(value, checks[k]) for k, test in bounds.items() if k in checks)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _simple_type(hint: Any) -> type | None:
    return hint if hint in (int, float, str, bool) else None


def problems(config: Any, prefix: str = "") -> list[str]:
    """Every problem of ``config`` as ``"<path>=<value>: <what is wrong>"`` (empty: valid)."""
    out: list[str] = []
    hints = _hints(type(config))
    for f, value in _fields(config):
        path = prefix + f.name
        if dataclasses.is_dataclass(value):
            out += problems(value, path + ".")
            continue
        checks = f.metadata.get("checks", {})
        kind = _simple_type(hints.get(f.name))
        if _field_problem(value, kind, checks):
            out.append(f"{path}={value!r}: expected {_expected(kind, checks)}")
    if not out and hasattr(config, "problems"):
        for name, message in config.problems():
            value = operator.attrgetter(name)(config)  # a name may be dotted: "data.text_len"
            out.append(f"{prefix}{name}={value!r}: {message}")
    return out


def validate(config: Any, prefix: str = "") -> Any:
    """``config`` itself when every field is valid, else ``ConfigError`` naming each bad field."""
    found = problems(config, prefix + "." if prefix else "")
    if found:
        raise ConfigError("invalid config: " + "; ".join(found))
    return config


def _parse(text: str, hint: Any, path: str) -> Any:
    """The value of an override string for a field annotated ``hint``."""
    kind = _simple_type(hint)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(
            kind, "a literal"
        )
        raise ConfigError(f"--config.{path}={text}: expected {expected}") from None


def leaf_paths(config: Any) -> list[str]:
    """Every overridable dotted path of ``config``."""
    return [path for path, _, _ in field_docs(config)]


def apply_overrides(config: Any, overrides: dict[str, str] | list[tuple[str, str]]) -> Any:
    """A copy of ``config`` with ``{"ppo.kl_coef": "0.05", ...}`` applied (strings parsed by each
    field's type). An unknown path raises ``ConfigError`` suggesting the closest valid paths."""
    items = overrides.items() if isinstance(overrides, dict) else overrides
    for path, text in items:
        paths = leaf_paths(config)
        if path not in paths:
            section = [p for p in paths if p.startswith(path + ".")]
            if section:
                raise ConfigError(
                    f"--config.{path} is a section; set one of its fields, e.g. {section[0]}"
                )
            close = difflib.get_close_matches(path, paths, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(
                f"--config.{path}: no such config field{hint} "
                "(`rlhf-jax <command> --help` lists them)"
            )
        config = _replace_at(config, path.split("."), text, path)
    return config


def _replace_at(config: Any, parts: list[str], text: str, path: str) -> Any:
    owner = get_value(config, ".".join(parts[:-1]))
    return with_values(config, {path: _parse(text, _hints(type(owner))[parts[-1]], path)})


def get_value(config: Any, path: str) -> Any:
    """The value at a dotted ``path`` of a nested config (``config`` itself for ``""``)."""
    for part in path.split(".") if path else ():
        config = getattr(config, part)
    return config


def with_values(config: Any, values: dict[str, Any] | Any) -> Any:
    """A copy of the nested dataclass ``config`` with ``{"ppo.ptx_coef": 0.0, ...}`` set (values
    as they are, unparsed and unchecked)."""
    for path, value in dict(values).items():
        head, _, rest = path.partition(".")
        inner = with_values(getattr(config, head), {rest: value}) if rest else value
        config = dataclasses.replace(config, **{head: inner})
    return config
