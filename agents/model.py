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


def supports_schema(model: ChatModel) -> bool:
    """Whether ``model.chat`` takes ``schema=`` and then answers only JSON valid against it
    (a local model decoding under a grammar, or a server with structured output). Wrappers
    (counting, recording, lazy) say what their inner model says."""
    return bool(getattr(model, "structured_output", False))


def chat_json(model: ChatModel, messages: list[Message], schema: dict, *,
              max_tokens: int = 256, temperature: float = 0.0) -> Completion:
    """One call that asks for JSON valid against ``schema``: constrained by the model when it
    can be (``supports_schema``), else plain (the caller repairs and validates); plain too
    when the model's vocabulary cannot write what the schema demands (``GrammarDeadEnd``)."""
    from confide.agents.constrained import GrammarDeadEnd

    if not supports_schema(model):
        return model.chat(messages, max_tokens=max_tokens, temperature=temperature)
    try:
        return forward_chat(model, messages, max_tokens, temperature, schema)
    except GrammarDeadEnd:
        return model.chat(messages, max_tokens=max_tokens, temperature=temperature)


def forward_chat(inner: ChatModel, messages: list[Message], max_tokens: int,
                 temperature: float, schema: dict | None) -> Completion:
    """How a wrapper passes a call on: with ``schema`` only when one was given (inner models
    that predate schemas keep working)."""
    if schema is None:
        return inner.chat(messages, max_tokens=max_tokens, temperature=temperature)
    return inner.chat(messages, max_tokens=max_tokens, temperature=temperature,
                      schema=schema)  # type: ignore[call-arg]
