"""One PostgreSQL server the proxy sends clients to: its budget and queue, its
monitor and capacity, and the reclaiming of idle sessions while clients wait."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from . import backend, capacity, wire
from .admission import Admission, Limits
from .capacity import ServerView, Snapshot
from .config import Address, Config
from .gate import Gate
from .metrics import Stats
from .monitor import Monitor, OwnSessions

if TYPE_CHECKING:
    from .session import Session

logger = logging.getLogger("slotproxy.upstream")


def monitor_dsn(dsn: str, address: Address, primary: Address) -> str:
    """The monitor's DSN for `address`: as configured for the primary server, else
    the same role and database at this server's host and port."""
    if address == primary:
        return dsn
    parts = urlsplit(dsn)
    userinfo = parts.netloc.rpartition("@")[0]
    # host and port given as query parameters would override the netloc's
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("host", "port")]
    if address.socket_path is not None:  # a socket directory goes in the query, as libpq takes it
        netloc = f"{userinfo}@" if userinfo else ""
        query += [("host", address.host), ("port", str(address.port))]
    else:
        host = f"[{address.host}]" if ":" in address.host else address.host
        netloc = f"{userinfo}@{host}:{address.port}" if userinfo else f"{host}:{address.port}"
    # Not urlunsplit: it drops the "//" of an empty netloc. %20, not "+", for a space: libpq
    # reads "+" as itself.
    query_text = urlencode(query, safe="/", quote_via=quote)
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query_text}" if query_text else "")


class Upstream:
    def __init__(self, config: Config, address: Address, stats: Stats, monitor_dsn: str | None) -> None:
        self.config = config
        self.address = address
        self.stats = stats
        fixed = config.admission.fixed_slots
        # Until the monitor's first poll, or without a monitor, the fixed cap holds.
        self.capacity = (capacity.blind(fixed, None, "no poll yet") if monitor_dsn
                         else Snapshot(capacity=fixed, blind=False))
        self.gate = Gate(Admission(self._limits(self.capacity), config.class_list))
        self.monitor: Monitor | None = None
        self._monitor_sees: bool | None = None  # None until the first poll
        if monitor_dsn:
            self.monitor = Monitor(monitor_dsn, config.monitor.interval,
                                   config.backend.connect_timeout, self._own_sessions, self._on_view)
        self.reclaimed = 0
        self.retired = False  # no longer routed (reload): stopped once its sessions end
        self._reaper: asyncio.Handle | None = None
        self._last_view: ServerView | None = None
        self._monitor_dsn = monitor_dsn
        self._tls: tuple[float, bool] | None = None  # (when asked, whether it said 'S')
        self._tls_probe: asyncio.Task[bool | None] | None = None

    async def start(self) -> None:
        if self.monitor is not None:
            await self.monitor.start()

    async def reconfigure(self, config: Config, monitor_dsn: str | None) -> None:
        """A reloaded configuration: new limits, classes and monitor settings, live."""
        self.config = config
        self.gate.admission.set_classes(config.class_list)
        if monitor_dsn != self._monitor_dsn:
            if self.monitor is not None:
                await self.monitor.stop()
            self.monitor = None
            self._monitor_dsn = monitor_dsn
            self._monitor_sees = None
            self._last_view = None
            if monitor_dsn:
                self.monitor = Monitor(monitor_dsn, config.monitor.interval,
                                       config.backend.connect_timeout, self._own_sessions, self._on_view)
                await self.monitor.start()
        elif self.monitor is not None:
            self.monitor.interval = config.monitor.interval
        fixed = config.admission.fixed_slots
        if self.monitor is None:
            self.capacity = Snapshot(capacity=fixed, blind=False)
        elif self._last_view is not None and not self.capacity.blind:
            self.capacity = capacity.from_view(self._last_view, fixed, config.admission.headroom)
        else:
            self.capacity = capacity.blind(fixed, self._seen(fixed), self.capacity.why or "no poll yet")
        self.gate.update(self._limits(self.capacity))
        if self._reaper is not None:  # its next check was timed by the old idle timeouts
            self._reaper.cancel()
            self._reaper = None
        if self.gate.admission.waiting:
            self.client_waiting()

    async def accepts_tls(self) -> bool:
        """Whether the server answers SSLRequest with 'S' (asked again after a minute)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._tls is None or now - self._tls[0] > 60:
            if self._tls_probe is None:  # one question in flight, however many clients ask
                self._tls_probe = loop.create_task(self._probe_tls())
            answer = await asyncio.shield(self._tls_probe)
            if answer is not None:
                return answer
            return bool(self._tls and self._tls[1])  # unreachable now: keep what it said last
        return self._tls[1]

    async def _probe_tls(self) -> bool | None:
        try:
            answer = await backend.probe_tls(self.address, self.config.backend.connect_timeout)
            if answer is not None:
                self._tls = (asyncio.get_running_loop().time(), answer)
            return answer
        finally:
            self._tls_probe = None

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self.monitor is not None:
            await self.monitor.stop()

    # -- capacity --------------------------------------------------------------------

    def _limits(self, snapshot: Snapshot) -> Limits:
        cfg = self.config.admission
        return Limits(
            max_slots=snapshot.capacity,
            max_queue=cfg.max_queue,
            max_connecting=cfg.max_connecting,
            # Other proxies cannot see our newest sessions until they poll: keep those few.
            max_unseen=cfg.max_connecting if snapshot.peers > 1 else None,
        )

    def _seen(self, fixed: int | None) -> Snapshot | None:
        """The capacity of the monitor's last view, under the settings in force (a reload
        may have changed the cap or the headroom since)."""
        if self._last_view is None:
            return None
        return capacity.from_view(self._last_view, fixed, self.config.admission.headroom)

    def _own_sessions(self) -> OwnSessions:
        by_pid: dict[int, Any] = {}
        by_endpoint: dict[tuple[str, int], Any] = {}
        for ticket in self.gate.admission.holders:
            session: Session = ticket.info
            if session.backend_key is not None:
                by_pid[session.backend_key[0]] = ticket
            if session.backend_endpoint is not None:
                by_endpoint[session.backend_endpoint] = ticket
        return OwnSessions(by_pid, by_endpoint)

    def _on_view(self, view: ServerView | None, seen: set[Any], why: str) -> None:
        fixed = self.config.admission.fixed_slots
        previous = self.capacity
        sees = view is not None
        if view is None:
            snapshot = capacity.blind(fixed, self._seen(fixed), why)
        else:
            self._last_view = view
            snapshot = capacity.from_view(view, fixed, self.config.admission.headroom)
        if sees != self._monitor_sees:  # log the change once, not every poll
            if not sees:
                logger.warning("monitor of %s blind (%s): admitting by %s",
                               self.address, why, snapshot.describe())
            elif self._monitor_sees is False:
                logger.info("monitor of %s sees the server again: %s", self.address, snapshot.describe())
            else:
                logger.info("monitor of %s: %s", self.address, snapshot.describe())
            self._monitor_sees = sees
        elif sees and not snapshot.same_as(previous):
            logger.info("%s %s", self.address, snapshot.describe())
        self.capacity = snapshot
        if view is None:
            self.gate.update(self._limits(snapshot), viewing=False)
        else:
            self.gate.update(self._limits(snapshot), seen=seen, viewing=True)

    # -- reclaiming idle sessions while clients wait ---------------------------------

    def client_waiting(self) -> None:
        """A client started waiting for this server: look for idle sessions to end."""
        cfg = self.config.admission
        if self._reaper is None and (cfg.idle_timeout or cfg.idle_in_transaction_timeout):
            self._reaper = asyncio.get_running_loop().call_soon(self._reclaim)

    def _reclaim(self) -> None:
        """End the sessions idle too long, oldest idle first, as many as let waiters in."""
        self._reaper = None
        admission = self.gate.admission
        cfg = self.config.admission
        limits = [t for t in (cfg.idle_timeout, cfg.idle_in_transaction_timeout) if t]
        if not admission.waiting or not limits:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        # A session that turns idle later is due no sooner than this.
        next_check = now + min(limits)
        due: list[tuple[float, Session, float]] = []
        ending = []
        for ticket in admission.holders:
            session: Session = ticket.info
            if session.reclaiming:
                ending.append(ticket)
                continue
            tracker = session.tracker
            if tracker is None:
                continue
            state = tracker.state
            if state == wire.IDLE:
                limit = cfg.idle_timeout
            elif state in (wire.IDLE_IN_TRANSACTION, wire.IDLE_IN_FAILED_TRANSACTION):
                limit = cfg.idle_in_transaction_timeout
            else:
                continue  # active, or still starting: never ended
            if not limit:
                continue
            if tracker.since + limit <= now:
                due.append((tracker.since, session, limit))
            else:
                next_check = min(next_check, tracker.since + limit)
        due.sort(key=lambda item: item[0])
        chosen = set(admission.reclaimable([s.ticket for _, s, _ in due], ending))
        waiting = admission.waiting
        for since, session, limit in due:
            if session.ticket in chosen:
                self.stats.reclaimed[str(self.address), session.state] += 1
                session.reclaim(now - since, limit, waiting)
                self.reclaimed += 1
        self._reaper = loop.call_at(next_check, self._reclaim)
