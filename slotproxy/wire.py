"""Sans-IO PostgreSQL framing: no sockets, no asyncio, bytes in and events out.

Three jobs:
- `StartupReader` parses what a client sends before its session begins
  (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage, a direct-TLS hello).
- `MessageFramer` follows typed messages (Byte1 type + Int32 length) in a stream,
  keeping the bodies of the types the caller asks for and skipping the rest.
- `error_response` encodes the FATAL ErrorResponse the proxy sends itself.

The only exception raised here is `ProtocolError`; anything else is a bug.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from .errors import ProtocolError

SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102
NEGOTIATION_MAJOR: Final = 1234  # the "protocol version" 1234.x of the special requests

MIN_PACKET_LENGTH: Final = 8
MAX_PACKET_LENGTH: Final = 10000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH
MIN_CANCEL_KEY: Final = 4
MAX_CANCEL_KEY: Final = 256  # protocol 3.2 allows keys up to 256 bytes
TLS_HANDSHAKE_RECORD: Final = 0x16

# The one-byte answer to SSLRequest/GSSENCRequest meaning "not here, go on in clear".
NOT_SUPPORTED: Final = b"N"

_INT32 = struct.Struct("!i")
_HEADER = struct.Struct("!ii")
_PAIR = struct.Struct("!ii")


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class DirectTLS:
    """The first byte was a TLS handshake record (PostgreSQL 17 sslnegotiation=direct)."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    key: bytes
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    major: int
    minor: int
    params: Mapping[str, str]
    raw: bytes = field(repr=False)

    @property
    def user(self) -> str:
        return self.params["user"]

    @property
    def database(self) -> str:
        return self.params.get("database") or self.params["user"]

    @property
    def application_name(self) -> str:
        return self.params.get("application_name", "")


FirstPacketEvent = SSLRequest | GSSENCRequest | DirectTLS | CancelRequest | StartupMessage


class StartupReader:
    """Parses the packets a client sends before its StartupMessage, one at a time.

    Feed bytes with `feed`, then call `next_event` until it returns NEED_DATA.
    After a StartupMessage, CancelRequest or DirectTLS the reader is finished:
    `take_trailing()` hands over whatever bytes followed.
    """

    __slots__ = ("_buf", "_gss_seen", "_packets", "_ssl_seen", "finished")

    def __init__(self, encrypted: bool = False) -> None:
        self._buf = bytearray()
        # Inside TLS no negotiation may start again.
        self._ssl_seen = self._gss_seen = encrypted
        self._packets = 1 if encrypted else 0
        self.finished = False

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet held (nonzero at EOF means truncated)."""
        return 0 if self.finished else len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def take_trailing(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_event(self) -> FirstPacketEvent | _NeedData:
        if self.finished:
            return NEED_DATA
        buf = self._buf
        if not buf:
            return NEED_DATA
        if self._packets == 0 and buf[0] == TLS_HANDSHAKE_RECORD:
            self.finished = True
            return DirectTLS()
        if len(buf) < 4:
            return NEED_DATA
        # Distrust the length before buffering a body.
        (length,) = _INT32.unpack_from(buf, 0)
        if not MIN_PACKET_LENGTH <= length <= MAX_PACKET_LENGTH:
            raise ProtocolError(f"invalid length of startup packet: {length}")
        if len(buf) < 8:
            return NEED_DATA
        _, code = _HEADER.unpack_from(buf, 0)
        self._check_code(code, length)
        if len(buf) < length:
            return NEED_DATA
        packet = bytes(buf[:length])
        del buf[:length]
        self._packets += 1
        return self._parse(code, packet)

    def _check_code(self, code: int, length: int) -> None:
        """Reject a packet from its header alone, before waiting for its body."""
        major, minor = code >> 16, code & 0xFFFF
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            name = "SSLRequest" if code == SSL_REQUEST_CODE else "GSSENCRequest"
            if length != 8:
                raise ProtocolError(f"invalid length of {name}: {length}")
            seen = self._ssl_seen if code == SSL_REQUEST_CODE else self._gss_seen
            if seen:
                raise ProtocolError(f"{name} sent twice")
        elif code == CANCEL_REQUEST_CODE:
            if not 12 + MIN_CANCEL_KEY <= length <= 12 + MAX_CANCEL_KEY:
                raise ProtocolError(f"invalid length of cancel request: {length}")
        elif major == NEGOTIATION_MAJOR:
            raise ProtocolError(f"unknown request code {major}.{minor}")
        elif major != 3:
            raise ProtocolError(
                f"unsupported frontend protocol {major}.{minor}: "
                "slotproxy relays protocol 3.x",
                "0A000",
            )
        elif length <= 8:
            raise ProtocolError("invalid startup packet layout: no parameters")

    def _parse(self, code: int, packet: bytes) -> FirstPacketEvent:
        if code == SSL_REQUEST_CODE:
            self._ssl_seen = True
            return SSLRequest()
        if code == GSSENC_REQUEST_CODE:
            self._gss_seen = True
            return GSSENCRequest()
        self.finished = True
        if code == CANCEL_REQUEST_CODE:
            (pid,) = _INT32.unpack_from(packet, 8)
            return CancelRequest(pid=pid, key=packet[12:], raw=packet)
        return StartupMessage(
            major=code >> 16,
            minor=code & 0xFFFF,
            params=MappingProxyType(_parse_params(packet[8:])),
            raw=packet,
        )


def _parse_params(body: bytes) -> dict[str, str]:
    # name\0value\0 ... name\0value\0 \0
    if not body.endswith(b"\0"):
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    fields = body[:-1]
    params: dict[str, str] = {}
    if fields:
        if not fields.endswith(b"\0"):
            raise ProtocolError("invalid startup packet layout: parameter without value")
        # Decoding first splits alike: a NUL byte only ever decodes to "\0".
        parts = fields[:-1].decode("utf-8", "surrogateescape").split("\0")
        if len(parts) % 2:
            raise ProtocolError("invalid startup packet layout: parameter without value")
        names = parts[::2]
        if "" in names:
            raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
        params = dict(zip(names, parts[1::2], strict=True))
    if not params.get("user"):
        raise ProtocolError("no PostgreSQL user name specified in startup packet", "28000")
    return params


def encode_startup(params: Mapping[str, str], major: int = 3, minor: int = 0) -> bytes:
    """A StartupMessage, as a client would send it."""
    body = b"".join(
        k.encode("utf-8", "surrogateescape") + b"\0" + v.encode("utf-8", "surrogateescape") + b"\0"
        for k, v in params.items()
    ) + b"\0"
    return _HEADER.pack(8 + len(body), (major << 16) | minor) + body


def encode_cancel(pid: int, key: bytes) -> bytes:
    return _HEADER.pack(12 + len(key), CANCEL_REQUEST_CODE) + _INT32.pack(pid) + key


def error_response(
    sqlstate: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
    severity: str = "FATAL",
) -> bytes:
    """An ErrorResponse ('E') message as the server would write it."""
    parts = [b"S", severity.encode(), b"\0", b"V", severity.encode(), b"\0",
             b"C", sqlstate.encode("ascii"), b"\0", b"M", message.encode(), b"\0"]
    if detail:
        parts += [b"D", detail.encode(), b"\0"]
    if hint:
        parts += [b"H", hint.encode(), b"\0"]
    parts.append(b"\0")
    body = b"".join(parts)
    return b"E" + _INT32.pack(4 + len(body)) + body


def parse_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse body, keyed by their code letter."""
    fields: dict[str, str] = {}
    pos = 0
    end = len(body)
    while pos < end and body[pos] != 0:
        stop = body.find(b"\0", pos + 1)
        if stop < 0:
            raise ProtocolError("malformed ErrorResponse: unterminated field")
        fields[chr(body[pos])] = body[pos + 1:stop].decode("utf-8", "replace")
        pos = stop + 1
    return fields


def parse_backend_key(body: bytes) -> tuple[int, bytes]:
    """BackendKeyData ('K'): the pid and the secret key a client cancels with."""
    if len(body) < 4 + MIN_CANCEL_KEY or len(body) > 4 + MAX_CANCEL_KEY:
        raise ProtocolError(f"malformed BackendKeyData: {len(body)} bytes")
    (pid,) = _INT32.unpack_from(body, 0)
    return pid, bytes(body[4:])


class MessageFramer:
    """Finds message boundaries in a stream of typed messages.

    `feed` returns `(type, body)` for each message that starts or completes in
    the chunk. Bodies are kept only for the types in `keep` (and only up to
    `max_body` bytes); other messages are reported at their header with body
    None, and their bytes skipped without being buffered.
    """

    __slots__ = ("_keep", "_max_body", "_skip", "_partial", "_spent")

    def __init__(self, keep: bytes, max_body: int = 1 << 20) -> None:
        self._keep = frozenset(keep)
        self._max_body = max_body
        self._skip = 0  # bytes left of a body we do not keep
        self._partial = bytearray()  # an incomplete header, or a kept message so far
        self._spent = False

    def feed(self, data: bytes, limit: int = 0) -> list[tuple[int, bytes | None]]:
        """With `limit`, stop after that many messages without looking at the rest of
        `data` (a caller that needs only the first few): the framer is spent then."""
        if self._spent:
            raise RuntimeError("MessageFramer fed again after it stopped at its limit")
        out: list[tuple[int, bytes | None]] = []
        stop = limit if limit > 0 else -1
        end = len(data)
        pos = 0
        if self._skip:
            pos = min(self._skip, end)
            self._skip -= pos
        if self._partial and pos < end:
            pos = self._complete_partial(data, pos, out)
        while pos < end:
            if len(out) == stop:
                self._spent = True
                break
            if end - pos < 5:
                self._partial += data[pos:]
                break
            mtype = data[pos]
            (length,) = _INT32.unpack_from(data, pos + 1)
            if length < 4:
                raise ProtocolError(f"invalid message length {length}")
            body_end = pos + 1 + length
            if mtype in self._keep and length - 4 <= self._max_body:
                if body_end > end:
                    self._partial += data[pos:]
                    break
                out.append((mtype, data[pos + 5:body_end]))
            else:
                out.append((mtype, None))
                if body_end > end:
                    self._skip = body_end - end
                    break
            pos = body_end
        return out

    def _complete_partial(self, data: bytes, pos: int, out: list) -> int:
        """Finish the message begun in an earlier chunk; returns the new position."""
        partial = self._partial
        if len(partial) < 5:
            take = min(5 - len(partial), len(data) - pos)
            partial += data[pos:pos + take]
            pos += take
            if len(partial) < 5:
                return pos
        mtype = partial[0]
        (length,) = _INT32.unpack_from(partial, 1)
        if length < 4:
            raise ProtocolError(f"invalid message length {length}")
        if mtype not in self._keep or length - 4 > self._max_body:
            partial.clear()
            out.append((mtype, None))
            remaining = length - 4
            take = min(remaining, len(data) - pos)
            self._skip = remaining - take
            return pos + take
        need = 1 + length - len(partial)
        take = min(need, len(data) - pos)
        partial += data[pos:pos + take]
        pos += take
        if take == need:
            out.append((mtype, bytes(partial[5:])))
            partial.clear()
        return pos



def strip_scram_plus(data: bytes) -> bytes:
    """Drop SCRAM-SHA-256-PLUS from an AuthenticationSASL at the start of `data`.

    A client whose TLS the proxy ends would bind its SCRAM proof to the proxy's
    certificate, which the server (on its own TLS connection) rejects.
    """
    pos = 0
    while len(data) - pos >= 5:
        mtype = data[pos]
        (length,) = _INT32.unpack_from(data, pos + 1)
        end = pos + 1 + length
        if mtype == ord("v"):
            pos = end  # NegotiateProtocolVersion may come first
            continue
        if mtype != ord("R") or end > len(data) or length < 8:
            return data
        (code,) = _INT32.unpack_from(data, pos + 5)
        if code != 10:  # not AuthenticationSASL
            return data
        mechanisms = [m for m in bytes(data[pos + 9:end]).split(b"\0") if m]
        kept = [m for m in mechanisms if m != b"SCRAM-SHA-256-PLUS"]
        if kept == mechanisms:
            return data
        body = _INT32.pack(10) + b"".join(m + b"\0" for m in kept) + b"\0"
        return bytes(data[:pos]) + b"R" + _INT32.pack(4 + len(body)) + body + bytes(data[end:])
    return data


# -- following a relayed session -----------------------------------------------------

STARTING = "starting"
PASSTHROUGH = "passthrough"  # encrypted end to end: the proxy cannot tell
ACTIVE = "active"
IDLE = "idle"
IDLE_IN_TRANSACTION = "idle in transaction"
IDLE_IN_FAILED_TRANSACTION = "idle in transaction (aborted)"
_TXN_STATES = {ord("I"): IDLE, ord("T"): IDLE_IN_TRANSACTION, ord("E"): IDLE_IN_FAILED_TRANSACTION}

_Z = ord("Z")  # ReadyForQuery
_K = ord("K")  # BackendKeyData
_E = ord("E")  # ErrorResponse
_MAX_STARTUP_BODY = 64 * 1024

# What each client message type means for the session, by type byte.
_NOTHING, _REQUEST, _SYNC, _BATCH, _TERMINATE = 0, 1, 2, 3, 4
_CLIENT_KIND = bytearray(256)
for _t in b"QF":  # Query, FunctionCall: each answered by one ReadyForQuery
    _CLIENT_KIND[_t] = _REQUEST
_CLIENT_KIND[ord("S")] = _SYNC  # answered by one ReadyForQuery, and closes the batch before it
for _t in b"PBEDCH":  # extended-protocol work that the next Sync closes
    _CLIENT_KIND[_t] = _BATCH
_CLIENT_KIND[ord("X")] = _TERMINATE
_CLIENT_KIND = bytes(_CLIENT_KIND)


class Walker:
    """Follows the framing of both directions of a relayed session.

    It runs on every chunk of every result, so it reads message headers only
    and skips bodies without copying them. A message whose header is split
    across two chunks is carried over and joined with the next chunk.
    This is the reference; `slotproxy._walker.Walker`, the same in C, runs
    where it was compiled, and the tests hold the two to the same cases.

    `pending` counts requests that await their ReadyForQuery, `batch` says
    extended-protocol messages were sent since the last Sync, `status` is the
    last ReadyForQuery's status byte, `since` the `clock()` reading at the
    last change between working and not. Before the first ReadyForQuery,
    BackendKeyData and ErrorResponse messages are kept in `held` as
    (type, body) for the caller to take.
    """

    __slots__ = ("_c_carry", "_c_skip", "_clock", "_s_carry", "_s_skip", "batch", "held", "lost",
                 "pending", "ready", "since", "status", "terminated")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.pending = 0
        self.batch = False
        self.status = ord("I")
        self.ready = False  # the first ReadyForQuery was seen: startup is over
        self.terminated = False  # the client sent Terminate
        self.since = clock()
        self.held: list[tuple[int, bytes]] = []
        self._c_skip = self._s_skip = 0  # bytes left of a message body being skipped
        self._c_carry = self._s_carry = b""  # the start of a message split across chunks
        # The stream stopped making sense: from then on the session counts as
        # active, so it is never reclaimed; the bytes still flow.
        self.lost = False

    @property
    def midway(self) -> bool:
        """Whether either side is partway through a message."""
        return bool(self._c_carry or self._c_skip or self._s_carry or self._s_skip)

    def from_client(self, data: bytes) -> None:
        if self.lost:
            return
        pos = self._c_skip
        if self._c_carry:
            data = self._c_carry + data
            self._c_carry = b""
        n = len(data)
        if pos >= n:
            self._c_skip = pos - n
            return
        unpack = _INT32.unpack_from
        kinds = _CLIENT_KIND
        started = False
        while n - pos >= 5:
            kind = kinds[data[pos]]
            if kind:
                if kind == _TERMINATE:
                    self.terminated = True
                else:
                    if not (self.pending or self.batch):
                        started = True
                    if kind == _BATCH:
                        self.batch = True
                    else:
                        self.pending += 1
                        if kind == _SYNC:
                            self.batch = False
            (length,) = unpack(data, pos + 1)
            if length < 4:
                self.lost = True
                break
            pos += 1 + length
        else:
            if pos > n:
                self._c_skip = pos - n
            else:
                self._c_skip = 0
                if pos < n:
                    self._c_carry = data[pos:]
        if started:
            self.since = self._clock()

    def from_server(self, data: bytes) -> None:
        if self.lost:
            return
        pos = self._s_skip
        if self._s_carry:
            data = self._s_carry + data
            self._s_carry = b""
        n = len(data)
        if pos >= n:
            self._s_skip = pos - n
            return
        unpack = _INT32.unpack_from
        stopped = False
        while n - pos >= 5:
            mtype = data[pos]
            (length,) = unpack(data, pos + 1)
            if length < 4 or (mtype == _Z and length != 5):
                self.lost = True
                break
            end = pos + 1 + length
            if mtype == _Z:
                if end > n:
                    break  # its status byte is in the next chunk
                if self.pending:
                    self.pending -= 1
                if not (self.pending or self.batch):
                    stopped = True
                self.status = data[pos + 5]
                self.ready = True
            elif not self.ready and (mtype == _K or mtype == _E) and length <= _MAX_STARTUP_BODY:
                if end > n:
                    break  # carried over whole: its body is needed
                self.held.append((mtype, data[pos + 5:end]))
            pos = end
        if not self.lost:
            if pos > n:
                self._s_skip = pos - n
            else:
                self._s_skip = 0
                if pos < n:
                    self._s_carry = data[pos:]
        if stopped:
            self.since = self._clock()


try:
    from ._walker import Walker as CompiledWalker
except ImportError:  # installed without a C compiler: the reference walker does the same, slower
    CompiledWalker = None
DEFAULT_WALKER: type = CompiledWalker or Walker  # what sessions use


class SessionTracker:
    """Follows both directions of a relayed session to know what it is doing.

    A session is `active` from a client request until the ReadyForQuery that
    answers it, while extended-protocol messages await their Sync, and while
    either side is midway through a message; otherwise idle, idle in a
    transaction, or idle in a failed one (the status byte of the last
    ReadyForQuery). Before its first ReadyForQuery it is `starting`; meanwhile
    `from_server` keeps the BackendKeyData and any ErrorResponse for the
    session to read. Once started, the relay feeds `walker` directly.
    """

    __slots__ = ("backend_key", "errors", "walker")

    def __init__(self, clock: Callable[[], float], walker: type | None = None) -> None:
        self.walker = (walker or DEFAULT_WALKER)(clock)
        self.backend_key: tuple[int, bytes] | None = None
        self.errors: list[dict[str, str]] = []  # ErrorResponses before the first ReadyForQuery

    @property
    def state(self) -> str:
        w = self.walker
        if w.lost:
            return ACTIVE
        if not w.ready:
            return STARTING
        if w.pending or w.batch or w.midway:
            return ACTIVE  # a request in flight, or a message half sent either way
        return _TXN_STATES.get(w.status, IDLE)

    @property
    def since(self) -> float:
        return self.walker.since

    def from_client(self, data: bytes) -> None:
        self.walker.from_client(data)

    def from_server(self, data: bytes) -> None:
        """Follows what the server sends, and takes what startup held back."""
        walker = self.walker
        walker.from_server(data)
        if walker.held:
            for mtype, body in walker.held:
                try:
                    if mtype == _K:
                        self.backend_key = parse_backend_key(body)
                    else:
                        self.errors.append(parse_fields(body))
                except ProtocolError:
                    pass  # the client will make of it what it can
            walker.held.clear()
