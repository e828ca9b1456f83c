"""The exception family and the closed list of reasons a client connection ends.

Imports nothing of ours: every other module may depend on this one.
"""

from __future__ import annotations

import enum


class Reason(enum.Enum):
    """Why a client connection ended. The value is the metrics label.

    Every exit path names one of these; the log line, the counters and the
    client's ErrorResponse all come from it.
    """

    # Normal ends of a relayed session.
    SESSION_ENDED = "session_ended"
    CONSOLE = "console"  # an admin console session ended
    # Refusals the proxy sends itself.
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    SERVER_REFUSAL = "server_refusal"  # the server's own refusal reached the client
    SERVER_UNREACHABLE = "server_unreachable"
    SHUTDOWN = "shutdown"
    PROTOCOL_ERROR = "protocol_error"
    NO_ROUTE = "no_route"
    RECLAIMED = "reclaimed"  # ended while idle to free a slot for waiting clients
    STARTUP_TIMEOUT = "startup_timeout"
    INTERNAL_ERROR = "internal_error"
    # Ends without an answer of ours.
    CLIENT_GONE = "client_gone"  # hung up before its session began
    TLS_UNSUPPORTED = "tls_unsupported"  # direct-TLS hello while TLS is off
    TLS_FAILED = "tls_failed"  # the TLS handshake with the client failed
    TLS_REQUIRED = "tls_required"  # a plain-text client while tls.client_tls = "require"
    SERVER_TLS = "server_tls"  # TLS with the server was required and could not be had
    TOO_MANY_CLIENTS = "too_many_clients"  # proxy.max_clients or the per-address cap
    CANCEL_DROPPED = "cancel_dropped"  # over the cancel rate limit
    CANCEL_FORWARDED = "cancel_forwarded"
    CANCEL_UNKNOWN = "cancel_unknown"


class SlotproxyError(Exception):
    """Base of every error slotproxy raises on purpose."""


class ClientError(SlotproxyError):
    """Something a client gets told as a FATAL ErrorResponse before we close.

    `sqlstate` and `message` are what the client sees; `reason` is what the
    proxy logs and counts.
    """

    def __init__(
        self,
        reason: Reason,
        sqlstate: str,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail
        self.hint = hint


class ProtocolError(ClientError):
    """The only exception the wire parsers raise: the bytes are not valid."""

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(Reason.PROTOCOL_ERROR, sqlstate, message)


class ConfigError(SlotproxyError):
    """A configuration problem, always naming where it came from and the key."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")
