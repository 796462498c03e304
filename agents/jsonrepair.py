"""Getting JSON out of small language models.

A structured exchange between agents is only as good as the JSON a model writes, and a 135M
model writes it badly: inside code fences, between sentences of prose, with single quotes,
Python literals (``True``, ``None``), unquoted keys, trailing commas, missing commas, or cut off
mid-way by the token limit. ``extract_json`` recovers the value when the intent is unambiguous
and raises ``JSONRepairError`` otherwise; it never raises anything else, whatever the text (a
property test feeds it arbitrary text).

``ask_json`` is the loop around it: ask, extract, validate against a JSON Schema (Draft 2020-12),
and on failure ask again showing the model its own answer and the validation error, a bounded
number of times, then fail with ``AskJSONError`` (which carries the tokens spent, because a
failed attempt still costs tokens and the benchmarks count them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator

from confide.agents.constrained import GrammarDeadEnd
from confide.agents.model import ChatModel, Message, Usage, forward_chat, supports_schema

__all__ = [
    "AskJSONError",
    "JSONRepairError",
    "JSONReply",
    "ask_json",
    "ask_json_reply",
    "extract_json",
    "iter_json_candidates",
    "strictly_valid",
]

MAX_TEXT = 200_000        # longer model output is cut: nothing sensible is that long
MAX_STARTS = 32           # bracket positions tried per text
MAX_DEPTH = 128           # nesting beyond this is not an answer, it is noise

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_WORD = re.compile(r"[A-Za-z_$][\w$\-]*")
_KEYWORDS = {"true": "true", "false": "false", "null": "null", "True": "true",
             "False": "false", "None": "null"}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\",
            '"': '"', "'": "'"}
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}
_VALUE_END = "value"  # marker kind for tokens after which a comma is due


class JSONRepairError(ValueError):
    """The text holds no JSON value that can be recovered without guessing."""


class AskJSONError(JSONRepairError):
    """A model gave no schema-valid JSON within its attempts."""

    def __init__(self, message: str, *, usage: Usage, attempts: int, last_text: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.attempts = attempts
        self.last_text = last_text


# --------------------------------------------------------------------------------------------
# Extraction


def _read_string(s: str, i: int, quote: str) -> tuple[str, int]:
    """The string starting at ``s[i]`` (a quote), and the index after it; unterminated strings
    end at the end of the text (the model ran out of tokens)."""
    close = _QUOTES[quote]
    chars: list[str] = []
    i += 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n:
            nxt = s[i + 1]
            if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", s[i + 2:i + 6]):
                chars.append(chr(int(s[i + 2:i + 6], 16)))
                i += 6
                continue
            chars.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        if c == close:
            return "".join(chars), i + 1
        chars.append(c)
        i += 1
    return "".join(chars), n


def _next_nonspace(s: str, i: int) -> str:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return s[i] if i < len(s) else ""


def _trim(out: list[tuple[str, str]], closer: str) -> None:
    """Drop what cannot end a container: a trailing comma, a dangling ``key:`` or a lone key."""
    while out:
        kind, tok = out[-1]
        lone_key = (closer == "}" and kind == _VALUE_END and len(out) >= 2
                    and out[-2][1] in ("{", ","))
        if tok == "," or lone_key:
            out.pop()
        elif tok == ":":
            out.pop()
            if out and out[-1][0] == "key":
                out.pop()
        elif kind == "key":
            out.pop()
        else:
            return


def _repair(s: str, start: int) -> str | None:
    """Rewrite the value that opens at ``s[start]`` (``{`` or ``[``) as strict JSON text, or
    None when it cannot be read as one."""
    out: list[tuple[str, str]] = []  # (kind, token); kind "key" marks object keys
    stack: list[str] = []
    i, n = start, len(s)

    def emit_value(tok: str) -> None:
        if out and out[-1][0] == _VALUE_END:
            out.append(("sep", ","))  # a missing comma between two values
        out.append((_VALUE_END, tok))

    while i < n:
        c = s[i]
        if c in " \t\r\n":
            i += 1
        elif s.startswith("//", i):
            j = s.find("\n", i)
            i = n if j < 0 else j
        elif s.startswith("/*", i):
            j = s.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c in "{[":
            if len(stack) >= MAX_DEPTH:
                return None
            if out and out[-1][0] == _VALUE_END:
                out.append(("sep", ","))
            stack.append("}" if c == "{" else "]")
            out.append(("open", c))
            i += 1
        elif c in "}]":
            if c not in stack:
                i += 1  # a stray closer: ignore it
                continue
            while stack:
                closer = stack.pop()
                _trim(out, closer)
                out.append((_VALUE_END, closer))
                if closer == c:
                    break
            i += 1
            if not stack:
                return "".join(tok for _, tok in out)
        elif c == ",":
            if out and out[-1][0] == _VALUE_END:
                out.append(("sep", ","))
            i += 1
        elif c == ":":
            if not out or out[-1][0] not in (_VALUE_END, "key"):
                return None
            if out[-1][0] == _VALUE_END:  # the string before the colon was a key
                out[-1] = ("key", out[-1][1])
            out.append(("sep", ":"))
            i += 1
        elif c in _QUOTES:
            text, i = _read_string(s, i, c)
            emit_value(json.dumps(text, ensure_ascii=False))
        elif (m := _NUMBER.match(s, i)) and not _WORD.match(s, m.end()):
            raw = m.group(0).lstrip("+")
            neg = raw.startswith("-")
            body = raw.lstrip("-")
            if body.startswith("."):
                body = "0" + body
            body = re.sub(r"\.(?=[eE]|$)", ".0", body)
            body = re.sub(r"^0+(?=\d)", "", body)
            emit_value(("-" if neg else "") + body)
            i = m.end()
        elif m := _WORD.match(s, i):
            word = m.group(0)
            i = m.end()
            if stack and stack[-1] == "}" and _next_nonspace(s, i) == ":":
                emit_value(json.dumps(word))  # an unquoted key
            elif word in _KEYWORDS:
                emit_value(_KEYWORDS[word])
            elif out and out[-1][1] == ":":
                emit_value(json.dumps(word))  # {"city": Paris}
            else:
                return None  # prose inside brackets: not JSON
        else:
            return None
    # The text ended inside the value (truncated output): close what is open.
    if not stack:
        return None
    while stack:
        closer = stack.pop()
        _trim(out, closer)
        out.append((_VALUE_END, closer))
    return "".join(tok for _, tok in out)


def _strict_at(s: str, start: int) -> tuple[Any, bool]:
    try:
        value, _ = json.JSONDecoder().raw_decode(s, start)
    except (ValueError, RecursionError):
        return None, False
    return value, True


def _loads(text: str) -> tuple[Any, bool]:
    try:
        return json.loads(text), True
    except (ValueError, RecursionError):
        return None, False


def _decode_region(s: str) -> Iterator[Any]:
    """Values found in ``s``: the whole of it as JSON, then strict values at each bracket,
    then repaired values at each bracket."""
    value, ok = _loads(s.strip())
    if ok:
        yield value
    starts = [m.start() for m in re.finditer(r"[{\[]", s)][:MAX_STARTS]
    for start in starts:
        value, ok = _strict_at(s, start)
        if ok:
            yield value
    for start in starts:
        try:
            fixed = _repair(s, start)
        except (ValueError, RecursionError, IndexError):
            fixed = None
        if fixed is not None:
            value, ok = _loads(fixed)
            if ok:
                yield value


def iter_json_candidates(text: str) -> Iterator[Any]:
    """Every JSON value ``text`` plausibly holds, most plausible first: fenced code blocks
    before the bare text, strict parses before repaired ones. Lazy: stop when one fits."""
    if not isinstance(text, str):
        return
    text = text[:MAX_TEXT]
    for match in _FENCE.finditer(text):
        yield from _decode_region(match.group(2))
    yield from _decode_region(text)


def extract_json(text: str) -> Any:
    """The JSON value in a model's answer; raises ``JSONRepairError`` saying why not."""
    if not isinstance(text, str):
        raise JSONRepairError(f"expected model text, got {type(text).__name__}")
    for value in iter_json_candidates(text):
        return value
    preview = text.strip()[:80].replace("\n", " ")
    if not preview:
        raise JSONRepairError("the answer is empty: no JSON in it")
    raise JSONRepairError(f"no JSON object or array could be read from the answer {preview!r}")


# --------------------------------------------------------------------------------------------
# Asking until the answer validates


@dataclass(frozen=True)
class JSONReply:
    value: Any
    usage: Usage
    attempts: int
    text: str
    #: the first answer was, as written, one JSON value valid against the schema (no repair,
    #: no re-ask): what "valid structured output" counts
    valid: bool = False
    #: the calls asked the model to constrain its output to the schema
    constrained: bool = False


def strictly_valid(text: str, validator: Draft202012Validator) -> bool:
    """``text`` is, as written (surrounding whitespace aside), one JSON value the validator
    accepts."""
    try:
        return validator.is_valid(json.loads(text))
    except (ValueError, RecursionError):
        return False


def _describe(error: Any) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "the top level"
    return f"at {where}: {error.message}"


def ask_json_reply(model: ChatModel, messages: list[Message], schema: dict[str, Any],
                   retries: int = 2, *, max_tokens: int = 256,
                   instruct: bool = True) -> JSONReply:
    """Ask ``model`` for JSON that validates against ``schema``, re-asking up to ``retries``
    times with the validation error; returns the value and the tokens all attempts spent.

    ``instruct`` appends the schema to the last user message, so callers can write their
    prompt in plain words. A model error propagates as ``ModelError``.
    """
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    schema_text = json.dumps(schema, separators=(",", ":"), sort_keys=True)
    convo = [dict(m) for m in messages]
    if instruct:
        note = f"Answer with only one JSON value matching this JSON Schema: {schema_text}"
        if convo and convo[-1].get("role") == "user":
            convo[-1]["content"] = f"{convo[-1]['content']}\n\n{note}"
        else:
            convo.append({"role": "user", "content": note})
    usage = Usage()
    problem, text = "", ""
    constrained = supports_schema(model)
    for attempt in range(1, retries + 2):
        try:
            completion = (forward_chat(model, convo, max_tokens, 0.0, schema) if constrained
                          else model.chat(convo, max_tokens=max_tokens))
        except GrammarDeadEnd:  # this vocabulary cannot write the schema: ask freely, repair
            constrained = False
            completion = model.chat(convo, max_tokens=max_tokens)
        usage = usage + completion.usage
        text = completion.text
        valid = attempt == 1 and strictly_valid(text, validator)
        first_error = None
        found = False
        for value in iter_json_candidates(text):
            found = True
            errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
            if not errors:
                return JSONReply(value, usage, attempt, text, valid, constrained)
            first_error = first_error or errors[0]
        problem = _describe(first_error) if found else "the answer holds no JSON value"
        convo = [*convo, {"role": "assistant", "content": text[:2000]},
                 {"role": "user", "content": f"That answer is not valid: {problem}. Reply with "
                  f"only the corrected JSON, matching this JSON Schema: {schema_text}"}]
    raise AskJSONError(
        f"{getattr(model, 'name', 'the model')} gave no JSON valid against the schema in "
        f"{retries + 1} attempt(s); last problem {problem}", usage=usage,
        attempts=retries + 1, last_text=text)


def ask_json(model: ChatModel, messages: list[Message], schema: dict[str, Any],
             retries: int = 2, *, max_tokens: int = 256) -> Any:
    """The validated JSON value only (see ``ask_json_reply`` for the token accounting)."""
    return ask_json_reply(model, messages, schema, retries, max_tokens=max_tokens).value
