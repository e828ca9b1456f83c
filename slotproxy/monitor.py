"""The proxy's own view of the server's slots, over one asyncpg connection.

Every `interval` it reads max_connections, the reserved slots and the client
backends in pg_stat_activity, and tells which of those are this proxy's
sessions: by backend pid (from BackendKeyData; visible to any role, and
unchanged by NAT) or by the address and port of the proxy's end of the
connection (client_addr, client_port). Sessions still authenticating are not
in pg_stat_activity yet on PostgreSQL 15; admission counts those itself.

When it cannot connect or a poll fails it reports itself blind, then tries
again with a backoff; it never stops the proxy.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import asyncpg

from .capacity import ServerView
from .config import parse_ip

logger = logging.getLogger("slotproxy.monitor")

# Every slotproxy monitor connects under this name, so instances see each other.
APPLICATION_NAME = "slotproxy-monitor"

QUERY = """
select s.max_connections, s.superuser_reserved, s.reserved,
       a.pid, host(a.client_addr) as addr, a.client_port as port,
       coalesce(a.application_name = $1, false) as is_monitor
from (select current_setting('max_connections')::int as max_connections,
             current_setting('superuser_reserved_connections')::int as superuser_reserved,
             coalesce(current_setting('reserved_connections', true), '0')::int as reserved) s
left join pg_stat_activity a on a.backend_type = 'client backend'
"""


@dataclass(frozen=True, slots=True)
class OwnSessions:
    """The proxy's server connections, by backend pid and by its local endpoint."""

    by_pid: Mapping[int, Hashable]
    by_endpoint: Mapping[tuple[str, int], Hashable]


@functools.lru_cache(maxsize=1024)  # per connection and per polled row: few distinct addresses
def normalize_host(host: str) -> str:
    ip = parse_ip(host)
    return host if ip is None else ip.compressed


def read_view(rows: list[Mapping], own: OwnSessions) -> tuple[ServerView, set[Hashable]]:
    """A poll's rows into a ServerView, and which of our sessions it showed."""
    first = rows[0]
    matched: set[Hashable] = set()
    backends = peers = 0
    for row in rows:
        if row["pid"] is None:  # the server reported no client backend at all
            continue
        backends += 1
        peers += row["is_monitor"]
        mine = own.by_pid.get(row["pid"])
        if mine is None and row["addr"] is not None:
            mine = own.by_endpoint.get((normalize_host(row["addr"]), row["port"]))
        if mine is not None:
            matched.add(mine)
    view = ServerView(
        max_connections=first["max_connections"],
        superuser_reserved=first["superuser_reserved"],
        reserved=first["reserved"],
        client_backends=backends,
        own=len(matched),
        peers=max(1, peers),
    )
    return view, matched


ViewCallback = Callable[[ServerView | None, set[Hashable], str], None]


class Monitor:
    def __init__(self, dsn: str, interval: float, connect_timeout: float,
                 own: Callable[[], OwnSessions], on_view: ViewCallback) -> None:
        self.dsn = dsn
        self.interval = interval
        self.connect_timeout = connect_timeout
        self._own = own
        self._on_view = on_view
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.blind_since: float | None = None
        self.polls = 0

    async def start(self) -> None:
        """One poll now (blind if it fails), then polls in the background."""
        await self._poll_once()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._close()

    async def _run(self) -> None:
        delay = self.interval
        while True:
            await asyncio.sleep(delay)
            if await self._poll_once():
                delay = self.interval
            else:
                # Back off while blind, up to ten intervals.
                delay = min(delay * 2, self.interval * 10)

    async def _poll_once(self) -> bool:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    self.dsn, timeout=self.connect_timeout,
                    server_settings={"application_name": APPLICATION_NAME})
            rows = await self._conn.fetch(QUERY, APPLICATION_NAME,
                                          timeout=max(2.0, 5 * self.interval))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any failure only makes us blind
            await self._close()
            self._blind(_describe(e))
            return False
        view, matched = read_view(rows, self._own())
        self.polls += 1
        self.blind_since = None
        self._on_view(view, matched, "")
        return True

    def _blind(self, why: str) -> None:
        if self.blind_since is None:
            self.blind_since = asyncio.get_running_loop().time()
        self._on_view(None, set(), why)

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2)
            except (OSError, TimeoutError, asyncpg.PostgresError):
                conn.terminate()


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncpg.PostgresError):
        return f"{error.sqlstate}: {error}"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return f"{type(error).__name__}: {error}"
