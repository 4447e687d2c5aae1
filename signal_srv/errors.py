"""Typed failures, each carrying the HTTP status and the stable error code clients see.

    SignalError
    ├── BadRequest (400 bad_request)
    │   ├── BadMessage (400 bad_message)
    │   │   └── UnknownType (400 unknown_type)
    │   └── HostNotAllowed (400 host_not_allowed)
    ├── Unauthorized (401 unauthorized)
    │   ├── MissingToken (401 unauthorized: no bearer token at all)
    │   └── InvalidToken (401 unauthorized: a bad access token)
    ├── Forbidden (403 forbidden)
    ├── NotFound (404 not_found)
    │   ├── CallNotFound (404 call_not_found)
    │   │   └── CallEnded (404 call_not_found: the actor has stopped)
    │   └── ParticipantNotFound (404 participant_not_found)
    ├── MethodNotAllowed (405 method_not_allowed)
    ├── CallFull (409 call_full)
    ├── NoPeer (409 no_peer)
    ├── BufferFull (409 buffer_full)
    ├── PayloadTooLarge (413 payload_too_large)
    ├── UnsupportedMediaType (415 unsupported_media_type)
    ├── RateLimited (429 rate_limited)
    ├── Capacity (503 capacity)
    ├── CallBusy (503 call_busy)
    ├── ShuttingDown (503 shutting_down)
    └── Unavailable (503 unavailable)
        └── CallMoved (503 unavailable: the call went to another node meanwhile)

``ConfigError`` is separate: it only happens at start-up.
"""

from __future__ import annotations

__all__ = [
    "BadMessage",
    "BadRequest",
    "BufferFull",
    "CallBusy",
    "CallEnded",
    "CallFull",
    "CallMoved",
    "CallNotFound",
    "Capacity",
    "ConfigError",
    "Forbidden",
    "HostNotAllowed",
    "InvalidToken",
    "MethodNotAllowed",
    "MissingToken",
    "NoPeer",
    "NotFound",
    "ParticipantNotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ShuttingDown",
    "SignalError",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
]


class SignalError(Exception):
    """A failure caused by the client or the call's state, reported to the client."""

    status = 500
    code = "internal_error"
    default_message = "internal error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    @property
    def message(self) -> str:
        return str(self)


class BadRequest(SignalError):
    status, code, default_message = 400, "bad_request", "bad request"


class BadMessage(BadRequest):
    code, default_message = "bad_message", "bad message"


class UnknownType(BadMessage):
    code, default_message = "unknown_type", "unknown message type"


class HostNotAllowed(BadRequest):
    """The request's ``Host`` is not one of ``allowed_hosts`` (a defence against DNS rebinding)."""

    code, default_message = "host_not_allowed", "this server does not answer to that host"


class Unauthorized(SignalError):
    """401; ``challenge`` is the ``WWW-Authenticate`` value of the answer (RFC 6750 section 3)."""

    status, code, default_message = 401, "unauthorized", "missing or wrong peer token"
    challenge = 'Bearer error="invalid_token"'


class MissingToken(Unauthorized):
    """No bearer token at all: RFC 6750 section 3.1 says the challenge then carries no error code."""

    default_message = "send Authorization: Bearer <token>"
    challenge = "Bearer"


class InvalidToken(Unauthorized):
    """An access token (JWT) that is malformed, expired, not yet valid, or not ours."""

    default_message = "invalid token"


class Forbidden(SignalError):
    """A valid token without the grant the request needs, or for another call."""

    status, code, default_message = 403, "forbidden", "the token does not allow this"
    challenge = 'Bearer error="insufficient_scope"'


class NotFound(SignalError):
    status, code, default_message = 404, "not_found", "no such resource"


class CallNotFound(NotFound):
    code, default_message = "call_not_found", "no such call"


class CallEnded(CallNotFound):
    """The call's actor has stopped; to a client the call simply no longer exists."""


class ParticipantNotFound(NotFound):
    code, default_message = "participant_not_found", "no such participant in this call"


class MethodNotAllowed(SignalError):
    status, code, default_message = 405, "method_not_allowed", "method not allowed"


class CallFull(SignalError):
    status, code, default_message = 409, "call_full", "the call already has its participants"


class NoPeer(SignalError):
    status, code, default_message = 409, "no_peer", "the call has no other participant yet"


class BufferFull(SignalError):
    status, code, default_message = 409, "buffer_full", "too many messages held for the other participant"


class PayloadTooLarge(SignalError):
    status, code, default_message = 413, "payload_too_large", "request body too large"


class UnsupportedMediaType(SignalError):
    status, code, default_message = 415, "unsupported_media_type", "the body must be application/json"


class RateLimited(SignalError):
    """Too many requests from one client; ``retry_after`` says when to try again."""

    status, code, default_message = 429, "rate_limited", "too many requests; slow down"

    def __init__(self, message: str | None = None, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Capacity(SignalError):
    status, code, default_message = 503, "capacity", "the server holds as many calls as it may"


class CallBusy(SignalError):
    status, code, default_message = 503, "call_busy", "the call is busy, try again"


class ShuttingDown(SignalError):
    """The server is draining before it exits; the request may be retried elsewhere or later."""

    status, code, default_message = 503, "shutting_down", "the server is shutting down; try again"


class Unavailable(SignalError):
    """A shared service the request needs (the cluster's Redis) cannot be reached right now."""

    status, code, default_message = 503, "unavailable", "the cluster's shared store is unreachable; try again"


class CallMoved(Unavailable):
    """The call went to another node while the request was handled here; nothing of it was done.

    The socket edge looks the call up again; a REST client retries (``Retry-After``).
    """

    default_message = "the call moved to another node meanwhile; try again"


class ConfigError(Exception):
    """A configuration value is invalid; raised while loading, before the server listens."""
