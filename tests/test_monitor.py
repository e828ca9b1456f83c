"""Server-aware capacity, end to end: the server's real slots, shared with everyone.

Password (SCRAM) clients are used where it matters: a refusal in the reserved
slots comes after their password exchange and cannot be retried for them, so
only they show whether the proxy kept out of that region.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import pytest

from slotproxy.cluster import Cluster
from slotproxy.demo import one_client
from slotproxy.server import Proxy

from .conftest import ALICE_PASSWORD, HBA, PeakWatcher, wait_until


def at(proxy: Proxy) -> dict[str, Any]:
    a = proxy.addresses[0]
    return {"host": a.host, "port": a.port}


async def alice(proxy: Proxy, hold: float = 0.05) -> Any:
    """A SCRAM client through the proxy: connect, hold the session, close."""
    started = asyncio.get_running_loop().time()
    try:
        conn = await asyncpg.connect(**at(proxy), user="alice", password=ALICE_PASSWORD,
                                     database="postgres", timeout=60)
    except asyncpg.PostgresError as e:
        return e
    try:
        await conn.execute("select pg_sleep($1)", hold)
    finally:
        await conn.close()
    return asyncio.get_running_loop().time() - started


def monitored(cluster: Cluster, interval: float = 0.2, **admission: Any) -> dict[str, Any]:
    return {"monitor": {"dsn": cluster.dsn(), "interval": interval},
            "admission": {"max_backend_slots": "auto", "queue_timeout": 60, **admission}}


async def test_capacity_follows_slots_taken_by_others(
        cluster_factory: Any, proxy_factory: Any) -> None:
    pg = cluster_factory(max_connections=10, superuser_reserved_connections=3)
    proxy = await proxy_factory(pg, **monitored(pg, interval=0.5))
    outsiders = [await asyncpg.connect(pg.dsn("app")) for _ in range(5)]
    dba = await asyncpg.connect(pg.dsn())  # a superuser's session: it takes a slot too
    # 10 slots: 3 reserved, 5 outsiders, our monitor, the DBA: nothing left for clients.
    await wait_until(lambda: proxy.capacity.capacity == 0 and proxy.capacity.external == 7,
                     "the monitor to count the outsiders, itself and the DBA")

    clients = [asyncio.create_task(alice(proxy)) for _ in range(40)]
    await wait_until(lambda: proxy.gate.admission.waiting == 40, "forty clients waiting")
    for conn in outsiders:
        await conn.close()
    await wait_until(lambda: len(proxy.gate.admission.holders) > 0, "the first admission")

    results = await asyncio.gather(*clients)
    # A client let into a slot the server did not have would be refused after its password
    # exchange (53300), which the proxy cannot retry: it would be among the errors.
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert proxy.gate.post_auth_refusals == 0 and proxy.gate.server_refusals == 0
    await wait_until(lambda: proxy.capacity.external == 2 and proxy.capacity.capacity == 5,
                     "capacity 5: the seven usable slots less the monitor and the DBA")
    await dba.close()


async def test_a_queue_timeout_names_the_servers_figures_when_the_monitor_sets_capacity(
        cluster_factory: Any, proxy_factory: Any) -> None:
    pg = cluster_factory(max_connections=10, superuser_reserved_connections=3)
    proxy = await proxy_factory(pg, **monitored(pg, queue_timeout=0.5))
    outsiders = [await asyncpg.connect(pg.dsn("app")) for _ in range(5)]
    await wait_until(lambda: proxy.capacity.capacity == 1, "capacity 1: 7 usable, 6 taken by others")
    holder = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    with pytest.raises(asyncpg.TooManyConnectionsError) as refused:
        await asyncpg.connect(**at(proxy), user="app", database="postgres")
    # Not "raise admission.max_backend_slots": it is "auto", the server's figures decide.
    assert refused.value.detail == (
        "0 other clients are waiting; 1 of 1 slots are in use (the server's free slots as the "
        "monitor saw them: 7 usable, 6 taken by other clients).")
    await holder.close()
    for conn in outsiders:
        await conn.close()


async def test_a_password_client_is_kept_out_of_the_reserved_slots(
        cluster_factory: Any, proxy_factory: Any) -> None:
    pg = cluster_factory(max_connections=10, superuser_reserved_connections=3)
    guarded = await proxy_factory(pg, **monitored(pg))
    outsiders = [await asyncpg.connect(pg.dsn("app")) for _ in range(6)]  # + the monitor: 7 used
    await wait_until(lambda: guarded.capacity.capacity == 0, "capacity 0: only reserved slots left")

    # A fixed cap does not know the server is in its reserved slots: the client walks in.
    blind = await proxy_factory(pg, admission={"max_backend_slots": 8})
    trapped = await alice(blind)
    assert isinstance(trapped, asyncpg.TooManyConnectionsError)
    assert "remaining connection slots are reserved" in str(trapped)
    assert blind.gate.post_auth_refusals == 1

    # The monitored proxy holds it back instead, for as long as it takes.
    waiting = asyncio.create_task(alice(guarded))
    polls = guarded.monitor.polls
    await wait_until(lambda: guarded.monitor.polls >= polls + 3, "three more polls")
    assert not waiting.done() and guarded.gate.admission.waiting == 1
    await outsiders.pop().close()
    assert not isinstance(await waiting, Exception)
    assert guarded.gate.post_auth_refusals == 0
    for conn in outsiders:
        await conn.close()


async def test_trust_clients_refused_after_authentication_are_retried(
        cluster_factory: Any, proxy_factory: Any) -> None:
    pg = cluster_factory(max_connections=10, superuser_reserved_connections=3)
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 8, "queue_timeout": 60})
    outsiders = [await asyncpg.connect(pg.dsn("app")) for _ in range(7)]  # only reserved left
    client = asyncio.create_task(one_client(**at(proxy), user="app", database="postgres", hold=0.05))
    await wait_until(lambda: proxy.gate.server_refusals >= 2,
                     "the proxy to retry the refusal that followed AuthenticationOk")
    await outsiders.pop().close()
    outcome = await client
    assert outcome.ok, outcome
    for conn in outsiders:
        await conn.close()


MONITOR_HBA = "host all slotmon 127.0.0.1/32 scram-sha-256\n" + HBA


@pytest.mark.parametrize("problem", ["role missing", "wrong password"])
async def test_a_blind_monitor_falls_back_to_the_fixed_cap_and_recovers(
        cluster_factory: Any, proxy_factory: Any, caplog: Any, problem: str) -> None:
    caplog.set_level(logging.INFO, logger="slotproxy")
    pg = cluster_factory(max_connections=10, hba=MONITOR_HBA)
    if problem == "wrong password":
        pg.psql("create role slotmon login password 'other' in role pg_monitor")
    proxy = await proxy_factory(pg, monitor={"dsn": pg.dsn("slotmon", password="s3cret"), "interval": 0.1},
                                admission={"max_backend_slots": 2})
    assert proxy.capacity.blind and proxy.capacity.capacity == 2
    # The server does not tell a missing role from a wrong password.
    assert (f'monitor of 127.0.0.1:{pg.port} blind (28P01: password authentication failed '
            'for user "slotmon")') in caplog.text
    assert "admitting by capacity 2 (monitor blind" in caplog.text

    conns = [await asyncpg.connect(**at(proxy), user="app", database="postgres") for _ in range(2)]
    third = asyncio.create_task(asyncpg.connect(**at(proxy), user="app", database="postgres"))
    await wait_until(lambda: proxy.gate.admission.waiting == 1, "the fixed cap holding the third")

    def blind_lines() -> int:
        return sum(1 for r in caplog.records if " blind (" in r.getMessage()
                   and r.getMessage().startswith("monitor of"))

    refused = 'password authentication failed for user "slotmon"'
    await wait_until(lambda: pg.log_text().count(refused) >= 3, "the monitor to retry twice")
    assert blind_lines() == 1, "the change is logged once, not at every retry"

    if problem == "role missing":
        pg.psql("create role slotmon login password 's3cret' in role pg_monitor")
    else:
        pg.psql("alter role slotmon password 's3cret'")
    await wait_until(lambda: not proxy.capacity.blind, "the monitor to see the server again", timeout=15)
    assert f"monitor of 127.0.0.1:{pg.port} sees the server again" in caplog.text
    assert proxy.capacity.capacity == 2  # min(the fixed cap, what the server has free)
    for conn in conns:
        await conn.close()
    await (await third).close()


async def test_a_monitor_blind_for_many_polls_keeps_the_last_capacity_it_saw(
        cluster_factory: Any, proxy_factory: Any) -> None:
    pg = cluster_factory(max_connections=10, superuser_reserved_connections=3, hba=MONITOR_HBA)
    pg.psql("create role slotmon login password 's3cret' in role pg_monitor")
    proxy = await proxy_factory(pg, monitor={"dsn": pg.dsn("slotmon", password="s3cret"), "interval": 0.1},
                                admission={"max_backend_slots": "auto", "queue_timeout": 60})
    await wait_until(lambda: proxy.capacity.capacity == 6, "capacity 6: 7 usable less the monitor")
    pg.psql("alter role slotmon password 'other'")
    pg.psql("select pg_terminate_backend(pid) from pg_stat_activity where usename = 'slotmon'")
    await wait_until(lambda: proxy.capacity.blind, "the monitor blind")
    refused = 'password authentication failed for user "slotmon"'
    await wait_until(lambda: pg.log_text().count(refused) >= 3, "the monitor to stay blind a while")

    # Password clients: one let in past the server's slots would be refused after its
    # exchange, for good. The last capacity seen holds them back instead.
    clients = [asyncio.create_task(alice(proxy, hold=1.0)) for _ in range(9)]
    await wait_until(lambda: proxy.gate.admission.waiting == 3, "three clients waiting")
    assert len(proxy.gate.admission.holders) == 6 and proxy.capacity.capacity == 6
    results = await asyncio.gather(*clients)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert proxy.gate.post_auth_refusals == 0


async def test_two_proxies_share_one_server(cluster_factory: Any, proxy_factory: Any) -> None:
    # 12 slots, 3 reserved: 9 for non-superusers, 2 of them taken by the monitors and
    # 1 by the watcher. N=2 instances, max_connecting=1: headroom 2*(N-1)*1 = 2.
    pg = cluster_factory(max_connections=12, superuser_reserved_connections=3)
    settings = monitored(pg, interval=0.1, headroom=2, max_connecting=1)
    proxies = [await proxy_factory(pg, **settings) for _ in range(2)]
    watcher = PeakWatcher(await asyncpg.connect(pg.dsn()))
    await wait_until(lambda: all(p.capacity.peers == 2 for p in proxies), "each to see its peer")

    results = await asyncio.gather(*(alice(p, hold=0.05) for p in proxies for _ in range(60)))
    peak = await watcher.stop()
    # Going past the server's slots would show as a password client refused after its
    # exchange (53300, not retryable): among the errors. The peak is what they shared.
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(results) == 120 and not errors, errors[:3]
    assert all(p.gate.post_auth_refusals == 0 for p in proxies)
    # 6 slots for non-superusers, less the headroom, 2: what the two may fill between them.
    assert peak >= 4, f"the proxies left room unused: peak {peak}"


async def test_no_fork_storm_when_the_server_comes_back(cluster_factory: Any, proxy_factory: Any) -> None:
    pg = cluster_factory(max_connections=20)
    proxy = await proxy_factory(pg, **monitored(pg, interval=0.2, max_backend_slots=5, max_connecting=3))
    holders = [await asyncpg.connect(**at(proxy), user="app", database="postgres") for _ in range(5)]
    waiters = [asyncio.create_task(one_client(**at(proxy), user="app", database="postgres", hold=0.2))
               for _ in range(30)]
    await wait_until(lambda: proxy.gate.admission.waiting == 30, "thirty clients waiting")

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, pg.stop)
    await wait_until(lambda: proxy.capacity.blind, "the monitor to notice the server is gone")
    proxy.gate.admission.peak_connecting = 0
    await loop.run_in_executor(None, pg.start)
    outcomes = await asyncio.gather(*waiters)

    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok][:3]
    assert proxy.gate.admission.peak_connecting <= 3
    for conn in holders:
        conn.terminate()
