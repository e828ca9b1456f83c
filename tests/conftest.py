"""Fixtures: throwaway PostgreSQL clusters (initdb once, copied per test) and proxies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import pytest
import uvloop

from slotproxy import config, relay, wire
from slotproxy.cluster import Cluster, Template
from slotproxy.server import Proxy

# A password user (SCRAM) beside trust for everyone else.
HBA = """\
host  all alice 127.0.0.1/32 scram-sha-256
host  all all   127.0.0.1/32 trust
host  all all   ::1/128      trust
local all alice              scram-sha-256
local all all                trust
"""
ALICE_PASSWORD = "wonderland"
ROLES_SQL = (f"create role app login; create role alice login password '{ALICE_PASSWORD}'; "
             "create role repl login replication;")

# Session tracking and the relay's per-chunk work run compiled, or on the reference
# versions where no compiler was at hand at install: the tests of both run on both.
_NOT_BUILT = pytest.mark.skipif(wire.CompiledWalker is None,
                                reason="slotproxy._walker was not built (no C compiler at install)")
WALKERS = [
    pytest.param(wire.Walker, id="python-walker"),
    pytest.param(wire.CompiledWalker, id="compiled-walker", marks=_NOT_BUILT),
]
PUMPS = [
    pytest.param(relay.PyPump, id="python-pump"),
    pytest.param(relay.CompiledPump, id="compiled-pump", marks=_NOT_BUILT),
]
# A plain session is relayed on its sockets (relay.SocketRelay, compiled only), a TLS one
# on transports with either pump: tests of how sessions end run on each.
RELAYS = [
    pytest.param(("sockets", relay.CompiledPump), id="socket-relay", marks=_NOT_BUILT),
    pytest.param(("transports", relay.CompiledPump), id="transport-relay", marks=_NOT_BUILT),
    pytest.param(("transports", relay.PyPump), id="transport-relay-python-pump"),
]


@pytest.fixture(params=RELAYS)
def relay_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which relay the proxies of this test use: "sockets" or "transports"."""
    kind, pump = request.param
    monkeypatch.setattr(relay, "SOCKETS", kind == "sockets")
    monkeypatch.setattr(relay, "DEFAULT_PUMP", pump)
    return kind


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def pg_template() -> Iterator[Template]:
    template = Template(init_sql=ROLES_SQL)
    yield template
    template.remove()


@pytest.fixture
def cluster_factory(pg_template: Template) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**kwargs: Any) -> Cluster:
        kwargs.setdefault("hba", HBA)
        cluster = pg_template.cluster(**kwargs)
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    remove_all(made)


def remove_all(clusters: list[Any]) -> None:
    """Remove every one of `clusters`, each even if another failed; then raise the first error."""
    errors = []
    for cluster in clusters:
        try:
            cluster.remove()
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def pg(cluster_factory: Callable[..., Cluster]) -> Cluster:
    """max_connections=10 and no reserved slots: the proxy's 8 slots always fit."""
    return cluster_factory(max_connections=10, superuser_reserved_connections=0)


ProxyFactory = Callable[..., "asyncio.Future[Proxy]"]


PROXY_CLOSE_TIMEOUT = 30.0


@pytest.fixture
async def proxy_factory() -> AsyncIterator[Callable[..., Any]]:
    started: list[Proxy] = []

    async def make(cluster: Cluster | None, **sections: dict[str, Any]) -> Proxy:
        """A started proxy; with no cluster there is no [backend] (routes only)."""
        data: dict[str, dict[str, Any]] = {"proxy": {"listen": "127.0.0.1:0"}}
        if cluster is not None:
            data["backend"] = {"host": cluster.host, "port": cluster.port}
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        proxy = Proxy(config.from_mapping(data, "test"))
        await proxy.start()
        started.append(proxy)
        return proxy

    yield make
    stuck = []
    for proxy in started:
        try:
            # Bounded: a proxy that cannot close (a leaked session) fails the test, not hangs it.
            await asyncio.wait_for(proxy.abort(), PROXY_CLOSE_TIMEOUT)
        except TimeoutError:
            stuck.append(proxy)
    assert not stuck, f"{len(stuck)} proxies did not close within {PROXY_CLOSE_TIMEOUT} s"


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)  # wait_until's poll interval


class PeakWatcher:
    """The highest count a query gave, sampled from `conn` until stop() (which closes it).

    By default the server's non-superuser client backends, seen from a superuser connection.
    """

    SQL = ("select count(*) from pg_stat_activity a join pg_roles r on r.rolname = a.usename "
           "where a.backend_type = 'client backend' and not r.rolsuper")

    def __init__(self, conn: asyncpg.Connection, sql: str = SQL) -> None:
        self.conn = conn
        self.sql = sql
        self.peak = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, await self.conn.fetchval(self.sql))
            await asyncio.sleep(0.005)  # sampling interval, not a wait

    async def stop(self) -> int:
        """The peak; raises if sampling failed, as a peak it stopped counting means nothing."""
        self.task.cancel()
        [outcome] = await asyncio.gather(self.task, return_exceptions=True)
        await self.conn.close()
        if not isinstance(outcome, asyncio.CancelledError):
            raise AssertionError(f"the peak watcher stopped sampling: {outcome!r}")
        return self.peak
