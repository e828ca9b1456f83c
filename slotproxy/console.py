"""The admin console: the virtual database `slotproxy` on the proxy's own port.

psql -h PROXY -p 6432 -U ops slotproxy  ->  SHOW QUEUE, SHOW SESSIONS, SHOW CAPACITY,
SHOW CLASSES, SHOW CONFIG, RELOAD, PAUSE [db], RESUME [db]; rows psql prints.

Users authenticate by SCRAM-SHA-256 against the verifiers in [admin] users
(or, when configured, by trust from loopback). The console never takes a
server slot: it is answered by the proxy itself, in the simple query protocol.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import secrets
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import config as configuration
from . import wire
from .errors import ConfigError
from .scram import MECHANISM, AuthFailed, ScramServer, Verifier
from .status import snapshot

if TYPE_CHECKING:
    from .session import Session

DATABASE = "slotproxy"
COMMANDS = "SHOW QUEUE | SESSIONS | CAPACITY | CLASSES | CONFIG, RELOAD, PAUSE [db], RESUME [db]"
MAX_MESSAGE = 1 << 20
SERVER_VERSION = "15.0 (slotproxy console)"
IDLE_TIMEOUT = 3600.0  # an authenticated console session left open
_INT32 = struct.Struct("!i")

Rows = tuple[list[str], list[list[Any]]]


def _msg(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + _INT32.pack(4 + len(body)) + body


def _auth(code: int, data: bytes = b"") -> bytes:
    return _msg(b"R", _INT32.pack(code) + data)


def _cstr(text: str) -> bytes:
    return text.encode("utf-8") + b"\0"


def _text(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, float):
        return f"{value:.3f}".encode()
    return str(value).encode("utf-8")


def encode_rows(columns: list[str], rows: list[list[Any]], tag: str) -> bytes:
    """RowDescription (all text), DataRows and CommandComplete."""
    desc = _INT32.pack(len(columns))[2:] + b"".join(
        _cstr(c) + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0) for c in columns)
    out = [_msg(b"T", desc)]
    for row in rows:
        fields = [_text(v) for v in row]
        body = struct.pack("!h", len(fields)) + b"".join(
            _INT32.pack(-1) if f is None else _INT32.pack(len(f)) + f for f in fields)
        out.append(_msg(b"D", body))
    out.append(_msg(b"C", _cstr(tag)))
    return b"".join(out)


def _mock(users: dict[str, str], user: str) -> Verifier:
    """What an unknown user is offered: unknown users fail like a wrong password.

    Its salt is keyed by the configured verifiers (secret, and the same in every
    worker and after a restart), so it stays as stable as a real user's.
    """
    secret = hashlib.sha256("\n".join(sorted(users.values())).encode()).digest()
    iterations = collections.Counter(Verifier.parse(v).iterations for v in users.values())
    return Verifier.mock(user, secret, iterations.most_common(1)[0][0])


class _Reader(asyncio.Protocol):
    """The client's transport while it talks to the console: typed messages, into a queue."""

    def __init__(self, queue: asyncio.Queue[tuple[int, bytes] | None], early: bytes) -> None:
        self.queue = queue
        self.buf = bytearray(early)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._drain()

    def _drain(self) -> None:
        buf = self.buf
        while len(buf) >= 5:
            (length,) = _INT32.unpack_from(buf, 1)
            if not 4 <= length <= MAX_MESSAGE:
                self.queue.put_nowait((0, b""))  # nonsense: the console ends the session
                buf.clear()
                return
            if len(buf) < 1 + length:
                return
            self.queue.put_nowait((buf[0], bytes(buf[5:1 + length])))
            del buf[:1 + length]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)


class Console:
    def __init__(self, session: Session, startup: wire.StartupMessage) -> None:
        self.session = session
        self.proxy = session.proxy
        self.transport = session.transport
        self.user = startup.user
        self.queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()

    async def run(self, early: bytes) -> None:
        self._reader = _Reader(self.queue, early)
        self.transport.set_protocol(self._reader)
        self._reader._drain()
        self.transport.resume_reading()
        try:
            if await self._authenticate():
                await self._serve()
        finally:
            if not self.transport.is_closing():
                self.transport.close()

    async def _next(self, timeout: float) -> tuple[int, bytes] | None:
        async with asyncio.timeout(timeout):
            return await self.queue.get()

    def _fatal(self, sqlstate: str, message: str) -> None:
        self.transport.write(wire.error_response(sqlstate, message))
        self.transport.close()

    async def _authenticate(self) -> bool:
        admin = self.proxy.config.admin
        if admin.trust_loopback and _loopback(self.session.client_addr):
            self._welcome()
            return True
        users = dict(admin.users)
        if not users:
            self._fatal("28000", "the slotproxy console has no users: set [admin] users "
                        "(slotproxy hash-password), or [admin] trust_loopback for local use")
            return False
        known = self.user in users
        verifier = Verifier.parse(users[self.user]) if known else _mock(users, self.user)
        scram = ScramServer(verifier)
        self.transport.write(_auth(10, _cstr(MECHANISM) + b"\0"))
        timeout = self.proxy.config.proxy.startup_timeout
        try:
            first = await self._next(timeout)
            if first is None or first[0] != ord("p"):
                raise AuthFailed("expected SASLInitialResponse")
            mechanism, _, rest = first[1].partition(b"\0")
            if mechanism != MECHANISM.encode() or len(rest) < 4:
                raise AuthFailed("unsupported SASL mechanism")
            self.transport.write(_auth(11, scram.first(rest[4:])))
            final = await self._next(timeout)
            if final is None or final[0] != ord("p"):
                raise AuthFailed("expected SASLResponse")
            server_final = scram.final(final[1])
            if not known:
                raise AuthFailed("no such console user")
        except (AuthFailed, TimeoutError):
            self.session.log.warning("console: password authentication failed for user %r", self.user)
            self._fatal("28P01", f'password authentication failed for user "{self.user}"')
            return False
        self.transport.write(_auth(12, server_final))
        self._welcome()
        return True

    def _welcome(self) -> None:
        params = {"server_version": SERVER_VERSION, "server_encoding": "UTF8",
                  "client_encoding": "UTF8", "DateStyle": "ISO, MDY", "integer_datetimes": "on",
                  "standard_conforming_strings": "on", "application_name": ""}
        out = [_auth(0)]
        out += [_msg(b"S", _cstr(k) + _cstr(v)) for k, v in params.items()]
        out.append(_msg(b"K", _INT32.pack(0) + secrets.token_bytes(4)))
        out.append(_msg(b"Z", b"I"))
        self.transport.write(b"".join(out))
        self.session.log.info("console session for %r", self.user)

    async def _serve(self) -> None:
        while True:
            try:
                message = await self._next(IDLE_TIMEOUT)
            except TimeoutError:
                self._fatal("57P05", f"slotproxy console session idle for {IDLE_TIMEOUT:g} s")
                return
            if message is None or message[0] == ord("X"):
                return
            mtype, body = message
            if mtype != ord("Q"):
                self._fatal("08P01", "the slotproxy console speaks the simple query protocol only "
                            "(use psql)")
                return
            sql = body.rstrip(b"\0").decode("utf-8", "replace")
            out = []
            statements = [s.strip() for s in sql.split(";") if s.strip()]
            if not statements:
                out.append(_msg(b"I"))  # EmptyQueryResponse
            for statement in statements:
                try:
                    out.append(await self._command(statement))
                except (ConfigError, ValueError) as e:
                    out.append(wire.error_response("22023" if isinstance(e, ValueError) else "F0000",
                                                   str(e), severity="ERROR"))
                    break
                except _Unknown as e:
                    out.append(wire.error_response("42601", str(e), severity="ERROR", hint=COMMANDS))
                    break
            out.append(_msg(b"Z", b"I"))
            self.transport.write(b"".join(out))

    async def _command(self, statement: str) -> bytes:
        words = statement.split()
        verb = " ".join(words[:2]).upper() if words and words[0].upper() == "SHOW" else words[0].upper()
        handler: Callable[[list[str]], Awaitable[bytes]] | None = {
            "SHOW QUEUE": self._show_queue, "SHOW SESSIONS": self._show_sessions,
            "SHOW CAPACITY": self._show_capacity, "SHOW CLASSES": self._show_classes,
            "SHOW CONFIG": self._show_config, "RELOAD": self._reload,
            "PAUSE": self._pause, "RESUME": self._resume,
        }.get(verb)
        if handler is None:
            raise _Unknown(f"unknown slotproxy console command: {statement!r}")
        args = words[2:] if verb.startswith("SHOW ") else words[1:]
        return await handler(args)

    async def _show_queue(self, args: list[str]) -> bytes:
        columns = ["id", "server", "class", "user", "database", "application_name", "address", "waited"]
        rows = [[w["id"], w["server"], w["class"], w["user"], w["database"], w["application_name"],
                 w["address"], float(w["waited"])] for w in snapshot(self.proxy)["waiting"]]
        return encode_rows(columns, rows, "SHOW")

    async def _show_sessions(self, args: list[str]) -> bytes:
        columns = ["id", "server", "class", "user", "database", "application_name", "address",
                   "state", "idle_for", "backend_pid"]
        rows = [[s["id"], s["server"], s["class"], s["user"], s["database"], s["application_name"],
                 s["address"], s["state"], s["idle_for"], s["backend_pid"]]
                for s in snapshot(self.proxy)["sessions"]]
        return encode_rows(columns, rows, "SHOW")

    async def _show_capacity(self, args: list[str]) -> bytes:
        columns = ["server", "capacity", "own", "waiting", "connecting", "paused", "blind",
                   "max_connections", "reserved", "headroom", "usable", "external", "peers"]
        rows = []
        for s in snapshot(self.proxy)["servers"]:
            su = s["superuser_reserved"]
            reserved = None if su is None else su + (s["reserved"] or 0)
            rows.append([s["server"], s["capacity"], s["own"], s["waiting"], s["connecting"], s["paused"],
                         s["blind"], s["max_connections"], reserved, s["headroom"], s["usable"],
                         s["external"], s["peers"]])
        return encode_rows(columns, rows, "SHOW")

    async def _show_classes(self, args: list[str]) -> bytes:
        columns = ["server", "class", "weight", "min_slots", "max_slots", "held", "waiting"]
        rows = [[s["server"], c["class"], c["weight"], c["min_slots"], c["max_slots"], c["held"],
                 c["waiting"]] for s in snapshot(self.proxy)["servers"] for c in s["classes"]]
        return encode_rows(columns, rows, "SHOW")

    async def _show_config(self, args: list[str]) -> bytes:
        reloads = {info.dotted: info.reload for info in configuration.keys()}
        rows = []
        for key, value, changed in configuration.describe(self.proxy.config):
            rows.append([key, value, not changed, "live" if reloads[key] else "restart"])
        return encode_rows(["key", "value", "default", "changes"], rows, "SHOW")

    async def _reload(self, args: list[str]) -> bytes:
        changes = await self.proxy.control("reload")
        notice = wire.error_response("00000", "; ".join(changes) or "nothing changed", severity="NOTICE")
        return b"N" + notice[1:] + _msg(b"C", _cstr("RELOAD"))

    async def _pause(self, args: list[str]) -> bytes:
        return self._told("paused", await self.proxy.control("pause", *args[:1]), args) + \
            _msg(b"C", _cstr("PAUSE"))

    async def _resume(self, args: list[str]) -> bytes:
        return self._told("resumed", await self.proxy.control("resume", *args[:1]), args) + \
            _msg(b"C", _cstr("RESUME"))

    def _told(self, done: str, servers: list[str], args: list[str]) -> bytes:
        """A NOTICE naming the servers: a mistyped database reaches the catch-all server."""
        text = f"{done} admission to {', '.join(servers)}"
        if args and args[0] not in self.proxy.router.names:
            text += (f' (database "{args[0]}" has no [databases] entry of its own: '
                     "its server is the catch-all one)")
        notice = wire.error_response("00000", text, severity="NOTICE")
        return b"N" + notice[1:]


class _Unknown(Exception):
    pass


def _loopback(address: str) -> bool:
    ip = configuration.parse_ip(address)
    return ip is not None and ip.is_loopback
