"""The text operations every role shares: words, sentences, chunks, whether an answer is
grounded in a text, and whether a model's answer is an abstention.

Chunking (``chunk_text``) is deterministic: a document is cut on paragraph boundaries when
they fit, else on sentence boundaries, else on spaces, so a node's chunk numbers mean the same
thing in every round."""

from __future__ import annotations

import json
import re
from typing import Any

from confide.agents.minions.config import DEFAULT_CHUNK_CHARS

WORD = re.compile(r"\w+")


def trim_words(text: str, limit: int, around: str = "") -> str:
    """At most ``limit`` words of ``text``, centred on ``around`` when it occurs."""
    matches = list(WORD.finditer(text))
    if len(matches) <= limit:
        return text
    start = 0
    if around:
        at = text.lower().find(around.lower())
        if at >= 0:
            first = next((i for i, m in enumerate(matches) if m.end() > at), 0)
            start = max(0, min(first - limit // 3, len(matches) - limit))
    return text[matches[start].start():matches[start + limit - 1].end()]


_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def split_sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE.split(text)) if s]


def _hard_split(text: str, max_chars: int) -> list[str]:
    pieces = []
    while len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        cut = cut if cut > 0 else max_chars
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        pieces.append(text)
    return pieces


def chunk_text(text: str, max_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Split a document into chunks of at most ``max_chars`` characters, on paragraph
    boundaries when they fit, else on sentence boundaries, else on spaces. Deterministic; no
    text is lost (only whitespace between pieces is normalized)."""
    if max_chars < 50:
        raise ValueError(f"chunk size must be >= 50 characters, got {max_chars}")
    pieces: list[tuple[str, str]] = []  # (separator before it, text)
    for paragraph in _PARAGRAPH.split(text.strip()):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if len(paragraph) <= max_chars:
            pieces.append(("\n\n", paragraph))
            continue
        first = True
        for sentence in split_sentences(paragraph):
            for part in _hard_split(sentence, max_chars):
                pieces.append(("\n\n" if first else " ", part))
                first = False
    chunks: list[str] = []
    current = ""
    for sep, piece in pieces:
        if current and len(current) + len(sep) + len(piece) <= max_chars:
            current += sep + piece
        else:
            if current:
                chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


_ABSTAIN = re.compile(
    r"^\s*(null|none|n/?a|unknown|not (found|mentioned|stated|given|specified|available)|"
    r"no answer|nothing|-)?\s*[.!]?\s*$|does not (say|mention|contain|state|specify)|"
    r"not (mentioned|found|stated|provided) in", re.IGNORECASE)


def is_abstention(answer: Any) -> bool:
    return answer is None or (isinstance(answer, str) and bool(_ABSTAIN.search(answer)))


def normalized(text: str) -> str:
    return " ".join(w.lower() for w in WORD.findall(text))


def grounded(answer: str, text: str) -> bool:
    """Whether ``answer`` (its words, in order) occurs in ``text``."""
    words = normalized(answer)
    return bool(words) and f" {words} " in f" {normalized(text)} "


def as_text(value: Any, limit: int) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.strip()[:limit]
