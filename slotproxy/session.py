"""One client's life, as an explicit state machine.

    HANDSHAKE -> QUEUED -> CONNECTING -> RELAYING -> CLOSED
        |          ^-----------'
        |  (the server refused before answering: back to the queue's front)
        '-> CONSOLE -> CLOSED   (database "slotproxy": answered by the proxy)

`Handshake` is the client connection's protocol until relaying starts: it
feeds the sans-IO reader, answers GSSENCRequest (and SSLRequest while TLS is
off) with 'N', hands the session an SSLRequest to answer otherwise, and keeps
reading while the client waits, so that a hang-up is seen at once and bytes
sent early are kept for the server. `Session.run` is the one task that drives
the phases, TLS set-up included; it is cancelled when the client leaves
before its session is relayed.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import enum
import logging
import ssl
import weakref
from typing import TYPE_CHECKING, Any

from . import backend, console, tlsconfig, wire
from .admission import State, Ticket
from .errors import ClientError, ProtocolError, Reason
from .gate import Rerouted
from .monitor import normalize_host
from .relay import Relay, SocketRelay, open_relay
from .routing import Router, classify
from .timeouts import deadline

if TYPE_CHECKING:
    from .config import Address, ClassConfig
    from .gate import Gate
    from .server import Proxy
    from .upstream import Upstream

logger = logging.getLogger("slotproxy.session")

# What a client may send after its startup packet before the server answered.
EARLY_BYTES_LIMIT = 64 * 1024
# How long a closed session waits for the client to take what is still buffered.
CLIENT_FLUSH_TIMEOUT = 10.0
TERMINATE = b"X\x00\x00\x00\x04"
_FALSE = frozenset({"false", "off", "no", "0"})
_IDLE_STATES = frozenset({wire.IDLE, wire.IDLE_IN_TRANSACTION, wire.IDLE_IN_FAILED_TRANSACTION})


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    QUEUED = "queued"
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CONSOLE = "console"
    CLOSED = "closed"


class Handshake(asyncio.Protocol):
    """The client connection from accept until its session is relayed."""

    # Slots: one of these per waiting client, thousands at a time.
    __slots__ = ("discarding", "early", "proxy", "raw", "reader", "session", "transport", "waiting")

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.reader = wire.StartupReader()
        self.early = bytearray()
        self.session: Session | None = None
        self.discarding = False  # refused for sending too much: read on, keep nothing
        self.waiting = False  # the session decides on an SSLRequest: parse nothing more yet
        self.raw = False  # TLS passthrough: every byte is the client's, kept for the server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.session = self.proxy.open_session(transport, self)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.discarding or self.session is None:  # None: the session is over
            return
        if self.raw or self.reader.finished:
            self._keep(data)
            return
        self.reader.feed(data)
        if not self.waiting:
            self._parse()

    def _parse(self) -> None:
        session = self.session
        assert session is not None
        try:
            while (event := self.reader.next_event()) is not wire.NEED_DATA:
                if isinstance(event, wire.GSSENCRequest) or (
                        isinstance(event, wire.SSLRequest) and not session.tls_possible):
                    self.transport.write(wire.NOT_SUPPORTED)
                    continue
                if isinstance(event, wire.SSLRequest):
                    self.waiting = True  # the session answers it
                    session.first_packet(event)
                    return
                session.first_packet(event)
                if not isinstance(event, wire.DirectTLS):  # its bytes stay in the reader
                    self._keep(self.reader.take_trailing())
                return
        except ProtocolError as e:
            session.abort(e)

    def resume(self, transport: asyncio.Transport | None = None,
               reader: wire.StartupReader | None = None) -> None:
        """Go on after an SSLRequest was answered (on a TLS transport, with a fresh reader)."""
        if transport is not None:
            self.transport = transport
        if reader is not None:
            self.reader = reader
        self.waiting = False
        self._parse()

    def _keep(self, data: bytes) -> None:
        if not data:
            return
        self.early += data
        if len(self.early) > EARLY_BYTES_LIMIT:
            # Keep reading and dropping: closing on unread bytes would send a reset
            # that can destroy the ErrorResponse before the client reads it.
            self.discarding = True
            self.early = bytearray()
            self.session.abort(ProtocolError(  # type: ignore[union-attr]
                f"client sent more than {EARLY_BYTES_LIMIT} bytes before the server answered"))

    def eof_received(self) -> bool:
        if self.reader.pending and self.session is not None:
            # Half-closed mid-packet: it can still read why we give up.
            self.session.abort(ProtocolError("incomplete startup packet"))
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.client_lost()


class Session:
    """One client connection and, once admitted, its server connection."""

    __slots__ = (  # one per client; with Handshake's, 1.4 KiB less per waiting client than dicts
        "__weakref__", "_abort_error", "_backend_transport", "_client_gone", "_connecting", "_endpoint",
        "_first", "_log", "backend_address", "backend_key", "bypass", "client_addr", "client_port", "cls",
        "connected_at", "handshake", "id", "loop", "over_limit", "packet", "passthrough", "phase",
        "proxy", "reason", "reclaiming", "relay", "routes", "startup", "task", "ticket", "tls", "tracker",
        "transport", "upstream")

    def __init__(self, proxy: Proxy, transport: asyncio.Transport, handshake: Handshake,
                 conn_id: int) -> None:
        self.loop = loop = proxy.loop
        self.proxy = proxy
        self.transport = transport
        self.handshake = handshake
        self.id = conn_id
        self.phase = Phase.HANDSHAKE
        self.connected_at = loop.time()
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.client_addr: str = peer[0]
        self.client_port: int = peer[1]
        self.startup: wire.StartupMessage | None = None
        self.ticket = Ticket(info=self)
        self.upstream: Upstream | None = None  # the server its database routes to
        self.backend_address: Address | None = None
        self.packet = b""  # the startup packet for the server (the database maybe renamed)
        self.routes: Router | None = None  # the routing that picked upstream; a reload replaces it
        self.cls: ClassConfig | None = None
        self.bypass = False
        self.reclaiming = False
        self.over_limit: ClientError | None = None  # proxy.max_clients: refused once it speaks
        self.tls = False  # the proxy ended the client's TLS
        self.passthrough: str | None = None  # "ssl" or "direct": the client's TLS goes to the server
        self.backend_key: tuple[int, bytes] | None = None
        self._backend_transport: asyncio.Transport | None = None
        self._endpoint: tuple[str, int] | None = None
        self._connecting: asyncio.Transport | None = None  # the server connection before relaying
        self.relay: Relay | SocketRelay | None = None
        self.tracker: wire.SessionTracker | None = None
        self.reason: Reason | None = None
        self.task: asyncio.Task[None] | None = None
        self._log: _Prefixed | None = None
        self._first: asyncio.Future[Any] = loop.create_future()
        self._abort_error: ClientError | None = None
        self._client_gone = False

    # -- identity ------------------------------------------------------------

    @property
    def user(self) -> str:
        return self.startup.user if self.startup else ""

    @property
    def database(self) -> str:
        return self.startup.database if self.startup else ""

    @property
    def application_name(self) -> str:
        return self.startup.application_name if self.startup else ""

    def prefix(self) -> str:
        addr = f"[{self.client_addr}]" if ":" in self.client_addr else self.client_addr
        who = f" {self.user}@{self.database}" if self.startup else ""
        return f"C-{self.id}{who} {addr}:{self.client_port}"

    @property
    def log(self) -> _Prefixed:
        """The logger that prefixes each line with this connection; made at first use,
        since most sessions log nothing."""
        if self._log is None:
            self._log = _Prefixed(logger, self)
        return self._log

    @property
    def tls_possible(self) -> bool:
        """Whether an SSLRequest may get 'S' (else it gets 'N' at once)."""
        return self.proxy.config.tls.client_tls != "disable"

    # -- events from the client's protocol --------------------------------------

    def first_packet(self, event: Any) -> None:
        if not self._first.done():
            self._first.set_result(event)

    def abort(self, error: ClientError) -> None:
        """Refuse the client with `error` in whatever phase before relaying."""
        if not self._first.done():
            self._first.set_exception(error)
        elif self.phase is not Phase.RELAYING and self._abort_error is None and self.task:
            self._abort_error = error
            self.task.cancel()

    def client_lost(self) -> None:
        self._client_gone = True
        if self.phase in (Phase.HANDSHAKE, Phase.QUEUED, Phase.CONNECTING) and self.task:
            self.task.cancel()

    def stop(self) -> None:
        """End this session now (shutdown timeout, second signal).

        An idle session is told why, as PostgreSQL's own shutdown does, and its backend
        gets a Terminate; one whose query runs has its backend cancelled (see
        `_client_left_session`): between messages is the only place to put an error.
        """
        if self.relay is not None:
            if self.tracker is not None and self.tracker.state in _IDLE_STATES and not self.reclaiming:
                self.relay.to_client(wire.error_response(
                    "57P01", "terminating connection because slotproxy is shutting down"))
                self.relay.to_server(TERMINATE)
            self.relay.close()
        elif self.task is not None:
            self.task.cancel()

    # -- the task -------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except ClientError as e:
            self._refuse(e)
            _drop_frames(e)
        except asyncio.CancelledError:
            self._interrupted()
        except Exception as e:
            self.log.exception("internal error")
            self._refuse(ClientError(Reason.INTERNAL_ERROR, "XX000", "slotproxy internal error"))
            _drop_frames(e)

    def finalize(self) -> None:
        """Close and release whatever is left; runs once the task is done.

        Also when the task was cancelled before it ever ran, so nothing here
        may rely on the coroutine's own exit path.
        """
        if self.reason is None:
            self._interrupted()
        self._cleanup()
        self._unlink()

    def _unlink(self) -> None:
        """Break this session's reference cycles, so that it is freed at once.

        Left to the cyclic garbage collector, every connection's thirty-odd
        objects would wait for a collection, and cost one.
        """
        self.handshake.session = None
        if self.ticket.state is not State.HOLDING:  # a holder stays listed until its backend exits
            self.ticket.info = None
        if self.relay is not None:
            self.relay.detach()

    def _interrupted(self) -> None:
        """The task was cancelled: the client left, it was refused, or we shut down."""
        if self.reason is not None:
            self._finish(self.reason)
        elif self._abort_error is not None:
            self._refuse(self._abort_error)
        elif self._client_gone:
            self._finish(Reason.CLIENT_GONE)
        else:
            self._finish(Reason.SHUTDOWN)

    async def _run(self) -> None:
        config = self.proxy.config
        loop = self.loop
        if self.over_limit is not None:
            # Told as the answer to its first packet: a close before it reads could reset
            # the connection and take the ErrorResponse with it.
            try:
                with deadline(loop, self.task, loop.time() + min(2.0, config.proxy.startup_timeout)):
                    await self._first
            except (TimeoutError, ClientError) as e:
                _drop_frames(e)
            raise self.over_limit
        try:
            with deadline(loop, self.task, loop.time() + config.proxy.startup_timeout):
                event = await self._negotiate()
        except TimeoutError:
            if self.handshake.reader.pending:
                raise ClientError(
                    Reason.STARTUP_TIMEOUT, "08P01",
                    f"incomplete startup packet after {config.proxy.startup_timeout:g} s "
                    "(proxy.startup_timeout)") from None
            self.log.debug("closed: sent nothing within %g s (proxy.startup_timeout)",
                           config.proxy.startup_timeout)
            self._finish(Reason.STARTUP_TIMEOUT)
            return
        if event is None:
            return
        if isinstance(event, str):
            await self._pass_through(event)
            return
        if isinstance(event, wire.CancelRequest):
            await self._forward_cancel(event)
            self._finish(self.reason)  # type: ignore[arg-type]
            return
        if config.tls.client_tls == "require" and not self.tls:
            raise ClientError(Reason.TLS_REQUIRED, "28000",
                              "slotproxy requires TLS: connect with sslmode=require or stricter")
        self.startup = event
        if event.database == console.DATABASE:
            self.phase = Phase.CONSOLE  # answered by the proxy itself: no server slot
            await console.Console(self, event).run(bytes(self.handshake.early))
            self.reason = Reason.CONSOLE
            return
        self._point(*self._resolve())
        # Replication connections use wal sender slots, not max_connections.
        replication = event.params.get("replication", "false").lower() not in _FALSE
        if self.cls.bypass or replication:
            self.bypass = True
            answered, sent = await self._connect_directly(
                "replication" if replication else f"class {self.cls.name}")
        else:
            answered, sent = await self._admit()
        await self._relay(answered, sent)

    async def _negotiate(self) -> Any:
        """The client's first packets up to its StartupMessage or CancelRequest.

        Answers SSLRequest, sets up TLS. Returns the packet, "ssl" or "direct" for
        a client whose TLS passes through to the server, or None when it is over.
        """
        while True:
            event = await self._first
            if isinstance(event, wire.SSLRequest):
                if self.handshake.reader.pending:
                    # Bytes sent before our answer would pass for encrypted ones (CVE-2021-23214).
                    raise ProtocolError("received unencrypted data after SSL request")
                mode = self.proxy.config.tls.client_tls
                if mode == "passthrough":
                    if await self.proxy.primary.accepts_tls():
                        if self.handshake.reader.pending:  # arrived while we asked the server
                            raise ProtocolError("received unencrypted data after SSL request")
                        self.transport.write(b"S")
                        self.handshake.raw = True
                        return "ssl"
                    self.transport.write(wire.NOT_SUPPORTED)
                    reader = None
                else:
                    self.transport.write(b"S")
                    if not await self._start_tls(b""):
                        return None
                    reader = self.handshake.reader
                self._first = self.loop.create_future()
                self.handshake.resume(self.transport, reader)
                continue
            if isinstance(event, wire.DirectTLS):
                hello = self.handshake.reader.take_trailing()
                mode = self.proxy.config.tls.client_tls
                if mode == "passthrough":
                    self.handshake.raw = True
                    self.handshake.early += hello
                    return "direct"
                if mode == "disable":
                    self.log.info("direct TLS connection closed: TLS is not enabled")
                    self._finish(Reason.TLS_UNSUPPORTED)
                    return None
                # What comes decrypted is read by a fresh reader, parsed once TLS is up.
                self.handshake.reader = wire.StartupReader(encrypted=True)
                self.handshake.waiting = True
                if not await self._start_tls(hello):
                    return None
                self._first = self.loop.create_future()
                self.handshake.resume(self.transport)
                continue
            return event

    async def _start_tls(self, hello: bytes) -> bool:
        """End the client's TLS here; `hello` is a ClientHello already read (direct TLS)."""
        context = self.proxy.client_ssl
        assert context is not None
        try:
            if hello:
                transport = await _start_tls_with(self.loop, self.transport, self.handshake, context, hello)
            else:
                transport = await self.loop.start_tls(self.transport, self.handshake, context,
                                                      server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.log.info("TLS handshake failed: %s", getattr(e, "reason", None) or e)
            self._finish(Reason.TLS_FAILED)
            return False
        tls = transport.get_extra_info("ssl_object")
        if hello and tls.selected_alpn_protocol() != tlsconfig.ALPN:
            # PostgreSQL 17 insists on it for direct TLS, against cross-protocol attacks.
            self.log.info("direct TLS without ALPN %r: closed", tlsconfig.ALPN)
            transport.close()
            self._finish(Reason.TLS_FAILED)
            return False
        self.transport = transport  # type: ignore[assignment]
        self.tls = True
        return True

    async def _pass_through(self, mode: str) -> None:
        """The client's TLS goes to the server unchanged: admitted by the server's budget alone."""
        self.passthrough = mode
        self._point(*self._resolve())
        answered, sent = await self._admit()
        await self._relay(answered, sent)

    def _resolve(self) -> tuple[Address, bytes]:
        """The server and the startup packet for this client by the routes in force."""
        router = self.proxy.router
        if self.passthrough:
            return router.servers[0], self.packet  # user and database are inside the TLS
        event = self.startup
        assert event is not None
        route = router.resolve(event.database)
        if route is None:
            raise ClientError(Reason.NO_ROUTE, "3D000",
                              f'slotproxy has no route for database "{event.database}"',
                              hint='Add [databases.NAME] for it, or a "*" entry.')
        packet = event.raw if route.dbname == event.database else wire.encode_startup(
            {**event.params, "database": route.dbname}, event.major, event.minor)
        return route.server, packet

    def _point(self, server: Address, packet: bytes) -> None:
        """Make `server` this session's, with its class there and a fresh ticket."""
        self.routes = self.proxy.router
        self.upstream = self.proxy.upstreams[server]
        self.backend_address = server
        self.packet = packet
        classes = self.proxy.config.class_list
        if self.passthrough:
            # Only the address can pick a class; a bypass class would skip the budget.
            self.cls = classify(classes, "", "", "", self.client_addr)
            if self.cls.bypass:
                self.cls = classes[-1]
        else:
            startup = self.startup
            assert startup is not None
            self.cls = classify(classes, startup.user, startup.database,
                                startup.application_name, self.client_addr)
        if self.ticket.state is not State.NEW:
            self.ticket = Ticket(info=self)
        self.ticket.lane = self.cls.name
        self.ticket.showable = not self.passthrough

    def route_changed(self) -> bool:
        """Whether a reload sent this client's database elsewhere (or nowhere)."""
        try:
            return self._resolve() != (self.backend_address, self.packet)
        except ClientError:
            return True

    async def _connect_directly(self, why: str) -> tuple[backend.Answered, int]:
        """A bypass lane: no queue, no retries; whatever the server says reaches the client."""
        self.phase = Phase.CONNECTING
        sent = len(self.handshake.early)
        started = self.loop.time()
        try:
            answered = await backend.connect(
                self.backend_address, self.packet + self.handshake.early,  # type: ignore[arg-type]
                self.proxy.config.backend.connect_timeout, self.task,  # type: ignore[arg-type]
                self._connected, retry=False, tls=self.proxy.server_tls)
        except backend.ConnectFailed as e:
            raise ClientError(
                Reason.SERVER_UNREACHABLE, "08006",
                f"slotproxy could not reach the server at {self.backend_address}: {e.what}") from None
        except backend.ServerTLSFailed as e:
            raise self._server_tls_error(e) from None
        waited = self.loop.time() - started
        self.proxy.stats.admit(str(self.backend_address), self.cls.name, waited)  # type: ignore[union-attr]
        self._decided(f"admitted without queueing ({why})", waited, 0, admitted=True)
        return answered, sent

    async def _admit(self) -> tuple[backend.Answered, int]:
        """Wait for a slot and connect; retry refusals until the queue deadline."""
        loop = self.loop
        config = self.proxy.config
        upstream = self.upstream
        assert upstream is not None and self.cls is not None
        gate = upstream.gate
        started = loop.time()
        until = started + self.cls.queue_timeout
        failure: backend.ConnectFailed | None = None
        attempts = 0
        try:
            with deadline(loop, self.task, until):  # type: ignore[arg-type]
                while True:
                    self.phase = Phase.QUEUED
                    if self.routes is not self.proxy.router and self.ticket.state is not State.HOLDING:
                        # A reload changed the routes: follow this database, keep the deadline.
                        self.routes = self.proxy.router
                        try:
                            target = self._resolve()
                        except ClientError:
                            if self.ticket.state is State.WAITING:
                                gate.leave(self.ticket)
                            raise
                        if target != (upstream.address, self.packet) or self.ticket.state is State.DONE:
                            if self.ticket.state is State.WAITING:
                                gate.leave(self.ticket)
                            self._point(*target)
                            upstream, gate = self.upstream, self.upstream.gate  # type: ignore[union-attr]
                            self.log.info("rerouted to %s by a reload", upstream.address)
                    if self.ticket.state is State.NEW and not gate.enter(self.ticket):
                        self.log.debug("queued (class %s): %d waiting, %d of %s slots in use",
                                       self.cls.name, gate.admission.waiting,
                                       len(gate.admission.holders), gate.admission.limits.max_slots)
                        upstream.client_waiting()
                    try:
                        await gate.wait(self.ticket)
                    except Rerouted as e:
                        _drop_frames(e)  # its waker future keeps it: no cycle through our frames
                        continue
                    self.phase = Phase.CONNECTING
                    sent = len(self.handshake.early)
                    try:
                        answered = await backend.connect(
                            upstream.address, self.packet + self.handshake.early,
                            config.backend.connect_timeout, self.task,  # type: ignore[arg-type]
                            self._connected, tls=None if self.passthrough else self.proxy.server_tls,
                            passthrough=self.passthrough)
                    except backend.ConnectFailed as e:
                        failure = e
                        _drop_frames(e)  # kept for the message; its frames would hold this session
                        attempts += 1
                        self.proxy.stats.retries[str(upstream.address), e.sqlstate or "connect"] += 1
                        self.log.debug("attempt %d: %s; waiting to retry", attempts, e.what)
                        gate.refused(self.ticket)
                        continue
                    gate.answered(self.ticket)
                    waited = loop.time() - started
                    self.proxy.stats.admit(str(upstream.address), self.cls.name, waited)
                    self._decided("admitted", waited, attempts, admitted=True)
                    return answered, sent
        except TimeoutError:
            error = self._deadline_error(loop.time() - started, failure, attempts)
            self._decided(f"refused ({error.reason.value})", loop.time() - started, attempts)
            raise error from None
        except backend.ServerTLSFailed as e:
            error = self._server_tls_error(e)
            self._decided(f"refused ({error.reason.value})", loop.time() - started, attempts)
            raise error from None
        except ClientError as e:
            self._decided(f"refused ({e.reason.value})", loop.time() - started, attempts)
            raise
        except asyncio.CancelledError:
            if self._abort_error is not None:
                self._decided(f"refused ({self._abort_error.reason.value})", loop.time() - started,
                              attempts)
            elif self._client_gone:
                self._decided("left: client hung up", loop.time() - started, attempts)
            raise

    def _server_tls_error(self, e: backend.ServerTLSFailed) -> ClientError:
        self.log.warning("TLS with the server at %s: %s", self.backend_address, e)
        return ClientError(
            Reason.SERVER_TLS, "08006", f"slotproxy could not set up TLS with the server at "
            f"{self.backend_address}: {e} (backend.sslmode = {self.proxy.config.backend.sslmode})")

    def _connected(self, transport: asyncio.Transport) -> None:
        self._connecting = self._backend_transport = transport
        self._endpoint = None

    @property
    def backend_endpoint(self) -> tuple[str, int] | None:
        """Our end of the server connection, as the server sees it (for the monitor)."""
        if self._endpoint is None and self._backend_transport is not None:
            sockname = self._backend_transport.get_extra_info("sockname")
            if sockname:
                self._endpoint = (normalize_host(sockname[0]), sockname[1])
        return self._endpoint

    def _deadline_error(self, waited: float, failure: backend.ConnectFailed | None,
                        attempts: int) -> ClientError:
        assert self.cls is not None and self.upstream is not None
        key = self.cls.key("queue_timeout")
        bound = f"{key} = {self.cls.queue_timeout:g} s"
        admission = self.upstream.gate.admission
        if failure is None:
            lane = admission.lanes.get(self.cls.name)
            if admission.paused:
                held = "admission to this server is paused (PAUSE)"
            elif lane is not None and lane.config.max_slots is not None \
                    and len(lane.holders) >= lane.config.max_slots:
                held = (f"class {self.cls.name} holds {len(lane.holders)} of its "
                        f"{lane.config.max_slots} slots ({self.cls.key('max_slots')})")
            else:
                cap = admission.limits.max_slots
                of = "" if cap is None else f" of {cap}"
                source = self.upstream.capacity.source(self.proxy.config.admission.fixed_slots)
                held = f"{len(admission.holders)}{of} slots are in use ({source})"
            return ClientError(
                Reason.QUEUE_TIMEOUT, "53300",
                f"slotproxy: no server slot came free within {waited:.1f} s ({bound})",
                detail=f"{admission.waiting} other clients are waiting; {held}.",
                hint=f"Retry later, or raise {key}.")
        retried = f"slotproxy retried {attempts} times over {waited:.1f} s ({bound})."
        if failure.unreachable:
            return ClientError(
                Reason.SERVER_UNREACHABLE, "08006",
                f"slotproxy could not reach the server at {self.backend_address}: {failure.what}",
                detail=retried)
        return ClientError(Reason.SERVER_REFUSAL, failure.sqlstate or "53300",
                           failure.message or failure.what, detail=retried)

    def _decided(self, outcome: str, waited: float, attempts: int, admitted: bool = False) -> None:
        level = logging.INFO
        if admitted and not self.proxy.config.proxy.log_connections:
            level = logging.DEBUG
        if logger.isEnabledFor(level):
            retries = f", {attempts} server refusals" if attempts else ""
            self.log.log(level, "%s after %.3f s%s (application_name=%r)",
                         outcome, waited, retries, self.application_name)

    async def _relay(self, answered: backend.Answered, sent: int) -> None:
        self.phase = Phase.RELAYING
        self._connecting = None
        server = answered.transport
        early = self.handshake.early
        received = bytes(answered.received)
        server_tls = server.get_extra_info("ssl_object") if received and not self.passthrough else None
        if server_tls is not None:
            # The server offers SCRAM-SHA-256-PLUS on its TLS connection with us. A plain-text
            # client must not see it (libpq takes it for an attack and gives up); a client on
            # our TLS would bind to our certificate while the server checks its own. Only
            # when the two are the same certificate can PLUS work end to end.
            if not self.tls or server_tls.getpeercert(binary_form=True) != self.proxy.client_cert:
                received = wire.strip_scram_plus(received)
        self._endpoint = self.backend_endpoint  # read now: a SocketRelay closes the transport
        self._backend_transport = None
        if self.passthrough:  # encrypted both ways: nothing to follow
            self.relay = relay = open_relay(self.loop, self.transport, server)
        else:
            tracker = self.tracker = wire.SessionTracker(self.loop.time)
            self.relay = relay = open_relay(self.loop, self.transport, server,
                                            client_observer=tracker.walker.from_client,
                                            server_observer=self._startup_observer,
                                            on_client_gone=self._client_left_session)
            tracker.from_client(bytes(early))
        if len(early) > sent:
            relay.to_server(early[sent:])  # arrived while we were connecting
        self.handshake.early = bytearray()
        if received:
            self._startup_observer(received)
            relay.to_client(received)
        relay.start()

        started = self.loop.time()
        await relay.server_closed
        if self.ticket.state is State.HOLDING:
            self.upstream.gate.release(self.ticket)  # type: ignore[union-attr]
        if self.reason is None:
            self.reason = Reason.SESSION_ENDED
        if logger.isEnabledFor(logging.DEBUG):
            self.log.debug("session ended after %.3f s", self.loop.time() - started)
        if relay.client_closed.done():  # the usual end: the client left first
            return
        # A client that takes nothing more is not waited for long.
        flush_limit = self.loop.call_later(CLIENT_FLUSH_TIMEOUT, relay.abort_client)
        try:
            await relay.client_closed
        finally:
            flush_limit.cancel()

    def _startup_observer(self, data: bytes) -> None:
        """Follows the server until its first ReadyForQuery: the cancel key, refusals."""
        tracker = self.tracker
        assert tracker is not None and self.relay is not None
        tracker.from_server(data)
        if tracker.backend_key is not None and self.backend_key is None:
            self.backend_key = tracker.backend_key
            self.proxy.cancel_keys[self.backend_key] = self
        for fields in tracker.errors:
            if fields.get("C") == "53300":
                # After an authentication exchange the proxy could not repeat for the
                # client, so it reached the client: headroom is too small.
                self.upstream.gate.post_auth_refusals += 1  # type: ignore[union-attr]
                self.proxy.stats.refused["server_refusal", "53300"] += 1
                self.log.warning(
                    "the server refused this client after authentication (53300: %s); it "
                    "cannot be retried for a password login: raise admission.headroom "
                    "or lower admission.max_backend_slots", fields.get("M", ""))
        tracker.errors.clear()
        if tracker.walker.ready or tracker.walker.lost:
            self.relay.set_server_observer(tracker.walker.from_server)

    @property
    def state(self) -> str:
        """What the session is doing: its phase before relaying, then the tracker's state."""
        if self.phase is Phase.RELAYING:
            if self.tracker is not None:
                return self.tracker.state
            if self.passthrough:
                return wire.PASSTHROUGH
        return self.phase.value

    def reclaim(self, idle_for: float, limit: float, waiting: int) -> None:
        """End this idle session so that a waiting client gets its slot.

        It is idle: both streams are between messages, so an ErrorResponse to the
        client and a Terminate to the server are well formed. The slot comes back
        when the server closes, as for any session.
        """
        assert self.relay is not None and self.tracker is not None
        self.reclaiming = True
        if self.tracker.state == wire.IDLE:
            sqlstate, key, what = "57P05", "admission.idle_timeout", "idle session"
        else:
            sqlstate, key, what = "25P03", "admission.idle_in_transaction_timeout", \
                "idle-in-transaction session"
        self.reason = Reason.RECLAIMED
        self.log.info("%s ended after %.1f s idle to free a slot for %d waiting clients (%s = %g)",
                      what, idle_for, waiting, key, limit)
        self.relay.to_client(wire.error_response(
            sqlstate, f"{what} ended to free a slot for waiting clients ({key}={limit:g})"))
        self.relay.to_server(TERMINATE)
        self.relay.close_client()

    def _client_left_session(self) -> None:
        """The client went away while its server session is open."""
        if self.backend_key is None or self.state != wire.ACTIVE:
            return
        # It left mid-request: the backend would run that to the end before
        # noticing, holding the slot. Cancel it so the slot frees sooner.
        pid, key = self.backend_key
        self.log.info("client left mid-request; cancelling backend pid %d to free its slot", pid)
        self.proxy.spawn(self._send_cancel(
            self.backend_address, wire.encode_cancel(pid, key)), deliver=True)  # type: ignore[arg-type]

    async def _send_cancel(self, address: Address, packet: bytes) -> None:
        try:
            await backend.send_cancel(address, packet, self.proxy.config.backend.connect_timeout)
        except (OSError, TimeoutError) as e:
            self.log.warning("could not deliver cancel request: %s", e)

    async def _forward_cancel(self, request: wire.CancelRequest) -> None:
        if not self.proxy.cancels.take(self.loop.time()):
            self.reason = Reason.CANCEL_DROPPED
            self.proxy.dropped_cancels.warn(
                logger, "cancel request dropped: more than %d a second (proxy.cancel_rate)",
                self.proxy.config.proxy.cancel_rate)
            return
        target = self.proxy.cancel_keys.get((request.pid, request.key))
        if target is None and self.proxy.config.tls.client_tls == "passthrough":
            # Keys of passed-through sessions travel encrypted: the server checks this one.
            self.reason = Reason.CANCEL_FORWARDED
            self.log.info("forwarding cancel request for pid %d to %s (TLS passthrough)",
                          request.pid, self.proxy.primary.address)
            await asyncio.shield(self.proxy.spawn(
                self._send_cancel(self.proxy.primary.address, request.raw), deliver=True))
            return
        if target is None:
            self.reason = Reason.CANCEL_UNKNOWN
            self.proxy.unknown_cancels.warn(
                logger, "cancel request for unknown backend pid %d dropped (from %s)",
                request.pid, self.prefix())
            return
        self.reason = Reason.CANCEL_FORWARDED
        self.log.info("forwarding cancel request for backend pid %d (%s)", request.pid,
                      target.prefix())
        # Delivered even if the sender hangs up at once (some drivers do); the
        # sender learns it was delivered when we close, as from the server.
        await asyncio.shield(self.proxy.spawn(
            self._send_cancel(target.backend_address, request.raw), deliver=True))  # type: ignore[arg-type]

    # -- endings -------------------------------------------------------------------------

    def _refuse(self, error: ClientError) -> None:
        self.reason = error.reason
        self.proxy.stats.refused[error.reason.value, error.sqlstate] += 1
        if error.reason in (Reason.PROTOCOL_ERROR, Reason.STARTUP_TIMEOUT):
            self.log.warning("closing: %s", error.message)
        elif error.reason is Reason.TOO_MANY_CLIENTS:
            self.proxy.too_many_clients.warn(logger, "%s: refused (%s): %s", self.prefix(),
                                             error.reason.value, error.message)
        elif error.reason in (Reason.NO_ROUTE, Reason.TLS_REQUIRED):
            # Refused before the queue, where _decided logs the rest.
            self.log.info("refused (%s): %s", error.reason.value, error.message)
        # A passthrough client speaks TLS: it could not read it.
        answer = b"" if self.passthrough else wire.error_response(
            error.sqlstate, error.message, detail=error.detail, hint=error.hint)
        if self.relay is not None:  # relaying: the transport may have handed its socket over
            self.relay.to_client(answer)
            self.relay.close_client()
        elif not self.transport.is_closing():
            if answer:
                self.transport.write(answer)
            self.transport.close()

    def _finish(self, reason: Reason) -> None:
        self.reason = reason
        if not self.transport.is_closing():
            self.transport.close()

    def _cleanup(self) -> None:
        self.phase = Phase.CLOSED
        if self.relay is not None:
            self.proxy.stats.bytes_to_server += self.relay.bytes_to_server
            self.proxy.stats.bytes_to_client += self.relay.bytes_to_client
        if self.ticket.state is State.HOLDING:
            gate = self.upstream.gate  # type: ignore[union-attr]
            connecting = self._connecting
            if connecting is not None and not connecting.is_closing():
                # Left while the server was starting its backend: that backend may
                # hold a slot until it sees our EOF and exits.
                self.proxy.spawn(_release_when_closed(
                    gate, self.ticket, connecting, self.proxy.config.backend.connect_timeout))
            else:
                gate.release(self.ticket)
        elif self.ticket.state is State.WAITING:  # a place no wait() would give back
            self.upstream.gate.leave(self.ticket)  # type: ignore[union-attr]
        if self.backend_key is not None and self.proxy.cancel_keys.get(self.backend_key) is self:
            del self.proxy.cancel_keys[self.backend_key]
        if self.relay is not None:
            if not self.relay.server_closed.done():
                self.relay.close()
        elif not self.transport.is_closing():
            self.transport.close()


async def _start_tls_with(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                          protocol: asyncio.Protocol, context: ssl.SSLContext, hello: bytes) -> Any:
    """loop.start_tls for a client whose ClientHello is already read (direct TLS).

    asyncio's own SSL protocol takes the bytes read so far; the app transport it
    makes is what start_tls would return.
    """
    waiter = loop.create_future()
    tls = asyncio.sslproto.SSLProtocol(loop, protocol, context, waiter, server_side=True,
                                       call_connection_made=False)
    transport.set_protocol(tls)
    tls.connection_made(transport)
    view = memoryview(hello)
    while view:
        buffer = tls.get_buffer(len(view))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        tls.buffer_updated(n)
        view = view[n:]
    await waiter
    return tls._app_transport  # what asyncio's start_tls returns


async def _release_when_closed(gate: Gate, ticket: Ticket, transport: asyncio.Transport,
                               timeout: float) -> None:
    closed: asyncio.Future[None] = transport.get_protocol().closed  # type: ignore[attr-defined]
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(closed)
    except TimeoutError:
        transport.abort()
    finally:
        if ticket.state is State.HOLDING:
            gate.release(ticket)
        ticket.info = None  # listed with its session until the slot came back; no cycle after


def _drop_frames(error: BaseException) -> None:
    """Forget where `error` (and what it came from) was raised, once it has been answered.

    Its traceback holds the frames that raised it, and their locals hold the
    session and often the error itself: a reference cycle.
    """
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__


class _Prefixed(logging.LoggerAdapter):
    """Gives every line the connection's id, user, database and address (see logs.py)."""

    def __init__(self, base: logging.Logger, session: Session) -> None:
        super().__init__(base, {})
        self.session = weakref.ref(session)  # no cycle: see Session._unlink

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        s = self.session()
        if s is None:
            return msg, kwargs
        fields = {"conn": s.id, "client": f"{s.client_addr}:{s.client_port}"}
        if s.startup is not None:
            fields.update(user=s.user, database=s.database, application_name=s.application_name)
        kwargs["extra"] = {"conn_prefix": s.prefix(), "conn": fields}
        return msg, kwargs
