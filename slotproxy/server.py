"""Listeners, the registry of live sessions and tasks, lifecycle and shutdown.

Everything a session shares with others lives on the `Proxy` object and is
passed in, never global: tests run as many proxies in one process as they like.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Coroutine
from typing import Any

from .capacity import Snapshot
from .config import Address, Config
from .gate import Gate
from .metrics import ProxyCollector, Stats
from .monitor import Monitor
from .routing import Router
from .session import Handshake, Phase, Session
from .upstream import Upstream, monitor_dsn

logger = logging.getLogger("slotproxy.server")


class Throttle:
    """At most one log line per interval; the lines held back are counted in the next."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.count = 0
        self._next_at = 0.0
        self._held = 0

    def warn(self, log: logging.Logger, msg: str, *args: Any) -> None:
        self.count += 1
        now = asyncio.get_running_loop().time()
        if now < self._next_at:
            self._held += 1
            return
        if self._held:
            msg += f" ({self._held} more like it in the last {self.interval:g} s)"
        log.warning(msg, *args)
        self._held = 0
        self._next_at = now + self.interval

LISTEN_BACKLOG = 4096  # bursts of clients arrive at once; the kernel caps it at somaxconn


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self.router = Router(config)
        primary = config.backend.address
        self.upstreams: dict[Address, Upstream] = {
            address: Upstream(config, address, self.stats,
                              monitor_dsn(config.monitor.dsn, address, primary) if config.monitor.dsn
                              else None)
            for address in self.router.servers
        }
        self.sessions: set[Session] = set()
        self.cancel_keys: dict[tuple[int, bytes], Session] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[asyncio.base_events.Server] = []
        self._ids = itertools.count(1)
        self._all_closed: asyncio.Event | None = None
        self.stopping = False
        self.unknown_cancels = Throttle(interval=1.0)
        self.stats.registry.register(ProxyCollector(self))

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        for upstream in self.upstreams.values():
            await upstream.start()
        listen = self.config.proxy.listen
        server = await loop.create_server(
            lambda: Handshake(self), listen.host, listen.port,
            backlog=LISTEN_BACKLOG, reuse_address=True)
        self._listeners.append(server)
        servers = "; ".join(f"server {u.address}: {u.capacity.describe()}" for u in self.upstreams.values())
        logger.info("listening on %s; %s", ", ".join(str(a) for a in self.addresses), servers)

    @property
    def addresses(self) -> list[Address]:
        """The addresses actually bound (the port is known here when listen port is 0)."""
        found = []
        for server in self._listeners:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                found.append(Address(host, port))
        return found

    async def shutdown(self) -> None:
        """Stop accepting, refuse waiters with 57P01, let sessions finish, then close."""
        if self.stopping:
            return
        self.stopping = True
        self._stop_listening()
        waiting = sum(u.gate.admission.waiting for u in self.upstreams.values())
        for upstream in self.upstreams.values():
            upstream.gate.close()
        live = sum(1 for s in self.sessions if s.phase in (Phase.CONNECTING, Phase.RELAYING))
        timeout = self.config.proxy.shutdown_timeout
        logger.info("shutting down: %d waiting clients refused; %d sessions may finish "
                    "within %g s (proxy.shutdown_timeout)", waiting, live, timeout)
        assert self._all_closed is not None
        try:
            async with asyncio.timeout(timeout):
                await self._all_closed.wait()
        except TimeoutError:
            logger.warning("shutdown timeout: closing %d sessions", len(self.sessions))
            await self.abort()
        await self._finish()

    async def abort(self) -> None:
        """Close everything now."""
        self.stopping = True
        self._stop_listening()
        for upstream in self.upstreams.values():
            upstream.gate.close()
        for session in list(self.sessions):
            session.stop()
        if self._all_closed is not None:
            await self._all_closed.wait()
        await self._finish()

    async def _finish(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.stop()
        await self._drain_tasks()

    def _stop_listening(self) -> None:
        for server in self._listeners:
            server.close()

    async def _drain_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- sessions --------------------------------------------------------------------

    def open_session(self, transport: asyncio.Transport, handshake: Handshake) -> Session:
        # uvloop sets TCP_NODELAY on every TCP transport, accepted and connected.
        session = Session(self, transport, handshake, next(self._ids))
        self.sessions.add(session)
        assert self._all_closed is not None
        self._all_closed.clear()
        session.task = self.loop.create_task(session.run())
        session.task.add_done_callback(lambda _: self._session_done(session))
        return session

    def _session_done(self, session: Session) -> None:
        session.finalize()
        self.sessions.discard(session)
        if not self.sessions and self._all_closed is not None:
            self._all_closed.set()

    # -- the first server: the only one unless [databases] routes to others ----------

    @property
    def primary(self) -> Upstream:
        return next(iter(self.upstreams.values()))

    @property
    def gate(self) -> Gate:
        return self.primary.gate

    @property
    def capacity(self) -> Snapshot:
        return self.primary.capacity

    @property
    def monitor(self) -> Monitor | None:
        return self.primary.monitor

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a helper task the proxy keeps referenced until it ends."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
