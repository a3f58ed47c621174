"""The preference-data formats of the field, read into the text records of our four kinds.

Each row (a JSON object of a JSONL line, or a Parquet row) is recognised by its keys:

- demonstrations: ``{"prompt", "response"}``, or ``{"messages": [{"role", "content"}, ...]}``
  whose last message is the assistant's response;
- comparisons: ``{"prompt", "responses", "ranks"}`` (K-wise, rank 0 = best, equal ranks = tie;
  InstructGPT), ``{"prompt", "chosen", "rejected"}`` (pairwise, as in TL;DR), ``{"chosen",
  "rejected"}`` HH-RLHF transcripts (the prompt is their shared prefix through the last
  ``"\\n\\nAssistant:"``), or ``{"chosen", "rejected"}`` message lists (the prompt is their shared
  messages);
- prompts: ``{"prompt"}`` or ``{"messages"}`` (the conversation so far);
- pretraining: ``{"text"}``.

Chat messages are rendered with the tokenizer's chat template when it has one (the prompt with
the generation prompt appended, the response as what the template adds after it), and otherwise in
the HH-RLHF transcript form, ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, so that transcripts and
messages read alike. The result is ``{"prompt": str, "response": str}``, ``{"prompt": str,
"responses": [str, ...], "ranks": [int, ...]}``, ``{"prompt": str}`` or ``{"text": str}``; every
error is a ``DataError`` naming the row and the field.
"""

from __future__ import annotations

import difflib
from typing import Any

from rlhf_jax.data.records import DataError, Kind

ASSISTANT = "\n\nAssistant:"
ROLES = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}
FORMATS: dict[Kind, str] = {
    Kind.DEMONSTRATIONS: '{"prompt", "response"} or {"messages"}',
    Kind.COMPARISONS: '{"prompt", "responses", "ranks"}, {"prompt", "chosen", "rejected"} or '
    '{"chosen", "rejected"}',
    Kind.PROMPTS: '{"prompt"} or {"messages"}',
    Kind.PRETRAINING: '{"text"}',
}


def json_type(value: Any) -> str:
    names = {str: "string", bool: "boolean", int: "number", float: "number"}
    names.update({list: "array", dict: "object", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def text(value: Any, field: str, where: str) -> str:
    """A non-empty string, or a ``DataError`` naming ``field``."""
    if not isinstance(value, str):
        raise DataError(where, field, f"expected a string, got {json_type(value)}")
    if not value.strip():
        raise DataError(where, field, "expected a non-empty string, got an empty one")
    return value


def _messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(where, field, f"expected a non-empty array of messages, got {value!r}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(where, f"{field}[{i}]", 'expected {"role": ..., "content": ...}')
        role = text(m["role"], f"{field}[{i}].role", where)
        if role not in ROLES:
            raise DataError(where, f"{field}[{i}].role", f"expected one of {sorted(ROLES)}")
        out.append({"role": role, "content": text(m["content"], f"{field}[{i}].content", where)})
    return out


def render_prompt(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The conversation so far, ending where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = "".join(f"\n\n{ROLES[m['role']]}: {m['content']}" for m in messages)
    return turns + ASSISTANT


def _render_reply(history: list[dict[str, str]], reply: dict, tokenizer: Any, prompt: str) -> str:
    """What the chat rendering adds after ``prompt`` for ``reply`` (its end-of-turn marks
    included), or the reply's content when the template does not extend the prompt."""
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template([*history, reply], tokenize=False)
        if full.startswith(prompt) and full[len(prompt) :].strip():
            return full[len(prompt) :].rstrip()
        return reply["content"]
    return " " + reply["content"]


def _split_chat(messages: list[dict[str, str]], field: str, where: str) -> tuple[list[dict], dict]:
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise DataError(where, field, "expected the conversation to end with an assistant message")
    return messages[:-1], messages[-1]


def _hh_prompt(chosen: str, rejected: str, where: str) -> str:
    """The shared prefix of two HH-RLHF transcripts, through its last ``Assistant:`` turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)  # the marker must lie inside the shared prefix
    if cut < 0:
        raise DataError(
            where,
            "chosen",
            "expected HH-RLHF transcripts that share their turns up to a final "
            "'\\n\\nAssistant:' (or give an explicit \"prompt\")",
        )
    return chosen[: cut + len(ASSISTANT)]


def _missing(obj: dict, field: str, where: str, expected: str) -> DataError:
    """A missing field's error; a key of the record that looks like it is named as a likely typo."""
    near = difflib.get_close_matches(field, [k for k in obj if isinstance(k, str)], n=1, cutoff=0.7)
    typo = f" (the record has {near[0]!r}: a typo?)" if near else ""
    return DataError(where, field, f"missing{typo}; {expected}")


def _comparison(obj: dict, tokenizer: Any, where: str) -> dict[str, Any]:
    if "responses" in obj:
        for field in ("prompt", "ranks"):
            if field not in obj:
                raise _missing(obj, field, where, "K-wise comparisons need prompt, ranks")
        responses = obj["responses"]
        if not isinstance(responses, list):
            raise DataError(
                where, "responses", f"expected an array of strings, got {json_type(responses)}"
            )
        return {
            "prompt": text(obj["prompt"], "prompt", where),
            "responses": [text(r, f"responses[{i}]", where) for i, r in enumerate(responses)],
            "ranks": obj["ranks"],  # checked (one int >= 0 per response) by validate_record
        }
    if "chosen" not in obj or "rejected" not in obj:
        missing = "chosen" if "chosen" not in obj else "rejected"
        raise _missing(obj, missing, where, f"expected {FORMATS[Kind.COMPARISONS]}")
    chosen, rejected = obj["chosen"], obj["rejected"]
    if isinstance(chosen, list) or isinstance(rejected, list):
        good = _messages(chosen, "chosen", where)
        bad = _messages(rejected, "rejected", where)
        history, good_reply = _split_chat(good, "chosen", where)
        bad_history, bad_reply = _split_chat(bad, "rejected", where)
        if bad_history != history:
            raise DataError(where, "rejected", "expected the same conversation as 'chosen' up to "
                            "the last assistant message")  # fmt: skip
        prompt = render_prompt(history, tokenizer)
        replies = [_render_reply(history, r, tokenizer, prompt) for r in (good_reply, bad_reply)]
        return {"prompt": prompt, "responses": replies, "ranks": [0, 1]}
    chosen, rejected = text(chosen, "chosen", where), text(rejected, "rejected", where)
    if "prompt" in obj:  # pairwise with an explicit prompt
        return {"prompt": text(obj["prompt"], "prompt", where), "responses": [chosen, rejected],
                "ranks": [0, 1]}  # fmt: skip
    prompt = _hh_prompt(chosen, rejected, where)
    replies = [chosen[len(prompt) :], rejected[len(prompt) :]]
    for field, reply in zip(("chosen", "rejected"), replies):
        if not reply.strip():
            raise DataError(where, field, "the transcript has no answer after the shared prompt")
    return {"prompt": prompt, "responses": replies, "ranks": [0, 1]}


def to_text_record(kind: Kind, obj: Any, tokenizer: Any, where: str) -> dict[str, Any]:
    """The text record of one row of ``kind`` in any of the formats above."""
    if not isinstance(obj, dict):
        raise DataError(where, None, f"expected a JSON object, got {json_type(obj)}")
    if kind is Kind.COMPARISONS:
        return _comparison(obj, tokenizer, where)
    if kind is Kind.PRETRAINING:
        if "text" not in obj:
            raise _missing(obj, "text", where, f"expected {FORMATS[kind]}")
        return {"text": text(obj["text"], "text", where)}
    if "messages" in obj and "prompt" not in obj:
        messages = _messages(obj["messages"], "messages", where)
        if kind is Kind.PROMPTS:
            return {"prompt": render_prompt(messages, tokenizer)}
        history, reply = _split_chat(messages, "messages", where)
        prompt = render_prompt(history, tokenizer)
        return {"prompt": prompt, "response": _render_reply(history, reply, tokenizer, prompt)}
    fields = ("prompt",) if kind is Kind.PROMPTS else ("prompt", "response")
    for field in fields:
        if field not in obj:
            raise _missing(obj, field, where, f"expected {FORMATS[kind]}")
    return {field: text(obj[field], field, where) for field in fields}
