"""The exceptions of secure aggregation: one base class, four meanings a round engine acts on."""

from __future__ import annotations

__all__ = [
    "SecAggAbort",
    "SecAggError",
    "SecAggMessageError",
    "SecAggProtocolError",
    "SecAggRefused",
]


class SecAggError(Exception):
    """Base class of every error raised by ``privacy.secagg``."""


class SecAggMessageError(SecAggError, ValueError):
    """Bytes that are not a well-formed message (length, range, encoding): drop the message."""


class SecAggProtocolError(SecAggError):
    """A well-formed message that does not fit the protocol state (wrong phase, job or round,
    unknown or duplicate sender, bad signature, undecryptable share): reject that message or
    that peer; the round may go on."""


class SecAggRefused(SecAggProtocolError):
    """An honest node refuses a request that would break its privacy: revealing both shares of
    one peer, or answering for a job or round other than the one it joined."""


class SecAggAbort(SecAggError):
    """The round cannot finish securely (fewer than the threshold survive a phase, or a secret
    cannot be reconstructed): nothing is unmasked, the round fails."""
