"""The one interface every language-model backend implements, with token accounting.

Agents (Agora negotiation, Minions roles) talk to models only through ``ChatModel``: a list of
chat messages in, a completion and its token counts out. Counting tokens per call is the point
of several measurements (remote tokens saved by Minions, tokens spent on natural language vs
protocols by Agora), so every backend reports them, as its tokenizer or its server counts them.
Implementations live in ``agents.backends``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Message = dict[str, str]
"""One chat message: {"role": "system" | "user" | "assistant", "content": "..."}."""


@dataclass(frozen=True)
class Usage:
    """Tokens one call spent: what the model read and what it wrote."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens)

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    text: str
    usage: Usage


class ModelError(RuntimeError):
    """A backend could not produce a completion (unreachable server, bad answer, ...)."""


@runtime_checkable
class ChatModel(Protocol):
    """A chat/generation model. ``name`` says which model it is (for logs and reports)."""

    name: str

    def chat(self, messages: list[Message], *, max_tokens: int = 256,
             temperature: float = 0.0) -> Completion:
        """Answer the conversation ``messages``; greedy when ``temperature`` is 0."""
        ...
