"""A server reached over its Unix-domain socket (backend.host a directory, as in libpq).

The usual deployment beside PostgreSQL on one host. The server sees such
sessions with client_port -1, which is how these tests tell that the proxy
really used the socket.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from slotproxy.cluster import Cluster
from slotproxy.config import Address
from slotproxy.demo import one_client
from slotproxy.server import Proxy
from slotproxy.upstream import monitor_dsn

from .conftest import ALICE_PASSWORD, PeakWatcher, wait_until

OVER_SOCKET = "select count(*) from pg_stat_activity where usename = '{user}' and client_port = -1"


def at(proxy: Proxy) -> dict[str, Any]:
    a = proxy.addresses[0]
    return {"host": a.host, "port": a.port}


def over_socket(cluster: Cluster) -> dict[str, Any]:
    return {"host": cluster.socket_dir, "port": cluster.port}


async def test_clients_queue_and_reach_the_server_over_its_socket(
        pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(None, backend=over_socket(pg),
                                admission={"max_backend_slots": 3, "queue_timeout": 60})
    watcher = PeakWatcher(await asyncpg.connect(pg.dsn()), OVER_SOCKET.format(user="app"))
    results = await asyncio.gather(*(one_client(**at(proxy), user="app", database="postgres", hold=0.2)
                                     for _ in range(20)))
    peak = await watcher.stop()
    assert [o for o in results if not o.ok] == []
    assert peak == 3, f"{peak} sessions over the socket at most; 3 slots, 20 clients"


async def test_a_password_login_and_a_cancel_go_over_the_socket(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(None, backend=over_socket(pg))
    conn = await asyncpg.connect(**at(proxy), user="alice", password=ALICE_PASSWORD, database="postgres")
    assert await conn.fetchval("select client_port from pg_stat_activity where pid = pg_backend_pid()") == -1
    with pytest.raises(TimeoutError):  # asyncpg sends a cancel request on its timeout
        await conn.execute("select pg_sleep(30)", timeout=0.5)
    # Only a cancel delivered over the socket frees the backend before 30 s.
    assert await conn.fetchval("select 42", timeout=5) == 42
    await conn.close()


async def test_the_monitor_tells_its_own_socket_sessions_from_others(
        cluster_factory: Any, proxy_factory: Any) -> None:
    pg = cluster_factory(max_connections=10, superuser_reserved_connections=3)
    dsn = f"postgresql://postgres@/postgres?host={pg.socket_dir}&port={pg.port}"
    proxy = await proxy_factory(None, backend=over_socket(pg), monitor={"dsn": dsn, "interval": 0.2},
                                admission={"max_backend_slots": "auto"})
    held = [await asyncpg.connect(**at(proxy), user="app", database="postgres") for _ in range(4)]
    outsider = await asyncpg.connect(pg.dsn("app"))
    polls = proxy.monitor.polls  # type: ignore[union-attr]
    await wait_until(lambda: proxy.monitor.polls > polls + 1, "two more polls")  # type: ignore[union-attr]
    # Over a socket the server shows no client address: our sessions are known by pid alone.
    snapshot = proxy.capacity
    assert (snapshot.own, snapshot.external) == (4, 2), "4 ours; the monitor and the outsider"
    assert snapshot.capacity == 10 - 3 - 2
    for conn in [*held, outsider]:
        await conn.close()


def test_a_routes_monitor_dsn_points_at_its_socket_and_back() -> None:
    primary = Address("/run/postgresql", 5432)
    socket_dsn = "postgresql://mon@/postgres?host=/run/postgresql&sslmode=disable"
    assert monitor_dsn(socket_dsn, Address("10.0.3.20", 6543), primary) == \
        "postgresql://mon@10.0.3.20:6543/postgres?sslmode=disable"
    assert monitor_dsn("postgresql://mon@10.0.3.10/postgres", Address("/tmp/pg", 5433), primary) == \
        "postgresql://mon@/postgres?host=/tmp/pg&port=5433"
    # No user part: the "//" stays (libpq would misread "postgresql:/postgres"); a space as %20.
    assert monitor_dsn("postgresql:///postgres?options=-c%20jit%3Doff", Address("/tmp/pg", 5433), primary) \
        == "postgresql:///postgres?options=-c%20jit%3Doff&host=/tmp/pg&port=5433"
