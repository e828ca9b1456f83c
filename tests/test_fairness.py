"""Fair shares, bypass lanes, several databases, and reclaiming idle slots: end to end."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import pytest

from slotproxy import wire
from slotproxy.cluster import Cluster
from slotproxy.server import Proxy

from .conftest import WALKERS, wait_until
from .pgraw import TERMINATE, RawClient, query


def at(proxy: Proxy) -> dict[str, Any]:
    a = proxy.addresses[0]
    return {"host": a.host, "port": a.port}


def lane_held(proxy: Proxy, name: str) -> int:
    return len(proxy.gate.admission.lanes[name].holders)


def lane_waiting(proxy: Proxy, name: str) -> int:
    return proxy.gate.admission.lanes[name].waiting


class Outcome:
    def __init__(self, wait: float, sqlstate: str | None = None) -> None:
        self.wait = wait
        self.sqlstate = sqlstate
        self.ok = sqlstate is None

    def __repr__(self) -> str:
        return f"<Outcome {self.sqlstate or 'ok'} after {self.wait:.3f} s>"


async def app_client(proxy: Proxy, app: str, hold: float) -> Outcome:
    """Connect as `app`, hold the session `hold` seconds running a query, close."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        conn = await asyncpg.connect(**at(proxy), user="app", database="postgres", timeout=60,
                                     server_settings={"application_name": app})
    except asyncpg.PostgresError as e:
        return Outcome(loop.time() - started, e.sqlstate)
    waited = loop.time() - started
    await conn.execute("select pg_sleep($1)", hold)
    await conn.close()
    return Outcome(waited)


def p95(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))]


def by_app(*names: str, **extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": n, "match": {"application_name": n}, **extra.get(n, {})} for n in names]


# -- shares ------------------------------------------------------------------------------------


async def test_weights_share_the_slots_three_to_one(pg: Cluster, proxy_factory: Any) -> None:
    classes = by_app("web", "cron", web={"weight": 3}, cron={"weight": 1})
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 6, "queue_timeout": 60,
                                               "class": classes})
    samples: dict[str, list[int]] = {"web": [], "cron": []}

    async def sample() -> None:
        while True:
            if lane_waiting(proxy, "web") and lane_waiting(proxy, "cron"):  # both flooding
                for name in samples:
                    samples[name].append(lane_held(proxy, name))
            await asyncio.sleep(0.005)  # sampling interval, not a wait

    sampler = asyncio.create_task(sample())
    runs = await asyncio.gather(*(app_client(proxy, app, hold=0.1)
                                  for _ in range(40) for app in ("cron", "web")))
    sampler.cancel()
    assert all(o.ok for o in runs), [o for o in runs if not o.ok][:3]
    web = sum(samples["web"]) / len(samples["web"])
    cron = sum(samples["cron"]) / len(samples["cron"])
    assert len(samples["web"]) > 50, "both classes must have flooded for a while"
    assert abs(web - 4.5) <= 1 and abs(cron - 1.5) <= 1, f"web held {web:.2f}, cron {cron:.2f} of 6"
    waits = {app: [o.wait for o in runs[i::2]] for i, app in enumerate(("cron", "web"))}
    assert p95(waits["web"]) < p95(waits["cron"])


async def test_min_slots_are_guaranteed_while_the_class_waits(pg: Cluster, proxy_factory: Any) -> None:
    classes = by_app("batch", "ops", batch={"weight": 10}, ops={"min_slots": 2})
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 6, "queue_timeout": 60,
                                               "class": classes})
    batch = [asyncio.create_task(app_client(proxy, "batch", hold=0.3)) for _ in range(40)]
    await wait_until(lambda: lane_held(proxy, "batch") == 6, "batch holding every slot")
    ops = [asyncio.create_task(app_client(proxy, "ops", hold=1.0)) for _ in range(3)]
    await wait_until(lambda: lane_held(proxy, "ops") == 2,
                     "ops to get its two guaranteed slots while batch floods")
    assert lane_waiting(proxy, "batch") > 0, "batch still flooding"
    assert all(o.ok for o in await asyncio.gather(*batch, *ops))


async def test_a_queue_timeout_says_what_held_the_client(pg: Cluster, proxy_factory: Any) -> None:
    classes = by_app("cron", cron={"max_slots": 1, "queue_timeout": 0.5})
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 5, "queue_timeout": 0.5,
                                               "class": classes})

    async def refused(app: str) -> str:
        with pytest.raises(asyncpg.TooManyConnectionsError) as e:
            await asyncpg.connect(**at(proxy), user="app", database="postgres",
                                  server_settings={"application_name": app})
        return e.value.detail

    cron = await asyncpg.connect(**at(proxy), user="app", database="postgres",
                                 server_settings={"application_name": "cron"})
    # Room on the server, none in the class: the class's key is named, not the server's.
    assert await refused("cron") == ("0 other clients are waiting; class cron holds 1 of its 1 slots "
                                     "(admission.class.cron.max_slots).")
    proxy.pause()
    assert await refused("web") == "0 other clients are waiting; admission to this server is paused (PAUSE)."
    proxy.resume()
    await cron.close()


# -- bypass lanes --------------------------------------------------------------------------------


async def test_a_bypass_class_and_replication_skip_the_queue(pg: Cluster, proxy_factory: Any) -> None:
    classes = [{"name": "dba", "match": {"user": "postgres"}, "bypass": True}]
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 2, "queue_timeout": 60,
                                               "class": classes})
    holders = [await asyncpg.connect(**at(proxy), user="app", database="postgres") for _ in range(2)]
    crowd = [asyncio.create_task(app_client(proxy, "crowd", hold=0.01)) for _ in range(100)]
    await wait_until(lambda: proxy.gate.admission.waiting == 100, "a hundred clients waiting")

    dba = await asyncio.wait_for(asyncpg.connect(**at(proxy), user="postgres", database="postgres"), 5)
    assert await dba.fetchval("select current_user") == "postgres"
    assert proxy.gate.admission.waiting == 100, "nobody was admitted to make room for it"

    walsender = await RawClient.connect(**at(proxy))
    walsender.send_startup(user="repl", replication="database")
    await walsender.read_until("Z", timeout=5)  # in at once: wal sender slots, not ours
    walsender.send(TERMINATE)

    await dba.close()
    for conn in holders:
        await conn.close()
    assert all(o.ok for o in await asyncio.gather(*crowd))


# -- several databases ------------------------------------------------------------------------


async def test_two_databases_on_two_servers_each_with_its_own_budget(
        cluster_factory: Any, proxy_factory: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="slotproxy")
    alpha, beta = cluster_factory(max_connections=10), cluster_factory(max_connections=10)
    # No "*" and no [backend]: other database names have no route.
    proxy = await proxy_factory(None, databases={
        "alpha": {"host": alpha.host, "port": alpha.port, "dbname": "postgres"},
        "beta": {"host": beta.host, "port": beta.port, "dbname": "postgres"},
    }, admission={"max_backend_slots": 2})
    assert len(proxy.upstreams) == 2

    def connect(db: str) -> Any:
        return asyncpg.connect(**at(proxy), user="app", database=db)

    in_alpha = [await connect("alpha") for _ in range(2)]
    third = asyncio.create_task(connect("alpha"))
    upstream_alpha = proxy.upstreams[next(a for a in proxy.upstreams if a.port == alpha.port)]
    await wait_until(lambda: upstream_alpha.gate.admission.waiting == 1, "alpha's budget spent")
    in_beta = await asyncio.wait_for(connect("beta"), 5)  # beta's budget is its own
    assert await in_beta.fetchval("select current_setting('port')::int") == beta.port
    assert await in_beta.fetchval("select current_database()") == "postgres"  # renamed on the way

    with pytest.raises(asyncpg.InvalidCatalogNameError) as unrouted:
        await connect("gamma")
    assert unrouted.value.sqlstate == "3D000"
    assert 'slotproxy has no route for database "gamma"' in str(unrouted.value)
    assert 'refused (no_route): slotproxy has no route for database "gamma"' in caplog.text

    await in_alpha.pop().close()
    for conn in [*in_alpha, in_beta, await third]:
        await conn.close()


# -- reclaiming idle slots ------------------------------------------------------------------------


async def idle_raw_session(proxy: Proxy, begin: bool = False) -> RawClient:
    raw = await RawClient.connect(**at(proxy))
    raw.send_startup(application_name="stuck-cron")
    await raw.read_until("Z")
    if begin:
        raw.send(query("begin"))
        await raw.read_until("Z")
    return raw


async def test_stuck_sessions_are_reclaimed_for_waiting_clients(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 8, "queue_timeout": 30,
                                               "idle_timeout": 1, "idle_in_transaction_timeout": 1})
    stuck = [await idle_raw_session(proxy, begin=i < 2) for i in range(8)]
    arrivals = [asyncio.create_task(app_client(proxy, "web", hold=0.05)) for _ in range(20)]
    outcomes = await asyncio.gather(*arrivals)
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok][:3]
    told = [await raw.read_error_then_eof() for raw in stuck]
    assert sorted(f["C"] for f in told) == ["25P03"] * 2 + ["57P05"] * 6
    assert {f["M"] for f in told if f["C"] == "57P05"} == {
        "idle session ended to free a slot for waiting clients (admission.idle_timeout=1)"}
    assert {f["M"] for f in told if f["C"] == "25P03"} == {
        "idle-in-transaction session ended to free a slot for waiting clients "
        "(admission.idle_in_transaction_timeout=1)"}
    assert proxy.primary.reclaimed == 8


async def test_without_idle_timeout_the_arrivals_wait_out_their_deadline(
        pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 8, "queue_timeout": 1.5})
    stuck = [await idle_raw_session(proxy) for _ in range(8)]
    outcomes = await asyncio.gather(*(app_client(proxy, "web", hold=0.05) for _ in range(20)))
    assert [o.sqlstate for o in outcomes] == ["53300"] * 20
    for raw in stuck:
        raw.send(TERMINATE)


@pytest.mark.parametrize("walker", WALKERS)
async def test_busy_sessions_and_idle_ones_nobody_waits_for_are_left_alone(
        pg: Cluster, proxy_factory: Any, walker: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "DEFAULT_WALKER", walker)
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 2, "queue_timeout": 30,
                                               "idle_timeout": 0.3})
    idle = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    [session] = proxy.sessions
    assert type(session.tracker.walker) is walker
    loop = asyncio.get_running_loop()
    await wait_until(lambda: loop.time() - session.tracker.since > 0.9,
                     "three idle timeouts with nobody waiting")
    assert await idle.fetchval("select 1") == 1, "an idle session is kept while nobody waits"

    busy = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    sleeping = asyncio.create_task(busy.fetchval("select pg_sleep(3)"))
    await wait_until(lambda: any(s.state == "active" for s in proxy.sessions), "the query running")
    waiter = asyncio.create_task(app_client(proxy, "web", hold=0.01))
    await wait_until(lambda: proxy.gate.admission.waiting == 1, "a client waiting")
    # The idle one goes for the waiter; the one running pg_sleep(3), ten times the
    # idle timeout, is never ended.
    assert (await waiter).ok
    await sleeping  # ran to its end
    assert proxy.primary.reclaimed == 1
    await busy.close()
    idle.terminate()


async def test_no_session_is_reclaimed_while_admission_is_paused(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 1, "queue_timeout": 30,
                                               "idle_timeout": 0.3})
    idle = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    [session] = proxy.sessions
    proxy.pause()
    waiter = asyncio.create_task(app_client(proxy, "web", hold=0.01))
    await wait_until(lambda: proxy.gate.admission.waiting == 1, "a client held by the pause")
    loop = asyncio.get_running_loop()
    await wait_until(lambda: loop.time() - session.tracker.since > 1.2, "four idle timeouts")
    assert await idle.fetchval("select 1") == 1, "ending it would have let nobody in"
    assert proxy.primary.reclaimed == 0
    proxy.resume()
    assert (await waiter).ok
    assert proxy.primary.reclaimed == 1
    idle.terminate()
