"""Schema-constrained decoding for local transformers models (xgrammar).

A 135M model asked for JSON writes broken JSON most of the time; repairing it afterwards
guesses. Constrained decoding makes invalid output impossible instead: the JSON Schema a caller
validates against is compiled into a grammar, and at every step the logits of tokens the
grammar does not allow are masked out, so greedy decoding can only write schema-valid JSON
(what vLLM and SGLang do for structured output). Why xgrammar: it works unpatched with the
pinned transformers through its ``contrib.hf.LogitsProcessor``, compiles JSON Schema itself
(no Pydantic detour), and masks at ~0.4 ms a token on this CPU; llguidance and outlines-core
were not needed (ARCHITECTURE.md, "Constrained decoding, in practice").

Three facts shape this module:

- compiling a schema with ``maxLength`` costs 1-5 s of CPU, so compiled grammars are cached
  per (tokenizer, schema) for the life of the process;
- separators are compact (``,`` and ``:``): fewer tokens, and WordPiece vocabularies (the tiny
  test model) have no token starting with a space, so ``": "`` would dead-end there;
- the answer's text is the bytes the grammar accepted (``decoded_vocab``), not
  ``tokenizer.decode``: WordPiece's decode inserts spaces and drops ``##``, which would change
  the JSON the grammar checked.

A cut-off answer is still possible when the largest valid answer does not fit the call's token
budget; ``token_bound`` lets callers (and tests) check their schemas against their budgets.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

from confide.agents.model import ModelError

__all__ = ["GrammarDeadEnd", "SchemaGrammars", "available", "fit_budget", "fit_schema",
           "token_bound"]


class GrammarDeadEnd(ModelError):
    """Decoding reached a point of the grammar that no token of the vocabulary can continue
    (a character the tokenizer lacks: the tiny test model's uncased vocabulary has no "D").
    Callers ask again unconstrained and repair."""


def available() -> bool:
    """Whether xgrammar can be imported (the local backends fall back to plain decoding and
    repair when it cannot)."""
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


def _key(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"))


class SchemaGrammars:
    """Compiled JSON-Schema grammars for one tokenizer, compiled once each and cached.

    ``processor(schema)`` gives a fresh logits processor for one ``generate()`` call (a
    processor holds the matcher state of one generation and must not be reused);
    ``text(ids)`` the exact text those tokens spell. Thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None)
        self.compiler = xgr.GrammarCompiler(self.info)
        self.stop_token_ids = set(self.info.stop_token_ids)
        self._vocab = self.info.decoded_vocab
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.compiled = 0  # schemas compiled (not served from the cache): tests check it

    def grammar(self, schema: dict[str, Any]) -> Any:
        key = _key(schema)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                return found
            try:
                # the schema's own key order: xgrammar writes properties in that order
                grammar = self.compiler.compile_json_schema(
                    json.dumps(schema), any_whitespace=False, separators=(",", ":"))
            except (RuntimeError, ValueError, TypeError) as exc:
                raise ModelError(f"cannot compile the JSON Schema into a grammar: {exc}") from exc
            self._cache[key] = grammar
            self.compiled += 1
            return grammar

    def processor(self, schema: dict[str, Any]) -> Any:
        return self._xgr.contrib.hf.LogitsProcessor(self.grammar(schema))

    def text(self, ids: list[int]) -> str:
        """The text of generated token ids, as the grammar saw it (stop tokens dropped)."""
        data = b"".join(self._vocab[i] for i in ids
                        if i not in self.stop_token_ids and 0 <= i < len(self._vocab))
        return data.decode("utf-8", "replace")


_ATOM = re.compile(r"(\\.|\[[^\]]*\]|[^\\\[])(\{(\d+)\})?")


def _pattern_chars(pattern: str) -> int | None:
    """The length of every match of an anchored, fixed-length pattern (``^\\d{4}-\\d{2}$``:
    10), or None when matches may differ in length (``*``, ``+``, ``?``, ``|``, groups...)."""
    if not (pattern.startswith("^") and pattern.endswith("$")):
        return None
    body = pattern[1:-1]
    if re.search(r"(?<!\\)[*+?|(){},]", re.sub(r"\{\d+\}", "", body)):
        return None
    total, at = 0, 0
    for match in _ATOM.finditer(body):
        if match.start() != at:
            return None
        total += int(match.group(3) or 1)
        at = match.end()
    return total if at == len(body) else None


def token_bound(schema: dict[str, Any]) -> int | None:
    """The characters of the longest compact JSON valid against ``schema``, or None when the
    schema bounds no length (a free ``object``, an array without ``maxItems``, a string
    without ``maxLength``...). Every token of the models here spells at least one character,
    so this bounds the tokens of a constrained answer as long as each string character costs
    one token at most: true of ASCII text; a non-ASCII character or an escape may cost more
    (the validation guard still catches an answer cut off that way).

    Covers what the project's schemas use: object (declared properties: what xgrammar's
    strict mode writes unless ``additionalProperties`` allows more), array with ``maxItems``,
    string with ``maxLength`` or a fixed-length ``pattern``, integer and number with
    ``minimum``/``maximum``, boolean, null, ``enum``/``const``, ``oneOf``/``anyOf``."""
    if "const" in schema:
        return len(json.dumps(schema["const"], separators=(",", ":")))
    if "enum" in schema:
        return max(len(json.dumps(v, separators=(",", ":"))) for v in schema["enum"])
    for key in ("oneOf", "anyOf"):
        if key in schema:
            bounds = [token_bound(s) for s in schema[key]]
            return None if any(b is None for b in bounds) else max(bounds)  # type: ignore
    kind = schema.get("type")
    if isinstance(kind, list):
        bounds = [token_bound({**schema, "type": k}) for k in kind]
        return None if any(b is None for b in bounds) else max(bounds)  # type: ignore
    if kind == "string":
        fixed = _pattern_chars(schema["pattern"]) if "pattern" in schema else None
        if "maxLength" not in schema:
            return None if fixed is None else 2 + fixed
        return 2 + int(schema["maxLength"]) if fixed is None else 2 + min(
            fixed, int(schema["maxLength"]))
    if kind == "number":
        # the range bounds the integer part; xgrammar does not bound the fraction's digits,
        # so count 8 of them (what a greedy model writes; the validation guard stays)
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is None or high is None:
            return None
        return max(len(str(int(low))), len(str(int(high)))) + 9
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is None or high is None:
            return 20  # an int64 in decimal, with its sign
        return max(len(str(int(low))), len(str(int(high))))
    if kind == "boolean":
        return 5
    if kind == "null":
        return 4
    if kind == "array":
        if "maxItems" not in schema:
            return None
        item = token_bound(schema.get("items", {})) if schema.get("items") else None
        if item is None:
            return None
        return 2 + int(schema["maxItems"]) * (item + 1)
    if kind == "object":
        # xgrammar's strict mode (the default) writes declared properties only, unless the
        # schema allows others explicitly
        if schema.get("additionalProperties", False) is not False:
            return None
        total = 2
        for name, sub in schema.get("properties", {}).items():
            bound = token_bound(sub)
            if bound is None:
                return None
            total += len(json.dumps(name)) + 1 + bound + 1
        return total
    return None


_FIT_ITEMS = 4
_FIT_RANGE = 10**6


def _tighten(schema: Any, chars: int) -> Any:
    """``schema`` with every string at most ``chars`` long (keeping a tighter own bound),
    arrays at most _FIT_ITEMS long and numbers within +-1e6 where they were unbounded."""
    if isinstance(schema, list):
        return [_tighten(s, chars) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_tighten(v, chars) if k in ("items", "anyOf", "oneOf", "allOf") else v)
           for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: _tighten(v, chars) for k, v in schema["properties"].items()}
    kinds = schema.get("type") if isinstance(schema.get("type"), list) else [schema.get("type")]
    if "string" in kinds and "pattern" not in schema:  # a pattern sets its own length
        out["maxLength"] = min(int(schema.get("maxLength", chars)), chars)
        out["minLength"] = min(int(schema.get("minLength", 0)), out["maxLength"])
    if "array" in kinds:
        out["maxItems"] = min(int(schema.get("maxItems", _FIT_ITEMS)), _FIT_ITEMS)
    if "number" in kinds or "integer" in kinds:
        out.setdefault("minimum", -_FIT_RANGE)
        out.setdefault("maximum", _FIT_RANGE)
    return out


def fit_schema(schema: dict[str, Any], budget: int) -> dict[str, Any]:
    """A subset of ``schema`` whose longest valid answer fits ``budget`` tokens
    (``token_bound``): strings shortened (the longest allowance that fits), unbounded arrays
    and numbers bounded. What it produces validates against ``schema`` too. A schema that
    cannot be bounded (a free object) or fit comes back with its tightest try, and
    ``token_bound`` of it says so (None, or more than ``budget``)."""
    best = _tighten(schema, 1)
    low, high = 1, 512
    while low <= high:  # the longest string allowance that still fits
        middle = (low + high) // 2
        candidate = _tighten(schema, middle)
        bound = token_bound(candidate)
        if bound is not None and bound <= budget:
            best, low = candidate, middle + 1
        else:
            high = middle - 1
    return best


def fit_budget(schema: dict[str, Any], budget: int) -> tuple[dict[str, Any], int]:
    """``fit_schema`` and the budget to call with: ``budget``, or the schema's bound when even
    the tightest subset needs more (a date pattern cannot be shortened): the longest valid
    answer always fits. An unboundable schema keeps ``budget``."""
    fitted = fit_schema(schema, budget)
    bound = token_bound(fitted)
    return fitted, max(budget, bound or budget)
