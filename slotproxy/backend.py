"""Opening a server connection for a client, up to the server's first answer.

Until the server's first message nothing has reached the client, so a
refusal there (no slot, server starting or stopping, nobody listening) can
be retried with the same startup packet. Everything from a first message
that is not such a refusal on belongs to the client and is relayed as is.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .config import Address
from .errors import ProtocolError
from .timeouts import deadline
from .tlsconfig import ServerTLS
from .wire import MessageFramer, parse_fields

# SQLSTATEs that mean "no session for you right now", sent before any authentication.
RETRYABLE_SQLSTATES = frozenset({
    "53300",  # too_many_connections: every slot taken
    "57P03",  # cannot_connect_now: starting up, shutting down, in recovery
    # A backend ended while it started: a fast shutdown or restart (admin_shutdown), or
    # another backend's crash (crash_shutdown). The server comes back, or refuses the retry.
    "57P01",
    "57P02",
})

_INT32 = struct.Struct("!i")
_ERROR = ord("E")
_NEGOTIATE = ord("v")
_AUTH = ord("R")
_AUTH_OK = b"\x00\x00\x00\x00"
# NegotiateProtocolVersion, AuthenticationOk, then the message that decides: no need to
# frame the dozen ParameterStatus messages after them.
_DECIDED_WITHIN = 3


class ConnectFailed(Exception):
    """The server could not take this client yet; nothing reached the client."""

    def __init__(self, what: str, *, sqlstate: str | None = None, message: str | None = None,
                 after_auth: bool = False) -> None:
        super().__init__(what)
        self.what = what
        self.sqlstate = sqlstate  # set when the server itself refused
        self.message = message
        self.after_auth = after_auth  # refused right after a trust AuthenticationOk

    @property
    def unreachable(self) -> bool:
        return self.sqlstate is None


class ServerTLSFailed(Exception):
    """TLS with the server was required and could not be set up: not worth retrying."""


@dataclass(slots=True)
class Answered:
    """A server connection whose first answer is the client's to see.

    Reading is paused; `received` holds what arrived so far, to relay first.
    """

    transport: asyncio.Transport
    received: bytearray


class _FirstAnswer(asyncio.Protocol):
    """Reads the server's first answer and decides: retry, or relay from here on.

    A trust login answers AuthenticationOk without any exchange and may still
    be refused right after (the reserved slots). Nothing was exchanged for the
    client's credentials, so that refusal is retried too: the AuthenticationOk
    is held back until the message after it is known.
    """

    __slots__ = ("auth_ok", "closed", "framer", "received", "result", "retry", "ssl_answer", "transport")

    def __init__(self, result: asyncio.Future[bytearray], retry: bool) -> None:
        self.result = result
        self.retry = retry
        self.received = bytearray()
        self.framer = MessageFramer(keep=b"ER", max_body=64 * 1024)
        self.transport: asyncio.Transport | None = None
        self.auth_ok = False
        self.closed: asyncio.Future[None] = result.get_loop().create_future()
        self.ssl_answer: asyncio.Future[bytes] | None = None  # while the SSLRequest awaits its byte

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        answer = self.ssl_answer
        if answer is not None and not answer.done():
            if data[:1] == b"S" and len(data) > 1:
                # Bytes before the TLS handshake would be taken for encrypted ones (CVE-2021-23222).
                answer.set_exception(ServerTLSFailed("the server sent unencrypted data after 'S'"))
            else:
                answer.set_result(data[:1])
                if len(data) > 1:  # an 'E' from a server too old to know SSLRequest
                    self.data_received(data[1:])
            return
        self.received += data
        if self.result.done():
            return
        try:
            messages = self.framer.feed(data, limit=_DECIDED_WITHIN)
        except ProtocolError:
            messages = [(0, None)]  # not our business: let the client see it
        for mtype, body in messages:
            if mtype == _NEGOTIATE:
                continue  # NegotiateProtocolVersion comes before a refusal too; sent again on retry
            if mtype == _AUTH and body == _AUTH_OK and not self.auth_ok:
                self.auth_ok = True  # trust: the next message decides
                continue
            if mtype == _ERROR and body is not None:
                try:
                    fields = parse_fields(body)
                except ProtocolError:
                    fields = {}
                sqlstate = fields.get("C")
                if sqlstate in RETRYABLE_SQLSTATES and self.retry:
                    message = fields.get("M", "")
                    when = " after trust authentication" if self.auth_ok else ""
                    self.result.set_exception(ConnectFailed(
                        f"server refused{when}: {message} ({sqlstate})", sqlstate=sqlstate,
                        message=message, after_auth=self.auth_ok))
                    self.transport.close()
                    return
            self._relay()
            return
        if len(messages) == _DECIDED_WITHIN:  # undecided after as many as a server sends: not ours
            self._relay()

    def _relay(self) -> None:
        self.transport.pause_reading()  # type: ignore[union-attr]
        self.result.set_result(self.received)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.result.done():
            why = f"connection lost: {exc}" if exc else "server closed the connection before answering"
            self.result.set_exception(ConnectFailed(why))


_P = TypeVar("_P", bound=asyncio.BaseProtocol)


async def open_connection(loop: asyncio.AbstractEventLoop, factory: Callable[[], _P],
                          address: Address) -> tuple[asyncio.Transport, _P]:
    """A TCP connection to `address`, or a Unix-domain one when its host is a socket directory."""
    if address.socket_path is not None:
        return await loop.create_unix_connection(factory, address.socket_path)  # type: ignore[return-value]
    return await loop.create_connection(factory, address.host, address.port)  # type: ignore[return-value]


async def connect(address: Address, first_bytes: bytes, timeout: float, task: asyncio.Task,
                  on_connected: Callable[[asyncio.Transport], None] | None = None,
                  retry: bool = True, tls: ServerTLS | None = None,
                  passthrough: str | None = None) -> Answered:
    """Connect, send `first_bytes` (the startup packet and what followed), await the answer.

    `task` is the caller's own task (cancelled if the attempt takes longer than
    `timeout`). `on_connected` sees the transport as soon as the connection is up.
    With `tls`, the connection is encrypted first, as libpq's sslmode says. With
    `passthrough`, `first_bytes` are a client's own TLS records: sent as they are
    after the server's 'S' ("ssl") or at once ("direct", PostgreSQL 17 direct TLS);
    everything after is the client's business.
    Raises ConnectFailed when the attempt may be retried later (with `retry`
    false, only when the server cannot be reached: its refusals are answers), and
    ServerTLSFailed when the TLS that was asked for cannot be had.
    """
    loop = task.get_loop()
    result: asyncio.Future[bytearray] = loop.create_future()
    transport: asyncio.Transport | None = None
    if address.socket_path is not None:
        tls = None  # as libpq: no TLS on a Unix-domain socket (config refuses sslmode=require there)
    try:
        with deadline(loop, task, loop.time() + timeout):
            transport, protocol = await open_connection(
                loop, lambda: _FirstAnswer(result, retry), address)
            if on_connected is not None:
                on_connected(transport)
            if passthrough == "direct":
                transport.write(first_bytes)
                transport.pause_reading()
                return Answered(transport, bytearray())
            if passthrough or tls is not None:
                answer = await _ssl_request(loop, transport, protocol)
                if passthrough:
                    if answer != b"S":
                        raise ServerTLSFailed("the server does not accept TLS (any more)")
                    transport.write(first_bytes)
                    transport.pause_reading()
                    return Answered(transport, bytearray())
                if answer == b"S":
                    try:
                        transport = await loop.start_tls(  # type: ignore[assignment]
                            transport, protocol, tls.context, server_hostname=address.host)  # type: ignore[union-attr]
                    except ssl.SSLError as e:
                        if tls.required:  # type: ignore[union-attr]
                            raise ServerTLSFailed(f"TLS handshake failed: {e.reason or e}") from None
                        transport.abort()  # prefer: on without TLS, as libpq does
                        return await connect(address, first_bytes, timeout, task, on_connected, retry)
                    protocol.transport = transport
                    if on_connected is not None:
                        on_connected(transport)
                elif tls.required:  # type: ignore[union-attr]
                    raise ServerTLSFailed(
                        f"the server does not accept TLS (backend.sslmode = {tls.sslmode})")  # type: ignore[union-attr]
            transport.write(first_bytes)
            received = await result
    except TimeoutError:
        if transport is not None:
            transport.abort()
        raise ConnectFailed(f"no answer within {timeout:g} s (backend.connect_timeout)") from None
    except OSError as e:
        if transport is not None:
            transport.abort()
        raise ConnectFailed(e.strerror or str(e)) from None
    except ServerTLSFailed:
        if transport is not None:
            transport.abort()
        raise
    except BaseException:
        # Given up on (client gone, deadline): tell the server with EOF, so that a
        # backend already started exits; the caller waits for it via `closed`.
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
            half_close(transport)
        raise
    return Answered(transport, received)


SSL_REQUEST = _INT32.pack(8) + _INT32.pack(80877103)


async def _ssl_request(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                       protocol: _FirstAnswer) -> bytes:
    """Send SSLRequest and return the server's one-byte answer."""
    protocol.ssl_answer = loop.create_future()
    transport.write(SSL_REQUEST)
    answer = await protocol.ssl_answer
    if answer not in (b"S", b"N"):
        raise ServerTLSFailed(f"the server answered SSLRequest with {answer!r}")
    return answer


def half_close(transport: asyncio.Transport) -> None:
    """EOF to the server, reading on: a TLS transport has no half-close, so it closes."""
    if transport.can_write_eof():
        transport.write_eof()
    else:
        transport.close()


async def probe_tls(address: Address, timeout: float) -> bool | None:
    """Whether the server answers SSLRequest with 'S' (None: it could not be asked)."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[bytearray] = loop.create_future()
    try:
        async with asyncio.timeout(timeout):
            transport, protocol = await open_connection(
                loop, lambda: _FirstAnswer(result, False), address)
            try:
                return await _ssl_request(loop, transport, protocol) == b"S"
            finally:
                transport.close()
    except (OSError, TimeoutError, ServerTLSFailed):
        return None


class _CancelSender(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def send_cancel(address: Address, packet: bytes, timeout: float) -> None:
    """Deliver a CancelRequest and wait until the server has taken it (it closes).

    A cancel needs no connection slot: the server handles it before a backend
    takes one. Errors propagate as OSError or TimeoutError.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    async with asyncio.timeout(timeout):
        transport, _ = await open_connection(loop, lambda: _CancelSender(done), address)
        try:
            transport.write(packet)
            await done
        finally:
            transport.close()
