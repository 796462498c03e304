"""The citation policy: what verbatim text may leave a node.

The nodes' outputs are derived from their documents (that is the point), so each node applies
a policy to everything it sends, because the data is its own; the coordinator is never trusted
to trim:

    allow   citations up to ALLOW_CITATION_WORDS words; other fields unchanged (length-capped)
    short   citations up to SHORT_CITATION_WORDS words, and no longer verbatim run anywhere
    none    no citations, and no run of more than NONE_MAX_COPIED_WORDS consecutive
            document words in any field

Anonymous questions default to ``none``; the node owner's ceiling wins over a looser request
(``stricter``). Runs are matched on lower-cased words (``VerbatimGuard``) and replaced by
``[...]``."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confide.agents.minions.config import MAX_ANSWER_CHARS, MAX_EXPLANATION_CHARS, MAX_REPLY_CHARS
from confide.agents.minions.text import WORD, trim_words

CITATION_MODES = ("allow", "short", "none")  # loosest to strictest
ALLOW_CITATION_WORDS = 60
SHORT_CITATION_WORDS = 8
NONE_MAX_COPIED_WORDS = 5


@dataclass(frozen=True)
class CitationPolicy:
    """What verbatim text may leave a node.

    ``citation_words``: the longest citation (0: citations are removed). ``max_copied_words``:
    the longest run of consecutive document words any other field may repeat (None: no limit);
    longer runs are replaced by ``[...]``."""

    mode: str
    citation_words: int
    max_copied_words: int | None


_POLICIES = {
    "allow": CitationPolicy("allow", ALLOW_CITATION_WORDS, None),
    "short": CitationPolicy("short", SHORT_CITATION_WORDS, SHORT_CITATION_WORDS),
    "none": CitationPolicy("none", 0, NONE_MAX_COPIED_WORDS),
}


def citation_policy(mode: str) -> CitationPolicy:
    """The policy for ``mode``; an unknown mode fails closed (``none``)."""
    return _POLICIES.get(mode, _POLICIES["none"])


def resolve_citations(requested: str, anonymous: bool) -> str:
    """The mode a question runs with: as requested, else ``none`` for anonymous questions and
    ``allow`` for identified ones. Raises ValueError for an unknown mode."""
    if not requested:
        return "none" if anonymous else "allow"
    if requested not in CITATION_MODES:
        raise ValueError(f"citations must be one of {', '.join(CITATION_MODES)}, "
                         f"got {requested!r}")
    return requested


def stricter(a: str, b: str) -> str:
    """The stricter of two citation modes (unknown modes count as ``none``)."""
    rank = {m: i for i, m in enumerate(CITATION_MODES)}
    return max(a, b, key=lambda m: rank.get(m, len(CITATION_MODES)))


_REDACTED = "[...]"


class VerbatimGuard:
    """Finds runs of consecutive document words in text that is about to leave the node.

    Words are compared lower-cased and without punctuation or spacing, so re-spacing or
    re-punctuating a copied passage does not slip it through."""

    def __init__(self, documents: Iterable[str]) -> None:
        self._docs = [[w.lower() for w in WORD.findall(d)] for d in documents]
        self._grams: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    def _ngrams(self, n: int) -> set[str]:
        with self._lock:
            grams = self._grams.get(n)
            if grams is None:
                grams = {" ".join(words[i:i + n]) for words in self._docs
                         for i in range(len(words) - n + 1)}
                self._grams[n] = grams
            return grams

    def longest_copied_run(self, text: str) -> int:
        """The most consecutive document words ``text`` repeats (0 if none)."""
        words = [w.lower() for w in WORD.findall(text)]
        best = 0
        for n in range(1, len(words) + 1):
            grams = self._ngrams(n)
            if not any(" ".join(words[i:i + n]) in grams for i in range(len(words) - n + 1)):
                break
            best = n
        return best

    def scrub(self, text: str, max_words: int | None) -> str:
        """``text`` with every run of more than ``max_words`` consecutive document words
        replaced by ``[...]`` (None: unchanged)."""
        if max_words is None or not text:
            return text
        n = max_words + 1
        matches = list(WORD.finditer(text))
        if len(matches) < n:
            return text
        words = [m.group().lower() for m in matches]
        grams = self._ngrams(n)
        covered = [False] * len(words)
        for i in range(len(words) - n + 1):
            if " ".join(words[i:i + n]) in grams:
                for j in range(i, i + n):
                    covered[j] = True
        if not any(covered):
            return text
        out, at, i = [], 0, 0
        while i < len(words):
            if not covered[i]:
                i += 1
                continue
            start = i
            while i < len(words) and covered[i]:
                i += 1
            out.append(text[at:matches[start].start()])
            out.append(_REDACTED)
            at = matches[i - 1].end()
        out.append(text[at:])
        return "".join(out)


def apply_policy(output: dict[str, Any], guard: VerbatimGuard,
                 policy: CitationPolicy) -> dict[str, Any]:
    """One finding as it may leave the node under ``policy``."""
    result = dict(output)
    answer = result.get("answer")
    if isinstance(answer, str):
        result["answer"] = guard.scrub(answer, policy.max_copied_words)[:MAX_ANSWER_CHARS]
    explanation = str(result.get("explanation") or "")
    result["explanation"] = guard.scrub(explanation,
                                        policy.max_copied_words)[:MAX_EXPLANATION_CHARS]
    citation = result.get("citation")
    if policy.citation_words == 0 or not isinstance(citation, str) or not citation.strip():
        result["citation"] = None
    else:
        trimmed = trim_words(citation, policy.citation_words, around=str(answer or ""))
        result["citation"] = guard.scrub(trimmed, policy.max_copied_words)
    return result


def apply_policy_text(text: str, guard: VerbatimGuard, policy: CitationPolicy,
                      limit: int = MAX_REPLY_CHARS) -> str:
    """Free text (a Minion reply, a local-only answer) as it may leave the node."""
    return guard.scrub(text, policy.max_copied_words)[:limit]
