"""Listeners, the registry of live sessions and tasks, lifecycle and shutdown.

Everything a session shares with others lives on the `Proxy` object and is
passed in, never global: tests run as many proxies in one process as they like.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import config as configuration
from . import tlsconfig, wire
from .capacity import Snapshot
from .config import Address, Config, Override
from .endpoints import AdminEndpoints
from .errors import ClientError, ConfigError, Reason
from .gate import Gate
from .listener import Listener
from .metrics import ProxyCollector, Stats
from .monitor import Monitor
from .routing import Router
from .session import Handshake, Phase, Session
from .upstream import Upstream, monitor_dsn

logger = logging.getLogger("slotproxy.server")


class TokenBucket:
    """`rate` a second, bursts of up to `rate`."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self._at: float | None = None
        self.dropped = 0

    def take(self, now: float) -> bool:
        if self._at is not None:
            self.tokens = min(self.rate, self.tokens + (now - self._at) * self.rate)
        self._at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False


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


class CannotListen(Exception):
    """A listen address could not be bound; names its key."""

    def __init__(self, key: str, address: Address, error: OSError) -> None:
        # asyncio rewords bind errors ("error while attempting to bind ..."): the errno says it.
        why = os.strerror(error.errno) if error.errno and error.errno > 0 else error.strerror or str(error)
        super().__init__(f"cannot listen on {address} ({key}): {why}")
        self.key = key


LISTEN_BACKLOG = 4096  # bursts of clients arrive at once; the kernel caps it at somaxconn


class Proxy:
    def __init__(self, config: Config, *, path: str | None = None,
                 overrides: Sequence[Override] = (), reuse_port: bool = False,
                 transform: Callable[[Config], Config] | None = None) -> None:
        self.config = config
        self.config_path = path  # what RELOAD and SIGHUP read again
        self.config_overrides = tuple(overrides)
        self.config_transform = transform  # a worker's share, applied to what is read again
        self.reuse_port = reuse_port  # workers share the listen port
        # Console commands go to the other workers too (workers.ControlChannel.send).
        self.broadcast: Callable[[str, tuple[str, ...]], None] | None = None
        self.stats = Stats()
        self.router = Router(config)
        self.client_ssl = tlsconfig.client_context(config.tls, config.source)
        self.client_cert = tlsconfig.leaf_certificate(config.tls)
        self.server_tls = tlsconfig.server_tls(config.backend, config.source)
        self.upstreams: dict[Address, Upstream] = {
            address: Upstream(config, address, self.stats, self._monitor_dsn(config, address))
            for address in self.router.servers
        }
        self.sessions: set[Session] = set()
        self.cancel_keys: dict[tuple[int, bytes], Session] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deliveries: set[asyncio.Task[Any]] = set()  # of _tasks: waited for at shutdown
        self._retiring: dict[Address, asyncio.Task[None]] = {}  # servers let go once empty
        self._listeners: list[Listener] = []
        self.over_limit: set[Session] = set()  # refused for proxy.max_clients: being told so
        self.per_address: collections.Counter[str] = collections.Counter()
        self.cancels = TokenBucket(config.proxy.cancel_rate)
        self._ids = itertools.count(1)
        self._all_closed: asyncio.Event | None = None
        self.stopping = False
        self.unknown_cancels = Throttle(interval=1.0)
        self.dropped_cancels = Throttle(interval=1.0)
        self.too_many_clients = Throttle(interval=1.0)  # a flood past max_clients: a line a second
        self.admin: AdminEndpoints | None = None
        self.stats.registry.register(ProxyCollector(self))

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        try:
            for upstream in self.upstreams.values():
                await upstream.start()
            if self.config.admin.listen is not None:
                self.admin = AdminEndpoints(self)
                try:
                    await self.admin.start(self.config.admin.listen)
                except OSError as e:
                    self.admin = None
                    raise CannotListen("admin.listen", self.config.admin.listen, e) from None
                logger.info("admin endpoints on %s: /metrics /status /health /ready", self.admin.address)
            listen = self.config.proxy.listen
            try:
                listener = Listener.bind(loop, listen, lambda: Handshake(self), backlog=LISTEN_BACKLOG,
                                         reuse_port=self.reuse_port)
            except OSError as e:
                raise CannotListen("proxy.listen", listen, e) from None
        except BaseException:
            await self._finish()  # what started: the monitors, the admin endpoints
            raise
        listener.start()
        self._listeners.append(listener)
        servers = "; ".join(f"server {u.address}: {u.capacity.describe()}" for u in self.upstreams.values())
        logger.info("listening on %s; %s", ", ".join(str(a) for a in self.addresses), servers)
        if wire.CompiledWalker is None:
            logger.warning("slotproxy._walker was not built at install (no C compiler?): sessions are "
                           "relayed and followed in Python, which costs several microseconds of CPU "
                           "per query more")

    @property
    def addresses(self) -> list[Address]:
        """The addresses actually bound (the port is known here when listen port is 0)."""
        found = []
        for listener in self._listeners:
            for sock in listener.sockets:
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
        if self.admin is not None:
            await self.admin.close()
        for upstream in list(self.upstreams.values()):
            await upstream.stop()
        await self._drain_tasks()

    def _stop_listening(self) -> None:
        for listener in self._listeners:
            listener.close()

    async def _drain_tasks(self) -> None:
        # Cancel requests on their way free server slots: delivered, each within
        # backend.connect_timeout. The rest is stopped.
        if self._deliveries:
            await asyncio.wait(list(self._deliveries))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- sessions --------------------------------------------------------------------

    def open_session(self, transport: asyncio.Transport, handshake: Handshake) -> Session:
        # uvloop sets TCP_NODELAY on every TCP transport, accepted and connected.
        session = Session(self, transport, handshake, next(self._ids))
        limits = self.config.proxy
        open_now = len(self.sessions) - len(self.over_limit)
        if open_now >= limits.max_clients:
            session.over_limit = ClientError(
                Reason.TOO_MANY_CLIENTS, "53300",
                f"slotproxy: too many client connections: {open_now} open (proxy.max_clients)")
        elif limits.max_clients_per_address and \
                self.per_address[session.client_addr] >= limits.max_clients_per_address:
            session.over_limit = ClientError(
                Reason.TOO_MANY_CLIENTS, "53300",
                f"slotproxy: too many connections from {session.client_addr}: "
                f"{self.per_address[session.client_addr]} open (proxy.max_clients_per_address)")
        if session.over_limit is not None:
            self.over_limit.add(session)
        else:
            self.per_address[session.client_addr] += 1
        self.sessions.add(session)
        assert self._all_closed is not None
        self._all_closed.clear()
        session.task = self.loop.create_task(session.run())
        session.task.add_done_callback(lambda _: self._session_done(session))
        return session

    def _session_done(self, session: Session) -> None:
        try:
            session.finalize()
        except Exception:
            # A bug there must not keep the session counted: shutdown waits for the count.
            session.log.exception("internal error while closing the session")
        self.sessions.discard(session)
        if session in self.over_limit:
            self.over_limit.discard(session)
        else:
            self.per_address[session.client_addr] -= 1
            if not self.per_address[session.client_addr]:
                del self.per_address[session.client_addr]
        if not self.sessions and self._all_closed is not None:
            self._all_closed.set()

    # -- operator commands: reload, pause, resume ---------------------------------------

    async def control(self, command: str, *args: str) -> list[str]:
        """A console command: run it here, and in the other workers."""
        result = await self.apply(command, *args)
        if self.broadcast is not None:
            self.broadcast(command, args)
        return result

    async def apply(self, command: str, *args: str) -> list[str]:
        """Run an operator command here: reload, pause [db] or resume [db]."""
        if command == "reload":
            return await self.reload()
        if command == "pause":
            return [str(u.address) for u in self.pause(*args)]
        if command == "resume":
            return [str(u.address) for u in self.resume(*args)]
        raise ValueError(f"unknown command {command!r}")

    async def reload(self) -> list[str]:
        """Read the configuration again and apply it live; returns what changed.

        The whole file is validated first: if it is invalid, ConfigError is raised
        and the running configuration stays. Keys that need a restart keep their
        running values and are named in the result.
        """
        if self.config_path is None:
            raise ConfigError("reload", None, "started without --config: there is no file to read again")
        new = configuration.load(self.config_path, self.config_overrides)
        if self.config_transform is not None:
            new = self.config_transform(new)
        old = self.config
        changes = []
        for info in configuration.keys():
            before, after = info.value(old), info.value(new)
            if before == after:
                continue
            shown_before, shown_after = info.shown(before), info.shown(after)
            if shown_before == shown_after:
                shown_before, shown_after = "(secret)", "(secret, changed)"
            if not info.reload:
                changes.append(f"{info.dotted} needs a restart (still {shown_before}; "
                               f"file says {shown_after})")
            else:
                changes.append(f"{info.dotted} {shown_before} -> {shown_after}")
        if new.admission.classes != old.admission.classes:
            changes.append("admission.class entries changed")
        if new.databases != old.databases or new.fallback != old.fallback:
            changes.append("[databases] routes changed (for new sessions)")
        changes += self._overridden()
        new = dataclasses.replace(
            new, proxy=dataclasses.replace(new.proxy, listen=old.proxy.listen, workers=old.proxy.workers),
            admin=dataclasses.replace(new.admin, listen=old.admin.listen))
        client_ssl = tlsconfig.client_context(new.tls, new.source)  # new certificate files
        server_tls = tlsconfig.server_tls(new.backend, new.source)
        self.config = new
        self.client_ssl, self.server_tls = client_ssl, server_tls
        self.cancels.rate = new.proxy.cancel_rate
        self.client_cert = tlsconfig.leaf_certificate(new.tls)
        # Sessions classify and route by the new configuration from here on, so
        # lanes and upstreams are in place before the first await.
        for upstream in self.upstreams.values():
            upstream.gate.admission.set_classes(new.class_list)
        old_router, self.router = self.router, Router(new)
        added, kept = [], []
        for address in self.router.servers:
            upstream = self.upstreams.get(address)
            if upstream is None:
                upstream = self.upstreams[address] = Upstream(
                    new, address, self.stats, self._monitor_dsn(new, address))
                added.append(upstream)
            else:
                upstream.retired = False
                kept.append(upstream)
        self._reroute(old_router, added)
        for upstream in added:
            await upstream.start()
        for upstream in kept:
            await upstream.reconfigure(new, self._monitor_dsn(new, upstream.address))
        logger.info("reloaded %s: %s", self.config_path, "; ".join(changes) or "nothing changed")
        return changes

    @staticmethod
    def _monitor_dsn(config: Config, address: Address) -> str | None:
        dsn = config.monitor.dsn
        return monitor_dsn(dsn, address, config.backend.address) if dsn else None

    def _reroute(self, old_router: Router, added: list[Upstream]) -> None:
        """After a reload: waiters follow their database's new route, and servers
        no longer routed are stopped once their last session ends."""
        # A server taking over a paused server's databases starts paused.
        names = old_router.names | self.router.names | {"*"}  # "*": whatever the fallback takes
        for upstream in added:
            for name in names:
                route, before = self.router.resolve(name), old_router.resolve(name)
                if route is not None and route.server == upstream.address and before is not None \
                        and self.upstreams[before.server].gate.admission.paused:
                    upstream.gate.pause()
                    logger.info("admission to %s starts paused, as to %s before", upstream.address,
                                before.server)
                    break
        for upstream in self.upstreams.values():
            for ticket in list(upstream.gate.admission.waiters()):
                if ticket.info.route_changed():
                    upstream.gate.reroute(ticket)
        routed = set(self.router.servers)
        for address, upstream in self.upstreams.items():
            if address not in routed and not upstream.retired:
                upstream.retired = True
                logger.info("server %s is no longer routed: %d sessions left on it", address,
                            len(upstream.gate.admission.holders))
                if address not in self._retiring:  # else routed again meanwhile, and its task waits on
                    self._retiring[address] = self.spawn(self._retire(upstream))

    def _overridden(self) -> list[str]:
        """Keys the file sets one way while a command-line flag holds them another (told at
        every reload: it is how the running value came about)."""
        if not self.config_overrides or self.config_path is None:
            return []
        try:
            from_file = configuration.load(self.config_path)
            with_flags = configuration.load(self.config_path, self.config_overrides)
            defaults = configuration.from_mapping({}, "defaults")
        except ConfigError:  # the flags may be what makes it whole (--backend): nothing to say
            return []
        infos = {info.dotted: info for info in configuration.keys()}
        held = []
        for flag, dotted, _ in self.config_overrides:
            info = infos[dotted]
            in_file, by_flag = info.value(from_file), info.value(with_flags)
            # A file that leaves the key at its default has nothing to say about it.
            if in_file != by_flag and in_file != info.value(defaults):
                held.append(f"{dotted}: the file says {info.shown(in_file)}, but {flag} on the "
                            f"command line holds it at {info.shown(by_flag)}")
        return held

    async def _retire(self, upstream: Upstream) -> None:
        try:
            await upstream.gate.emptied()
        finally:
            del self._retiring[upstream.address]
        if upstream.retired:
            del self.upstreams[upstream.address]
            had_monitor = upstream.monitor is not None
            await upstream.stop()
            logger.info("server %s: its last session ended; let go%s", upstream.address,
                        ", its monitor stopped" if had_monitor else "")

    def pause(self, database: str | None = None) -> list[Upstream]:
        """Admit nobody new to the server of `database` (all servers: None)."""
        paused = self._servers_for(database)
        for upstream in paused:
            upstream.gate.pause()
        logger.info("paused admission to %s", ", ".join(str(u.address) for u in paused))
        return paused

    def resume(self, database: str | None = None) -> list[Upstream]:
        resumed = self._servers_for(database)
        for upstream in resumed:
            upstream.gate.resume()
        logger.info("resumed admission to %s", ", ".join(str(u.address) for u in resumed))
        return resumed

    def _servers_for(self, database: str | None) -> list[Upstream]:
        if database is None:
            return list(self.upstreams.values())
        route = self.router.resolve(database)
        if route is None:
            raise ValueError(f'no route for database "{database}"')
        return [self.upstreams[route.server]]

    # -- the first server: the only one unless [databases] routes to others ----------

    @property
    def primary(self) -> Upstream:
        return self.upstreams[self.router.servers[0]]

    @property
    def gate(self) -> Gate:
        return self.primary.gate

    @property
    def capacity(self) -> Snapshot:
        return self.primary.capacity

    @property
    def monitor(self) -> Monitor | None:
        return self.primary.monitor

    def spawn(self, coro: Coroutine[Any, Any, Any], deliver: bool = False) -> asyncio.Task[Any]:
        """Run a helper task the proxy keeps referenced until it ends; with `deliver`,
        one that shutting down waits for (it must be bounded in time itself)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if deliver:
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        return task
